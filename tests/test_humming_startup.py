"""benchmarks/diag/humming_startup.py (a GPU diagnostic): its profile summary."""

import cProfile
import importlib.util
import os
import pstats

HERE = os.path.dirname(__file__)


def _load():
    path = os.path.join(HERE, "..", "benchmarks", "diag", "humming_startup.py")
    spec = importlib.util.spec_from_file_location("humming_startup", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _slow(n):
    return sum(i * i for i in range(n))


def _outer():
    return _slow(200_000) + _slow(10)


def test_top_functions_ranks_by_cumulative_and_own_time():
    hs = _load()
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

    path = os.path.join(HERE, "..", "benchmarks", "diag", "humming_startup_cpu.py")
    spec = importlib.util.spec_from_file_location("humming_startup_cpu", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        dirs = mod._cuda_wheel_dirs()
    except SystemExit as e:
        pytest.skip(str(e))
    lib = dirs["LD_LIBRARY_PATH"].split(":")[0]
    assert any(f.startswith("libnvrtc-builtins") for f in os.listdir(lib)), lib
    assert os.path.isfile(os.path.join(dirs["CUDA_INCLUDE_PATH"], "cuda_runtime.h"))
    assert set(mod.SHAPES_7B) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
