"""W8A8 GEMM for small batches (up to 32 tokens; 64 in layers with outlier channels, session 43) with the 16-bit
outlier channels in its epilogue (Triton, CUDA).

    y[m, n] = sa[m] * sb[n] * sum_k xq[m, k] * w[n, k]  +  sum_s x_out[m, s] * w_out[s, n]  (+ bias[n])

``xq`` int8 [M, K] (the activation split: outlier channels 0), ``w`` int8 [N, K] row-major (the checkpoint's
layout; read once per M tile), ``sa`` float32 per token [M] (or one per-tensor scale), ``sb`` float32 [N],
``x_out`` [M, S] the outlier channels in 16 bit, ``w_out`` [S, N] their 16-bit weight columns. The int8 products
accumulate exactly in int32 (tensor cores, ``tl.dot``); the epilogue works in float32 and rounds once into y's
dtype. So every outlier channel rides the GEMM itself: no zero-point epilogue (vLLM's ``cutlass_scaled_mm_azp``
costs ~9 % over the plain ``cutlass_scaled_mm`` on an H200, session 13) and no side product.

Why a kernel of our own for small M: decode batches read the whole weight for a handful of tokens, so the GEMM is
a weight stream. One program owns ``BN`` output rows (``BN * K`` weight bytes, contiguous rows) and all of an M
tile; ``num_stages`` keeps several ``[BN, BK]`` tiles in flight per program. M is padded to the tensor-core tile
(16) inside the kernel (masked loads), which costs compute, not bandwidth.

Launch configurations (``Int8MMConfig``) are per M bucket; ``SUPERWEIGHT_W8A8_TRITON`` (``envs``) sets the
largest M routed here and may override the configuration (``kernel_bench.py --sections w8`` sweeps them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Int8MMConfig:
    bn: int = 32  # output rows per program
    bk: int = 256  # K elements per step (multiple of 32)
    warps: int = 4
    stages: int = 4
    swap: int = 0  # 1: the weight tile is the MMA's M side ([BN, BK] x [BK, tokens]; wgmma from BN = 64 on sm_90)
    bm: int = 0  # tokens per program (a power of two >= 16); 0: by M (``_bm``: 16 / 32 / 64)
    tma: int = 0  # 1: both tiles through Hopper's tensor memory accelerator (host-side descriptors), sm_90+
    ws: int = 0  # 1 (with tma): warp-specialized main loop (a producer warp issues the copies), sm_90+

    def key(self) -> str:
        tail = (",swap=1" if self.swap else "") + (f",bm={self.bm}" if self.bm else "") + (",tma=1" if self.tma else "")
        tail += ",ws=1" if self.ws else ""
        return f"bn={self.bn},bk={self.bk},warps={self.warps},stages={self.stages}{tail}"


# what ``kernel_bench.py --sections w8`` sweeps (each fits sm_90's shared memory at the largest M tile, 64)
SWEEP = (
    Int8MMConfig(16, 256, 4, 4),
    Int8MMConfig(16, 512, 4, 4),
    Int8MMConfig(16, 256, 2, 6),
    Int8MMConfig(16, 128, 4, 6),
    Int8MMConfig(32, 256, 4, 4),
    Int8MMConfig(32, 512, 4, 3),
    Int8MMConfig(32, 128, 4, 6),
    Int8MMConfig(32, 128, 4, 4),
    Int8MMConfig(32, 64, 4, 8),
    Int8MMConfig(32, 256, 8, 4),
    Int8MMConfig(64, 128, 4, 4),
    Int8MMConfig(64, 256, 4, 3),
    # swapped operands (session 13, not yet measured): fewer reloads of the x tile per weight byte at M = 32-64
    Int8MMConfig(64, 128, 4, 4, swap=1),
    Int8MMConfig(64, 256, 4, 3, swap=1),
    Int8MMConfig(128, 128, 4, 4, swap=1),
    Int8MMConfig(128, 128, 8, 3, swap=1),
)

# what ``kernel_bench.py --sections w8big`` sweeps at 33-512 tokens (session 43): the weight tile on the MMA's M
# side (wgmma), 64-128 rows a program so the x tile is re-read from L2 once per 64-128 weight rows rather than per
# 32 (at 64 tokens the BN = 32 tiles read x twice as many bytes as the weights), and up to 256 tokens a program so
# the weights stream from HBM once per batch (each fits sm_90's shared memory)
SWEEP_BIG = (
    Int8MMConfig(32, 128, 4, 6),  # session 13's default above 32 tokens (the control)
    Int8MMConfig(64, 128, 4, 4, swap=1),
    Int8MMConfig(64, 256, 4, 3, swap=1),
    Int8MMConfig(64, 128, 4, 5, swap=1),
    Int8MMConfig(128, 128, 4, 4, swap=1),
    Int8MMConfig(128, 128, 8, 3, swap=1),
    Int8MMConfig(128, 128, 8, 4, swap=1),
    Int8MMConfig(64, 128, 4, 4, swap=1, bm=128),
    Int8MMConfig(64, 128, 8, 4, swap=1, bm=128),
    Int8MMConfig(128, 128, 8, 3, swap=1, bm=128),
    Int8MMConfig(64, 128, 8, 3, swap=1, bm=256),
    Int8MMConfig(64, 64, 8, 5, swap=1, bm=256),
    # the same tiles through TMA (one descriptor copy per tile instead of 16-byte copies by every thread)
    Int8MMConfig(64, 128, 4, 4, swap=1, tma=1),
    Int8MMConfig(128, 128, 4, 4, swap=1, tma=1),
    Int8MMConfig(128, 128, 8, 4, swap=1, tma=1),
    Int8MMConfig(64, 128, 8, 4, swap=1, bm=128, tma=1),
    Int8MMConfig(64, 128, 8, 3, swap=1, bm=256, tma=1),
    # warp-specialized main loop (not yet timed, session 43): copies issued by a producer warp, the MMA warps only wait
    Int8MMConfig(64, 128, 4, 4, swap=1, tma=1, ws=1),
    Int8MMConfig(128, 128, 8, 4, swap=1, tma=1, ws=1),
    Int8MMConfig(64, 128, 8, 4, swap=1, bm=128, tma=1, ws=1),
)


def default_config(m: int, n: int, k: int) -> Int8MMConfig:
    """The best of ``SWEEP`` per M bucket on an H200 (Llama-2-7B layer, one outlier channel per matrix, session 13,
    ``benchmarks/results/kernel_bench_w8_triton_s13_h200.json``): 32 rows x 256 (M <= 16: 79-83 us per layer vs
    SmoothQuant's 84-86), 32 x 512 at 3 stages (M <= 32: 88 vs 87); above 32 tokens 64 weight rows a program on
    the MMA's M side (``SWEEP_BIG`` on an H100, q/k/v + gate/up, session 43,
    ``benchmarks/results/kernel_bench_w8big_s43_h100.json``: 65.3 / 66.2 / 65.5 us at 33 / 48 / 64 tokens, within
    0.7 us of each M's best, vs 65.7-67.2 for session 13's 32 x 128 tiles and 86.1 vs 71.6 at 96)."""
    if m <= 16:
        return Int8MMConfig(32, 256, 4, 4)
    if m <= 32:
        return Int8MMConfig(32, 512, 4, 3)
    return Int8MMConfig(64, 128, 4, 4, swap=1)


def config_for(m: int, n: int, k: int, table: dict[int, dict[str, int]] | None = None) -> Int8MMConfig:
    """The configuration of a batch of ``m`` tokens: the smallest bucket of ``table`` (``envs.w8a8_triton``) at
    or above ``m`` over ``default_config``'s fields; ``default_config`` where no bucket covers ``m``."""
    base = default_config(m, n, k)
    for bucket in sorted(table or {}):
        if m <= bucket:
            return Int8MMConfig(**{**base.__dict__, **(table or {})[bucket]})
    return base


@triton.jit
def _int8_mm_kernel(
    xq_ptr,
    w_ptr,
    sa_ptr,
    sb_ptr,
    xo_ptr,
    wo_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_won,
    stride_ym,
    stride_sa,
    S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SWAP: tl.constexpr = False,
    x_desc=None,
    w_desc=None,
    TMA: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    # M tiles vary fastest: the programs that share a weight tile run side by side (one HBM read, the rest L2)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    xp = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    wp = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    if SWAP:
        acc_t = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc_t = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in tl.range(0, K, BK, warp_specialize=WS):
        if TMA:  # out-of-range rows / K are zero-filled by the copy engine
            a = x_desc.load([pid_m * BM, k0])
            b = w_desc.load([pid_n * BN, k0])
        elif EVEN_K:
            a = tl.load(xp, mask=m_ok[:, None], other=0)
            b = tl.load(wp, mask=n_ok[:, None], other=0)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(xp, mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(wp, mask=n_ok[:, None] & k_ok[None, :], other=0)
        if SWAP:
            acc_t = tl.dot(b, tl.trans(a), acc_t, out_dtype=tl.int32)
        else:
            acc_t = tl.dot(a, tl.trans(b), acc_t, out_dtype=tl.int32)
        xp += BK
        wp += BK
    if SWAP:
        acc = tl.trans(acc_t)
    else:
        acc = acc_t
    sa = tl.load(sa_ptr + rm * stride_sa, mask=m_ok, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    for s in tl.static_range(S):
        xo = tl.load(xo_ptr + rm * stride_om + s, mask=m_ok, other=0.0).to(tl.float32)
        wo = tl.load(wo_ptr + s * stride_won + rn, mask=n_ok, other=0.0).to(tl.float32)
        out += xo[:, None] * wo[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _bm(m: int, cfg: Int8MMConfig | None = None) -> int:
    if cfg is not None and cfg.bm:
        return cfg.bm
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def int8_mm_outliers(
    xq: torch.Tensor,
    w: torch.Tensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    x_out: torch.Tensor | None,
    w_out: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: Int8MMConfig | None = None,
) -> torch.Tensor:
    """See the module docstring. ``xq`` [M, K] int8 (unit column stride), ``w`` [N, K] int8 (unit column stride),
    ``sa`` float32 with M or 1 elements, ``sb`` float32 with N elements, ``x_out`` [M, S] / ``w_out`` [S, N] (S may
    be 0 or both None), ``bias`` [N] or None. Returns y [M, N] in ``out_dtype``."""
    m, k = xq.shape
    n, k2 = w.shape
    if k2 != k or xq.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"int8_mm_outliers: xq {tuple(xq.shape)} / w {tuple(w.shape)} need the same K, unit stride")
    s = 0 if x_out is None else int(x_out.shape[1])
    # a single outlier column's stride is never read (torch's contiguity ignores size-1 dims: a [M, 1] slice of a
    # transposed tensor keeps stride M there, and .contiguous() returns it unchanged -- H100 s50, under a cond)
    if s and (x_out is None or w_out is None or (s > 1 and x_out.stride(1) != 1) or w_out.stride(1) != 1):
        raise ValueError("int8_mm_outliers: x_out [M, S] and w_out [S, N] need unit column stride")
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    cfg = config or default_config(m, n, k)
    bm = _bm(m, cfg)
    sa = sa.reshape(-1)
    sb = sb.reshape(-1)
    xo = x_out if (s and x_out is not None) else y  # dummy pointers when unused
    wo = w_out if (s and w_out is not None) else y
    grid = (triton.cdiv(m, bm), triton.cdiv(n, cfg.bn))
    descs = _tma_descriptors(xq, w, bm, cfg)
    _int8_mm_kernel[grid](
        xq, w, sa, sb, xo, wo, bias if bias is not None else y, y,
        m, n, k,
        xq.stride(0), w.stride(0), xo.stride(0), wo.stride(0), y.stride(0),
        1 if sa.numel() > 1 else 0,
        S=s, HAS_BIAS=bias is not None, EVEN_K=k % cfg.bk == 0, BM=bm, BN=cfg.bn, BK=cfg.bk, SWAP=bool(cfg.swap),
        x_desc=descs[0], w_desc=descs[1], TMA=descs[0] is not None, WS=descs[0] is not None and bool(cfg.ws),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return y


@functools.cache
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _tma_descriptors(xq: torch.Tensor, w: torch.Tensor, bm: int, cfg: Int8MMConfig) -> tuple:
    """Host-side TMA descriptors of the x and weight tiles where ``cfg.tma`` asks for them and the copy engine can
    take both tensors (16-byte aligned bases and row strides, sm_90+ or the interpreter); (None, None) otherwise:
    the pointer path, which takes every tensor."""
    if not cfg.tma:
        return None, None
    if xq.is_cuda and _capability_major(xq.device.index) < 9:
        return None, None
    if any(t.data_ptr() % 16 or t.stride(0) % 16 for t in (xq, w)):
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(xq, [bm, cfg.bk]), TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk])


def compile_sm90(m: int = 1, config: Int8MMConfig | None = None, s: int = 1, bias: bool = False, even_k: bool = True):
    """Compile ``_int8_mm_kernel`` for sm_90 (no GPU) with a launch's constexprs; ``triton_w4.sm90_report``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_w4 import sm90_report

    cfg = config or default_config(m, 4096, 4096)
    sig = {"xq_ptr": "*i8", "w_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "xo_ptr": "*bf16"}
    sig.update({"wo_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16"})
    sig.update({k: "i32" for k in ("M", "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_won")})
    sig.update({k: "i32" for k in ("stride_ym", "stride_sa")})
    bm = _bm(m, cfg)
    consts: dict[str, object] = dict(S=s, HAS_BIAS=bias, EVEN_K=even_k, BM=bm, BN=cfg.bn, BK=cfg.bk)
    consts.update(SWAP=bool(cfg.swap), TMA=bool(cfg.tma), WS=bool(cfg.tma and cfg.ws))
    if cfg.tma:
        sig.update({"x_desc": f"tensordesc<i8[{bm}, {cfg.bk}]>", "w_desc": f"tensordesc<i8[{cfg.bn}, {cfg.bk}]>"})
    else:
        consts.update(x_desc=None, w_desc=None)
    sig.update({k: "constexpr" for k in consts})
    div16 = list(range(8)) + [9, 10, 11, 12, 14]  # pointers; N, K and the weight / x / y strides of a 7B launch
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    kern = triton.compile(
        ASTSource(_int8_mm_kernel, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg.warps, "num_stages": cfg.stages},
    )
    return sm90_report(kern, keep_asm=True)
