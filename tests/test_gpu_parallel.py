"""benchmarks/gpu_parallel.py's comparison of two engine runs (what its TP / single-token GPU records report)."""

import pytest
from bench_module import load


def _gp():
    return load("gpu_parallel")


def _run(tokens, decode, prompt=(-1.0, -2.0)):
    return {"tokens": list(tokens), "decode_logprobs": list(decode), "prompt_logprobs": list(prompt)}


def test_decode_logprobs_compared_up_to_the_first_differing_token():
    gp = _gp()
    base = [_run([5, 6, 7], [-0.1, -0.2, -0.3]), _run([1, 2], [-1.0, -1.0])]
    # prompt 0: same tokens, step 2 off by 0.05; prompt 1: differs at step 1 (0.5 off there), then a different
    # context whose 9.0 difference must not count
    res = [_run([5, 6, 7], [-0.1, -0.2, -0.35]), _run([1, 3], [-1.0, -1.5], prompt=(-1.0, -2.25))]
    out = gp.compare_runs(res, base, "m1-marlin")
    assert out["tokens_equal_m1-marlin"] is False
    assert out["max_abs_dlogprob_vs_m1-marlin"] == pytest.approx(0.25)
    assert out["max_abs_decode_dlogprob_vs_m1-marlin"] == pytest.approx(0.5)
    assert out["decode_steps_compared"] == 5
    res[1] = _run([1, 3, 4], [-1.0, -1.0, 8.0])
    base[1] = _run([1, 2, 4], [-1.0, -1.0, -1.0])
    out = gp.compare_runs(res, base, "m1-marlin")
    assert out["max_abs_decode_dlogprob_vs_m1-marlin"] == pytest.approx(0.05)


def test_runs_without_decode_logprobs_compare_tokens_and_prompts_only():
    gp = _gp()
    base = [{"tokens": [1, 2], "prompt_logprobs": [-1.0]}]
    out = gp.compare_runs([{"tokens": [1, 2], "prompt_logprobs": [-1.5]}], base, "tp1")
    assert out == {"tokens_equal_tp1": True, "max_abs_dlogprob_vs_tp1": 0.5}


def test_single_token_runs_name_a_baseline_that_exists():
    gp = _gp()
    m1 = {k: v for k, v in gp.RUNS.items() if k.startswith("m1-")}
    assert m1["m1-marlin"]["env"]["SUPERWEIGHT_CUDA_GEMV"] == "0" and "compare" not in m1["m1-marlin"]
    for name, run in m1.items():
        assert run["one_by_one"] and run["decode_logprobs"] and run["eager"] == name.endswith("-eager"), name
        # every run names its W4 kernel mode: one exported by the caller (gpu_eval_ckpt.sh eval) must not leak in
        assert run["env"].get("SUPERWEIGHT_W4_KERNEL") in ("auto", "humming", "humming-gemv"), name
        assert run.get("compare", "m1-marlin") in gp.RUNS
