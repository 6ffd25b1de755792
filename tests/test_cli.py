"""The `superweight` command line: help, one-line errors, convert end to end (tiny model), inspect, eval forwarding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
from test_convert import DOWN, SW_COL, SW_LAYER, SW_ROW, SW_VALUE, fake_detection, make_tiny_llama  # noqa: E402

from vllm_superweight import cli
from vllm_superweight import convert as conv
from vllm_superweight.format import SIDECAR_NAME, FormatError, load_sidecar


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_cli") / "src"))


def sh(*args, timeout=120):
    """Run the real console entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "vllm_superweight.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("superweight: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# subprocess: the console script as a user runs it
# ----------------------------------------------------------------------------------------------------------
def test_help_subprocess():
    for cmd in ([], ["detect"], ["convert"], ["inspect"]):
        p = sh(*cmd, "--help")
        assert p.returncode == 0, p.stderr
        assert "usage: superweight" in p.stdout
    p = sh("convert", "--help")
    for flag in (
        "--preset",
        "--bits",
        "--block",
        "--symmetric",
        "--clip",
        "--holdout",
        "--holdout-rank",
        "--no-restore",
        "--activations",
        "--prompt",
        "--super-weights",
        "--dtype",
        "--overwrite",
        "--device",
    ):
        assert flag in p.stdout
    assert "w4-channel-sw" in p.stdout  # presets listed


def test_errors_subprocess(tmp_path):
    p = sh("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert p.returncode == 1
    assert "no such file or directory" in one_error_line(p.stderr)
    p = sh("convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--bits", "5")
    assert p.returncode != 0
    assert "unsupported bits 5" in one_error_line(p.stderr)
    p = sh("convert", str(tmp_path / "missing"))
    assert p.returncode == 2
    one_error_line(p.stderr)
    assert not os.path.exists(tmp_path / "out")


def test_convert_subprocess_end_to_end(tiny, tmp_path):
    swj = tmp_path / "sw.json"
    swj.write_text(json.dumps([{"layer": SW_LAYER, "row": SW_ROW, "col": SW_COL}]))
    dst = tmp_path / "out"
    p = sh("convert", tiny, str(dst), "--bits", "4", "--block", "64", "--super-weights", str(swj), "-q")
    assert p.returncode == 0, p.stderr
    assert "params/s" in p.stdout and f"{DOWN}[{SW_ROW}, {SW_COL}]" in p.stdout
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert sc["super_weights"][0]["value"] == SW_VALUE
    cfg = json.load(open(dst / "config.json"))["quantization_config"]
    assert (cfg["bits"], cfg["block"], cfg["holdout"]) == (4, "64", 0.001)  # default preset + overrides
    # existing DST without --overwrite: error, DST untouched
    before = sorted(os.listdir(dst))
    p = sh("convert", tiny, str(dst), "--super-weights", "none", "-q")
    assert p.returncode == 1 and "already exists" in one_error_line(p.stderr)
    assert sorted(os.listdir(dst)) == before


# ----------------------------------------------------------------------------------------------------------
# in-process (fast)
# ----------------------------------------------------------------------------------------------------------
def main(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_holdout_rank_option(capsys):
    """--holdout-rank reaches the QuantConfig on top of any preset; other values are refused by the parser."""
    p = cli.build_parser()
    qc = cli.quant_config_from_args(p.parse_args(["convert", "S", "D", "--holdout-rank", "prompt"]))
    assert qc.holdout_rank == "prompt" and qc.holdout == conv.build_quant_config("default").holdout
    qc = cli.quant_config_from_args(p.parse_args(["convert", "S", "D", "--preset", "w4-channel-sw"]))
    assert qc.holdout_rank == "abs"  # a preset without the key
    assert cli.quant_config_from_args(p.parse_args(["convert", "S", "D"])).holdout_rank == "abs"  # default preset
    qc = cli.quant_config_from_args(p.parse_args(["convert", "S", "D", "--preset", "w4-g128-hqq"]))
    assert qc.holdout_rank == "prompt" and qc.holdout_budget == "rel_out"  # Python-docs prose, Gemma-3-270M
    qc = cli.quant_config_from_args(
        p.parse_args(["convert", "S", "D", "--preset", "w4-g128-hqq", "--holdout-rank", "abs"])
    )
    assert qc.holdout_rank == "abs" and qc.holdout == 0.003
    with pytest.raises(SystemExit):
        p.parse_args(["convert", "S", "D", "--holdout-rank", "act"])
    assert "invalid choice: 'act'" in capsys.readouterr().err


def test_holdout_modules_option():
    """--holdout-modules: a comma list reaches the QuantConfig on top of a preset; 'all' (or empty) means every
    matrix; with --holdout 0 it is refused (the list would name where nothing is spent). The default preset spends
    its hold-out in the attention input projections; its list gives way to --holdout 0 and to blocks that are not
    groups (there every matrix keeps more of the gain), never to an explicit list."""
    p = cli.build_parser()

    def qc_of(*flags):
        return cli.quant_config_from_args(p.parse_args(["convert", "S", "D", *flags]))

    qc = qc_of("--holdout-modules", "q_proj, k_proj,v_proj")
    assert qc.holdout_modules == ("q_proj", "k_proj", "v_proj") and qc.holdout == 1e-3
    default = qc_of().holdout_modules
    assert {"q_proj", "k_proj", "v_proj", "qkv_proj"} <= set(default) and "o_proj" not in default
    assert qc_of("--preset", "w4-g64-hqq").holdout_modules == ()
    for every in ("all", ""):
        assert qc_of("--holdout-modules", every).holdout_modules == ()
    assert qc_of("--holdout", "0").holdout_modules == () and qc_of("--holdout", "0").holdout == 0
    for block in ("channel", "rows:4", "tensor"):
        assert qc_of("--block", block).holdout_modules == (), block
    assert qc_of("--block", "128").holdout_modules == default
    assert qc_of("--block", "channel", "--holdout-modules", "q_proj").holdout_modules == ("q_proj",)
    with pytest.raises(FormatError, match="it needs holdout > 0"):
        qc_of("--holdout", "0", "--holdout-modules", "q_proj")


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["convert", "SRC", "DST", "--block", "96"], "group size 96 does not divide"),
        (["convert", "SRC", "DST", "--block", "rows:3"], "rows:3 does not divide"),
        (["convert", "SRC", "DST", "--block", "weird"], "unknown block layout"),
        (["convert", "SRC", "DST", "--clip", "zscore:abc"], "not a number"),
        (["convert", "SRC", "DST", "--clip", "magic"], "unknown clip method"),
        (["convert", "SRC", "DST", "--holdout", "0.7"], "holdout fraction"),
        (["convert", "SRC", "DST", "--activations", "int8-token"], "int8 activations need --bits 8"),
        (["convert", "SRC", "DST", "--preset", "nope"], "unknown preset"),
        (["convert", "SRC", "DST", "--super-weights", "MISSING.json"], "no such file"),
        (["convert", "SRC", "DST", "--super-weights", "[[1, 99, 0]]"], "outside its matrix"),
        (["convert", "SRC", "DST", "--max-shard-size", "lots"], "bad size"),
        (["convert", "SRC", "DST", "--device", "tpu"], "unknown device"),
    ],
)
def test_convert_errors_inprocess(tiny, tmp_path, capsys, argv, msg):
    argv = [a.replace("SRC", tiny).replace("DST", str(tmp_path / "out")) for a in argv]
    if "[[1, 99, 0]]" in argv:
        p = tmp_path / "sw.json"
        p.write_text(argv[-1])
        argv[-1] = str(p)
    rc, out, err = main(argv + ["-q"], capsys)
    assert rc == 1, (out, err)
    assert msg in one_error_line(err)
    assert not os.path.exists(tmp_path / "out")
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]


def test_convert_interrupt_inprocess(tiny, tmp_path, capsys, monkeypatch):
    from vllm_superweight import quantize

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_weight", boom)
    rc, out, err = main(["convert", tiny, str(tmp_path / "out"), "--super-weights", "none", "-q"], capsys)
    assert rc == 130 and "interrupted" in one_error_line(err)
    assert os.listdir(tmp_path) == []


def test_signal_swallowed_by_a_library_still_reports_interrupted(tiny, tmp_path, capsys, monkeypatch):
    """A SIGTERM / SIGINT whose KeyboardInterrupt a library turns into another error (seen in CI: safetensors'
    get_tensor came back with "could not determine the shape of object type 'torch.storage.UntypedStorage'") is
    still reported as the interruption (130), with nothing written; without a signal the same error is status 1."""
    import signal

    from vllm_superweight import quantize

    def interrupted_inside_a_library(*a, **k):
        try:
            cli._on_signal(signal.SIGTERM, None)  # what the handler does when the signal lands here ...
        except KeyboardInterrupt:
            pass  # ... swallowed by library code, which then fails its own way
        raise RuntimeError("could not determine the shape of object type")

    def library_error(*a, **k):
        raise RuntimeError("could not determine the shape of object type")

    argv = ["convert", tiny, str(tmp_path / "out"), "--super-weights", "none", "-q"]
    monkeypatch.setattr(quantize, "quantize_weight", interrupted_inside_a_library)
    rc, out, err = main(argv, capsys)
    assert rc == 130 and "interrupted" in one_error_line(err), err
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(quantize, "quantize_weight", library_error)
    rc, out, err = main(argv, capsys)
    assert rc == 1 and "could not determine" in one_error_line(err), err
    assert os.listdir(tmp_path) == []


def test_interrupt_through_embedded_python_still_exits_130(tiny, tmp_path):
    """CI 2026-12-02: SIGINT mid-convert under ``python -m`` came back as status -2 although the CLI printed
    "interrupted" -- the KeyboardInterrupt had passed out of a library's embedded ``PyRun_String`` call, after which
    CPython kills itself with SIGINT at exit. Here a real conversion is interrupted the same way (the quantizer runs a
    snippet through ``PyRun_String`` that raises) in a ``python -m`` process: the status must be 130, nothing left."""
    mod = tmp_path / "pkg_run_interrupted.py"
    out = tmp_path / "o" / "out"
    mod.write_text(
        "import ctypes, sys\n"
        "from vllm_superweight import cli, quantize\n"
        "run = ctypes.pythonapi.PyRun_String\n"
        "run.restype = ctypes.py_object\n"
        "run.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]\n"
        "def quantize_weight(*a, **k):\n"
        "    run(b'raise KeyboardInterrupt', 257, {}, {})  # 257 = Py_file_input\n"
        "quantize.quantize_weight = quantize_weight\n"
        f"sys.argv = ['superweight', 'convert', {tiny!r}, {str(out)!r}, '--super-weights', 'none', '-q']\n"
        "sys.exit(cli.main())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(
        [sys.executable, "-m", "pkg_run_interrupted"], capture_output=True, text=True, timeout=300, env=env
    )
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    assert "interrupted" in one_error_line(p.stderr)
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_convert_with_stubbed_detection(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        conv.pipeline, "run_detection", lambda model, tok, prompt, progress=True, **kw: fake_detection()
    )
    dst = tmp_path / "out"
    rc, out, err = main(["convert", tiny, str(dst), "--preset", "w8a8-int8-token", "--no-restore", "-q"], capsys)
    assert rc == 0, err
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert sc["super_weights"][0]["restored"] is False
    q = json.load(open(dst / "config.json"))["quantization_config"]
    assert (q["bits"], q["symmetric"], q["activations"], q["restore_super_weights"]) == (8, True, "int8-token", False)


def test_eval_forwarding(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("vllm_superweight.eval")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "vllm_superweight.eval", fake)
    import vllm_superweight

    monkeypatch.setattr(vllm_superweight, "eval", fake, raising=False)
    rc, _, _ = main(["eval", "CKPT", "--max-tokens", "1024", "--window", "512", "--json", "o.json"], capsys)
    assert rc == 0 and seen == [["CKPT", "--max-tokens", "1024", "--window", "512", "--json", "o.json"]]


def _fake_detect_module(monkeypatch):
    prof = [
        {
            "layer": i,
            "down_in_max": 1.0 + 50 * (i == SW_LAYER),
            "down_in_channel": SW_COL,
            "down_out_max": 2.0 + 90 * (i == SW_LAYER),
            "down_out_channel": SW_ROW,
            "hidden_max": 3.0,
        }
        for i in range(2)
    ]
    fake = types.ModuleType("vllm_superweight.detect")
    fake.DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
    fake.profile_calls = []

    def detect_super_weights(model, tok, prompt=fake.DEFAULT_PROMPT, **kw):
        r = fake_detection()
        r.profile = prof
        r.to_json = lambda: {"super_weights": [{"layer": SW_LAYER, "module": DOWN, "row": SW_ROW, "col": SW_COL}]}
        return r

    def activation_profile(model, tok, prompt=fake.DEFAULT_PROMPT, **kw):
        fake.profile_calls.append(type(model).__name__)
        return prof

    fake.detect_super_weights = detect_super_weights
    fake.activation_profile = activation_profile
    fake.match_published = lambda name, cfg, result: None
    fake.format_report = lambda r: f"super weights: {[(s.layer, s.row, s.col) for s in r.super_weights]}"
    plots = types.ModuleType("vllm_superweight.plots")

    def plot_activation_profile(profile, path, title, super_weights=()):
        open(path, "wb").write(b"\x89PNG fake")
        return path

    plots.plot_activation_profile = plot_activation_profile
    import vllm_superweight

    for name, mod in (("detect", fake), ("plots", plots)):
        monkeypatch.setitem(sys.modules, f"vllm_superweight.{name}", mod)
        monkeypatch.setattr(vllm_superweight, name, mod, raising=False)
    return fake


def test_detect_and_inspect_with_stub_detector(tiny, tmp_path, capsys, monkeypatch):
    fake = _fake_detect_module(monkeypatch)
    js, png = tmp_path / "det.json", tmp_path / "det.png"
    rc, out, err = main(["detect", tiny, "--json", str(js), "--plot", str(png), "-q"], capsys)
    assert rc == 0, err
    assert f"({SW_LAYER}, {SW_ROW}, {SW_COL})" in out and png.exists()
    assert json.load(open(js))["super_weights"][0]["row"] == SW_ROW
    # the detect --json output feeds convert --super-weights
    dst = tmp_path / "ckpt"
    rc, out, err = main(["convert", tiny, str(dst), "--super-weights", str(js), "-q"], capsys)
    assert rc == 0, err
    png2 = tmp_path / "insp.png"
    rc, out, err = main(["inspect", str(dst), "--plot", str(png2), "-q"], capsys)
    assert rc == 0, err
    assert f"{DOWN}[{SW_ROW}, {SW_COL}]" in out and "per-layer quantization error" in out
    assert "per-layer max |activation|" in out and "<- super weight" in out and png2.exists()
    assert fake.profile_calls == ["LlamaForCausalLM"]  # profile of the dequantized checkpoint
    # inspect a source model
    rc, out, err = main(["inspect", tiny, "--plot", str(tmp_path / "src.png"), "-q"], capsys)
    assert rc == 0, err
    assert "per-layer max |activation|" in out
    # bad plot directory: one-line error
    rc, out, err = main(["inspect", str(dst), "--plot", str(tmp_path / "no" / "x.png"), "-q"], capsys)
    assert rc == 1 and "does not exist" in one_error_line(err)


def test_inspect_errors(tmp_path, capsys):
    rc, out, err = main(["inspect", str(tmp_path / "missing"), "-q"], capsys)
    assert rc == 1
    one_error_line(err)


def test_detect_convert_inspect_real_detector(tmp_path, capsys):
    """The real detector + plots on the planted tiny model: detect --json/--plot, convert, inspect the checkpoint."""
    pytest.importorskip("vllm_superweight.detect")
    pytest.importorskip("vllm_superweight.plots")
    from test_convert import make_planted_dir

    src = make_planted_dir(str(tmp_path / "src"))
    js, png = tmp_path / "det.json", tmp_path / "det.png"
    rc, out, err = main(["detect", src, "--json", str(js), "--plot", str(png), "-q"], capsys)
    assert rc == 0, err
    det = json.load(open(js))
    assert [(s["layer"], s["row"], s["col"]) for s in det["super_weights"]] == [(1, 13, 37)]
    assert png.exists() and png.stat().st_size > 1000
    dst = tmp_path / "ckpt"
    rc, out, err = main(["convert", src, str(dst), "--block", "channel", "--super-weights", str(js), "-q"], capsys)
    assert rc == 0, err
    png2 = tmp_path / "insp.png"
    rc, out, err = main(["inspect", str(dst), "--plot", str(png2), "-q"], capsys)
    assert rc == 0, err
    assert "model.layers.1.mlp.down_proj[13, 37]" in out and "per-layer max |activation|" in out
    assert png2.exists() and png2.stat().st_size > 1000
