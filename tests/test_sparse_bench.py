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
    assert envs._tiles_for(env, 0) == {"bm_transposed": 32, "warps": 4, "warps_t": 8}


def test_recommend_from_m_picks_a_variant_that_wins_only_at_large_batches():
    """A variant slower at 64 tokens but > 2 % faster from 128 up gets no plain pick, only a FROM_M one; a variant
    faster everywhere is ``recommend``'s; nothing better: no pick."""
    sb = _sb()
    us = {"default": {64: 46.6, 128: 69.5, 256: 125.3}, "p1": {64: 50.0, 128: 60.0, 256: 90.0}, "w4": {64: 46.5}}
    assert sb.recommend(us, [64, 128, 256])[0] is None
    assert sb.recommend_from_m(us, [256, 64, 128]) == (128, "p1")
    us["p1"][128] = 72.0  # > 3 % slower at 128: only from 256
    assert sb.recommend_from_m(us, [64, 128, 256]) == (256, "p1")
    us["p1"][256] = 124.0
    assert sb.recommend_from_m(us, [64, 128, 256]) == (None, None)
    us["g2"] = {64: 40.0, 128: 60.0, 256: 100.0}
    assert sb.recommend(us, [64, 128, 256])[0] == "g2"


def test_kernel_table_per_call_most_expensive_first():
    sb = _sb()
    avgs = [
        ("Marlin<...>", 1230.0, 40),
        ("_sell_spmm_kernel", 400.0, 40),
        ("_gather_transpose_kernel", 80.0, 40),
        ("aten::empty", 0.0, 40),  # host-only ops carry no device time
        ("cudaLaunchKernel", 0.0, 120),
    ]
    kt = sb.kernel_table(avgs, 40)
    assert list(kt) == ["Marlin<...>", "_sell_spmm_kernel", "_gather_transpose_kernel"]
    assert kt["_sell_spmm_kernel"] == {"us": 10.0, "launches": 1.0}
    with pytest.raises(ValueError):
        sb.kernel_table(avgs, 0)
    meta = {"device": "x", "shape": [8, 8], "nnz": 1, "density": 1 / 64}
    rows = [{"m": 64, "kind": "marlin", "us": 30.0}, {"m": 64, "kind": "profile", "kernels": kt}]
    md = sb.table(rows, meta)
    assert "| marlin | 30.0 |" in md and "* M = 64: `Marlin<...>` 30.8 (x1)" in md


def test_panel_variants_and_their_env():
    """The shared-memory kernel's variants are one knob from its default each, and what the bench would recommend
    parses back to the same launch knobs."""
    sb = _sb()
    from vllm_superweight import envs
    from vllm_superweight.kernels import cuda_sell as CS

    v = sb.panel_variants()
    assert v["default"] == CS.PanelConfig() and sb.panel_env(v["default"]) == "1"
    for name, cfg in v.items():
        env = sb.panel_env(cfg)
        assert CS.PanelConfig(**envs._parse_panel(env)) == cfg, name
    assert sb.panel_env(v["w4"]) == "warps=4" and sb.panel_env(v["mb8"]) == "mb=8"
    assert sb.panel_variants(64) == v  # within the kernel's own limit: unchanged
    # 128-256 tokens asked for: every variant takes them (the kernel would refuse past its default 96)
    big = sb.panel_variants(256)
    assert all(cfg.max_m == 256 for cfg in big.values()) and sb.panel_env(big["w4"]) == "warps=4,max_m=256"
    for name, cfg in big.items():
        assert CS.PanelConfig(**envs._parse_panel(sb.panel_env(cfg))) == cfg, name
        plan, why = CS.panel_plan(256, 4096, 400, CS.DeviceLimits(132, 232448, 233472), cfg)
        assert plan is not None and why is None, name


def test_table_marks_the_panel_kernels_profile():
    sb = _sb()
    meta = {"device": "x", "shape": [8, 8], "nnz": 1, "density": 1 / 64}
    rows = [
        {"m": 8, "kind": "marlin+panel default", "us": 20.0},
        {"m": 8, "kind": "profile panel", "kernels": {"sw_sell_panel": {"us": 3.0, "launches": 1.0}}},
    ]
    md = sb.table(rows, meta)
    assert "| marlin+panel default | 20.0 |" in md and "* M = 8 (panel kernel): `sw_sell_panel` 3.0 (x1)" in md


def test_table_names_the_gemm_before_the_correction():
    """The GEMM before the correction (``meta["gemm"]``, from ``--gemm``; ``humming``: the kernel held-out layers
    serve 16-383 tokens on, on Hopper) is named in the table's title and in its rows (the records' kinds stay
    ``marlin...``); records without it (before session 44) read as Marlin."""
    sb = _sb()
    meta = {"device": "x", "shape": [8, 8], "nnz": 1, "density": 1 / 64}
    rows = [{"m": 8, "kind": "marlin", "us": 20.0}, {"m": 8, "kind": "marlin+sell L/default", "us": 30.0}]
    rows += [{"m": 8, "kind": "sell alone L/default", "us": 10.0}]
    md = sb.table(rows, meta)
    assert md.startswith("# SELL correction after Marlin, x:")
    assert "| marlin | 20.0 |" in md and "| marlin+sell L/default | 30.0 |" in md
    md = sb.table(rows, dict(meta, gemm="humming"))
    assert md.startswith("# SELL correction after Humming, x:")
    assert "| humming | 20.0 |" in md and "| humming+sell L/default | 30.0 |" in md and "marlin" not in md
    assert "| sell alone L/default | 10.0 |" in md
