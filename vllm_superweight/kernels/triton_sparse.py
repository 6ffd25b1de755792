"""Triton kernels of the sparse correction ``y[:, r] += v * x[:, c]`` over the SELL + heavy-CSR layout.

One launch (two on the large-M path). Grid = (light slices + heavy rows, M blocks); program ``p``:

* ``p < n_slices`` (light): owns the C consecutive rows of one row block. Unrolled form (the default since
  session 12, ``SparseTiles.unroll``): one straight-line pass over the slice depth L, per slot a [C] load of the
  slot words (coalesced: slot-major, lane-minor) and a [BM, C] gather of ``x[m, col]``, products summed in fp32
  registers -- every load independent, no reduction across threads. Looped form: [BJ, C] slot tiles and
  [BM, BJ, C] gathers, reduced over BJ per step, until L is covered. Then ``y[m-block, rows] = round(y + acc)``
  (one rounding; the y load is issued before the loop so its latency hides behind the gathers).
* ``p >= n_slices`` (heavy): one long row; [BM, BE] tiles of its CSR entries, reduced to one value per token.

No two programs write the same element of y: no atomics, deterministic, exact fp32 sums.

Large M (prefill): gathering ``x[m, col]`` token by token touches one 32-byte sector per element. When M is
large and the entries reuse columns (``nnz >= 2 * distinct columns``), a first kernel writes
``xt[c, m] = x[m, c]`` for the distinct columns only, and the main kernel reads ``xt`` with swapped strides:
the BM tokens of one entry are then contiguous (128 B for BM = 64). The grid's fast axis is the slice, so all
slices of one M block run together and the [K, BM] panel of xt stays in L2. In the unrolled form xt's rows are
padded to whole BM blocks (the padding is never written, and the token rows it feeds are never stored), so the
gathers carry no token mask and load 16-byte vectors.

Optional programmatic dependent launch (``pdl=True``, Hopper+, direct path only): the kernel is launched with
the PDL attribute and waits (``griddepcontrol.wait``) only before it touches ``y``; the metadata loads and the x
gathers (x was complete before the GEMM started) overlap the GEMM's tail and the launch latency. The transposed
path reads ``xt``, written by the kernel just before it, so it is launched without PDL.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .. import envs
from .sparse_layout import PACK_DTYPES, interpreting, marker_dtype

try:  # Hopper grid-dependency control (absent from the interpreter)
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except Exception:  # pragma: no cover
    _gdc_wait = None


@dataclasses.dataclass(frozen=True)
class SparseTiles:
    """Launch parameters of the sparse correction. Defaults: the unrolled form with 16 tokens per program on the
    transposed path, the fastest of ``w4_fused_bench.py --sections unroll`` on the H200 (session 12; after Marlin,
    7B layer, us: M = 8 85.9 vs 98.4 for the looped form, 24 114.4 vs 233.2, 64 176.2 vs 196.9, M = 1 78.2 vs
    79.8); ``bm_direct`` from the H200 onecopy sweep of session 9 (2 tokens per program); ``tile_elems`` and
    ``transpose_min_m`` from kernel_bench.py's H100 ``sparsesweep`` (the looped form's gather tile)."""

    tile_elems: int = 4096  # elements of the gather tile per iteration (looped form)
    transpose_min_m: int = 16  # smallest M for the transposed path
    bm_transposed: int = 16  # tokens per program, transposed path
    bm_direct: int = 2  # tokens per program, direct path
    unroll: int = 1  # 1: light slices as ONE unrolled pass over the slice depth, no cross-slot reductions
    warps: int = 0  # warps per program on the direct path; 0: from the tile (<= 8 values a thread)
    # warps per program on the transposed path (0: from the tile, 2 for 16 tokens x 32 lanes). 4: sparse_bench.py,
    # H200 session 27, 7B qkv with the default preset's q/k/v hold-out (0.40 %), after Marlin, us per layer: M = 16
    # 25.5 vs 27.1, 32 31.2 vs 33.2, 48 37.8 vs 40.0, 64 45.2 vs 49.0 (the correction's own part at 64: 14.5 vs 18.3)
    warps_t: int = 4


DEFAULT_TILES = SparseTiles()
MAX_UNROLL = 64  # deepest slice the unrolled form takes (deeper: the looped form)


def env_tiles(m: int = 0) -> SparseTiles:
    """``DEFAULT_TILES`` with the overrides ``SUPERWEIGHT_SPARSE_TILES`` gives a batch of ``m`` tokens (parsed once
    per value)."""
    over = envs.sparse_tiles(m)
    return _tiles_with(tuple(sorted(over.items()))) if over else DEFAULT_TILES


@functools.lru_cache(maxsize=64)
def _tiles_with(over: tuple) -> SparseTiles:
    return dataclasses.replace(DEFAULT_TILES, **dict(over))


@triton.jit
def _unpack(w, PACK: tl.constexpr):
    """(column, value fp32, used) of packed slots (``PACK`` 1: bf16 values, 2: fp16; 0 = empty slot)."""
    col = w & 0xFFFF
    if PACK == 1:
        val = (w & -65536).to(tl.float32, bitcast=True)
    else:
        val = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return col, val, w != 0


@triton.jit(do_not_specialize=["M", "L", "n_slices"])
def _sell_spmm_kernel(
    y_ptr,
    x_ptr,
    ecols_ptr,
    evals_ptr,
    erb_ptr,
    hrows_ptr,
    hptr_ptr,
    hcols_ptr,
    hvals_ptr,
    M,
    N,
    L,
    n_slices,
    stride_ym,
    stride_xm,
    stride_xk,
    C: tl.constexpr,
    BM: tl.constexpr,
    BJ: tl.constexpr,
    BE: tl.constexpr,
    PDL: tl.constexpr,
    PACK: tl.constexpr = 0,
    UNROLL: tl.constexpr = 0,
    EVEN_M: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pm = tl.program_id(1)
    offs_m = pm * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    m64 = offs_m.to(tl.int64)
    if pid < n_slices:
        lanes = tl.arange(0, C)
        rb = tl.load(erb_ptr + pid)
        rows = rb * C + lanes
        base = pid.to(tl.int64) * L * C
        # a lane holds entries iff its first slot is used (slots fill from 0)
        c0 = tl.load(ecols_ptr + base + lanes)
        if PACK:
            used0 = c0 != 0
        else:
            used0 = c0 >= 0
        w_ok = m_ok[:, None] & (used0 & (rows < N))[None, :]
        y_ptrs = y_ptr + m64[:, None] * stride_ym + rows[None, :]
        if not PDL:
            y_old = tl.load(y_ptrs, mask=w_ok, other=0.0)
        acc = tl.zeros((BM, C), dtype=tl.float32)
        if UNROLL > 0:
            # the whole depth (UNROLL == L) as one straight-line pass: [BM, C] per slot, every slot's load and
            # gather independent of the others (all can be in flight), products summed in registers -- no
            # reduction across threads per step (the looped form reduces its [BM, BJ, C] tile over BJ each step)
            for j in tl.static_range(UNROLL):
                e_off = base + j * C + lanes
                if PACK:
                    pw = tl.load(ecols_ptr + e_off)
                    cc, vv, used = _unpack(pw, PACK)
                else:
                    cc = tl.load(ecols_ptr + e_off)
                    vv = tl.load(evals_ptr + e_off)
                    used = cc >= 0
                x_ptrs = x_ptr + m64[:, None] * stride_xm + cc.to(tl.int64)[None, :] * stride_xk
                if EVEN_M:  # x rows padded to the M blocks: a mask constant along m (vector loads)
                    xg = tl.load(x_ptrs, mask=used[None, :], other=0.0)
                else:
                    xg = tl.load(x_ptrs, mask=m_ok[:, None] & used[None, :], other=0.0)
                acc += xg.to(tl.float32) * vv[None, :]
        else:
            jr = tl.arange(0, BJ)
            for j0 in range(0, L, BJ):
                jj = j0 + jr
                e_off = base + jj[:, None] * C + lanes[None, :]
                e_ok = (jj < L)[:, None]
                if PACK:
                    pw = tl.load(ecols_ptr + e_off, mask=e_ok, other=0)
                    cc, vv, used = _unpack(pw, PACK)
                else:
                    cc = tl.load(ecols_ptr + e_off, mask=e_ok, other=-1)
                    vv = tl.load(evals_ptr + e_off, mask=e_ok, other=0.0)
                    used = cc >= 0
                x_ptrs = x_ptr + m64[:, None, None] * stride_xm + cc.to(tl.int64)[None, :, :] * stride_xk
                if EVEN_M:
                    xg = tl.load(x_ptrs, mask=used[None, :, :], other=0.0)
                else:
                    xg = tl.load(x_ptrs, mask=m_ok[:, None, None] & used[None, :, :], other=0.0)
                acc += tl.sum(xg.to(tl.float32) * vv[None, :, :], axis=1)
        if PDL:
            _gdc_wait()
            y_old = tl.load(y_ptrs, mask=w_ok, other=0.0)
        tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=w_ok)
    else:
        h = pid - n_slices
        h_row = tl.load(hrows_ptr + h)
        h_lo = tl.load(hptr_ptr + h)
        h_hi = tl.load(hptr_ptr + h + 1)
        h_yp = y_ptr + m64 * stride_ym + h_row
        if not PDL:
            h_old = tl.load(h_yp, mask=m_ok, other=0.0)
        h_acc = tl.zeros((BM, BE), dtype=tl.float32)
        h_er = tl.arange(0, BE)
        for e0 in range(h_lo, h_hi, BE):
            h_ee = e0 + h_er
            h_eok = h_ee < h_hi
            if PACK:
                h_pw = tl.load(hcols_ptr + h_ee, mask=h_eok, other=0)
                h_cc, h_vv, _ = _unpack(h_pw, PACK)
            else:
                h_cc = tl.load(hcols_ptr + h_ee, mask=h_eok, other=0)
                h_vv = tl.load(hvals_ptr + h_ee, mask=h_eok, other=0.0)
            h_xp = x_ptr + m64[:, None] * stride_xm + h_cc.to(tl.int64)[None, :] * stride_xk
            if EVEN_M:
                h_xg = tl.load(h_xp, mask=h_eok[None, :], other=0.0)
            else:
                h_xg = tl.load(h_xp, mask=m_ok[:, None] & h_eok[None, :], other=0.0)
            h_acc += h_xg.to(tl.float32) * h_vv[None, :]
        h_tot = tl.sum(h_acc, axis=1)
        if PDL:
            _gdc_wait()
            h_old = tl.load(h_yp, mask=m_ok, other=0.0)
        tl.store(h_yp, (h_old.to(tl.float32) + h_tot).to(y_ptr.dtype.element_ty), mask=m_ok)


@triton.jit(do_not_specialize=["M", "U"])
def _gather_transpose_kernel(
    x_ptr, ucols_ptr, xt_ptr, M, U, stride_xm, stride_xk, stride_t, BU: tl.constexpr, BMT: tl.constexpr
):
    """xt[c, m] = x[m, c] for the distinct columns c = ucols[u] (rows of xt not in ucols stay unwritten; row
    stride ``stride_t`` >= M: the columns m >= M of a padded xt stay unwritten too)."""
    pu = tl.program_id(0)
    pm = tl.program_id(1)
    u = pu * BU + tl.arange(0, BU)
    u_ok = u < U
    c = tl.load(ucols_ptr + u, mask=u_ok, other=0).to(tl.int64)
    m = pm * BMT + tl.arange(0, BMT)
    m_ok = m < M
    ok = m_ok[:, None] & u_ok[None, :]
    v = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + c[None, :] * stride_xk, mask=ok)
    tl.store(xt_ptr + c[None, :] * stride_t + m[:, None], v, mask=ok)


def plan(m: int, k: int, sp_shapes: dict, nnz: int, tiles: SparseTiles = DEFAULT_TILES) -> dict:
    """Launch plan from shapes only (host ints; no device reads). Exposed for tests and benchmarks.

    The transposed path is taken for M >= ``tiles.transpose_min_m`` when the entries reuse columns (nnz >= 2 x
    distinct columns):
    then one coalesced transpose of those columns replaces M-times-scattered gathers.
    """
    s, depth, lanes = sp_shapes["ell_cols"]
    h = sp_shapes["hrows"][0]
    u = sp_shapes["ucols"][0]
    transposed = m >= tiles.transpose_min_m and u > 0 and nnz >= 2 * u
    return _blocks(m, s, depth, lanes, h, transposed, tiles)


def _blocks(m, s, depth, lanes, h, transposed, tiles: SparseTiles = DEFAULT_TILES):
    bm = min(tiles.bm_transposed if transposed else tiles.bm_direct, triton.next_power_of_2(m))
    bj = max(1, min(triton.next_power_of_2(max(depth, 1)), tiles.tile_elems // (bm * lanes)))
    be = max(16, min(1024, tiles.tile_elems // bm))
    tile = max(bm * bj * lanes, bm * be)
    warps = 4 if tile <= 2048 else 8
    unroll = depth if (tiles.unroll and 0 < depth <= MAX_UNROLL) else 0
    if unroll:  # a [BM, C] tile per slot, <= 8 values a thread; heavy rows in [BM, BE] tiles of the same size
        warps = max(1, min(8, bm * lanes // 256))
        be = max(16, min(1024, warps * 256 // bm))
    w = tiles.warps_t if transposed else tiles.warps
    if w:  # an explicit warp count (the heavy rows' tile keeps its size)
        warps = w
    # slices of depth 0 (every entry in a heavy row; only with an explicit depth=0, choose_depth never picks it: dense
    # packed slices then have no slots) get no programs: a light program reads its slice's first slot unconditionally
    s_run = s if depth else 0
    return {
        "transposed": transposed,
        "BM": bm,
        "BJ": bj,
        "BE": be,
        "num_warps": warps,
        "grid": (s_run + h, triton.cdiv(m, bm)),
        "n_slices": s_run,
        "depth": depth,
        "lanes": lanes,
        "heavy": h,
        "unroll": unroll,
    }


@functools.cache
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_allowed(pdl: bool, transposed: bool, y: torch.Tensor) -> bool:
    """Whether the main kernel may be launched with PDL. Never on the transposed path: there the kernel right
    before it in the stream is the gather-transpose that writes ``xt``, and the main kernel reads its x operand
    before ``griddepcontrol.wait`` - a read of ``xt`` racing its writer (the H200 GPU test
    ``test_pdl_after_gemm_in_cuda_graph`` saw different sums at M = 64)."""
    if not pdl or transposed or interpreting() or _gdc_wait is None or not y.is_cuda:
        return False
    return _major(y.device.index if y.device.index is not None else 0) >= 9


def sparse_correction_(
    y: torch.Tensor,
    x: torch.Tensor,
    ell_cols: torch.Tensor,
    ell_vals: torch.Tensor,
    ell_rb: torch.Tensor,
    hrows: torch.Tensor,
    hptr: torch.Tensor,
    hcols: torch.Tensor,
    hvals: torch.Tensor,
    ucols: torch.Tensor,
    nnz: int | None = None,
    force_path: str | None = None,
    pdl: bool = False,
    tiles: SparseTiles | None = None,
) -> None:
    """In-place ``y += S x^T`` (y [M, N] with unit column stride, x [M, K]). ``nnz`` = number of entries
    (default: the padded slot count, an over-estimate). ``tiles``: default ``DEFAULT_TILES`` with the overrides
    ``SUPERWEIGHT_SPARSE_TILES`` gives M tokens."""
    m, k = x.shape
    if tiles is None:
        tiles = env_tiles(m)
    n = y.shape[1]
    if nnz is None:
        nnz = ell_cols.numel() + hcols.numel()
    s, depth, lanes = ell_cols.shape
    h = hrows.shape[0]
    if m == 0 or s + h == 0:
        return
    if force_path is None:
        p = plan(m, k, {"ell_cols": (s, depth, lanes), "hrows": (h,), "ucols": (ucols.shape[0],)}, nnz, tiles)
    else:
        p = _blocks(m, s, depth, lanes, h, force_path == "transposed" and ucols.numel() > 0, tiles)
    if p["grid"][0] == 0:
        return
    assert y.stride(1) == 1, "y must have unit column stride"
    use_pdl = pdl_allowed(pdl, p["transposed"], y)
    # packed slots (one int32: value bits << 16 | column): ell_vals / hvals are empty markers of the value dtype
    pk = marker_dtype(ell_vals)
    pack = 0 if pk is None else PACK_DTYPES.index(pk) + 1  # the kernel's PACK: 1 bf16, 2 fp16
    # dummy (never dereferenced) pointers for empty parts
    ec, ev, erb = (ell_cols, ell_vals, ell_rb) if ell_cols.numel() else (hcols, hvals, hrows)
    hr, hp, hc, hv = (hrows, hptr, hcols, hvals) if hrows.numel() else (ell_rb, ell_rb, ell_cols, ell_vals)
    if pack:  # the empty value markers are never read
        ev, hv = ec, hc
    even_m = False
    if p["transposed"]:
        # unrolled form: xt's rows padded to whole M blocks (the padding is never written; the rows it feeds are
        # never stored), so the gathers need no token mask and load 16-byte vectors
        even_m = bool(p["unroll"])
        mp = triton.cdiv(m, p["BM"]) * p["BM"] if even_m else m
        xt = torch.empty((k, mp), dtype=x.dtype, device=x.device)
        u = ucols.numel()
        _gather_transpose_kernel[(triton.cdiv(u, 64), triton.cdiv(m, 64))](
            x, ucols, xt, m, u, x.stride(0), x.stride(1), mp, BU=64, BMT=64, num_warps=4
        )
        xs, sxm, sxk = xt, 1, mp
    else:
        xs, sxm, sxk = x, x.stride(0), x.stride(1)
    kw = {"num_warps": p["num_warps"]}
    if use_pdl:
        kw["launch_pdl"] = True
    _sell_spmm_kernel[p["grid"]](
        y,
        xs,
        ec,
        ev,
        erb,
        hr,
        hp,
        hc,
        hv,
        m,
        n,
        p["depth"],
        p["n_slices"],
        y.stride(0),
        sxm,
        sxk,
        C=p["lanes"],
        BM=p["BM"],
        BJ=p["BJ"],
        BE=p["BE"],
        PDL=use_pdl,
        PACK=pack,
        UNROLL=p["unroll"],
        EVEN_M=even_m,
        **kw,
    )
