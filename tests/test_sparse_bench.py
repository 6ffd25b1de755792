"""benchmarks/sparse_bench.py's choice of SELL launch parameters (what it writes as SUPERWEIGHT_SPARSE_TILES)."""

import pytest
from bench_module import load


def _sb():
    return load("sparse_bench")


def test_recommend_needs_a_clear_win_and_no_loss_anywhere():
    sb = _sb()
    us = {
        "default": {8: 100.0, 64: 100.0},
        "fast_but_loses_at_8": {8: 104.0, 64: 80.0},  # 8% better in sum, 4% worse at M = 8: refused
        "small_gain": {8: 99.0, 64: 99.5},  # < 2%: refused
        "clear": {8: 97.0, 64: 93.0},
        "incomplete": {8: 50.0},  # did not run at every M: refused
    }
    best, sums = sb.recommend(us, [8, 64])
    assert best == "clear"
    assert sums["fast_but_loses_at_8"] == pytest.approx(184.0) and "incomplete" not in sums
    assert sb.recommend({"default": {8: 1.0, 64: 1.0}, "same": {8: 1.0, 64: 1.0}}, [8, 64])[0] is None
    assert sb.recommend({"x": {8: 1.0}}, [8])[0] is None  # no default measured: nothing to compare with


def test_tiles_env_and_combine_follow_the_changed_fields():
    sb = _sb()
    from vllm_superweight import envs
    from vllm_superweight.kernels import triton_sparse as TS

    d = TS.DEFAULT_TILES
    v = sb.tile_variants(d)
    assert sb.tiles_env(v["default"], d) == ""
    both = sb.combine(["bmt32", "w4", "wt8"], v, d)
    assert (both.bm_transposed, both.warps, both.warps_t, both.bm_direct) == (32, 4, 8, d.bm_direct)
    env = sb.tiles_env(both, d)
    assert env == "bmt=32,warps=4,wt=8"
    # what it writes parses back to the same tiles
    assert envs._parse_tiles(env) == {"bm_transposed": 32, "warps": 4, "warps_t": 8}
