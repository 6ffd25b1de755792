"""format.py: one type per concept (BlockLayout, QuantConfig, SuperWeight, Sidecar), validated in one place, with
messages that name the field; check_sidecar; resolve_inside. Pure Python, no model."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle

import pytest

from vllm_superweight.format import (
    FORMAT_VERSION,
    ActivationOutliers,
    ActScheme,
    BlockLayout,
    ClipMethod,
    FormatError,
    HoldoutRank,
    QuantConfig,
    Sidecar,
    SuperWeight,
    check_sidecar,
    check_super_weights_in_range,
    layer_of,
    load_sidecar,
    matches_any,
    resolve_inside,
    tiling_hint,
)

DOWN = "model.layers.1.mlp.down_proj"
SHAPES = {DOWN: (64, 128), "model.layers.0.mlp.down_proj": (64, 128), "model.layers.1.self_attn.q_proj": (64, 64)}


# ----------------------------------------------------------------------------------------------------------
# QuantConfig
# ----------------------------------------------------------------------------------------------------------
def test_quant_config_typed_and_compatible():
    q = QuantConfig(bits=4, block="64", holdout=1e-3, clip="zscore", clip_threshold=9)
    assert q.layout == BlockLayout("group", 64) and q.block == "64"  # parsed once; the string form still there
    assert q.activations == "none" and q.activations is ActScheme.NONE and f"{q.activations}" == "none"
    assert q.clip == "zscore" and q.clip is ClipMethod.ZSCORE and {"zscore": 1}[q.clip] == 1
    assert q.ignore == tuple(q.ignore) and q.sidecar == "superweights.json" and q.format_version == FORMAT_VERSION
    assert pickle.loads(pickle.dumps(q)) == q  # vLLM pickles the config to its workers
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 8  # type: ignore[misc]
    assert q.replace(block="channel").layout.kind == "channel"
    assert dataclasses.replace(q, clip_threshold=None).clip_threshold is None
    d = q.to_dict()
    assert json.loads(json.dumps(d)) == d and d["block"] == "64" and d["clip"] == {"method": "zscore", "threshold": 9.0}
    assert QuantConfig.from_dict(d) == q
    q2 = q.replace(conversion_id="0123456789abcdef")
    assert QuantConfig.from_dict(q2.to_dict()).conversion_id == "0123456789abcdef"
    assert QuantConfig.from_dict(dict(d, future_field=[1, 2])) == q  # minor versions add fields readers ignore


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"bits": 5}, "bits: unsupported bits 5"),
        ({"bits": "4"}, "bits: expected an integer"),
        ({"bits": True}, "bits: expected an integer"),
        ({"block": "weird"}, "block: unknown block layout 'weird'"),
        ({"block": "g3"}, "group size must be an even number"),
        ({"symmetric": "yes"}, "symmetric: expected true or false"),
        ({"clip": "magic"}, "clip: unknown clip method 'magic'"),
        ({"clip_threshold": "x"}, "clip_threshold: expected a number"),
        ({"holdout": 0.7}, "holdout: holdout fraction must be in [0, 0.5)"),
        ({"holdout": float("nan")}, "holdout: expected a finite number"),
        ({"activations": "int4"}, "activations: unknown activation scheme 'int4'"),
        ({"activations": "int8-token"}, "activations: int8 activations need --bits 8"),
        ({"bits": 8, "symmetric": True, "activations": "int8-token", "block": "64"}, "need per-row weight scales"),
        ({"ignore": "lm_head"}, "ignore: expected a list"),
        ({"ignore": ["re:("]}, "ignore: bad pattern"),
        ({"sidecar": ""}, "sidecar: expected a non-empty string"),
        ({"conversion_id": "x"}, "conversion_id: expected an id"),
    ],
)
def test_quant_config_constructor_errors(kw, msg):
    with pytest.raises(FormatError) as e:
        QuantConfig(**kw)
    assert msg in str(e.value)


GOOD = QuantConfig(bits=4, block="64").to_dict()


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"bits": "four"}, "quantization_config.bits: expected an integer (3, 4, 8), got 'four'"),
        ({"bits": 5}, "quantization_config.bits: unsupported bits 5"),
        ({"bits": "4.0"}, "quantization_config.bits: expected an integer (3, 4, 8), got '4.0'"),
        ({"bits": 4.0}, "quantization_config.bits: expected an integer (3, 4, 8), got 4.0"),
        ({"bits": None}, "quantization_config.bits: expected an integer"),
        ({"block": True}, "quantization_config.block: expected a block layout string, got True"),
        ({"block": "96x"}, "quantization_config.block: unknown block layout"),
        ({"symmetric": "false"}, "quantization_config.symmetric: expected true or false, got 'false'"),
        ({"clip": {"method": "magic"}}, "quantization_config.clip.method: unknown clip method 'magic'"),
        ({"clip": {"method": 3}}, "quantization_config.clip.method: expected a string"),
        ({"clip": {"method": "zscore", "threshold": "9"}}, "quantization_config.clip.threshold: expected a number"),
        ({"clip": "zscore"}, "quantization_config.clip: expected an object"),
        ({"holdout": "0.001"}, "quantization_config.holdout: expected a number, got '0.001'"),
        ({"restore_super_weights": 1}, "quantization_config.restore_super_weights: expected true or false"),
        ({"activations": ["none"]}, "quantization_config.activations: unknown activation scheme"),
        ({"ignore": [1]}, "quantization_config.ignore[0]: expected a non-empty string"),
        ({"packing": "naive"}, "quantization_config.packing: 'naive' is not 'pack-quantized'"),
        ({"sidecar": 7}, "quantization_config.sidecar: expected a non-empty string"),
        ({"conversion_id": 12}, "quantization_config.conversion_id: expected an id"),
        ({"quant_method": "awq"}, "quantization_config.quant_method: quant_method is 'awq'"),
        ({"format_version": "2.0"}, "format version 2.0 is not supported"),
        ({"format_version": 1.0}, "format version 1.0 is not supported"),  # a number, not "1.0"
        ({"format_version": None}, "format version (missing) is not supported"),
        ({"holdout_rank": "random"}, "quantization_config.holdout_rank: unknown hold-out ranking 'random'"),
        ({"holdout_rank": 1}, "quantization_config.holdout_rank: unknown hold-out ranking 1"),
        ({"holdout_modules": "q_proj"}, "quantization_config.holdout_modules: expected a list"),
        ({"holdout_modules": ["q_proj", 3]}, "quantization_config.holdout_modules[1]: expected a non-empty string"),
        ({"holdout_modules": ["re:(q"]}, "quantization_config.holdout_modules: bad pattern 're:(q'"),
        ({"holdout": 0.0, "holdout_modules": ["q_proj"]}, "quantization_config.holdout_modules: names the matrices"),
    ],
)
def test_quant_config_from_dict_names_the_field(change, msg):
    d = dict(GOOD, **change)
    with pytest.raises(FormatError) as e:
        QuantConfig.from_dict(d)
    assert msg in str(e.value)


def test_holdout_rank_roundtrip_and_old_configs():
    """holdout_rank (format 1.3) is written, read back, and a config written before it existed reads as abs."""
    q = QuantConfig(bits=4, block="64", holdout=1e-3, holdout_rank="prompt")
    assert q.holdout_rank == "prompt" and q.holdout_rank is HoldoutRank.PROMPT
    d = q.to_dict()
    assert d["holdout_rank"] == "prompt" and json.loads(json.dumps(d)) == d
    assert QuantConfig.from_dict(d) == q and QuantConfig.from_dict(d).to_dict() == d
    assert QuantConfig(holdout=1e-3).to_dict()["holdout_rank"] == "abs"  # the choice is recorded either way
    old = {k: v for k, v in d.items() if k != "holdout_rank"}
    for version in ("1.0", "1.1", "1.2"):
        got = QuantConfig.from_dict(dict(old, format_version=version))
        assert got.holdout_rank == "abs" and got.replace(format_version=FORMAT_VERSION) == q.replace(holdout_rank="abs")
    assert QuantConfig(holdout_rank="PROMPT").holdout_rank == "prompt"
    with pytest.raises(FormatError, match="holdout_rank: unknown hold-out ranking 'act'; one of abs, prompt"):
        QuantConfig(holdout_rank="act")


def test_holdout_modules_roundtrip_and_old_configs():
    """holdout_modules (format 1.4) is written only when set, read back, and a config without it (any 1.x) reads as
    every matrix (); a string instead of a list is refused rather than read letter by letter."""
    q = QuantConfig(bits=4, block="64", holdout=1e-3, holdout_modules=["q_proj", "k_proj", "re:.*v_proj"])
    assert q.holdout_modules == ("q_proj", "k_proj", "re:.*v_proj")
    d = q.to_dict()
    assert d["holdout_modules"] == ["q_proj", "k_proj", "re:.*v_proj"] and json.loads(json.dumps(d)) == d
    assert QuantConfig.from_dict(d) == q and QuantConfig.from_dict(d).to_dict() == d
    assert "holdout_modules" not in QuantConfig(holdout=1e-3).to_dict()
    old = {k: v for k, v in d.items() if k != "holdout_modules"}
    for version in ("1.0", "1.3"):
        got = QuantConfig.from_dict(dict(old, format_version=version))
        assert got.holdout_modules == () and got.replace(format_version=FORMAT_VERSION) == q.replace(holdout_modules=())
    with pytest.raises(FormatError, match="holdout_modules: expected a list of module names"):
        QuantConfig(holdout=1e-3, holdout_modules="q_proj")
    with pytest.raises(FormatError, match="it needs holdout > 0"):
        QuantConfig(holdout_modules=["q_proj"])


def test_matches_any():
    name = "model.layers.3.self_attn.q_proj"
    assert matches_any(name, ["q_proj"]) and matches_any(name, [name]) and matches_any(name, ["re:.*attn\\.q_.*"])
    assert not matches_any(name, ["proj"]) and not matches_any(name, ["re:q_proj"]) and not matches_any(name, [])
    assert not matches_any("model.layers.3.self_attn.xq_proj", ["q_proj"])


def test_quant_config_from_dict_missing_and_not_object():
    for key in ("bits", "block"):
        d = dict(GOOD)
        del d[key]
        with pytest.raises(FormatError, match=f"quantization_config.{key}: missing"):
            QuantConfig.from_dict(d)
    with pytest.raises(FormatError, match="quantization_config: expected an object"):
        QuantConfig.from_dict(["bits", 4])
    old = dict(GOOD, format_version="1.0")  # a format 1.0 config (no conversion id) still reads
    assert QuantConfig.from_dict(old).conversion_id is None


# ----------------------------------------------------------------------------------------------------------
# BlockLayout and the tiling hint
# ----------------------------------------------------------------------------------------------------------
def test_block_layout():
    assert BlockLayout.parse("g64") == BlockLayout.parse(64) == BlockLayout("group", 64)
    assert BlockLayout.parse("rows:1") == BlockLayout("channel") and str(BlockLayout.parse("rows:4")) == "rows:4"
    assert BlockLayout.parse(BlockLayout("tensor")) == BlockLayout("tensor")
    assert BlockLayout.parse("64").grid(8, 128) == (8, 2) and BlockLayout.parse("rows:4").grid(8, 3) == (2, 1)
    with pytest.raises(FormatError, match="group size 128 does not divide the input dimension 864"):
        BlockLayout.parse("128").grid(4, 864)
    with pytest.raises(FormatError, match="group size must be an even number"):
        BlockLayout("group", 3)
    with pytest.raises(FormatError, match="unknown block kind"):
        BlockLayout("diagonal")
    with pytest.raises(FormatError, match="block: expected a block layout string"):
        BlockLayout.parse(None)


def test_tiling_hint_only_groups_that_tile_every_linear():
    g96 = BlockLayout.parse("96")
    # SmolLM2-like: K in {576, 1536}: 32, 64 tile both; 128 / 256 do not tile 576
    assert tiling_hint(g96, [(576, 576), (1536, 576), (576, 1536)]) == (
        "group sizes that tile every quantized Linear of this model: 32, 64, or 'channel'"
    )
    hint = tiling_hint(g96, [(576, 864), (64, 100)])  # 864 has 32 and 96 but 100 has neither
    assert hint == "no group size tiles every quantized Linear of this model; use 'channel'"
    assert " 1," not in hint and "e.g." not in hint
    assert "2, 4" in tiling_hint(BlockLayout.parse("rows:3"), [(64, 10), (128, 10)])
    assert "use 'channel' or 'tensor'" in tiling_hint(BlockLayout.parse("rows:3"), [(63, 10)])


def test_layer_of():
    assert layer_of("model.layers.12.mlp.down_proj") == 12
    assert layer_of("model.language_model.layers.3.self_attn.q_proj") == 3
    assert layer_of("model.embed_tokens") is None


# ----------------------------------------------------------------------------------------------------------
# SuperWeight
# ----------------------------------------------------------------------------------------------------------
def test_super_weight_bits_and_requests():
    sw = SuperWeight(DOWN, 5, 17, value=-3.25, dtype="bfloat16")
    assert sw.bits == "c050" and sw.layer == 1 and sw.restored is True and sw.coord == (1, 5, 17)
    assert SuperWeight.from_dict(sw.to_dict()) == sw
    with pytest.raises(FormatError, match=r"bits: 'ffff' is not the bit pattern of value -3.25 in bfloat16 \('c050'\)"):
        SuperWeight(DOWN, 5, 17, value=-3.25, dtype="bfloat16", bits="ffff")
    with pytest.raises(FormatError, match="value: 0.1 is not representable in bfloat16"):
        SuperWeight(DOWN, 5, 17, value=0.1, dtype="bfloat16")
    with pytest.raises(FormatError, match="dtype: unsupported dtype 'float64'"):
        SuperWeight(DOWN, 5, 17, value=1.0, dtype="float64")
    with pytest.raises(FormatError, match="value and dtype: give both or neither"):
        SuperWeight(DOWN, 5, 17, value=1.0)
    r = SuperWeight.coerce([1, 5, 17])
    assert r.requested and (r.module, r.layer, r.row, r.col) == (DOWN, 1, 5, 17)
    assert SuperWeight.coerce({"layer": 1, "row": 5, "col": 17}) == r
    assert SuperWeight.coerce({"module": DOWN, "row": 5, "col": 17}) == r
    assert SuperWeight.coerce(sw) is sw
    with pytest.raises(FormatError, match=r"expected \[layer, row, col\]"):
        SuperWeight.coerce([1, 2])
    with pytest.raises(FormatError, match="row: expected an integer, got '5'"):
        SuperWeight.coerce({"layer": 1, "row": "5", "col": 17})
    with pytest.raises(FormatError, match="module: missing"):
        SuperWeight.coerce({"row": 5, "col": 17})


# ----------------------------------------------------------------------------------------------------------
# Sidecar
# ----------------------------------------------------------------------------------------------------------
def sidecar_dict(**kw):
    d = {
        "format_version": "1.1",
        "conversion_id": "0123456789abcdef0123456789abcdef",
        "super_weights": [
            SuperWeight(DOWN, 5, 17, value=-3.25, dtype="bfloat16").to_dict(),
            SuperWeight(DOWN, 5, 30, value=1.5, dtype="bfloat16").to_dict(),
            SuperWeight("model.layers.0.mlp.down_proj", 2, 3, value=0.5, dtype="bfloat16").to_dict(),
        ],
        "activation_outliers": [{"module": DOWN, "channels": [17, 3], "magnitudes": [120.0, 40.0]}],
        "provenance": {"source": "x"},
    }
    d.update(kw)
    return d


def test_sidecar_roundtrip_and_load(tmp_path):
    sc = Sidecar.from_dict(sidecar_dict())
    assert len(sc.super_weights) == 3 and sc.super_weights[0].bits == "c050"
    assert sc.activation_outliers == (ActivationOutliers(DOWN, (17, 3), (120.0, 40.0)),)
    assert Sidecar.from_dict(sc.to_dict()) == sc
    assert [sw.col for sw in sc.by_module()[DOWN]] == [17, 30]
    p = tmp_path / "superweights.json"
    sc.save(str(p))
    assert Sidecar.load(str(p)) == sc and load_sidecar(str(p)) == sc.to_dict()
    old = sidecar_dict(format_version="1.0")
    del old["conversion_id"]
    assert Sidecar.from_dict(old).conversion_id is None  # format 1.0 sidecars still read
    with pytest.raises(FormatError, match="superweights.json is missing"):
        Sidecar.load(str(tmp_path / "nope" / "superweights.json"))
    p.write_text("{not json")
    with pytest.raises(FormatError, match="is not valid JSON"):
        Sidecar.load(str(p))
    p.write_text("[]")
    with pytest.raises(FormatError, match="expected a JSON object, got list"):
        Sidecar.load(str(p))


def _sw0(d, **kw):
    d["super_weights"][0].update(kw)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda d: _sw0(d, row="abc"), "super_weights[0].row: expected an integer, got 'abc'"),
        (lambda d: _sw0(d, col=1.5), "super_weights[0].col: expected an integer, got 1.5"),
        (lambda d: _sw0(d, value="big"), "super_weights[0].value: expected a number, got 'big'"),
        (lambda d: _sw0(d, value=float("nan")), "super_weights[0].value: expected a finite number, got nan"),
        (lambda d: _sw0(d, value=float("inf")), "super_weights[0].value: expected a finite number, got inf"),
        (lambda d: _sw0(d, value=-3.0), "super_weights[0].bits: 'c050' is not the bit pattern of value -3.0"),
        (lambda d: _sw0(d, bits=7), "super_weights[0].bits: expected a hex string"),
        (lambda d: _sw0(d, dtype="int8"), "super_weights[0].dtype: unsupported dtype 'int8'"),
        (lambda d: _sw0(d, module=None, layer=None), "super_weights[0].module: missing"),
        (lambda d: _sw0(d, module=""), "super_weights[0].module: expected a non-empty string"),
        (lambda d: _sw0(d, restored="yes"), "super_weights[0].restored: expected true or false"),
        (lambda d: _sw0(d, input_spike="big"), "super_weights[0].input_spike: expected a number"),
        (lambda d: d["super_weights"][0].pop("value"), "super_weights[0].value: missing"),
        (lambda d: d["super_weights"].append(2), "super_weights[3]: expected an object, got 2"),
        (
            lambda d: d["super_weights"].append(dict(d["super_weights"][0])),
            "super_weights[3]: model.layers.1.mlp.down_proj[5, 17] is listed twice",
        ),
        (lambda d: d.update(super_weights={"a": 1}), "super_weights: expected a list"),
        (lambda d: d.pop("activation_outliers"), "activation_outliers: expected a list, got None"),
        (
            lambda d: d["activation_outliers"][0].update(channels=[1, "x"]),
            "activation_outliers[0].channels[1]: expected",
        ),
        (lambda d: d["activation_outliers"][0].update(magnitudes=[1.0]), "activation_outliers[0].magnitudes: 1 values"),
        (lambda d: d["activation_outliers"].append(7), "activation_outliers[1]: expected an object, got 7"),
        (lambda d: d.update(format_version="2.0"), "format_version: sidecar format version 2.0 is not supported"),
        (lambda d: d.pop("format_version"), "format_version: sidecar format version (missing) is not supported"),
        (lambda d: d.update(conversion_id="not an id!"), "conversion_id: expected an id"),
        (lambda d: d.update(provenance=[1]), "provenance: expected an object"),
    ],
)
def test_sidecar_errors_name_the_field(mutate, msg):
    d = copy.deepcopy(sidecar_dict())
    mutate(d)
    with pytest.raises(FormatError) as e:
        Sidecar.from_dict(d, where="sidecar superweights.json")
    assert str(e.value).startswith("sidecar superweights.json: "), str(e.value)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# check_sidecar
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sw,msg",
    [
        (
            SuperWeight("model.layers.1.mlp.nope", 0, 0),
            r"super weight model.layers.1.mlp.nope\[0, 0\]: no such quantized "
            r"module in the checkpoint \(the model has 2 layers\)",
        ),
        (
            SuperWeight(DOWN, 64, 0),
            r"super weight model.layers.1.mlp.down_proj\[64, 0\] lies outside its matrix of shape "
            r"\[64, 128\]",
        ),
        (SuperWeight(DOWN, 0, 128), "lies outside its matrix"),
        (SuperWeight(DOWN, -1, 0), "lies outside its matrix"),
        (SuperWeight(DOWN, 0, -5), "lies outside its matrix"),
    ],
)
def test_check_sidecar_super_weights(sw, msg):
    with pytest.raises(FormatError, match=msg):
        check_sidecar(Sidecar((sw,)), SHAPES, where="sidecar s.json")
    with pytest.raises(FormatError, match=msg):  # the dict-based name the plugin called so far
        check_super_weights_in_range({"super_weights": [sw.to_dict()]}, SHAPES)


def test_check_sidecar_outliers_and_good():
    check_sidecar(Sidecar.from_dict(sidecar_dict()), SHAPES)
    with pytest.raises(FormatError, match="activation-outlier channel 128 of .* lies outside its input size 128"):
        check_sidecar(Sidecar((), (ActivationOutliers(DOWN, (3, 128)),)), SHAPES)
    with pytest.raises(FormatError, match="activation outliers of model.layers.5.mlp.down_proj: no such quantized"):
        check_sidecar(Sidecar((), (ActivationOutliers("model.layers.5.mlp.down_proj", (3,)),)), SHAPES)


# ----------------------------------------------------------------------------------------------------------
# resolve_inside
# ----------------------------------------------------------------------------------------------------------
def test_resolve_inside(tmp_path):
    ck = tmp_path / "ck"
    (ck / "sub").mkdir(parents=True)
    (ck / "superweights.json").write_text("{}")
    (tmp_path / "secret.json").write_text("{}")
    assert resolve_inside(str(ck), "superweights.json", "sidecar") == os.path.realpath(ck / "superweights.json")
    assert resolve_inside(str(ck), "sub/x.safetensors", "shard").endswith("sub/x.safetensors")
    os.symlink(ck / "superweights.json", ck / "inner.json")
    assert resolve_inside(str(ck), "inner.json", "sidecar")  # a link that stays inside is fine
    os.symlink(tmp_path / "secret.json", ck / "outer.json")
    for name, msg in [
        ("/etc/passwd", "is an absolute path"),
        ("../secret.json", "leads out of the checkpoint"),
        ("sub/../../secret.json", "leads out of the checkpoint"),
        ("outer.json", "symbolic link"),
        ("", "expected a file name"),
        (3, "expected a file name"),
        ("~/x", "absolute path"),
    ]:
        with pytest.raises(FormatError, match=msg) as e:
            resolve_inside(str(ck), name, "config.json: quantization_config.sidecar")
        assert str(e.value).startswith("config.json: quantization_config.sidecar: ")
