"""The packed SELL correction ``y[m, r] += v * x[m, c]`` with x staged in shared memory (CUDA C, NVRTC; issue 12).

Why: the Triton SELL kernel (``triton_sparse``) gathers ``x[m, c]`` from global memory for every held-out entry and
token. At 2-15 tokens each gathered element is its own 32-byte sector; from 16 tokens a first kernel transposes x
(so a term's tokens are one contiguous run) and the main kernel gathers from that copy. On the H200 (session 29,
q/k/v 12288 x 4096, 0.40 % held out, after Marlin) that costs 6.8 us at 8 tokens and 11.1 + 2.8 (transpose) us at
64, against the ~12 us a layer that issue 12's "hold-out within 5 %" allows end to end at batch 64 (measured: ~17).

This kernel reads x once per block instead: a block copies the x rows of its token block (``MB`` tokens) into
shared memory, transposed to ``[K][MB]`` (each warp loads 32 consecutive k of one row per instruction, coalesced),
then its warps walk output-row slices of the packed SELL layout; a lane's term reads the ``MB`` tokens of its
column as one 4- to 32-byte shared-memory load and adds ``MB`` FMAs into fp32 registers. No transpose kernel, no
gather from global memory per term, one launch. The layout, the fp32 sums in slot order and the one rounding into
y are the Triton kernel's (no two warps write the same element of y: no atomics, deterministic); heavy rows (CSR)
take one warp each, reduced across its lanes in a fixed order.

The cost it trades: every block of a token block copies the whole ``K x MB`` panel (64 KB for a 4096-column layer
at 8 tokens) however few of its columns the block's slices use, so there are at most ``per_sm`` blocks an SM and
as many warps as slices. Measured on the H200 (session 31, 7B q/k/v after Marlin): correct (its GPU tests pass) and
SLOWER than the Triton path at every token count -- 10.6 vs 7.1 us at 8 tokens, 32.1 vs 11.2 + 3.1 at 64: the panel
copies cost more than the gathers they replace. Opt-in (``SUPERWEIGHT_SPARSE_PANEL``) for study; the Triton kernel
stays the default and serves what this one does not take (unpacked slots, lanes other than 32, x or y not bf16 / fp16,
more than ``max_m`` tokens, a panel larger than the GPU's shared memory).

    plan, why = panel_plan(m, k, items, device_limits(i), config())   # shapes only: MB, warps, grid, smem
    prepare(k, act_dtype, pack, device)                                # load time: its variants compiled
    sell_panel_(y, x, ell_cols, ell_rb, hrows, hptr, hcols, pack)      # in place, current stream; False: not taken

Checked without a GPU by ``tests/cuda_emu.py``, which compiles this source for the host (``SP_HOST``) and runs
every thread of a block as a host thread, against the float64 reference (``tests/test_cuda_sell.py``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from .. import envs
from .cuda_marlin_gemv import act_conversions

log = logging.getLogger("vllm.superweight_rtn")  # vLLM's log shows it

MAX_MB = 16  # tokens a panel holds (the largest load a lane issues per term: 32 bytes)
LANES = 32  # rows a slice: one warp, one lane a row
DEFAULT_WARPS = 8
DEFAULT_MAX_M = 96  # the one-copy pairs send 2..95 tokens to the separate correction
KERNEL = "sw_sell_panel"
PREFETCH = 16  # slots of a warp's first slice loaded before the panel copy
FILL_BATCH = 64  # x words a thread has in flight while it copies the panel (64 / MB k pairs, MB loads each)

_SRC = (
    r"""
typedef unsigned int u32;
typedef unsigned short u16;

"""
    + act_conversions("SP")
    + r"""// a packed slot: value bits << 16 | column (0 = empty)
__device__ __forceinline__ float slot_val(u32 w) {
#ifdef SP_HOST
  return emu_act2f((u16)(w >> 16), SP_PACK == 1);
#elif SP_PACK == 1
  return __uint_as_float(w & 0xFFFF0000u);
#else
  float f; u16 h = (u16)(w >> 16); asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#endif
}
__device__ __forceinline__ void fma2(float* a, u32 t, float v) {
  a[0] = fmaf(v, act2f((u16)(t & 0xFFFFu)), a[0]);
  a[1] = fmaf(v, act2f((u16)(t >> 16)), a[1]);
}
// acc[0..MB) += v * panel[col][0..MB)
__device__ __forceinline__ void add_term(float* acc, const u16* panel, u32 w) {
  const float v = slot_val(w);
  const u16* p = panel + (size_t)(w & 0xFFFFu) * SP_MB;
#if SP_MB >= 8
#pragma unroll
  for (int q = 0; q < SP_MB / 8; ++q) {
    const uint4 t = *reinterpret_cast<const uint4*>(p + 8 * q);
    fma2(acc + 8 * q, t.x, v); fma2(acc + 8 * q + 2, t.y, v);
    fma2(acc + 8 * q + 4, t.z, v); fma2(acc + 8 * q + 6, t.w, v);
  }
#elif SP_MB == 4
  const uint2 t = *reinterpret_cast<const uint2*>(p);
  fma2(acc, t.x, v); fma2(acc + 2, t.y, v);
#elif SP_MB == 2
  fma2(acc, *reinterpret_cast<const u32*>(p), v);
#else
  acc[0] = fmaf(v, act2f(p[0]), acc[0]);
#endif
}
// panel[k][0..MB) = the MB values gathered for column k, as one vector store
__device__ __forceinline__ void put_col(u16* panel, int k, const u16* v) {
  u16* p = panel + (size_t)k * SP_MB;
#if SP_MB >= 8
#pragma unroll
  for (int q = 0; q < SP_MB / 8; ++q) {
    const u16* s = v + 8 * q;
    uint4 t;
    t.x = (u32)s[0] | ((u32)s[1] << 16); t.y = (u32)s[2] | ((u32)s[3] << 16);
    t.z = (u32)s[4] | ((u32)s[5] << 16); t.w = (u32)s[6] | ((u32)s[7] << 16);
    *reinterpret_cast<uint4*>(p + 8 * q) = t;
  }
#elif SP_MB == 4
  uint2 t; t.x = (u32)v[0] | ((u32)v[1] << 16); t.y = (u32)v[2] | ((u32)v[3] << 16);
  *reinterpret_cast<uint2*>(p) = t;
#elif SP_MB == 2
  *reinterpret_cast<u32*>(p) = (u32)v[0] | ((u32)v[1] << 16);
#else
  p[0] = v[0];
#endif
}

// grid (blocks per token block, token blocks), SP_WARPS * 32 threads, K * SP_MB * 2 bytes of dynamic shared memory.
// x [M, K] (row stride xs), y [M, N] (row stride ys); ell [S, L, 32] packed slots of row blocks rb[S];
// heavy rows hrows[H] with entries hcols[hptr[h] .. hptr[h + 1]).
extern "C" __global__ void __launch_bounds__(SP_WARPS * 32)
sw_sell_panel(const u16* __restrict__ x, u16* __restrict__ y, const u32* __restrict__ ell,
              const int* __restrict__ rb, const int* __restrict__ hrows, const int* __restrict__ hptr,
              const u32* __restrict__ hcols, int M, int N, int K, int S, int L, int H, int xs, int ys) {
#ifndef SP_HOST
  extern __shared__ __align__(16) u16 panel[];
#else
  u16* panel = static_cast<u16*>(emu_dynamic_smem());
#endif
  const int m0 = blockIdx.y * SP_MB;
  const int mc = min(SP_MB, M - m0);
  const u16* xb = x + (size_t)m0 * xs;
  const int lane = threadIdx.x & 31;
  const int it0 = blockIdx.x * SP_WARPS + (threadIdx.x >> 5);  // the warp's first task
  // the first slots of the warp's first slice requested before the panel copy: their latency hides behind it
  u32 pre[SP_PF];
#pragma unroll
  for (int q = 0; q < SP_PF; ++q) pre[q] = 0u;
  if (it0 < S) {
    const u32* sl = ell + (size_t)it0 * L * 32 + lane;
#pragma unroll
    for (int q = 0; q < SP_PF; ++q)
      if (q < L) pre[q] = __ldg(sl + (size_t)q * 32);
  }
  // the panel: x rows m0 .. m0 + mc transposed, zeros for the rows past M
#if SP_X2
  // k pairs: a warp reads 128 contiguous bytes of a row per load (x rows 4-byte aligned, K even); SP_FB pairs a
  // thread with all their loads issued before the first store (SP_FB x SP_MB loads in flight a thread)
  const int K2 = K >> 1;
  for (int b0 = threadIdx.x; b0 < K2; b0 += SP_FB * SP_WARPS * 32) {
    u32 t[SP_FB][SP_MB];
#pragma unroll
    for (int f = 0; f < SP_FB; ++f) {
      const int k2 = b0 + f * SP_WARPS * 32;
#pragma unroll
      for (int m = 0; m < SP_MB; ++m)
        t[f][m] = (m < mc && k2 < K2) ? __ldg(reinterpret_cast<const u32*>(xb + (size_t)m * xs) + k2) : 0u;
    }
#pragma unroll
    for (int f = 0; f < SP_FB; ++f) {
      const int k2 = b0 + f * SP_WARPS * 32;
      if (k2 < K2) {
        u16 lo[SP_MB], hi[SP_MB];
#pragma unroll
        for (int m = 0; m < SP_MB; ++m) {
          lo[m] = (u16)(t[f][m] & 0xFFFFu);
          hi[m] = (u16)(t[f][m] >> 16);
        }
        put_col(panel, 2 * k2, lo);
        put_col(panel, 2 * k2 + 1, hi);
      }
    }
  }
#else
  for (int k = threadIdx.x; k < K; k += SP_WARPS * 32) {
    u16 v[SP_MB];
#pragma unroll
    for (int m = 0; m < SP_MB; ++m) v[m] = m < mc ? __ldg(xb + (size_t)m * xs + k) : (u16)0;
    put_col(panel, k, v);
  }
#endif
  __syncthreads();

  const int stride = gridDim.x * SP_WARPS;
  for (int it = it0; it < S + H; it += stride) {  // warp-uniform
    float acc[SP_MB];
#pragma unroll
    for (int m = 0; m < SP_MB; ++m) acc[m] = 0.f;
    if (it < S) {
      // light slice: lane = row rb * 32 + lane; its slots fill from 0, so an empty first slot = no entries
      const u32* sl = ell + (size_t)it * L * 32 + lane;
      const bool first = it == it0;
      const u32 w0 = first ? pre[0] : __ldg(sl);
      const int row = __ldg(rb + it) * 32 + lane;
      if (w0 != 0u && row < N) {
        int j = 1;
        if (first) {
#pragma unroll
          for (int q = 0; q < SP_PF; ++q)
            if (pre[q] != 0u) add_term(acc, panel, pre[q]);
          j = SP_PF;
        } else {
          add_term(acc, panel, w0);
        }
        for (; j + 8 <= L; j += 8) {  // eight slots' loads in flight before their terms
          u32 w[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) w[q] = __ldg(sl + (size_t)(j + q) * 32);
#pragma unroll
          for (int q = 0; q < 8; ++q)
            if (w[q] != 0u) add_term(acc, panel, w[q]);
        }
        for (; j < L; ++j) {
          const u32 w = __ldg(sl + (size_t)j * 32);
          if (w != 0u) add_term(acc, panel, w);
        }
        u16* yp = y + (size_t)m0 * ys + row;
#pragma unroll
        for (int m = 0; m < SP_MB; ++m)
          if (m < mc) yp[(size_t)m * ys] = f2act(act2f(yp[(size_t)m * ys]) + acc[m]);
      }
    } else {
      // heavy row: the warp's lanes take every 32nd entry, then a fixed butterfly sums the lanes
      const int h = it - S;
      const int row = __ldg(hrows + h);
      const int e1 = __ldg(hptr + h + 1);
      for (int e = __ldg(hptr + h) + lane; e < e1; e += 32) {
        const u32 w = __ldg(hcols + e);
        if (w != 0u) add_term(acc, panel, w);
      }
#pragma unroll
      for (int m = 0; m < SP_MB; ++m) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
      }
      if (lane == 0 && row < N) {
        u16* yp = y + (size_t)m0 * ys + row;
#pragma unroll
        for (int m = 0; m < SP_MB; ++m)
          if (m < mc) yp[(size_t)m * ys] = f2act(act2f(yp[(size_t)m * ys]) + acc[m]);
      }
    }
  }
}
"""
)


@dataclass(frozen=True)
class PanelConfig:
    """Launch knobs (``SUPERWEIGHT_SPARSE_PANEL``): the largest token block, warps a block, blocks an SM (0: as many
    as the shared memory allows, at most 8), the largest batch taken (larger ones: the Triton kernel), blocks in all
    (0: SMs x blocks an SM; fewer blocks copy fewer panels -- each copies all K columns of its token block -- and
    walk more slices each)."""

    mb: int = MAX_MB
    warps: int = DEFAULT_WARPS
    per_sm: int = 0
    max_m: int = DEFAULT_MAX_M
    blocks: int = 0


@dataclass(frozen=True)
class DeviceLimits:
    """What the plan needs from the GPU (``torch.cuda.get_device_properties``)."""

    sms: int
    smem_block: int  # opt-in dynamic shared memory a block may use
    smem_sm: int  # shared memory of one SM


@dataclass(frozen=True)
class PanelPlan:
    mb: int  # tokens a panel
    warps: int
    grid: tuple[int, int]  # (blocks per token block, token blocks)
    smem: int  # dynamic shared memory, bytes
    x2: bool  # the panel copy reads x in 4-byte pairs


def config() -> PanelConfig | None:
    """The knob parsed: None where it is off (the default)."""
    over = envs.sparse_panel()
    if over is None:
        return None
    return PanelConfig(**over)


def panel_plan(
    m: int, k: int, items: int, limits: DeviceLimits, cfg: PanelConfig = PanelConfig(), x2: bool = True
) -> tuple[PanelPlan | None, str | None]:
    """The launch for ``m`` tokens of a ``k``-column layer with ``items`` warp tasks (light slices + heavy rows),
    from shapes only (no device reads). ``(None, why)`` where this kernel does not take it."""
    if not 1 <= m <= cfg.max_m:
        return None, f"{m} tokens (the panel kernel takes 1..{cfg.max_m})"
    if items <= 0:
        return None, "no held-out entries"
    mb = 1
    while mb < min(m, cfg.mb, MAX_MB):
        mb *= 2
    while mb > 1 and k * mb * 2 > limits.smem_block:
        mb //= 2
    smem = k * mb * 2
    if smem > limits.smem_block:
        return None, f"a {k}-column panel ({smem} bytes) exceeds this GPU's {limits.smem_block} bytes a block"
    per_sm = max(1, min(8, limits.smem_sm // max(smem, 1)))
    if cfg.per_sm:
        per_sm = min(per_sm, cfg.per_sm)
    blocks_m = -(-m // mb)
    need = -(-items // cfg.warps)  # one task a warp
    target = cfg.blocks or limits.sms * per_sm
    gx = max(1, min(need, -(-target // blocks_m)))
    return PanelPlan(mb, cfg.warps, (gx, blocks_m), smem, bool(x2 and k % 2 == 0)), None


def kernel_source(mb: int, warps: int, bf16: bool, pack: int, x2: bool) -> str:
    """The CUDA source of one variant (what NVRTC compiles and the disk cache is keyed by)."""
    if mb not in (1, 2, 4, 8, 16) or pack not in (1, 2):
        raise ValueError(f"panel kernel: no variant for mb={mb}, pack={pack}")
    return (
        f"#define SP_MB {mb}\n#define SP_WARPS {warps}\n#define SP_BF16 {int(bf16)}\n#define SP_PACK {pack}\n"
        f"#define SP_X2 {int(x2)}\n#define SP_PF {PREFETCH}\n#define SP_FB {max(1, FILL_BATCH // mb)}\n" + _SRC
    )


_lock = threading.Lock()
_kernels: dict[tuple, object] = {}
_limits: dict[int, DeviceLimits] = {}
_failed: dict[tuple, str] = {}
_announced: set[PanelConfig] = set()
_prepared: set[tuple] = set()  # (device, K, dtypes, config) already prepared


def device_limits(index: int) -> DeviceLimits:
    lim = _limits.get(index)
    if lim is None:
        p = torch.cuda.get_device_properties(index)
        lim = _limits[index] = DeviceLimits(
            sms=int(p.multi_processor_count),
            smem_block=int(getattr(p, "shared_memory_per_block_optin", 48 * 1024)),
            smem_sm=int(getattr(p, "shared_memory_per_multiprocessor", 100 * 1024)),
        )
    return lim


def _kernel(index: int, mb: int, warps: int, bf16: bool, pack: int, x2: bool, smem: int):
    """The compiled variant on device ``index`` with room for ``smem`` bytes (compiled once, cached on disk)."""
    key = (index, mb, warps, bf16, pack, x2)
    kern = _kernels.get(key)
    if kern is None or kern._max_shared_mem_bytes < smem:  # type: ignore[attr-defined]
        from . import cuda_marlin_gemv as CG

        with _lock:
            kern = _kernels.get(key)
            if kern is None:
                ok, why = CG.available()
                if not ok:
                    raise RuntimeError(f"panel kernel: {why}")
                with torch.cuda.device(index):
                    kern = CG._compile(kernel_source(mb, warps, bf16, pack, x2), KERNEL)
            if kern._max_shared_mem_bytes < smem:  # type: ignore[attr-defined]
                with torch.cuda.device(index):
                    kern.set_shared_memory_config(max(smem, 48 * 1024))  # type: ignore[attr-defined]
            _kernels[key] = kern
    return kern


def _pack_code(pack: torch.dtype) -> int:
    from .sparse_layout import PACK_DTYPES

    return PACK_DTYPES.index(pack) + 1


def takes(y: torch.Tensor, x: torch.Tensor, ell_cols: torch.Tensor, pack: torch.dtype | None) -> bool:
    """Whether the panel kernel serves this correction (the knob on, CUDA, 16-bit x and y of one dtype, packed slots
    of 32 lanes, unit column strides); the plan may still refuse the shape."""
    if pack is None or config() is None or not y.is_cuda:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or y.dtype != x.dtype:
        return False
    if ell_cols.dim() != 3 or ell_cols.shape[2] != LANES or y.stride(1) != 1 or x.stride(1) != 1:
        return False
    return True


def prepare(k: int, act_dtype: torch.dtype, pack: torch.dtype, device: torch.device) -> None:
    """Load time: compile and load every variant the plan can pick for a ``k``-column layer (1..max_m tokens), so
    no compile happens inside a captured CUDA graph. A failure is logged once and the Triton kernel keeps the work."""
    cfg = config()
    if cfg is None or device.type != "cuda" or act_dtype not in (torch.bfloat16, torch.float16):
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    done = (index, k, act_dtype, pack, cfg)
    if done in _prepared:  # every layer of one shape asks: plan and load once
        return
    _prepared.add(done)
    lim = device_limits(index)
    seen = set()
    for m in range(1, cfg.max_m + 1):
        plan, _ = panel_plan(m, k, 1, lim, cfg)
        if plan is None:
            continue
        key = (plan.mb, plan.x2, plan.smem)
        if key in seen:
            continue
        seen.add(key)
        fkey = (index, plan.mb, cfg.warps, act_dtype == torch.bfloat16, _pack_code(pack), plan.x2)
        if fkey in _failed:
            continue
        try:
            _kernel(index, plan.mb, cfg.warps, act_dtype == torch.bfloat16, _pack_code(pack), plan.x2, plan.smem)
        except Exception as e:  # noqa: BLE001  (a torch without NVRTC, a driver refusing the module, ...)
            _failed[fkey] = f"{type(e).__name__}: {e}"
            log.warning("superweight: the shared-memory SELL kernel is unavailable (%s); the Triton kernel serves", e)
    if seen and cfg not in _announced and not _failed:
        _announced.add(cfg)
        log.info(
            "superweight_rtn held-out correction: shared-memory CUDA kernel up to %d tokens (%s), Triton above",
            cfg.max_m,
            cfg,
        )


def sell_panel_(
    y: torch.Tensor,
    x: torch.Tensor,
    ell_cols: torch.Tensor,
    ell_rb: torch.Tensor,
    hrows: torch.Tensor,
    hptr: torch.Tensor,
    hcols: torch.Tensor,
    pack: torch.dtype,
    cfg: PanelConfig | None = None,
) -> bool:
    """``y += S x^T`` in place (y [M, N], x [M, K]) through the panel kernel. Returns False (nothing done) where the
    plan refuses the shape or the kernel failed to build: the caller runs the Triton kernel then. ``cfg``: the
    launch knobs (default: ``SUPERWEIGHT_SPARSE_PANEL``; nothing done where that is off)."""
    cfg = cfg or config()
    if cfg is None:
        return False
    m, k = x.shape
    n = y.shape[1]
    s, depth, _ = ell_cols.shape
    s_run = s if depth else 0
    h = hrows.shape[0]
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    x2 = x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
    plan, _why = panel_plan(m, k, s_run + h, device_limits(index), cfg, x2=x2)
    if plan is None:
        return m == 0 or s_run + h == 0  # nothing to add is done; otherwise the Triton kernel
    bf16 = x.dtype == torch.bfloat16
    fkey = (index, plan.mb, plan.warps, bf16, _pack_code(pack), plan.x2)
    if fkey in _failed:
        return False
    kern = _kernels.get(fkey)
    if kern is None or kern._max_shared_mem_bytes < plan.smem:  # type: ignore[attr-defined]
        if torch.cuda.is_current_stream_capturing():
            return False  # never compile or load a module inside a graph capture (``prepare`` does it at load)
        try:
            kern = _kernel(index, plan.mb, plan.warps, bf16, _pack_code(pack), plan.x2, plan.smem)
        except Exception as e:  # noqa: BLE001
            _failed[fkey] = f"{type(e).__name__}: {e}"
            log.warning("superweight: the shared-memory SELL kernel is unavailable (%s); the Triton kernel serves", e)
            return False
    dummy = ell_cols if ell_cols.numel() else hcols
    kern(  # type: ignore[operator]
        grid=(plan.grid[0], plan.grid[1], 1),
        block=(plan.warps * 32, 1, 1),
        args=[
            x,
            y,
            ell_cols if ell_cols.numel() else dummy,
            ell_rb if ell_rb.numel() else dummy,
            hrows if h else dummy,
            hptr if h else dummy,
            hcols if hcols.numel() else dummy,
            m,
            n,
            k,
            s_run,
            depth,
            h,
            x.stride(0),
            y.stride(0),
        ],
        shared_mem=plan.smem,
    )
    return True
