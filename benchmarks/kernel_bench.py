#!/usr/bin/env python3
"""Kernel micro-benchmark of one Llama-2-7B decoder layer's linears on the GPU (H100 / H200).

Linears (TP 1): qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008. Four distinct layers are run
back to back (~400 MB of W4 weights, > L2) inside one CUDA graph, timed with CUDA events over graph replays
(median); times are reported per layer. Sections:

  w4      Machete and Marlin W4A16 GEMMs (vLLM's kernel classes; channel-wise asym, g128 asym, channel sym)
          alone / + super-weight correction (1 entry in down_proj) / + 0.1% hold-out correction in every
          linear / + hold-out with PDL launch. Achieved memory bandwidth vs the device's peak.
  sparse  the sparse-correction kernel alone: direct vs transposed path, lane counts, per linear shape.
  quant   vLLM's scaled_int8_quant vs our fused split (S = 0, 4 with/without mask, 16).
  pairs   the W4 kernel pairs as served (two-copy Marlin / Machete, one-copy Marlin + dequantize, Marlin alone)
  machete_sched  Machete with each compiled schedule per shape and M vs Machete's own pick and Marlin (g128)
  gemlite gemlite's A16W4 Triton kernels (one layout, kernel per M) vs Marlin and Machete on the same weights
  humming vLLM's Humming backend (humming-kernels, JIT wgmma kernels, one layout) vs Marlin and Machete, same weights
  w8big   W8A8 at 33-512 tokens on q/k/v and gate/up (the matrices with outlier channels): SmoothQuant's CUTLASS,
          ours with the zero-point epilogue, our Triton GEMM's large-batch configurations (recommends the bound)
  w8      W8A8 per layer: SmoothQuant path (scaled_int8_quant + cutlass_scaled_mm) vs ours (split + CUTLASS +
          side product as addmm / folded into the sparse kernel); and the gate_up linear with its consumer
          (SiLU * up) under torch.compile, where the side product is fused into the consumer by Inductor.

Usage: python benchmarks/kernel_bench.py [--out $OUT/kernel_bench.json] [--ms 1,8,64,256,1024,4096]
       [--sections w4,sparse,quant,w8] [--quick]
Writes JSON after every section (a killed run keeps what finished) and prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/vllm_linear.py: one Linear outside an engine

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
COMPILED_MS = (1, 1024)  # torch.compile'd W8A8 epilogue comparison (each M is one Inductor compile)
SELL_ORDER = ("ell_cols", "ell_vals", "ell_rb", "hrows", "hptr", "hcols", "hvals", "ucols")


def sp_args(sp):
    """Positional arguments of triton_sparse.sparse_correction_ for a layout (the 8 tensors + nnz)."""
    return [sp[key] for key in SELL_ORDER] + [int(sp["nnz"].shape[0])]


PEAK_TBS = {
    "H100 SXM": 3.35,
    "H100 80GB HBM3": 3.35,
    "H100 PCIe": 2.0,
    "H100 NVL": 3.9,
    "H200": 4.8,
    "A100-SXM4-80GB": 2.04,
    "A100 80GB PCIe": 1.94,
    "A100-SXM4-40GB": 1.56,
    "L40S": 0.864,
}
T0 = time.time()
DRY = False  # --dry-run-cpu: exercise every code path on the CPU (no timing), to catch script bugs off the GPU


class _MockOps:
    """CPU stand-ins for vLLM's CUDA ops (dry run only)."""

    @staticmethod
    def scaled_int8_quant(x):
        from vllm_superweight.kernels.sparse_layout import int8_split_torch

        q, s, _ = int8_split_torch(x, None, True)
        return q, s, None

    @staticmethod
    def cutlass_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias=None):
        return ((a.float() * scale_a) @ (b.float() * scale_b.reshape(1, -1))).to(out_dtype)

    @staticmethod
    def cutlass_scaled_mm_azp(a, b, scale_a, scale_b, out_dtype, azp_adj, azp=None, bias=None):
        acc = a.long() @ b.long()
        if azp is not None:
            acc = acc - azp.long().reshape(-1, 1) * azp_adj.long().reshape(1, -1)
        return (acc.double() * scale_a.double() * scale_b.double().reshape(1, -1)).to(out_dtype)


def vllm_ops():
    if DRY:
        return _MockOps
    from vllm import _custom_ops as ops

    return ops


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def peak_bw(name: str, override: float | None) -> float:
    if override:
        return override
    for key, v in PEAK_TBS.items():
        if key.lower() in name.lower():
            return v
    if "H100" in name:
        return 3.35
    return float("nan")


def time_graph(fn, iters: int = 30, reps_per_graph: int = 1) -> float:
    """Median µs of one ``fn()`` call, measured over replays of a CUDA graph that holds ``reps_per_graph`` calls."""
    if DRY:
        fn()
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
        for _ in range(reps_per_graph):
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
        ts.append(a.elapsed_time(b) * 1000.0 / reps_per_graph)
    del g
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_graph(lambda: b.copy_(a), iters=10)

    return 2 * n / (us * 1e-6) / 1e12


class Bench:
    def __init__(self, args):
        self.args = args
        import vllm

        if DRY:
            self.dev, self.name, sms, cap = torch.device("cpu"), "cpu-dry-run", 0, [0, 0]
        else:
            self.dev = torch.device("cuda")
            props = torch.cuda.get_device_properties(self.dev)
            self.name, sms, cap = props.name, props.multi_processor_count, list(torch.cuda.get_device_capability())
        self.peak = peak_bw(self.name, args.peak_bw)
        self.meta = {
            "device": self.name,
            "sm_count": sms,
            "capability": cap,
            "peak_bw_tbs": self.peak,
            "torch": torch.__version__,
            "vllm": vllm.__version__,
            "ms": args.ms,
            "layers": args.layers,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.rows: list[dict] = []

    def add(self, **rec) -> None:
        if "bytes" in rec and rec.get("us"):
            rec["bw_tbs"] = rec["bytes"] / (rec["us"] * 1e-6) / 1e12
            rec["frac_peak"] = rec["bw_tbs"] / self.peak if self.peak == self.peak else None
        self.rows.append(rec)
        keys = ("section", "config", "variant", "m", "us", "bw_tbs", "frac_peak", "note")
        log(
            "  "
            + " ".join(
                f"{k}={rec[k]:.4g}" if isinstance(rec.get(k), float) else f"{k}={rec[k]}" for k in keys if k in rec
            )
        )

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "results": self.rows}, f, indent=1)
        os.replace(tmp, self.args.out)


# --------------------------------------------------------------------------------------------------------------
def holdout_entries(n, k, frac, seed):
    g = torch.Generator().manual_seed(seed)
    nnz = max(1, int(round(n * k * frac)))
    flat = torch.randperm(n * k, generator=g)[:nnz]
    return flat // k, flat % k, torch.randn(nnz, generator=g) * 0.05


def section_w4(B: Bench):
    import vllm_linear as VL  # tests/vllm_linear.py

    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import triton_sparse as TS

    cap = (0, 0) if DRY else torch.cuda.get_device_capability()
    kernels = ["cpu"] if DRY else (["machete", "dual"] if cap == (9, 0) else []) + ["marlin"]
    configs = [("channel-asym", -1, False), ("g128-asym", 128, False), ("channel-sym", -1, True)]
    if B.args.quick or B.args.w4_configs == 2:
        configs = configs[:2]
    nl = B.args.layers
    sps_hold, sps_sw = [], []
    for li in range(nl):
        d = {}
        for name, (n, k) in SHAPES.items():
            r, c, v = holdout_entries(n, k, 0.001, seed=li * 10 + len(d))
            d[name] = K.prepare_sparse(r, c, v, n, k, B.dev, layout="sell")
        sps_hold.append(d)
        nd, kd = SHAPES["down"]
        sps_sw.append(
            K.prepare_sparse(
                torch.tensor([2533 % nd]), torch.tensor([7890 % kd]), torch.tensor([-2.5]), nd, kd, B.dev, layout="sell"
            )
        )
    B.meta["holdout_layout"] = {name: K.layout_stats(sps_hold[0][name]) for name in SHAPES}
    for kname in kernels:
        for cname, group, sym in configs:
            try:
                layers = []
                for li in range(nl):
                    d = {}
                    for name, (n, k) in SHAPES.items():
                        w = VL.random_w4(n, k, group, sym, B.dev, seed=li * 7 + n + k)
                        d[name] = VL.build_mp_layer(w, kname)
                        del w
                    layers.append(d)
                if not DRY:
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                B.add(section="w4", config=f"{kname}-{cname}", note=f"build failed: {type(e).__name__}: {e}")
                continue
            ng = lambda k: 1 if group == -1 else k // group  # noqa: E731
            wbytes = sum(n * k // 2 + n * ng(k) * 2 * (1 if sym else 1.25) for n, k in SHAPES.values())
            for m in B.args.ms:
                xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
                iobytes = sum(m * k * 2 + m * n * 2 for n, k in SHAPES.values())

                def run(mode, pdl=None):
                    def f():
                        for li, lay in enumerate(layers):
                            for name in SHAPES:
                                layer, kobj = lay[name]
                                x = xs[name]
                                y = kobj.apply_weights(layer, x)
                                if mode == "holdout":
                                    sp = sps_hold[li][name]
                                    TS.sparse_correction_(y, x, *sp_args(sp), pdl=pdl)
                                elif mode == "sw" and name == "down":
                                    sp = sps_sw[li]
                                    TS.sparse_correction_(y, x, *sp_args(sp), pdl=pdl)

                    return f

                base = None
                for mode, pdl in [("gemm", None), ("sw", False), ("holdout", False), ("holdout", True)]:
                    if pdl and cap[0] < 9 and not DRY:
                        continue
                    try:
                        us = time_graph(run(mode, pdl), iters=B.args.iters) / nl
                    except Exception as e:  # noqa: BLE001
                        B.add(
                            section="w4",
                            config=f"{kname}-{cname}",
                            variant=mode,
                            m=m,
                            note=f"failed: {type(e).__name__}: {e}",
                        )
                        continue
                    rec = dict(
                        section="w4",
                        config=f"{kname}-{cname}",
                        variant=mode + ("+pdl" if pdl else ""),
                        m=m,
                        us=us,
                        bytes=wbytes + iobytes,
                    )
                    if mode == "gemm":
                        base = us
                    elif base:
                        rec["extra_us_per_layer"] = us - base
                        rec["extra_frac_of_gemm"] = (us - base) / base
                    B.add(**rec)
                xs = {}  # frees the device memory of this size (closures above are done with it)
            layers = []  # frees the device memory (closures above are done with it)
            torch.cuda.empty_cache()
        B.save()


def section_sparse(B: Bench):
    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import triton_sparse as TS

    for name, (n, k) in SHAPES.items():
        r, c, v = holdout_entries(n, k, 0.001, seed=99)
        lanes_list = [32] if B.args.quick else [16, 32, 64]
        for lanes in lanes_list:
            sp = K.prepare_sparse(r, c, v, n, k, B.dev, layout="sell", lanes=lanes)
            st = K.layout_stats(sp)
            args_ = sp_args(sp)
            for m in B.args.ms:
                if lanes != 32 and m not in (1, 64, 1024):
                    continue
                x = torch.randn(m, k, device=B.dev, dtype=torch.bfloat16)
                y = torch.randn(m, n, device=B.dev, dtype=torch.bfloat16)
                plan = TS.plan(
                    m,
                    k,
                    {
                        "ell_cols": tuple(sp["ell_cols"].shape),
                        "hrows": tuple(sp["hrows"].shape),
                        "ucols": tuple(sp["ucols"].shape),
                    },
                    int(sp["nnz"].shape[0]),
                )
                for path in ("auto", "direct", "transposed"):
                    if lanes != 32 and path != "auto":
                        continue
                    fp = None if path == "auto" else path
                    try:
                        us = time_graph(
                            lambda: TS.sparse_correction_(y, x, *args_, force_path=fp),
                            iters=B.args.iters,
                            reps_per_graph=20,
                        )
                    except Exception as e:  # noqa: BLE001
                        B.add(section="sparse", config=f"{name}-L{lanes}", variant=path, m=m, note=f"failed: {e}")
                        continue
                    meta_bytes = st["bytes"]
                    B.add(
                        section="sparse",
                        config=f"{name}-L{lanes}",
                        variant=path,
                        m=m,
                        us=us,
                        nnz=int(r.numel()),
                        depth=st["depth"],
                        heavy_rows=st["heavy_rows"],
                        auto_transposed=plan["transposed"],
                        bytes=meta_bytes + 2 * m * n * 2 + m * st["unique_cols"] * 2,
                    )
    B.save()


def section_w4sweep(B: Bench):
    """GEMM alone, Machete vs Marlin, over a fine M sweep: where each kernel wins (the dual dispatch threshold)."""
    import vllm_linear as VL  # tests/vllm_linear.py

    if DRY or torch.cuda.get_device_capability() != (9, 0):
        B.add(section="w4sweep", config="-", note="needs an SM90 GPU (Machete)")
        return
    nl = B.args.layers
    best = {}
    for cname, group, sym in [("channel-asym", -1, False), ("g128-asym", 128, False)]:
        times = {}
        for kname in ("machete", "marlin"):
            layers = [
                {
                    name: VL.build_mp_layer(VL.random_w4(n, k, group, sym, B.dev, seed=li * 7 + n + k), kname)
                    for name, (n, k) in SHAPES.items()
                }
                for li in range(nl)
            ]
            torch.cuda.synchronize()
            for m in B.args.sweep_ms:
                xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}

                def f():
                    for lay in layers:
                        for name in SHAPES:
                            layer, kobj = lay[name]
                            kobj.apply_weights(layer, xs[name])

                us = time_graph(f, iters=B.args.iters) / nl
                times[(kname, m)] = us
                B.add(section="w4sweep", config=f"{kname}-{cname}", variant="gemm", m=m, us=us)
            layers = []  # frees the device memory (closures above are done with it)
            torch.cuda.empty_cache()
        # threshold: the largest M such that Marlin is faster at every swept M up to it
        thr = 0
        for m in B.args.sweep_ms:
            if times[("marlin", m)] < times[("machete", m)]:
                thr = m
            else:
                break
        best[cname] = thr
        for m in B.args.sweep_ms:
            B.add(
                section="w4sweep",
                config=cname,
                variant="marlin_vs_machete",
                m=m,
                ratio=times[("marlin", m)] / times[("machete", m)],
            )
    B.meta["marlin_max_m_by_config"] = best
    B.meta.setdefault("recommend", {})["SUPERWEIGHT_MARLIN_MAX_M"] = min(best.values())
    log(f"w4sweep: Marlin faster up to M = {best}")
    B.save()


def section_machete_sched(B: Bench):
    """Machete with each of its compiled schedules, per GEMM shape and M, beside Machete's own pick and Marlin
    (g128 asymmetric, the 7B shapes). Question (issue 12, one copy): does some Machete schedule come close to Marlin
    at small M? Then the three matrices without a hold-out could keep ONE copy in Machete's layout (fast at
    saturation) instead of Marlin's. Records per (shape, M) the fastest schedule; meta ``machete_sched_best``."""
    import vllm_linear as VL  # tests/vllm_linear.py
    from vllm import _custom_ops as ops

    if DRY or torch.cuda.get_device_capability() != (9, 0):
        B.add(section="machete_sched", config="-", note="needs an SM90 GPU (Machete)")
        return
    nl = B.args.layers
    ms = B.args.sched_ms
    budget_end = time.time() + B.args.sched_budget_s
    builds = {}
    for kname in ("machete", "marlin"):
        builds[kname] = [
            {
                name: VL.build_mp_layer(VL.random_w4(n, k, 128, False, B.dev, seed=li * 7 + n + k), kname)
                for name, (n, k) in SHAPES.items()
            }
            for li in range(nl)
        ]  # fmt: skip
    torch.cuda.synchronize()
    _layer0, k0 = builds["machete"][0]["qkv"]
    wtype = k0.impl.config.weight_type
    scheds = ops.machete_supported_schedules(
        torch.bfloat16, wtype, torch.bfloat16, torch.bfloat16, None, None, torch.bfloat16
    )
    B.meta["machete_schedules"] = list(scheds)
    log(f"machete_sched: {len(scheds)} schedules")

    def mm(name, m, sched, x):
        def f():
            for lay in builds["machete"]:
                layer, kobj = lay[name]
                w_q, w_s, w_zp, _ = kobj.impl._get_weight_params(layer)
                ops.machete_mm(
                    a=x, b_q=w_q, b_type=wtype, b_group_zeros=w_zp, b_group_scales=w_s, b_group_size=128,
                    schedule=sched,
                )  # fmt: skip

        return f

    best: dict = {}
    for m in ms:
        for name, (_n, k) in SHAPES.items():
            if time.time() > budget_end:
                B.add(section="machete_sched", config=name, m=m, note="budget: skipped")
                continue
            x = torch.randn(m, k, device=B.dev, dtype=torch.bfloat16)

            def marlin(x=x, name=name):
                for lay in builds["marlin"]:
                    layer, kobj = lay[name]
                    kobj.apply_weights(layer, x)

            t_marlin = time_graph(marlin, iters=B.args.iters) / nl
            t_default = time_graph(mm(name, m, None, x), iters=B.args.iters) / nl
            B.add(section="machete_sched", config=name, variant="marlin", m=m, us=t_marlin)
            B.add(section="machete_sched", config=name, variant="machete default", m=m, us=t_default)
            times = {}
            for s in scheds:
                try:
                    times[s] = time_graph(mm(name, m, s, x), iters=max(10, B.args.iters // 2)) / nl
                except Exception as e:  # noqa: BLE001
                    B.rows.append(dict(section="machete_sched", config=name, variant=s, m=m, note=str(e)[:200]))
            for s, us in times.items():
                B.rows.append(dict(section="machete_sched", config=name, variant=s, m=m, us=us))
            if times:
                s_best = min(times, key=times.get)
                best[f"{name}@{m}"] = {
                    "schedule": s_best,
                    "us": times[s_best],
                    "default_us": t_default,
                    "marlin_us": t_marlin,
                }
                log(
                    f"  {name} M={m}: Marlin {t_marlin:.1f}, Machete default {t_default:.1f}, "
                    f"best {times[s_best]:.1f} ({s_best})"
                )
            torch.cuda.synchronize()
        B.meta["machete_sched_best"] = best
        B.save()
    # per M, the layer sums (4 GEMMs): Marlin, Machete's pick, the fastest schedule of each shape
    summ = {}
    for m in ms:
        keys = [f"{name}@{m}" for name in SHAPES]
        if all(kk in best for kk in keys):
            summ[str(m)] = {f: sum(best[kk][f] for kk in keys) for f in ("marlin_us", "default_us", "us")}
            log(f"machete_sched M={m}: layer Marlin {summ[str(m)]['marlin_us']:.1f}, Machete default "
                f"{summ[str(m)]['default_us']:.1f}, tuned {summ[str(m)]['us']:.1f} us")  # fmt: skip
    B.meta["machete_sched_layer"] = summ
    B.save()


def section_pairs(B: Bench):
    """The W4 kernel pairs as served, through the plugin's kernel classes and their custom op, no hold-out, g128
    asymmetric: the two-copy Marlin / Machete pair (``dual``) vs the one-copy Marlin + dequantize pair
    (``marlin-deq1``, Marlin below 256 tokens for layers without entries) vs Marlin alone. Question (session 17): the
    one copy was 6% slower end to end at batch 8 although both pairs run Marlin at M = 8 -- is it the kernels?"""

    if DRY or torch.cuda.get_device_capability() != (9, 0):
        B.add(section="pairs", config="-", note="needs an SM90 GPU (Machete)")
        return
    nl = B.args.layers
    for kname in ("dual", "marlin-deq1", "marlin"):
        # the weight dicts stay alive: a pair registers its layer under a key made from id(w), reused once freed
        ws = _random_g128(nl, B.dev)
        layers = _kernel_layers(ws, nl, kname)
        torch.cuda.synchronize()
        B.meta.setdefault("pairs_describe", {})[kname] = layers[0]["qkv"][1].describe()
        for m in B.args.pairs_ms:
            xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}

            us = time_graph(_apply_all(layers, xs), iters=B.args.iters) / nl
            B.add(section="pairs", config=kname, variant="g128-asym", m=m, us=us)
        layers, ws = [], {}
        torch.cuda.empty_cache()
    B.save()


def _random_g128(nl: int, dev) -> dict:
    """The same random g128 asymmetric W4 weights per (layer, shape) for every kernel compared."""
    import vllm_linear as VL  # tests/vllm_linear.py

    return {
        (li, name): VL.random_w4(n, k, 128, False, dev, seed=li * 7 + n + k)
        for li in range(nl)
        for name, (n, k) in SHAPES.items()
    }


def _kernel_layers(ws: dict, nl: int, kname: str) -> list[dict]:
    """``nl`` layers of (layer, kernel) per shape, built through the plugin's kernel classes (``kname``)."""
    import vllm_linear as VL  # tests/vllm_linear.py

    return [{name: VL.build_mp_layer(ws[(li, name)], kname) for name in SHAPES} for li in range(nl)]


def _apply_all(layers: list[dict], xs: dict):
    """One call over every layer and shape (the timed unit of the per-layer sections)."""

    def f():
        for lay in layers:
            for name in SHAPES:
                layer, kobj = lay[name]
                kobj.apply_weights(layer, xs[name])

    return f


def _gemlite_import(B: Bench):
    """gemlite (PyPI, pure Python + Triton) from ``--gemlite-path`` (an unpacked wheel: no dist-info, so its own
    ``vllm.general_plugins`` entry point stays out of any engine) or the environment."""
    if B.args.gemlite_path:
        sys.path.insert(0, os.path.abspath(B.args.gemlite_path))
    import gemlite
    from gemlite.core import GemLiteLinearTriton

    return gemlite, GemLiteLinearTriton


def section_gemlite(B: Bench):
    """gemlite's A16W4 (one packed layout, its kernel picked per M: GEMV_REVSPLITK <= 4 tokens, GEMM_SPLITK below
    64, GEMM above) against Marlin and Machete on the same weights (g128 asymmetric, bf16), in one process. Question
    (issue 12, one stored layout): does one Triton layout come near Marlin at M <= 16 AND Machete at 64-256?
    gemlite autotunes per (M bucket, shape) on first use (its H100 table has no Llama-2-7B shapes, and H200 has no
    table): the autotune time is recorded, the tuned table written to ``--gemlite-cache-out`` (read back by
    ``--gemlite-cache``). Rows: ``gemlite`` (W = (q - z) * s, our format's rounding; W_group_mode 3),
    ``gemlite-fma`` (gemlite's default W = q * s + (-z * s)), ``gemlite:<KIND>`` (a kernel kind forced at an M
    where another is picked); each with the max |error| against the float dequantized weight at the first M of
    each kind."""
    import vllm_linear as VL  # tests/vllm_linear.py

    if DRY:
        B.add(section="gemlite", config="-", note="needs CUDA (gemlite imports CUDA at module level)")
        return
    gemlite, GL = _gemlite_import(B)
    from gemlite.dtypes import DType

    B.meta["gemlite_version"] = getattr(gemlite, "__version__", "?")
    if B.args.gemlite_cache and os.path.exists(B.args.gemlite_cache):
        GL.load_config(B.args.gemlite_cache)
        log(f"gemlite: loaded tuned table {B.args.gemlite_cache}")
    nl = B.args.layers
    budget_end = time.time() + B.args.gemlite_budget_s
    ws = _random_g128(nl, B.dev)

    def gl_layer(w, fma):
        lin = GL(4, group_size=128, in_features=w["k"], out_features=w["n"], input_dtype=DType.BF16,
                 output_dtype=DType.BF16)  # fmt: skip
        z = w["zeros"].to(torch.bfloat16)  # exact small integers; mode 3 keeps them, mode 4 folds -z * s
        lin.pack(w["q"].to(torch.uint8), w["scales"].to(torch.bfloat16), z, bias=None, fma_mode=fma)
        return lin

    variants = {"gemlite": False}
    if B.args.gemlite_fma:
        variants["gemlite-fma"] = True
    gls = {v: [{name: gl_layer(ws[(li, name)], fma) for name in SHAPES} for li in range(nl)]
           for v, fma in variants.items()}  # fmt: skip
    refs = {kname: _kernel_layers(ws, nl, kname) for kname in ("marlin", "machete")}
    torch.cuda.synchronize()
    wbytes = {name: gls["gemlite"][0][name].W_q.numel() * gls["gemlite"][0][name].W_q.element_size()
              + gls["gemlite"][0][name].scales.numel() * 2 + gls["gemlite"][0][name].zeros.numel() * 2
              for name in SHAPES}  # fmt: skip
    B.meta["gemlite_layer_bytes"] = wbytes
    dq = {name: VL.dequant_w4(ws[(0, name)]) for name in SHAPES}
    kinds_seen: set = set()
    forced = {32: "GEMM", 48: "GEMM", 64: "GEMM_SPLITK", 96: "GEMM_SPLITK", 8: "GEMV_REVSPLITK"}
    from gemlite.core import get_matmul_type

    for m in B.args.gemlite_ms:
        if time.time() > budget_end:
            B.add(section="gemlite", config="-", m=m, note="budget: stopped")
            break
        xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        kind = get_matmul_type(m, 4)
        for v in variants:
            # autotune (first call per M bucket and shape) outside the timed graphs
            t0 = time.time()
            errs = {}
            for name in SHAPES:
                y = gls[v][0][name].forward_auto_no_warmup(xs[name])
                if kind not in kinds_seen or m == B.args.gemlite_ms[0]:
                    ref = xs[name].float() @ dq[name].t()
                    errs[name] = float((y.float() - ref).abs().max() / ref.abs().max())
            torch.cuda.synchronize()
            tune_s = time.time() - t0

            def f(v=v, xs=xs):
                for lay in gls[v]:
                    for name in SHAPES:
                        lay[name].forward_auto_no_warmup(xs[name])

            us = time_graph(f, iters=B.args.iters) / nl
            B.add(section="gemlite", config=v, variant=kind, m=m, us=us, tune_s=round(tune_s, 1),
                  rel_err=errs or None, bytes=sum(wbytes.values()))  # fmt: skip
        kinds_seen.add(kind)
        for kname in ("marlin", "machete"):
            us = time_graph(_apply_all(refs[kname], xs), iters=B.args.iters) / nl
            B.add(section="gemlite", config=kname, variant="vllm", m=m, us=us)
        fk = forced.get(m)
        if fk and time.time() < budget_end - 60:
            t0 = time.time()
            for name in SHAPES:
                gls["gemlite"][0][name].forward_manual(xs[name], fk)
            torch.cuda.synchronize()
            tune_s = time.time() - t0

            def h(xs=xs, fk=fk):
                for lay in gls["gemlite"]:
                    for name in SHAPES:
                        lay[name].forward_manual(xs[name], fk)

            B.add(section="gemlite", config="gemlite:" + fk, variant=fk, m=m,
                  us=time_graph(h, iters=B.args.iters) / nl, tune_s=round(tune_s, 1))  # fmt: skip
        B.save()
        if B.args.gemlite_cache_out:
            GL.cache_config(B.args.gemlite_cache_out)
    # per M: gemlite / Marlin / Machete per layer
    table: dict = {}
    for config, row in layer_us(B.rows, "gemlite").items():
        for m, us in row.items():
            table.setdefault(str(m), {})[config] = round(us, 1)
    B.meta["gemlite_layer_us"] = table
    for m, row in table.items():
        log(f"gemlite M={m}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    B.save()


def section_humming(B: Bench):
    """vLLM's Humming backend (``humming-kernels``: Hopper wgmma / TMA / warp-specialized kernels, JIT-compiled with
    nvcc per tile configuration on first use; one repacked copy for every batch size) against Marlin and Machete
    on the same g128 asymmetric weights, through the plugin's kernel classes (``HummingKernel``). Question (issue
    12, one stored layout): does it come near Marlin at M <= 16 AND Machete at 64-256? Records per M the first
    call's time (the JIT compiles), the max error against the float dequantized weight, and µs per layer."""
    import vllm_linear as VL  # tests/vllm_linear.py

    if DRY:
        B.add(section="humming", config="-", note="needs CUDA and the humming-kernels package")
        return
    import humming  # on sys.path from --humming-path (main(), before vLLM probes for it)

    B.meta["humming_version"] = getattr(humming, "__version__", "?")
    from vllm import envs as venvs

    # the batch-invariant mode (no stream-K: reproducible at every M) vLLM hands Humming, as vLLM parses it
    B.meta["humming_batch_invariant"] = bool(venvs.VLLM_BATCH_INVARIANT)
    nl = B.args.layers
    budget_end = time.time() + B.args.humming_budget_s
    ws = _random_g128(nl, B.dev)
    t0 = time.time()
    hm = _kernel_layers(ws, nl, "humming")
    torch.cuda.synchronize()
    B.meta["humming_prepare_s"] = round(time.time() - t0, 1)
    refs = {kname: _kernel_layers(ws, nl, kname) for kname in ("marlin", "machete")}
    dq = {name: VL.dequant_w4(ws[(0, name)]) for name in SHAPES}
    table: dict = {}
    for m in B.args.humming_ms:
        if time.time() > budget_end:
            B.add(section="humming", config="-", m=m, note="budget: stopped")
            break
        xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        t0 = time.time()
        errs = {}
        try:
            for name in SHAPES:  # the first call JIT-compiles this M's tile configuration
                layer, kobj = hm[0][name]
                y = kobj.apply_weights(layer, xs[name])
                ref = xs[name].float() @ dq[name].t()
                errs[name] = float((y.float() - ref).abs().max() / ref.abs().max())
            torch.cuda.synchronize()
            jit_s = time.time() - t0
            us = time_graph(_apply_all(hm, xs), iters=B.args.iters) / nl
        except Exception as e:  # noqa: BLE001
            B.add(section="humming", config="humming", m=m, note=f"failed: {type(e).__name__}: {str(e)[:300]}")
            B.save()
            continue
        B.add(section="humming", config="humming", variant="vllm", m=m, us=us, jit_s=round(jit_s, 1), rel_err=errs)
        row = {"humming": round(us, 1)}
        for kname in ("marlin", "machete"):
            row[kname] = round(time_graph(_apply_all(refs[kname], xs), iters=B.args.iters) / nl, 1)
            B.add(section="humming", config=kname, variant="vllm", m=m, us=row[kname])
        table[str(m)] = row
        B.meta["humming_layer_us"] = table
        B.save()
    for m, row in table.items():
        log(f"humming M={m}: " + ", ".join(f"{k} {v}" for k, v in row.items()))


def section_sparsesweep(B: Bench):
    """The transposed sparse path's tile parameters (tokens per program, gather tile) at medium M, summed over
    the four 0.1%-hold-out linears of a layer; records the best ``SparseTiles`` (a launcher argument)."""
    import dataclasses

    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import triton_sparse as TS

    lay = {}
    for name, (n, k) in SHAPES.items():
        r, c, v = holdout_entries(n, k, 0.001, seed=len(lay))
        lay[name] = (K.prepare_sparse(r, c, v, n, k, B.dev, layout="sell"), n, k)
    ms = [16] if DRY else [16, 64, 256]
    # the looped form's (BM, gather tile) grid, then the unrolled form (session 12's default; no gather tile)
    cfgs = [(bm, tile, 0) for bm in (16, 32, 64) for tile in (2048, 4096, 8192, 16384)]
    cfgs += [(bm, 4096, 1) for bm in (16, 32, 64)]
    if DRY:
        cfgs = [(16, 2048, 0), (64, 4096, 0), (16, 4096, 1)]
    tot = {}
    for m in ms:
        xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (_, n, k) in lay.items()}
        ys = {name: torch.randn(m, n, device=B.dev, dtype=torch.bfloat16) for name, (_, n, k) in lay.items()}
        for direct in (True, False):
            for bm, tile, unroll in [(16, 4096, 1)] if direct else cfgs:
                tiles = TS.SparseTiles(tile_elems=tile, bm_transposed=bm, unroll=unroll)

                def f(tiles=tiles, direct=direct):
                    for name, (sp, _n, _k) in lay.items():
                        TS.sparse_correction_(
                            ys[name],
                            xs[name],
                            *sp_args(sp),
                            tiles=tiles,
                            force_path="direct" if direct else "transposed",
                        )

                try:
                    us = time_graph(f, iters=B.args.iters, reps_per_graph=5)
                except Exception as e:  # noqa: BLE001
                    B.add(section="sparsesweep", config=f"bm{bm}-tile{tile}-u{unroll}", m=m, note=f"failed: {e}")
                    continue
                cfg = "direct" if direct else f"bm{bm}-tile{tile}-u{unroll}"
                B.add(section="sparsesweep", config=cfg, variant="4 linears", m=m, us=us)
                tot.setdefault(cfg, {})[m] = us
    full = {c: t for c, t in tot.items() if len(t) == len(ms) and c != "direct"}
    if full:
        best = min(full, key=lambda c: sum(full[c].values()))
        bm, tile, unroll = (int(v) for v in best.replace("bm", "").replace("-u", "-tile").split("-tile"))
        tiles = TS.SparseTiles(tile_elems=tile, bm_transposed=bm, unroll=unroll)
        # smallest M where the transposed path (best tiles) beats the direct one
        for m in ms:
            if "direct" in tot and m in tot["direct"] and full[best][m] < tot["direct"][m]:
                tiles = dataclasses.replace(tiles, transpose_min_m=m)
                break
        dflt = TS.DEFAULT_TILES
        dkey = f"bm{dflt.bm_transposed}-tile{dflt.tile_elems}-u{dflt.unroll}"
        B.meta["sparse_best"] = {"config": best, "us_by_m": full[best], "default_us_by_m": full.get(dkey)}
        B.meta.setdefault("recommend", {})["SUPERWEIGHT_SPARSE_TILES"] = (
            f"bmd={tiles.bm_direct},tmin={tiles.transpose_min_m},bmt={tiles.bm_transposed},"
            f"tile={tiles.tile_elems},unroll={tiles.unroll}"
        )  # an environment line the engine runs source (was the dataclass as a dict: not a valid export)
        log(f"sparsesweep: best {best} {full[best]} (default {dkey}: {full.get(dkey)})")
    B.save()


def section_quant(B: Bench):
    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import triton_act_quant as TQ

    ops = vllm_ops()
    for k in sorted({k for _, k in SHAPES.values()}):
        for m in B.args.ms:
            x = (torch.randn(m, k, device=B.dev) * 2).to(torch.bfloat16)
            nbytes = m * k * 3 + m * 4
            B.add(
                section="quant",
                config=f"K{k}",
                variant="vllm_scaled_int8_quant",
                m=m,
                us=time_graph(lambda: ops.scaled_int8_quant(x), iters=B.args.iters, reps_per_graph=20),
                bytes=nbytes,
            )
            for s, use_mask in [(0, False), (4, True), (4, False), (16, True)]:
                idx = torch.sort(torch.randperm(k)[:s]).values
                prep = K.prepare_outliers(idx, k, B.dev)
                i_, m_ = (prep["idx"], prep["mask"] if use_mask else None) if s else (None, None)
                us = time_graph(
                    lambda: K.int8_quant_outlier_split(x, i_, True, m_), iters=B.args.iters, reps_per_graph=20
                )
                B.add(
                    section="quant",
                    config=f"K{k}",
                    variant=f"split_S{s}{'_mask' if use_mask else ''}",
                    m=m,
                    us=us,
                    bytes=nbytes + m * s * 2,
                )
                if s == 4 and use_mask:  # the two-pass chunked variant (row re-read from L1/L2), 4096 per chunk
                    us = time_graph(
                        lambda: TQ.int8_quant_outlier_split(x, i_, True, m_, max_one_chunk=2048, chunk=4096),
                        iters=B.args.iters,
                        reps_per_graph=20,
                    )
                    B.add(
                        section="quant",
                        config=f"K{k}",
                        variant="split_S4_mask_chunked4096",
                        m=m,
                        us=us,
                        bytes=nbytes + m * s * 2,
                    )
    B.save()


def _w8_triton(B: Bench, layers, xs, m: int, nl: int, nbytes: int, base: float | None) -> dict | None:
    """Sweep ``triton_int8_mm.SWEEP`` over one layer (split + GEMM, one outlier channel per matrix); record each,
    then the best configuration without outlier channels. Returns {"config", "us", "us_s0"} of the best."""
    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import triton_int8_mm as TI

    def run(cfg, with_outlier: bool, names=tuple(SHAPES)):
        def f():
            for lay in layers:
                for name in names:
                    w, _, w_out_t, _, _, prep1 = lay[name]
                    if with_outlier:
                        xq, xsc, xo = K.int8_quant_outlier_split(xs[name], prep1["idx"], True, prep1["mask"])
                        TI.int8_mm_outliers(xq, w["w"], xsc, w["scale"], xo, w_out_t[:1], None, torch.bfloat16, cfg)
                    else:
                        xq, xsc, _ = K.int8_quant_outlier_split(xs[name], None, True)
                        TI.int8_mm_outliers(xq, w["w"], xsc, w["scale"], None, None, None, torch.bfloat16, cfg)

        return f

    best = None
    for cfg in TI.SWEEP:
        try:
            us = time_graph(run(cfg, True), iters=B.args.iters) / nl
        except Exception as e:  # noqa: BLE001
            B.add(section="w8", config="triton sweep", variant=cfg.key(), m=m, note=f"failed: {type(e).__name__}: {e}")
            continue
        rec = dict(section="w8", config="triton sweep", variant=cfg.key(), m=m, us=us, bytes=nbytes)
        if base:
            rec["ratio_vs_smoothquant"] = base / us
        B.add(**rec)
        if best is None or us < best["us"]:
            best = {"config": cfg.key(), "us": us, "cfg": cfg}
    if best is None:
        return None
    for variant, with_outlier in (("triton S=1", True), ("triton S=0", False)):
        us = time_graph(run(best["cfg"], with_outlier), iters=B.args.iters) / nl
        rec = dict(section="w8", config="layer", variant=variant, m=m, us=us, bytes=nbytes, tiles=best["config"])
        if base:
            rec["ratio_vs_smoothquant"] = base / us
        B.add(**rec)
        best["us_s0" if not with_outlier else "us_s1"] = us
    best.pop("cfg")
    # each matrix on its own (session 13: o / down have N = 4096, i.e. a quarter of gate_up's programs): the best
    # tiles per shape, for a per-shape default
    by_shape = {}
    for name in SHAPES:
        for cfg in TI.SWEEP:
            tag = dict(section="w8", config="triton sweep shape", variant=f"{name} {cfg.key()}", m=m)
            try:
                us = time_graph(run(cfg, True, (name,)), iters=B.args.iters) / nl
            except Exception as e:  # noqa: BLE001
                B.add(**tag, note=f"failed: {type(e).__name__}: {e}")
                continue
            B.add(**tag, us=us)
            if name not in by_shape or us < by_shape[name]["us"]:
                by_shape[name] = {"config": cfg.key(), "us": us}
    best["by_shape"] = by_shape
    best["us_by_shape_sum"] = sum(v["us"] for v in by_shape.values())
    return best


def w8_triton_recommend(B: Bench) -> None:
    """``SUPERWEIGHT_W8A8_TRITON``: the largest measured M up to which (from M = 1 on) our Triton layer with one
    outlier channel beats the CUTLASS zero-point path, with the best configuration per measured M."""
    tri = B.meta.get("w8_triton_best") or {}
    azp = {r["m"]: r["us"] for r in B.rows if r.get("variant") == "split_azp S=1" and r.get("us")}
    max_m, parts = 0, []
    for m in sorted(int(k) for k in tri):
        if m not in azp or tri[str(m)]["us_s1"] >= azp[m]:
            break
        max_m = m
        parts.append(f"{m}:{tri[str(m)]['config']}")
    B.meta.setdefault("recommend", {})["SUPERWEIGHT_W8A8_TRITON"] = f"{max_m}@{';'.join(parts)}" if max_m else "0"


def section_w8(B: Bench):
    import torch.nn.functional as F
    import vllm_linear as VL  # tests/vllm_linear.py

    import vllm_superweight.kernels as K

    ops = vllm_ops()
    nl = B.args.layers
    S = 4
    layers = []
    for li in range(nl):
        d = {}
        for name, (n, k) in SHAPES.items():
            w = VL.random_w8(n, k, B.dev, seed=li * 13 + n + k)
            idx = torch.sort(torch.randperm(k)[:S]).values
            prep = K.prepare_outliers(idx, k, B.dev)
            w_out_t = (w["w"][:, prep["idx"].long()].float() * w["scale"]).to(torch.bfloat16).t().contiguous()
            rows, cols, vals = K.outlier_columns_as_entries(w_out_t.t().float(), prep["idx"])
            sp = K.prepare_sparse(rows.cpu(), cols.cpu(), vals.cpu(), n, k, B.dev, layout="sell")
            # the zero-point path (the CUDA default since session 12): the first channel's int8 weight column as
            # the epilogue's azp_adj [1, N]; with one outlier channel (prep1) nothing is left for a side product
            azp_adj = w["w"][:, prep["idx"][:1].long()].t().to(torch.int32).contiguous()
            prep1 = K.prepare_outliers(idx[:1], k, B.dev)
            d[name] = (w, prep, w_out_t, sp, azp_adj, prep1)
        layers.append(d)
    wbytes = sum(n * k + n * 4 for n, k in SHAPES.values())
    for m in B.args.ms:
        xs = {name: torch.randn(m, k, device=B.dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        iobytes = sum(m * k * 3 + m * n * 2 for n, k in SHAPES.values())

        def run(mode):
            def f():
                for lay in layers:
                    for name in SHAPES:
                        w, prep, w_out_t, sp, azp_adj, prep1 = lay[name]
                        x = xs[name]
                        if mode.startswith("split_azp"):  # first channel in the epilogue, the others a side product
                            p_ = prep1 if mode == "split_azp S=1" else prep
                            xq, xsc, xo, azp = K.int8_quant_outlier_split_azp(x, p_["idx"], p_["mask"])
                            y = ops.cutlass_scaled_mm_azp(
                                xq, w["w_t"], xsc, w["scale"], torch.bfloat16, azp_adj=azp_adj, azp=azp
                            )
                            if mode == "split_azp S=4":
                                y = K.add_outlier_side_product(y, xo[:, 1:], w_out_t[1:])
                            continue
                        if mode == "smoothquant+azp_gemm":  # the zero-point epilogue alone (azp = 0)
                            xq, xsc, _ = ops.scaled_int8_quant(x)
                            zero = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
                            ops.cutlass_scaled_mm_azp(
                                xq, w["w_t"], xsc, w["scale"], torch.bfloat16, azp_adj=azp_adj, azp=zero
                            )
                            continue
                        if mode == "smoothquant":
                            xq, xsc, _ = ops.scaled_int8_quant(x)
                        elif mode == "split S=1":
                            xq, xsc, xo = K.int8_quant_outlier_split(x, prep1["idx"], True, prep1["mask"])
                        elif mode == "split S=0":  # a layer without outlier channels (o_proj, most down_proj)
                            xq, xsc, xo = K.int8_quant_outlier_split(x, None, True)
                        else:
                            xq, xsc, xo = K.int8_quant_outlier_split(x, prep["idx"], True, prep["mask"])
                        y = ops.cutlass_scaled_mm(
                            xq, w["w_t"], scale_a=xsc, scale_b=w["scale"], out_dtype=torch.bfloat16
                        )
                        if mode == "split S=1":
                            y = K.add_outlier_side_product(y, xo, w_out_t[:1])
                        elif mode == "split+addmm":
                            y = K.add_outlier_side_product(y, xo, w_out_t)
                        elif mode == "split+folded_sparse":
                            y = K.sparse_correction(y, x, sp)

            return f

        base = None
        modes = ("smoothquant", "split_only", "split+addmm", "split+folded_sparse")
        # where session 12's 1-8% gap to SmoothQuant sits: the zero-point epilogue alone, and our split + it with one
        # outlier channel (no side product) or four (three as a side product); one channel + side product beside
        modes += ("smoothquant+azp_gemm", "split_azp S=1", "split_azp S=4", "split S=1")
        # a layer without outlier channels: our split vs vLLM's scaled_int8_quant (= smoothquant), session 13
        modes += ("split S=0",)
        for mode in modes:
            try:
                us = time_graph(run(mode), iters=B.args.iters) / nl
            except Exception as e:  # noqa: BLE001
                B.add(section="w8", config="layer", variant=mode, m=m, note=f"failed: {type(e).__name__}: {e}")
                continue
            rec = dict(section="w8", config="layer", variant=mode, m=m, us=us, bytes=wbytes + iobytes)
            if mode == "smoothquant":
                base = us
            elif base:
                rec["ratio_vs_smoothquant"] = base / us
            B.add(**rec)

        # our Triton int8 GEMM with every outlier channel in its epilogue (session 13): the configuration sweep over
        # the whole layer (split + GEMM, one outlier channel per matrix), then the best one without outliers
        tri = _w8_triton(B, layers, xs, m, nl, wbytes + iobytes, base)
        if tri:
            B.meta.setdefault("w8_triton_best", {})[str(m)] = tri

        # gate_up + SiLU*up consumer, compiled: the side product rides in the consumer's fused kernel
        if m not in COMPILED_MS:
            xs = {}  # frees the device memory of this size (closures above are done with it)
            continue
        n, k = SHAPES["gate_up"]
        w, prep, w_out_t, sp, _, _ = layers[0]["gate_up"]
        x = xs["gate_up"]

        def sq(x):
            xq, xsc, _ = ops.scaled_int8_quant(x)
            y = ops.cutlass_scaled_mm(xq, w["w_t"], scale_a=xsc, scale_b=w["scale"], out_dtype=torch.bfloat16)
            g, u = y.chunk(2, dim=-1)
            return F.silu(g) * u

        def ours(x):
            xq, xsc, xo = K.int8_quant_outlier_split(x, prep["idx"], True, prep["mask"])
            y = ops.cutlass_scaled_mm(xq, w["w_t"], scale_a=xsc, scale_b=w["scale"], out_dtype=torch.bfloat16)
            y = K.add_outlier_side_product(y, xo, w_out_t)
            g, u = y.chunk(2, dim=-1)
            return F.silu(g) * u

        base = None
        for nm, fn in (("smoothquant", sq), ("ours_fused_epilogue", ours)):
            if DRY and nm != "smoothquant":
                continue  # the Triton interpreter is not traceable by dynamo
            try:
                cf = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager" if DRY else "inductor")
                us = time_graph(lambda: cf(x), iters=B.args.iters, reps_per_graph=5)
            except Exception as e:  # noqa: BLE001
                B.add(section="w8", config="gate_up+silu compiled", variant=nm, m=m, note=f"failed: {e}")
                continue
            rec = dict(
                section="w8",
                config="gate_up+silu compiled",
                variant=nm,
                m=m,
                us=us,
                bytes=n * k + m * k * 3 + m * n * 2,
            )
            if base is None:
                base = us
            else:
                rec["ratio_vs_smoothquant"] = base / us
            B.add(**rec)
        xs = {}  # frees the device memory of this size (closures above are done with it)
    w8_triton_recommend(B)
    B.save()


W8BIG_SHAPES = ("qkv", "gate_up")  # the matrices that read the residual stream: where the outlier channels are


def section_w8big(B: Bench):
    """W8A8 at 33-512 tokens on the matrices with outlier channels (q/k/v and gate/up read the residual stream the
    super activation rides; o / down have none and run SmoothQuant's own CUTLASS GEMM there): SmoothQuant's path
    (vLLM quant + ``cutlass_scaled_mm``), ours above 32 tokens until session 43 (split + the zero-point epilogue,
    one outlier channel) and our Triton GEMM (split + every outlier channel in its epilogue) over
    ``triton_int8_mm.SWEEP_BIG``. Each Triton configuration is first checked against a float64 reference on the
    GPU. Recommends ``SUPERWEIGHT_W8A8_TRITON=32/OUT@...``: OUT the largest measured M up to which (from the first
    measured M on) the best configuration beats the zero-point path on these matrices."""
    import vllm_linear as VL  # tests/vllm_linear.py

    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import triton_int8_mm as TI

    ops = vllm_ops()
    nl = B.args.layers
    layers = []
    for li in range(nl):
        d = {}
        for name in W8BIG_SHAPES:
            n, k = SHAPES[name]
            w = VL.random_w8(n, k, B.dev, seed=li * 13 + n + k)
            idx = torch.sort(torch.randperm(k)[:1]).values
            prep = K.prepare_outliers(idx, k, B.dev)
            w_out_t = (w["w"][:, prep["idx"].long()].float() * w["scale"]).to(torch.bfloat16).t().contiguous()
            azp_adj = w["w"][:, prep["idx"].long()].t().to(torch.int32).contiguous()
            d[name] = (w, prep, w_out_t, azp_adj)
        layers.append(d)
    wbytes = sum(SHAPES[nm][0] * SHAPES[nm][1] + SHAPES[nm][0] * 4 for nm in W8BIG_SHAPES)
    best_by_m: dict[int, dict] = {}
    azp_by_m: dict[int, float] = {}
    for m in B.args.w8big_ms:
        xs = {nm: torch.randn(m, SHAPES[nm][1], device=B.dev, dtype=torch.bfloat16) * 0.5 for nm in W8BIG_SHAPES}
        for nm in W8BIG_SHAPES:  # a super activation in the outlier channel (the split must keep it out of Q(x))
            xs[nm][:, layers[0][nm][1]["idx"].long()] = 300.0
        iobytes = sum(m * SHAPES[nm][1] * 3 + m * SHAPES[nm][0] * 2 for nm in W8BIG_SHAPES)

        def run(mode, cfg=None):
            def f():
                for lay in layers:
                    for nm in W8BIG_SHAPES:
                        w, prep, w_out_t, azp_adj = lay[nm]
                        x = xs[nm]
                        if mode == "smoothquant":
                            xq, xsc, _ = ops.scaled_int8_quant(x)
                            ops.cutlass_scaled_mm(xq, w["w_t"], scale_a=xsc, scale_b=w["scale"], out_dtype=x.dtype)
                        elif mode == "azp":
                            xq, xsc, _, azp = K.int8_quant_outlier_split_azp(x, prep["idx"], prep["mask"])
                            ops.cutlass_scaled_mm_azp(xq, w["w_t"], xsc, w["scale"], x.dtype, azp_adj=azp_adj, azp=azp)
                        else:
                            xq, xsc, xo = K.int8_quant_outlier_split(x, prep["idx"], True, prep["mask"])
                            TI.int8_mm_outliers(xq, w["w"], xsc, w["scale"], xo, w_out_t, None, x.dtype, cfg)

            return f

        def record(variant, us, base):
            rec = dict(section="w8big", config="qkv+gate_up", variant=variant, m=m, us=us, bytes=wbytes + iobytes)
            if base:
                rec["ratio_vs_smoothquant"] = base / us
            B.add(**rec)

        base = None
        for mode in ("smoothquant", "azp"):
            try:
                us = time_graph(run(mode), iters=B.args.iters) / nl
            except Exception as e:  # noqa: BLE001
                B.add(section="w8big", config="qkv+gate_up", variant=mode, m=m, note=f"failed: {e}")
                continue
            record(mode, us, base)
            if mode == "smoothquant":
                base = us
            else:
                azp_by_m[m] = us
        # the float64 reference of the first layer's q/k/v (int8 GEMM x scales + outlier product)
        w, prep, w_out_t, _ = layers[0]["qkv"]
        xq, xsc, xo = K.int8_quant_outlier_split(xs["qkv"], prep["idx"], True, prep["mask"])
        scale = xsc.double().reshape(-1, 1) * w["scale"].double().reshape(1, -1)
        ref = (xq.double() @ w["w"].double().t()) * scale + xo.double() @ w_out_t.double()
        mag = (xq.double().abs() @ w["w"].double().abs().t()) * scale + xo.double().abs() @ w_out_t.double().abs()
        for cfg in TI.SWEEP_BIG:
            variant = "triton " + cfg.key()
            try:
                y = TI.int8_mm_outliers(xq, w["w"], xsc, w["scale"], xo, w_out_t, None, torch.bfloat16, cfg)
                err = float(((y.double() - ref).abs() - 2.0**-7 * ref.abs() - 1e-5 * mag).max())
                if not err <= 0:
                    raise AssertionError(f"off the float64 reference by {err:.3g} beyond one bf16 rounding")
                us = time_graph(run("triton", cfg), iters=B.args.iters) / nl
            except Exception as e:  # noqa: BLE001
                B.add(section="w8big", config="qkv+gate_up", variant=variant, m=m, note=f"failed: {e}")
                continue
            record(variant, us, base)
            if m not in best_by_m or us < best_by_m[m]["us"]:
                best_by_m[m] = {"config": cfg.key(), "us": us}
        xs = {}
    B.meta["w8big_best"] = {str(m): v for m, v in best_by_m.items()}
    rec = w8big_recommend(best_by_m, azp_by_m)
    if rec:
        B.meta.setdefault("recommend", {})["SUPERWEIGHT_W8A8_TRITON"] = rec


def w8big_recommend(best_by_m: dict[int, dict], azp_by_m: dict[int, float]) -> str | None:
    """``SUPERWEIGHT_W8A8_TRITON`` from the w8big section: ``MAX_M/OUT@buckets`` with OUT the largest measured M up
    to which (from the smallest measured M on, without a gap) the best Triton configuration ({"config", "us"} per
    M) is faster than the zero-point path; MAX_M and the buckets of 16 and 32 tokens keep their defaults (a bucket
    covers every M below it, so they are listed). None where Triton loses at the first measured M."""
    from vllm_superweight import envs
    from vllm_superweight.kernels import triton_int8_mm as TI

    out_max, parts = 0, []
    for m in sorted(best_by_m):
        if m not in azp_by_m or best_by_m[m]["us"] >= azp_by_m[m]:
            break
        out_max = m
        parts.append(f"{m}:{best_by_m[m]['config']}")
    if not out_max:
        return None
    small = [f"{b}:{TI.default_config(b, 4096, 4096).key()}" for b in (16, 32)]
    plain = envs.DEFAULT_W8A8_TRITON_MAX_M
    return f"{plain}/{max(out_max, plain)}@{';'.join(small + parts)}"


def summary(B: Bench) -> list[str]:
    lines = [f"device {B.name}  peak {B.peak} TB/s  copy {B.meta.get('copy_bw_tbs', float('nan')):.2f} TB/s"]
    by = {}
    for r in B.rows:
        if "us" in r:
            by[(r["section"], r["config"], r.get("variant"), r.get("m"))] = r
    lines.append(f"{'section':8} {'config':26} {'variant':26} {'M':>5} {'us':>9} {'TB/s':>6} {'%peak':>6} extra")
    for (sec, cfg, var, m), r in by.items():
        extra = ""
        if "extra_frac_of_gemm" in r:
            extra = f"+{r['extra_us_per_layer']:.1f}us/layer ({100 * r['extra_frac_of_gemm']:.1f}% of GEMM)"
        if "ratio_vs_smoothquant" in r:
            extra = f"{r['ratio_vs_smoothquant']:.3f}x SmoothQuant"
        lines.append(
            f"{sec:8} {cfg:26} {str(var):26} {m:>5} {r['us']:9.1f} {r.get('bw_tbs', 0):6.2f} "
            f"{100 * (r.get('frac_peak') or 0):5.1f}% {extra}"
        )
    return lines


W8_TABLE_ROWS = (
    ("smoothquant", "SmoothQuant (vLLM quant + cutlass_scaled_mm)"),
    ("smoothquant+azp_gemm", "the same, GEMM with the zero-point epilogue"),
    ("split_azp S=1", "ours, CUTLASS zero point (default until session 13)"),
    ("triton S=1", "ours, Triton GEMM, outlier in its epilogue (default M <= 32)"),
    ("split S=0", "ours without outliers, CUTLASS"),
    ("triton S=0", "ours without outliers, Triton GEMM"),
)


def w8_table(paths: list[str]) -> str:
    """Markdown: us per 7B layer (4 GEMMs) of the w8 section's layer variants by M, from one or more result files
    (later files fill the M values earlier ones lack)."""
    us: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                if r.get("section") == "w8" and r.get("config") == "layer" and r.get("us"):
                    us.setdefault(r["variant"], {}).setdefault(int(r["m"]), r["us"])
    ms = sorted({m for v in us.values() for m in v})
    lines = ["| us per 7B layer (4 GEMMs) | " + " | ".join(f"M = {m}" for m in ms) + " |"]
    lines.append("|---|" + "---:|" * len(ms))
    for key, label in W8_TABLE_ROWS:
        if key in us:
            lines.append(f"| {label} | " + " | ".join(f"{us[key][m]:.1f}" if m in us[key] else "–" for m in ms) + " |")
    return "\n".join(lines) + "\n"


def w8big_table(path: str) -> str:
    """Markdown: us per 7B layer's q/k/v + gate/up (activation split included) of the w8big section by M, one row
    per variant (SmoothQuant, the zero-point path, each Triton configuration), the fastest Triton one of each M in
    bold, and a last row: the best Triton over SmoothQuant."""
    with open(path) as f:
        rows = [r for r in json.load(f)["results"] if r.get("section") == "w8big" and r.get("us")]
    us: dict[str, dict[int, float]] = {}
    for r in rows:
        us.setdefault(r["variant"], {})[int(r["m"])] = r["us"]
    ms = sorted({m for v in us.values() for m in v})
    tri = {v: d for v, d in us.items() if v.startswith("triton ")}
    best = {m: min((d[m] for d in tri.values() if m in d), default=None) for m in ms}
    lines = ["| us, q/k/v + gate/up of a 7B layer | " + " | ".join(f"M = {m}" for m in ms) + " |"]
    lines.append("|---|" + "---:|" * len(ms))
    for v, d in us.items():
        cells = []
        for m in ms:
            x = d.get(m)
            cells.append("–" if x is None else (f"**{x:.1f}**" if v in tri and x == best[m] else f"{x:.1f}"))
        name = {"smoothquant": "SmoothQuant (vLLM quant + cutlass_scaled_mm)", "azp": "ours, zero-point epilogue"}
        lines.append(f"| {name.get(v, v)} | " + " | ".join(cells) + " |")
    sq = us.get("smoothquant", {})
    ratio = [f"{sq[m] / best[m]:.3f}" if best[m] and m in sq else "–" for m in ms]
    lines.append("| best Triton, × SmoothQuant | " + " | ".join(ratio) + " |")
    return "\n".join(lines) + "\n"


def layer_us(rows: list[dict], section: str) -> dict[str, dict[int, float]]:
    """{config: {M: us per 7B layer}} of one per-layer section's timed rows (gemlite, humming)."""
    us: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("section") == section and r.get("us"):
            us.setdefault(r["config"], {})[int(r["m"])] = r["us"]
    return us


def layer_table(path: str, section: str, png: str | None = None) -> str:
    """Markdown (and, with ``png``, a log-log plot) of a per-layer section from its result file: us per 7B layer
    (4 GEMMs) by M, one row per kernel, the fastest of each M in bold."""
    with open(path) as f:
        us = layer_us(json.load(f)["results"], section)
    ms = sorted({m for v in us.values() for m in v})
    best = {m: min(v[m] for v in us.values() if m in v) for m in ms}
    lines = ["| us per 7B layer (4 GEMMs) | " + " | ".join(f"M = {m}" for m in ms) + " |"]
    lines.append("|---|" + "---:|" * len(ms))
    for key, row in us.items():
        cells = [("–" if m not in row else f"**{row[m]:.1f}**" if row[m] == best[m] else f"{row[m]:.1f}") for m in ms]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for key, row in us.items():
            xs = sorted(row)
            ax.plot(xs, [row[m] for m in xs], marker="o", ms=3, label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per GEMM (M)")
        ax.set_ylabel("us per 7B layer (4 GEMMs)")
        ax.set_title(f"kernel_bench section {section}: {os.path.basename(path)}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
    return "\n".join(lines) + "\n"


def main() -> int:
    if "--layer-table" in sys.argv:  # kernel_bench.py --layer-table SECTION RESULT.json [PLOT.png]: print the table
        a = sys.argv[sys.argv.index("--layer-table") + 1 :]
        print(layer_table(a[1], a[0], a[2] if len(a) > 2 else None), end="")
        return 0
    if "--w8big-table" in sys.argv:  # python benchmarks/kernel_bench.py --w8big-table A.json: print the table
        print(w8big_table([a for a in sys.argv[1:] if a != "--w8big-table"][0]), end="")
        return 0
    if "--w8-table" in sys.argv:  # python benchmarks/kernel_bench.py --w8-table A.json [B.json ...]: print the table
        print(w8_table([a for a in sys.argv[1:] if a != "--w8-table"]), end="")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernel_bench.json"))
    ap.add_argument("--ms", default="1,8,64,256,1024,4096")
    ap.add_argument("--sections", default="quant,sparse,w4,w8")
    ap.add_argument("--layers", type=int, default=4, help="distinct layers per graph (weights > L2)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--peak-bw", type=float, default=None, help="TB/s (default: from the device name)")
    ap.add_argument("--quick", action="store_true", help="M in {1, 64}, fewer variants (smoke test)")
    ap.add_argument(
        "--sweep-ms", default="1,2,4,8,12,16,24,32,48,64,96,128,192,256", help="M values of the w4sweep section"
    )
    ap.add_argument("--w8big-ms", default="33,48,64,96,128,192,256,384,512", help="M values of the w8big section")
    ap.add_argument("--sched-ms", default="1,2,4,8,16,32,48,64,96,128,192,256", help="M values of machete_sched")
    ap.add_argument("--pairs-ms", default="1,8,16,48,64,128,256,1024", help="M values of the pairs section")
    ap.add_argument("--gemlite-ms", default="1,2,4,8,16,32,48,64,96,128,192,256,1024", help="M of gemlite")
    ap.add_argument("--gemlite-path", default="", help="directory holding an unpacked gemlite wheel")
    ap.add_argument("--gemlite-cache", default="", help="gemlite tuned table (JSON) to load first")
    ap.add_argument("--gemlite-cache-out", default="", help="write gemlite's tuned table here after each M")
    ap.add_argument("--gemlite-budget-s", type=float, default=420.0, help="gemlite stops starting new M after this")
    ap.add_argument("--gemlite-fma", action="store_true", help="also time gemlite's default fma dequant (mode 4)")
    ap.add_argument("--humming-ms", default="64,1,128,8,256,16,32,48,96,192,1024", help="M of humming, in order")
    ap.add_argument("--humming-path", default="", help="a pip --target directory holding humming-kernels")
    ap.add_argument("--humming-budget-s", type=float, default=300.0, help="humming stops starting new M after this")
    ap.add_argument("--sched-budget-s", type=float, default=400.0, help="machete_sched stops timing after this")
    ap.add_argument(
        "--w4-configs", type=int, default=3, help="w4 section: first N of channel-asym, g128-asym, channel-sym"
    )
    ap.add_argument("--recommend-env", default="", help="also write the recommended knobs as KEY=VALUE lines here")
    ap.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ms = [1, 64] if args.quick else [int(v) for v in args.ms.split(",")]
    args.sweep_ms = [int(v) for v in args.sweep_ms.split(",")]
    args.sched_ms = [int(v) for v in args.sched_ms.split(",")]
    args.w8big_ms = [int(v) for v in args.w8big_ms.split(",")]
    args.pairs_ms = [int(v) for v in args.pairs_ms.split(",")]
    args.gemlite_ms = [int(v) for v in args.gemlite_ms.split(",")]
    args.humming_ms = [int(v) for v in args.humming_ms.split(",")]
    if args.humming_path:  # appended: the image's own packages win over the carried ones; before vLLM's import
        sys.path.append(os.path.abspath(args.humming_path))
    global DRY
    DRY = args.dry_run_cpu
    if DRY:
        args.layers = min(args.layers, 1)
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        SHAPES.clear()
        SHAPES.update({"qkv": (384, 256), "o": (128, 256), "gate_up": (768, 256), "down": (256, 384)})
    elif not torch.cuda.is_available():
        print("kernel_bench: no CUDA device", file=sys.stderr)
        return 2
    try:
        import vllm  # noqa: F401
        from vllm import _custom_ops as ops  # noqa: F401

        assert DRY or hasattr(torch.ops._C, "cutlass_scaled_mm"), "vLLM CUDA kernels (_C) are not loaded"
    except Exception as e:  # noqa: BLE001
        print(f"kernel_bench: vLLM with CUDA kernels is required: {e}", file=sys.stderr)
        return 2
    B = Bench(args)
    log(f"device {B.name} ({B.meta['sm_count']} SMs), peak {B.peak} TB/s; sections {args.sections}; M {args.ms}")
    B.meta["copy_bw_tbs"] = float("nan") if DRY else copy_bandwidth()
    log(f"measured device-to-device copy bandwidth: {B.meta['copy_bw_tbs']:.2f} TB/s (read + write)")
    B.save()
    funcs = {
        "w4": section_w4,
        "sparse": section_sparse,
        "quant": section_quant,
        "w8": section_w8,
        "w8big": section_w8big,
        "w4sweep": section_w4sweep,
        "sparsesweep": section_sparsesweep,
        "machete_sched": section_machete_sched,
        "pairs": section_pairs,
        "gemlite": section_gemlite,
        "humming": section_humming,
    }
    rc = 0
    for sec in args.sections.split(","):
        log(f"section {sec}")
        try:
            funcs[sec](B)
        except Exception:  # noqa: BLE001
            rc = 1
            tb = traceback.format_exc()
            print(tb, file=sys.stderr)
            B.add(section=sec, config="-", note="section failed: " + tb.strip().splitlines()[-1])
        B.save()
        torch.cuda.empty_cache()
    B.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    B.save()
    if args.recommend_env and B.meta.get("recommend"):
        with open(args.recommend_env, "w") as f:
            for k_, v_ in B.meta["recommend"].items():
                f.write(f"export {k_}={shlex.quote(str(v_))}\n")  # values may hold ';' (W8A8 configs)
        log(f"recommended knobs -> {args.recommend_env}: {B.meta['recommend']}")
    print("\n".join(summary(B)))
    log(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
