"""A CUDA-core W4 GEMV for 1-4 tokens straight from vLLM's Marlin layout (issue 12: one stored layout, M = 1 near
the memory bound).

Marlin serves one token at ~32 % of the H200's HBM peak (66.9 us for a Llama-2-7B layer's four GEMMs) and our
Triton GEMV over the same tensors (``triton_marlin_gemv``) only matched it: it issued ~5.4 SASS instructions per
weight. This kernel is written in CUDA C (compiled when a layer is loaded, by torch's own NVRTC, and loaded through
the driver, as ``torch.cuda._compile_kernel`` does: no nvcc, no ninja, no CUDA headers), so the inner loop is what
we choose:

* a warp owns one 64-column Marlin tile and a run of 16-row K tiles; lane ``4 c + t`` loads the 16 bytes (4 words)
  of its (c, t) from each row -- 512 contiguous bytes a warp a row, ``U`` rows in flight before any arithmetic;
* word ``u`` of that load holds columns ``16 u + c`` and ``16 u + 8 + c`` at k = ``2 t, 2 t + 1, 8 + 2 t, 9 + 2 t``
  (``triton_marlin_deq``'s docstring has the layout), so all 8 columns of a lane share 4 x values a row;
* a code becomes the exact float ``128 + q`` with one shift and one LOP3 (the nibble moved to bits 16-19 under the
  exponent of 128.0), then one FFMA with x in fp32: 23 instructions per word of 8 weights. The offset is removed
  per group with the lane's sum of x: ``sum (q - z) x s = s (sum (128 + q) x - (128 + z) sum x)``;
* the warps of a block take consecutive row runs of one tile and are summed through shared memory; the blocks of
  a tile (split-K) write fp32 partials, and the last block to finish (a per-tile counter) adds them in a fixed
  order, adds the bias and writes y once, then re-arms the counter: one launch, deterministic, no host sync, legal
  in CUDA graphs (the counters and partials live in a per-device workspace reserved at load time).

    plan = gemv_plan(n, k, group, sym, act_dtype, device)      # load time: checks, grid, workspace reserved
    y = marlin_gemv_cuda(x, qm, scale, zero, plan, bias)       # x [M <= 4, K] -> [M, N]

The tensor-core form (``gemv_plan(..., config=MMA_CONFIG)``, 1-8 tokens; the layers use it for 2..MAX_M tokens
with ``SUPERWEIGHT_CUDA_GEMV=MAX_M``) keeps the loads, the ring, the split-K and the epilogue, and replaces the
FFMAs: a lane's word of a row is, once decoded, exactly its A fragment of one ``mma.m16n8k16`` over the columns
16 u + {c, c + 8} (Marlin packs its words for its own B fragments, which are these transposed), and the lane's x
words of token c are the B fragment, so y^T = W x^T with the tokens as the MMA's N (zero beyond M). A nibble
becomes 128 + q (bf16; 1024 + q for fp16) by one LOP3 and q - z by one exact FMA, the tensor cores sum (q - z) x in
fp32, and the group scale is applied per group in fp32: ~12 instructions a word whatever the token count, where
the CUDA-core form pays 8 FFMAs a word a token. Opt-in (slower than Marlin from 4 tokens, see below), and checked
at load on each layer's own weights against the CUDA-core form (a mismatch leaves 2..MAX_M tokens on Marlin, logged).

With ``sparse=`` (packed SELL slots, ``sparse_maps``) the held-out terms are added inside the kernel, into the fp32
sum before the one rounding into y: no second kernel, no second pass over y (opt-in, see below).

Measured (H200, one Llama-2-7B layer = 4 GEMMs, g128 asymmetric, the same process as vLLM's Marlin on the same
tensors; ``benchmarks/cuda_gemv_bench.py``, ``benchmarks/results/cuda_gemv_s2{2,3}*_h200.{json,md}``): M = 1
**58.4-59.9 us vs Marlin's 65.5-66.3** (1.80 TB/s, 37.6 % of the 4.8 TB/s peak; with the 0.1 % hold-out's separate
SELL correction 69.1 vs 76.5), but M = 2 / 4 1.2x / 1.9x Marlin's time (CUDA cores: every token adds its FFMAs), so
it serves one token (``SUPERWEIGHT_CUDA_GEMV=1``, the default since session 23: end to end, 7B shape, 0.1 % q/k/v
hold-out on one copy, batch 1 0.751 s vs 0.807 with Marlin, AWQ 0.981 in the same lease). What bounds it: the loads
alone (no decoding, same grid) take 47.0 us (2.24 TB/s) -- single-wave grids of short warps whose loads and
arithmetic barely overlap, and 4-8 MB GEMMs too small to ramp (o_proj's loads reach 1.43 TB/s, gate_up's 2.70) --
while a 1 GiB read-only reduction reaches 4.2 TB/s on the same GPU. The first form (exact nibbles, 4 warps, 4
stages) took 69.7 us; the lean decoding and 8 warps a block with 2 stages brought it to 59.9.

The held-out terms in the epilogue (``sparse=``; the one-copy pair's default since session 24,
``SUPERWEIGHT_ONECOPY_CONFIG=corr=sell`` puts the SELL kernel after the GEMV instead): this second form loads each
lane's slots before the main loop and sums them after it, 4 lanes a column, in the tile's first split-K block only:
66.4 us a 7B layer with the 0.1 % hold-out against 71.6 with the SELL kernel after the GEMV and 77.0 with Marlin +
SELL (H200, session 24, ``cuda_gemv_s24_h200.md``); end to end, batch 1 0.766 s vs 0.771. The first form, one
thread a column walking its slots after the main loop in the tile's last block, took 96.1 us (session 23). Its cost
grows with the tokens (H100, s35, tensor-core form: 77.0 / 119.9 us inside vs 62.7 / 79.0 plain at 1 / 8 tokens): the
11th field (``SW_SPE``, bits) sums them before the main loop (1) and/or spreads a lane's slots over the tile's
split-K blocks (2). H100, s36: spread beats the first block at 1-8 tokens and the SELL kernel after the GEMV at 1-4
(``cuda_gemv_s36_spe_h100.md``): the one Humming copy's held-out layers run it (``HummingGemvKernel.HELD_SPE``).

The tensor-core form (2-8 tokens, ``SUPERWEIGHT_CUDA_GEMV=2..8``) passes its GPU tests but stays opt-in: its first
configuration took 78.3 / 84.2 / 89.9 us at 2 / 4 / 8 tokens (session 24); with its group constants through the ring
and half the split-K blocks (``MMA_CONFIG``, session 25) 66.6 / 69.8 / 73.5 against Marlin's flat 66, so 2-8 tokens
stay on Marlin.

A configuration's 8th field (``SW_PF``) copies each chunk's group constants (the lane's 8 scales, its zero-point
word) through the same ``cp.async`` ring as the chunk's rows, issued by lane t = 0 of each column group, so a group's
scaling reads shared memory instead of waiting on a global load with only ``SW_ST - 1`` chunks in flight (the
tensor-core form waits twice a group: zero points at its first row, scales at its flush). Same arithmetic, so the
same bits as without (GPU test); dropped for channel-wise layers and where its slots do not fit beside the ring.
Measured on an H200 (session 25, ``cuda_gemv_s25_h200.md``): the tensor-core form 7-9 % faster with it (part of
``MMA_CONFIG``), the CUDA-core form not (60.8 vs 60.6 us; with the held-out terms inside 68.6 vs 67.2), so off there.

The 9th field (``SW_PDL``) launches the kernel as a programmatic dependent (``cuLaunchKernelEx`` with programmatic
stream serialization, sm_90+; a plain launch elsewhere): it requests its first weight chunks, their constants and the
held-out slots (static tensors) before ``griddepcontrol.wait`` and touches x, the split-K workspace and y only after
it, so its ramp can overlap the end of the kernel before it (s22's fit: ~6 us of fixed cost a GEMM). Bitwise equal to
plain launches inside a CUDA graph (GPU test), but no faster (H200, session 25: each GEMM after a kernel writing its
x, 69.4 vs 69.1 us a layer; with the held-out terms inside 74.3 vs 74.5), so off by default.

Where the ring and a separate reduction buffer would not fit in 48 KB (the tensor-core form with 8 warps a block:
half the split-K blocks of 4 warps, whose fp32 partials at 8 tokens are ~12 % of the weight bytes), each warp's
partial sums go into its own ring slots once the main loop is done (``GemvPlan.ralias``); planned only there, so the
configurations measured so far compile as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
from dataclasses import dataclass

import torch

from .. import envs

MAX_M = 8  # tokens a launch: the tensor-core form (``mma``); the CUDA-core form takes up to MAX_M_FFMA
MAX_M_FFMA = 4
TILE_N = 64


def act_conversions(prefix: str) -> str:
    """CUDA source of ``act2f`` / ``f2act`` (16-bit activation <-> fp32, bf16 or fp16 by ``<prefix>_BF16``), shared by
    our NVRTC kernels; under ``<prefix>_HOST`` the tests' CPU emulation's ``emu_*`` functions stand in for the PTX."""
    return _ACT_CONVERSIONS.replace("PFX_", prefix + "_")


_ACT_CONVERSIONS = r"""
// (PFX_HOST: the tests' CPU emulation, tests/cuda_emu.py, compiles this source for the host; its emu_* functions
// stand in for the inline PTX)
__device__ __forceinline__ float act2f(u16 h) {
#ifdef PFX_HOST
  return emu_act2f(h, PFX_BF16);
#elif PFX_BF16
  return __uint_as_float(((u32)h) << 16);
#else
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#endif
}
__device__ __forceinline__ u16 f2act(float f) {
#ifdef PFX_HOST
  return emu_f2act(f, PFX_BF16);
#else
  u16 h;
#if PFX_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
#endif
}
""".removeprefix("\n")

_SRC = (
    r"""
typedef unsigned int u32;
typedef unsigned short u16;

#ifndef SW_MT
#define SW_MT 1
#endif

"""
    + act_conversions("SW")
    + r"""
// the nibble at bits 16..19 of w under the exponent of 128.0: the exact float 128 + q. The mask and the exponent
// come in as kernel parameters (0x000F0000, 0x43000000): as literals ptxas re-materializes one of the two LOP3
// operands before every use (a MOV per nibble)
__device__ __forceinline__ float nib(u32 w, u32 km, u32 ke) { return __uint_as_float((w & km) | ke); }

// 16 bytes global -> shared, asynchronously (no registers held while in flight)
__device__ __forceinline__ void cp16(const void* smem, const void* g) {
#ifdef SW_HOST
  emu_copy(smem, g, 16);
#else
  const u32 sa = (u32)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(g));
#endif
}
// 4 bytes global -> shared (the prefetched zero-point words, SW_PF)
__device__ __forceinline__ void cp4(const void* smem, const void* g) {
#ifdef SW_HOST
  emu_copy(smem, g, 4);
#else
  const u32 sa = (u32)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sa), "l"(g));
#endif
}
#ifdef SW_HOST
__device__ __forceinline__ void cp_commit() {}
__device__ __forceinline__ void cp_wait() {}
#else
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(SW_ST - 1)); }
#endif

// one word u of a lane's load: columns i = 2u (a = 0) and 2u + 1 (a = 1), k = 2t, 2t+1, 8+2t, 9+2t
__device__ __forceinline__ void word_fma(u32 w, const float (&xa)[SW_MT], const float (&xb)[SW_MT],
                                         const float (&xc)[SW_MT], const float (&xd)[SW_MT],
                                         float (&ga)[SW_MT][8], int u, u32 km, u32 ke) {
#if SW_WSWAP  // Humming's sm_90 layout: nibbles 1 / 5 and 2 / 6 trade places
  const float f0 = nib(w << 16, km, ke), f4 = nib(w, km, ke), f1 = nib(w << 8, km, ke), f5 = nib(w >> 8, km, ke);
  const float f2 = nib(w << 12, km, ke), f6 = nib(w >> 4, km, ke), f3 = nib(w << 4, km, ke), f7 = nib(w >> 12, km, ke);
#else
  const float f0 = nib(w << 16, km, ke), f4 = nib(w, km, ke), f1 = nib(w << 12, km, ke), f5 = nib(w >> 4, km, ke);
  const float f2 = nib(w << 8, km, ke), f6 = nib(w >> 8, km, ke), f3 = nib(w << 4, km, ke), f7 = nib(w >> 12, km, ke);
#endif
#pragma unroll
  for (int m = 0; m < SW_MT; ++m) {
    ga[m][2 * u] = fmaf(f0, xa[m], fmaf(f4, xb[m], fmaf(f1, xc[m], fmaf(f5, xd[m], ga[m][2 * u]))));
    ga[m][2 * u + 1] = fmaf(f2, xa[m], fmaf(f6, xb[m], fmaf(f3, xc[m], fmaf(f7, xd[m], ga[m][2 * u + 1]))));
  }
}

// the lean form (SW_LEAN): one LOP3 gives two nibbles under two exponents of 128 (km = 0x000F000F, ke = 0x43004300);
// the low one becomes its exact float by a shift, the high one is read in place as the float
// 128 + q_hi + (0x4300 + q_lo) / 65536: its constant 0x4300 / 65536 = 0.26171875 is removed with the sum of the x it
// multiplies, and q_lo / 65536 stays (at most 15 / 65536 of a quantization step): 11 instructions a word, not 15
__device__ __forceinline__ void word_fma_lean(u32 w, const float (&xa)[SW_MT], const float (&xb)[SW_MT],
                                              const float (&xc)[SW_MT], const float (&xd)[SW_MT],
                                              float (&ga)[SW_MT][8], int u, u32 km, u32 ke) {
#if SW_WSWAP  // Humming's sm_90 layout: the pairs (1, 5) and (2, 6) trade places
  const u32 t0 = (w & km) | ke, t1 = ((w >> 8) & km) | ke, t2 = ((w >> 4) & km) | ke, t3 = ((w >> 12) & km) | ke;
#else
  const u32 t0 = (w & km) | ke, t1 = ((w >> 4) & km) | ke, t2 = ((w >> 8) & km) | ke, t3 = ((w >> 12) & km) | ke;
#endif
  const float f0 = __uint_as_float(t0 << 16), f4 = __uint_as_float(t0);
  const float f1 = __uint_as_float(t1 << 16), f5 = __uint_as_float(t1);
  const float f2 = __uint_as_float(t2 << 16), f6 = __uint_as_float(t2);
  const float f3 = __uint_as_float(t3 << 16), f7 = __uint_as_float(t3);
#pragma unroll
  for (int m = 0; m < SW_MT; ++m) {
    ga[m][2 * u] = fmaf(f0, xa[m], fmaf(f4, xb[m], fmaf(f1, xc[m], fmaf(f5, xd[m], ga[m][2 * u]))));
    ga[m][2 * u + 1] = fmaf(f2, xa[m], fmaf(f6, xb[m], fmaf(f3, xc[m], fmaf(f7, xd[m], ga[m][2 * u + 1]))));
  }
}

// The held-out terms (packed SELL slots: value bits above a 16-bit column, 0 = empty; ``sparse_layout.build_sell(
// pack=...)``, dense slices of 32 columns, a light row's slots from depth 0 on; heavy rows in CSR, ``hrng`` the range
// of them a 32-column block holds). Lane 4 cc + q of a warp owns column cb + cc of the tile and the slots q, q + 4, ...
// of it: its first SW_SPD slots are loaded into registers before the main loop (their latency hidden behind it), the
// x gathers and FMAs come after it, the 4 lanes of a column are summed by shuffles. Only the tile's first split-K
// block adds them (into its fp32 partial): once per output, one rounding with the rest.
#ifndef SW_SPD
#define SW_SPD 4
#endif
#define SW_CG ((64 + SW_WARPS * 8 - 1) / (SW_WARPS * 8))
#define SW_EPT ((SW_MT * 64 + SW_WARPS * 32 - 1) / (SW_WARPS * 32))  // a thread's outputs of the tile in the epilogue
// SW_SPE (bits; 0 = the form above): bit 0 sums the terms before the main loop instead of after it (once x is
// readable: the gathers' latency under the ring's first chunks in flight, the slots' registers free for the loop);
// bit 1 spreads them over the tile's split-K blocks -- block y takes a lane's slot rounds y, y + S, ... (slot
// t + 4 round; the heavy rows' entries the same way) into its own fp32 partial, so no one block carries them all
// (at 8 tokens a slot is 8 gathers from 8 rows of x). Deterministic either way (fixed owners, fixed sum order).
#ifndef SW_SPE
#define SW_SPE 0
#endif

__device__ __forceinline__ void sp_gather(const u32 s, const u16* __restrict__ x, int xs, int M, float (&v)[SW_MT]) {
  if (!s) return;
  const float w = act2f((u16)(s >> 16));
  const int col = (int)(s & 0xFFFFu);
#pragma unroll
  for (int m = 0; m < SW_MT; ++m)
    if (m < M) v[m] = fmaf(w, act2f(__ldg(x + (size_t)m * xs + col)), v[m]);
}

#ifndef SW_MMA
#define SW_MMA 0
#endif
// the layout read (GemvPlan.layout): Marlin's (both 0); Humming's (humming-kernels, vLLM's HummingLinearKernel) is
// Marlin's tile for tile with its zero points not interleaved (SW_ZLIN: column i of a lane's 8 at nibble i, not
// Marlin's 0, 2, 4, 6, 1, 3, 5, 7 order) and, for sm_90 (its wgmma form), the weights' nibble index bits 0 and 1
// swapped (SW_WSWAP); same scales
#ifndef SW_WSWAP
#define SW_WSWAP 0
#endif
#ifndef SW_ZLIN
#define SW_ZLIN 0
#endif
#if SW_ZLIN
#define SW_ZSH(i) (4 * (i))
#else
#define SW_ZSH(i) (4 * (((i) >> 1) + 4 * ((i) & 1)))
#endif
// SW_PF: a chunk's group constants (the lane's 8 scales, its zero-point word) travel through the ring with the
// chunk's rows (cp.async, issued by lane t = 0 of each column group), so a group's scaling reads shared memory
// instead of stalling on a global load with SW_ST - 1 chunks in flight; SW_NG groups a chunk (U and GROWS divide
// one another)
#ifndef SW_PF
#define SW_PF 0
#endif
// SW_PDL: launched as a programmatic dependent (cuLaunchKernelEx, Hopper+): the weight ring's first chunks, their
// group constants and the held-out slots (static tensors) are requested before griddepcontrol.wait; x, the split-K
// workspace and y (which the kernels before it may write or read) only after it
#ifndef SW_PDL
#define SW_PDL 0
#endif
// SW_TRIG: the kernel lets its programmatic dependents launch as soon as every block has started
// (griddepcontrol.launch_dependents first thing, Hopper+): a kernel launched after it with programmatic stream
// serialization (the SELL correction of the batches past the fold) runs its loads and FMAs beside this one and waits
// (griddepcontrol.wait: this grid complete and its writes visible) only before it touches y. Nothing else changes:
// a plain launch after it still waits for it to finish
#ifndef SW_TRIG
#define SW_TRIG 0
#endif
// SW_XR: each chunk's x slice (its SW_U rows x SW_MT tokens x 16 k) travels through the ring with the chunk's rows,
// copied 16 bytes a lane, two tokens' contiguous runs an instruction; a row's x words are then two shared loads (the
// tensor-core form's B fragments: the halves of token c >= 4 swapped, so conflict-free) instead of two global loads
// that touch one cache line a token each (8 at 8 tokens)
#ifndef SW_XR
#define SW_XR 0
#endif
#if SW_PF && SW_GROWS > 0
#define SW_PFG 1
#define SW_NG ((SW_U + SW_GROWS - 1) / SW_GROWS)
#else
#define SW_PFG 0
#endif
#define SW_SYNCW (SW_PFG || SW_XR)  // lanes read what other lanes of the warp copied into the ring
#if SW_MMA
// The tensor-core form (SW_MMA, 1-8 tokens): a lane's 32-bit word of a row is, decoded, exactly its A fragment of
// one mma.m16n8k16 over the 16 output columns 16 u + {c, c + 8} and the row's 16 k (a0 / a2: column c at k = 2t,
// 2t + 1 / 8 + 2t, 9 + 2t; a1 / a3: column c + 8), and its x words (token c, same k) are the B fragment: y^T = W x^T
// with the tokens as the MMA's N (8, zero-padded). Nibbles become 128 + q (bf16) / 1024 + q (fp16) by one LOP3,
// minus (128 + z) by one exact FMA (small integers), so the tensor cores sum (q - z) x exactly in fp32; the group
// scale is applied per group in fp32, as in the CUDA-core form.
#if SW_BF16
#define SW_KE 0x43004300u
#define SW_ONE2 0x3F803F80u
#else
#define SW_KE 0x64006400u
#define SW_ONE2 0x3C003C00u
#endif
__device__ __forceinline__ u32 sub_z(u32 a, u32 nz) {
#ifdef SW_HOST
  return emu_fma2(a, SW_ONE2, nz, SW_BF16);
#else
  u32 d;
#if SW_BF16
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(SW_ONE2), "r"(nz));
#else
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(SW_ONE2), "r"(nz));
#endif
  return d;
#endif
}
__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#ifdef SW_HOST
  emu_mma16816(d, a0, a1, a2, a3, b0, b1, SW_BF16);
#elif SW_BF16
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
// one word (16 columns x 16 k of the tile's row block u) into its group accumulator. km / ke: the kernel parameters
// 0x000F000F / SW_KE (the host passes them for this form, ``launch_constants``): held in registers, each fragment's
// (w >> s) & km | ke is ONE three-register LOP3; with the two literals ptxas needs two (one immediate an instruction:
// 128 extra LOP3 a chunk of 8 rows, sm_90 SASS of session 30)
__device__ __forceinline__ void word_mma(u32 w, const u32 (&nz)[2], u32 b0, u32 b1, float (&d)[4], u32 km, u32 ke) {
#if SW_WSWAP  // Humming's sm_90 layout: the word's pair i is a_i (Marlin's: a0, a2, a1, a3)
  const u32 a0 = sub_z((w & km) | ke, nz[0]), a1 = sub_z(((w >> 4) & km) | ke, nz[1]);
  const u32 a2 = sub_z(((w >> 8) & km) | ke, nz[0]), a3 = sub_z(((w >> 12) & km) | ke, nz[1]);
#else
  const u32 a0 = sub_z((w & km) | ke, nz[0]), a2 = sub_z(((w >> 4) & km) | ke, nz[0]);
  const u32 a1 = sub_z(((w >> 8) & km) | ke, nz[1]), a3 = sub_z(((w >> 12) & km) | ke, nz[1]);
#endif
  mma16816(d, a0, a1, a2, a3, b0, b1);
}
#endif

#if SW_LEAN
#define SW_WORD word_fma_lean
#else
#define SW_WORD word_fma
#endif

extern "C" __global__ void __launch_bounds__(SW_WARPS * 32, SW_MINB)
sw_marlin_gemv(const uint4* __restrict__ qm, const u16* __restrict__ x, const u16* __restrict__ sc,
               const u32* __restrict__ zp, const u16* __restrict__ bias, u16* __restrict__ y,
               float* __restrict__ ws, u32* __restrict__ cnt,
               int M, int N, int R, int xs, int ys, int rpw, int has_bias, u32 km, u32 ke,
               const u32* __restrict__ ell, int L, const int* __restrict__ hrng, const int* __restrict__ hrows,
               const int* __restrict__ hptr, const u32* __restrict__ hcols, int has_sp) {
#if SW_TRIG && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x, S = gridDim.y;
  const int r0 = (blockIdx.y * SW_WARPS + warp) * rpw;
  const int r1 = min(r0 + rpw, R);
  const size_t rs = (size_t)N / 2;  // uint4s a row (2 N words)
  const uint4* qp = qm + (size_t)tile * 32 + lane;

  // this lane's scales of one group: columns 16 (i >> 1) + 8 (i & 1) + c of the tile (the grouped scale permutation
  // puts them at 8 c .. 8 c + 7)
#if SW_PFG
  __shared__ uint4 sbuf[SW_WARPS][SW_ST][SW_NG][8];
  __shared__ u32 zbuf[SW_WARPS][SW_ST][SW_NG][8];
#endif
  // slot / e: where SW_PF put group g's constants (the ring slot of the chunk being summed, the chunk's e-th group)
  auto load_scales = [&](int g, float (&s)[8], int slot, int e) {
#if SW_PFG
    const uint4 sv = sbuf[warp][slot][e][c];
    const u32 sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { s[2 * i] = act2f((u16)(sw[i] & 0xFFFF)); s[2 * i + 1] = act2f((u16)(sw[i] >> 16)); }
#elif SW_GROWS > 0
    const uint4 sv = *reinterpret_cast<const uint4*>(sc + (size_t)g * N + tile * 64 + 8 * c);
    const u32 sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { s[2 * i] = act2f((u16)(sw[i] & 0xFFFF)); s[2 * i + 1] = act2f((u16)(sw[i] >> 16)); }
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // channel-wise: Marlin's single permutation, column by column
      const int n = tile * 64 + 16 * (i >> 1) + 8 * (i & 1) + c, mm = n & 31;
      s[i] = act2f(sc[32 * (n >> 5) + 8 * ((mm >> 1) & 3) + 2 * (mm >> 3) + (mm & 1)]);
    }
#endif
  };
  auto zero_word = [&](int g, int slot, int e) -> u32 {
#if SW_PFG && SW_ZERO
    return zbuf[warp][slot][e][c];
#elif SW_ZERO
    return zp[(size_t)g * (N / 8) + tile * 8 + c];
#else
    return 0u;
#endif
  };
#if SW_MMA
  // C fragments of row block u: columns 16 u + c (0, 1) / 16 u + 8 + c (2, 3), tokens 2 t (0, 2) / 2 t + 1 (1, 3)
  float gacc[4][4], tot[4][4];
  u32 nz[4][2];  // -(128 + z) of this group's columns 16 u + c / 16 u + 8 + c, both halves
  int cur_g = -1;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int i = 0; i < 4; ++i) { gacc[u][i] = 0.f; tot[u][i] = 0.f; }
  auto load_zero = [&](int g, int slot, int e) {
#if SW_ZERO
    const u32 zw = zero_word(g, slot, e);
#endif
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#if SW_ZERO
      const u32 z = (zw >> SW_ZSH(i)) & 15u;
#else
      const u32 z = 8u;
#endif
      const u32 h = ((SW_KE & 0xFFFFu) | z) | 0x8000u;  // -(128 + z) (bf16) / -(1024 + z) (fp16)
      nz[i >> 1][i & 1] = h | (h << 16);
    }
  };
  auto flush = [&](int g, int slot, int e) {
    float s[8];
    load_scales(g, s, slot, e);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      tot[u][0] = fmaf(s[2 * u], gacc[u][0], tot[u][0]);
      tot[u][1] = fmaf(s[2 * u], gacc[u][1], tot[u][1]);
      tot[u][2] = fmaf(s[2 * u + 1], gacc[u][2], tot[u][2]);
      tot[u][3] = fmaf(s[2 * u + 1], gacc[u][3], tot[u][3]);
#pragma unroll
      for (int i = 0; i < 4; ++i) gacc[u][i] = 0.f;
    }
  };
#else
  float acc[SW_MT][8], ga[SW_MT][8], sx[SW_MT], sxh[SW_MT];
#pragma unroll
  for (int m = 0; m < SW_MT; ++m) {
    sx[m] = 0.f;
    sxh[m] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) { acc[m][i] = 0.f; ga[m][i] = 0.f; }
  }

  auto flush = [&](int g, int slot, int e) {
    float s[8], z[8];
    load_scales(g, s, slot, e);
#if SW_ZERO
    const u32 zw = zero_word(g, slot, e);
#pragma unroll
    for (int i = 0; i < 8; ++i) z[i] = 128.f + (float)((zw >> SW_ZSH(i)) & 15u);
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) z[i] = 136.f;
#endif
#pragma unroll
    for (int m = 0; m < SW_MT; ++m) {
      const float off = SW_LEAN ? 0.26171875f * sxh[m] : 0.f;  // the lean form's constant in the high nibbles
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc[m][i] = fmaf(s[i], fmaf(-z[i], sx[m], ga[m][i] - off), acc[m][i]);
        ga[m][i] = 0.f;
      }
      sx[m] = 0.f;
      sxh[m] = 0.f;
    }
  };
#endif

  // every lane copies its own 16 bytes of each row into its own shared slots (no other lane reads them): a
  // ring of SW_ST chunks of SW_U rows, SW_ST - 1 chunks in flight while one is summed
  __shared__ uint4 buf[SW_WARPS][SW_ST][SW_U][32];
#if SW_XR
  __shared__ uint4 xbuf[SW_WARPS][SW_ST][SW_U * SW_MT * 2];
#endif
  const int nch = (r1 - r0) / SW_U;  // r1 - r0 is a multiple of SW_U (the host picks SW_U dividing K / 16)
  auto issue = [&](int q) {  // chunk q (rows r0 + q U ...) into its ring slot
    const int slot = q % SW_ST;
#pragma unroll
    for (int j = 0; j < SW_U; ++j) cp16(&buf[warp][slot][j][lane], qp + (size_t)(r0 + q * SW_U + j) * rs);
#if SW_PFG
    if (t == 0) {
      const int g0 = (r0 + q * SW_U) / SW_GROWS;
#pragma unroll
      for (int e = 0; e < SW_NG; ++e) {
        cp16(&sbuf[warp][slot][e][c], sc + (size_t)(g0 + e) * N + tile * 64 + 8 * c);
#if SW_ZERO
        cp4(&zbuf[warp][slot][e][c], zp + (size_t)(g0 + e) * (N / 8) + tile * 8 + c);
#endif
      }
    }
#endif
#if SW_XR
    // piece p: token p / 2U, row p / 2 % U, half p & 1 (k 0-7 / 8-15); stored at (row MT + token) 2 + (half ^ swz).
    // A trip count known at compile time (no divergent loop around the copies; s34's SASS had one at 2-4 tokens)
#pragma unroll
    for (int i = 0; i < (SW_U * SW_MT * 2 + 31) / 32; ++i) {
      const int p = lane + 32 * i;
      if ((SW_U * SW_MT * 2) % 32 == 0 || p < SW_U * SW_MT * 2) {
        const int m = p / (2 * SW_U), j = (p >> 1) % SW_U, h = p & 1;
        cp16(&xbuf[warp][slot][(j * SW_MT + m) * 2 + (h ^ ((m >> 2) & 1))],
             x + (size_t)m * xs + 16 * (r0 + q * SW_U + j) + 8 * h);
      }
    }
#endif
  };
#pragma unroll
  for (int q = 0; q < SW_ST - 1; ++q) {
    if (q < nch) issue(q);
    cp_commit();
  }
  // the held-out slots of this lane's columns, loaded now (static tensors) and summed where SW_SPE says
#if SW_SPE & 2
  const bool do_sp = has_sp != 0;  // every block of the tile: slot rounds blockIdx.y, + S, ...
  const int sp0 = blockIdx.y, sps = S;
#else
  const bool do_sp = has_sp && blockIdx.y == 0;  // the tile's first block: every round
  const int sp0 = 0, sps = 1;
#endif
  __shared__ float spv[SW_MT * 64];
  u32 pre[SW_CG][SW_SPD];
#pragma unroll
  for (int g = 0; g < SW_CG; ++g) {
    const int n = tile * 64 + (g * SW_WARPS + warp) * 8 + c;
#pragma unroll
    for (int d = 0; d < SW_SPD; ++d) {
      const int dd = t + 4 * (sp0 + sps * d);
      pre[g][d] = (do_sp && (g * SW_WARPS + warp) * 8 < 64 && dd < L)
                      ? __ldg(ell + ((size_t)(n >> 5) * L + dd) * 32 + (n & 31)) : 0u;
    }
  }
  // this block's held-out terms of the tile's columns (x gathered from global memory) into spv
  auto sp_sum = [&]() {
    if (!do_sp) return;
#pragma unroll
    for (int g = 0; g < SW_CG; ++g) {
      const int cb = (g * SW_WARPS + warp) * 8;
      if (cb >= 64) break;
      const int n = tile * 64 + cb + c, blk = n >> 5;
      float v[SW_MT];
#pragma unroll
      for (int m = 0; m < SW_MT; ++m) v[m] = 0.f;
#pragma unroll
      for (int d = 0; d < SW_SPD; ++d) sp_gather(pre[g][d], x, xs, M, v);
      for (int dd = t + 4 * (sp0 + sps * SW_SPD); dd < L; dd += 4 * sps)  // deeper slices than the registers hold
        sp_gather(__ldg(ell + ((size_t)blk * L + dd) * 32 + (n & 31)), x, xs, M, v);
      for (int h = __ldg(hrng + blk), h1 = __ldg(hrng + blk + 1); h < h1; ++h) {
        if (__ldg(hrows + h) != n) continue;
        for (int j = __ldg(hptr + h) + t + 4 * sp0, j1 = __ldg(hptr + h + 1); j < j1; j += 4 * sps)
          sp_gather(__ldg(hcols + j), x, xs, M, v);
      }
#pragma unroll
      for (int m = 0; m < SW_MT; ++m) {
        v[m] += __shfl_xor_sync(0xffffffffu, v[m], 1);
        v[m] += __shfl_xor_sync(0xffffffffu, v[m], 2);
        if (t == 0) spv[m * 64 + cb + c] = v[m];
      }
    }
  };
#if SW_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the kernels before this one are done and visible
#endif
#if SW_SPE & 1
  sp_sum();  // before the main loop (the epilogue's __syncthreads makes spv visible)
#endif
  for (int ci = 0; ci < nch; ++ci) {
    const int nx = ci + SW_ST - 1;
#if SW_SYNCW
    __syncwarp();  // every lane is done with the slot being refilled (its shared parts: constants, x)
#endif
    if (nx < nch) issue(nx);
    cp_commit();
    cp_wait();
#if SW_SYNCW
    __syncwarp();  // the other lanes' copies into this chunk's slot are visible
#endif
    const int r = r0 + ci * SW_U, st = ci % SW_ST;
#pragma unroll
    for (int j = 0; j < SW_U; ++j) {
      const uint4 wv = buf[warp][st][j][lane];
#if SW_MMA
      {
        const int row = r + j;
#if SW_GROWS > 0
        // a chunk starts on a multiple of SW_U (rpw is one), so where SW_U divides a group's rows only its first row
        // can open a group: the check on the other rows folds away (j is a constant of the unrolled loop)
        if ((SW_GROWS % SW_U != 0 || j == 0) && row / SW_GROWS != cur_g) {
          cur_g = row / SW_GROWS;
          load_zero(cur_g, st, row / SW_GROWS - r / SW_GROWS);
        }
#else
        if (cur_g < 0) { cur_g = 0; load_zero(0, 0, 0); }
#endif
        u32 b0 = 0u, b1 = 0u;  // token c's x at k = 2t, 2t + 1 / 8 + 2t, 9 + 2t (zero beyond M)
#if SW_XR
        {  // read unconditionally (lanes past M read token 0's slot) and zeroed by a select, not a branch: s34's SASS
           // had the branch, with the shared window's base re-read (S2R) inside it, on every row at 2-4 tokens
          const int cx = c < SW_MT ? c : 0, sw = (cx >> 2) & 1;
          const u32* xw = reinterpret_cast<const u32*>(&xbuf[warp][st][(j * SW_MT + cx) * 2]);
          const u32 v0 = xw[4 * sw + t], v1 = xw[4 * (sw ^ 1) + t];
          b0 = c < SW_MT ? v0 : 0u;
          b1 = c < SW_MT ? v1 : 0u;
        }
#else
        if (c < SW_MT) {
          const u16* xr = x + (size_t)c * xs + 16 * row + 2 * t;
          b0 = __ldg(reinterpret_cast<const u32*>(xr));
          b1 = __ldg(reinterpret_cast<const u32*>(xr + 8));
        }
#endif
        word_mma(wv.x, nz[0], b0, b1, gacc[0], km, ke);
        word_mma(wv.y, nz[1], b0, b1, gacc[1], km, ke);
        word_mma(wv.z, nz[2], b0, b1, gacc[2], km, ke);
        word_mma(wv.w, nz[3], b0, b1, gacc[3], km, ke);
      }
#else
      float xa[SW_MT], xb[SW_MT], xc[SW_MT], xd[SW_MT];
#pragma unroll
      for (int m = 0; m < SW_MT; ++m) {
#if SW_XR
        const u32* xw = reinterpret_cast<const u32*>(&xbuf[warp][st][(j * SW_MT + m) * 2]);
        const int sw = (m >> 2) & 1;
        const u32 lo = xw[4 * sw + t], hi = xw[4 * (sw ^ 1) + t];
#else
        const u16* xr = x + (size_t)m * xs + 16 * (r + j) + 2 * t;
        const u32 lo = __ldg(reinterpret_cast<const u32*>(xr));
        const u32 hi = __ldg(reinterpret_cast<const u32*>(xr + 8));
#endif
        xa[m] = act2f((u16)(lo & 0xFFFF)); xb[m] = act2f((u16)(lo >> 16));
        xc[m] = act2f((u16)(hi & 0xFFFF)); xd[m] = act2f((u16)(hi >> 16));
        sx[m] += (xa[m] + xb[m]) + (xc[m] + xd[m]);
#if SW_LEAN
        sxh[m] += xb[m] + xd[m];
#endif
      }
#if SW_READONLY  // diagnostics (benchmarks/cuda_gemv_bench.py --ceiling): the loads alone, no decoding
      ga[0][0] += __uint_as_float((wv.x ^ wv.y ^ wv.z ^ wv.w) & 0x3FFFFFFFu);
#else
      SW_WORD(wv.x, xa, xb, xc, xd, ga, 0, km, ke);
      SW_WORD(wv.y, xa, xb, xc, xd, ga, 1, km, ke);
      SW_WORD(wv.z, xa, xb, xc, xd, ga, 2, km, ke);
      SW_WORD(wv.w, xa, xb, xc, xd, ga, 3, km, ke);
#endif
#endif  // SW_MMA
#if SW_GROWS > 0 && SW_GROWS < SW_U
      if (((j + 1) % SW_GROWS) == 0) flush((r + j) / SW_GROWS, st, j / SW_GROWS);
#endif
    }
#if SW_GROWS >= SW_U
    if (((r + SW_U) % SW_GROWS) == 0) flush((r + SW_U - 1) / SW_GROWS, st, 0);
#endif
  }
#if SW_GROWS == 0
  flush(0, 0, 0);
#elif SW_GROWS >= SW_U
  if (r1 > r0 && (r1 % SW_GROWS) != 0) flush((r1 - 1) / SW_GROWS, (nch - 1) % SW_ST, 0);  // the last chunk's slot
#endif

#ifndef SW_RALIAS
#define SW_RALIAS 0
#endif
#if SW_RALIAS
  // (configurations whose separate reduction would not fit in 48 KB) the ring is dead after the main loop (every copy
  // waited for, each warp's slots its own): a warp's partial sums go into its own slots
  float(*red)[SW_ST * SW_U * 128] = reinterpret_cast<float(*)[SW_ST * SW_U * 128]>(&buf[0][0][0][0]);
#else
  __shared__ float red[SW_WARPS][SW_MT * 64];
#endif
  __shared__ int last;
#if SW_MMA
  // every lane holds whole sums (over its rows) of columns 16 u + c, 16 u + 8 + c for tokens 2 t, 2 t + 1
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int n0 = 16 * u + c, k0 = 2 * t;
    if (k0 < SW_MT) { red[warp][k0 * 64 + n0] = tot[u][0]; red[warp][k0 * 64 + n0 + 8] = tot[u][2]; }
    if (k0 + 1 < SW_MT) { red[warp][(k0 + 1) * 64 + n0] = tot[u][1]; red[warp][(k0 + 1) * 64 + n0 + 8] = tot[u][3]; }
  }
#else
  // the 4 lanes t of a column group hold partial sums of the same 8 columns
#pragma unroll
  for (int m = 0; m < SW_MT; ++m)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float v = acc[m][i];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      acc[m][i] = v;
    }
  if (t == 0) {
#pragma unroll
    for (int m = 0; m < SW_MT; ++m)
#pragma unroll
      for (int i = 0; i < 8; ++i) red[warp][m * 64 + 16 * (i >> 1) + 8 * (i & 1) + c] = acc[m][i];
  }
#endif
#if !(SW_SPE & 1)
  sp_sum();
#endif
  __syncthreads();
  const int nb = tile * 64;
  for (int e = threadIdx.x; e < SW_MT * 64; e += SW_WARPS * 32) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < SW_WARPS; ++w) v += red[w][e];
    if (do_sp) v += spv[e];
    red[0][e] = v;
  }
  if (S == 1) {
    __syncthreads();
    for (int e = threadIdx.x; e < M * 64; e += SW_WARPS * 32) {
      const int m = e >> 6, n = nb + (e & 63);
      float v = red[0][e];
      if (has_bias) v += act2f(bias[n]);
      y[(size_t)m * ys + n] = f2act(v);
    }
    return;
  }
  // split-K: partials to the workspace; the tile's last block adds them in split order
  for (int e = threadIdx.x; e < M * 64; e += SW_WARPS * 32) {
    const int m = e >> 6, n = nb + (e & 63);
    ws[((size_t)blockIdx.y * M + m) * N + n] = red[0][e];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = (atomicAdd(cnt + tile, 1u) == (u32)(S - 1));
  __syncthreads();
  if (!last) return;
  __threadfence();
  // every partial of this thread's outputs requested before the first add, up to 8 splits a batch (a loop over
  // outputs and splits waited one L2 round trip per output and per 4 splits: 4 outputs a thread at 8 tokens), then
  // summed in split order -- the same adds in the same order as the loop, so the same bits
  float sum[SW_EPT];
#pragma unroll
  for (int i = 0; i < SW_EPT; ++i) sum[i] = 0.f;
  for (int s0 = 0; s0 < S; s0 += 8) {
    float p[SW_EPT][8];
#pragma unroll
    for (int i = 0; i < SW_EPT; ++i) {
      const int e = threadIdx.x + i * SW_WARPS * 32;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        p[i][j] = (e < M * 64 && s0 + j < S) ? __ldcg(ws + ((size_t)(s0 + j) * M + (e >> 6)) * N + nb + (e & 63)) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < SW_EPT; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (s0 + j < S) sum[i] += p[i][j];
  }
#pragma unroll
  for (int i = 0; i < SW_EPT; ++i) {
    const int e = threadIdx.x + i * SW_WARPS * 32;
    if (e >= M * 64) break;
    const int m = e >> 6, n = nb + (e & 63);
    float v = sum[i];
    if (has_bias) v += act2f(bias[n]);
    y[(size_t)m * ys + n] = f2act(v);
  }
  if (threadIdx.x == 0) cnt[tile] = 0u;
}
""".removeprefix("\n")
)

_lock = threading.Lock()
_kernels: dict[tuple, object] = {}
_ws: dict[torch.device, dict[str, torch.Tensor]] = {}

# (rows a chunk, warps a block, warps per SM wanted over the grid, chunks in a warp's shared ring, blocks per SM the
# registers are limited for, lean decoding): the best of benchmarks/cuda_gemv_bench.py --sweep on an H200 (one 7B
# layer at M = 1: 59.7 us against 72.6 for the first form (4, 4, 24, 4, 1, 0); cuda_gemv_s22b.json)
DEFAULT_CONFIG = (4, 8, 24, 2, 1, 1)
# the tensor-core form (opt-in): 8 rows a chunk, 4 warps a block, 12 warps per SM over the grid (half the split-K
# blocks of 24: at 8 tokens their fp32 partials are ~12 % of the weight bytes), group constants through the ring --
# the fastest at 8 tokens of session 25's sweeps on an H200 (7B layer: 75.8 / 73.9 us vs 92.3 / 90.2 for the first
# form (4, 4, 24, 2, 1, 0, 1), Marlin 66.4; cuda_gemv_s25_h200.json, cuda_gemv_s25_mma8_h200.json)
MMA_CONFIG = (8, 4, 12, 2, 1, 0, 1, 1)


# the tensors the kernel reads: vLLM's Marlin repack; Humming's (humming-kernels 0.1.10, vLLM's HummingLinearKernel)
# for sm_90 (its wgmma form: Marlin's tile with the weights' nibble index bits 0 and 1 swapped, zero points not
# interleaved) and for other GPUs (Marlin's weights, zero points not interleaved); same shapes, same scales. Derived
# from both packers on the CPU (tests/test_cuda_marlin_gemv.py); confirmed on an H200 (session 26) against Humming's
# own repack and output (tests/test_gpu_kernels.py::test_humming_gemv_reads_hummings_own_tensors).
LAYOUT_MARLIN, LAYOUT_HUMMING_SM90, LAYOUT_HUMMING = 0, 1, 2


# a configuration's fields in order (gemv_plan reads them; trailing ones may be left out, 0 = off)
CONFIG_FIELDS = ("u", "warps", "per_sm", "stages", "minb", "lean", "mma", "pf", "pdl", "xr", "spe")


def config_with(config: tuple[int, ...] | None = None, **flags: int) -> tuple[int, ...]:
    """``config`` (default: DEFAULT_CONFIG) with the named trailing fields set, the ones before them padded with 0:
    ``config_with(MMA_CONFIG, pf=1)``."""
    cfg = list(config or DEFAULT_CONFIG)
    for name, value in flags.items():
        i = CONFIG_FIELDS.index(name)
        cfg += [0] * (i + 1 - len(cfg))
        cfg[i] = int(value)
    return tuple(cfg)


# what the layers serve where SUPERWEIGHT_CUDA_GEMV names no configuration (session 34): x through the ring (SW_XR)
# in both forms. Single tokens: DEFAULT_CONFIG with x and the group constants through its ring -- 57.4 us a 7B layer
# vs 65.2 plain on an H100 (s33: 59.0 vs 64.8), end to end at batch 1 0.731 vs 0.820 s (one Humming copy, vLLM,
# results/throughput_h100_s34.json); 2-8 tokens: the tensor-core form's fastest XR shape, 72.2 / 73.1 us at 8 tokens
# vs MMA_CONFIG's 74.5 (s34 / s33), batch 8 1.024 vs 1.071 s. Not yet timed on an H200.
SERVE_ONE = config_with(DEFAULT_CONFIG, pf=1, xr=1)
SERVE_MMA = config_with((4, 4, 12, 2, 1, 0, 1, 1), xr=1)


def served_config(form: str) -> tuple[int, ...]:
    """The launch configuration the layers run for ``form`` ("one": single tokens, "mma": the tensor-core form):
    the one given in ``SUPERWEIGHT_CUDA_GEMV``, else SERVE_ONE / SERVE_MMA."""
    return envs.cuda_gemv_configs().get(form, SERVE_ONE if form == "one" else SERVE_MMA)


def available() -> tuple[bool, str | None]:
    """Whether this torch can compile and load the kernel here (CUDA; torch's NVRTC and module loader)."""
    if not torch.cuda.is_available():
        return False, "needs CUDA"
    if torch.version.hip:
        return False, "CUDA only (the kernel uses PTX)"
    try:
        from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library  # noqa: F401
    except ImportError:
        return False, "this torch has no NVRTC loader (torch.cuda._utils)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "needs sm_80+ (bf16 conversions)"
    return True, None


@dataclass(frozen=True)
class GemvPlan:
    n: int
    k: int
    grows: int  # 16-row K tiles a group (0: channel-wise / one group)
    has_zero: bool
    bf16: bool
    u: int  # rows a load batch
    warps: int  # warps a block
    stages: int  # chunks of u rows in a warp's shared ring (stages - 1 in flight)
    rpw: int  # rows a warp
    splits: int  # blocks a tile (split-K)
    minb: int = 1  # blocks an SM the registers are limited for (__launch_bounds__)
    lean: bool = False  # the lean decoding (see the kernel source)
    mma: bool = False  # the tensor-core form (1-8 tokens)
    pf: bool = False  # group constants prefetched through the ring (SW_PF; group-wise layers only)
    pdl: bool = False  # launched as a programmatic dependent (SW_PDL; sm_90+, else a plain launch)
    ralias: bool = False  # the warps' partial sums in their own ring slots (SW_RALIAS; where 48 KB needs it)
    layout: int = 0  # the tensors read: LAYOUT_MARLIN, LAYOUT_HUMMING_SM90 or LAYOUT_HUMMING (see _SRC)
    xr: bool = False  # x through the ring with the weights (SW_XR; the tensor-core form)
    spe: int = 0  # where the held-out terms are summed (SW_SPE bits: 1 before the main loop, 2 over all split-K blocks)
    trig: bool = False  # lets a programmatic dependent after it launch at once (SW_TRIG; not a config field)

    @property
    def max_m(self) -> int:
        return MAX_M if self.mma else MAX_M_FFMA

    @property
    def tiles(self) -> int:
        return self.n // TILE_N


def _pick_u(rows: int, grows: int, u: int) -> int:
    while u > 1 and (rows % u or (grows and grows % u and u % grows)):
        u //= 2
    return u


def group_readable(group: int, k: int) -> bool:
    """Whether the GEMV reads groups of ``group`` rows over a K of ``k``: 16 times a power of two dividing K."""
    return group > 0 and group % 16 == 0 and k % group == 0 and (group // 16) & (group // 16 - 1) == 0


def gemv_plan(
    n: int,
    k: int,
    group: int,
    sym: bool,
    act_dtype: torch.dtype,
    device: torch.device | str,
    config: tuple[int, ...] | None = None,
    layout: int = 0,
) -> GemvPlan:
    """The launch shape of one layer (Marlin's unpadded layout only: N a multiple of 64, K of 16, a group a power
    of two dividing K); reserves the per-device workspace its split-K needs. Raises ValueError where it cannot run.
    ``layout``: whose tensors it reads (``LAYOUT_*``; Humming's have Marlin's shapes and scales, see the source)."""
    if act_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cuda GEMV: activations must be bf16 or fp16, got {act_dtype}")
    if n % TILE_N or k % 16:
        raise ValueError(f"cuda GEMV: needs N % 64 == 0 and K % 16 == 0 (Marlin unpadded), got N={n} K={k}")
    g = group if group and 0 < group < k else 0
    if g and not group_readable(g, k):
        raise ValueError(f"cuda GEMV: group {group} must be 16 times a power of two dividing K={k}")
    u_want, warps, per_sm, stages, *rest = config or DEFAULT_CONFIG
    minb = int(rest[0]) if rest else 1
    lean = bool(rest[1]) if len(rest) > 1 else False
    mma = bool(rest[2]) if len(rest) > 2 else False
    pf = bool(rest[3]) if len(rest) > 3 else False
    pdl = bool(rest[4]) if len(rest) > 4 else False
    xr = bool(rest[5]) if len(rest) > 5 else False
    spe = int(rest[6]) if len(rest) > 6 else 0
    if spe not in (0, 1, 2, 3):
        raise ValueError(f"cuda GEMV: config {config}: the held-out terms' placement (spe) is 0-3, got {spe}")
    if mma and lean:
        raise ValueError(f"cuda GEMV: config {config}: the tensor-core form has no lean decoding")
    if xr and pdl:
        raise ValueError(f"cuda GEMV: config {config}: x through the ring copies x before a PDL launch may read it")
    max_m = MAX_M if mma else MAX_M_FFMA
    rows, grows = k // 16, g // 16
    u = _pick_u(rows, grows, u_want)
    ring = warps * stages * u_want * (512 + (32 * max_m if xr else 0))  # (+ x: 32 bytes a row a token, SW_XR)
    smem = ring + (warps + 1) * max_m * 256  # the ring, the warps' partial sums, the held-out terms' sums
    # where that does not fit, the partial sums can take the ring's place after the main loop (a warp's slots hold
    # its own max_m x 64 floats when stages x u x 512 >= max_m x 256): e.g. the tensor-core form with 8 warps
    ralias = smem > 48 * 1024 and stages * u * 512 >= max_m * 256
    if ralias:
        smem = ring + max_m * 256
    if smem > 48 * 1024:
        raise ValueError(f"cuda GEMV: config {config} needs more than 48 KB of static shared memory")
    # the prefetch is a speed option: dropped for channel-wise layers (one set of constants, read once after the
    # loop) and where its shared slots would not fit beside the ring
    pf = pf and grows > 0 and smem + warps * stages * max(1, u // grows) * 8 * 20 <= 48 * 1024
    dev = _dev(device)
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    tiles = n // TILE_N
    target = n_sm * per_sm  # warps wanted over the grid
    rpw = u
    while tiles * -(-rows // rpw) > target and rpw < rows:
        rpw += u
    splits = -(-rows // (rpw * warps))
    if dev.type == "cuda" and splits > 1:
        reserve(dev, splits * max_m * n, tiles)
    bf16 = act_dtype == torch.bfloat16
    if layout not in (LAYOUT_MARLIN, LAYOUT_HUMMING_SM90, LAYOUT_HUMMING):
        raise ValueError(f"cuda GEMV: unknown layout {layout}")
    if layout and not grows:  # the channel-wise read is Marlin's single-scale permutation, which Humming never uses
        raise ValueError("cuda GEMV: Humming's tensors of a channel-wise or one-group layer are not read here")
    return GemvPlan(
        n, k, grows, not sym, bf16, u, warps, stages, rpw, splits, minb, lean, mma, pf, pdl, ralias, layout, xr, spe
    )


def _dev(device: torch.device | str) -> torch.device:
    d = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


def reserve(device: torch.device, floats: int, tiles: int) -> None:
    """Grow the device's split-K workspace (fp32 partials, per-tile counters kept at zero between launches)."""
    with _lock:
        cur = _ws.get(device)
        if cur is not None and cur["ws"].numel() >= floats and cur["cnt"].numel() >= tiles:
            return
        f = max(floats, cur["ws"].numel() if cur else 0)
        t = max(tiles, cur["cnt"].numel() if cur else 0)
        _ws[device] = {
            "ws": torch.empty(f, dtype=torch.float32, device=device),
            "cnt": torch.zeros(t, dtype=torch.int32, device=device),
        }


def nvrtc_cubin(src: str, arch: str, lib=None) -> bytes:
    """Compile ``src`` for ``sm_<arch>`` with NVRTC (torch's own libnvrtc unless ``lib`` is given): machine code,
    no CUDA headers, no toolkit needed."""
    import ctypes

    if lib is None:
        from torch.cuda._utils import _get_gpu_rtc_library

        lib = _get_gpu_rtc_library()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"sw_gemv.cu", 0, None, None):
        raise RuntimeError("cuda GEMV: nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"--use_fast_math"]
        res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if res:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"cuda GEMV: NVRTC failed:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, buf)
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_version(lib) -> str:
    import ctypes

    major, minor = ctypes.c_int(), ctypes.c_int()
    if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)):
        return "unknown"
    return f"{major.value}.{minor.value}"


def cached_cubin(src: str, arch: str, lib=None, root: str | None = None) -> bytes:
    """``nvrtc_cubin`` through a disk cache (``SUPERWEIGHT_CACHE_DIR``/cubin, keyed by the source, the
    architecture and the NVRTC version): a compile costs seconds per layer kind, every engine start would pay it.
    Written under a temporary name and renamed (a reader never sees half a file); a cache that cannot be read or
    written is skipped, never an error."""
    if lib is None:
        from torch.cuda._utils import _get_gpu_rtc_library

        lib = _get_gpu_rtc_library()
    key = hashlib.sha256(f"{arch}\0{_nvrtc_version(lib)}\0{src}".encode()).hexdigest()[:32]
    d = os.path.join(root or envs.cache_dir(), "cubin")
    path = os.path.join(d, f"sw_gemv-sm{arch}-{key}.cubin")
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data:
            return data
    except OSError:
        pass
    data = nvrtc_cubin(src, arch, lib)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return data


def _compile(src: str, name: str):
    from torch.cuda._utils import _cuda_load_module

    major, minor = torch.cuda.get_device_capability()
    kernels = _cuda_load_module(cached_cubin(src, f"{major}{minor}"), [name])
    assert isinstance(kernels, dict)
    return kernels[name]


def kernel_source(plan: GemvPlan, mt: int, readonly: bool = False) -> str:
    """The CUDA source of ``plan``'s kernel for ``mt`` tokens (what NVRTC compiles and the disk cache is keyed by)."""
    defs = (
        f"#define SW_MT {mt}\n#define SW_BF16 {int(plan.bf16)}\n#define SW_GROWS {plan.grows}\n"
        f"#define SW_ZERO {int(plan.has_zero)}\n#define SW_U {plan.u}\n#define SW_WARPS {plan.warps}\n"
        f"#define SW_ST {plan.stages}\n#define SW_READONLY {int(readonly)}\n"
        f"#define SW_MINB {plan.minb}\n#define SW_LEAN {int(plan.lean)}\n#define SW_MMA {int(plan.mma)}\n"
        f"#define SW_PF {int(plan.pf)}\n#define SW_PDL {int(plan.pdl)}\n#define SW_RALIAS {int(plan.ralias)}\n"
    )
    if plan.xr:  # (without it: the defines as before, so cached kernels keep their keys)
        defs += "#define SW_XR 1\n"
    if plan.spe:  # (0: the defines as before)
        defs += f"#define SW_SPE {plan.spe}\n"
    if plan.trig:  # (off: the defines as before)
        defs += "#define SW_TRIG 1\n"
    if plan.layout:  # (Marlin's layout: the defines as before)
        defs += f"#define SW_WSWAP {int(plan.layout == LAYOUT_HUMMING_SM90)}\n#define SW_ZLIN 1\n"
    return defs + _SRC


def _kernel(plan: GemvPlan, mt: int, readonly: bool = False):
    key: tuple = (mt, readonly, plan.bf16, plan.grows, plan.has_zero, plan.u, plan.warps, plan.stages, plan.minb)
    key += (plan.lean, plan.mma, plan.pf, plan.pdl, plan.ralias, plan.layout, plan.xr, plan.spe, plan.trig)
    kern = _kernels.get(key)
    if kern is None:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"cuda GEMV: {why}")
        with _lock:
            kern = _kernels.get(key)
            if kern is None:
                kern = _compile(kernel_source(plan, mt, readonly), "sw_marlin_gemv")
                _kernels[key] = kern
    return kern


def _cache_one(job: tuple[str, str]) -> None:
    cached_cubin(*job)


def precompile(sources: list[str], arch: str, workers: int | None = None) -> int:
    """Compile ``sources`` for ``sm_<arch>`` into the disk cache (``cached_cubin``) in parallel processes (NVRTC
    compiles one source on one core; a test run or a new layer kind needs hundreds): the later loads find them there.
    Returns how many distinct sources were given."""
    import concurrent.futures
    import multiprocessing

    jobs = sorted({(src, arch) for src in sources})
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    ctx = multiprocessing.get_context("spawn")  # no CUDA context in the children, none inherited
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_cache_one, jobs, chunksize=4))
    return len(jobs)


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: an enum id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("num_attrs", ctypes.c_uint),
    ]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_pdl_ok: dict[int, bool] = {}


def _pdl_device(index: int) -> bool:
    ok = _pdl_ok.get(index)
    if ok is None:
        ok = _pdl_ok[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return ok


def _launch(kern, pdl: bool, grid: tuple, block: tuple, args: list) -> None:
    """Launch ``kern`` on the current stream: plainly (torch's launcher), or with ``pdl`` on sm_90+ as a
    programmatic dependent of the work before it (``cuLaunchKernelEx``; the kernel waits with
    ``griddepcontrol.wait`` before it touches anything that work may write). Captured into CUDA graphs like any
    launch."""
    if not pdl:
        kern(grid=grid, block=block, args=args)
        return
    stream = torch.cuda.current_stream()
    if not _pdl_device(stream.device.index):
        kern(grid=grid, block=block, args=args, stream=stream)
        return
    from torch.cuda._utils import _get_gpu_runtime_library

    keep: list = []  # the C values must outlive the call
    for a in args:
        if isinstance(a, torch.Tensor):
            keep.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, int):
            keep.append(ctypes.c_int(a))
        else:
            raise TypeError(f"cuda GEMV: unsupported kernel argument {type(a).__name__}")
    params = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in keep])
    attr = _LaunchAttr()
    attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION
    ctypes.memmove(attr.value, ctypes.byref(ctypes.c_int(1)), 4)  # programmaticStreamSerializationAllowed = 1
    cfg = _LaunchConfig()
    cfg.grid[:] = grid
    cfg.block[:] = block
    cfg.shared_mem = 0
    cfg.stream = ctypes.c_void_p(stream.cuda_stream)
    cfg.attrs = ctypes.pointer(attr)
    cfg.num_attrs = 1
    lib = _get_gpu_runtime_library()
    res = lib.cuLaunchKernelEx(ctypes.byref(cfg), kern.func, params, None)
    if res:
        raise RuntimeError(f"cuda GEMV: cuLaunchKernelEx failed (CUresult {res})")


def prepare(plan: GemvPlan, max_m: int, min_m: int = 1) -> None:
    """Compile (NVRTC) and load the kernels of ``min_m``..``max_m`` tokens for ``plan`` now -- at load time, so a
    machine whose torch cannot compile them fails here, where the caller can stay on Marlin, not in the first
    forward."""
    for mt in range(min_m, max_m + 1):
        _kernel(plan, mt)


def marlin_gemv_cuda(
    x: torch.Tensor,
    qm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    plan: GemvPlan,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    sparse: dict[str, torch.Tensor] | None = None,
    maps: dict[str, torch.Tensor] | None = None,
    _readonly: bool = False,
) -> torch.Tensor:
    """y = x W^T (+ bias) for x [M <= 4, K] from Marlin's tensors ``qm`` [K/16, 2 N], ``scale`` [G, N],
    ``zero`` [G, N/8] (asymmetric) -- the weights as Marlin serves them. ``sparse`` (packed SELL slots in x's dtype,
    ``prepare_sparse(..., layout="sell", pack=x.dtype)``) with ``maps`` (``sparse_maps``): the held-out terms are
    added in the epilogue, in fp32 with the bias, before the one rounding into y."""
    m = x.shape[0]
    if not 1 <= m <= plan.max_m:
        raise ValueError(f"cuda GEMV: 1..{plan.max_m} tokens for this form, got {m}")
    if _readonly and plan.mma:
        raise ValueError("cuda GEMV: the loads-only diagnostic is a CUDA-core form")
    if x.shape[1] != plan.k or x.stride(1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:
        x = x.contiguous()
    if plan.xr and (x.stride(0) % 8 or x.data_ptr() % 16):  # its 16-byte copies of x
        x = x.clone(memory_format=torch.contiguous_format)
    ell = hr = hp = hc = hg = None
    if sparse is not None and sparse["ell_cols"].numel() + sparse["hcols"].numel():
        if maps is None or sparse["ell_vals"].dtype != x.dtype:
            raise ValueError("cuda GEMV: the held-out terms need packed SELL slots in x's dtype and their sparse_maps")
        ell, hr, hp, hc, hg = sparse["ell_cols"], sparse["hrows"], sparse["hptr"], sparse["hcols"], maps["hrng"]
    y = out if out is not None else torch.empty((m, plan.n), dtype=x.dtype, device=x.device)
    ws = _ws.get(_dev(x.device)) if plan.splits > 1 else None
    if plan.splits > 1 and ws is None:
        raise RuntimeError("cuda GEMV: no workspace reserved on this device (gemv_plan reserves it at load time)")
    dummy = qm
    _launch(
        _kernel(plan, m, _readonly),
        plan.pdl,
        grid=(plan.tiles, plan.splits, 1),
        block=(plan.warps * 32, 1, 1),
        args=[
            qm,
            x,
            scale,
            zero if zero is not None else dummy,
            bias if bias is not None else dummy,
            y,
            ws["ws"] if ws else dummy,
            ws["cnt"] if ws else dummy,
            m,
            plan.n,
            plan.k // 16,
            x.stride(0),
            y.stride(0),
            plan.rpw,
            int(bias is not None),
            *launch_constants(plan),
            ell if ell is not None else dummy,
            ell.shape[1] if ell is not None else 0,
            hg if hg is not None else dummy,
            hr if hr is not None else dummy,
            hp if hp is not None else dummy,
            hc if hc is not None else dummy,
            int(ell is not None),
        ],
    )
    return y


def launch_constants(plan: GemvPlan) -> tuple[int, int]:
    """The kernel's (km, ke) parameters: the nibble mask and the exponent bits its decoding ORs in -- the lean
    CUDA-core form's two-nibble pair, the exact form's one nibble under 128.0, the tensor-core form's pair under
    128.0 (bf16) / 1024.0 (fp16). Passed as parameters so that they sit in registers (see the source)."""
    if plan.mma:
        return 0x000F000F, 0x43004300 if plan.bf16 else 0x64006400
    return (0x000F000F, 0x43004300) if plan.lean else (0x000F0000, 0x43000000)


def sparse_maps(sp: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Load time: what the epilogue needs beside the packed SELL slots ``sp`` of an N-column layer (the range of
    heavy rows of every 32-column block). Raises ValueError for slots the epilogue cannot read (unpacked, or
    sparse slices)."""
    from .triton_marlin_gemv import gemv_maps

    return gemv_maps(sp, n)
