"""Format + quantizer: block layouts, error bounds, exact hold-outs, packing compatibility, determinism."""

import math

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from vllm_superweight.format import BlockLayout, FormatError, QuantConfig, float_bits_hex, float_from_bits_hex
from vllm_superweight.quantize import (
    dequantize,
    dequantize_tensors,
    expand_to_rows,
    quantize_weight,
    select_holdout,
    to_tensors,
    unpack_tensors,
)

LAYOUTS = ["32", "64", "channel", "rows:4", "tensor"]


def _w(n=64, k=192, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[7, 33] = 3.0  # a super-weight-like outlier
    return w.to(dtype)


@pytest.mark.parametrize("block", LAYOUTS)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_error_within_half_step_and_holdout_exact(block, bits, sym):
    w = _w()
    mask = select_holdout(w, 0.0, [(7, 33)])
    ql = quantize_weight(w, bits, block, sym, holdout_mask=mask, scale_dtype=torch.bfloat16)
    lay = BlockLayout.parse(block)
    t = to_tensors(ql, torch.bfloat16)
    q, s, z = unpack_tensors(t, bits, sym, lay)
    assert torch.equal(q, ql.q)
    deq = dequantize(q, s, z, lay)
    step = expand_to_rows(s, lay, w.shape[0])
    step = step.repeat_interleave(w.shape[1] // step.shape[1], dim=1)
    err = (deq - w.float()).abs()
    err[7, 33] = 0
    # symmetric codes stop at -2**(bits-1) on one side only: the max still maps within half a step
    assert (err <= step / 2 + 1e-6).all(), float((err - step / 2).max())
    # the held-out weight is 0 in the packed weights and comes back bit-exactly
    assert deq[7, 33] == 0
    restored = dequantize_tensors(t, bits, sym, lay, restore=True)
    assert restored[7, 33].to(torch.bfloat16) == w[7, 33]
    assert t["sparse_value"].dtype == torch.bfloat16 and t["sparse_value"][0] == w[7, 33]


def test_holdout_keeps_superweight_out_of_the_range():
    w = _w()
    with_sw = quantize_weight(w, 4, "channel", False)
    held = quantize_weight(w, 4, "channel", False, holdout_mask=select_holdout(w, 0, [(7, 33)]))
    assert held.scale[7, 0] < with_sw.scale[7, 0] / 5  # the outlier no longer sets row 7's range
    assert held.stats["rel_fro_err"] < with_sw.stats["rel_fro_err"]


def test_holdout_fraction_takes_the_largest():
    w = _w(dtype=torch.float32)
    m = select_holdout(w, 1e-2)
    cnt = math.ceil(1e-2 * w.numel())
    assert int(m.sum()) == cnt
    assert w.abs()[m].min() >= w.abs()[~m].max()


def test_holdout_ranked_by_column_scale():
    """col_scale ranks by |w| x col_scale[col]: a small weight in a loud input column beats a larger one in a quiet
    column; the count is unchanged, extra coordinates are still added, and a constant scale changes nothing."""
    w = torch.zeros(4, 6)
    w[0, 0], w[1, 1], w[2, 2] = 1.0, 0.9, 0.8  # largest |w| in quiet columns 0..2
    w[3, 4], w[2, 5] = 0.2, 0.15  # small |w| in loud columns 4, 5
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0, 10.0])
    by_abs = select_holdout(w, 0.0, count=2)
    by_act = select_holdout(w, 0.0, count=2, col_scale=scale)
    assert by_abs.nonzero().tolist() == [[0, 0], [1, 1]]
    assert by_act.nonzero().tolist() == [[2, 5], [3, 4]]  # scores 1.5 and 2.0 beat 1.0, 0.9, 0.8
    with_sw = select_holdout(w, 0.0, [(1, 3)], count=2, col_scale=scale)
    assert with_sw.nonzero().tolist() == [[1, 3], [2, 5], [3, 4]]
    # the fraction path, a random matrix: same count, a different set; a constant scale is the |w| ranking
    g = torch.Generator().manual_seed(1)
    wr = _w(dtype=torch.float32)
    cs = torch.rand(wr.shape[1], generator=g) * 4
    a, b = select_holdout(wr, 1e-2), select_holdout(wr, 1e-2, col_scale=cs)
    assert int(a.sum()) == int(b.sum()) == math.ceil(1e-2 * wr.numel()) and not torch.equal(a, b)
    score = wr.abs() * cs
    assert score[b].min() >= score[~b].max()
    assert torch.equal(select_holdout(wr, 1e-2, col_scale=torch.full((wr.shape[1],), 3.0)), a)


def test_packing_is_compressed_tensors():
    w = _w()
    ql = quantize_weight(w, 4, "64", False)
    t = to_tensors(ql, torch.bfloat16)
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (64, 192 // 8)
    assert torch.equal(unpack_from_int32(t["weight_packed"], 4, torch.Size((64, 192))), ql.q)
    assert torch.equal(unpack_from_int32(t["weight_zero_point"], 4, torch.Size((64, 3)), packed_dim=0), ql.zero)
    assert t["weight_shape"].tolist() == [64, 192]


@pytest.mark.parametrize("clip", ["zscore", "block_pct", "tensor_pct", "iqr", "mse"])
def test_clipping_methods_run_and_count(clip):
    w = _w(dtype=torch.float32)
    w[3, 5] = 5.0
    ql = quantize_weight(
        w,
        4,
        "channel",
        False,
        clip=clip,
        clip_threshold={"zscore": 3.0, "block_pct": 0.02, "tensor_pct": 1e-3, "iqr": 1.5, "mse": 0.5}[clip],
    )
    assert ql.stats["clipped"] > 0
    assert torch.isfinite(ql.scale).all()


def test_deterministic_bytes():
    w = _w()
    a = to_tensors(
        quantize_weight(w, 4, "rows:4", False, clip="mse", holdout_mask=select_holdout(w, 1e-3)), torch.bfloat16
    )
    b = to_tensors(
        quantize_weight(w, 4, "rows:4", False, clip="mse", holdout_mask=select_holdout(w, 1e-3)), torch.bfloat16
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layout_errors():
    with pytest.raises(FormatError, match="does not divide the input dimension 576"):
        BlockLayout.parse("128").grid(64, 576)
    with pytest.raises(FormatError, match="rows:5 does not divide"):
        BlockLayout.parse("rows:5").grid(64, 576)
    with pytest.raises(FormatError, match="unknown block"):
        BlockLayout.parse("blocks")
    with pytest.raises(FormatError, match="unsupported bits 5"):
        QuantConfig(bits=5)
    with pytest.raises(FormatError, match="int8 activations need"):
        QuantConfig(bits=4, activations="int8-token")
    w = _w(dtype=torch.float32)
    w[1, 1] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        quantize_weight(w, 4, "channel")
    with pytest.raises(FormatError, match="outside the matrix"):
        select_holdout(w, 0, [(64, 0)])


def test_config_roundtrip_and_version_check():
    qc = QuantConfig(bits=8, block="rows:2", symmetric=True, activations="int8-token", holdout=1e-4)
    d = qc.to_dict()
    assert QuantConfig.from_dict(d).to_dict() == d
    d["format_version"] = "2.0"
    with pytest.raises(FormatError, match="format version 2.0"):
        QuantConfig.from_dict(d)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sidecar_bits_roundtrip(dtype):
    v = float(torch.tensor(-1.9268).to(getattr(torch, dtype)))
    assert float_from_bits_hex(float_bits_hex(v, dtype), dtype) == v


def test_kth_largest_fast_path_is_exact():
    """The sampled pre-filter of a whole matrix's hold-out threshold gives exactly kthvalue's answer, with heavy
    tails, with ties at the threshold, and where the sample misleads (the full search then runs)."""
    from vllm_superweight.quantize import _kth_largest

    g = torch.Generator().manual_seed(0)
    heavy = (torch.randn(1 << 21, generator=g) / (torch.rand(1 << 21, generator=g) + 0.05)).abs()
    ties = torch.randint(0, 50, (1 << 21,), generator=g).float()
    skew = torch.zeros(1 << 21)
    skew[1::61] = 1.0  # every sampled position is large, the rest tiny: the sample over-estimates the rank
    skew[::61] = 0.0
    skew[5] = 2.0
    for a in (heavy, ties, skew):
        for kk in (1, 7, 2097, 50_000):
            want = torch.kthvalue(a, a.numel() - kk + 1).values
            assert _kth_largest(a.unsqueeze(0), kk).item() == want.item()
