"""Data-free grid solver (HQQ-style, integer zero points) and the per-matrix hold-out budget."""

import math

import pytest
import torch

from vllm_superweight.format import BlockLayout, FormatError
from vllm_superweight.grid import allocate_budget, effective_bits, fit_grid, fit_grid_chunked, holdout_budget
from vllm_superweight.quantize import (
    _blocks,
    _scale_zero,
    dequantize,
    dequantize_tensors,
    quantize_weight,
    select_holdout,
    to_tensors,
    unpack_tensors,
)


def _heavy(n=96, k=256, seed=0, dtype=torch.bfloat16):
    """Student-t-like weights (heavy tails, as in LLM matrices) with one super-weight-like outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02 / (torch.rand(n, k, generator=g) + 0.15).sqrt()
    w[5, 17] = 2.5
    return w.to(dtype)


def _lp_err(w, deq, p, layout):
    return (_blocks((deq - w.float()).abs(), BlockLayout.parse(layout)) ** p).sum(-1)


@pytest.mark.parametrize("layout", ["32", "64", "channel", "rows:4", "tensor"])
@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_grid_is_servable_and_holdout_exact(layout, bits):
    w = _heavy()
    mask = select_holdout(w, 2e-3, [(5, 17)])
    ql = quantize_weight(w, bits, layout, holdout_mask=mask, scale_dtype=torch.bfloat16, grid="hqq")
    lay = BlockLayout.parse(layout)
    # integer zero points inside the signed code range (what the packed int32 zero-point tensor holds)
    assert ql.zero.dtype == torch.int8
    assert int(ql.zero.min()) >= -(2 ** (bits - 1)) and int(ql.zero.max()) <= 2 ** (bits - 1) - 1
    # scales are exactly representable in the storage dtype
    assert torch.equal(ql.scale.to(torch.bfloat16).float(), ql.scale)
    t = to_tensors(ql, torch.bfloat16)
    q, s, z = unpack_tensors(t, bits, False, lay)
    assert torch.equal(q, ql.q) and torch.equal(z, ql.zero)
    deq = dequantize(q, s, z, lay)
    # held-out weights are exactly 0 in the packed weights and come back bit-exactly
    assert (deq[mask] == 0).all()
    restored = dequantize_tensors(t, bits, False, lay, restore=True)
    assert torch.equal(restored[mask].to(torch.bfloat16), w[mask])
    assert restored[5, 17].to(torch.bfloat16) == w[5, 17]


@pytest.mark.parametrize("layout", ["64", "channel"])
@pytest.mark.parametrize("lp", [0.7, 1.0])
def test_hqq_never_worse_than_minmax_in_its_norm(layout, lp):
    w = _heavy(seed=1)
    mask = select_holdout(w, 1e-3)
    mm = quantize_weight(w, 4, layout, holdout_mask=mask, scale_dtype=torch.bfloat16)
    hq = quantize_weight(
        w, 4, layout, holdout_mask=mask, scale_dtype=torch.bfloat16, grid="hqq", grid_params={"lp": lp, "iters": 6}
    )
    lay = BlockLayout.parse(layout)
    e_mm = _lp_err(w, dequantize(mm.q, mm.scale, mm.zero, lay).masked_fill(mask, 0) + w.float() * mask, lp, layout)
    e_hq = _lp_err(w, dequantize(hq.q, hq.scale, hq.zero, lay).masked_fill(mask, 0) + w.float() * mask, lp, layout)
    assert (e_hq <= e_mm * (1 + 1e-4) + 1e-12).all()
    assert e_hq.sum() < 0.995 * e_mm.sum()  # heavy tails: the fit clips a few and wins overall
    assert hq.stats["blocks_improved"] > 0 and hq.stats["clipped"] > 0
    # weight-space error improves too
    assert hq.stats["rel_fro_err"] < mm.stats["rel_fro_err"]


def test_hqq_zero_iterations_is_minmax():
    w = _heavy(seed=2)
    mm = quantize_weight(w, 4, "64", scale_dtype=torch.bfloat16)
    hq = quantize_weight(w, 4, "64", scale_dtype=torch.bfloat16, grid="hqq", grid_params={"iters": 0})
    assert torch.equal(mm.q, hq.q) and torch.equal(mm.scale, hq.scale) and torch.equal(mm.zero, hq.zero)


def test_hqq_symmetric_fits_scale_only():
    w = _heavy(seed=3)
    mm = quantize_weight(w, 4, "channel", True, scale_dtype=torch.bfloat16)
    hq = quantize_weight(w, 4, "channel", True, scale_dtype=torch.bfloat16, grid="hqq")
    assert hq.zero is None
    assert hq.stats["rel_fro_err"] <= mm.stats["rel_fro_err"] + 1e-6


def test_chunked_equals_whole():
    w = _heavy(n=64, k=512, seed=4).float()
    lay = BlockLayout.parse("64")
    b = _blocks(w, lay)
    s, z = _scale_zero(b.amin(-1), b.amax(-1), 4, False, torch.bfloat16)
    s1, z1, _ = fit_grid(b, s, z, 4, torch.bfloat16, iters=5)
    s2, z2, _ = fit_grid_chunked(b, s, z, 4, torch.bfloat16, chunk_elems=1000, iters=5)
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_fit_grid_deterministic_and_finite_on_constant_blocks():
    w = torch.zeros(8, 128)
    w[0] = 0.5  # constant non-zero block
    w[1, :64] = torch.linspace(-1, 1, 64)
    ql = quantize_weight(w.bfloat16(), 4, "64", scale_dtype=torch.bfloat16, grid="hqq")
    ql2 = quantize_weight(w.bfloat16(), 4, "64", scale_dtype=torch.bfloat16, grid="hqq")
    assert torch.isfinite(ql.scale).all() and (ql.scale > 0).all()
    assert torch.equal(ql.q, ql2.q) and torch.equal(ql.scale, ql2.scale)
    deq = dequantize(ql.q, ql.scale, ql.zero, "64")
    assert (deq[2:] == 0).all()


def test_unknown_grid_rejected():
    with pytest.raises(FormatError):
        quantize_weight(_heavy(), 4, "64", grid="gptq")


def test_select_holdout_count():
    w = _heavy()
    m = select_holdout(w, 0.0, count=7)
    assert int(m.sum()) == 7
    assert w.abs()[m].min() >= w.abs()[~m].max()
    assert torch.equal(select_holdout(w, 1e-3), select_holdout(w, 0.0, count=math.ceil(1e-3 * w.numel())))
    assert int(select_holdout(w, 0.0, [(1, 2)], count=0).sum()) == 1


def test_allocate_budget_equal_marginal_gain():
    curves = {
        "steep": [(0, 10.0), (10, 4.0), (20, 3.0), (40, 2.5)],
        "flat": [(0, 1.0), (10, 0.9), (20, 0.85), (40, 0.8)],
    }
    got = allocate_budget(curves, 20)
    assert got == {"steep": 20, "flat": 0}
    got = allocate_budget(curves, 40)
    assert sum(got.values()) <= 40 and got["steep"] >= 20
    # a non-convex curve is taken on its hull: the whole jump from 0 to 20 is worth it
    got = allocate_budget({"a": [(0, 5.0), (10, 4.9), (20, 1.0)], "b": [(0, 5.0), (10, 4.0), (20, 3.5)]}, 20)
    assert got == {"a": 20, "b": 0}


def test_holdout_budget_total_within_uniform():
    ws = {"a": _heavy(seed=5), "b": _heavy(seed=6).float().mul(0.1).to(torch.bfloat16), "c": _heavy(seed=7)}
    ws["c"][:, :] = ws["c"].float().clamp(-0.03, 0.03).to(torch.bfloat16)  # no tails: little to gain
    counts = holdout_budget(ws, 2e-3, 4, BlockLayout.parse("64"), metric="rel_w")
    uniform = sum(math.ceil(2e-3 * w.numel()) for w in ws.values())
    assert sum(counts.values()) <= uniform
    assert counts["c"] <= counts["a"]


def test_effective_bits_counts_every_tensor():
    w = _heavy(n=64, k=256)
    ql = quantize_weight(w, 4, "64", holdout_mask=select_holdout(w, 1e-2), scale_dtype=torch.bfloat16)
    t = to_tensors(ql, torch.bfloat16)
    nnz = int(ql.stats["held_out"])
    expect = (64 * 256 * 4 + 64 * 4 * 16 + 64 // 8 * 4 * 32 + nnz * (64 + 16) + 2 * 64) / (64 * 256)
    assert effective_bits(t, w.numel()) == pytest.approx(expect)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hqq_cuda_matches_cpu_closely():
    w = _heavy(n=256, k=512, seed=8)
    mask = select_holdout(w, 1e-3)
    a = quantize_weight(w, 4, "64", holdout_mask=mask, scale_dtype=torch.bfloat16, grid="hqq")
    b = quantize_weight(w.cuda(), 4, "64", holdout_mask=mask.cuda(), scale_dtype=torch.bfloat16, grid="hqq")
    assert b.q.is_cuda
    assert abs(a.stats["rel_fro_err"] - b.stats["rel_fro_err"]) < 1e-3 * a.stats["rel_fro_err"] + 1e-6


def test_weighted_fit_lowers_weighted_error():
    w = _heavy(n=128, k=576, seed=9)
    g = torch.Generator().manual_seed(1)
    cw = torch.rand(576, generator=g) ** 4 * 10
    m = select_holdout(w, 1e-3)
    cwn = cw / cw.mean()

    def err(ql):
        d = dequantize(ql.q, ql.scale, ql.zero, "64")
        d[m] = w[m].float()
        return float(((d - w.float()).abs() ** 0.7 @ cwn).sum())

    a = quantize_weight(w, 4, "64", holdout_mask=m, scale_dtype=torch.bfloat16, grid="hqq")
    b = quantize_weight(w, 4, "64", holdout_mask=m, scale_dtype=torch.bfloat16, grid="hqq", col_weight=cw)
    c = quantize_weight(w, 4, "64", holdout_mask=m, scale_dtype=torch.bfloat16, grid="hqq", col_weight=torch.ones(576))
    assert err(b) < err(a)
    assert torch.equal(a.q, c.q) and torch.equal(a.scale, c.scale)  # uniform weights = unweighted
    assert (dequantize(b.q, b.scale, b.zero, "64")[m] == 0).all()


def test_select_holdout_col_scale():
    w = torch.ones(4, 8)
    cs = torch.arange(8, dtype=torch.float32)
    m = select_holdout(w, 0.0, count=4, col_scale=cs)
    assert m[:, 7].all() and int(m.sum()) == 4
