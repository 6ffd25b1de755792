"""Fused dynamic int8 activation quantization that leaves a few outlier input channels in 16 bit.

One program per token row. For K <= 16384 the whole row is held in registers (x is read from memory once):
absmax over the non-outlier channels -> scale = absmax / 127 -> q = round_half_even(x * 127 / absmax) with the
outlier channels forced to 0 -> int8 store; the S outlier values are gathered into ``x_out[m, :]`` in x's dtype.
Longer rows are processed in chunks (the second pass re-reads the row from L1/L2, like vLLM's own kernel).

Outlier channels are excluded either with a per-channel int8 mask (``outlier_mask``, one byte per channel, read
from cache: cheapest) or, without a mask, by comparing the channel index with each of the S outlier indices
(S selects per element; fine for the usual S <= 8).

With ``azp=True`` (per token only) the kernel also writes ``azp[m] = -floor(x[m, idx[0]] / scale[m] + 0.5)``
(int32, clamped to +-AZP_MAX): the first outlier channel as an integer on the token's own step, for vLLM's
CUTLASS per-token zero-point epilogue (``cutlass_scaled_mm_azp``), which subtracts ``azp[m] * azp_adj[n]`` from
the int32 accumulator: the outlier's product joins the GEMM's epilogue instead of a side product. Its step is the
rest's (error <= scale / 2, like every other channel, but never clamped at 127), and the token's absmax is raised
to ``|x0| * 127 / AZP_MAX`` when the outlier is more than AZP_MAX / 127 times the rest (also when the rest is 0),
so the int32 epilogue cannot overflow for K <= ``sparse_layout.AZP_K_MAX``.

Per-tensor dynamic scale: pass 1 writes each row's absmax (and x_out), a torch max makes the scale, pass 2
quantizes. Rounding: clamp to [-128, 127] first (this also keeps the compiler from contracting the multiply
into the rounding add), then the float32 round-half-even trick ``(v + 1.5*2^23) - 1.5*2^23``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_layout import AZP_MAX

# rows up to MAX_ONE_CHUNK elements are held in registers (one read of x); longer rows go in CHUNK pieces
# (launcher arguments ``max_one_chunk`` / ``chunk``; kernel_bench's quant section times the chunked variant)
MAX_ONE_CHUNK = 16384
CHUNK = 8192
_MAGIC = 12582912.0  # 1.5 * 2**23
_AZP_STEP = tl.constexpr(127.0 / AZP_MAX)  # exact in float32 (127 * 2**-22)
_AZP_BOUND = tl.constexpr(float(AZP_MAX))


@triton.jit
def _zero_outliers(v, offs, k_ok, idx_ptr, mask_ptr, S, MASK_MODE: tl.constexpr, S_PAD: tl.constexpr):
    if MASK_MODE == 1:
        is_out = tl.load(mask_ptr + offs, mask=k_ok, other=0)  # contiguous int8: vectorized, from L1/L2
        v = tl.where(is_out != 0, 0.0, v)
    elif MASK_MODE == 2:
        for s in tl.static_range(S_PAD):
            i_s = tl.load(idx_ptr + s, mask=s < S, other=-1)
            v = tl.where(offs == i_s, 0.0, v)
    return v


@triton.jit
def _quantize(v, inv):
    q = tl.minimum(tl.maximum(v * inv, -128.0), 127.0)
    q = (q + 12582912.0) - 12582912.0
    return q.to(tl.int8)


@triton.jit
def _azp_store(xrow, idx_ptr, azp_ptr, row, amax):
    """Raise the token's absmax so the first outlier fits in +-AZP_MAX steps, store its integer; return the absmax."""
    x0 = tl.load(xrow + tl.load(idx_ptr)).to(tl.float32)
    amax = tl.maximum(amax, tl.abs(x0) * _AZP_STEP)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
    a = tl.minimum(tl.maximum(tl.floor(x0 * inv + 0.5), -_AZP_BOUND), _AZP_BOUND)
    tl.store(azp_ptr + row, (-a).to(tl.int32))
    return amax


@triton.jit
def _act_quant_split_kernel(
    x_ptr,
    idx_ptr,
    mask_ptr,
    xq_ptr,
    scale_ptr,
    xo_ptr,
    amax_ptr,
    azp_ptr,
    K,
    S,
    stride_xm,
    stride_qm,
    stride_om,
    BK: tl.constexpr,
    S_PAD: tl.constexpr,
    MODE: tl.constexpr,
    MASK_MODE: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    AZP: tl.constexpr = False,
):
    # AZP (MODE 0 only): also write azp[row] = -floor(x[row, idx[0]] * 127 / absmax + 0.5) (module docstring)
    # MODE 0: per-token (absmax + quantize + scale); 1: per-tensor pass 1 (row absmax -> amax_ptr);
    # 2: per-tensor pass 2 (quantize with the global absmax at amax_ptr[0])
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride_xm
    qrow = xq_ptr + row * stride_qm
    if MODE != 2:
        if S_PAD > 0:
            so = tl.arange(0, S_PAD)
            s_ok = so < S
            oi = tl.load(idx_ptr + so, mask=s_ok, other=0)
            xo = tl.load(xrow + oi, mask=s_ok, other=0.0)
            tl.store(xo_ptr + row * stride_om + so, xo, mask=s_ok)
    offs0 = tl.arange(0, BK)
    if ONE_CHUNK:
        k_ok = offs0 < K
        v = tl.load(xrow + offs0, mask=k_ok, other=0.0).to(tl.float32)
        if MASK_MODE != 0:
            v = _zero_outliers(v, offs0, k_ok, idx_ptr, mask_ptr, S, MASK_MODE, S_PAD)
        if MODE == 2:
            amax = tl.load(amax_ptr)
        else:
            amax = tl.max(tl.abs(v), axis=0)
        if MODE == 1:
            tl.store(amax_ptr + row, amax)
        else:
            if AZP:
                amax = _azp_store(xrow, idx_ptr, azp_ptr, row, amax)
            inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
            if MODE == 0:
                tl.store(scale_ptr + row, tl.math.div_rn(amax, 127.0))
            elif row == 0:
                tl.store(scale_ptr, tl.math.div_rn(amax, 127.0))
            tl.store(qrow + offs0, _quantize(v, inv), mask=k_ok)
    else:
        if MODE == 2:
            amax = tl.load(amax_ptr)
        else:
            run = tl.zeros((BK,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                offs = k0 + offs0
                k_ok = offs < K
                v = tl.load(xrow + offs, mask=k_ok, other=0.0).to(tl.float32)
                if MASK_MODE != 0:
                    v = _zero_outliers(v, offs, k_ok, idx_ptr, mask_ptr, S, MASK_MODE, S_PAD)
                run = tl.maximum(run, tl.abs(v))
            amax = tl.max(run, axis=0)
        if MODE == 1:
            tl.store(amax_ptr + row, amax)
        else:
            if AZP:
                amax = _azp_store(xrow, idx_ptr, azp_ptr, row, amax)
            inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
            if MODE == 0:
                tl.store(scale_ptr + row, tl.math.div_rn(amax, 127.0))
            elif row == 0:
                tl.store(scale_ptr, tl.math.div_rn(amax, 127.0))
            for k0 in range(0, K, BK):
                offs = k0 + offs0
                k_ok = offs < K
                v = tl.load(xrow + offs, mask=k_ok, other=0.0).to(tl.float32)
                if MASK_MODE != 0:
                    v = _zero_outliers(v, offs, k_ok, idx_ptr, mask_ptr, S, MASK_MODE, S_PAD)
                tl.store(qrow + offs, _quantize(v, inv), mask=k_ok)


def _launch_cfg(k: int, max_one_chunk: int = MAX_ONE_CHUNK, chunk: int = CHUNK):
    one = k <= max_one_chunk
    bk = triton.next_power_of_2(k) if one else chunk
    bk = max(bk, 128)
    warps = 4 if bk <= 2048 else (8 if bk <= 4096 else 16)
    return one, bk, warps


def int8_quant_outlier_split(
    x: torch.Tensor,
    outlier_idx: torch.Tensor | None,
    per_token: bool = True,
    outlier_mask: torch.Tensor | None = None,
    max_one_chunk: int = MAX_ONE_CHUNK,
    chunk: int = CHUNK,
    azp: bool = False,
):
    """Triton implementation (x [M, K] with unit column stride). See the module docstring. ``azp=True`` (per
    token, at least one outlier channel) returns a fourth tensor, int32 [M]."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be 2-D with unit column stride"
    m, k = x.shape
    s = 0 if outlier_idx is None else int(outlier_idx.numel())
    if azp and (not per_token or not s):
        raise ValueError("azp needs per-token scales and at least one outlier channel")
    dev = x.device
    xq = torch.empty((m, k), dtype=torch.int8, device=dev)
    xo = torch.empty((m, s), dtype=x.dtype, device=dev)
    scales = torch.empty((m, 1) if per_token else (1, 1), dtype=torch.float32, device=dev)
    azp_t = torch.empty((m,), dtype=torch.int32, device=dev) if azp else scales
    if m == 0:
        if not per_token:
            scales.zero_()
        return (xq, scales, xo, azp_t) if azp else (xq, scales, xo)
    idx = outlier_idx if (s and outlier_idx is not None) else xq  # dummy pointer when there are no outliers
    if s and outlier_mask is not None:
        mask_mode, mptr = 1, outlier_mask
    elif s:
        mask_mode, mptr = 2, idx
    else:
        mask_mode, mptr = 0, xq
    s_pad = triton.next_power_of_2(s) if s else 0
    one, bk, warps = _launch_cfg(k, max_one_chunk, chunk)
    common = dict(BK=bk, S_PAD=s_pad, MASK_MODE=mask_mode, ONE_CHUNK=one, num_warps=warps)
    xo_stride = xo.stride(0) if s else 0
    if per_token:
        _act_quant_split_kernel[(m,)](
            x, idx, mptr, xq, scales, xo, scales, azp_t, k, s, x.stride(0), xq.stride(0), xo_stride, MODE=0, AZP=azp,
            **common,
        )  # fmt: skip
        if azp:
            return xq, scales, xo, azp_t
    else:
        amax = torch.empty((m,), dtype=torch.float32, device=dev)
        _act_quant_split_kernel[(m,)](
            x, idx, mptr, xq, scales, xo, amax, xq, k, s, x.stride(0), xq.stride(0), xo_stride, MODE=1, **common
        )
        gmax = amax.amax().reshape(1)  # pass 2's program 0 writes scales = gmax / 127 (IEEE division)
        _act_quant_split_kernel[(m,)](
            x, idx, mptr, xq, scales, xo, gmax, xq, k, s, x.stride(0), xq.stride(0), xo_stride, MODE=2, **common
        )
    return xq, scales, xo
