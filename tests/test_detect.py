"""Super-weight detection on tiny random Llamas with planted super weights (fast, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_tiny import ARCHS, TinyTokenizer, build_tiny_llama, build_tiny_model

from vllm_superweight.detect import (
    DetectionResult,
    SuperWeight,
    activation_profile,
    detect_super_weights,
    format_report,
    match_published,
)
from vllm_superweight.plots import plot_activation_profile

TOK = TinyTokenizer()
SW = (1, 13, 37)
SPIKE = 6.0 * 6.0 * torch.sigmoid(torch.tensor(6.0)).item()  # silu(6) * 6: the planted input spike


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def detect(model, **kw) -> DetectionResult:
    return detect_super_weights(model, TOK, progress=False, **kw)


def coords(result: DetectionResult) -> set[tuple[int, int, int]]:
    return {sw.coord for sw in result.super_weights}


@pytest.fixture(scope="module")
def planted():
    return build_tiny_llama(seed=0, super_weights=(SW,), sa_norm_gain=8.0)


def test_finds_exactly_the_planted_super_weight(planted):
    r = detect(planted)
    assert coords(r) == {SW}
    sw = r.super_weights[0]
    assert sw.module == "model.layers.1.mlp.down_proj"
    assert sw.dtype == "float32" and sw.value == planted.model.layers[1].mlp.down_proj.weight[13, 37].item()
    assert sw.input_spike == pytest.approx(SPIKE, rel=1e-3)
    assert abs(sw.output_spike) > 0.9 * 2.5 * SPIKE and math.copysign(1, sw.output_spike) == math.copysign(1, sw.value)
    assert sw.confirmed is None and sw.ablation is None
    assert r.iterations == 2  # one pass finds it, the second (with it zeroed) finds nothing more
    assert r.thresholds["searched_layers"] == 3 and r.thresholds["rel_threshold"] > 0


def test_trigger_all_tokens_any_prompt():
    # trigger="all" (used with foreign tokenizers, e.g. by the converter tests): every token spikes, any prompt works
    m = build_tiny_llama(seed=0, super_weights=(SW,), trigger="all", dtype=torch.bfloat16)
    for prompt in ("Apple Inc. is a worldwide tech company.", "x", "Zebras run."):
        r = detect_super_weights(
            m,
            lambda text, return_tensors="pt": {"input_ids": torch.tensor([[ord(c) % 250 + 3 for c in text]])},
            prompt,
            progress=False,
        )
        assert coords(r) == {SW} and r.super_weights[0].dtype == "bfloat16"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_planted_anywhere_early(seed, layer):
    sw = (layer, 5 + 7 * seed, 11 + 29 * seed)
    assert coords(detect(build_tiny_llama(seed=seed, super_weights=(sw,)))) == {sw}


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures(arch):
    m = build_tiny_model(arch, super_weights=(SW,), sa_norm_gain=8.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = detect(m, confirm=True)
    assert coords(r) == {SW} and r.super_weights[0].module == "model.layers.1.mlp.down_proj"
    assert r.super_weights[0].confirmed is True
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert 37 in r.activation_outliers["model.layers.1.mlp.down_proj"]["channels"]
    if arch == "phi3":  # fused projections are scanned under their own names
        assert 13 in r.activation_outliers["model.layers.2.self_attn.qkv_proj"]["channels"]
        assert 13 in r.activation_outliers["model.layers.2.mlp.gate_up_proj"]["channels"]
    assert detect(build_tiny_model(arch, super_weights=())).super_weights == []


@pytest.mark.parametrize(
    "sws",
    [
        ((1, 13, 37), (1, 13, 101)),  # siblings sharing the output row (Llama-13B style)
        ((1, 13, 37), (1, 40, 37)),  # siblings sharing the input column (Llama-3-8B / Phi-3 style)
        ((1, 13, 37), (2, 13, 90)),
    ],  # a second layer feeding the same super-activation channel (OLMo-7B style)
    ids=["share-row", "share-col", "two-layers"],
)
def test_siblings(sws):
    assert coords(detect(build_tiny_llama(seed=0, super_weights=sws))) == set(sws)


def test_masked_sibling_is_found_by_the_peel_loop():
    # the second sibling carries only ~10% of the super activation: found after the first one is zeroed
    m = build_tiny_llama(seed=0, super_weights=((1, 13, 37), (1, 13, 101)))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[13, 37] *= 8.0
    r = detect(m, share_threshold=0.2)
    assert coords(r) == {(1, 13, 37), (1, 13, 101)}
    assert r.iterations == 3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_false_positive_without_a_planted_super_weight(seed):
    m = build_tiny_llama(seed=seed, super_weights=())
    assert detect(m).super_weights == []
    assert detect(m, max_layer_frac=1.0).super_weights == []


@pytest.mark.parametrize(
    "echo",
    [
        {"layer": 5, "row": 13, "kind": "distributed"},
        {"layer": 5, "row": 13, "col": 50, "kind": "eraser"},
        {"layer": 4, "row": 20, "kind": "distributed", "weight": 3.0},
    ],
)
def test_late_layer_echo_is_rejected(echo):
    m = build_tiny_llama(seed=0, super_weights=(SW,), echo=echo)
    prof = activation_profile(m, TOK)
    assert abs(prof[echo["layer"]]["down_out_max"]) > 10 * prof[echo["layer"]]["down_out_typical"]  # a real spike
    assert coords(detect(m)) == {SW}  # late layers are not searched
    # even when every layer is searched: a sum of many inputs is not "explained" by one weight, and a layer that
    # cancels the super activation is an eraser
    assert coords(detect(m, max_layer_frac=1.0)) == {SW}


def test_eraser_is_rejected_by_the_growth_criterion():
    m = build_tiny_llama(seed=0, super_weights=(SW,), echo={"layer": 5, "row": 13, "col": 50, "kind": "eraser"})
    assert coords(detect(m, max_layer_frac=1.0, require_growth=False)) == {SW, (5, 13, 50)}
    assert coords(detect(m, max_layer_frac=1.0)) == {SW}


def test_ordinary_weight_on_the_spike_column_is_not_a_super_weight():
    # W[40, 37] is ~7x the median |w|: times the huge input spike it still makes an output spike (with a low
    # spike threshold), but it is neither a weight outlier nor a large share of the super activation
    m = build_tiny_llama(seed=0, super_weights=(SW,))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[40, 37] = 0.1
    assert coords(detect(m, rel_threshold=5.0)) == {SW}
    assert (1, 40, 37) in coords(detect(m, rel_threshold=5.0, weight_rel_threshold=0.0))  # the guard matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_is_bit_identical_afterwards(dtype):
    m = build_tiny_llama(seed=0, super_weights=((1, 13, 37), (1, 13, 101)), dtype=dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = detect(m, confirm=True)
    assert coords(r) == {(1, 13, 37), (1, 13, 101)}
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    for sw in r.super_weights:
        assert sw.dtype == str(dtype).replace("torch.", "")
        assert torch.tensor(sw.value, dtype=dtype) == before[f"{sw.module}.weight"][sw.row, sw.col]


def test_restores_weights_when_interrupted(monkeypatch):
    import vllm_superweight.detect as det

    m = build_tiny_llama(seed=0, super_weights=(SW,))
    before = m.model.layers[1].mlp.down_proj.weight.clone()
    real_run, calls = det._run, []

    def failing_run(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second peel pass, with the super weight zeroed
            raise KeyboardInterrupt
        return real_run(*a, **kw)

    monkeypatch.setattr(det, "_run", failing_run)
    with pytest.raises(KeyboardInterrupt):
        detect(m)
    assert torch.equal(before, m.model.layers[1].mlp.down_proj.weight)


def test_confirmation_by_ablation(planted):
    r = detect(planted, confirm=True)
    (sw,) = r.super_weights
    assert sw.confirmed is True
    ab = sw.ablation
    assert ab["sa_ratio"] < 0.1 and ab["hidden_max"] < 0.1 * ab["hidden_max_base"]
    assert {"loss_base", "loss", "loss_delta", "sa_base", "sa"} <= ab.keys()
    assert r.group_ablation is not None and r.group_ablation["sa_ratio"]["1:13"] < 0.1
    assert r.thresholds["confirm_sa_ratio"] == 0.5


def test_activation_outliers(planted):
    r = detect(planted)
    out = r.activation_outliers
    # the input spike itself (down_proj of the SW layer) ...
    assert 37 in out["model.layers.1.mlp.down_proj"]["channels"]
    # ... and the super-activation channel in every input of the next layers that reads the residual stream
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        entry = out[f"model.layers.2.{name}"]
        assert entry["channels"][0] == 13
        assert entry["magnitudes"][0] > r.thresholds["act_rel_threshold"] * entry["typical"]
    assert not any(k.startswith("model.layers.0.") for k in out)  # nothing before the super weight
    for entry in out.values():
        assert len(entry["channels"]) == len(entry["magnitudes"]) <= r.thresholds["max_act_channels"]
        assert entry["magnitudes"] == sorted(entry["magnitudes"], reverse=True)
    assert detect(build_tiny_llama(seed=0, super_weights=())).activation_outliers == {}


def test_profile(planted):
    r = detect(planted)
    assert [p["layer"] for p in r.profile] == list(range(6))
    p1 = r.profile[1]
    assert (p1["down_in_channel"], p1["down_out_channel"], p1["hidden_channel"]) == (37, 13, 13)
    assert p1["down_in_max"] == pytest.approx(SPIKE, rel=1e-3)
    assert {"down_in_max", "down_in_channel", "down_out_max", "down_out_channel", "hidden_max"} <= p1.keys()
    assert activation_profile(planted, TOK) == r.profile  # profile is of the original model


def test_to_json_and_report(planted):
    r = detect(planted, confirm=True)
    r.published = match_published("tiny", None, r)
    d = json.loads(json.dumps(r.to_json()))
    assert d["super_weights"][0]["row"] == 13 and d["super_weights"][0]["col"] == 37
    assert d["activation_outliers"]["model.layers.1.mlp.down_proj"]["channels"][0] == 37
    text = format_report(r)
    assert "model.layers.1.mlp.down_proj" in text and "[13, 37]" in text and "yes" in text
    assert "no super weight found" in format_report(detect(build_tiny_llama(seed=0, super_weights=())))


LLAMA7B_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-6,
}


def _result(coords_: list[tuple[int, int, int]], searched: int = 16) -> DetectionResult:
    sws = [
        SuperWeight(
            layer=i,
            module=f"model.layers.{i}.mlp.down_proj",
            row=r,
            col=c,
            value=1.0,
            dtype="float16",
            input_spike=1.0,
            output_spike=1.0,
        )
        for i, r, c in coords_
    ]
    return DetectionResult(sws, {}, [], "p", {"searched_layers": searched}, 1)


def test_match_published_by_config_shape():
    m = match_published("/models/unnamed-checkpoint", LLAMA7B_CONFIG, None)
    assert m["model"] == "huggyllama/llama-7b" and m["matched_by"] == "config" and m["confidence"] == "shape"
    assert [(p["layer"], p["row"], p["col"]) for p in m["published"]] == [(2, 3968, 7003)]
    assert m["published"][0]["module"] == "model.layers.2.mlp.down_proj" and "REPO" in m["published"][0]["sources"]
    assert m["agree"] is None
    # detection agrees / disagrees per coordinate
    ok = match_published("/models/unnamed-checkpoint", LLAMA7B_CONFIG, _result([(2, 3968, 7003)]))
    assert ok["agree"] is True and ok["comparison"][0]["status"] == "agree" and ok["extra_detected"] == []
    bad = match_published("/models/unnamed-checkpoint", LLAMA7B_CONFIG, _result([(30, 3968, 1)]))
    assert bad["agree"] is False and bad["comparison"][0]["status"] == "missed"
    assert bad["extra_detected"] == [{"layer": 30, "row": 3968, "col": 1}]
    # without max_position_embeddings, Llama-7B and Llama-2-7B share the shape
    shape_only = {k: LLAMA7B_CONFIG[k] for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")}
    amb = match_published("x", shape_only, None)
    assert {amb["model"], *amb["ambiguous_with"]} == {"huggyllama/llama-7b", "meta-llama/Llama-2-7b-hf"}
    l2 = match_published("x", dict(LLAMA7B_CONFIG, max_position_embeddings=4096, rms_norm_eps=1e-5), None)
    assert l2["model"] == "meta-llama/Llama-2-7b-hf" and l2["published"][0]["row"] == 2533
    assert match_published("x", dict(LLAMA7B_CONFIG, hidden_size=4096 + 64), None) is None


def test_match_published_by_id():
    m = match_published("HuggingFaceTB/SmolLM2-1.7B-Instruct", None, None)
    assert m["matched_by"] == "id" and (m["published"][0]["row"], m["published"][0]["col"]) == (749, 4987)
    assert match_published("huggyllama/llama-7b", None, None)["model"] == "huggyllama/llama-7b"
    assert match_published("codellama/CodeLlama-7b-hf", None, None) is None  # not a word-boundary match
    assert (
        match_published(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536},
            None,
        )
        is None
    )
    # an id match whose config contradicts the published shape is not that model
    assert match_published("my-llama-7b-pruned", dict(LLAMA7B_CONFIG, intermediate_size=8192), None) is None
    # OLMo-1B: the paper/code layer conflict is an accepted alternative; OLMo-7B's layer 24 is beyond the search
    olmo = match_published("allenai/OLMo-1B-0724-hf", None, _result([(1, 1764, 1710), (1, 1764, 8041)], 8))
    assert [c["status"] for c in olmo["comparison"]] == ["agree", "agree_alternative"] and olmo["agree"] is True
    o7 = match_published("allenai/OLMo-7B-0724-hf", None, _result([(1, 269, 7467), (2, 269, 8275), (7, 269, 453)], 16))
    assert [c["status"] for c in o7["comparison"]] == ["agree"] * 3 + ["outside_search"]
    phi = match_published("microsoft/Phi-3-mini-4k-instruct", None, None)
    assert len(phi["published"]) == 6


def test_published_index_is_consistent():
    from vllm_superweight.detect import load_published

    idx = load_published()
    for e in idx["models"]:
        c = e["config"]
        for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size"):
            assert key in c, (e["id"], key)
        for sw in e["super_weights"]:
            assert 0 <= sw["layer"] < c["num_hidden_layers"] and 0 <= sw["row"] < c["hidden_size"]
            assert 0 <= sw["col"] < c["intermediate_size"]
            assert sw["sources"] and set(sw["sources"]) <= idx["sources"].keys()


def test_plot_writes_png(planted, tmp_path):
    r = detect(planted)
    path = plot_activation_profile(r.profile, str(tmp_path / "fig" / "profile.png"), "tiny", r.super_weights)
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and (tmp_path / "fig" / "profile.png").stat().st_size > 5000
    # dicts (e.g. from a saved DetectionResult.to_json()) work as well
    plot_activation_profile(r.profile, str(tmp_path / "p2.png"), "tiny", [{"layer": 1}])
