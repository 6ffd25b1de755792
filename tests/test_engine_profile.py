"""benchmarks/engine_profile.py: a vLLM torch-profiler trace summed by kernel family per decode step, and the table
that sets engines side by side (throughput.py --profile-batches writes the records, plot_throughput.py the table)."""

import gzip
import json
import os
import time

import pytest
from bench_module import load

EP = load("engine_profile")

KERNELS = [  # (name, ts, dur) in us: two decode steps of a held-out layer, and events that are not GPU kernels
    ("sw_marlin_gemv", 0.0, 60.0),
    ("_sell_spmm_kernel", 62.0, 10.0),
    ("void humming<Config<128, 64>, ...>(...)", 80.0, 30.0),
    ("_gather_transpose_kernel", 112.0, 3.0),
    ("flash::flash_fwd_splitkv_kernel<...>", 120.0, 20.0),
    ("void vllm::rms_norm_kernel<c10::BFloat16>(...)", 145.0, 5.0),
    ("triton_poi_fused_mul_silu_0", 151.0, 4.0),
    ("sw_marlin_gemv", 200.0, 60.0),
    ("_sell_spmm_kernel", 262.0, 10.0),
]


def _trace(path, kernels=KERNELS):
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events += [
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 5.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1.0, "dur": 2.0},
        {"ph": "i", "cat": "kernel", "name": "instant, not a complete event", "ts": 3.0},
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events, "deviceProperties": []}, f)


def test_families_by_kernel_name():
    assert EP.family("sw_marlin_gemv") == "GEMV (ours)"
    assert EP.family("_sell_spmm_kernel") == "SELL correction (ours)"
    assert EP.family("_gather_transpose_kernel") == "x transpose for the SELL kernel (ours)"
    assert EP.family("void humming<Cfg>(...)") == "Humming GEMM"
    assert EP.family("Marlin<256, 1, 8>") == "Marlin" and EP.family("machete_mm") == "Machete"
    assert EP.family("flash::flash_fwd_splitkv_kernel") == "attention"
    assert EP.family("sm90_xmma_gemm_bf16bf16") == "dense GEMM (cuBLAS / CUTLASS)"
    assert EP.family("triton_poi_fused_add_0") == EP.OTHER
    assert EP.family("_int8_mm_kernel") == "int8 GEMM (ours, Triton)"
    q = "activation int8 quantization, own kernel"
    assert EP.family("void vllm::dynamic_scaled_int8_quant_kernel<c10::BFloat16, float>(...)") == q
    assert EP.family("_act_quant_split_kernel") == q
    # the split Inductor fused into the norm (SUPERWEIGHT_W8A8_GRAPH_SPLIT) counts with the norm
    assert EP.family("triton_red_fused_abs_amax_fused_add_rms_norm_w8a8_mm_q_0") == "norm / activation / rotary"


def test_trace_summed_per_step(tmp_path):
    path = tmp_path / "w.pt.trace.json.gz"
    _trace(path)
    kernels = EP.load_kernels(str(path))
    assert [k["name"] for k in kernels] == [n for n, _, _ in KERNELS]  # kernels only, complete events only
    s = EP.summarize(kernels, steps=2)
    fam = s["family_us_per_step"]
    assert fam["GEMV (ours)"] == 60.0 and fam["SELL correction (ours)"] == 10.0 and fam["Humming GEMM"] == 15.0
    assert fam["norm / activation / rotary"] == 4.5 and fam["x transpose for the SELL kernel (ours)"] == 1.5
    assert list(fam)[0] == "GEMV (ours)"  # largest first
    assert s["busy_us_per_step"] == pytest.approx(sum(d for _, _, d in KERNELS) / 2)
    assert s["span_us_per_step"] == pytest.approx(272.0 / 2)  # first start to last end, idle gaps included
    assert s["top"][0] == {"name": "sw_marlin_gemv", "family": "GEMV (ours)", "us_per_step": 60.0, "per_step": 1.0}
    with pytest.raises(ValueError, match="no GPU kernel events"):
        EP.summarize([], steps=2)


def test_trace_files_written_since(tmp_path):
    old, new = tmp_path / "a" / "old.pt.trace.json.gz", tmp_path / "a" / "b1.pt.trace.json.gz"
    old.parent.mkdir()
    for p in (old, new):
        _trace(p)
    t = time.time()
    os.utime(old, (t - 100, t - 100))
    (tmp_path / "a" / "notes.txt").write_text("not a trace")
    assert EP.trace_files(str(tmp_path), t - 10) == [str(new)]
    assert EP.trace_files(str(tmp_path), t - 1000) == [str(old), str(new)]


def test_profile_table_sets_engines_side_by_side(tmp_path):
    held = dict(kind="profile", variant="held", batch=8, **EP.summarize(EP.load_kernels(_write(tmp_path)), steps=2))
    plain_k = [k for k in KERNELS if "sell" not in k[0] and "transpose" not in k[0]]
    plain = dict(
        kind="profile", variant="plain", batch=8, **EP.summarize(EP.load_kernels(_write(tmp_path, plain_k)), 2)
    )
    md = EP.profile_table([{"kind": "latency", "batch": 8}, held, plain])
    rows = md.splitlines()
    assert rows[2] == "| kernel family | held b8 | plain b8 |"
    assert "| SELL correction (ours) | 10.0 | 0.0 |" in rows
    assert "| x transpose for the SELL kernel (ours) | 1.5 | 0.0 |" in rows
    assert "| **busy (all kernels)** | **101.0** | **89.5** |" in rows
    assert EP.profile_table([{"kind": "latency"}]) == ""
    # plot_throughput keeps one profile record a batch size and appends the table to its markdown
    PT = load("plot_throughput")
    recs = [dict(r, input_len=128, output_len=64) for r in (held, dict(held, batch=64))]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(recs))
    assert sorted(r["batch"] for r in PT.load(str(path))) == [8, 64]


def _write(tmp_path, kernels=KERNELS):
    path = tmp_path / f"t{len(kernels)}.pt.trace.json.gz"
    _trace(path, kernels)
    return str(path)


def test_cpu_ops_summed_per_step(tmp_path):
    """Host-side operators (``cpu_op`` events) matching ``CPU_OP_KEYS``, inclusive time per step, largest first;
    other categories and unmatched operators are left out."""
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "superweight::w8a8_mm", "ts": 0.0, "dur": 40.0},
        {"ph": "X", "cat": "cpu_op", "name": "superweight::int8_quant_outlier_split_azp", "ts": 2.0, "dur": 12.0},
        {"ph": "X", "cat": "cpu_op", "name": "_C::cutlass_scaled_mm_azp", "ts": 20.0, "dur": 8.0},
        {"ph": "X", "cat": "cpu_op", "name": "superweight::w8a8_mm", "ts": 100.0, "dur": 36.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "ts": 3.0, "dur": 1.0},
        {"ph": "X", "cat": "kernel", "name": "superweight_not_a_cpu_op", "ts": 3.0, "dur": 100.0},
    ]
    path = tmp_path / "h.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    ev = EP.load_events(str(path), ("kernel", "cpu_op"))
    ops = ev["cpu_op"]
    assert len(ops) == 5 and [k["name"] for k in ev["kernel"]] == ["superweight_not_a_cpu_op"]
    s = EP.cpu_summary(ops, steps=2)
    assert s[0] == {"name": "superweight::w8a8_mm", "us_per_step": 38.0, "per_step": 1.0}
    assert [o["name"] for o in s] == [
        "superweight::w8a8_mm",
        "superweight::int8_quant_outlier_split_azp",
        "_C::cutlass_scaled_mm_azp",
    ]
    assert EP.cpu_summary([], steps=2) == []
    rec = dict(kind="profile", variant="w8", batch=8, **EP.summarize(ev["kernel"], 2), cpu_ops=s)
    old = dict(kind="profile", variant="sq", batch=8, **EP.summarize(ev["kernel"], 2))  # before s45: no cpu_ops
    md = EP.profile_table([rec, old]).splitlines()
    assert (
        "| host op `superweight::w8a8_mm` | 38.0 |  |" in md
        and "| host op `_C::cutlass_scaled_mm_azp` | 4.0 |  |" in md
    )
    assert [k["name"] for k in EP.load_kernels(str(path))] == ["superweight_not_a_cpu_op"]


def test_steps_cut_at_the_sampler():
    """``step_summary`` cuts the window at the sampler's kernels: the first (prefill) step apart, the later steps'
    median busy / span / lead gap (idle GPU between the previous step's end and the step's first kernel); sampler
    kernels with fewer than ``min_step_kernels`` others between them (vLLM's sampler launches several) stay in one
    step; no sampler -> {}."""

    def k(name, ts, dur):
        return {"name": name, "ts": float(ts), "dur": float(dur)}

    def fwd(t0, n, dur):  # a forward pass: n kernels of dur us back to back
        return [k("gemm", t0 + i * dur, dur) for i in range(n)]

    kernels = [
        # prefill: 100 us busy over 150 us (a 40 us hole), then the sampler: two marker kernels, a softmax between
        *fwd(0, 10, 6),
        k("norm", 100, 30),
        k("_gumbel_sample_kernel", 130, 5),
        k("softmax", 135, 2),
        k("argmax_sample", 137, 3),
        # decode 1: 30 us after the prefill's end, 20 busy in 25
        *fwd(170, 9, 1.5),
        k("gemm_tail", 183.5, 1.5),
        k("_gumbel_sample_kernel", 190, 5),
        # decode 2: 10 us gap, 20 busy in 20
        *fwd(205, 10, 1.5),
        k("_gumbel_sample_kernel", 220, 5),
        # decode 3: 50 us gap, 30 busy in 40
        *fwd(275, 10, 2.0),
        k("_gumbel_sample_kernel", 305, 10),
    ]
    s = EP.step_summary(list(reversed(kernels)))  # any order in: sorted by start
    assert s["steps_found"] == 4
    assert s["first"] == {"busy_us": 100.0, "span_us": 140.0, "lead_gap_us": 0.0, "kernels": 14}
    assert s["later_median"] == {"busy_us": 20.0, "span_us": 25.0, "lead_gap_us": 30.0, "kernels": 11}
    cut_at_every_marker = EP.step_summary(kernels, min_step_kernels=1)
    # the prefill's sampler split in two: its tail is a fragment, joined to the prefill again
    assert cut_at_every_marker["steps_found"] == 4 and cut_at_every_marker["fragments"] == 1
    assert cut_at_every_marker["first"] == s["first"]
    assert "fragments" not in s
    # steps of 40 kernels; the window opening on 9 kernels and a marker (H100 s50: it stood as the prefill) and
    # closing on as many: fragments (under a quarter of the median piece), joined to the next / the last step
    big = [x for t0 in (0, 50, 100) for x in (*fwd(t0, 40, 1.0), k("_gumbel_sample_kernel", t0 + 40, 1))]
    lead = [*fwd(-30, 9, 1.0), k("prepare_sample", -20, 1)]
    tail = [*fwd(150, 9, 1.0), k("_gumbel_sample_kernel", 160, 1)]
    s2 = EP.step_summary(lead + big + tail)
    assert s2["steps_found"] == 3 and s2["fragments"] == 2
    assert s2["first"] == {"busy_us": 51.0, "span_us": 71.0, "lead_gap_us": 0.0, "kernels": 51}  # lead + step 1
    assert s2["later_median"] == {"busy_us": 46.0, "span_us": 51.0, "lead_gap_us": 9.0, "kernels": 46}  # 41, 41+10
    assert EP.step_summary(big) == {
        "steps_found": 3,
        "first": {"busy_us": 41.0, "span_us": 41.0, "lead_gap_us": 0.0, "kernels": 41},
        "later_median": {"busy_us": 41.0, "span_us": 41.0, "lead_gap_us": 9.0, "kernels": 41},
    }
    assert EP.step_summary([k("gemm", 0, 5)]) == {}
    rec = dict(kind="profile", variant="a", batch=8, **EP.summarize(kernels, 3), step_profile=s)
    old = dict(kind="profile", variant="b", batch=8, **EP.summarize(kernels, 3))  # before s47: no step_profile
    md = EP.profile_table([rec, old]).splitlines()
    assert "| first step (prefill): busy (us) | 100.0 |  |" in md
    assert "| later steps, median: lead gap (us) | 30.0 |  |" in md
