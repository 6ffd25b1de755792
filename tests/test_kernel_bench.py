"""``benchmarks/kernel_bench.py``'s pure parts: the W8A8 large-batch recommendation (``w8big_recommend``), and the
``w8big`` section end to end on the CPU (``--dry-run-cpu``: the Triton interpreter, vLLM's ops mocked in torch),
whose float64 check must pass for every configuration it times."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench_module import load

from vllm_superweight import envs
from vllm_superweight.kernels import triton_int8_mm as TI

KB = load("kernel_bench")


def test_w8big_recommend_bound_and_buckets(monkeypatch):
    monkeypatch.delenv(envs.W8A8_TRITON, raising=False)
    cfg = {33: "bn=64,bk=128,warps=4,stages=4,swap=1", 64: "bn=128,bk=128,warps=8,stages=4,swap=1,tma=1"}
    best = {33: {"config": cfg[33], "us": 50.0}, 64: {"config": cfg[64], "us": 60.0}, 128: {"config": "x", "us": 99}}
    azp = {33: 55.0, 64: 61.0, 128: 90.0}
    rec = KB.w8big_recommend(best, azp)
    # Triton wins at 33 and 64, loses at 128: the outlier layers' bound is 64, the plain one keeps its default
    assert rec == f"{envs.DEFAULT_W8A8_TRITON_MAX_M}/64@16:{TI.default_config(16, 1, 1).key()};" + (
        f"32:{TI.default_config(32, 1, 1).key()};33:{cfg[33]};64:{cfg[64]}"
    )
    monkeypatch.setenv(envs.W8A8_TRITON, rec)
    max_m, table, out_max = envs.w8a8_triton()  # what the recommendation says is what the knob parses
    assert (max_m, out_max) == (envs.DEFAULT_W8A8_TRITON_MAX_M, 64)
    assert TI.config_for(8, 4096, 4096, table) == TI.default_config(8, 4096, 4096)  # small batches untouched
    assert TI.config_for(40, 4096, 4096, table) == TI.Int8MMConfig(128, 128, 8, 4, swap=1, tma=1)
    # a gap stops the bound; losing at the first M recommends nothing
    assert KB.w8big_recommend(best, {33: 55.0, 128: 90.0}).startswith(f"{envs.DEFAULT_W8A8_TRITON_MAX_M}/33@")
    assert KB.w8big_recommend(best, {33: 40.0, 64: 61.0}) is None


def test_w8big_section_dry_run(tmp_path):
    out = tmp_path / "kb.json"
    root = os.path.join(os.path.dirname(__file__), "..")
    p = subprocess.run(
        [sys.executable, "benchmarks/kernel_bench.py", "--dry-run-cpu", "--sections", "w8big", "--w8big-ms", "40"]
        + ["--out", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.load(open(out))["results"]
    timed = {r["variant"] for r in rows if r.get("us")}
    failed = [r for r in rows if "failed" in str(r.get("note", ""))]
    assert not failed, failed
    assert {"smoothquant", "azp"} <= timed
    assert {"triton " + c.key() for c in TI.SWEEP_BIG} <= timed  # each passed its float64 check first


def test_w8big_table(tmp_path):
    rows = [
        {"section": "w8big", "variant": "smoothquant", "m": 64, "us": 64.0},
        {"section": "w8big", "variant": "azp", "m": 64, "us": 68.0},
        {"section": "w8big", "variant": "triton a", "m": 64, "us": 66.0},
        {"section": "w8big", "variant": "triton b", "m": 64, "us": 80.0},
        {"section": "w8big", "variant": "triton b", "m": 96, "note": "failed: x"},
        {"section": "w8", "variant": "triton a", "m": 64, "us": 1.0},
    ]
    path = tmp_path / "kb.json"
    path.write_text(json.dumps({"meta": {}, "results": rows}))
    md = KB.w8big_table(str(path))
    assert "M = 96" not in md  # only timed rows
    assert "| triton a | **66.0** |" in md and "| triton b | 80.0 |" in md
    assert "| ours, zero-point epilogue | 68.0 |" in md
    assert "| best Triton, × SmoothQuant | 0.970 |" in md  # 64 / 66
