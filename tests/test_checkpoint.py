"""checkpoint.validate_checkpoint: every bad input refused with one FormatError naming module / tensor / field,
header-only and fast; format 1.0 checkpoints (no conversion id) still load."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert import DOWN, SW_COL, SW_ROW, SWS, make_tiny_llama

from vllm_superweight import convert as conv
from vllm_superweight.checkpoint import read_safetensors_header, validate_checkpoint
from vllm_superweight.format import FORMAT_VERSION, FormatError, QuantConfig, Sidecar


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("ckv") / "src"))


def _convert(src: str, dst: str, **q) -> str:
    q.setdefault("holdout", 1e-3)
    conv.convert(src, dst, QuantConfig(**q), super_weights=SWS, progress=False, log=None)
    return dst


@pytest.fixture(scope="module")
def asym(src, tmp_path_factory) -> str:
    return _convert(src, str(tmp_path_factory.mktemp("ckv") / "asym"), bits=4, block="64")


@pytest.fixture(scope="module")
def sym(src, tmp_path_factory) -> str:
    return _convert(src, str(tmp_path_factory.mktemp("ckv") / "sym"), bits=8, block="channel", symmetric=True)


@pytest.fixture
def ck(asym, tmp_path) -> str:
    d = str(tmp_path / "ck")
    shutil.copytree(asym, d)
    return d


def edit_json(path, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def edit_config(ck, fn):
    edit_json(os.path.join(ck, "config.json"), lambda c: fn(c["quantization_config"]))


def edit_sidecar(ck, fn):
    edit_json(os.path.join(ck, "superweights.json"), fn)


def edit_tensors(ck, fn):
    p = os.path.join(ck, "model.safetensors")
    ts = load_file(p)
    fn(ts)
    save_file(ts, p, metadata={"format": "pt"})


def refused(ck, *needles):
    with pytest.raises(FormatError) as e:
        validate_checkpoint(ck)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------------------
def test_good_checkpoints_validate_fast(asym, sym):
    for ck in (asym, sym):
        t0 = time.perf_counter()
        q, sc = validate_checkpoint(ck)
        assert time.perf_counter() - t0 < 1.0
        assert isinstance(q, QuantConfig) and isinstance(sc, Sidecar)
        assert q.conversion_id and q.conversion_id == sc.conversion_id and q.format_version == FORMAT_VERSION
        assert [(s.module, s.row, s.col) for s in sc.super_weights] == [(DOWN, SW_ROW, SW_COL)]


def test_format_1_0_checkpoint_still_loads(ck):
    edit_config(ck, lambda q: (q.pop("conversion_id"), q.update(format_version="1.0")))
    edit_sidecar(ck, lambda s: (s.pop("conversion_id"), s.update(format_version="1.0")))
    q, sc = validate_checkpoint(ck)
    assert q.conversion_id is None and sc.format_version == "1.0"


def test_sharded_checkpoint(src, tmp_path):
    d = str(tmp_path / "sh")
    conv.convert(
        src,
        d,
        QuantConfig(bits=4, block="channel"),
        super_weights=SWS,
        progress=False,
        log=None,
        max_shard_bytes=40_000,
    )
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    validate_checkpoint(d)
    edit_json(
        os.path.join(d, "model.safetensors.index.json"),
        lambda i: i["weight_map"].update({"x": "../../elsewhere.safetensors"}),
    )
    refused(d, "model.safetensors.index.json weight_map entry", "leads out of the checkpoint directory")


# ----------------------------------------------------------------------------------------------------------
# quantized modules: tensors, dtypes, shapes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["weight_packed", "weight_scale", "weight_zero_point", "weight_shape"])
def test_missing_tensor(ck, suffix):
    edit_tensors(ck, lambda ts: ts.pop(f"{DOWN}.{suffix}"))
    refused(ck, DOWN, suffix)


def test_symmetric_flipped(ck, sym, tmp_path):
    edit_config(ck, lambda q: q.update(symmetric=True))
    refused(ck, "weight_zero_point is present but quantization_config.symmetric is true", "flipped")
    d = str(tmp_path / "sym")
    shutil.copytree(sym, d)
    edit_config(d, lambda q: q.update(symmetric=False))
    refused(d, "weight_zero_point but quantization_config.symmetric is false", "flipped")


def test_sparse_index_without_value(ck):
    edit_tensors(ck, lambda ts: ts.pop(f"{DOWN}.sparse_value"))
    refused(ck, f"{DOWN} has {DOWN}.sparse_index but lacks {DOWN}.sparse_value")


@pytest.mark.parametrize(
    "fn,msg",
    [
        (lambda ts: ts.update({f"{DOWN}.sparse_index": ts[f"{DOWN}.sparse_index"].long()}), "dtype I64, expected I32"),
        (lambda ts: ts.update({f"{DOWN}.sparse_index": ts[f"{DOWN}.sparse_index"].repeat(2, 1)}), "expected [2, nnz]"),
        (lambda ts: ts.update({f"{DOWN}.sparse_value": ts[f"{DOWN}.sparse_value"][:-1]}), "sparse_value: shape"),
        (lambda ts: ts.update({f"{DOWN}.sparse_value": ts[f"{DOWN}.sparse_value"].to(torch.int16)}), "dtype I16"),
        (lambda ts: ts.update({f"{DOWN}.weight_shape": torch.tensor([64, 128], dtype=torch.int32)}), "dtype I32"),
        (lambda ts: ts.update({f"{DOWN}.weight_shape": torch.tensor([64, 256])}), "weight_packed: shape"),
        (
            lambda ts: ts.update({f"{DOWN}.weight_scale": ts[f"{DOWN}.weight_scale"][:, :1].contiguous()}),
            "weight_scale: shape",
        ),
        (lambda ts: ts.update({f"{DOWN}.weight_packed": ts[f"{DOWN}.weight_packed"].float()}), "dtype F32"),
    ],
)
def test_bad_tensor_dtypes_and_shapes(ck, fn, msg):
    edit_tensors(ck, fn)
    refused(ck, DOWN, msg)


@pytest.mark.parametrize(
    "change", [{"bits": 8}, {"bits": 3}, {"block": "32"}, {"block": "channel"}, {"block": "tensor"}]
)
def test_config_disagrees_with_tensors(ck, change):
    edit_config(ck, lambda q: q.update(change))
    refused(ck, "the checkpoint and its config.json disagree")


def test_quantized_module_in_ignore(ck):
    edit_config(ck, lambda q: q["ignore"].append("re:.*down_proj$"))
    refused(ck, "is quantized in the checkpoint but matches quantization_config.ignore")


def test_truncated_shard(ck):
    p = os.path.join(ck, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 100])
    refused(ck, "model.safetensors: truncated")
    open(p, "wb").write(b"\x05")
    refused(ck, "not a safetensors file or truncated")
    with pytest.raises(FormatError, match="not a safetensors file"):
        read_safetensors_header(p)


# ----------------------------------------------------------------------------------------------------------
# config.json / sidecar
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,msg",
    [
        ({"bits": "four"}, "config.json: quantization_config.bits: expected an integer"),
        ({"bits": 5}, "quantization_config.bits: unsupported bits 5"),
        ({"format_version": "2.0"}, "format version 2.0 is not supported"),
        ({"format_version": None}, "format version (missing) is not supported"),
        ({"sidecar": "/etc/passwd"}, "quantization_config.sidecar: '/etc/passwd' is an absolute path"),
        ({"sidecar": "../superweights.json"}, "quantization_config.sidecar: '../superweights.json' leads out"),
        ({"sidecar": "other.json"}, "other.json is missing"),
    ],
)
def test_bad_quantization_config(ck, change, msg):
    edit_config(ck, lambda q: q.update(change))
    refused(ck, msg)


def test_config_missing_or_not_json(ck):
    os.remove(os.path.join(ck, "config.json"))
    refused(ck, "no config.json")
    open(os.path.join(ck, "config.json"), "w").write("{")
    refused(ck, "config.json is not valid JSON")


def test_sidecar_symlink_leaving(ck, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(os.path.join(ck, "superweights.json"), outside)
    os.symlink(outside, os.path.join(ck, "superweights.json"))
    refused(ck, "outside the checkpoint directory", "symbolic link")


def test_sidecar_missing_or_not_json(ck):
    p = os.path.join(ck, "superweights.json")
    open(p, "w").write("{oops")
    refused(ck, "superweights.json is not valid JSON")
    os.remove(p)
    refused(ck, "superweights.json is missing")


@pytest.mark.parametrize(
    "fn,msg",
    [
        (lambda s: s["super_weights"][0].update(row="abc"), "super_weights[0].row: expected an integer, got 'abc'"),
        (
            lambda s: s["super_weights"][0].update(value=float("nan")),
            "super_weights[0].value: expected a finite number",
        ),
        (lambda s: s["super_weights"][0].update(row=64), r"lies outside its matrix of shape [64, 128]"),
        (lambda s: s["super_weights"][0].update(row=-1), "lies outside its matrix"),
        (lambda s: s["super_weights"][0].update(col=128), "lies outside its matrix"),
        (
            lambda s: s["super_weights"][0].update(module="model.layers.1.mlp.bogus"),
            "super weight model.layers.1.mlp.bogus[5, 17]: no such quantized module in the checkpoint",
        ),
        (lambda s: s["super_weights"][0].update(module="lm_head"), "no such quantized module"),
        (
            lambda s: s["super_weights"][0].update(row=0, col=0),
            "is missing from model.layers.1.mlp.down_proj.sparse_index",
        ),
        (
            lambda s: s["super_weights"][0].update(value=-3.0, bits="c040"),
            "sidecar value -3.0 differs from the checkpoint's -3.25",
        ),
        (
            lambda s: s["super_weights"][0].update(value=-3.25, bits="c0500000", dtype="float32"),
            "sidecar dtype float32",
        ),
        (lambda s: s.update(format_version="2.0"), "sidecar format version 2.0 is not supported"),
        (lambda s: s.pop("format_version"), "format version (missing)"),
        (lambda s: s.update(conversion_id="ffffffffffffffffffffffffffffffff"), "comes from another conversion"),
        (lambda s: s.pop("conversion_id"), "comes from another conversion"),
        (lambda s: s["activation_outliers"].append({"module": DOWN, "channels": [500]}), "channel 500"),
    ],
)
def test_bad_sidecar(ck, fn, msg):
    edit_sidecar(ck, fn)
    refused(ck, msg)


def test_sidecar_from_another_conversion(ck, src, tmp_path):
    other = _convert(src, str(tmp_path / "other"), bits=4, block="64", holdout=1e-4)
    shutil.copy(os.path.join(other, "superweights.json"), os.path.join(ck, "superweights.json"))
    refused(ck, "sidecar superweights.json comes from another conversion")


def test_format_1_1_needs_conversion_id(ck):
    edit_config(ck, lambda q: q.pop("conversion_id"))
    edit_sidecar(ck, lambda s: s.pop("conversion_id"))
    refused(ck, "conversion_id: missing (required from format 1.1)")


@pytest.mark.parametrize(
    "fn,msg",
    [
        (lambda t: t[0].__setitem__(0, 64), "sparse_index: entry 0 = (64,"),
        (lambda t: t[1].__setitem__(0, -1), "lies outside the matrix [64, 128]"),
    ],
)
def test_sparse_index_out_of_range(ck, fn, msg):
    def edit(ts):
        t = ts[f"{DOWN}.sparse_index"].clone()
        fn(t)
        ts[f"{DOWN}.sparse_index"] = t

    edit_tensors(ck, edit)
    refused(ck, msg)


def test_sparse_value_nan(ck):
    def edit(ts):
        v = ts[f"{DOWN}.sparse_value"].clone()
        v[-1] = float("nan")
        ts[f"{DOWN}.sparse_value"] = v

    edit_tensors(ck, edit)
    refused(ck, f"{DOWN}.sparse_value: entry", "is not a finite number")
