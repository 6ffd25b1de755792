"""Tests of the WikiText-2 perplexity evaluation (vllm_superweight.eval) and the quality-table report.

Fast: windowing, text protocol, prompt-logprob bookkeeping, the transformers path on a tiny random model (checked
against transformers' own loss), the CLI parser and the report generator. Slow (real SmolLM2 + a real vLLM engine):
vLLM perplexity of the float model on a 2048-token slice equals the plain-transformers number.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types

import pytest

from vllm_superweight import eval as ev

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from float_checkpoint import write_float_checkpoint  # noqa: E402  (benchmark scaffolding)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# windows and text
# ----------------------------------------------------------------------------------------------------------
def test_make_windows_non_overlapping_and_tail_dropped():
    ids = list(range(1030))
    w = ev.make_windows(ids, 256)
    assert len(w) == 4 and all(len(x) == 256 for x in w)
    assert w[0][0] == 0 and w[1][0] == 256 and w[3][-1] == 1023  # stride = window, tail (1024..1029) dropped
    assert sum(w, []) == ids[:1024]


def test_make_windows_max_tokens_rounds_down():
    ids = list(range(5000))
    assert len(ev.make_windows(ids, 512, max_tokens=2048)) == 4
    assert len(ev.make_windows(ids, 512, max_tokens=2047)) == 3
    assert len(ev.make_windows(ids, 512, max_tokens=10**9)) == 9


def test_make_windows_errors():
    with pytest.raises(ValueError):
        ev.make_windows(list(range(100)), 512)
    with pytest.raises(ValueError):
        ev.make_windows(list(range(100)), 1)


def test_load_text_joins_lines_with_blank_line_and_normalises_crlf(tmp_path):
    p = tmp_path / "t.raw"
    p.write_bytes(b" = Title = \r\n Body one .\r\n Body two .\r\n")
    assert ev.load_text(str(p)) == " = Title = \n\n\n Body one .\n\n\n Body two .\n"


def test_build_prompts_bos_and_context():
    wins = [[5, 6, 7], [8, 9, 10]]
    p, n = ev.build_prompts(wins, None)
    assert p == wins and n == 1
    p, n = ev.build_prompts(wins, 2)
    assert p == [[2, 5, 6, 7], [2, 8, 9, 10]] and n == 2


class _CharTok:
    """Minimal tokenizer: one id per byte (+3), optional BOS=1 added by default."""

    def __init__(self, add_bos: bool):
        self.add_bos = add_bos
        self.bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [b + 3 for b in text.encode("utf-8")]
        if add_special_tokens and self.add_bos:
            ids = [1] + ids
        return types.SimpleNamespace(input_ids=ids)


def test_default_bos():
    assert ev.default_bos(_CharTok(False)) is None
    assert ev.default_bos(_CharTok(True)) == 1
    t = _CharTok(True)
    t.bos_token_id = None
    assert ev.default_bos(t) is None


# ----------------------------------------------------------------------------------------------------------
# prompt-logprob bookkeeping (the shape vLLM 0.26 returns: [None, {tok: Logprob}, ...])
# ----------------------------------------------------------------------------------------------------------
def _lp(x):
    return types.SimpleNamespace(logprob=x)


def test_nll_sum_scores_actual_token_after_context():
    prompt = [10, 11, 12, 13]
    plp = [None, {11: _lp(-1.0), 99: _lp(-0.1)}, {12: _lp(-2.0)}, {13: _lp(-0.5), 7: _lp(-0.01)}]
    s, c = ev.nll_sum_from_prompt_logprobs(prompt, plp, 1)
    assert c == 3 and s == pytest.approx(3.5)
    s, c = ev.nll_sum_from_prompt_logprobs(prompt, plp, 2)  # BOS case: position 1 is context too
    assert c == 2 and s == pytest.approx(2.5)


def test_nll_sum_errors_and_inf():
    prompt = [10, 11, 12]
    with pytest.raises(RuntimeError):
        ev.nll_sum_from_prompt_logprobs(prompt, [None, {11: _lp(-1.0)}], 1)  # wrong length
    with pytest.raises(RuntimeError):
        ev.nll_sum_from_prompt_logprobs(prompt, [None, {11: _lp(-1.0)}, {99: _lp(-1.0)}], 1)  # token missing
    s, c = ev.nll_sum_from_prompt_logprobs(prompt, [None, {11: _lp(-1.0)}, {12: _lp(float("-inf"))}], 1)
    assert math.isinf(s) and c == 2


def test_vllm_gathers_the_actual_token_logprob_first():
    """vLLM 0.26's Sampler.gather_logprobs returns the target token's logprob in column 0 (then the top-k), which is
    what prompt_logprobs=0 relies on to score the actual token rather than only the top-k."""
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.sample.sampler import Sampler

    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 0.5, 1.0, 0.0]])
    lps = Sampler.compute_logprobs(logits)
    target = torch.tensor([1, 3], dtype=torch.int64)
    ids, vals, ranks = Sampler.gather_logprobs(lps, 0, target)[:3]
    assert ids[:, 0].tolist() == [1, 3]
    assert vals[:, 0].tolist() == pytest.approx(lps.gather(-1, target[:, None])[:, 0].tolist())
    assert ranks.tolist() == [3, 4]  # 1-based rank of the actual token


# ----------------------------------------------------------------------------------------------------------
# transformers path on a tiny random model, against transformers' own loss
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_transformers_matches_hf_loss(tiny_llama, tmp_path):
    import torch

    p = tmp_path / "t.raw"
    p.write_text("".join(f" line {i} of some text , with words .\n" for i in range(40)))
    tok = _CharTok(False)
    res = ev.perplexity_transformers(tiny_llama, tok, text_path=str(p), window=64, max_tokens=640, progress=False)
    assert res["windows"] == 10 and res["tokens"] == 10 * 63 and res["window"] == res["stride"] == 64
    ids = ev.tokenize_text(tok, ev.load_text(str(p)))[:640]
    x = torch.tensor(ids).view(10, 64)
    with torch.no_grad():
        loss = tiny_llama(input_ids=x, labels=x).loss  # mean NLL over positions 1..63 of each window
    assert res["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_perplexity_transformers_bos_window(tiny_llama, tmp_path):
    p = tmp_path / "t.raw"
    p.write_text("abc def ghi jkl mno pqr stu vwx yz\n" * 20)
    res = ev.perplexity_transformers(
        tiny_llama, _CharTok(True), text_path=str(p), window=32, max_tokens=128, progress=False
    )
    assert res["bos_prepended"] and res["windows"] == 4 and res["tokens"] == 4 * 31


def test_cli_parser():
    a = ev.build_parser().parse_args(["CK", "--window", "256", "--max-tokens", "4096", "--json", "o.json"])
    assert (a.ckpt, a.window, a.max_tokens, a.json, a.dtype) == ("CK", 256, 4096, "o.json", "bfloat16")
    assert ev.build_parser().parse_args(["CK", "--max-tokens", "0"]).max_tokens is None  # 0: the whole text
    with pytest.raises(SystemExit):
        ev.build_parser().parse_args(["CK", "--max-tokens", "-5"])


def test_main_rejects_missing_dir(tmp_path, capsys):
    assert ev.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("superweight eval: error: ") and "not a model directory" in err[0]
    with pytest.raises(SystemExit) as e:
        ev.main([str(tmp_path), "--window", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid int value" in err[0]


def test_main_refuses_a_bad_checkpoint_before_any_engine(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(
        json.dumps(
            {
                "quantization_config": {
                    "quant_method": "superweight_rtn",
                    "format_version": "1.1",
                    "bits": "four",
                    "block": "64",
                }
            }
        )
    )
    assert ev.main([str(ck)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantization_config.bits: expected an integer" in err[0]


# ----------------------------------------------------------------------------------------------------------
# the quality-table script: rows and report generation (no engine)
# ----------------------------------------------------------------------------------------------------------
def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_bench", os.path.join(ROOT, "benchmarks", "quality.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


def test_quality_rows_cover_the_issue():
    q = _quality_module()
    for model, g in (("smollm2", "64"), ("gemma3-270m", "128")):
        rows = q.rows_for(model)
        ids = [r.id for r in rows]
        assert len(ids) == len(set(ids))
        assert {r.method for r in rows} == {"float", "rtn", "superweight_rtn", "awq", "smoothquant", "sw_zeroed"}
        for b in (g, "channel", "rows:4", "tensor"):
            assert any(r.method == "rtn" and r.block == b and r.bits == 4 for r in rows)
            sw = [r for r in rows if r.method == "superweight_rtn" and r.block == b and r.bits == 4]
            assert {(r.sw_restored, r.clip, r.holdout) for r in sw} >= {
                (True, "none", 0.0),
                (True, q.CLIP, 0.0),
                (True, "none", 1e-4),
                (True, "none", 1e-3),
                (False, q.CLIP, 0.0),
            }
        naive = [r for r in rows if r.method == "rtn"]
        assert all("--super-weights" in r.convert_args and "none" in r.convert_args for r in naive)
        # never the default preset's grid by accident: what each converter row is built with is what it says
        # (the W3 "naive RTN" rows of 2026-11-30 were silently built with the default preset's fitted grid)
        from vllm_superweight.cli import build_parser, quant_config_from_args

        for r in rows:
            if r.convert_args and r.method in ("rtn", "superweight_rtn"):
                qc = quant_config_from_args(build_parser().parse_args(["convert", "SRC", "DST", *r.convert_args]))
                assert qc.grid.value == r.grid, (r.id, qc.grid, r.grid)
                assert qc.bits == r.bits and qc.holdout == r.holdout, r.id
        # never the default preset's hold-out by accident: explicit, or a named preset
        assert all("--holdout" in r.convert_args or "--preset" in r.convert_args for r in rows if r.convert_args)
        # issue 11: the fitted grid at the small block, the budgeted large blocks, W3 beside naive RTN
        hqq = {(r.bits, r.block) for r in rows if r.grid == "hqq"}
        assert {(4, g), (4, "channel"), (4, "rows:4"), (3, g), (3, "channel")} <= hqq
        assert {(3, g), (3, "channel")} <= {(r.bits, r.block) for r in rows if r.method == "rtn"}
        assert any(r.method == "awq" and r.block == g for r in rows)
        assert any(r.method == "superweight_rtn" and r.act == "int8-token" for r in rows)


def test_quality_engines_keep_w4_baselines_weight_only(monkeypatch):
    """AWQ / GPTQ rows through vLLM's CPU int4 kernel stay W4A16 on CPUs with AMX too (vLLM would quantize their
    activations to int8 there): the comparison with our weight-only rows is the GPU's."""
    q = _quality_module()
    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    assert q.engine_env()["VLLM_CPU_INT4_W4A8"] == "0"
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")  # an explicit choice is the user's
    assert q.engine_env()["VLLM_CPU_INT4_W4A8"] == "1"


def test_throughput_rows_build_what_they_say():
    """Every converter row of benchmarks/throughput.py parses through the CLI into the bits / block / hold-out its
    record states; the q/k/v hold-out row differs from the every-matrix row only in where the hold-out goes."""
    spec = importlib.util.spec_from_file_location("throughput_bench", os.path.join(ROOT, "benchmarks", "throughput.py"))
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    from vllm_superweight.cli import build_parser, quant_config_from_args

    built = {}
    for name, row in t.METHODS.items():
        if row.get("src") != "convert" or "ckpt" in row:
            continue
        flags = ["[]" if f == "@SW" else f for f in row["flags"]]
        qc = quant_config_from_args(build_parser().parse_args(["convert", "SRC", "DST", *flags]))
        assert qc.bits == row["bits"] and qc.holdout == row["holdout"] and str(qc.layout) == row["block"], name
        built[name] = qc
    assert built["sw-w4-g128-holdout-qkv"].holdout_modules == ("q_proj", "k_proj", "v_proj")
    assert built["sw-w4-g128-holdout-qkv"].replace(holdout_modules=()) == built["sw-w4-g128-holdout"]
    # the named hold-out rows stay "every matrix" although preset `default` (their base) spends it in q/k/v now
    assert built["sw-w4-g128-holdout"].holdout_modules == () == built["sw-w4-channel-holdout"].holdout_modules
    assert "q_proj" in built["sw-default"].holdout_modules
    assert set(t.GROUPS["holdout"]) <= set(t.METHODS)


def test_quality_rows_spend_the_hold_out_where_they_say():
    """Rows built on the converter's defaults (no --preset) hold out in every matrix, as their labels and the
    recorded numbers mean; only the q/k/v rows name q/k/v."""
    from vllm_superweight.cli import build_parser, quant_config_from_args

    q = _quality_module()
    seen = set()
    for model in q.MODELS:
        for row in q.rows_for(model):
            if not row.convert_args:
                continue
            qc = quant_config_from_args(build_parser().parse_args(["convert", "SRC", "DST", *row.convert_args]))
            if row.id.endswith("-qkv"):
                assert qc.holdout_modules == ("q_proj", "k_proj", "v_proj"), row.id
                seen.add(model)
            else:
                assert qc.holdout_modules == (), row.id
    assert seen == set(q.MODELS)


def test_quality_report_from_records(tmp_path, monkeypatch):
    q = _quality_module()
    monkeypatch.setattr(q, "MD_PATH", str(tmp_path / "q.md"))
    monkeypatch.setattr(q, "PNG_PATH", str(tmp_path / "q.png"))
    base = dict(
        model="smollm2",
        tokens=16352,
        window=512,
        max_tokens=16384,
        act="none",
        holdout=0.0,
        clip="none",
        calib=None,
        dtype="bfloat16",
    )
    recs = [
        dict(base, method="float", row="float", bits=16, block=None, sw_restored=None, ppl=30.0),
        dict(base, method="rtn", row="rtn-w4-g64", bits=4, block="64", sw_restored=None, ppl=40.0),
        dict(base, method="superweight_rtn", row="sw-w4-g64", bits=4, block="64", sw_restored=True, ppl=39.0),
        dict(base, method="awq", row="awq-w4a16-g64", bits=4, block="64", sw_restored=None, ppl=35.0, calib="pydoc"),
        dict(base, method="sw_zeroed", row="sw_zeroed", bits=16, block=None, sw_restored=False, ppl=float("inf")),
    ]
    md = q.write_markdown(recs)
    assert "| naive RTN | 40.00 |" in md and "| AWQ (llm-compressor) | 35.00 |" in md
    assert "+33.3%" in md and "inf" in md
    q.write_plot(recs)
    assert os.path.getsize(tmp_path / "q.png") > 1000
    # a model without super weights: a twin row and an n/a sw_zeroed row render (and plot) without errors
    g = dict(base, model="gemma3-270m")
    recs2 = [
        dict(g, method="float", row="float", bits=16, block=None, sw_restored=None, ppl=22.0),
        dict(g, method="rtn", row="rtn-w4-g128", bits=4, block="128", sw_restored=None, ppl=36.0),
        dict(
            g,
            method="superweight_rtn",
            row="sw-w4-g128",
            bits=4,
            block="128",
            sw_restored=True,
            ppl=36.0,
            identical_to="rtn-w4-g128",
        ),
        dict(g, method="sw_zeroed", row="sw_zeroed", bits=16, block=None, sw_restored=False, ppl=None),
    ]
    md2 = q.write_markdown(recs2)
    assert "`sw-w4-g128` = `rtn-w4-g128`" in md2 and "`sw_zeroed` (n/a)" in md2 and "| n/a |" in md2
    q.write_plot(recs2)


def test_quality_no_super_weight_twins():
    """A model without super weights: rows differing only by SW handling point to their twin; sw_zeroed is n/a."""
    q = _quality_module()
    rows = {r.id: r for r in q.rows_for("gemma3-270m")}
    assert q.no_sw_alias(rows["sw-w4-channel"]) == "rtn-w4-channel"
    assert q.no_sw_alias(rows["nr-w4-tensor-clip"]) == "sw-w4-tensor-clip"
    assert q.no_sw_alias(rows["sw_zeroed"]) is None
    for rid in ("sw-w4-channel-clip", "sw-w4-g128-h1e-3", "sw-w8a8", "rtn-w4-g128", "awq-w4a16-g128"):
        assert q.no_sw_alias(rows[rid]) == rid  # a different checkpoint: measured
    # every alias target is itself measured (not an alias)
    for r in rows.values():
        t = q.no_sw_alias(r)
        assert t is None or q.no_sw_alias(rows[t]) == t


def test_quality_save_records_merges_concurrent_writers(tmp_path, monkeypatch):
    """Two quality.py processes (e.g. a long build and spot checks) must not erase each other's results."""
    q = _quality_module()
    monkeypatch.setattr(q, "RESULTS", str(tmp_path))
    monkeypatch.setattr(q, "JSON_PATH", str(tmp_path / "quality.json"))
    base = dict(model="smollm2", window=512, max_tokens=16384)
    a = dict(base, row="rtn-w4-g64", ppl=40.0)
    b = dict(base, row="float", ppl=30.0)
    q.save_records([a, b], {q._key(a), q._key(b)})
    stale = q.load_records()  # process 1 loads ...
    spot = q.load_records()  # ... process 2 loads and adds a spot check to `float`
    spot[1]["ppl_transformers"] = 30.01
    q.save_records(spot, {q._key(spot[1])})
    new = dict(base, row="sw-w4-g64", ppl=39.0)  # process 1 measures a new row from its stale list
    q.save_records(stale + [new], {q._key(new)})
    got = {r["row"]: r for r in q.load_records()}
    assert set(got) == {"rtn-w4-g64", "float", "sw-w4-g64"}
    assert got["float"]["ppl_transformers"] == 30.01
    # re-measuring a row (new ppl) replaces it, stale fields of the old measurement go
    q.save_records([dict(base, row="float", ppl=31.0)], {q._key(b)})
    got = {r["row"]: r for r in q.load_records()}
    assert got["float"]["ppl"] == 31.0 and "ppl_transformers" not in got["float"]
    # same measurement again (e.g. the final sorted save) keeps the spot check fields
    q.save_records([dict(base, row="float", ppl=31.0, ppl_transformers=31.02)], {q._key(b)})
    q.save_records([dict(base, row="float", ppl=31.0)], {q._key(b)})
    assert q.load_records()[[r["row"] for r in q.load_records()].index("float")]["ppl_transformers"] == 31.02


def test_quality_build_only_builds_and_measures_nothing(tmp_path, monkeypatch):
    """``--build-only`` builds the row's checkpoint (here the dequantized float reference of the real SmolLM2 GGUF),
    even for a row already in the JSON, and adds no record."""
    pytest.importorskip("gguf")
    q = _quality_module()
    monkeypatch.setattr(q, "RESULTS", str(tmp_path))
    monkeypatch.setattr(q, "JSON_PATH", str(tmp_path / "quality.json"))
    q.save_records([dict(model="smollm2", window=512, max_tokens=16384, row="float", ppl=28.14)], set())
    before = q.load_records()
    try:
        rc = q.main(["--models", "smollm2", "--rows", "float", "--build-only", "--workdir", str(tmp_path / "w")])
    except SystemExit as e:  # noqa: PT017
        rc = e.code
    if not os.path.exists(tmp_path / "w" / "smollm2" / "float" / "config.json"):
        pytest.fail(f"--build-only built nothing (rc {rc})")
    assert q.load_records() == before


# ----------------------------------------------------------------------------------------------------------
# slow: the real model through a real vLLM engine
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vllm_perplexity_matches_transformers_on_smollm2(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_superweight.models import SourceError

    text = ev.default_text_path()
    if not os.path.exists(text):
        pytest.skip(f"{text} not found")
    for k, v in {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(k, v)
    d = str(tmp_path / "smollm2-float")
    try:
        write_float_checkpoint("smollm2", d, dtype="float32")
    except SourceError as e:
        pytest.skip(str(e))
    with open(os.path.join(d, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    res = ev.perplexity(d, text_path=text, max_tokens=2048, window=512, dtype="float32", progress=False)
    assert res["tokens"] == 4 * 511 and res["engine"] == "vllm" and res["quantization"] is None
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = ev.perplexity_transformers(
        model, AutoTokenizer.from_pretrained(d), text_path=text, max_tokens=2048, window=512, progress=False
    )
    assert res["tokens"] == ref["tokens"]
    assert res["ppl"] == pytest.approx(ref["ppl"], rel=2e-3)
    assert 10 < res["ppl"] < 100  # a trained 135M model on WikiText-2


@pytest.mark.slow
def test_eval_cli_exits_zero_after_the_engine(tmp_path, smollm2_tokenizer_dir):
    """`python -m vllm_superweight.eval` and `superweight eval` write their result and exit 0 (no abort at
    interpreter exit from vLLM/torch threads: exit status 134 `terminate called without an active exception`)."""
    pytest.importorskip("vllm")
    import subprocess

    from helpers_tiny import save_tiny_hf

    from vllm_superweight.convert import build_quant_config, convert

    text = ev.default_text_path()
    if not os.path.exists(text):
        pytest.skip(f"{text} not found")
    src = save_tiny_hf(str(tmp_path / "src"), smollm2_tokenizer_dir)
    ck = str(tmp_path / "ck")
    convert(
        src,
        ck,
        build_quant_config(None, bits=4, block="channel", holdout=1e-3),
        super_weights=[[0, 5, 17]],
        progress=False,
        log=None,
    )
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
    )
    for i, module in enumerate(("vllm_superweight.eval", "vllm_superweight.cli")):
        out = tmp_path / f"res{i}.json"
        cmd = (
            [sys.executable, "-m", module]
            + (["eval"] if module.endswith("cli") else [])
            + [ck, "--max-tokens", "512", "--window", "256", "--json", str(out), "--no-progress", "--data", text]
        )
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, (module, p.returncode, p.stderr[-3000:])
        assert "terminate called" not in p.stderr
        res = json.load(open(out))
        assert res["tokens"] == 2 * 255 and res["quantization"] == "superweight_rtn" and math.isfinite(res["ppl"])
    # a failure: one line, non-zero, before any engine starts
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(ck, bad)
    os.remove(bad / "superweights.json")
    p = subprocess.run(
        [sys.executable, "-m", "vllm_superweight.eval", str(bad), "--data", text],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("superweight eval: error: ") and "sidecar" in lines[0], p.stderr
