"""Dequantize a W4 layer straight from the layout vLLM's Marlin kernel holds: one stored copy of the weights.

The Marlin + dequantize pair (``MarlinDequantKernel``) serves small batches with Marlin and large ones by writing
the served weight (W4 dequantized, held-out values restored) into a shared scratch, then one cuBLAS GEMM. Its first
form read a second copy of the W4 weights in ``triton_w4``'s layout. This module reads Marlin's own tensors instead
(after ``gptq_marlin_repack`` / ``marlin_permute_scales`` / ``marlin_zero_points``), so the layer keeps ONE copy
of the W4 weights (+ ~4 bytes per held-out entry for the restore index).

    lay = marlin_deq_layout(rows, cols, vals, n, k, group, sym, act, device)       # load time (index only)
    wT  = dequant_marlin_into(qm, scale, zero, lay, out)                           # [K, N], act dtype
    y   = marlin_deq_mm(x, qm, scale, zero, lay, bias)                             # large M: x [M, K] -> [M, N]
    index_correction_(y_marlin, x, lay)                                            # small M, K > 65536 only

(Small batches normally get the packed SELL correction after Marlin, ``sparse_layout.build_sell(pack=...)``; see
``kernels.linear.weight_only.MarlinDequantOneCopyKernel``.) The index of the held-out entries
(``triton_w4.sparse_index``: 4 bytes an entry, sorted by K block and 16-row slice) can serve both paths: restored
into the dequantized weights, or added to Marlin's output by
``index_correction_`` (fp32 accumulation through a one-hot MMA, one rounding into y).

Marlin's layout (facts read from vLLM 0.26's python reference ``marlin_utils_test.marlin_weights`` /
``get_weight_perm`` and ``marlin_utils.marlin_permute_scales`` / ``marlin_zero_points``; vLLM's own repack test
asserts the CUDA repack equals that reference), over the padded shape ``Np x Kp`` (``marlin_padded_nk``):

* ``qm`` int32 ``[Kp/16, 2 Np]``: row ``r`` holds k = 16 r .. 16 r + 15; each 64 output columns own 128
  consecutive words. Inverting the tile permutation, weight ``(k, n)`` (kl = k mod 16) is nibble
  ``2 ((n mod 16) div 8) + (kl div 8) + 4 (kl mod 2)`` of word
  ``128 (n div 64) + 16 (n mod 8) + 4 ((kl mod 8) div 2) + (n mod 64) div 16`` of row ``k div 16``.
* ``scale`` ``[Gp, Np]`` (act dtype), columns permuted in blocks of 64 (grouped: Marlin's ``scale_perm``) -- n at
  ``64 (n div 64) + 8 (n mod 8) + (n mod 64) div 8`` -- or, channel-wise / one group, in blocks of 32
  (``scale_perm_single``) -- n at ``32 (n div 32) + 8 ((n mod 32) div 2 mod 4) + 2 ((n mod 32) div 8) + n mod 2``.
* ``zero`` int32 ``[Gp, Np/8]`` (asymmetric): the ``scale_perm`` position p of n, then interleaved in groups of 8
  (``[0, 2, 4, 6, 1, 3, 5, 7]``): nibble ``p' mod 8`` of word ``p' div 8``, p' = 8 (p div 8) + (p mod 8) div 2 +
  4 (p mod 2). Symmetric (``uint4b8``): zero point 8.

The value is ``(code - zero) * scale`` in fp32 rounded once to the act dtype (as ``triton_w4.dequant_into`` and
Marlin / Machete do), then every held-out entry's exact value is written over its position (its code dequantizes to
exactly 0). GPU status (H200): GPU-tested against vLLM's CUDA repack (bitwise equal to dequantizing our own
layout). Session 8's plane forms took 254 us per 7B layer (our own layout: 148) -- Triton reorders the values between
the load's and the store's register layouts through shared memory; the flat form of session 9 keeps one 1-D layout
from the loaded word to the stores (no shared memory): 164-170 us, the only form kept.
The small batches of the one-copy pair (``MarlinDequantOneCopyKernel``, the default for held-out checkpoints)
use the packed SELL correction; ``index_correction_`` (79 vs 102 us per layer at M = 1) stays for K > 65536.
"""

from __future__ import annotations

import torch

from .. import envs
from . import triton_w4 as _w4
from .cuda_marlin_gemv import LAYOUT_HUMMING, LAYOUT_HUMMING_SM90, LAYOUT_MARLIN
from .sparse_layout import interpreting
from .triton_w4 import SP_BLOCK, TRITON_OK, _cdiv, _deq_scratch, need_deq_scratch, sparse_index

# ------------------------------------------------------------------------------------------------------------
# the inverse mapping (host / reference); the kernel computes the same expressions
# ------------------------------------------------------------------------------------------------------------
# the tensors read: ``cuda_marlin_gemv.LAYOUT_*`` (Marlin's repack; Humming's for sm_90: each nibble's index bits
# 0 and 1 swapped, zero points not interleaved; Humming's for other GPUs: zero points not interleaved); Humming's
# scales are Marlin's grouped permutation whatever the group count (no single-scale form)


def word_nibble(
    k: torch.Tensor, n: torch.Tensor, layout: int = LAYOUT_MARLIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, word in row, nibble) of weight (k, n) in Marlin's packed W4 layout (broadcasting int64 tensors)."""
    kl = k % 16
    word = 128 * (n // 64) + 16 * (n % 8) + 4 * ((kl % 8) // 2) + (n % 64) // 16
    if layout == LAYOUT_HUMMING_SM90:
        nib = (n % 16) // 8 + 2 * (kl // 8) + 4 * (kl % 2)
    else:
        nib = 2 * ((n % 16) // 8) + kl // 8 + 4 * (kl % 2)
    return k // 16, word, nib


def scale_col(n: torch.Tensor, single: bool) -> torch.Tensor:
    """Column of output n in Marlin's permuted scales."""
    if single:
        m = n % 32
        return 32 * (n // 32) + 8 * ((m // 2) % 4) + 2 * (m // 8) + m % 2
    return 64 * (n // 64) + 8 * (n % 8) + (n % 64) // 8


def zero_word_nibble(n: torch.Tensor, layout: int = LAYOUT_MARLIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(word, nibble) of output n's zero point in a row of Marlin's (or Humming's) packed zero points."""
    p = scale_col(n, single=False)
    if layout != LAYOUT_MARLIN:
        return p // 8, p % 8
    p2 = 8 * (p // 8) + (p % 8) // 2 + 4 * (p % 2)
    return p2 // 8, p2 % 8


def uses_single_scale_perm(group: int, kp: int, layout: int = LAYOUT_MARLIN) -> bool:
    """Marlin permutes scales with ``scale_perm_single`` when channel-wise or one group spans the padded K (Humming
    never does)."""
    return layout == LAYOUT_MARLIN and not (group > 0 and group < kp)


def marlin_dequant_reference(
    qm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    n: int,
    k: int,
    group: int,
    sym: bool,
    layout: int = LAYOUT_MARLIN,
) -> torch.Tensor:
    """The W4 weight [N, K] (float64, no held-out values) read from Marlin's (``layout``: Humming's) tensors on the
    CPU."""
    kp = qm.shape[0] * 16
    g = group if group > 0 else 0
    kk = torch.arange(k)[None, :]
    nn = torch.arange(n)[:, None]
    r, w, b = word_nibble(kk, nn, layout)
    words = qm.cpu().to(torch.int64) & 0xFFFFFFFF
    codes = (words[r, w] >> (4 * b)) & 15
    gi = (kk // g) if g and g < kp else torch.zeros_like(kk)
    single = uses_single_scale_perm(g, kp, layout)
    sc = scale.cpu().double()[gi, scale_col(nn, single)]
    if sym:
        z: torch.Tensor | float = 8.0
    else:
        assert zero is not None
        zw, zb = zero_word_nibble(nn, layout)
        zt = zero.cpu().to(torch.int64) & 0xFFFFFFFF
        z = ((zt[gi, zw] >> (4 * zb)) & 15).double()
    return (codes.double() - z) * sc


# ------------------------------------------------------------------------------------------------------------
# load time: the restore index of the held-out entries (the W4 tensors stay Marlin's)
# ------------------------------------------------------------------------------------------------------------
def marlin_deq_layout(
    rows,
    cols,
    vals,
    n: int,
    k: int,
    group: int,
    sym: bool,
    act: torch.dtype,
    device,
    sp_block: int = SP_BLOCK,
) -> dict[str, torch.Tensor]:
    """The held-out entries as ``triton_w4``'s sparse index (``sp_ptr`` / ``sp_ent`` / ``sp_meta``) plus an
    ``info`` tensor whose shape carries (n, k, group, sym, sp_block). Registers the layer for the shared scratch."""
    if act not in (torch.bfloat16, torch.float16):
        raise ValueError(f"marlin_deq_layout: activation dtype must be bf16 or fp16, got {act}")
    g = group if group and group > 0 else 0
    if g and (g % 16 or k % g):
        raise ValueError(f"marlin_deq_layout: group {g} must be a multiple of 16 dividing K={k}")
    out = sparse_index(rows, cols, vals, n, k, act, sp_block)
    out["info"] = torch.empty((n, k, g, 1 if sym else 0, sp_block, 0), dtype=torch.int8)
    device = torch.device(device)
    lay = {key: t.contiguous().to(device) for key, t in out.items()}
    if device.type == "cuda":
        need_deq_scratch(device, act, n * k)
    return lay


def layout_info(lay: dict) -> dict:
    n, k, g, sym, spb, _ = lay["info"].shape
    return {"n": n, "k": k, "group": g, "sym": bool(sym), "nnz": lay["sp_meta"].shape[0], "sp_block": spb}


def check_marlin_tensors(
    qm: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, lay: dict, layout: int = LAYOUT_MARLIN
) -> dict:
    """Shapes of Marlin's (Humming's) tensors against the layer (host ints only); returns kp, np, single."""
    info = layout_info(lay)
    n, k, g = info["n"], info["k"], info["group"]
    kp, np_ = qm.shape[0] * 16, qm.shape[1] // 2
    if qm.dtype != torch.int32 or qm.dim() != 2 or kp < k or np_ < n or np_ % 64:
        raise ValueError(f"Marlin W4 tensor {tuple(qm.shape)} {qm.dtype} does not hold a [{n}, {k}] layer")
    single = uses_single_scale_perm(g, kp, layout)
    gp = 1 if (g == 0 or g >= kp) else kp // g
    if tuple(scale.shape) != (gp, np_):
        raise ValueError(f"Marlin scales {tuple(scale.shape)}, expected {(gp, np_)}")
    if not info["sym"] and (zero is None or tuple(zero.shape) != (gp, np_ // 8)):
        raise ValueError(f"Marlin zero points {None if zero is None else tuple(zero.shape)}, expected {(gp, np_ // 8)}")
    return {"kp": kp, "np": np_, "single": single, **info}


# ------------------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------------------
if TRITON_OK:
    import triton
    import triton.language as tl

    _restore_entries = _w4._restore_entries
    _store_wt = _w4._store_wt
    _mma = _w4._mma

    @triton.jit
    def _marlin_scales_zeros(
        sc_ptr, zp_ptr, grp, NP, nb, ok, SYM: tl.constexpr, SINGLE: tl.constexpr, HUM: tl.constexpr = 0
    ):
        """Scales (fp32) and zero points (fp32; 8 if symmetric) of output columns ``nb`` in Marlin's permuted
        rows ``grp`` (module docstring)."""
        n64 = nb % 64
        if SINGLE:
            m32 = nb % 32
            scol = 32 * (nb // 32) + 8 * ((m32 // 2) % 4) + 2 * (m32 // 8) + m32 % 2
        else:
            scol = 64 * (nb // 64) + 8 * (nb % 8) + n64 // 8
        s = tl.load(sc_ptr + grp * NP + scol, mask=ok, other=0.0).to(tl.float32)
        if SYM:
            z = tl.full(nb.shape, 8.0, tl.float32)
        else:
            p = 64 * (nb // 64) + 8 * (nb % 8) + n64 // 8
            if HUM == 0:  # Marlin interleaves a word's zero points (Humming does not)
                p = 8 * (p // 8) + (p % 8) // 2 + 4 * (p % 2)
            zw = tl.load(zp_ptr + grp * (NP // 8) + p // 8, mask=ok, other=0)
            z = ((zw >> (4 * (p % 8))) & 15).to(tl.float32)
        return s, z

    @triton.jit
    def _marlin_dequant_kernel(
        qm_ptr,
        sc_ptr,
        zp_ptr,
        spp_ptr,
        spe_ptr,
        w_ptr,
        N,
        K,
        NP,
        NS,
        hide,
        G: tl.constexpr,
        SYM: tl.constexpr,
        SINGLE: tl.constexpr,
        BN: tl.constexpr,
        HAS_SP: tl.constexpr,
        E: tl.constexpr,
        F16: tl.constexpr,
        SPB: tl.constexpr,
        I64: tl.constexpr,
        HUM: tl.constexpr = 0,
    ):
        """wT[k, n] for one 128-row K block x BN outputs per program (stored K-major), read from Marlin's tensors
        (module docstring), then the held-out values of the region written over it.

        With n mod 64 = 16 a + 8 b + c and k mod 16 = 8 d + 2 e + f, weight (k, n) is nibble 2 b + d + 4 f of word
        16 c + 4 e + a of its 64-column tile (``_dequant_flat``). H200, 7B layer: 164 us (our own layout: 149).
        Removed forms (benchmarks/KERNEL_NOTES.md): per-element gathers (283 us), words as [e, A, c] with the 8
        nibble planes stored as slabs (254 us: Triton reorders between the load's and the store's register layouts
        through shared memory), the same with the columns' contiguity hidden (1,316 us: stmatrix / ldmatrix) and
        the flat form over column pairs (168 us)."""
        pid_n = tl.program_id(0)
        kb = tl.program_id(1)
        n0 = pid_n * BN
        TA: tl.constexpr = BN // 16
        # a 128-row K block lies in one group (G | 128 rows: reload at group starts; else every 16 rows)
        RELOAD: tl.constexpr = 0 if (G == 0 or G % 128 == 0) else (G // 16 if 128 % G == 0 else 1)
        _dequant_flat(qm_ptr, sc_ptr, zp_ptr, w_ptr, N, K, NP, hide, kb, n0, G, SYM, SINGLE, TA, RELOAD, I64, HUM)
        if HAS_SP:
            tl.debug_barrier()  # the region's stores before the entries' (same CTA)
            _restore_entries(spp_ptr, spe_ptr, w_ptr, N, K, NS, n0, kb * 128, BN, E, F16, SPB, I64)

    @triton.jit
    def _dequant_flat(
        qm_ptr, sc_ptr, zp_ptr, w_ptr, N, K, NP, hide, kb, n0,
        G: tl.constexpr, SYM: tl.constexpr, SINGLE: tl.constexpr, TA: tl.constexpr, RELOAD: tl.constexpr,
        I64: tl.constexpr, HUM: tl.constexpr = 0,
    ):  # fmt: skip
        """The flat form: every tensor is 1-D over (c, b, a, e), c fastest, so the load, the
        arithmetic and the stores share ONE register layout (no shared-memory reorder, no barrier). A thread
        loads the word of (e, a, c) -- the two threads of b = 0 / 1 the same one, merged in the warp -- and stores
        its four (d, f) values at column 16 a + 8 b + c: 16 consecutive threads fill one 32-byte sector per store.
        The columns' contiguity is hidden (``hide`` = 0 at run time) so Triton does not vectorize the stores into
        a second layout."""
        i = tl.arange(0, 64 * TA)
        c = (i ^ hide) % 8
        b = (i // 8) % 2
        a = (i // 16) % TA
        e = i // (16 * TA)
        wofs = 2 * n0 + 128 * (a // 4) + a % 4 + 16 * c + 4 * e
        tile_ok = n0 + 64 * (a // 4) < NP
        nb = n0 + 16 * a + 8 * b + c
        ok = nb < N
        if HUM == 1:  # Humming's sm_90 layout: nibble b + 2 d + 4 f (Marlin's: 2 b + d + 4 f)
            shift = 4 * b
        else:
            shift = 4 * (2 * b)
        if G == 0:
            s, z = _marlin_scales_zeros(sc_ptr, zp_ptr, 0, NP, nb, ok, SYM, SINGLE, HUM)
        else:
            s, z = _marlin_scales_zeros(sc_ptr, zp_ptr, (kb * 128) // G, NP, nb, ok, SYM, SINGLE, HUM)
        for j in tl.static_range(8):
            r = kb * 8 + j
            if RELOAD > 0:
                if j > 0 and j % RELOAD == 0:
                    # masked past K: the last block of a K that is not a multiple of 128 (SmolLM2's 576, g64) has
                    # no group there, and its row of scales lies past the tensor's end -- the likely cause of session
                    # 27's illegal memory access on the H200 (the stores below are masked by K already)
                    s, z = _marlin_scales_zeros(
                        sc_ptr, zp_ptr, (r * 16) // G, NP, nb, ok & (r * 16 < K), SYM, SINGLE, HUM
                    )
            if I64:
                rbase = r.to(tl.int64) * (2 * NP)
            else:
                rbase = r * (2 * NP)
            words = tl.load(qm_ptr + rbase + wofs, mask=tile_ok & (r * 16 < K), other=0)
            for d in tl.static_range(2):
                for f in tl.static_range(2):
                    kk = r * 16 + 8 * d + 2 * e + f
                    if I64:
                        off = kk.to(tl.int64) * N + nb
                    else:
                        off = kk * N + nb
                    if HUM == 1:
                        code = ((words >> (shift + 4 * (2 * d + 4 * f))) & 15).to(tl.float32)
                    else:
                        code = ((words >> (shift + 4 * (d + 4 * f))) & 15).to(tl.float32)
                    tl.store(w_ptr + off, ((code - z) * s).to(w_ptr.dtype.element_ty), mask=ok & (kk < K))

    @triton.jit
    def _tile_ranges(spp_ptr, NS, NSB, n0, BR: tl.constexpr, NSB_P: tl.constexpr):
        """(K blocks, first entry, entry count) of rows n0..n0+BR in every K block of the restore index."""
        nsl = tl.minimum(BR // 16, NS - n0 // 16)
        sbs = tl.arange(0, NSB_P)
        sb_ok = sbs < NSB
        lo = tl.load(spp_ptr + sbs * NS + n0 // 16, mask=sb_ok, other=0)
        hi = tl.load(spp_ptr + sbs * NS + n0 // 16 + nsl, mask=sb_ok, other=0)
        return sbs, lo, hi - lo

    @triton.jit
    def _add_entries(
        x_ptr, offs_m, m_ok, stride_xm, ent, col, e_ok, n0, rr, acc, touched,
        CB: tl.constexpr, F16: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        """acc [BM, BR] += x[:, col] (one-hot rows of the entries ``ent``) in fp32 through a one-hot MMA (exact
        act-dtype products); touched marks the rows the entries hit."""
        roff = ((ent >> CB) - n0) & ((1 << (16 - CB)) - 1)
        if F16:
            v = ((ent >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            v = (ent & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)
        xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        hit = (roff[:, None] == rr[None, :]) & e_ok[:, None]
        oh = tl.where(hit, v[:, None], 0.0).to(xg.dtype)
        return _mma(xg, oh, acc, INTERP), tl.maximum(touched, tl.max(hit.to(tl.int32), axis=0))

    @triton.jit
    def _add_rows_into_y(y_ptr, offs_m, m_ok, stride_ym, rows, N, acc, touched):
        """y[:, rows] += acc, rounded once, for the rows the entries touched (the others are not read)."""
        ok = m_ok[:, None] & ((rows < N) & (touched > 0))[None, :]
        yp = y_ptr + offs_m[:, None] * stride_ym + rows[None, :]
        yv = tl.load(yp, mask=ok, other=0.0)
        tl.store(yp, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _index_correction_kernel(
        x_ptr,
        y_ptr,
        spp_ptr,
        spe_ptr,
        M,
        N,
        NS,
        NSB,
        stride_xm,
        stride_ym,
        NSB_P: tl.constexpr,
        BM: tl.constexpr,
        BR: tl.constexpr,
        E: tl.constexpr,
        F16: tl.constexpr,
        SPB: tl.constexpr,
        CB: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """y[m, r] += sum of v * x[m, c] over the held-out entries (r, c, v) of rows n0..n0+BR, read from the
        restore index (every K block of the rows' slices), fp32 accumulation (exact act-dtype products through a
        one-hot MMA), one rounding into y; only rows that hold entries are read and written."""
        pid_r = tl.program_id(0)
        pid_m = tl.program_id(1)
        n0 = pid_r * BR
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < M
        rr = tl.arange(0, BR)
        acc = tl.zeros([BM, BR], dtype=tl.float32)
        touched = tl.zeros([BR], dtype=tl.int32)
        # the tile's entry ranges in every K block, enumerated as ONE sequence (few serial iterations, not one
        # per K block): entry j lies in block seg(j) = #{blocks whose inclusive prefix count <= j}
        sbs, lo, cnt = _tile_ranges(spp_ptr, NS, NSB, n0, BR, NSB_P)
        cum = tl.cumsum(cnt, axis=0)
        first = lo - (cum - cnt)  # index of entry j = first[seg] + j
        total = tl.sum(cnt, axis=0)
        for j0 in range(0, total, E):
            jj = j0 + tl.arange(0, E)
            e_ok = jj < total
            seg = tl.sum((cum[None, :] <= jj[:, None]).to(tl.int32), axis=1)
            base = tl.sum(tl.where(sbs[None, :] == seg[:, None], first[None, :], 0), axis=1)
            ent = tl.load(spe_ptr + base + jj, mask=e_ok, other=0)
            col = seg * SPB + (ent & (SPB - 1))
            acc, touched = _add_entries(
                x_ptr, offs_m, m_ok, stride_xm, ent, col, e_ok, n0, rr, acc, touched, CB, F16, INTERP
            )
        _add_rows_into_y(y_ptr, offs_m, m_ok, stride_ym, n0 + rr, N, acc, touched)

    @triton.jit
    def _index_correction_2d_kernel(
        x_ptr,
        y_ptr,
        spp_ptr,
        spe_ptr,
        M,
        N,
        NS,
        NSB,
        stride_xm,
        stride_ym,
        NSB_P: tl.constexpr,
        BM: tl.constexpr,
        BR: tl.constexpr,
        D: tl.constexpr,
        F16: tl.constexpr,
        SPB: tl.constexpr,
        CB: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """As ``_index_correction_kernel``, but the rows' entries of EVERY K block are read at once, D per block
        (an [NSB_P, D] gather: slot (b, d) is entry lo_b + d), so no entry-to-block search and usually one step:
        steps = the largest entry count of one K block over D."""
        pid_r = tl.program_id(0)
        pid_m = tl.program_id(1)
        n0 = pid_r * BR
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < M
        rr = tl.arange(0, BR)
        acc = tl.zeros([BM, BR], dtype=tl.float32)
        touched = tl.zeros([BR], dtype=tl.int32)
        sbs, lo, cnt = _tile_ranges(spp_ptr, NS, NSB, n0, BR, NSB_P)
        most = tl.max(cnt, axis=0)
        dd = tl.arange(0, D)
        cbase = tl.reshape(tl.broadcast_to(sbs[:, None] * SPB, (NSB_P, D)), (NSB_P * D,))
        for d0 in range(0, most, D):
            ok2 = (d0 + dd)[None, :] < cnt[:, None]
            ent2 = tl.load(spe_ptr + lo[:, None] + d0 + dd[None, :], mask=ok2, other=0)
            ent = tl.reshape(ent2, (NSB_P * D,))
            e_ok = tl.reshape(ok2, (NSB_P * D,))
            col = cbase + (ent & (SPB - 1))
            acc, touched = _add_entries(
                x_ptr, offs_m, m_ok, stride_xm, ent, col, e_ok, n0, rr, acc, touched, CB, F16, INTERP
            )
        _add_rows_into_y(y_ptr, offs_m, m_ok, stride_ym, n0 + rr, N, acc, touched)


# launch configurations: the dequantizer's (tile width, warps[, form]); the index correction's (kernel, rows per
# program, entries per chunk ("seq") or slots per step ("2d"), warps or 0 = by registers). Defaults: the fastest
# on the H200 (w4_fused_bench.py --sections onecopy; benchmarks/results/w4_onecopy_sweep_s9_h200.json: the flat
# dequantizer 164-185 us per 7B layer (our own layout: 149), the plane forms 254-266 (removed forms: KERNEL_NOTES); the
# 2-D index correction 12-16% under the sequence one at M = 1-8 -- but the one-copy pair's small batches use the
# packed SELL correction, 79.1 us at M = 1 vs 102.1 for the 2-D index one)
DEQ_CONFIG: tuple[int, ...] = (64, 2)
CORR_CONFIG: tuple[str, int, int, int] = ("2d", 16, 64, 2)
# the variants the micro-benchmark times; all compile for sm_90 without spills (tests)
DEQ_VARIANTS: list[tuple[int, ...]] = [(64, 2), (128, 4), (128, 8), (256, 4), (256, 8)]
CORR_VARIANTS = [("seq", 16, 32, 0), ("2d", 16, 64, 2), ("2d", 16, 128, 4), ("2d", 16, 256, 8)]


def _correction_warps(nsb_p: int) -> int:
    """sm_90 ptxas, 32 entries per chunk: 150 registers at 64 K blocks with 4 warps; 8 warps above (no spills)."""
    return 4 if nsb_p <= 64 else 8


def index_correction_(
    y: torch.Tensor, x: torch.Tensor, lay: dict, bm: int = 16, br: int | None = None, config: tuple | None = None
) -> torch.Tensor:
    """In place: ``y [M, N] += x [M, K] @ S^T`` for the held-out entries S of the restore index ``lay`` (the
    small-batch correction of the one-copy pair: no second sparse layout). Returns y.
    ``config``: (rows per program, entries per chunk, warps or 0 = by registers), default ``CORR_CONFIG``;
    ``br`` overrides its rows per program."""
    if not TRITON_OK:
        raise RuntimeError("index_correction_ needs Triton")
    info = layout_info(lay)
    n, k, spb = info["n"], info["k"], info["sp_block"]
    if not info["nnz"]:
        return y
    mode, br_c, e, warps = config or envs.onecopy_config().get("corr") or CORR_CONFIG
    br = br or br_c
    m = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if tuple(y.shape) != (m, n) or x.shape[1] != k or y.stride(1) != 1:
        raise ValueError(f"index_correction_: y {tuple(y.shape)}, x {tuple(x.shape)} for a [{n}, {k}] layer")
    if br > (1 << (16 - (spb.bit_length() - 1))) or br % 16:
        raise ValueError(f"index_correction_: {br} rows per program with sp_block={spb}")
    n_pad = _cdiv(n, _w4.SLAB) * _w4.SLAB
    nsb = _cdiv(_cdiv(k, _w4.PB) * _w4.PB, spb)  # the index's K blocks
    nsb_p = _w4._np2(nsb)
    args = (x, y, lay["sp_ptr"], lay["sp_ent"], m, n, n_pad // _w4.SLICE, nsb, x.stride(0), y.stride(0))
    common = dict(NSB_P=nsb_p, BM=bm, BR=br, F16=x.dtype == torch.float16, SPB=spb, CB=spb.bit_length() - 1)
    grid = (_cdiv(n, br), _cdiv(m, bm))
    if mode == "2d":
        d = max(1, e // nsb_p)
        _index_correction_2d_kernel[grid](*args, **common, D=d, INTERP=interpreting(), num_warps=warps or 4)
    elif mode == "seq":
        _index_correction_kernel[grid](
            *args, **common, E=e, INTERP=interpreting(), num_warps=warps or _correction_warps(nsb_p)
        )
    else:
        raise ValueError(f"index_correction_: unknown kernel {mode!r}")
    return y


def dequant_marlin_into(
    qm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    lay: dict,
    out: torch.Tensor | None = None,
    act: torch.dtype | None = None,
    config: tuple[int, int] | None = None,
    layout: int = LAYOUT_MARLIN,
) -> torch.Tensor:
    """The served weight, TRANSPOSED: wT [K, N] in ``act`` (default: the scales' dtype), read from Marlin's tensors
    (``layout``: Humming's, ``LAYOUT_*``) with the held-out values restored, in one kernel. Into ``out`` (a flat
    scratch of >= N*K elements) or new. ``config``: (tile width, warps), default ``DEQ_CONFIG`` (a third field 2,
    the flat form's number in session 9's records, is accepted)."""
    if not TRITON_OK:
        raise RuntimeError("dequant_marlin_into needs Triton")
    if layout not in (LAYOUT_MARLIN, LAYOUT_HUMMING_SM90, LAYOUT_HUMMING):
        raise ValueError(f"dequant_marlin_into: unknown layout {layout}")
    c = check_marlin_tensors(qm, scale, zero, lay, layout)
    n, k, g, spb = c["n"], c["k"], c["group"], c["sp_block"]
    dtype = act or (out.dtype if out is not None else scale.dtype)
    flat = out if out is not None else torch.empty(n * k, dtype=dtype, device=qm.device)
    wt = flat[: n * k].view(k, n)
    bn, warps, *rest = config or envs.onecopy_config().get("deq") or DEQ_CONFIG
    if rest and rest != [2]:  # (BN, WARPS, 2): session 9's name of the flat form, the only one kept
        raise ValueError(f"dequant_marlin_into: form {rest[0]} was removed (session 9: only the flat form, 2)")
    if bn % 64 or bn > 512:
        raise ValueError(f"dequant_marlin_into: tile width {bn} must be a multiple of 64, at most 512")
    rows_addressed = 1 << (16 - (spb.bit_length() - 1))  # an entry's row field spans this many rows
    if c["nnz"] and bn > rows_addressed:  # narrower tiles, the same work per thread
        warps, bn = max(1, warps * rows_addressed // bn), rows_addressed
    if c["nnz"] and bn % 64:
        raise ValueError(f"sp_block={spb} entries address fewer rows than a dequantization tile")
    n_pad = _cdiv(n, _w4.SLAB) * _w4.SLAB  # the sparse index's row padding
    _marlin_dequant_kernel[(_cdiv(n, bn), _cdiv(k, _w4.PB))](
        qm,
        scale,
        zero if zero is not None and zero.numel() else qm,
        lay["sp_ptr"],
        lay["sp_ent"],
        wt,
        n,
        k,
        c["np"],
        n_pad // _w4.SLICE,
        0,
        G=0 if c["single"] else g,
        SYM=c["sym"],
        SINGLE=c["single"],
        BN=bn,
        HAS_SP=bool(c["nnz"]),
        E=64,
        F16=dtype == torch.float16,
        SPB=spb,
        I64=max(n * k, qm.numel()) >= 2**31 - 1,
        HUM=layout,
        num_warps=warps,
    )
    return wt


def marlin_deq_mm(
    x2: torch.Tensor,
    qm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    lay: dict,
    bias: torch.Tensor | None = None,
    layout: int = LAYOUT_MARLIN,
) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` with W dequantized from Marlin's (``layout``: Humming's) tensors into the shared
    scratch (CUDA) or a new tensor, held-out values restored, then one dense GEMM."""
    info = layout_info(lay)
    numel = info["n"] * info["k"]
    out = _deq_scratch(x2.device, x2.dtype, numel) if x2.is_cuda else None
    wt = dequant_marlin_into(qm, scale, zero, lay, out, act=x2.dtype, layout=layout)
    if bias is None:
        return torch.mm(x2, wt)
    return torch.addmm(bias, x2, wt)


def memory_bytes(lay: dict) -> int:
    """Bytes of the restore index (the only tensors this path adds to Marlin's)."""
    return sum(lay[x].numel() * lay[x].element_size() for x in ("sp_ptr", "sp_ent"))


# ------------------------------------------------------------------------------------------------------------
# sm_90 ahead-of-time compile (no GPU needed): the kernels lower and ptxas accepts them, without spills
# ------------------------------------------------------------------------------------------------------------
def compile_sm90(
    which: str,
    sym: bool = False,
    single: bool = False,
    f16: bool = False,
    nsb_p: int = 64,
    keep_asm: bool = False,
    config: tuple | None = None,
):
    """Compile ``_marlin_dequant_kernel`` (``which="dequant"``, ``config`` = (tile width, warps)) or
    a correction kernel (``"correction"``, ``config`` = ``CORR_CONFIG``'s form) for sm_90
    with the constexprs a launch uses (integer sizes a multiple of 16 where a 7B-shaped launch has them, as Triton
    specializes them at run time); returns ``triton_w4.sm90_report``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ty = "*fp16" if f16 else "*bf16"
    if which == "dequant":
        bn, warps, *_ = config or DEQ_CONFIG
        fn = _marlin_dequant_kernel
        sig = {"qm_ptr": "*i32", "sc_ptr": ty, "zp_ptr": "*i32", "spp_ptr": "*i32", "spe_ptr": "*i32", "w_ptr": ty}
        sig.update({"N": "i32", "K": "i32", "NP": "i32", "NS": "i32", "hide": "i32"})
        consts = dict(G=0 if single else 128, SYM=sym, SINGLE=single, BN=bn, HAS_SP=True, E=64, F16=f16, SPB=256)
        consts.update(I64=False)
        div16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    elif which == "correction":
        mode, br, e, warps = config or CORR_CONFIG
        sig = {"x_ptr": ty, "y_ptr": ty, "spp_ptr": "*i32", "spe_ptr": "*i32"}
        sig.update({"M": "i32", "N": "i32", "NS": "i32", "NSB": "i32", "stride_xm": "i32", "stride_ym": "i32"})
        consts = dict(NSB_P=nsb_p, BM=16, BR=br, F16=f16, SPB=256, CB=8, INTERP=False)
        if mode == "2d":
            fn, warps = _index_correction_2d_kernel, warps or 4
            consts["D"] = max(1, e // nsb_p)
        else:
            fn, warps = _index_correction_kernel, warps or _correction_warps(nsb_p)
            consts["E"] = e
        div16 = [0, 1, 2, 3, 5, 8, 9]
    else:
        raise ValueError(which)
    sig = dict(sig, **{k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    k = triton.compile(
        ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
    )
    return _w4.sm90_report(k, keep_asm)
