"""Run a CUDA kernel of ours on the CPU: its source compiled by the host C++ compiler with every thread of a block
as a host thread (tests only; no GPU, no CUDA toolkit).

The kernel source is compiled unchanged except for what a host compiler cannot take, which the source itself keeps
behind ``SP_HOST`` (its inline-PTX conversions, the ``extern __shared__`` declaration); this prelude supplies the
CUDA built-ins: ``threadIdx`` / ``blockIdx`` / ``gridDim`` per thread, ``__syncthreads`` as a barrier of the
block's threads, ``__shfl_xor_sync`` as an exchange through a barrier of the warp's 32 threads, ``__ldg`` as a
load that checks its address lies inside one of the buffers passed in (an out-of-range read sets an error flag
the launcher returns), the conversions with the GPU's rounding (bf16: round to nearest even; fp16: the host's
``_Float16``). Blocks run one after the other; shared memory is filled with a 0xAB pattern before each, so a read
of a panel entry the kernel did not write shows. Semantics a lock-step warp has and host threads do not (implicit
warp synchrony) are not emulated: a kernel relying on them fails here, which is what a test wants.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
typedef unsigned int u32;
typedef unsigned short u16;
struct sp_dim3 { unsigned x, y, z; };
static thread_local sp_dim3 threadIdx, blockIdx;
static sp_dim3 gridDim, blockDim;
struct alignas(16) uint4 { u32 x, y, z, w; };
struct alignas(8) uint2 { u32 x, y; };
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__
static inline int min(int a, int b) { return a < b ? a : b; }
static inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }

struct SpRange { const char* lo; const char* hi; };
static std::vector<SpRange> sp_ranges;
static std::atomic<int> sp_bad_reads{0};
template <class T> static inline T __ldg(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  bool ok = false;
  for (const SpRange& r : sp_ranges) ok = ok || (c >= r.lo && c + sizeof(T) <= r.hi);
  if (!ok) { sp_bad_reads++; return T(); }
  return *p;
}

static std::barrier<>* sp_block_bar;
static void __syncthreads() { sp_block_bar->arrive_and_wait(); }
struct SpWarp { std::barrier<> bar{32}; float v[32]; };
static thread_local SpWarp* sp_warp;
static float __shfl_xor_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31;
  sp_warp->v[lane] = v;
  sp_warp->bar.arrive_and_wait();
  const float r = sp_warp->v[lane ^ o];
  sp_warp->bar.arrive_and_wait();
  return r;
}
static u16* sp_panel;
static u16* sp_host_panel() { return sp_panel; }

static inline float sp_f16(u16 h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
static inline float act2f(u16 h) {
#if SP_BF16
  return __uint_as_float(((u32)h) << 16);
#else
  return sp_f16(h);
#endif
}
static inline u16 f2act(float f) {
#if SP_BF16
  u32 u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
#else
  _Float16 h = (_Float16)f; u16 r; std::memcpy(&r, &h, 2); return r;
#endif
}
static inline float slot_val(u32 w) {
#if SP_PACK == 1
  return __uint_as_float(w & 0xFFFF0000u);
#else
  return sp_f16((u16)(w >> 16));
#endif
}
"""

LAUNCHER = r"""
extern "C" int sp_launch(const u16* x, u16* y, const u32* ell, const int* rb, const int* hrows, const int* hptr,
                         const u32* hcols, int M, int N, int K, int S, int L, int H, int xs, int ys, int gx, int gy,
                         int threads, long smem, const long* ranges, int n_ranges) {
  sp_ranges.clear();
  for (int i = 0; i < n_ranges; ++i)
    sp_ranges.push_back({reinterpret_cast<const char*>(ranges[2 * i]),
                         reinterpret_cast<const char*>(ranges[2 * i + 1])});
  sp_bad_reads = 0;
  gridDim = {(unsigned)gx, (unsigned)gy, 1u};
  blockDim = {(unsigned)threads, 1u, 1u};
  std::vector<uint4> shm((smem + 15) / 16 + 1);
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      std::memset(shm.data(), 0xAB, shm.size() * sizeof(uint4));
      sp_panel = reinterpret_cast<u16*>(shm.data());
      std::barrier<> bar(threads);
      sp_block_bar = &bar;
      std::vector<std::unique_ptr<SpWarp>> warps;
      for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new SpWarp());
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = {(unsigned)t, 0u, 0u};
          blockIdx = {(unsigned)bx, (unsigned)by, 0u};
          sp_warp = warps[t / 32].get();
          sw_sell_panel(x, y, ell, rb, hrows, hptr, hcols, M, N, K, S, L, H, xs, ys);
        });
      for (auto& t : ts) t.join();
    }
  return sp_bad_reads.load();
}
"""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(source_head: str, kernel_src: str) -> ctypes.CDLL:
    """The kernel (``source_head`` = its variant's ``#define`` lines, ``kernel_src`` = the shared source) as a host
    shared library, cached by content in the temp directory."""
    code = "#define SP_HOST 1\n" + source_head + PRELUDE + kernel_src + LAUNCHER
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), "sw_cuda_emu")
    os.makedirs(d, exist_ok=True)
    so = os.path.join(d, f"k_{key}.so")
    if not os.path.exists(so):
        cc = os.path.join(d, f"k_{key}_{os.getpid()}.cc")
        with open(cc, "w") as f:
            f.write(code)
        tmp = so + f".partial-{os.getpid()}"
        cmd = [compiler() or "g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC"]
        subprocess.run([*cmd, "-o", tmp, cc], check=True, capture_output=True, text=True)
        os.replace(tmp, so)
        os.remove(cc)
    return ctypes.CDLL(so)
