"""benchmarks/diag/humming_startup.py (a GPU diagnostic): its profile summary."""

import cProfile
import os
import pstats

from bench_module import load


def _slow(n):
    return sum(i * i for i in range(n))


def _outer():
    return _slow(200_000) + _slow(10)


def test_top_functions_ranks_by_cumulative_and_own_time():
    hs = load("diag/humming_startup")
    prof = cProfile.Profile()
    prof.enable()
    _outer()
    prof.disable()
    st = pstats.Stats(prof)
    cum = hs.top_functions(st, "cumulative", 5)
    assert len(cum) <= 5 and all(set(r) == {"function", "calls", "tottime_s", "cumtime_s"} for r in cum)
    names = [r["function"] for r in cum]
    assert any("(_outer)" in f for f in names) and any("(_slow)" in f for f in names)
    assert [r["cumtime_s"] for r in cum] == sorted((r["cumtime_s"] for r in cum), reverse=True)
    slow = next(r for r in cum if "(_slow)" in r["function"])
    assert slow["calls"] == 2 and "tests/test_humming_startup.py" in slow["function"]
    own = hs.top_functions(st, "tottime", 3)
    assert [r["tottime_s"] for r in own] == sorted((r["tottime_s"] for r in own), reverse=True)
    assert set(hs.SHAPES_7B) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_cpu_stand_in_finds_nvrtc_and_the_cuda_headers():
    """benchmarks/diag/humming_startup_cpu.py compiles Humming's kernels with the venv's CUDA 13 wheels: the
    directories it hands NVRTC (libnvrtc-builtins, the headers Humming's source includes) exist."""
    import pytest

    mod = load("diag/humming_startup_cpu")
    try:
        dirs = mod._cuda_wheel_dirs()
    except SystemExit as e:
        pytest.skip(str(e))
    lib = dirs["LD_LIBRARY_PATH"].split(":")[0]
    assert any(f.startswith("libnvrtc-builtins") for f in os.listdir(lib)), lib
    assert os.path.isfile(os.path.join(dirs["CUDA_INCLUDE_PATH"], "cuda_runtime.h"))
    assert set(mod.SHAPES_7B) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_plot_reads_both_records(tmp_path):
    """benchmarks/plot_humming_startup.py: the H200 passes and the CPU stand-in's, per shape, in the shapes' order."""
    import json

    mod = load("plot_humming_startup")
    shapes = [{"shape": s, "first_call_s": v} for s, v in (("qkv_proj", 25.9), ("o_proj", 26.6))]
    (tmp_path / "h_cold.json").write_text(json.dumps({"shapes": shapes}))
    passes = [
        {"shape": s, "reader": r, "cache": c, "seconds": t}
        for s, r, c, t in (
            ("o_proj", "fast", "warm", 0.3),
            ("qkv_proj", "fast", "warm", 0.4),
            ("qkv_proj", "slow", "cold", 36.0),
        )
    ]
    (tmp_path / "cpu.json").write_text(json.dumps({"passes": passes}))
    got_shapes, series = mod.bars(str(tmp_path / "h_{}.json"), str(tmp_path / "cpu.json"))
    assert got_shapes == ["qkv_proj", "o_proj"]
    assert series["H200, pyelftools, cold"] == [25.9, 26.6]
    assert series["CPU stand-in, kernels/cubin.py, warm"] == [0.4, 0.3]
    assert series["CPU stand-in, pyelftools, cold"] == [36.0, 0.0]  # a missing pass plots as 0
    assert "H200, pyelftools, warm" not in series
