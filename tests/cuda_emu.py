"""Run a CUDA kernel of ours on the CPU: its own source compiled by the host C++ compiler with every thread of a block
as a host thread (tests only; no GPU, no CUDA toolkit).

The kernel source is compiled unchanged; what a host compiler cannot take sits in the source behind ``SW_HOST`` /
``SP_HOST`` (inline PTX, ``extern __shared__``), which call the ``emu_*`` functions of this prelude instead. The
prelude supplies the CUDA built-ins the kernels use: ``threadIdx`` / ``blockIdx`` / ``gridDim`` per thread,
``__shared__`` as function statics (blocks run one after the other, so they are the block's shared memory),
``__syncthreads`` / ``__syncwarp`` as barriers of the block's / warp's threads (a thread that returns leaves them,
as on the GPU), ``__shfl_xor_sync`` and ``mma.sync.m16n8k16`` as exchanges through the warp's barrier (the MMA
with the PTX ISA's fragment layout, products summed in fp32), ``cp.async`` as a plain copy (data there early is
what the wait guarantees anyway), ``atomicAdd`` / ``__threadfence`` as host atomics and fences, ``__ldg`` /
``__ldcg`` as loads that check their address lies inside one of the buffers passed in (an out-of-range read is
counted and returned by the launcher), and the 16-bit conversions with the GPU's rounding (bf16: to nearest even;
fp16: the host's ``_Float16``). The dynamic shared memory is filled with a 0xAB pattern before each block, so a
read of an entry the kernel did not write shows. What a lock-step warp has and host threads do not (implicit warp
synchrony) is not emulated: a kernel relying on it fails here, which is what a test wants.

    lib = build(source, "kernel_name", ["const u16*", "u16*", "int", ...])   # compiled once, cached by content
    bad = launch(lib, (gx, gy), threads, smem, [tensor_or_int, ...], check=[tensors])
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import torch

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define SW_HOST 1
#define SP_HOST 1
typedef unsigned int u32;
typedef unsigned short u16;
struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx, blockIdx;
static emu_dim3 gridDim, blockDim;
struct alignas(16) uint4 { u32 x, y, z, w; };
struct alignas(8) uint2 { u32 x, y; };
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
static inline int min(int a, int b) { return a < b ? a : b; }
static inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline u32 __float_as_uint(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }

struct EmuRange { const char* lo; const char* hi; };
static std::vector<EmuRange> emu_ranges;
static std::atomic<int> emu_bad_reads{0};
template <class T> static inline T __ldg(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  bool ok = false;
  for (const EmuRange& r : emu_ranges) ok = ok || (c >= r.lo && c + sizeof(T) <= r.hi);
  if (!ok) { emu_bad_reads++; return T(); }
  return *p;
}
template <class T> static inline T __ldcg(const T* p) { return __ldg(p); }
static inline u32 atomicAdd(u32* p, u32 v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

struct EmuWarp {
  std::barrier<> bar{32};
  float v[32];
  u32 a[32][4], b[32][2];
  float c[32][4];
};
static std::barrier<>* emu_block_bar;
static thread_local EmuWarp* emu_warp;
static void __syncthreads() { emu_block_bar->arrive_and_wait(); }
static void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31;
  emu_warp->v[lane] = v;
  emu_warp->bar.arrive_and_wait();
  const float r = emu_warp->v[lane ^ o];
  emu_warp->bar.arrive_and_wait();
  return r;
}
static unsigned char* emu_smem;
static void* emu_dynamic_smem() { return emu_smem; }

static inline float emu_f16(u16 h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
static inline float emu_act2f(u16 h, int bf16) { return bf16 ? __uint_as_float(((u32)h) << 16) : emu_f16(h); }
static inline u16 emu_f2act(float f, int bf16) {
  if (bf16) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
  }
  _Float16 h = (_Float16)f; u16 r; std::memcpy(&r, &h, 2); return r;
}
static inline void emu_copy(const void* dst, const void* src, int bytes) {
  for (int i = 0; i < bytes; i += 4) {  // through the checked load: the copy's source must lie in a buffer
    const u32 w = __ldg(reinterpret_cast<const u32*>(static_cast<const char*>(src) + i));
    std::memcpy(static_cast<char*>(const_cast<void*>(dst)) + i, &w, 4);
  }
}
// fma.rn.{bf16x2,f16x2}: each half a * b + c, rounded once (the operands here are small integers: exact in fp32)
static inline u32 emu_fma2(u32 a, u32 b, u32 c, int bf16) {
  u32 d = 0;
  for (int h = 0; h < 2; ++h) {
    const int s = 16 * h;
    const float r = std::fma(emu_act2f((u16)(a >> s), bf16), emu_act2f((u16)(b >> s), bf16),
                             emu_act2f((u16)(c >> s), bf16));
    d |= (u32)emu_f2act(r, bf16) << s;
  }
  return d;
}
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A B + C over the warp (PTX ISA fragment layout: g = lane / 4,
// t = lane % 4; A regs 0..3 = (row g, k 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); B regs 0..1 = (k
// 2t..2t+1, col g), (k 2t + 8.., g); C/D 0..3 = (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1); the lower half of a
// register is the lower index)
static void emu_mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1, int bf16) {
  const int lane = threadIdx.x & 31;
  EmuWarp* W = emu_warp;
  W->a[lane][0] = a0; W->a[lane][1] = a1; W->a[lane][2] = a2; W->a[lane][3] = a3;
  W->b[lane][0] = b0; W->b[lane][1] = b1;
  W->bar.arrive_and_wait();
  auto A = [&](int r, int k) {
    const u32 reg = W->a[(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return emu_act2f((u16)(reg >> (16 * (k & 1))), bf16);
  };
  auto B = [&](int k, int n) {
    const u32 reg = W->b[n * 4 + (k % 8) / 2][k >= 8 ? 1 : 0];
    return emu_act2f((u16)(reg >> (16 * (k & 1))), bf16);
  };
  const int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    float s = d[i];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[i] = s;
  }
  W->bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
"""

LAUNCHER = r"""
extern "C" int emu_launch(void** P, const long* I, int gx, int gy, int threads, long smem, const long* ranges,
                          int n_ranges) {
  emu_ranges.clear();
  for (int i = 0; i < n_ranges; ++i)
    emu_ranges.push_back({reinterpret_cast<const char*>(ranges[2 * i]),
                          reinterpret_cast<const char*>(ranges[2 * i + 1])});
  emu_bad_reads = 0;
  gridDim = {(unsigned)gx, (unsigned)gy, 1u};
  blockDim = {(unsigned)threads, 1u, 1u};
  std::vector<uint4> shm((smem + 15) / 16 + 1);
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      std::memset(shm.data(), 0xAB, shm.size() * sizeof(uint4));
      emu_smem = reinterpret_cast<unsigned char*>(shm.data());
      std::barrier<> bar(threads);
      emu_block_bar = &bar;
      std::vector<std::unique_ptr<EmuWarp>> warps;
      for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new EmuWarp());
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = {(unsigned)t, 0u, 0u};
          blockIdx = {(unsigned)bx, (unsigned)by, 0u};
          emu_warp = warps[t / 32].get();
          EMU_CALL;
          emu_warp->bar.arrive_and_drop();  // a returned thread no longer holds up its warp or block
          bar.arrive_and_drop();
        });
      for (auto& t : ts) t.join();
    }
  return emu_bad_reads.load();
}
"""


_PROBE: dict[str, bool] = {}


def compiler() -> str | None:
    """The host C++ compiler if it builds C++20 with ``<barrier>`` and ``_Float16`` (GCC 12+ on x86-64), else None:
    the emulated tests then skip."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    if cxx not in _PROBE:
        src = "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); _Float16 h = 1; "
        src += "return h != 1; }\n"
        with tempfile.TemporaryDirectory() as d:
            cc, exe = os.path.join(d, "probe.cc"), os.path.join(d, "probe")
            with open(cc, "w") as f:
                f.write(src)
            res = subprocess.run([cxx, "-std=c++20", "-pthread", "-o", exe, cc], capture_output=True)
            _PROBE[cxx] = res.returncode == 0
    return cxx if _PROBE[cxx] else None


def build(source: str, name: str, params: list[str]) -> ctypes.CDLL:
    """``source`` (a kernel's full CUDA source, its variant's #defines included) with a launcher calling kernel
    ``name`` whose parameters have the C types ``params`` (pointers end in ``*``), as a host shared library cached by
    content in the temp directory."""
    args, np_, ni = [], 0, 0
    for t in params:
        if t.endswith("*"):
            args.append(f"({t})P[{np_}]")
            np_ += 1
        else:
            args.append(f"({t})I[{ni}]")
            ni += 1
    call = f"{name}({', '.join(args)})"
    code = PRELUDE + source + LAUNCHER.replace("EMU_CALL", call)
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), "sw_cuda_emu")
    os.makedirs(d, exist_ok=True)
    so = os.path.join(d, f"k_{key}.so")
    if not os.path.exists(so):
        cc = os.path.join(d, f"k_{key}_{os.getpid()}.cc")
        with open(cc, "w") as f:
            f.write(code)
        tmp = so + f".partial-{os.getpid()}"
        cmd = [compiler() or "g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC", "-w"]
        res = subprocess.run([*cmd, "-o", tmp, cc], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"host compile of {name} failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, so)
        os.remove(cc)
    lib = ctypes.CDLL(so)
    lib.emu_launch.restype = ctypes.c_int
    return lib


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def launch(lib, grid: tuple[int, int], threads: int, smem: int, args: list, check: list[torch.Tensor]) -> int:
    """Run the kernel over ``grid`` blocks of ``threads`` threads: ``args`` in the kernel's parameter order, CPU
    tensors for pointers (an empty tensor passes NULL) and ints. ``check``: the tensors checked loads may read.
    Returns the number of loads outside them."""
    ptrs = [ctypes.c_void_p(a.data_ptr() if a.numel() else 0) for a in args if isinstance(a, torch.Tensor)]
    ints = [int(a) for a in args if not isinstance(a, torch.Tensor)]
    ranges: list[int] = []
    for t in check:
        if t.numel():
            ranges += list(_span(t))
    P = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
    Iv = (ctypes.c_long * max(1, len(ints)))(*ints)
    R = (ctypes.c_long * max(1, len(ranges)))(*ranges)
    return lib.emu_launch(P, Iv, grid[0], grid[1], threads, ctypes.c_long(smem), R, len(ranges) // 2)
