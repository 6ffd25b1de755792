#!/usr/bin/env python3
"""Micro-benchmark of the fused W4A16 GEMM (``kernels/triton_w4.py``) on one GPU (H200 / H100).

Four Llama-2-7B layer GEMMs (TP 1): qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008, g128
asymmetric. ``--layers`` (default 2) distinct layers run back to back inside one CUDA graph (2 x 101 MB of W4
weights > the 60 MB L2), timed with CUDA events over graph replays (median of ``--iters``); times are per layer.

Sections (each written to the JSON as soon as it finishes; ``--budget-s`` skips what would not fit):
  meta      device, versions, measured device-to-device copy bandwidth, layout bytes vs AWQ
  check     our kernel vs a float reference on the GPU (M = 1, 16, 256): relative error, with and without hold-out
  main      per M in --ms: ours without / with a 0.1 % random hold-out (+ one super weight in down_proj),
            vLLM's Marlin and Machete (if vLLM imports), Machete / Marlin + the existing separate sparse kernel;
            us per layer, achieved TB/s and fraction of the peak (4.8 TB/s H200, or --peak-bw), ratios
  m1        M = 1 per linear: us, TB/s, % of peak for each of the four GEMMs (ours and Marlin / Machete)
  spsweep   correction variants at M = 1, 16, 64: SP mode (atomic / one-hot), token rows per scatter, entries
            per chunk, sparse-index block (128 / 256 / 512): cost over the same kernel without hold-out
  sweep     small config sweep per M bucket (BN, BM, warps, stages, split-K, dequant, scale placement), no
            hold-out; the best per M is re-timed with the hold-out; writes "best_table" (paste into CONFIGS)
  prefill   main section for M = 512..4096
  paths     the one-layout paths per M (GEMV variants, MMA table, dequantize + cuBLAS), with / without hold-out,
            beside cuBLAS on dense bf16 weights; writes "path_table" (the fastest path per M, with hold-out)
  onecopy   the Marlin + dequantize pair over two W4 copies vs one (--sections onecopy; needs vLLM): Marlin +
            the SELL correction vs + the restore-index correction (small M), dequantize from our layout vs from
            Marlin's + cuBLAS (large M)
  gemv      M <= 4 (--gemv-ms): the GEMV over Marlin's layout with the correction in its epilogue, every launch
            variant and column-group split, vs Marlin and Marlin + the packed SELL correction; "gemv_best"
  overlap   M < 96 (--overlap-ms): Marlin + the packed SELL correction serial vs the correction on a side stream
            beside Marlin (one y += z after the join); "overlap_gain"
  unroll    M < 96 (--overlap-ms): Marlin + the packed SELL correction, looped form vs unrolled form (+ tile
            variants); "unroll_best" (its SUPERWEIGHT_SPARSE_TILES)

Usage: python benchmarks/w4_fused_bench.py --out $OUT/w4_fused_bench.json [--budget-s 420] [--quick]
       python benchmarks/w4_fused_bench.py --dry-run-cpu      # tiny shapes through the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/vllm_linear.py (vLLM kernel harness)

if "--dry-run-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
DECODE_MS = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256]
PREFILL_MS = [512, 1024, 2048, 4096]
PEAK_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9}
T0 = time.time()
DRY = False
SELL_ORDER = ("ell_cols", "ell_vals", "ell_rb", "hrows", "hptr", "hcols", "hvals", "ucols")
GEMV_VARIANTS = [
    ("gemv bn128 w1", dict(PATH="gemv", BN=128, warps=1)),
    ("gemv bn128 w1 st2", dict(PATH="gemv", BN=128, warps=1, stages=2)),
    ("gemv bn128 w1 st3", dict(PATH="gemv", BN=128, warps=1, stages=3)),
    ("gemv bn128 w1 r128", dict(PATH="gemv", BN=128, warps=1, maxnreg=128)),
    ("gemv bn128 w1 st2 r128", dict(PATH="gemv", BN=128, warps=1, stages=2, maxnreg=128)),
    ("gemv bn128 w1 st2 waves32", dict(PATH="gemv", BN=128, warps=1, stages=2, WAVES=32)),
    ("gemv bn256 w2 st2", dict(PATH="gemv", BN=256, warps=2, stages=2)),
    ("gemv bn256 w2", dict(PATH="gemv", BN=256, warps=2)),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def time_graph(fn, iters: int = 30) -> float:
    """Median us of one ``fn()`` over replays of a CUDA graph holding it (warm-up and compile outside)."""
    if DRY:
        fn()
        return 1.0
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0)
    del g
    return statistics.median(ts)


def copy_bandwidth() -> float:
    if DRY:
        return float("nan")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_graph(lambda: b.copy_(a), iters=10)

    return 2 * n / (us * 1e-6) / 1e12


# ------------------------------------------------------------------------------------------------------------
# parallel JIT warm-up: every (config, hold-out, sparse block) the run will launch is compiled first in worker
# processes on small layers with the same argument specializations (multiples of 16), filling Triton's on-disk
# cache; the timed process then loads the binaries instead of compiling ~90 variants one after the other.
# ------------------------------------------------------------------------------------------------------------
_WARM_LAYERS: dict = {}


def _warm_one(job):
    cfg, sp, spb = job
    t = time.time()
    try:
        from vllm_superweight.kernels import triton_w4 as T

        key = (sp, spb)
        if key not in _WARM_LAYERS:
            n, k = 256, 1024
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32, device="cuda")
            s = (torch.rand(n, k // 128, generator=g, device="cuda") * 0.01 + 0.002).to(torch.bfloat16)
            z = torch.randint(0, 16, (n, k // 128), generator=g, dtype=torch.int32, device="cuda")
            gc = torch.Generator().manual_seed(1)
            flat = torch.randperm(n * k, generator=gc)[: max(1, n * k // 1000)]
            r, c = flat // k, flat % k
            v = torch.randn(r.numel(), generator=gc) * 0.05
            prep = T.prepare_w4(q, s, z, 128, False, r, c, v, n, k, "cuda", sp_block=spb)
            _WARM_LAYERS[key] = prep if sp else T.without_sparse(prep)
        prep = _WARM_LAYERS[key]
        ms = (1, 300) if cfg.get("BM", 16) >= 128 else (1,)
        if cfg.get("PATH") == "gemv":
            ms = (1, 2, 3)  # BM = 1, 2, 4
        elif cfg.get("PATH") == "deq":
            ms = (300,)
        for m in ms:
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            sks = (1, 2) if not (sp and cfg.get("SP", 2) == 2) else (2,)
            for sk in sks:  # both epilogues (direct store / workspace) unless the atomic correction forces one
                T.w4_mm(x, prep, config=dict(cfg, SK=sk))
        torch.cuda.synchronize()
        return None, time.time() - t
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:300]}", time.time() - t


def warm_compile(jobs, workers: int):
    import multiprocessing as mp

    uniq, seen = [], set()
    for cfg, sp, spb in jobs:
        key = json.dumps([cfg, sp, spb], sort_keys=True)
        if key not in seen:
            seen.add(key)
            uniq.append((cfg, sp, spb))
    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        res = pool.map(_warm_one, uniq, chunksize=1)
    errs = [(j, e) for j, (e, _) in zip(uniq, res) if e]
    log(
        f"warm-up: {len(uniq)} variants compiled by {workers} workers in {time.time() - t:.0f} s "
        f"(sum of compile times {sum(d for _, d in res):.0f} s), {len(errs)} errors"
    )
    return {
        "variants": len(uniq),
        "wall_s": time.time() - t,
        "cpu_s": sum(d for _, d in res),
        "errors": [[j[0], j[1], j[2], e] for j, e in errs][:10],
    }


_SIDE: dict = {}


def correction_beside(gemm, x: torch.Tensor, sp: dict, n: int) -> torch.Tensor:
    """``gemm() + S x^T`` with the SELL correction on a side stream WHILE the GEMM runs (session 12's experiment;
    not on the serving path: H200, 7B layer, 0.86-0.91x the serial pair at M = 1..64): the side stream zeroes an
    fp32 z and adds S x^T into it, then, after the join, one ``y += z`` (bitwise the serial result)."""
    import vllm_superweight.kernels as K

    cur = torch.cuda.current_stream(x.device)
    side = _SIDE.setdefault(x.device.index, torch.cuda.Stream(device=x.device))
    z = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        z.zero_()
        K.sparse_correction(z, x, sp)
    y = gemm()
    cur.wait_stream(side)
    return y.add_(z)


def marlin_out(e: dict, x: torch.Tensor, n: int) -> torch.Tensor:
    """vLLM's Marlin GEMM of layer ``e`` (zeros in the dry run: no Marlin on a CPU)."""
    if e.get("marlin") is None:
        return torch.zeros(x.shape[0], n, dtype=x.dtype)
    layer, kobj = e["marlin"]
    return kobj.apply_weights(layer, x)


# ------------------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        from vllm_superweight.kernels import triton_w4 as T

        self.T = T
        self.args = args
        self.dev = torch.device("cpu" if DRY else "cuda")
        if DRY:
            self.name, sms, cap = "cpu-dry-run", 0, [0, 0]
        else:
            p = torch.cuda.get_device_properties(self.dev)
            self.name, sms, cap = p.name, p.multi_processor_count, list(torch.cuda.get_device_capability())
        self.peak = args.peak_bw or next(
            (v for key, v in PEAK_TBS.items() if key.lower() in self.name.lower()), float("nan")
        )
        import triton

        self.meta = {
            "device": self.name,
            "sm_count": sms,
            "capability": cap,
            "peak_bw_tbs": self.peak,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "layers": args.layers,
            "shapes": SHAPES if not DRY else "tiny (dry run)",
            "holdout_frac": args.holdout,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "table": [[m, c] for m, c in T.CONFIGS],
        }
        self.rows: list[dict] = []
        self.vl = None  # tests/vllm_linear (vLLM) or None
        try:
            if args.no_vllm or DRY:
                raise ImportError("disabled")
            import vllm  # noqa: F401
            import vllm_linear as VL

            self.vl = VL
            self.meta["vllm"] = vllm.__version__
        except Exception as e:  # noqa: BLE001
            self.meta["vllm"] = f"unavailable: {type(e).__name__}: {e}"
            log(f"vLLM unavailable ({e}): Marlin / Machete columns skipped")

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.time() - T0)

    def add(self, **rec) -> None:
        if rec.get("bytes") and rec.get("us"):
            rec["tbs"] = rec["bytes"] / (rec["us"] * 1e-6) / 1e12
            if self.peak == self.peak:
                rec["frac_peak"] = rec["tbs"] / self.peak
        self.rows.append(rec)
        keys = ("section", "kernel", "shape", "m", "us", "tbs", "frac_peak", "ratio", "note")
        log(
            "  "
            + " ".join(
                f"{k}={rec[k]:.4g}" if isinstance(rec.get(k), float) else f"{k}={rec[k]}" for k in keys if k in rec
            )
        )

    def save(self) -> None:
        out = os.path.abspath(self.args.out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.meta["elapsed_s"] = time.time() - T0
        with open(out + ".tmp", "w") as f:
            json.dump({"meta": self.meta, "results": self.rows}, f, indent=1, default=str)
        os.replace(out + ".tmp", out)

    # -- layers -----------------------------------------------------------------------------------------------
    def build(self):
        """Random g128 asym W4 layers (codes, scales, zeros on the device), 0.1 % hold-out + a super weight in
        down_proj; our prepared layouts (with / without entries) and, with vLLM, Marlin and Machete layers."""
        T, dev = self.T, self.dev
        self.layers = []
        for li in range(self.args.layers):
            d = {}
            for name, (n, k) in self.shapes.items():
                g = torch.Generator(device=dev).manual_seed(1000 * li + n + k)
                q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32, device=dev)
                s = (torch.rand(n, k // 128, generator=g, device=dev) * 0.01 + 0.002).to(torch.bfloat16)
                z = torch.randint(0, 16, (n, k // 128), generator=g, dtype=torch.int32, device=dev)
                gc = torch.Generator().manual_seed(li * 10 + len(d))
                nnz = max(1, int(round(n * k * self.args.holdout)))
                flat = torch.randperm(n * k, generator=gc)[:nnz]
                if name == "down":  # one planted super weight
                    flat = torch.unique(torch.cat([flat, torch.tensor([(n // 2) * k + k // 3])]))
                r, c = flat // k, flat % k
                v = (torch.randn(r.numel(), generator=gc) * 0.05).to(torch.bfloat16).float()
                if name == "down":
                    v[(r == n // 2) & (c == k // 3)] = -2.5
                q[r.to(dev), c.to(dev)] = z[r.to(dev), (c // 128).to(dev)]  # held-out codes dequantize to 0
                prep = T.prepare_w4(q, s, z, 128, False, r, c, v, n, k, dev)
                ent = {"q": q, "s": s, "z": z, "r": r, "c": c, "v": v, "prep": prep, "prep0": T.without_sparse(prep)}
                if self.vl is not None:
                    w = {"q": q, "scales": s, "zeros": z, "group": 128, "symmetric": False, "n": n, "k": k}
                    for kname in ("machete", "marlin"):
                        try:
                            ent[kname] = self.vl.build_mp_layer(w, kname)
                        except Exception as e:  # noqa: BLE001
                            ent[kname] = None
                            self.meta.setdefault("vllm_build_errors", {})[kname] = f"{type(e).__name__}: {e}"
                    import vllm_superweight.kernels as K

                    ent["sell"] = K.prepare_sparse(r, c, v, n, k, dev, layout="sell")
                if {"onecopy", "gemv", "overlap", "unroll"} & set(self.args.sections):
                    self.add_onecopy(ent, n, k)
                d[name] = ent
            self.layers.append(d)
        if not DRY:
            torch.cuda.synchronize()
        mem = {name: T.memory_bytes(self.layers[0][name]["prep"]) for name in self.shapes}
        awq = {name: n * k // 2 + n * (k // 128) * 2 + n * (k // 128) // 2 for name, (n, k) in self.shapes.items()}
        self.meta["layout_bytes"] = mem
        self.meta["awq_bytes"] = awq
        self.meta["bytes_vs_awq"] = sum(m["total"] for m in mem.values()) / sum(awq.values())
        self.meta["bytes_vs_awq_no_holdout"] = sum(m["base"] for m in mem.values()) / sum(awq.values())
        self.meta["holdout_nnz"] = {name: T.prep_info(self.layers[0][name]["prep"])["nnz"] for name in self.shapes}
        log(
            f"layers built; our bytes / AWQ = {self.meta['bytes_vs_awq']:.4f} (base only "
            f"{self.meta['bytes_vs_awq_no_holdout']:.4f})"
        )

    def wbytes(self, kind: str, names=None) -> int:
        names = names or list(self.shapes)
        tot = 0
        for name in names:
            n, k = self.shapes[name]
            if kind in ("ours", "ours_sp"):
                mem = self.T.memory_bytes(self.layers[0][name]["prep"])
                tot += mem["total"] if kind == "ours_sp" else mem["base"]
            else:  # vLLM: packed codes + bf16 scales + packed zeros
                tot += n * k // 2 + n * (k // 128) * 2 + n * (k // 128) // 2
        return tot

    def iobytes(self, m: int, names=None) -> int:
        return sum(m * k * 2 + m * n * 2 for name, (n, k) in self.shapes.items() if name in (names or self.shapes))

    def xs(self, m: int):
        g = torch.Generator(device=self.dev).manual_seed(m)
        return {
            name: torch.randn(m, k, generator=g, device=self.dev).to(torch.bfloat16)
            for name, (n, k) in self.shapes.items()
        }

    def zeros(self, m: int, dtype=torch.bfloat16) -> dict:
        """An [M, N] output of each matrix, zeroed (a correction's target outside any GEMM)."""
        return {name: torch.zeros(m, n, dtype=dtype, device=self.dev) for name, (n, _) in self.shapes.items()}

    def fits(self, section: str, m: int, need_s: float) -> bool:
        """Whether ``need_s`` seconds of the budget are left for batch ``m``; if not, the skip is recorded."""
        if self.left() < need_s:
            self.add(section=section, m=m, note="skipped: time budget")
            return False
        return True

    def runner(self, kind: str, xs: dict, config=None, names=None, prep_key=None):
        """fn() running ``kind`` over every layer and linear in ``names``."""
        T = self.T
        names = names or list(self.shapes)
        import vllm_superweight.kernels as K

        def f():
            for lay in self.layers:
                for name in names:
                    e, x = lay[name], xs[name]
                    if kind in ("ours", "ours_sp"):
                        T.w4_mm(x, e[prep_key or ("prep" if kind == "ours_sp" else "prep0")], config=config)
                    else:
                        base, sp = kind.split("+") if "+" in kind else (kind, None)
                        layer, kobj = e[base]
                        y = kobj.apply_weights(layer, x)
                        if sp:
                            K.sparse_correction(y, x, e["sell"])

        return f

    def timed(self, kind, m, xs, config=None, names=None, prep_key=None):
        try:
            return time_graph(self.runner(kind, xs, config, names, prep_key), self.args.iters) / len(self.layers)
        except Exception as e:  # noqa: BLE001
            self.add(section="error", kernel=kind, m=m, note=f"{type(e).__name__}: {str(e)[:300]}")
            if self.args.verbose:
                traceback.print_exc()
            return None

    def time_kind(self, section: str, kind: str, m: int, fn, base: float | None = None) -> float | None:
        """us per layer of ``fn`` (CUDA-graph replays), recorded under ``section`` with its ratio to ``base``; a
        failure is recorded as an error row and gives None."""
        try:
            us = time_graph(fn, self.args.iters) / len(self.layers)
        except Exception as e:  # noqa: BLE001
            self.add(section="error", kernel=kind, m=m, note=f"{type(e).__name__}: {str(e)[:300]}")
            return None
        self.add(section=section, kernel=kind, m=m, us=us, ratio=(us / base) if base else None)
        return us

    # -- sections ---------------------------------------------------------------------------------------------
    def section_check(self):
        T = self.T
        for m in (1, 16, 256):
            xs = self.xs(m)
            for name in self.shapes:
                e, x = self.layers[0][name], xs[name]
                w = (e["q"].float() - e["z"].float().repeat_interleave(128, 1)) * e["s"].float().repeat_interleave(
                    128, 1
                )
                ref0 = x.float() @ w.T
                w[e["r"].to(self.dev), e["c"].to(self.dev)] = e["v"].to(self.dev)
                ref = x.float() @ w.T
                del w
                for kind, key, want in (("ours_sp", "prep", ref), ("ours", "prep0", ref0)):
                    y = T.w4_mm(x, e[key]).float()
                    rel = float((y - want).norm() / want.norm())
                    self.add(
                        section="check",
                        kernel=kind,
                        shape=name,
                        m=m,
                        rel_err=rel,
                        note="OK" if rel < 1e-2 else "TOO LARGE",
                    )
                if self.vl is not None and e.get("machete") is not None:
                    layer, kobj = e["machete"]
                    y = kobj.apply_weights(layer, x).float()
                    self.add(
                        section="check",
                        kernel="machete",
                        shape=name,
                        m=m,
                        rel_err=float((y - ref0).norm() / ref0.norm()),
                    )
        self.save()

    def kinds(self):
        ks = ["ours", "ours_sp"]
        if self.vl is not None:
            for base in ("machete", "marlin"):
                if self.layers[0]["o"].get(base) is not None:
                    ks += [base, base + "+sparse"]
        return ks

    def section_main(self, ms, section="main"):
        for m in ms:
            if not self.fits(section, m, 20):
                continue
            xs = self.xs(m)
            res = {}
            for kind in self.kinds():
                us = self.timed(kind, m, xs)
                if us is None:
                    continue
                res[kind] = us
                wb = self.wbytes("ours_sp" if kind == "ours_sp" else ("ours" if kind == "ours" else "vllm"))
                self.add(section=section, kernel=kind, m=m, us=us, bytes=wb + self.iobytes(m))
            base = [res[k] for k in ("machete", "marlin") if k in res]
            summ = {"section": section + "_ratio", "m": m}
            if base:
                best = min(base)
                summ.update(
                    best_vllm_us=best,
                    ours_speedup_vs_best_vllm=best / res["ours"] if "ours" in res else None,
                    ours_sp_speedup_vs_best_vllm_sp=(
                        min(res[k] for k in ("machete+sparse", "marlin+sparse") if k in res) / res["ours_sp"]
                    )
                    if "ours_sp" in res and any(k in res for k in ("machete+sparse", "marlin+sparse"))
                    else None,
                )
                if "machete" in res and "ours" in res:
                    summ["ours_speedup_vs_machete(AWQ)"] = res["machete"] / res["ours"]
            if "ours" in res and "ours_sp" in res:
                summ["holdout_cost"] = res["ours_sp"] / res["ours"] - 1.0
            self.rows.append(summ)
            log("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summ.items()}))
            self.save()

    def section_m1(self):
        xs = self.xs(1)
        for name in self.shapes:
            for kind in self.kinds():
                if "+" in kind:
                    continue
                us = self.timed(kind, 1, xs, names=[name])
                if us is None:
                    continue
                wb = self.wbytes("ours_sp" if kind == "ours_sp" else ("ours" if kind == "ours" else "vllm"), [name])
                self.add(section="m1", kernel=kind, shape=name, m=1, us=us, bytes=wb + self.iobytes(1, [name]))
        self.save()

    def section_spsweep(self):
        """Correction variants (cost over the same kernel with no entries)."""
        T = self.T
        extra = {}
        for spb in (128, 512):  # other sparse-index blocks: re-prepare the first layer's entries (device repack)
            if self.left() < 60:
                break
            for lay in self.layers:
                for name, e in lay.items():
                    n, k = self.shapes[name]
                    e[f"prep_spb{spb}"] = T.prepare_w4(
                        e["q"], e["s"], e["z"], 128, False, e["r"], e["c"], e["v"], n, k, self.dev, sp_block=spb
                    )
            extra[spb] = f"prep_spb{spb}"
        for m in (1,) if DRY else (1, 16, 64):
            if self.left() < 30:
                break
            xs = self.xs(m)
            base_cfg = T.pick_config(m)
            us0 = self.timed("ours", m, xs, config=base_cfg)
            variants = [
                ("default", base_cfg, None),
                ("SP=1 one-hot", dict(base_cfg, SP=1), None),
                ("E=16", dict(base_cfg, E=16), None),
                ("E=64", dict(base_cfg, E=64), None),
                ("static chunks", dict(base_cfg, NCH=-1), None),
            ]
            if m > 1:
                variants.append(("SP_BM=1..", dict(base_cfg, SP_BM=max(1, base_cfg.get("SP_BM", 16) // 4)), None))
            for spb, key in extra.items():
                variants.append(
                    (f"sp_block={spb}", dict(base_cfg, BN=min(base_cfg["BN"], 1 << (16 - (spb.bit_length() - 1)))), key)
                )
            for label, cfg, key in variants:
                if self.left() < 15:
                    break
                us = self.timed("ours_sp", m, xs, config=cfg, prep_key=key)
                if us is None or us0 is None:
                    continue
                self.add(section="spsweep", kernel=label, m=m, us=us, us_without=us0, ratio=us / us0, config=cfg)
            self.save()

    def candidates(self, m: int):
        T = self.T
        base = T.pick_config(m)
        c = [("table", base)]
        if m <= 16:
            c += [
                ("BN256", dict(base, BN=256)),
                ("BN64", dict(base, BN=64)),
                ("w8", dict(base, warps=8)),
                ("stages3", dict(base, stages=3)),
                ("stages2", dict(base, stages=2)),
                ("SK1", dict(base, SK=1)),
                ("plain-dequant", dict(base, ASM=0)),
                ("scale_w", dict(base, SCALE_W=True)),
            ]
            if m <= 2:
                c += [
                    ("FMA BM1", dict(BM=1, BN=64, DOT=False, SCALE_W=False, SP=2, warps=4, stages=3, SK=0)),
                    (
                        "SK x2",
                        dict(base, SK=2 * max(1, T.plan(m, T.prep_info(self.layers[0]["o"]["prep"]), base)["SK"])),
                    ),
                ]
        elif m <= 64:
            c += [
                ("BM16", dict(base, BM=16)),
                ("BM32", dict(base, BM=32)),
                ("BN64", dict(base, BN=64)),
                ("BN256", dict(base, BN=256)),
                ("w8", dict(base, warps=8)),
                ("SK1", dict(base, SK=1)),
                ("scale_w flip", dict(base, SCALE_W=not base.get("SCALE_W", True))),
            ]
        elif m <= 256:
            c += [
                ("BM64 BN128 w4", dict(base, BM=64, BN=128, warps=4)),
                ("BM128 BN256", dict(base, BN=256)),
                ("BM64 BN256 w8", dict(base, BM=64, BN=256)),
                ("stages4", dict(base, stages=4)),
                ("SK2", dict(base, SK=2)),
            ]
        else:
            c += [
                ("BN128", dict(base, BN=128)),
                ("BM64", dict(base, BM=64)),
                ("stages4", dict(base, stages=4)),
                ("stages2", dict(base, stages=2)),
                ("w4", dict(base, warps=4)),
            ]
        return c

    def section_sweep(self):
        best = {}
        for m in self.args.sweep_ms:
            if not self.fits("sweep", m, 30):
                continue
            xs = self.xs(m)
            times = {}
            for label, cfg in self.candidates(m):
                if self.left() < 15:
                    break
                us = self.timed("ours", m, xs, config=cfg)
                if us is None:
                    continue
                times[label] = (us, cfg)
                self.add(
                    section="sweep", kernel=label, m=m, us=us, bytes=self.wbytes("ours") + self.iobytes(m), config=cfg
                )
            if not times:
                continue
            label, (us, cfg) = min(times.items(), key=lambda kv: kv[1][0])
            us_sp = self.timed("ours_sp", m, xs, config=cfg) if self.left() > 15 else None
            best[m] = {
                "label": label,
                "us": us,
                "us_holdout": us_sp,
                "config": cfg,
                "table_us": times.get("table", (None,))[0],
            }
            self.add(
                section="sweep_best",
                kernel=label,
                m=m,
                us=us,
                us_holdout=us_sp,
                ratio=(us_sp / us) if us_sp else None,
                config=cfg,
            )
            self.meta["best_table"] = best
            self.save()

    def add_onecopy(self, ent: dict, n: int, k: int) -> None:
        """The one-copy pair's inputs: Marlin's tensors (vLLM's processed layer; without vLLM, in the dry run, vLLM's
        python reference of the layout), the restore index of the held-out entries and their packed SELL slots."""
        import vllm_superweight.kernels as K
        from vllm_superweight.kernels import triton_marlin_deq as MD

        ent["mdeq1"] = MD.marlin_deq_layout(ent["r"], ent["c"], ent["v"], n, k, 128, False, torch.bfloat16, self.dev)
        r, c, v = ent["r"], ent["c"], ent["v"]
        ent["psell"] = K.prepare_sparse(r, c, v, n, k, self.dev, layout="sell", pack=torch.bfloat16)
        if "sell" not in ent:  # the two-copy pair's SELL layout (built with vLLM's layers; the dry run has none)
            ent["sell"] = K.prepare_sparse(r, c, v, n, k, self.dev, layout="sell")
        if ent.get("marlin") is not None:
            layer = ent["marlin"][0]
            ent["mq"] = (layer.weight_packed, layer.weight_scale, layer.weight_zero_point)
        elif DRY:
            from test_triton_marlin_deq import marlin_layout

            inputs = {"q": ent["q"].cpu(), "scales": ent["s"].cpu(), "zeros": ent["z"].cpu(), "sym": False}
            ent["mq"] = marlin_layout(inputs, n, k, 128)
        if "mq" in ent:
            from vllm_superweight.kernels import triton_marlin_gemv as MG

            ent["gmaps"] = MG.gemv_maps(ent["psell"], ent["mq"][0].shape[1] // 2)
            # deeper packed slices than the chosen depth L: fewer (or no) heavy rows, more padded slots -- session
            # 11 found the heavy-row list to be the whole cost of the GEMV's correction (diagnostic kinds below)
            counts = torch.bincount(r.long().cpu(), minlength=n)
            depth = int(ent["psell"]["ell_cols"].shape[1])
            ent["psell_deep"], ent["gmaps_deep"] = {}, {}
            for tag, d in (("+2", depth + 2), ("+4", depth + 4), (" max", int(counts.max()))):
                if d > depth and tag.strip() not in ent["psell_deep"]:
                    sp = K.prepare_sparse(r, c, v, n, k, self.dev, layout="sell", pack=torch.bfloat16, depth=d)
                    ent["psell_deep"][tag.strip()] = sp
                    ent["gmaps_deep"][tag.strip()] = MG.gemv_maps(sp, ent["mq"][0].shape[1] // 2)

    def section_gemv(self):
        """The small-batch GEMV over Marlin's layout with the held-out correction in its epilogue (issue 12) vs
        Marlin alone and Marlin + the packed SELL correction (today's one-copy default), per M <= 4 and per
        launch variant / column-group split; us per layer (4 GEMMs), TB/s of the W4 bytes (AWQ's count)."""
        import vllm_superweight.kernels as K
        from vllm_superweight.kernels import triton_marlin_gemv as MG

        if "mq" not in self.layers[0]["o"]:
            self.add(section="gemv", note="skipped: no Marlin layer (vLLM unavailable)")
            return

        def slots(e, deep):
            """(packed SELL layout, GEMV maps) of one matrix: the deeper-slice variant ``deep`` ("+2", "+4", "max")
            where it exists (the chosen depth may already be the deepest), else the default."""
            if deep is not None and deep in e["psell_deep"]:
                return e["psell_deep"][deep], e["gmaps_deep"][deep]
            return e["psell"], e["gmaps"]

        def slot_bytes(deep):  # the packed slots' bytes over one layer's four matrices (4 B a slot)
            sps = [slots(self.layers[0][nm], deep)[0] for nm in self.shapes]
            return sum(int(sp["ell_cols"].numel() + sp["hcols"].numel()) * 4 for sp in sps)

        def run(kind, xs, cfg=None, gs=None):
            deep = kind.rsplit(" depth", 1)[1].strip() if " depth" in kind else None

            def f():
                for lay in self.layers:
                    for name, (n, k) in self.shapes.items():
                        e, x = lay[name], xs[name]
                        psell, maps = slots(e, deep)
                        if kind.startswith("gemv"):
                            sp = None if kind.startswith("gemv no hold-out") else psell
                            if kind == "gemv slots only":  # where the correction's cost sits (diagnostic)
                                sp = dict(sp, hrows=sp["hrows"][:0])
                            elif kind == "gemv heavy rows only":
                                sp = dict(sp, ell_cols=sp["ell_cols"][:, :0])
                            MG.marlin_gemv(x, *e["mq"], n, k, 128, False, sp, maps, config=cfg, gs=gs)
                            continue
                        y = marlin_out(e, x, n)
                        if kind.startswith("marlin+packed sell"):
                            K.sparse_correction(y, x, psell)

            return f

        wb = self.wbytes("awq")
        best: dict = {}
        for m in self.args.gemv_ms:
            if not self.fits("gemv", m, 15):
                continue
            xs = self.xs(m)
            bm = MG._bm(m)
            dflt = MG.GEMV_CONFIGS[bm]
            kinds: list = [("marlin", None, None), ("marlin+packed sell", None, None)]
            kinds += [("gemv no hold-out", None, None), ("gemv", None, None)]
            if m == 1:
                kinds += [("gemv slots only", None, None), ("gemv heavy rows only", None, None)]
                for d in ("+2", "+4", "max"):  # deeper slices, fewer heavy rows (both correction paths)
                    kinds += [(f"gemv depth {d}", None, None), (f"marlin+packed sell depth {d}", None, None)]
            kinds += [(f"gemv {dflt} gs{g}", dflt, g) for g in (1, 4)]  # column groups per program (default 2)
            kinds += [(f"gemv {c} auto", c, None) for c in MG.GEMV_VARIANTS if c != dflt]  # tiles / warps
            base = None
            for kind, cfg, gs in kinds:
                if self.left() < 8:
                    break
                try:
                    us = time_graph(run(kind, xs, cfg, gs), self.args.iters) / len(self.layers)
                except Exception as e:  # noqa: BLE001
                    self.add(section="error", kernel=kind, m=m, note=f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                base = us if kind == "marlin" else base
                extra = {}
                if " depth" in kind:  # the memory price of the deeper slices
                    extra["sparse_bytes"] = slot_bytes(kind.rsplit(" depth", 1)[1].strip())
                    extra["sparse_bytes_default"] = slot_bytes(None)
                self.add(
                    section="gemv", kernel=kind, m=m, us=us, bytes=wb, ratio=(us / base) if base else None, **extra
                )
                if (
                    kind.startswith("gemv")
                    and "no hold-out" not in kind
                    and " only" not in kind
                    and " depth" not in kind
                ):
                    b = best.setdefault(str(m), {"us": float("inf")})
                    if us < b["us"]:
                        best[str(m)] = {"us": us, "config": list(cfg or dflt), "gs": gs, "kernel": kind}
            self.meta["gemv_best"] = best
            self.save()

    def section_overlap(self):
        """Marlin + the packed SELL correction (the one-copy default below 256 tokens) serial vs the correction on a
        side stream beside Marlin (``correction_beside``: fp32 buffer, one ``y += z`` after the join), per M
        (--overlap-ms); with the correction alone and Marlin + the join's add alone for scale. us per layer (4
        GEMMs); "overlap_gain" in meta: serial / overlapped per M."""
        import vllm_superweight.kernels as K

        if "mq" not in self.layers[0]["o"]:
            self.add(section="overlap", note="skipped: no Marlin layer (vLLM unavailable)")
            return

        def run(kind, xs, ys, zs):
            def f():
                for lay in self.layers:
                    for name, (n, _k) in self.shapes.items():
                        e, x = lay[name], xs[name]
                        if kind == "packed sell alone":
                            K.sparse_correction(ys[name], x, e["psell"])
                        elif kind == "marlin || packed sell" and not DRY:
                            correction_beside(lambda e=e, x=x, n=n: marlin_out(e, x, n), x, e["psell"], n)
                        else:
                            y = marlin_out(e, x, n)
                            if kind.startswith("marlin+packed sell") or kind == "marlin || packed sell":
                                K.sparse_correction(y, x, e["psell"])
                            elif kind == "marlin + add":
                                y.add_(zs[name])

            return f

        gain = {}
        for m in self.args.overlap_ms:
            if not self.fits("overlap", m, 15):
                continue
            xs = self.xs(m)
            ys, zs = self.zeros(m), self.zeros(m, torch.float32)
            res = {}
            for kind in ("marlin", "marlin+packed sell", "marlin || packed sell", "packed sell alone", "marlin + add"):
                us = self.time_kind("overlap", kind, m, run(kind, xs, ys, zs), res.get("marlin"))
                if us is not None:
                    res[kind] = us
            if "marlin+packed sell" in res and "marlin || packed sell" in res:
                gain[str(m)] = res["marlin+packed sell"] / res["marlin || packed sell"]
            self.meta["overlap_gain"] = gain
            self.save()
        log("overlap: serial / side stream per M: " + ", ".join(f"{m}: {g:.3f}" for m, g in gain.items()))

    def section_unroll(self):
        """The packed SELL correction after Marlin (the one-copy pair's small batches) in its looped form (default
        tiles) vs the unrolled form (``SparseTiles(unroll=1)``: the slice depth as one straight-line pass, no
        cross-slot reductions; the transposed path's xt padded to whole M blocks, 16-byte gathers), with the
        transposed path from fewer tokens (tmin) and fewer tokens per program (bmt); per M (--overlap-ms), us per
        layer (4 GEMMs). meta "unroll_best": the fastest tiles over M < 96 and their SUPERWEIGHT_SPARSE_TILES."""
        import dataclasses

        from vllm_superweight.kernels import triton_sparse as TS

        if "mq" not in self.layers[0]["o"]:
            self.add(section="unroll", note="skipped: no Marlin layer (vLLM unavailable)")
            return
        u = dataclasses.replace(TS.DEFAULT_TILES, unroll=1, bm_transposed=64)
        variants = {  # "default": the looped form, the default up to session 11 (session 12's runs: same tiles)
            "default": dataclasses.replace(u, unroll=0),
            "unroll": u,
            "unroll tmin4": dataclasses.replace(u, transpose_min_m=4),
            "unroll tmin8": dataclasses.replace(u, transpose_min_m=8),
            "unroll bmt32": dataclasses.replace(u, bm_transposed=32),
            "unroll bmt16": dataclasses.replace(u, bm_transposed=16),
            "unroll bmd4": dataclasses.replace(u, bm_direct=4),
            "unroll bmd1": dataclasses.replace(u, bm_direct=1),
        }

        def run(tiles, xs, alone, ys):
            def f():
                for lay in self.layers:
                    for name, (n, _k) in self.shapes.items():
                        e, x = lay[name], xs[name]
                        sp = e["psell"]
                        y = ys[name] if alone else marlin_out(e, x, n)
                        args = [sp[key] for key in SELL_ORDER]
                        TS.sparse_correction_(y, x, *args, int(sp["nnz"].shape[0]), tiles=tiles)

            return f

        sums: dict = {}
        for m in self.args.overlap_ms:
            if not self.fits("unroll", m, 15):
                continue
            xs = self.xs(m)
            ys = self.zeros(m)
            marlins = [(lay[nm], xs[nm], n) for lay in self.layers for nm, (n, _) in self.shapes.items()]
            base = self.time_kind("unroll", "marlin", m, lambda: [marlin_out(e, x, n) for e, x, n in marlins])
            for label, tiles in variants.items():
                for alone in (False, True):
                    if alone and label not in ("default", "unroll"):
                        continue
                    kind = ("packed sell alone " if alone else "marlin+packed sell ") + label
                    us = self.time_kind("unroll", kind, m, run(tiles, xs, alone, ys), base)
                    if us is not None and not alone and m < 96:
                        sums.setdefault(label, 0.0)
                        sums[label] += us
            self.save()
        if sums:
            best = min(sums, key=sums.get)
            t = variants[best]
            env = f"bmd={t.bm_direct},tmin={t.transpose_min_m},bmt={t.bm_transposed},unroll={t.unroll}"
            self.meta["unroll_best"] = {"variant": best, "us_sum": sums[best], "all": sums, "env": env}
            log(f"unroll: best {best} ({sums[best]:.1f} us summed over M; default {sums.get('default', 0):.1f})")

    def section_onecopy(self):
        """The Marlin + dequantize pair over two W4 copies vs one (issue 12), per M: small batches Marlin + the
        separate correction from the SELL layout vs from the one-copy restore index; large batches dequantized from
        our layout vs from Marlin's (both + cuBLAS); Marlin without correction and the dequantization alone for
        scale. us per layer (4 GEMMs)."""
        from vllm_superweight.kernels import triton_marlin_deq as MD

        if "mq" not in self.layers[0]["o"]:
            self.add(section="onecopy", note="skipped: no Marlin layer (vLLM unavailable)")
            return

        def run(kind, xs, cfg=None):
            def f():
                for lay in self.layers:
                    for name in self.shapes:
                        e, x = lay[name], xs[name]
                        if kind == "deq ours+cublas":
                            self.T.w4_mm(x, e["prep"], config={"PATH": "deq"})
                        elif kind == "deq marlin+cublas":
                            MD.marlin_deq_mm(x, *e["mq"], e["mdeq1"])
                        else:
                            y = marlin_out(e, x, e["mdeq1"]["info"].shape[0])
                            if kind.startswith("marlin+sell") or kind.startswith("marlin+packed sell"):
                                sp = e["psell"] if "packed" in kind else e["sell"]
                                tiles = TS.SparseTiles(bm_direct=cfg[1], transpose_min_m=cfg[2]) if cfg else None
                                args = [sp[key] for key in SELL_ORDER]
                                TS.sparse_correction_(y, x, *args, int(sp["nnz"].shape[0]), tiles=tiles)
                            elif kind.startswith("marlin+index"):
                                MD.index_correction_(y, x, e["mdeq1"], config=cfg)

            return f

        # every correction configuration of the one-copy index (the default first), at the batches Marlin serves
        corr_cfgs = [MD.CORR_CONFIG] + [c for c in MD.CORR_VARIANTS if c != MD.CORR_CONFIG]
        corr_us: dict = {}
        tiles_us: dict = {}  # SELL launch parameters (bm_direct, transpose_min_m), packed slots
        from vllm_superweight.kernels import triton_sparse as TS

        d = TS.DEFAULT_TILES
        tile_cfgs = [("sell", d.bm_direct, d.transpose_min_m)]
        tile_cfgs += [("sell", b, t) for b, t in ((1, 16), (2, 16), (4, 16), (2, 128), (4, 128), (8, 128))]

        for m in self.args.onecopy_ms:
            if not self.fits("onecopy", m, 20):
                continue
            xs = self.xs(m)
            kinds: list = [("marlin", None), ("marlin+sell", None)] if m <= 256 else []
            kinds += [(f"marlin+packed sell {c[1:]}", c) for c in tile_cfgs] if m <= 256 else []
            kinds += [(f"marlin+sell {c[1:]}", c) for c in tile_cfgs[1:]] if m < 96 else []
            kinds += [(f"marlin+index {c}", c) for c in corr_cfgs] if m <= 256 else []
            kinds += [("deq ours+cublas", None), ("deq marlin+cublas", None)] if m >= 64 else []
            base = None
            for kind, cfg in kinds:
                try:
                    us = time_graph(run(kind, xs, cfg), self.args.iters) / len(self.layers)
                except Exception as e:  # noqa: BLE001
                    self.add(section="error", kernel=kind, m=m, note=f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                base = us if kind == "marlin" else base
                if cfg is not None and m < 96 and not kind.startswith("marlin+sell"):
                    corr_us.setdefault(cfg, []).append(us)
                if cfg is not None and m < 96 and cfg[0] == "sell":
                    tiles_us.setdefault((kind.startswith("marlin+packed"), cfg), []).append(us)
                self.add(section="onecopy", kernel=kind, m=m, us=us, ratio=(us / base) if base else None)
            self.save()
        if corr_us:
            best = min(corr_us, key=lambda c: sum(corr_us[c]))
            self.meta["onecopy_best_correction"] = {"config": list(best), "us_sum_m_below_96": sum(corr_us[best])}
            if best[0] == "sell":  # the packed SELL kernel: only its kind goes into the one-copy config
                self.meta["onecopy_best_correction"]["config"] = ["sell"]
        if tiles_us:  # the fastest SELL tiles per layout (sum over the batches below 96) -> SUPERWEIGHT_SPARSE_TILES
            for packed in (True, False):
                cand = {c: sum(v) for (p, c), v in tiles_us.items() if p == packed}
                if cand:
                    b = min(cand, key=cand.get)
                    self.meta["sparse_tiles_best_" + ("packed" if packed else "sell")] = {
                        "bmd": b[1],
                        "tmin": b[2],
                        "us_sum_m_below_96": cand[b],
                        "all": {str(c[1:]): u for c, u in cand.items()},
                    }
            bp = self.meta.get("sparse_tiles_best_packed")
            if bp:
                self.meta["sparse_tiles_env"] = f"bmd={bp['bmd']},tmin={bp['tmin']}"
        if not DRY:
            scratch = self.T._deq_scratch(self.dev, torch.bfloat16, 22016 * 4096)
            deq_cfgs = [MD.DEQ_CONFIG] + [c for c in MD.DEQ_VARIANTS if c != MD.DEQ_CONFIG]

            def ours(e, c):
                return self.T.dequant_into(e["prep"], scratch)

            def marlins(e, c):
                return MD.dequant_marlin_into(*e["mq"], e["mdeq1"], scratch, config=c)

            jobs = [("dequant only, ours", None, ours)]
            jobs += [(f"dequant only, Marlin's {c}", c, marlins) for c in deq_cfgs]
            deq_us = {}
            for label, cfg, fn in jobs:

                def fq(fn=fn, cfg=cfg):
                    for lay in self.layers:
                        for name in self.shapes:
                            fn(lay[name], cfg)

                try:
                    us = time_graph(fq, self.args.iters) / len(self.layers)
                except Exception as e:  # noqa: BLE001
                    self.add(section="error", kernel=label, note=f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                if cfg is not None:
                    deq_us[cfg] = us
                self.add(section="onecopy", kernel=label, m=0, us=us)
            if deq_us:
                best = min(deq_us, key=deq_us.get)
                self.meta["onecopy_best_dequant"] = {"config": list(best), "us": deq_us[best]}
            parts = []
            if "onecopy_best_dequant" in self.meta:
                parts.append("deq=" + ":".join(str(v) for v in self.meta["onecopy_best_dequant"]["config"]))
            if "onecopy_best_correction" in self.meta:
                parts.append("corr=" + ":".join(str(v) for v in self.meta["onecopy_best_correction"]["config"]))
            self.meta["onecopy_env"] = ",".join(parts)  # SUPERWEIGHT_ONECOPY_CONFIG for the engine runs
            self.save()

    def section_paths(self):
        """The one-layout paths side by side per M, with and without the 0.1 % hold-out: the CUDA-core GEMV
        (variants), the MMA kernel (table), dequantize-into-scratch + cuBLAS; plus cuBLAS on dense bf16 weights
        (no W4) and the dequantization alone. Records the fastest path per M (with hold-out) as ``path_table``."""
        T = self.T
        dense = {}
        if not DRY:
            for name in self.shapes:
                dense[name] = [T.dequant_into(lay[name]["prep0"]).T.contiguous() for lay in self.layers]
        gemv_cfgs = GEMV_VARIANTS
        best: dict = {}
        for m in self.args.paths_ms:
            if not self.fits("paths", m, 20):
                continue
            xs = self.xs(m)
            cands = []
            if m <= T.GEMV_MAX_M:
                cands += gemv_cfgs if m <= 2 else gemv_cfgs[:1]
            if m <= 512:
                cands.append(("mma table", dict(T.pick_config(m), PATH="mma")))
            if m >= 16:
                cands.append(("deq+cublas", dict(PATH="deq")))
            for label, cfg in cands:
                us0 = self.timed("ours", m, xs, config=cfg)
                us1 = self.timed("ours_sp", m, xs, config=cfg)
                if us0 is None or us1 is None:
                    continue
                self.add(
                    section="paths", kernel=label, m=m, us=us1, us_without=us0, ratio=us1 / us0,
                    bytes=self.wbytes("ours_sp") + self.iobytes(m), config=cfg,
                )  # fmt: skip
                if m not in best or us1 < best[m][1]:
                    best[m] = (label, us1, us0, cfg)
            if dense:

                def fd(xs=xs):
                    for li in range(len(self.layers)):
                        for name in self.shapes:
                            torch.nn.functional.linear(xs[name], dense[name][li])

                us = time_graph(fd, self.args.iters) / len(self.layers)
                self.add(section="paths", kernel="cublas dense bf16", m=m, us=us)
            self.save()
        if not DRY:

            def fq():
                for lay in self.layers:
                    for name in self.shapes:
                        T.dequant_into(lay[name]["prep"], T._deq_scratch(self.dev, torch.bfloat16, 22016 * 4096))

            self.add(
                section="paths",
                kernel="dequant only (+entries)",
                m=0,
                us=time_graph(fq, self.args.iters) / len(self.layers),
            )
        self.meta["path_table"] = {
            str(m): {"label": b[0], "us_holdout": b[1], "us": b[2], "config": b[3]} for m, b in best.items()
        }
        log("best path per M (with hold-out): " + ", ".join(f"{m}: {b[0]} {b[1]:.1f}us" for m, b in best.items()))

    def warm_jobs(self):
        T = self.T
        jobs = []
        ms = sorted(set(self.args.ms + self.args.prefill_ms + self.args.sweep_ms + [1, 16, 64]))
        if not {"main", "prefill", "check", "sweep", "spsweep", "m1"} & set(self.args.sections):
            ms = []
        for m in ms:
            base = T.pick_config(m)
            jobs += [(base, False, 256), (base, True, 256)]
        if "spsweep" in self.args.sections:
            for m in (1, 16, 64):
                base = T.pick_config(m)
                for cfg in (
                    dict(base, SP=1),
                    dict(base, E=16),
                    dict(base, E=64),
                    dict(base, SP_BM=max(1, base.get("SP_BM", 16) // 4)),
                ):
                    jobs.append((cfg, True, 256))
                jobs += [(base, True, 128), (base, True, 512)]
        if "paths" in self.args.sections:
            for _, cfg in GEMV_VARIANTS:
                jobs += [(cfg, False, 256), (cfg, True, 256)]
            jobs += [(dict(PATH="deq"), False, 256), (dict(PATH="deq"), True, 256)]
            for m in self.args.paths_ms:
                if m <= 512:
                    base = dict(T.pick_config(m), PATH="mma")
                    jobs += [(base, False, 256), (base, True, 256)]
        if "sweep" in self.args.sections:
            for m in self.args.sweep_ms:
                for _, cfg in self.candidates(m):
                    jobs.append((cfg, False, 256))
        return jobs

    def run(self):
        args = self.args
        if not DRY:
            self.meta["copy_bw_tbs"] = copy_bandwidth()
            log(f"device {self.name}: copy bandwidth {self.meta['copy_bw_tbs']:.2f} TB/s (read + write)")
        self.shapes = (
            SHAPES if not DRY else {"qkv": (192, 256), "o": (64, 256), "gate_up": (344, 256), "down": (64, 384)}
        )
        self.build()
        self.save()
        if args.warm_workers > 0 and not DRY:
            try:
                self.meta["warmup"] = warm_compile(self.warm_jobs(), args.warm_workers)
            except Exception as e:  # noqa: BLE001
                self.meta["warmup"] = f"failed: {type(e).__name__}: {e}"
                log(f"warm-up failed ({e}); compiling on first use")
            self.save()
        for sec in args.sections:
            if self.left() < 10:
                self.meta.setdefault("skipped_sections", []).append(sec)
                continue
            log(f"section {sec} ({self.left():.0f} s left)")
            try:
                if sec == "check":
                    self.section_check()
                elif sec == "main":
                    self.section_main(args.ms)
                elif sec == "m1":
                    self.section_m1()
                elif sec == "spsweep":
                    self.section_spsweep()
                elif sec == "sweep":
                    self.section_sweep()
                elif sec == "prefill":
                    self.section_main(args.prefill_ms, section="prefill")
                elif sec == "paths":
                    self.section_paths()
                elif sec == "onecopy":
                    self.section_onecopy()
                elif sec == "gemv":
                    self.section_gemv()
                elif sec == "overlap":
                    self.section_overlap()
                elif sec == "unroll":
                    self.section_unroll()
            except Exception as e:  # noqa: BLE001
                self.add(section=sec, note=f"section failed: {type(e).__name__}: {str(e)[:500]}")
                traceback.print_exc()
            self.save()
        self.summary()
        self.save()

    def summary(self):
        print("\n=== fused W4 GEMM, one Llama-2-7B layer (4 GEMMs), us per layer ===")
        kinds = self.kinds()
        print(f"{'M':>5} " + " ".join(f"{k:>15}" for k in kinds) + f" {'ours/AWQ':>9} {'holdout':>8}")
        for sec in ("main", "prefill"):
            by_m = {}
            for r in self.rows:
                if r.get("section") == sec and r.get("us"):
                    by_m.setdefault(r["m"], {})[r["kernel"]] = r["us"]
            for m in sorted(by_m):
                d = by_m[m]
                sp = (d["ours_sp"] / d["ours"] - 1) if "ours" in d and "ours_sp" in d else float("nan")
                awq = (d["machete"] / d["ours"]) if "machete" in d and "ours" in d else float("nan")
                print(
                    f"{m:>5} "
                    + " ".join(f"{d.get(k, float('nan')):>15.1f}" for k in kinds)
                    + f" {awq:>8.2f}x {sp * 100:>7.1f}%"
                )
        m1 = [r for r in self.rows if r.get("section") == "m1" and r.get("frac_peak") is not None]
        if m1:
            print(
                "\nM = 1 per GEMM: "
                + "; ".join(f"{r['kernel']} {r['shape']} {r['us']:.1f} us {r['frac_peak'] * 100:.0f}%" for r in m1)
            )
        if self.meta.get("best_table"):
            print(
                "\nbest config per M (sweep): "
                + json.dumps({m: v["label"] for m, v in self.meta["best_table"].items()})
            )


def paths_table(files: list[str], ms=(1, 64, 128, 256, 1024, 4096)) -> str:
    """The ISSUE12_LOG's table of the one-layout paths (markdown) from result JSONs: for each M and column the first
    file (in the order given) that measured it; the M = 1 dequantize columns hold the GEMV (the path used there)."""
    recs = []
    for f in files:
        with open(f) as fh:
            recs.append(json.load(fh)["results"])

    def best(m, pred):
        for rows in recs:
            hits = [r for r in rows if r.get("m") == m and r.get("us") and pred(r)]
            if hits:
                return min(hits, key=lambda r: r["us"])
        return {}

    def pick(m, pred, key="us"):
        return best(m, pred).get(key)

    def fmt(v, ref=None):
        if v is None:
            return ""
        txt = f"{v:,.1f}"
        return f"**{txt} ({ref / v:.2f}×)**" if ref and ref / v > 1.05 else txt

    lines = [
        "| M | Machete (AWQ) | Machete + separate correction | Marlin + separate correction "
        "| ours, hold-out inside (dequantize + cuBLAS; M = 1: GEMV) | same, no hold-out | cuBLAS on dense bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in ms:
        main = {k: pick(m, lambda r, k=k: r["section"] in ("main", "prefill") and r.get("kernel") == k)
                for k in ("machete", "machete+sparse", "marlin+sparse")}  # fmt: skip
        ours_kind = (lambda r: str(r.get("kernel", "")).startswith("gemv")) if m == 1 else (
            lambda r: r.get("kernel") == "deq+cublas")  # fmt: skip
        rec = best(m, lambda r: r["section"] == "paths" and ours_kind(r))  # the fastest variant, with hold-out
        ours, ours0 = rec.get("us"), rec.get("us_without")
        dense = pick(m, lambda r: r["section"] == "paths" and r.get("kernel") == "cublas dense bf16")
        cells = [fmt(main["machete"]), fmt(main["machete+sparse"]), fmt(main["marlin+sparse"]),
                 fmt(ours, main["machete+sparse"]), fmt(ours0), fmt(dense)]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def onecopy_table(first: str, second: str) -> str:
    """The ISSUE12_LOG's one-copy table (markdown, us per 7B layer) from two ``--sections onecopy`` result files: the
    first form of the one-copy kernels (``first``) and the second (``second``, with its variants)."""

    def load(path):
        with open(path) as fh:
            rows = json.load(fh)["results"]
        return {(r["kernel"], r.get("m")): r["us"] for r in rows if r.get("section") == "onecopy" and "us" in r}

    a, b = load(first), load(second)
    corr = "marlin+index ('2d', 16, 64, 2)"
    cols = [
        ("Marlin alone", b, "marlin"),
        ("+ SELL correction (two-copy pair)", b, "marlin+sell"),
        ("+ index correction, first form", a, "marlin+index"),
        ("+ index correction, 2-D (now default)", b, corr),
        ("dequant ours + cuBLAS (two-copy pair)", b, "deq ours+cublas"),
        ("dequant Marlin's + cuBLAS, first form", a, "deq marlin+cublas"),
        ("dequant Marlin's + cuBLAS, second form", b, "deq marlin+cublas"),
    ]
    ms = sorted({m for (_, m) in b if m})
    out = ["| M | " + " | ".join(c[0] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for m in ms:
        out.append(f"| {m} | " + " | ".join(f"{d[(k, m)]:.1f}" if (k, m) in d else "–" for _, d, k in cols) + " |")
    deq = [("ours (two-copy pair)", b.get(("dequant only, ours", 0)))]
    deq.append(("Marlin's, first form", a.get(("dequant only, Marlin's", 0))))
    deq += [(f"Marlin's, {k.split(' ', 3)[-1]}", v) for (k, m), v in b.items() if k.startswith("dequant only, Marlin")]
    out += ["", "| dequantization alone (4 GEMMs' weights, us) | " + " | ".join(n for n, _ in deq) + " |"]
    out += ["|---|" + "---:|" * len(deq), "| H200 | " + " | ".join(f"{v:.1f}" for _, v in deq if v) + " |"]
    return "\n".join(out) + "\n"


def onecopy_table2(sweep: str, flat: str) -> str:
    """The ISSUE12_LOG's session-9 one-copy table (markdown, us per 7B layer): small batches' corrections and large
    batches' dequantize + cuBLAS from the ``--sections onecopy`` sweep (``sweep``: plane-form dequantizer as the
    default then) and a second run with the flat dequantizer as the default (``flat``), then every dequantizer
    variant alone."""

    def load(path):
        with open(path) as fh:
            rows = json.load(fh)["results"]
        return {(r["kernel"], r.get("m")): r["us"] for r in rows if r.get("section") == "onecopy" and "us" in r}

    a, b = load(sweep), load(flat)
    cols = [
        ("Marlin alone", a, "marlin"),
        ("+ SELL, 8-byte slots (two-copy pair)", a, "marlin+sell"),
        ("+ SELL, packed 4-byte slots (one copy)", a, "marlin+packed sell (2, 16)"),
        ("+ index correction 2-D (one copy, session 8)", a, "marlin+index ('2d', 16, 64, 2)"),
        ("dequant ours + cuBLAS (two-copy pair)", b, "deq ours+cublas"),
        ("dequant Marlin's, plane form + cuBLAS (session 8)", a, "deq marlin+cublas"),
        ("dequant Marlin's, flat form + cuBLAS (one copy)", b, "deq marlin+cublas"),
    ]
    ms = sorted({m for (_, m) in a if m} | {m for (_, m) in b if m})
    out = ["| M | " + " | ".join(c[0] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for m in ms:
        out.append(f"| {m} | " + " | ".join(f"{d[(k, m)]:.1f}" if (k, m) in d else "–" for _, d, k in cols) + " |")
    deq = [("ours", a.get(("dequant only, ours", 0)))]
    deq += [(k.split(" ", 3)[-1], v) for (k, m), v in a.items() if k.startswith("dequant only, Marlin")]
    out += ["", "| dequantization alone, us per layer (tile width, warps, form: -/0 planes, 1 scatter, 2 flat, "
            "3 flat pairs) | " + " | ".join(n for n, _ in deq) + " |"]  # fmt: skip
    out += ["|---|" + "---:|" * len(deq), "| H200 | " + " | ".join(f"{v:.1f}" for _, v in deq if v) + " |"]
    return "\n".join(out) + "\n"


def gemv_table(path: str) -> str:
    """The ISSUE12_LOG's GEMV table (markdown, us per 7B layer at M = 1 / 2 / 4) from ``w4_gemv_s10_h200.json`` (runs of
    successive forms of the kernel, each beside Marlin and Marlin + packed SELL measured in the same process)."""
    with open(path) as f:
        d = json.load(f)
    if "runs" not in d:  # one run as this script writes it (session 11 on: the final form, diagnostics included)
        d = {"runs": {"c": {"form": "final form (" + d["meta"].get("started", "?") + ")", "rows": d["results"]}}}
    lines = [
        "| form | M | Marlin | Marlin + packed SELL | GEMV, no hold-out | GEMV + correction (default config) "
        "| best GEMV variant | GEMV + corr. / Marlin + SELL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in d["runs"].items():
        by_m: dict = {}
        for r in run["rows"]:
            by_m.setdefault(r["m"], {})[r["kernel"]] = r["us"]
        for m in sorted(by_m):
            k = by_m[m]
            var = {n: u for n, u in k.items() if n.startswith("gemv") and "no hold-out" not in n and "only" not in n}
            best = min(var, key=var.get) if var else None
            nan = float("nan")
            ratio = k.get("gemv", nan) / k.get("marlin+packed sell", nan)
            lines.append(
                f"| {label} | {m} | {k.get('marlin', nan):.1f} | {k.get('marlin+packed sell', nan):.1f} "
                f"| {k.get('gemv no hold-out', nan):.1f} | {k.get('gemv', nan):.1f} "
                f"| {var[best]:.1f} ({best.removeprefix('gemv ') if best != 'gemv' else 'default'}) | {ratio:.3f} |"
                if best
                else f"| {label} | {m} | – | – | – | – | – | – |"
            )
    forms = "; ".join(f"**{label}**: {run['form']}" for label, run in d["runs"].items())
    diag = [
        f"{r['kernel'].removeprefix('gemv ')} {r['us']:.1f}"
        for run in d["runs"].values()
        for r in run["rows"]
        if r["kernel"].endswith(" only")
    ]
    tail = f" Correction diagnostics (M = 1, us): {', '.join(diag)}." if diag else ""
    return "\n".join(lines) + "\n\nForms: " + forms + "." + tail + "\n"


def section_table(path: str, section: str) -> str:
    """A section's rows as markdown (one row per kernel, one column per M; us per 7B layer), e.g. ``overlap`` or
    ``unroll`` of ``w4_unroll_s12_h200.json``."""
    with open(path) as f:
        d = json.load(f)
    by_kernel: dict = {}
    for r in d["results"]:
        if r.get("section") == section and r.get("us") is not None:
            by_kernel.setdefault(r["kernel"], {})[r["m"]] = r["us"]
    ms = sorted({m for v in by_kernel.values() for m in v})
    lines = ["| us per 7B layer (4 GEMMs) | " + " | ".join(f"M = {m}" for m in ms) + " |"]
    lines.append("|---|" + "---:|" * len(ms))
    for kernel, v in by_kernel.items():
        lines.append(f"| {kernel} | " + " | ".join(f"{v[m]:.1f}" if m in v else "–" for m in ms) + " |")
    return "\n".join(lines) + "\n"


def main():
    global DRY
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "w4_fused_bench.json"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--holdout", type=float, default=1e-3)
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=DECODE_MS)
    ap.add_argument("--prefill-ms", type=lambda s: [int(v) for v in s.split(",")], default=PREFILL_MS)
    ap.add_argument(
        "--sweep-ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 32, 64, 128, 256, 1024, 4096]
    )
    ap.add_argument(
        "--sections", type=lambda s: s.split(","), default=["check", "main", "m1", "spsweep", "sweep", "prefill"]
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this many s")
    ap.add_argument("--peak-bw", type=float, default=None, help="TB/s (default: by device name; H200 4.8)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument(
        "--warm-workers",
        type=int,
        default=min(12, max(1, (os.cpu_count() or 2) - 2)),
        help="processes pre-compiling the kernel variants in parallel (0: compile on first use)",
    )
    ap.add_argument(
        "--paths-ms",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
    )
    ap.add_argument(
        "--onecopy-ms",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 8, 32, 64, 96, 128, 256, 1024, 4096],
    )
    ap.add_argument("--gemv-ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    ap.add_argument(
        "--overlap-ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32, 48, 64, 95]
    )
    ap.add_argument("--quick", action="store_true", help="layers=1, iters=10, fewer M")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes through the Triton interpreter")
    ap.add_argument(
        "--onecopy-table",
        nargs=2,
        metavar=("FIRST_JSON", "SECOND_JSON"),
        help="write the ISSUE12_LOG's one-copy table from two onecopy result files to --out (markdown) and exit",
    )
    ap.add_argument(
        "--paths-table",
        nargs="+",
        metavar="JSON",
        help="write the ISSUE12_LOG's one-layout paths table from these result files to --out (markdown) and exit",
    )
    ap.add_argument(
        "--onecopy-table2",
        nargs=2,
        metavar=("SWEEP_JSON", "FLAT_JSON"),
        help="write the ISSUE12_LOG's session-9 one-copy table (sweep, flat-default run) to --out and exit",
    )
    ap.add_argument("--gemv-table", metavar="JSON", help="write the ISSUE12_LOG's GEMV table to --out and exit")
    ap.add_argument(
        "--section-table",
        nargs=2,
        metavar=("JSON", "SECTION"),
        help="write one section's rows (kernel x M, us per layer) as markdown to --out and exit",
    )
    args = ap.parse_args()
    if args.section_table:
        with open(args.out, "w") as f:
            f.write(section_table(*args.section_table))
        log(f"wrote {args.out}")
        return
    if args.gemv_table:
        with open(args.out, "w") as f:
            f.write(gemv_table(args.gemv_table))
        log(f"wrote {args.out}")
        return
    if args.onecopy_table2:
        with open(args.out, "w") as f:
            f.write(onecopy_table2(*args.onecopy_table2))
        log(f"wrote {args.out}")
        return
    if args.onecopy_table:
        with open(args.out, "w") as f:
            f.write(onecopy_table(*args.onecopy_table))
        log(f"wrote {args.out}")
        return
    if args.paths_table:
        with open(args.out, "w") as f:
            f.write(paths_table(args.paths_table))
        log(f"wrote {args.out}")
        return
    if args.quick:
        args.layers, args.iters = 1, 10
        args.ms, args.prefill_ms, args.sweep_ms = [1, 16, 64, 256], [1024], [1, 16, 64, 256]
    if args.dry_run_cpu:
        DRY = True
        args.layers, args.iters = 1, 1
        args.ms, args.prefill_ms, args.sweep_ms = [1, 3], [40], [1, 20]
        args.onecopy_ms = [1, 70]
        args.gemv_ms = [1, 3]
        args.overlap_ms = [1, 20]
        args.budget_s = max(args.budget_s, 1800.0)
    B = Bench(args)
    B.run()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
