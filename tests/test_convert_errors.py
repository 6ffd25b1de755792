"""Bad inputs of the converter (issue 9): --overwrite safety, disk full, unwritable destinations, leftovers of killed
conversions, the pickle fallback, the tiling hint, a signal mid-conversion. Each: one clear line, nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_cli import one_error_line
from test_convert import assert_nothing_written, load_all, make_planted_dir, make_tiny_llama, run

from vllm_superweight import cli
from vllm_superweight import convert as conv
from vllm_superweight.checkpoint import validate_checkpoint as conv_validate
from vllm_superweight.format import SIDECAR_NAME, FormatError, QuantConfig, Sidecar


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_err") / "src"))


def no_detection(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("detection ran")

    monkeypatch.setattr(conv.pipeline, "run_detection", boom)


def snapshot(path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


# ----------------------------------------------------------------------------------------------------------
# --overwrite replaces only one of our checkpoints or an empty directory
# ----------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_our_checkpoint_and_empty_dir(tiny, tmp_path):
    dst = tmp_path / "out"
    run(tiny, dst, QuantConfig(bits=8))
    (dst / "profile.png").write_bytes(b"png")  # e.g. `superweight inspect out --plot out/profile.png`
    run(tiny, dst, QuantConfig(bits=4), overwrite=True)
    assert json.load(open(dst / "config.json"))["quantization_config"]["bits"] == 4
    assert not (dst / "profile.png").exists() and sorted(os.listdir(tmp_path)) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run(tiny, empty, overwrite=True)
    assert (empty / "config.json").exists()


def test_overwrite_refuses_a_directory_that_is_not_ours(tiny, tmp_path, monkeypatch):
    no_detection(monkeypatch)
    dst = tmp_path / "mine"
    (dst / "sub").mkdir(parents=True)
    (dst / "notes.txt").write_text("precious")
    (dst / "sub" / "config.json").write_text("{}")
    (dst / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    before = snapshot(dst)
    with pytest.raises(FormatError, match="is not a superweight_rtn checkpoint .* choose another DST"):
        run(tiny, dst, overwrite=True, super_weights=None)
    assert snapshot(dst) == before and sorted(os.listdir(tmp_path)) == ["mine"]
    # config.json claims superweight_rtn but there is no sidecar: not recognisably ours either
    (dst / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "superweight_rtn"}}))
    with pytest.raises(FormatError, match="is not a superweight_rtn checkpoint"):
        run(tiny, dst, overwrite=True)


def test_overwrite_refuses_file_symlink(tiny, tmp_path):
    f = tmp_path / "file"
    f.write_text("data")
    with pytest.raises(FormatError, match="is a file, not a checkpoint directory"):
        run(tiny, f, overwrite=True)
    assert f.read_text() == "data"
    link = tmp_path / "link"
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(target, link)
    with pytest.raises(FormatError, match="is a symbolic link"):
        run(tiny, link, overwrite=True)
    assert os.path.islink(link) and sorted(os.listdir(tmp_path)) == ["file", "link", "target"]


def test_overwrite_refuses_cwd_home_root_and_source(tiny, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for dst in (".", str(work), str(tmp_path)):
        with pytest.raises(FormatError, match="current directory"):
            run(tiny, dst, overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(FormatError, match="is a home directory"):
        run(tiny, str(home), overwrite=True)
    with pytest.raises(FormatError, match="is the root directory"):
        run(tiny, "/", overwrite=True)
    with pytest.raises(FormatError, match="overlap the source"):
        run(tiny, tiny, overwrite=True)
    with pytest.raises(FormatError, match="overlap the source"):
        run(tiny, os.path.dirname(tiny), overwrite=True)  # a parent of the source
    assert (work / "keep.txt").read_text() == "mine" and os.listdir(work) == ["keep.txt"]
    assert os.path.exists(os.path.join(tiny, "model.safetensors"))


def test_overwrite_dot_cli_one_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    rc = cli.main(["convert", tiny, ".", "--overwrite", "--super-weights", "none", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "current directory" in one_error_line(err)
    assert os.listdir(tmp_path) == ["keep.txt"]


# ----------------------------------------------------------------------------------------------------------
# disk full, unwritable destinations (found before detection)
# ----------------------------------------------------------------------------------------------------------
def test_disk_full_one_line_nothing_written(tiny, tmp_path, monkeypatch, capsys):
    def full(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(conv.save, "save_file", full)
    with pytest.raises(conv.ConversionError, match="no space left on device while writing .*out"):
        run(tiny, tmp_path / "out")
    assert_nothing_written(tmp_path)
    rc = cli.main(["convert", tiny, str(tmp_path / "out"), "--super-weights", "none", "-q"])
    assert rc == 1 and "no space left on device" in one_error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_disk_full_from_safetensors_message(tiny, tmp_path, monkeypatch):
    """safetensors reports I/O errors as a SafetensorError string, not an OSError."""
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(conv.ConversionError, match="no space left on device"):
        run(tiny, tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_unwritable_destination_found_before_detection(tiny, tmp_path, monkeypatch, capsys):
    no_detection(monkeypatch)
    with pytest.raises(
        conv.ConversionError,
        match="cannot write the destination /proc/superweight-x/out: /proc does not accept new directories",
    ):
        run(tiny, "/proc/superweight-x/out", super_weights=None)
    real_mkdir = os.mkdir

    def ro(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_mkdir(path, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "mkdir", ro)
    with pytest.raises(conv.ConversionError, match="cannot write the destination .*: permission denied in .*ro"):
        run(tiny, tmp_path / "ro" / "a" / "out", super_weights=None)
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    assert os.listdir(tmp_path / "ro") == []
    rc = cli.main(["convert", tiny, "/proc/superweight-x/out", "-q"])
    assert rc == 1 and "does not accept new directories" in one_error_line(capsys.readouterr().err)


def test_created_parents_removed_on_failure(tiny, tmp_path):
    with pytest.raises(FormatError, match="outside its matrix"):
        run(tiny, tmp_path / "a" / "b" / "out", super_weights=[{"layer": 1, "row": 999, "col": 0}])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# leftovers of killed conversions
# ----------------------------------------------------------------------------------------------------------
def test_stale_partial_dirs_of_dead_processes_removed(tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, live.pid):
            d = tmp_path / f"out.partial-{pid}"
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half")
        (tmp_path / "other.partial-1").mkdir()  # another DST's: not ours to judge
        logs = []
        run(tiny, tmp_path / "out", log=logs.append)
        left = sorted(os.listdir(tmp_path))
        assert left == sorted(["out", f"out.partial-{live.pid}", "other.partial-1"])
        assert any(f"pid {dead.pid} is gone" in m for m in logs)
        assert any(f"running conversion (pid {live.pid})" in m for m in logs)
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------------------------------------
# detection reads the same safetensors as the conversion; never a pickle
# ----------------------------------------------------------------------------------------------------------
def test_detection_and_conversion_read_the_same_safetensors(tmp_path, monkeypatch):
    pytest.importorskip("vllm_superweight.detect")
    src = make_planted_dir(str(tmp_path / "src"))
    os.rename(os.path.join(src, "model.safetensors"), os.path.join(src, "weights.safetensors"))
    ts = load_all(src)  # a DIFFERENT model in the pickle: no super weight there
    ts["model.layers.1.mlp.down_proj.weight"][13, 37] = 0.0
    torch.save(ts, os.path.join(src, "pytorch_model.bin"))

    def no_pickle(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_pickle)
    dst = tmp_path / "out"
    run(src, dst, QuantConfig(block="channel"), super_weights=None)
    sc = Sidecar.load(str(dst / SIDECAR_NAME))
    assert [(s.layer, s.row, s.col) for s in sc.super_weights] == [(1, 13, 37)]  # found in the safetensors


def test_bin_only_source_refused(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    torch.save(load_all(str(src)), src / "pytorch_model.bin")
    os.remove(src / "model.safetensors")
    with pytest.raises(FormatError, match="no \\*.safetensors weights \\(only safetensors are read\\)"):
        run(str(src), tmp_path / "out")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unsupported_sources(tiny, tmp_path, model_type):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    cfg = json.load(open(src / "config.json"))
    cfg["model_type"] = model_type
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(FormatError, match=f"unsupported architecture model_type='{model_type}'"):
        run(str(src), tmp_path / "out")
    assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# the tiling hint names only groups that tile EVERY quantized Linear
# ----------------------------------------------------------------------------------------------------------
def test_tiling_hint(tiny, tmp_path):
    with pytest.raises(FormatError) as e:
        run(tiny, tmp_path / "out", QuantConfig(block="96"))
    assert "group sizes that tile every quantized Linear of this model: 32, 64, or 'channel'" in str(e.value)
    odd = make_tiny_llama(str(tmp_path / "odd"), hidden=48, inter=80)  # K in {48, 80}: no group of 32..256
    with pytest.raises(FormatError) as e:
        run(odd, tmp_path / "out", QuantConfig(block="32"))
    msg = str(e.value)
    assert "no group size tiles every quantized Linear of this model; use 'channel'" in msg
    assert "e.g. 1" not in msg and ", 1" not in msg
    assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# conversion id; a bogus module / unknown bits refused at conversion time too
# ----------------------------------------------------------------------------------------------------------
def test_conversion_id_in_config_and_sidecar(tiny, tmp_path):
    a = tmp_path / "a"
    rep = run(tiny, a, QuantConfig(bits=4, block="64"))
    cid = json.load(open(a / "config.json"))["quantization_config"]["conversion_id"]
    assert cid == Sidecar.load(str(a / SIDECAR_NAME)).conversion_id == rep["conversion_id"] and len(cid) == 32
    b = tmp_path / "b"
    run(tiny, b, QuantConfig(bits=4, block="64", holdout=1e-3))
    assert json.load(open(b / "config.json"))["quantization_config"]["conversion_id"] != cid


def test_bogus_super_weight_module_and_bits(tiny, tmp_path, capsys):
    with pytest.raises(FormatError, match=r"super weight model.layers.1.mlp.bogus\[0, 0\]: no such quantized module"):
        run(tiny, tmp_path / "out", super_weights=[{"module": "model.layers.1.mlp.bogus", "row": 0, "col": 0}])
    with pytest.raises(FormatError, match="row: expected an integer, got '3'"):
        run(tiny, tmp_path / "out", super_weights=[{"layer": 1, "row": "3", "col": 0}])
    p = tmp_path / "preset.json"
    p.write_text(json.dumps({"bits": "four", "block": "64"}))
    rc = cli.main(["convert", tiny, str(tmp_path / "out"), "--preset", str(p), "-q"])
    assert rc == 1 and "bits: expected an integer" in one_error_line(capsys.readouterr().err)
    assert_nothing_written(tmp_path, "out")


# ----------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT in the middle of a real conversion: exit 130, nothing left
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_conversion_leaves_nothing(tmp_path, sig):
    src = make_tiny_llama(str(tmp_path / "src"), hidden=256, inter=1024, layers=6)
    out = tmp_path / "o" / "out"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_superweight.cli",
            "convert",
            src,
            str(out),
            "--super-weights",
            "none",
            "--holdout",
            "1e-2",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (tmp_path / "o").exists() and any(".partial-" in f for f in os.listdir(tmp_path / "o")):
            break
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert p.returncode == 130, err
    line = one_error_line(err)
    assert "interrupted" in line
    if "was written complete" in line:  # the signal landed just after the rename: the checkpoint is whole
        conv_validate(str(out))
        assert sorted(os.listdir(tmp_path / "o")) == ["out"]
        pytest.skip("the signal arrived after the checkpoint was in place (reported so, checkpoint valid)")
    assert "nothing was written" in line
    assert not (tmp_path / "o").exists()
    assert_nothing_written(tmp_path, "o")


def test_interrupt_right_after_a_directory_is_created_removes_it(tiny, tmp_path, capsys, monkeypatch):
    """A signal landing just after ``mkdir`` (of a missing parent, of the temporary directory) and before the
    directory is recorded: the clean-up still removes it (CI, 2026-12-03: ``o/`` was left behind)."""
    real_mkdir = conv.Destination._mkdir
    made = []

    def mkdir_then_signal(self, path):
        real_mkdir(self, path)
        made.append(path)
        if len(made) == n:
            cli._on_signal(signal.SIGINT, None)

    monkeypatch.setattr(conv.Destination, "_mkdir", mkdir_then_signal)
    for n in (1, 2, 3):  # o, o/p, o/p/out.partial-PID
        made.clear()
        rc = cli.main(["convert", tiny, str(tmp_path / "o" / "p" / "out"), "--super-weights", "none", "-q"])
        err = capsys.readouterr().err
        assert rc == 130, err
        assert "nothing was written" in one_error_line(err)
        assert len(made) == n
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupt_at_the_rename_keeps_the_whole_checkpoint_and_says_so(tiny, tmp_path, capsys, monkeypatch, existing):
    """A signal landing while the finished checkpoint is renamed into place: it is kept, complete and valid, and
    the error line says it was written (not "nothing was written"); an old DST is replaced, not lost."""
    from vllm_superweight.convert import save

    out = tmp_path / "out"
    argv = ["convert", tiny, str(out), "--super-weights", "none", "-q"]
    if existing:
        assert cli.main(argv) == 0
        capsys.readouterr()
        argv.append("--overwrite")
    real_replace = os.replace

    def replace_then_signal(a, b):
        real_replace(a, b)
        if os.path.basename(a) == f"out.partial-{os.getpid()}":  # the rename of the finished checkpoint
            cli._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(save.os, "replace", replace_then_signal)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 130, err
    line = one_error_line(err)
    assert f"after {out} was written complete" in line
    conv_validate(str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]
