"""Small-batch W4 GEMV straight from Marlin's layout, with the held-out correction in its epilogue (issue 12).

The one-copy pair (``MarlinDequantOneCopyKernel``) serves small batches with vLLM's Marlin and then a second kernel,
the packed SELL correction, which re-reads and re-writes y: +11 us per 7B layer at M = 1 on the H200 (+13 % end to
end at batch 1). This kernel reads the same tensors Marlin holds (``triton_marlin_deq``'s docstring has the layout)
and the same packed SELL slots, so nothing is stored twice, and adds the held-out terms before its single rounding:

    maps = gemv_maps(sp, n_pad)                                               # load time: one small int32 map
    y = marlin_gemv(x, qm, scale, zero, n, k, group, sym, sp, maps, bias)     # x [M <= 4, K] -> [M, N]

Work split. A program owns the output columns of ``GS`` of the 8 column groups of one 64-column Marlin tile (word
``128 (n div 64) + 16 (n mod 8) + 4 t + u`` of each 16-row K tile holds columns n, n + 8 of the 16 u-column stride
and k = 8 kh + 2 t + kp: 8 codes of 2 columns x 4 K values), and all of K: no split-K, no atomics, one rounding.
Its tensors are 5-D ``[4 (t), GS, WR, RT, 4 (u)]``: the 4 words u (16 bytes) and ``RT`` K tiles in one thread,
threads over (t, GS, WR), warps over WR. Each word needs 4 x values per token, shared by its 4 u words,
so x costs ~1/8 load per weight (the session-5 GEMV over our own layout loaded one x per weight). Codes are
extracted as the exact fp32 ``1 + q/16`` (one shift, one LOP3, ``triton_w4._plane16``), summed against x in fp32
over the 4 codes of one column and the RT K tiles of the thread (in registers), then scaled once per group:
``(q - z) s = 16 s (1 + q/16) - (16 + z) s``. At the end the sums over the warps and t are taken once, the packed
SELL slots of the program's rows (plus any heavy row's CSR range) are gathered against x (fp32), the bias added,
and y rounded once. Legal in CUDA graphs and torch.compile (shapes only on the host, no sync). The slots' and the
first heavy rows' loads are issued before the K loop (packed SELL slices are dense, so a slot's address follows from
its row), so only the x gathers (L1: the loop has just read all of x) and the sums remain after it.

Measured (H200, one Llama-2-7B layer = 4 GEMMs, 0.1 % hold-out, ``w4_fused_bench.py --sections gemv``,
``benchmarks/results/w4_gemv_s10_h200.json``), M = 1: without hold-out 69.4 us (Marlin 68.1: 32 % of HBM peak,
5.4 SASS instructions per weight in the main loop), with the hold-out **78.3 us vs Marlin + packed SELL 79.7**
(-1.8 %; the first form, correction loads after the K loop, took 104 us). M = 2 / 4: 1.9-3.4x Marlin (the extraction
is shared, the x handling and FMAs per token are not: CUDA cores at ~10 instructions per weight). So it is opt-in
(``SUPERWEIGHT_ONECOPY_CONFIG=gemv=1``): the held-out terms still cost ~9 us per layer at M = 1 (2 us per GEMM:
the x gathers and sums after the loop, the heavy rows) and the main loop only matches Marlin.
"""

from __future__ import annotations

import torch

from .sparse_layout import DEFAULT_LANES, interpreting, packed_dtype
from .triton_marlin_deq import uses_single_scale_perm
from .triton_w4 import TRITON_OK, _cdiv, _np2, _sms

GEMV_MAX_M = 4  # tokens of one program (separate accumulators per token)
# tokens -> (RT: K tiles per thread, warps, PF: iterations of words prefetched into registers, 0-2); GS (column
# groups per program): ``_groups``. H200, first form (no prefetch, one 7B layer, M = 1): RT 8 / 4 warps best, GS 2
# best on all four shapes (96 us with the hold-out; GS 1 / 4 / 8: 138 / 107 / 144); with prefetch (4, 4, 1).
GEMV_CONFIGS: dict[int, tuple[int, int, int]] = {1: (4, 4, 1), 2: (2, 4, 1), 4: (1, 4, 1)}
GEMV_VARIANTS: list[tuple[int, int, int]] = [(8, 4, 0), (4, 4, 1), (4, 4, 2), (2, 4, 2), (4, 8, 1), (2, 4, 1)]
GEMV_GS = 2


def _bm(m: int) -> int:
    return 1 if m <= 1 else (2 if m <= 2 else 4)


def _rt(rt: int, bm: int, group: int) -> int:
    """K tiles per thread: at most 8 / tokens (registers: RT 8 with 4 tokens spills on sm_90) and G / 16 (a
    thread's tiles lie in one group)."""
    rt = min(rt, 8 // bm)
    return min(rt, group // 16) if group else rt


def _tile_config(config: tuple[int, ...] | None, bm: int, group: int) -> tuple[int, int, int]:
    """(K tiles per thread, warps, prefetch depth) of a launch for ``bm`` tokens: ``config`` or the default, clipped
    to what compiles without spills on sm_90 (RT * tokens * (depth + 1) <= 12 word tiles: 16 spills at 8 groups)."""
    rt, warps, *rest = config or GEMV_CONFIGS[bm]
    rt = _rt(rt, bm, group)
    pf = min(max(int(rest[0]), 0), 2) if rest else 1
    while pf and rt * bm * (pf + 1) > 12:
        pf -= 1
    return rt, warps, pf


def _groups(np_: int, n_sm: int, gs: int | None = None) -> int:
    """Column groups per program: ``gs``, else ``GEMV_GS`` (measured best on every 7B shape), fewer where that
    would leave SMs idle."""
    g = gs or GEMV_GS
    while not gs and g > 1 and (np_ // 64) * (8 // g) < n_sm:
        g //= 2
    return g


def gemv_maps(sp: dict[str, torch.Tensor], n_pad: int) -> dict[str, torch.Tensor]:
    """``hrng``: the first heavy row of every 32-row block of ``n_pad`` rows (n_blocks + 1 int32), which lets a
    program find the heavy rows among its columns. ``sp``: ``sparse_layout.build_sell(pack=...)`` (dense slices of
    32 lanes), on any device."""
    if packed_dtype(sp) is None:
        raise ValueError("gemv_maps: the GEMV reads packed SELL slots (build_sell(pack=act))")
    ell = sp["ell_cols"]
    dense = torch.equal(sp["ell_rb"].cpu(), torch.arange(ell.shape[0], dtype=torch.int32))
    if ell.shape[0] and (ell.shape[2] != DEFAULT_LANES or not dense):
        raise ValueError(f"gemv_maps: the GEMV reads dense slices of {DEFAULT_LANES} lanes")
    nb = _cdiv(n_pad, DEFAULT_LANES)
    dev = sp["ell_rb"].device
    starts = torch.arange(nb + 1, dtype=torch.int64, device=dev) * DEFAULT_LANES
    return {"hrng": torch.searchsorted(sp["hrows"].long().contiguous(), starts).to(torch.int32)}


def memory_bytes(maps: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in maps.values())


if TRITON_OK:
    import triton
    import triton.language as tl

    from .triton_marlin_deq import _marlin_scales_zeros
    from .triton_w4 import _plane16

    @triton.jit
    def _slot_val(slot, F16: tl.constexpr):
        """fp32 value of packed SELL slots (bits 31..16 the act-dtype value)."""
        if F16:
            return ((slot >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return (slot & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _cols(blk, g0, GS: tl.constexpr):
        """The program's output columns as [GS, 4 (u), 2 (b)]: 64 blk + g0 + g + 16 u + 8 b."""
        g3 = tl.arange(0, GS)[:, None, None]
        u3 = tl.arange(0, 4)[None, :, None]
        b3 = tl.arange(0, 2)[None, None, :]
        return 64 * blk + g0 + g3 + 16 * u3 + 8 * b3

    @triton.jit
    def _slots(ell_ptr, n3, N, L: tl.constexpr, LP: tl.constexpr):
        """The packed SELL slots of the columns ``n3`` as [LP, GS, 4, 2] (0 where empty): dense slices, so the
        addresses follow from the rows (no lookup) and the loads are issued before the K loop."""
        ok = n3 < N
        d = tl.arange(0, LP)[:, None, None, None]
        base = ((n3 // 32) * (L * 32) + n3 % 32)[None, :, :, :]
        return tl.load(ell_ptr + base + d * 32, mask=ok[None, :, :, :] & (d < L), other=0)

    @triton.jit
    def _heavy_rows(hrows_ptr, hptr_ptr, hh, hhi):
        """(row, first entry, entry count) of heavy rows ``hh`` (< hhi)."""
        h_ok = hh < hhi
        row = tl.load(hrows_ptr + hh, mask=h_ok, other=-1)
        e0 = tl.load(hptr_ptr + hh, mask=h_ok, other=0)
        return row, e0, tl.load(hptr_ptr + hh + 1, mask=h_ok, other=0) - e0

    @triton.jit
    def _heavy_add(c, x_ptr, m, stride_xm, n3, row, ent, F16: tl.constexpr):
        """c += the heavy entries ``ent`` [HR, EH] of rows ``row`` [HR] that fall in ``n3``."""
        xv = tl.load(x_ptr + m * stride_xm + (ent & 0xFFFF), mask=ent != 0, other=0.0)
        part = tl.sum(_slot_val(ent, F16) * xv.to(tl.float32), axis=1)
        hit = n3[None, :, :, :] == row[:, None, None, None]
        return c + tl.sum(tl.where(hit, part[:, None, None, None], 0.0), axis=0)

    @triton.jit
    def _heavy_rest(
        c, x_ptr, m, stride_xm, n3, hlo, hhi, row0, e00, cnt0, hrows_ptr, hptr_ptr, hent_ptr, HR: tl.constexpr,
        EH: tl.constexpr, F16: tl.constexpr,
    ):  # fmt: skip
        """The heavy entries the prefetched tile [HR rows, EH entries] did not hold: entries past EH of its rows,
        then rows past HR (rare: a block with > HR heavy rows or a row with > L + EH entries)."""
        j = tl.arange(0, EH)[None, :]
        for j0 in range(EH, tl.max(cnt0, axis=0), EH):
            ent = tl.load(hent_ptr + e00[:, None] + j0 + j, mask=(j0 + j) < cnt0[:, None], other=0)
            c = _heavy_add(c, x_ptr, m, stride_xm, n3, row0, ent, F16)
        for h0 in range(hlo + HR, hhi, HR):
            row, e0, cnt = _heavy_rows(hrows_ptr, hptr_ptr, h0 + tl.arange(0, HR), hhi)
            for j0 in range(0, tl.max(cnt, axis=0), EH):
                ent = tl.load(hent_ptr + e0[:, None] + j0 + j, mask=(j0 + j) < cnt[:, None], other=0)
                c = _heavy_add(c, x_ptr, m, stride_xm, n3, row, ent, F16)
        return c

    @triton.jit
    def _finish(
        acc0, acc1, slots, x_ptr, m, M, y_ptr, stride_xm, stride_ym, bias_ptr, N, n3, hlo, hhi, hrow, he0, hcnt,
        hent, hrows_ptr, hptr_ptr, hent_ptr, HAS_BIAS: tl.constexpr, L: tl.constexpr, HAS_HEAVY: tl.constexpr,
        HR: tl.constexpr, EH: tl.constexpr, F16: tl.constexpr,
    ):  # fmt: skip
        """Sum over t and the warps, add the held-out terms (fp32; their slots were loaded before the K loop, x is
        in L1 after it) and the bias, round once, store token m's columns ``n3`` [GS, 4, 2]."""
        v0 = tl.sum(tl.sum(acc0, axis=0), axis=1)  # [t, GS, WR, u] -> [GS, u]
        v1 = tl.sum(tl.sum(acc1, axis=0), axis=1)
        v = tl.join(v0, v1)  # [GS, u, b]
        n_ok = n3 < N
        if L > 0:
            xv = tl.load(x_ptr + m * stride_xm + (slots & 0xFFFF), mask=slots != 0, other=0.0)
            v += tl.sum(_slot_val(slots, F16) * xv.to(tl.float32), axis=0)
        if HAS_HEAVY:
            v = _heavy_add(v, x_ptr, m, stride_xm, n3, hrow, hent, F16)
            v = _heavy_rest(
                v, x_ptr, m, stride_xm, n3, hlo, hhi, hrow, he0, hcnt, hrows_ptr, hptr_ptr, hent_ptr, HR, EH, F16
            )
        if HAS_BIAS:
            v += tl.load(bias_ptr + n3, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + n3, v.to(y_ptr.dtype.element_ty), mask=n_ok & (m < M))

    @triton.jit
    def _xk(x_ptr, m, kk, K, stride_xm, MASK: tl.constexpr):
        if MASK:
            return tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
        return tl.load(x_ptr + m * stride_xm + kk).to(tl.float32)

    @triton.jit
    def _tok_sums(w, x_ptr, m, kb, K, stride_xm, MASK: tl.constexpr, ASM: tl.constexpr):
        """One token's (sum over the RT tiles of sum_kh,kp (1 + q/16) x) for b = 0 / 1, and the sum of its x.
        ``kb`` [t, GS, WR, RT, 1]: the first K index of each word's (t, tile)."""
        x00 = _xk(x_ptr, m, kb, K, stride_xm, MASK)
        x01 = _xk(x_ptr, m, kb + 1, K, stride_xm, MASK)
        x10 = _xk(x_ptr, m, kb + 8, K, stride_xm, MASK)
        x11 = _xk(x_ptr, m, kb + 9, K, stride_xm, MASK)
        # nibble p = 2 b + kh + 4 kp
        p0 = _plane16(w, 0, ASM) * x00 + _plane16(w, 1, ASM) * x10 + _plane16(w, 4, ASM) * x01
        p0 += _plane16(w, 5, ASM) * x11
        p1 = _plane16(w, 2, ASM) * x00 + _plane16(w, 3, ASM) * x10 + _plane16(w, 6, ASM) * x01
        p1 += _plane16(w, 7, ASM) * x11
        return tl.sum(p0, axis=3), tl.sum(p1, axis=3), tl.sum(x00 + x01 + x10 + x11, axis=3)

    @triton.jit(do_not_specialize=["M"])
    def _marlin_gemv_kernel(
        x_ptr, qm_ptr, sc_ptr, zp_ptr, bias_ptr, y_ptr, ell_ptr, hrng_ptr, hrows_ptr, hptr_ptr, hent_ptr,
        M, N, K, KT, NP, stride_xm, stride_ym,
        G: tl.constexpr, SYM: tl.constexpr, SINGLE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
        RT: tl.constexpr, WR: tl.constexpr, GS: tl.constexpr, HAS_SP: tl.constexpr, L: tl.constexpr,
        HAS_HEAVY: tl.constexpr, EH: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr, I64: tl.constexpr,
        KFULL: tl.constexpr, LP: tl.constexpr = 1, HR: tl.constexpr = 16, PF: tl.constexpr = 1,
    ):  # fmt: skip
        """y[m, n] for m < M <= BM (1, 2 or 4) tokens; grid (NP / (8 GS),) (module docstring).

        Tensor dims are [t, GS, WR, RT, u]: Triton orders a layout's dims by pointer contiguity, ties by dim index,
        so the words (contiguous along u) get threads over (t, GS, WR) with u (16 bytes) and the RT tiles in one
        thread, and every other tensor (x, scales: no contiguity) the same thread mapping -- no layout
        conversion inside the K loop (checked in the TTGIR by a test)."""
        pid = tl.program_id(0)
        NG: tl.constexpr = 8 // GS
        blk = pid // NG
        g0 = (pid % NG) * GS
        t5 = tl.arange(0, 4)[:, None, None, None, None]
        g5 = tl.arange(0, GS)[None, :, None, None, None]
        w5 = tl.arange(0, WR)[None, None, :, None, None]
        i5 = tl.arange(0, RT)[None, None, None, :, None]
        u5 = tl.arange(0, 4)[None, None, None, None, :]
        wofs = 128 * blk + 16 * (g0 + g5) + 4 * t5 + u5
        rloc = w5 * RT + i5
        xrow = rloc + 0 * g5  # x is gathered per (t, g, w, i): the words' thread mapping
        ROWS: tl.constexpr = RT * WR
        # scales / zero points of acc's elements [t, GS, WR, u] (t broadcast): column 64 blk + g0 + g + 8 b + 16 u
        t4 = tl.arange(0, 4)[:, None, None, None]
        w4 = tl.arange(0, WR)[None, None, :, None]
        nc0 = 64 * blk + g0 + tl.arange(0, GS)[None, :, None, None] + 16 * tl.arange(0, 4)[None, None, None, :]
        nc0 = nc0 + 0 * t4 + 0 * w4
        nc1 = nc0 + 8
        a00 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a01 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a10 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a11 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a20 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a21 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a30 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        a31 = tl.zeros((4, GS, WR, 4), dtype=tl.float32)
        sx0 = tl.zeros((4, GS, WR, 1), dtype=tl.float32)
        sx1 = tl.zeros((4, GS, WR, 1), dtype=tl.float32)
        sx2 = tl.zeros((4, GS, WR, 1), dtype=tl.float32)
        sx3 = tl.zeros((4, GS, WR, 1), dtype=tl.float32)
        if I64:
            wp0 = qm_ptr + rloc.to(tl.int64) * (2 * NP) + wofs
        else:
            wp0 = qm_ptr + rloc * (2 * NP) + wofs
        if PF > 0:  # the first tiles' words in flight before anything else (PF iterations ahead)
            w_next = tl.load(wp0, mask=rloc < KT, other=0)
        if PF > 1:
            w_next2 = tl.load(wp0 + ROWS * (2 * NP), mask=(rloc + ROWS) < KT, other=0)
        # the held-out slots / heavy-row range of the program's columns: issued now, used after the K loop
        LS: tl.constexpr = L if HAS_SP else 0
        HH: tl.constexpr = HAS_SP and HAS_HEAVY
        n3 = _cols(blk, g0, GS)
        if HAS_SP and L > 0:
            slots = _slots(ell_ptr, n3, N, L, LP)
        else:
            slots = tl.zeros((1, GS, 4, 2), dtype=tl.int32)
        hlo = 0
        hhi = 0
        hrow = tl.zeros((HR,), dtype=tl.int32)
        he0 = tl.zeros((HR,), dtype=tl.int32)
        hcnt = tl.zeros((HR,), dtype=tl.int32)
        hent = tl.zeros((HR, EH), dtype=tl.int32)
        if HAS_SP and HAS_HEAVY:  # the first HR heavy rows' first EH entries, before the K loop too
            hlo = tl.load(hrng_ptr + 2 * blk)
            hhi = tl.load(hrng_ptr + 2 * blk + 2)
            hrow, he0, hcnt = _heavy_rows(hrows_ptr, hptr_ptr, hlo + tl.arange(0, HR), hhi)
            jj = tl.arange(0, EH)[None, :]
            hent = tl.load(hent_ptr + he0[:, None] + jj, mask=jj < hcnt[:, None], other=0)
        for r0 in range(0, KT, ROWS):
            row = r0 + rloc
            if I64:
                wofs_next = tl.cast(r0 + PF * ROWS, tl.int64) * (2 * NP)
                wofs_cur = tl.cast(r0, tl.int64) * (2 * NP)
            else:
                wofs_next = (r0 + PF * ROWS) * (2 * NP)
                wofs_cur = r0 * (2 * NP)
            if PF == 1:  # register double buffering: the next tiles' loads are issued before this one's arithmetic
                w = w_next
                w_next = tl.load(wp0 + wofs_next, mask=(row + ROWS) < KT, other=0)
            elif PF == 2:  # two iterations ahead
                w = w_next
                w_next = w_next2
                w_next2 = tl.load(wp0 + wofs_next, mask=(row + 2 * ROWS) < KT, other=0)
            elif KFULL:  # K = 16 KT and the loop never passes KT: no masks
                w = tl.load(wp0 + wofs_cur)
            else:
                w = tl.load(wp0 + wofs_cur, mask=row < KT, other=0)
            kb = (r0 + xrow) * 16 + 2 * t5
            # x rows past M are never read: tokens m >= M get row M - 1 (their results are not stored)
            p00, p01, q0 = _tok_sums(w, x_ptr, 0, kb, K, stride_xm, not KFULL, ASM)
            if BM > 1:
                p10, p11, q1 = _tok_sums(w, x_ptr, tl.minimum(1, M - 1), kb, K, stride_xm, not KFULL, ASM)
            if BM > 2:
                p20, p21, q2 = _tok_sums(w, x_ptr, tl.minimum(2, M - 1), kb, K, stride_xm, not KFULL, ASM)
                p30, p31, q3 = _tok_sums(w, x_ptr, tl.minimum(3, M - 1), kb, K, stride_xm, not KFULL, ASM)
            if G == 0:  # one scale per column: applied once after the loop
                a00 += p00
                a01 += p01
                sx0 += q0
                if BM > 1:
                    a10 += p10
                    a11 += p11
                    sx1 += q1
                if BM > 2:
                    a20 += p20
                    a21 += p21
                    sx2 += q2
                    a30 += p30
                    a31 += p31
                    sx3 += q3
            else:
                r_w = r0 + w4 * RT  # a thread's RT tiles lie in one group (RT divides G / 16)
                ok = r_w < KT
                grp = (r_w * 16) // G
                s0, z0 = _marlin_scales_zeros(sc_ptr, zp_ptr, grp, NP, nc0, ok, SYM, SINGLE)
                s1, z1 = _marlin_scales_zeros(sc_ptr, zp_ptr, grp, NP, nc1, ok, SYM, SINGLE)
                c0 = -(16.0 + z0) * s0
                c1 = -(16.0 + z1) * s1
                s0 = 16.0 * s0
                s1 = 16.0 * s1
                a00 += s0 * p00 + c0 * q0
                a01 += s1 * p01 + c1 * q0
                if BM > 1:
                    a10 += s0 * p10 + c0 * q1
                    a11 += s1 * p11 + c1 * q1
                if BM > 2:
                    a20 += s0 * p20 + c0 * q2
                    a21 += s1 * p21 + c1 * q2
                    a30 += s0 * p30 + c0 * q3
                    a31 += s1 * p31 + c1 * q3
        if G == 0:
            ok0 = nc0 < NP
            s0, z0 = _marlin_scales_zeros(sc_ptr, zp_ptr, 0, NP, nc0, ok0, SYM, SINGLE)
            s1, z1 = _marlin_scales_zeros(sc_ptr, zp_ptr, 0, NP, nc1, ok0, SYM, SINGLE)
            c0 = -(16.0 + z0) * s0
            c1 = -(16.0 + z1) * s1
            s0 = 16.0 * s0
            s1 = 16.0 * s1
            a00 = s0 * a00 + c0 * sx0
            a01 = s1 * a01 + c1 * sx0
            a10 = s0 * a10 + c0 * sx1
            a11 = s1 * a11 + c1 * sx1
            a20 = s0 * a20 + c0 * sx2
            a21 = s1 * a21 + c1 * sx2
            a30 = s0 * a30 + c0 * sx3
            a31 = s1 * a31 + c1 * sx3
        _finish(
            a00, a01, slots, x_ptr, 0, M, y_ptr, stride_xm, stride_ym, bias_ptr, N, n3, hlo, hhi, hrow, he0, hcnt,
            hent, hrows_ptr, hptr_ptr, hent_ptr, HAS_BIAS, LS, HH, HR, EH, F16,
        )  # fmt: skip
        if BM > 1:
            _finish(
                a10, a11, slots, x_ptr, 1, M, y_ptr, stride_xm, stride_ym, bias_ptr, N, n3, hlo, hhi, hrow, he0,
                hcnt, hent, hrows_ptr, hptr_ptr, hent_ptr, HAS_BIAS, LS, HH, HR, EH, F16,
            )  # fmt: skip
        if BM > 2:
            _finish(
                a20, a21, slots, x_ptr, 2, M, y_ptr, stride_xm, stride_ym, bias_ptr, N, n3, hlo, hhi, hrow, he0,
                hcnt, hent, hrows_ptr, hptr_ptr, hent_ptr, HAS_BIAS, LS, HH, HR, EH, F16,
            )  # fmt: skip
            _finish(
                a30, a31, slots, x_ptr, 3, M, y_ptr, stride_xm, stride_ym, bias_ptr, N, n3, hlo, hhi, hrow, he0,
                hcnt, hent, hrows_ptr, hptr_ptr, hent_ptr, HAS_BIAS, LS, HH, HR, EH, F16,
            )  # fmt: skip


def _launch_args(
    x2: torch.Tensor,
    qm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    n: int,
    k: int,
    group: int,
    sym: bool,
    sp: dict[str, torch.Tensor] | None,
    maps: dict[str, torch.Tensor] | None,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    config: tuple[int, ...] | None,
    gs: int | None,
    n_sm: int,
):
    """(grid, positional args, constexprs, warps) of one launch; shapes only (no device reads)."""
    m = x2.shape[0]
    kp, np_ = qm.shape[0] * 16, qm.shape[1] // 2
    if m > GEMV_MAX_M:
        raise ValueError(f"marlin_gemv: {m} tokens, at most {GEMV_MAX_M}")
    if qm.dtype != torch.int32 or kp < k or np_ < n or np_ % 64 or x2.shape[1] != k:
        raise ValueError(f"marlin_gemv: Marlin tensor {tuple(qm.shape)} / x {tuple(x2.shape)} for a [{n}, {k}] layer")
    single = uses_single_scale_perm(group if group > 0 else 0, kp)
    g = 0 if single else group
    bm = _bm(m)
    rt, warps, pf = _tile_config(config, bm, g)
    gsz = _groups(np_, n_sm, gs)
    wr = warps * 32 // (4 * gsz)
    if wr < 1:
        raise ValueError(f"marlin_gemv: {warps} warps cannot cover {gsz} column groups")
    has_sp = sp is not None and bool(sp) and sp["nnz"].shape[0] > 0
    if has_sp:
        assert sp is not None and maps is not None
        ell, hrows, hptr, hent = sp["ell_cols"], sp["hrows"], sp["hptr"], sp["hcols"]
        depth = ell.shape[1] if ell.dim() == 3 and ell.shape[0] else 0
        hrng = maps["hrng"]
        if (hrng.numel() - 1) * DEFAULT_LANES < np_:
            raise ValueError("marlin_gemv: the SELL maps were built for fewer rows than Marlin's padded N")
    else:
        ell = hrows = hptr = hent = hrng = qm
        depth = 0
    f16 = x2.dtype == torch.float16
    args = (
        x2, qm, scale, zero if zero is not None and zero.numel() else qm, bias if bias is not None else y, y,
        ell, hrng, hrows, hptr, hent, m, n, k, kp // 16, np_, x2.stride(0), y.stride(0),
    )  # fmt: skip
    consts = dict(
        G=g, SYM=sym, SINGLE=single, HAS_BIAS=bias is not None, BM=bm, RT=rt, WR=wr, GS=gsz, HAS_SP=has_sp,
        L=depth, HAS_HEAVY=has_sp and hrows.numel() > 0, EH=32, F16=f16, ASM=not interpreting(),
        I64=qm.numel() >= 2**31 - 1, KFULL=k == kp and (kp // 16) % (rt * wr) == 0, LP=_np2(max(depth, 1)), HR=16,
        PF=pf,
    )  # fmt: skip
    return (np_ // (8 * gsz),), args, consts, warps


def marlin_gemv(
    x2: torch.Tensor,
    qm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    n: int,
    k: int,
    group: int,
    sym: bool,
    sp: dict[str, torch.Tensor] | None = None,
    maps: dict[str, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
    gs: int | None = None,
) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ held-out terms) (+ bias)`` for M <= 4 from Marlin's tensors and packed SELL slots.
    ``config``: (K tiles per thread, warps[, prefetch 0/1]), default by tokens (``GEMV_CONFIGS``); ``gs``: column
    groups per program (default: ``GEMV_GS``)."""
    if not TRITON_OK:
        raise RuntimeError("marlin_gemv needs Triton")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0:
        return y
    n_sm = _sms(x2.device)
    grid, args, consts, warps = _launch_args(x2, qm, scale, zero, n, k, group, sym, sp, maps, bias, y, config, gs, n_sm)
    _marlin_gemv_kernel[grid](*args, **consts, num_warps=warps)
    return y


def compile_sm90(
    bm: int = 1,
    config: tuple[int, ...] | None = None,
    gs: int = 2,
    group: int = 128,
    sym: bool = False,
    depth: int = 8,
    heavy: bool = True,
    f16: bool = False,
    keep_asm: bool = False,
    kfull: bool = True,
):
    """Compile ``_marlin_gemv_kernel`` for sm_90 (no GPU) with a launch's constexprs; ``triton_w4.sm90_report``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_w4 import sm90_report

    ty = "*fp16" if f16 else "*bf16"
    rt, warps, pf = _tile_config(config, bm, group)
    sig = {"x_ptr": ty, "qm_ptr": "*i32", "sc_ptr": ty, "zp_ptr": "*i32", "bias_ptr": ty, "y_ptr": ty}
    sig.update({k: "*i32" for k in ("ell_ptr", "hrng_ptr", "hrows_ptr", "hptr_ptr", "hent_ptr")})
    sig.update({k: "i32" for k in ("M", "N", "K", "KT", "NP", "stride_xm", "stride_ym")})
    consts = dict(
        G=group, SYM=sym, SINGLE=group == 0, HAS_BIAS=False, BM=bm, RT=rt, WR=warps * 32 // (4 * gs), GS=gs,
        HAS_SP=depth > 0 or heavy, L=depth, HAS_HEAVY=heavy, EH=32, F16=f16, ASM=True, I64=False, KFULL=kfull,
        LP=_np2(max(depth, 1)), HR=16, PF=pf,
    )  # fmt: skip
    sig.update({k: "constexpr" for k in consts})
    div16 = list(range(11)) + [12, 13, 14, 15, 16, 17]  # pointers; N, K, KT, NP, strides as a 7B launch has them
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    kern = triton.compile(
        ASTSource(_marlin_gemv_kernel, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps},
    )
    return sm90_report(kern, keep_asm)
