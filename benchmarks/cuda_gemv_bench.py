"""Micro-benchmark: the CUDA-core GEMV over Marlin's layout (``kernels/cuda_marlin_gemv.py``) against vLLM's Marlin
on Llama-2-7B-shaped W4 layers (issue 12's M = 1 target: >= 60 % of HBM peak), with and without the 0.1 % hold-out's
separate SELL correction and with it in the GEMV's epilogue (``cuda-fused``; the tensor-core form's: ``mma-fused``,
what ``SUPERWEIGHT_CUDA_GEMV=8`` runs for held-out layers at 2-8 tokens -- against ``marlin+sell`` with
``--holdout-modules qkv``, the default preset's placement), M = 1..8 (the CUDA-core form ``cuda``
up to 4 tokens, the tensor-core form ``mma`` / ``mma+sell`` up to 8), plus sweeps of each form's launch
configurations (``--sweep``: CUDA-core at M = 1; ``--mma-sweep``: tensor-core at M = 1 and 8), the group constants
through the ring against without (``--pf``) and the programmatic dependent launch against a plain one, each GEMM
after a small kernel that writes its x as in a decoder layer (``--pdl``), and the SELL kernel after the tensor-core
form launched as its programmatic dependent (``--sellpdl``: ``mma+sell-pdl``, the GEMV with SW_TRIG; ``mma-trig`` the
GEMV alone with it; at one token the single-token form's ``cuda+sell-pdl`` / ``cuda-trig``, what ``fold=0`` serves)
against the plain pair and the terms inside the GEMV spread over its split-K blocks, at 1-8 tokens.

    python benchmarks/cuda_gemv_bench.py --out $OUT/cuda_gemv.json [--layers 4] [--ms 1,2,4,8] [--sweep] [--mma-sweep]

Layers: random g128 asymmetric codes (speed does not depend on values), each a ``marlin-deq1`` kernel object (the
one-copy default for held-out checkpoints) built by ``tests/vllm_linear.build_mp_layer`` with a 0.1 % hold-out and
one planted super weight in down_proj; every GEMV reads that object's own Marlin tensors. Timing: the median of
CUDA-graph replays over ``--layers`` copies of one decoder layer's four GEMMs (qkv, o, gate_up, down; 4 copies =
~430 MB, beyond the 60 MB L2), reported per layer. Bytes: packed codes + bf16 scales + packed zeros + x + y.
Writes JSON (results + meta) after every part and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from w4_fused_bench import time_graph  # noqa: E402  (median us of CUDA-graph replays)

from vllm_superweight.kernels.cuda_marlin_gemv import DEFAULT_CONFIG as DEFAULT  # noqa: E402
from vllm_superweight.kernels.cuda_marlin_gemv import MMA_CONFIG as MMA_DEFAULT  # noqa: E402
from vllm_superweight.kernels.cuda_marlin_gemv import SERVE_MMA, SERVE_ONE, config_with  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
PEAK_TBS = {"H200": 4.8, "H100": 3.35}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def read_tbs(dev: torch.device) -> float:
    """A read-only pass over 1 GiB (torch's sum of fp32, 4 bytes read an element)."""
    src = torch.ones(1 << 28, dtype=torch.float32, device=dev)
    us = time_graph(lambda: torch.sum(src), 10)
    return round(4 * src.numel() / (us * 1e-6) / 1e12, 3)


def copy_tbs(dev: torch.device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    us = time_graph(lambda: dst.copy_(src), 10)
    return round(2 * src.numel() / (us * 1e-6) / 1e12, 3)


# (rows a chunk, warps a block, warps per SM wanted, ring stages, min blocks per SM for the registers, lean decoding)
SWEEP = [(4, 4, 24, 4, 1, 0), (4, 4, 24, 4, 1, 1), (4, 8, 24, 2, 1, 0), (4, 8, 24, 2, 1, 1), (4, 4, 48, 2, 8, 1)]
SWEEP += [(4, 4, 48, 2, 6, 1), (4, 8, 48, 2, 4, 1), (8, 4, 24, 2, 6, 1), (4, 4, 96, 2, 8, 1), (2, 4, 48, 3, 8, 1)]
SWEEP += [(4, 4, 48, 3, 1, 1), (8, 4, 48, 2, 1, 1), (4, 8, 64, 2, 4, 1), (4, 2, 48, 4, 8, 1)]
# the tensor-core form (7th field 1): rows a chunk, warps a block, warps per SM wanted, ring stages, blocks per SM
MMA_SWEEP = [(4, 4, 24, 2, 1, 0, 1), (4, 4, 24, 3, 1, 0, 1), (4, 4, 48, 2, 4, 0, 1), (8, 4, 24, 2, 1, 0, 1)]
MMA_SWEEP += [(4, 2, 48, 4, 8, 0, 1), (2, 4, 48, 3, 4, 0, 1), (4, 4, 96, 2, 8, 0, 1)]
# 8 warps a block (their partial sums in the ring's slots; session 24): half the split-K blocks of 4 warps
MMA_SWEEP += [(4, 8, 24, 2, 1, 0, 1), (4, 8, 16, 2, 1, 0, 1)]
# --pf: both forms with their group constants prefetched through the ring (8th field 1) against the same configuration
# without (the defaults, then a few ring shapes the prefetch may favour: more stages, longer chunks)
PF_PAIRS = [
    ("cuda", DEFAULT, (1, 2, 4)),
    ("cuda-fused", DEFAULT, (1,)),
    ("mma", (4, 4, 24, 2, 1, 0, 1), (1, 2, 4, 8)),
]
PF_SWEEP = [
    ("cuda", (4, 8, 32, 2, 1, 1, 0, 1)),
    ("cuda", (8, 4, 24, 2, 1, 1, 0, 1)),
    ("cuda", (4, 4, 24, 4, 1, 1, 0, 1)),
    ("mma", (4, 4, 24, 3, 1, 0, 1, 1)),
    ("mma", (8, 4, 24, 2, 1, 0, 1, 1)),
    ("mma", (2, 4, 24, 3, 1, 0, 1, 1)),
    # fewer warps over the grid = fewer split-K blocks a tile: at 8 tokens their fp32 partials are ~12 % of the
    # weight bytes (qkv: 4 splits x 8 x 12288 x 4 B, written and read) and the last block sums them serially;
    # session 24's sweep got slower with more warps (per_sm 48: 94.5 us, 96: 106.7 vs 24: 89.7)
    ("mma", (4, 4, 12, 2, 1, 0, 1, 1)),
    ("mma", (4, 4, 16, 2, 1, 0, 1, 1)),
    ("mma", (8, 4, 12, 2, 1, 0, 1, 1)),
    ("mma", (4, 8, 24, 2, 1, 0, 1, 1)),
    ("mma", (4, 8, 16, 2, 1, 0, 1, 1)),
]


# --pdl: the GEMV launched as a programmatic dependent (9th field) against a plain launch, each GEMM after a small
# kernel that writes its x (as vLLM's norms and activations do: kind "-dep"), and back to back
PDL_CASES = [
    ("cuda-dep", config_with(DEFAULT, pf=0)),
    ("cuda-dep", config_with(DEFAULT, pf=1)),
    ("cuda", config_with(DEFAULT, pf=0)),
    ("cuda-fused-dep", config_with(DEFAULT, pf=0)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--holdout", type=float, default=1e-3)
    ap.add_argument(
        "--holdout-modules",
        choices=("all", "qkv"),
        default="all",
        help="where the hold-out sits: every GEMM at --holdout (default), or the whole layer's --holdout in qkv alone "
        "(the default preset's placement: 0.40%% of qkv at 0.1%%; the other GEMMs one entry each)",
    )
    ap.add_argument("--sweep", action="store_true", help="launch configurations at M = 1")
    ap.add_argument("--mma-sweep", action="store_true", help="the tensor-core form's configurations at M = 1, 8")
    ap.add_argument("--pf", action="store_true", help="group constants prefetched through the ring vs not (SW_PF)")
    ap.add_argument(
        "--mma-configs", default="", help="more tensor-core configurations at M = 8 (and 1): 'U:W:PS:ST:MB:0:1:PF;...'"
    )
    ap.add_argument(
        "--one-configs", default="", help="more CUDA-core configurations at M = 1: 'U:W:PS:ST:MB:LEAN:0:PF:PDL:XR;...'"
    )
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch vs plain (SW_PDL), M = 1")
    ap.add_argument(
        "--sellpdl",
        action="store_true",
        help="the SELL kernel as the served GEMV's programmatic dependent (the GEMV with SW_TRIG; "
        "SUPERWEIGHT_CUDA_GEMV sellpdl=1, at one token with fold=0) vs the plain pair and vs the terms inside "
        "(spread), on the served configurations at 1-8 tokens (--ms); checked first (bitwise)",
    )
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="what bounds M = 1: a read-only reduction over 1 GiB (torch), the GEMV's loads alone (no decoding) and "
        "each GEMM of the layer alone, Marlin and the GEMV",
    )
    ap.add_argument(
        "--spe",
        action="store_true",
        help="where the held-out terms are summed (SW_SPE, config field 11: after / before the main loop, in the "
        "tile's first split-K block / spread over all of them) at 1-8 tokens on the served configurations, beside "
        "the plain GEMV and the GEMV + the SELL kernel; checked first (before = after bitwise, spread vs first)",
    )
    ap.add_argument(
        "--held-env",
        default="",
        help="also write SW_HELD_ONE / SW_HELD_MMA / SW_HELD_FOLD (held_env(): the --spe part's choice) here, for "
        "throughput.py's sw-w4-g128-holdout-qkv-humgemv-spe",
    )
    ap.add_argument("--budget-s", type=float, default=500)
    ap.add_argument("--no-main", action="store_true", help="skip the main table's kernels (only the parts asked for)")
    ap.add_argument(
        "--recommend-env",
        default="",
        help="also write SUPERWEIGHT_CUDA_GEMV=MAX_M@one=..,mma=.. (recommend(): what the measurements argue for) "
        "here, as KEY=VALUE lines (gpu_run.sh's throughput stage sources it)",
    )
    ap.add_argument(
        "--engine-env",
        default="",
        help="also write SW_XR_ONE / SW_XR_MMA (engine_env(): the single-token choice and the tensor-core form's "
        "fastest at 8 tokens) here, for throughput.py's sw-w4-g128-humgemv-xr (gpu_run.sh's throughput stage sources "
        "it)",
    )
    ap.add_argument(
        "--no-vllm",
        action="store_true",
        help="random words as Marlin's tensors (speed does not depend on values): the GEMV alone, no vLLM needed",
    )
    args = ap.parse_args()

    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import cuda_marlin_gemv as CG
    from vllm_superweight.kernels.linear.base import W_PACKED, W_SCALE, W_ZERO, tensor

    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(dev)
    peak = next((v for key, v in PEAK_TBS.items() if key in p.name), float("nan"))
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {
        "device": p.name,
        "sm_count": p.multi_processor_count,
        "peak_tbs": peak,
        "torch": torch.__version__,
        "layers": args.layers,
        "shapes": SHAPES,
        "holdout": args.holdout,
        "holdout_modules": args.holdout_modules,
        "default_config": CG.DEFAULT_CONFIG,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows: list[dict] = []

    def save() -> None:
        meta["elapsed_s"] = round(time.time() - T0, 1)
        with open(out + ".tmp", "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
        os.replace(out + ".tmp", out)

    # copy bandwidth (read + write) as the machine's practical ceiling
    meta["copy_tbs"] = copy_tbs(dev)
    if args.ceiling:
        meta["read_tbs"] = read_tbs(dev)
    log(f"{p.name}: copy {meta['copy_tbs']} TB/s, peak {peak}")

    layers = []
    for li in range(args.layers):
        d = {}
        for name, (n, k) in SHAPES.items():
            g = torch.Generator(device=dev).manual_seed(1000 * li + n + k)
            q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32, device=dev)
            s = (torch.rand(n, k // 128, generator=g, device=dev) * 0.01 + 0.002).to(torch.bfloat16)
            z = torch.randint(0, 16, (n, k // 128), generator=g, dtype=torch.int32, device=dev)
            gc = torch.Generator().manual_seed(li * 10 + len(d))
            if args.holdout_modules == "qkv":  # the layer's whole budget in qkv (preset default), one entry elsewhere
                layer_w = sum(a * b for a, b in SHAPES.values())
                nnz = max(1, int(round(layer_w * args.holdout))) if name == "qkv" else 1
            else:
                nnz = max(1, int(round(n * k * args.holdout)))
            flat = torch.randperm(n * k, generator=gc)[:nnz]
            if name == "down":
                flat = torch.unique(torch.cat([flat, torch.tensor([(n // 2) * k + k // 3])]))
            r, c = flat // k, flat % k
            v = (torch.randn(r.numel(), generator=gc) * 0.05).to(torch.bfloat16).float()
            q[r.to(dev), c.to(dev)] = z[r.to(dev), (c // 128).to(dev)]
            if args.no_vllm:
                i32 = torch.iinfo(torch.int32)
                ent = {
                    "k": None,
                    "qm": torch.randint(i32.min, i32.max, (k // 16, 2 * n), generator=g, dtype=torch.int32, device=dev),
                    "sc": s.t().contiguous(),
                    "zp": torch.randint(
                        i32.min, i32.max, (k // 128, n // 8), generator=g, dtype=torch.int32, device=dev
                    ),
                }
            else:
                import vllm_linear as VL

                w = {"q": q, "scales": s, "zeros": z, "group": 128, "symmetric": False, "n": n, "k": k}
                layer, kobj = VL.build_mp_layer(w, "marlin-deq1", sparse=(r, c, v))
                sh = kobj.shadow
                ent = {"layer": layer, "k": kobj, "qm": tensor(sh, W_PACKED), "sc": tensor(sh, W_SCALE)}
                ent["zp"] = tensor(sh, W_ZERO)
                ent["maps"] = CG.sparse_maps(kobj.sp, n)  # the epilogue's view of the packed SELL slots
            ent.update(
                {
                    "plan": CG.gemv_plan(n, k, 128, False, torch.bfloat16, dev),
                    "plan_mma": CG.gemv_plan(n, k, 128, False, torch.bfloat16, dev, config=CG.MMA_CONFIG),
                    "bytes": n * k // 2 + n * (k // 128) * 2 + n * (k // 128) // 2,
                }
            )
            del q
            d[name] = ent
        layers.append(d)
    torch.cuda.synchronize()
    meta["plans"] = {name: vars(layers[0][name]["plan"]) for name in SHAPES}
    log(f"built {args.layers} layers; plans {meta['plans']}")

    ms = [int(m) for m in args.ms.split(",")]
    if args.pf:  # its pairs run 1, 2, 4 and 8 tokens
        ms = sorted(set(ms) | {1, 2, 4, 8})
    gx = torch.Generator(device=dev).manual_seed(7)
    bf = torch.bfloat16
    xs = {m: {nm: torch.randn(m, k, generator=gx, device=dev).to(bf) for nm, (n, k) in SHAPES.items()} for m in ms}
    ys = {m: {nm: torch.empty(m, n, device=dev, dtype=bf) for nm, (n, k) in SHAPES.items()} for m in ms}

    # correctness first: the GEMV against Marlin (the same tensors), per shape and M
    for m in ms if not args.no_vllm else []:
        for name in SHAPES:
            e, x = layers[0][name], xs[m][name]
            ym = e["k"].small.apply_gemm(e["k"].shadow, x, None)
            plan = e["plan"] if m <= e["plan"].max_m else e["plan_mma"]
            yc = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plan)
            rel = float((yc.float() - ym.float()).norm() / ym.float().norm())
            ymm = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], e["plan_mma"])
            relm = float((ymm.float() - ym.float()).norm() / ym.float().norm())
            rows.append({"part": "check", "shape": name, "m": m, "rel_vs_marlin": rel, "rel_mma_vs_marlin": relm})
            if relm > 1e-2:
                log(f"  CHECK FAILED (tensor-core form) {name} M={m}: rel {relm:.3g}")
            if rel > 1e-2:
                log(f"  CHECK FAILED {name} M={m}: rel {rel:.3g}")
            # the held-out terms in the epilogue against the same terms added by the separate correction, for the
            # form serving M and for the tensor-core form (what SUPERWEIGHT_CUDA_GEMV=2..8 runs for held-out layers)
            for key, pl, y0, what in (
                ("rel_fused_vs_separate", plan, yc, "epilogue"),
                ("rel_mma_fused_vs_separate", e["plan_mma"], ymm, "tensor-core epilogue"),
            ):
                yf = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], pl, sparse=e["k"].sp, maps=e["maps"])
                ys_ = K.sparse_correction(y0.clone(), x, e["k"].sp)
                rows[-1][key] = relf = float((yf.float() - ys_.float()).norm() / ys_.float().norm())
                if relf > 1e-2:
                    log(f"  CHECK FAILED ({what}) {name} M={m}: rel {relf:.3g}")
    if not args.no_vllm:
        log("check: max rel vs Marlin " + f"{max(r['rel_vs_marlin'] for r in rows if r['part'] == 'check'):.3g}")
    save()

    def wbytes(m: int, only: str | None = None) -> int:
        names = [only] if only else list(SHAPES)
        return sum(layers[0][nm]["bytes"] + m * sum(SHAPES[nm]) * 2 for nm in names)

    def run(kind: str, m: int, config=None, only: str | None = None):
        plans = None
        if config is not None:
            plans = {
                name: CG.gemv_plan(n, k, 128, False, torch.bfloat16, dev, config=config)
                for name, (n, k) in SHAPES.items()
            }
        if kind in TRIG_KINDS:  # the plans with SW_TRIG, compiled before the capture
            own = "plan_mma" if kind.startswith("mma") else "plan"
            base_plans = plans or {name: e[own] for name, e in layers[0].items()}
            plans = {name: dataclasses.replace(pl, trig=True) for name, pl in base_plans.items()}
            for pl in plans.values():
                CG.prepare(pl, m, min_m=m)

        def f():
            for lay in layers:
                for name, e in lay.items():
                    if only and name != only:
                        continue
                    x = xs[m][name]
                    if kind.endswith("-dep"):  # a kernel before the GEMM that writes its x (values unchanged)
                        x.mul_(1.0)
                    if kind in ("marlin", "marlin-dep"):
                        e["k"].small.apply_gemm(e["k"].shadow, x, None)
                    elif kind == "marlin+sell":
                        y = e["k"].small.apply_gemm(e["k"].shadow, x, None)
                        K.sparse_correction(y, x, e["k"].sp)
                    elif kind in ("cuda-fused", "cuda-fused-dep"):
                        plan = plans[name] if plans else e["plan"]
                        CG.marlin_gemv_cuda(
                            x, e["qm"], e["sc"], e["zp"], plan, out=ys[m][name], sparse=e["k"].sp, maps=e["maps"]
                        )
                    elif kind in ("mma", "mma+sell", "mma-trig", "mma+sell-pdl"):
                        plan = plans[name] if plans else e["plan_mma"]
                        y = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plan, out=ys[m][name])
                        if kind in ("mma+sell", "mma+sell-pdl"):
                            K.sparse_correction(y, x, e["k"].sp, pdl=kind.endswith("-pdl"))
                    elif kind == "mma-fused":  # the tensor-core form with the held-out terms in its epilogue
                        plan = plans[name] if plans else e["plan_mma"]
                        CG.marlin_gemv_cuda(
                            x, e["qm"], e["sc"], e["zp"], plan, out=ys[m][name], sparse=e["k"].sp, maps=e["maps"]
                        )
                    elif kind in ("cuda", "cuda+sell", "cuda-loads", "cuda-dep", "cuda-trig", "cuda+sell-pdl"):
                        plan = plans[name] if plans else e["plan"]
                        ro = kind == "cuda-loads"
                        y = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plan, out=ys[m][name], _readonly=ro)
                        if kind in ("cuda+sell", "cuda+sell-pdl"):
                            K.sparse_correction(y, x, e["k"].sp, pdl=kind.endswith("-pdl"))

        return f

    def timed(kind: str, m: int, config=None, part="main", only: str | None = None) -> float | None:
        if time.time() - T0 > args.budget_s:
            rows.append({"part": part, "kernel": kind, "m": m, "note": "budget"})
            return None
        try:
            us = time_graph(run(kind, m, config, only), args.iters) / len(layers)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            note = f"{type(e).__name__}: {e}"[:300]
            rows.append({"part": part, "kernel": kind, "m": m, "config": config, "note": note})
            return None
        tbs = wbytes(m, only) / (us * 1e-6) / 1e12
        rec = {"part": part, "kernel": kind, "m": m, "us": round(us, 2), "tbs": round(tbs, 3), "shape": only or "layer"}
        rec["frac_peak"] = round(tbs / peak, 4)
        if config is not None:
            rec["config"] = list(config)
        rows.append(rec)
        log(f"  {part} {kind:12s} {only or 'layer'} M={m} cfg={config} {us:8.2f} us  {tbs:.2f} TB/s  {tbs / peak:.1%}")
        save()
        return us

    kinds = ("cuda", "mma") if args.no_vllm else ("marlin", "cuda", "mma", "marlin+sell", "cuda+sell", "cuda-fused")
    kinds += ("mma+sell", "mma-fused") if not args.no_vllm else ()
    for m in [] if args.no_main else ms:
        for kind in kinds:
            if kind.startswith("cuda") and m > CG.MAX_M_FFMA:
                continue
            timed(kind, m)
    if args.mma_sweep:  # the tensor-core form's launch configurations at 1 and 8 tokens
        for cfg in MMA_SWEEP:
            for m in (1, 8):
                timed("mma", m, cfg, part="mma-sweep")
    if args.pf:  # bitwise check first (the prefetch moves where constants come from, not the arithmetic)
        for kind, cfg, pms in PF_PAIRS:
            for m in pms:
                for name, (n_, k_) in SHAPES.items():
                    e, x = layers[0][name], xs[m][name]
                    sp = {"sparse": e["k"].sp, "maps": e["maps"]} if kind == "cuda-fused" and not args.no_vllm else {}
                    outs = [
                        CG.marlin_gemv_cuda(
                            x, e["qm"], e["sc"], e["zp"], CG.gemv_plan(n_, k_, 128, False, bf, dev, config=c), **sp
                        )
                        for c in (cfg, config_with(cfg, pf=1))
                    ]
                    same = bool(torch.equal(outs[0], outs[1]))
                    rows.append({"part": "pf-check", "kernel": kind, "m": m, "shape": name, "bitwise_equal": same})
                    if not same:
                        log(f"  CHECK FAILED (prefetch) {kind} {name} M={m}: not bitwise equal")
        for kind, cfg, pms in PF_PAIRS:
            if args.no_vllm and kind == "cuda-fused":
                continue
            for m in pms:
                timed(kind, m, cfg, part="pf")
                timed(kind, m, config_with(cfg, pf=1), part="pf")
        for kind, cfg in PF_SWEEP:
            for m in (1, 8) if kind == "mma" else (1,):
                timed(kind, m, cfg, part="pf-sweep")
    if args.pdl:  # bitwise check, then each case plain and as a programmatic dependent
        for name, (n_, k_) in SHAPES.items():
            e, x = layers[0][name], xs[1][name]
            outs = [
                CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], CG.gemv_plan(n_, k_, 128, False, bf, dev, config=c))
                for c in (DEFAULT, config_with(DEFAULT, pdl=1))
            ]
            same = bool(torch.equal(outs[0], outs[1]))
            rows.append({"part": "pdl-check", "kernel": "cuda", "m": 1, "shape": name, "bitwise_equal": same})
            if not same:
                log(f"  CHECK FAILED (PDL) {name}: not bitwise equal")
        timed("marlin-dep", 1, part="pdl")
        for kind, cfg in PDL_CASES:
            if args.no_vllm and kind.startswith("cuda-fused"):
                continue
            timed(kind, 1, cfg, part="pdl")
            timed(kind, 1, config_with(cfg, pdl=1), part="pdl")
    if args.ceiling:
        timed("cuda-loads", 1, part="ceiling")
        for name in SHAPES:
            for kind in ("cuda", "cuda-loads") if args.no_vllm else ("marlin", "cuda", "cuda-loads"):
                timed(kind, 1, part="ceiling", only=name)
    if args.sweep:
        e, x = layers[0]["down"], xs[1]["down"]
        ref = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], e["plan"]).float()
        n_, k_ = SHAPES["down"]
        for cfg in SWEEP:
            us = timed("cuda", 1, cfg, part="sweep")
            if us is not None:  # each form against the default one (down_proj: split-K over 11 blocks)
                plan = CG.gemv_plan(n_, k_, 128, False, torch.bfloat16, dev, config=cfg)
                y = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plan).float()
                rows[-1]["rel_vs_default"] = float((y - ref).norm() / ref.norm())
    specs = [(s_, "mma", (8, 1)) for s_ in filter(None, args.mma_configs.split(";"))]
    specs += [(s_, "cuda", (1,)) for s_ in filter(None, args.one_configs.split(";"))]
    for spec, kind, tms in specs:
        cfg = tuple(int(f) for f in spec.split(":"))
        for m in [] if args.no_vllm else [mm for mm in ((2, 8) if kind == "mma" else (1,)) if mm in xs]:  # vs Marlin
            for name, (n_, k_) in SHAPES.items():
                e, x = layers[0][name], xs[m][name]
                try:
                    plan = CG.gemv_plan(n_, k_, 128, False, bf, dev, config=cfg)
                except ValueError as err:
                    rows.append({"part": "mma-check", "m": m, "shape": name, "config": list(cfg), "note": str(err)})
                    continue
                ym = e["k"].small.apply_gemm(e["k"].shadow, x, None).float()
                yc = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plan).float()
                rel = float((yc - ym).norm() / ym.norm())
                rows.append({"part": "mma-check", "m": m, "shape": name, "config": list(cfg), "rel_vs_marlin": rel})
                if rel > 1e-2:
                    log(f"  CHECK FAILED ({kind} {cfg}) {name} M={m}: rel {rel:.3g}")
        for m in tms:
            timed(kind, m, cfg, part="mma-sweep" if kind == "mma" else "sweep")
        if kind == "cuda" and not args.no_vllm:  # single tokens of held-out layers: the terms inside vs after it
            timed("cuda-fused", 1, cfg, part="sweep-held")
            timed("cuda+sell", 1, cfg, part="sweep-held")
    if args.spe and not args.no_vllm:  # the held-out terms' placement (SW_SPE) on the served configurations
        for m in [mm for mm in (1, 2, 4, 8) if mm in xs]:
            kind, base = _served(m)
            for name, (n_, k_) in SHAPES.items():
                e, x = layers[0][name], xs[m][name]
                outs, splits = {}, 0
                for spe in SPE_VALUES:
                    plan = CG.gemv_plan(n_, k_, 128, False, bf, dev, config=config_with(base, spe=spe))
                    splits = plan.splits
                    y = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plan, sparse=e["k"].sp, maps=e["maps"])
                    outs[spe] = y.float()
                rec = {"part": "spe-check", "m": m, "shape": name, "splits": splits}
                rec["early_equal"] = bool(torch.equal(outs[1], outs[0]))  # same sums, same order
                rec["spread_early_equal"] = bool(torch.equal(outs[3], outs[2]))
                rec["rel_spread"] = float((outs[2] - outs[0]).norm() / outs[0].norm())
                rows.append(rec)
                if not (rec["early_equal"] and rec["spread_early_equal"]) or rec["rel_spread"] > 1e-2:
                    log(f"  CHECK FAILED (SW_SPE) {name} M={m}: {rec}")
            timed(kind, m, base, part="spe")
            timed(f"{kind}+sell", m, base, part="spe")
            for spe in SPE_VALUES:
                timed(f"{kind}-fused", m, config_with(base, spe=spe), part="spe")
    if args.sellpdl and not args.no_vllm:  # the SELL kernel as the served GEMV's programmatic dependent
        for m in [mm for mm in (1, 2, 4, 8) if mm in xs]:
            kind, base = _served(m)
            for name, (n_, k_) in SHAPES.items():
                e, x = layers[0][name], xs[m][name]
                plain = CG.gemv_plan(n_, k_, 128, False, bf, dev, config=base)
                trig = dataclasses.replace(plain, trig=True)
                a = K.sparse_correction(CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], plain), x, e["k"].sp)
                b = CG.marlin_gemv_cuda(x, e["qm"], e["sc"], e["zp"], trig)
                b = K.sparse_correction(b, x, e["k"].sp, pdl=True)
                torch.cuda.synchronize()
                same = bool(torch.equal(a, b))
                rows.append({"part": "sellpdl-check", "m": m, "shape": name, "bitwise_equal": same})
                if not same:
                    log(f"  CHECK FAILED (sellpdl) {name} M={m}: not bitwise equal")
            for suffix in ("", "-trig", "+sell", "+sell-pdl"):
                timed(kind + suffix, m, base, part="sellpdl")
            # the terms inside it, spread over its split-K blocks: what serves held-out layers up to the fold (4)
            timed(kind + "-fused", m, config_with(base, spe=2), part="sellpdl")
    if args.pf or args.mma_sweep or args.mma_configs:  # the tensor-core form's fastest at 8 tokens, also at 2 and 4
        at8 = [r for r in rows if r.get("kernel") == "mma" and r.get("m") == 8 and "us" in r and r.get("config")]
        if at8:
            best = tuple(min(at8, key=lambda r: r["us"])["config"])
            seen = {(r.get("m"), tuple(r.get("config") or ())) for r in rows if r.get("kernel") == "mma"}
            for m in (2, 4):
                if m in xs and (m, best) not in seen:  # (--ms without them: no inputs of that size)
                    timed("mma", m, best, part="pf-sweep")
    meta["recommend"] = recommend(rows)
    log(f"recommend: {meta['recommend']}")
    if args.recommend_env:
        with open(args.recommend_env, "a") as f:
            f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in meta["recommend"].items())
    meta["engine_env"] = engine_env(rows)
    if args.engine_env:
        log(f"engine configurations: {meta['engine_env']}")
        with open(args.engine_env, "w") as f:
            f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in meta["engine_env"].items())
    meta["held_env"] = held_env(rows)
    if args.held_env:
        log(f"held-out placement: {meta['held_env']}")
        with open(args.held_env, "w") as f:
            f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in meta["held_env"].items())
    save()
    write_table(out)
    log(f"done -> {out}")


def _norm(kind: str, cfg) -> tuple | None:
    """A configuration as one key: None = the kind's default, trailing off-flags (0) after ``lean`` dropped."""
    if kind.startswith("marlin"):
        return None
    c = list(cfg or (MMA_DEFAULT if kind.startswith("mma") else DEFAULT))
    while len(c) > 5 and c[-1] == 0:
        c.pop()
    return tuple(c)


def _choices(rows: list[dict], margin: float) -> tuple[tuple, tuple | None, int] | None:
    """(single-token configuration, the tensor-core form's fastest at 8 tokens or None, MAX_M) as :func:`recommend`
    describes them; None where nothing of ours was measured at one token."""
    t: dict[tuple, float] = {}
    for r in rows:
        if "us" in r and r.get("part") in ("main", "pf", "pf-sweep", "pdl", "mma-sweep", "sweep"):
            key = (r["kernel"], r["m"], _norm(r["kernel"], r.get("config")))
            t[key] = min(t.get(key, 1e30), r["us"])

    def us(kind: str, m: int, cfg) -> float | None:
        return t.get((kind, m, _norm(kind, cfg)))

    def better(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and a < b * (1 - margin)

    if not any(k[1] == 1 and k[0] != "marlin" for k in t):
        return None
    one = tuple(SERVE_ONE)
    shapes = [(v, c) for (kind, m, c), v in t.items() if kind == "cuda" and m == 1 and c]
    if shapes and better(min(shapes)[0], us("cuda", 1, one)):
        one = min(shapes)[1]
    if one[9:10] != (1,) and better(us("cuda-dep", 1, config_with(one, pdl=1)), us("cuda-dep", 1, one)):
        one = config_with(one, pdl=1)  # PDL: the pair measured
    mma_best, max_m = None, 1
    at8 = [(v, c) for (kind, m, c), v in t.items() if kind == "mma" and m == 8]
    if at8:
        mma_best = min(at8)[1]
        for m in (2, 4, 8):
            if not better(us("mma", m, mma_best), us("marlin", m, None)):
                break
            max_m = m
    return _norm("cuda", one) or (), mma_best, max_m


def recommend(rows: list[dict], margin: float = 0.01) -> dict[str, str]:
    """The knob the measurements argue for: ``SUPERWEIGHT_CUDA_GEMV=MAX_M@one=..[,mma=..]``. Single tokens: what the
    layers serve by default (``SERVE_ONE``: x through the ring, session 34) unless a measured CUDA-core configuration
    beat it by more than ``margin`` (an unmeasured default is kept), then PDL where it made a GEMM after its x's
    writer faster (never with x through the ring, which copies x before a PDL launch may read it). 2..8 tokens: the
    tensor-core form's fastest configuration at 8 tokens, served up to the largest M in (2, 4, 8) where it beat
    Marlin by the margin at every M up to it. {} where nothing of this was measured."""
    ch = _choices(rows, margin)
    if ch is None:
        return {}
    one, mma_best, max_m = ch
    value = f"{max_m}@one={':'.join(map(str, one))}"
    if max_m > 1 and mma_best is not None:
        value += ",mma=" + ":".join(map(str, mma_best))
    return {"SUPERWEIGHT_CUDA_GEMV": value}


def engine_env(rows: list[dict], margin: float = 0.01) -> dict[str, str]:
    """The launch configurations throughput.py's ``sw-w4-g128-humgemv-xr`` (and its held-out twin) serve with, as
    ``SW_XR_ONE`` / ``SW_XR_MMA`` (colon-separated): single tokens what :func:`recommend` chose, 2-8 tokens the
    tensor-core form's fastest configuration at 8 tokens whether or not it beat Marlin (that method's one copy is
    Humming's, whose own kernel is the alternative there). {} where nothing was measured."""
    ch = _choices(rows, margin)
    if ch is None:
        return {}
    one, mma_best, _ = ch
    env = {"SW_XR_ONE": ":".join(map(str, one))}
    if mma_best is not None:
        env["SW_XR_MMA"] = ":".join(map(str, mma_best))
    return env


SPE_VALUES = (0, 1, 2, 3)  # SW_SPE: bit 0 before the main loop, bit 1 spread over the tile's split-K blocks


TRIG_KINDS = ("mma-trig", "mma+sell-pdl", "cuda-trig", "cuda+sell-pdl")  # the GEMV built with SW_TRIG


def _served(m: int) -> tuple[str, tuple[int, ...]]:
    """The form the layers serve ``m`` tokens with: (the benchmark's kernel name, its configuration)."""
    return ("cuda", SERVE_ONE) if m == 1 else ("mma", SERVE_MMA)


def held_env(rows: list[dict], margin: float = 0.01) -> dict[str, str]:
    """What the ``--spe`` part argues for, as throughput.py's ``sw-w4-g128-holdout-qkv-humgemv-spe`` reads it:
    ``SW_HELD_ONE`` / ``SW_HELD_MMA`` (SERVE_ONE / SERVE_MMA with the SW_SPE placement fastest at 1 token / summed
    over 2, 4 and 8 tokens; 0 unless faster than 0 by ``margin``) and ``SW_HELD_FOLD`` (fold=N: the largest N in
    1, 2, 4, 8 such that at every measured token count up to N the terms inside beat the SELL kernel after the GEMV,
    by the margin; 0 where they lose at one token). {} where the part did not run."""
    t = {
        (r["kernel"], r["m"], tuple(r.get("config") or ())): r["us"]
        for r in rows
        if r.get("part") == "spe" and "us" in r
    }
    if not t:
        return {}
    env: dict[str, str] = {}
    fused: dict[int, float] = {}
    for form, kind, base, ms in (("ONE", "cuda", SERVE_ONE, (1,)), ("MMA", "mma", SERVE_MMA, (2, 4, 8))):
        ms = tuple(m for m in ms if any(k[0] == f"{kind}-fused" and k[1] == m for k in t))
        total = {}
        for spe in SPE_VALUES:
            us = [t.get((f"{kind}-fused", m, config_with(base, spe=spe))) for m in ms]
            if ms and None not in us:
                total[spe] = sum(us)  # type: ignore[arg-type]
        best = 0
        if total and 0 in total:
            cand = min(total, key=total.__getitem__)
            best = cand if total[cand] < total[0] * (1 - margin) else 0
        env[f"SW_HELD_{form}"] = ":".join(map(str, config_with(base, spe=best) if best else base))
        for m in ms:
            v = t.get((f"{kind}-fused", m, config_with(base, spe=best)))
            if v is not None:
                fused[m] = v
    fold = 0
    for m in (1, 2, 4, 8):
        kind, base = _served(m)
        sell = t.get((f"{kind}+sell", m, tuple(base)))
        if m not in fused or sell is None:
            continue
        if not fused[m] < sell * (1 - margin):
            break
        fold = m
    env["SW_HELD_FOLD"] = str(fold)
    return env


def write_table(path: str) -> None:
    d = json.load(open(path))
    rows = [r for r in d["results"] if r.get("part") == "main" and "us" in r]
    by = {(r["kernel"], r["m"]): r for r in rows}
    ms = sorted({r["m"] for r in rows})
    lines = [
        f"# CUDA GEMV over Marlin's layout vs Marlin ({d['meta']['device']}, us per Llama-2-7B layer, 4 GEMMs, "
        f"% of {d['meta']['peak_tbs']} TB/s)",
        "",
        "| M | Marlin | CUDA GEMV | tensor-core GEMV | ratio (best) | Marlin + SELL | CUDA GEMV + SELL "
        "| tensor-core + SELL | GEMV, SELL inside | tensor-core, SELL inside |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(kind, m):
        r = by.get((kind, m))
        return f"{r['us']:.1f} ({r['frac_peak']:.0%})" if r else "—"

    for m in ms:
        ours = [r["us"] for kind in ("cuda", "mma") if (r := by.get((kind, m)))]
        best = f"{min(ours) / by[('marlin', m)]['us']:.2f}" if ours and ("marlin", m) in by else "—"
        lines.append(
            f"| {m} | {cell('marlin', m)} | {cell('cuda', m)} | {cell('mma', m)} | {best} "
            f"| {cell('marlin+sell', m)} | {cell('cuda+sell', m)} | {cell('mma+sell', m)} | {cell('cuda-fused', m)} "
            f"| {cell('mma-fused', m)} |"
        )
    ce = [r for r in d["results"] if r.get("part") == "ceiling" and "us" in r]
    if ce:
        lines += [
            "",
            f"What bounds M = 1 (copy {d['meta'].get('copy_tbs')} TB/s, read-only sum "
            f"{d['meta'].get('read_tbs')} TB/s):",
            "",
        ]
        lines += [f"* {r['shape']} {r['kernel']}: {r['us']:.1f} us, {r['tbs']:.2f} TB/s" for r in ce]
    sw = [r for r in d["results"] if r.get("part") == "sweep" and "us" in r]
    if sw:
        lines += ["", "Sweep at M = 1 (rows a chunk, warps a block, warps per SM wanted, ring stages):", ""]
        held = {
            (r["kernel"], tuple(r["config"])): r["us"]
            for r in d["results"]
            if r.get("part") == "sweep-held" and "us" in r
        }
        for r in sorted(sw, key=lambda r: r["us"]):
            cfg = tuple(r["config"])
            extra = ""
            if ("cuda-fused", cfg) in held or ("cuda+sell", cfg) in held:  # 0.1 % held out: inside / after
                fused, after = held.get(("cuda-fused", cfg), float("nan")), held.get(("cuda+sell", cfg), float("nan"))
                extra = f"; held-out terms inside {fused:.1f} / after {after:.1f} us"
            lines.append(f"* {cfg}: {r['us']:.1f} us ({r['frac_peak']:.0%}){extra}")
    ms_ = [r for r in d["results"] if r.get("part") == "mma-sweep" and "us" in r]
    if ms_:
        lines += ["", "Tensor-core form's sweep (config: us at M = 1 / 8):", ""]
        cfgs = sorted({tuple(r["config"]) for r in ms_})
        at = {(tuple(r["config"]), r["m"]): r["us"] for r in ms_}
        for cfg in sorted(cfgs, key=lambda c: at.get((c, 8), 1e9)):
            lines.append(f"* {cfg}: {at.get((cfg, 1), float('nan')):.1f} / {at.get((cfg, 8), float('nan')):.1f} us")
    pd = [r for r in d["results"] if r.get("part") == "pdl" and "us" in r]
    if pd:
        chk = [r for r in d["results"] if r.get("part") == "pdl-check"]
        ok = sum(r["bitwise_equal"] for r in chk)
        lines += ["", f"Programmatic dependent launch (SW_PDL; bitwise equal to a plain launch: {ok}/{len(chk)}):", ""]
        lines += ["| kernel | config | us a layer |", "|---|---|---|"]
        lines += [f"| {r['kernel']} | {tuple(r.get('config') or ())} | {r['us']:.1f} |" for r in pd]
    pf = [r for r in d["results"] if r.get("part") in ("pf", "pf-sweep") and "us" in r]
    if pf:
        chk = [r for r in d["results"] if r.get("part") == "pf-check"]
        ok = sum(r["bitwise_equal"] for r in chk)
        lines += [
            "",
            f"Group constants prefetched through the ring (SW_PF; bitwise equal to without: {ok}/{len(chk)}):",
            "",
        ]
        lines += ["| kernel | config | M | us | % of peak |", "|---|---|---|---|---|"]
        for r in pf:
            lines.append(f"| {r['kernel']} | {tuple(r['config'])} | {r['m']} | {r['us']:.1f} | {r['frac_peak']:.0%} |")
    spe = [r for r in d["results"] if r.get("part") == "spe" and "us" in r]
    if spe:
        chk = [r for r in d["results"] if r.get("part") == "spe-check"]
        ok = sum(r["early_equal"] and r["spread_early_equal"] for r in chk)
        worst = max((r["rel_spread"] for r in chk), default=float("nan"))
        lines += [
            "",
            "Where the held-out terms are summed (SW_SPE, served configurations; us a layer; spread vs first block "
            f"rel <= {worst:.2g}, before = after bitwise {ok}/{len(chk)}):",
            "",
            "| M | plain | + SELL kernel | inside, after the loop, first block (0) | before (1) | after, spread (2) "
            "| before, spread (3) |",
            "|---|---|---|---|---|---|---|",
        ]

        def fused_us(m: int, v: int) -> float:
            for r in spe:
                cfg = r.get("config") or []
                if r["m"] == m and r["kernel"].endswith("-fused") and (cfg[10] if len(cfg) > 10 else 0) == v:
                    return r["us"]
            return float("nan")

        for m in sorted({r["m"] for r in spe}):
            plain = next((r["us"] for r in spe if r["m"] == m and r["kernel"] in ("cuda", "mma")), float("nan"))
            sell = next((r["us"] for r in spe if r["m"] == m and r["kernel"].endswith("+sell")), float("nan"))
            cells = [fused_us(m, v) for v in SPE_VALUES]
            lines.append(f"| {m} | {plain:.1f} | {sell:.1f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    sp_ = [r for r in d["results"] if r.get("part") == "sellpdl" and "us" in r]
    if sp_:
        chk = [r for r in d["results"] if r.get("part") == "sellpdl-check"]
        ok = sum(r["bitwise_equal"] for r in chk)
        lines += [
            "",
            "The SELL kernel as the tensor-core GEMV's programmatic dependent (served configuration, us a layer; "
            f"bitwise equal to the plain pair: {ok}/{len(chk)}):",
            "",
            "| M | GEMV | GEMV with SW_TRIG | GEMV + SELL | GEMV (SW_TRIG) + SELL (PDL) | terms inside (spread) |",
            "|---|---|---|---|---|---|",
        ]
        at = {(r["kernel"].replace("cuda", "mma", 1), r["m"]): r["us"] for r in sp_}  # one row a size, either form
        for m in sorted({r["m"] for r in sp_}):
            kinds = ("mma", "mma-trig", "mma+sell", "mma+sell-pdl", "mma-fused")
            lines.append(f"| {m} | " + " | ".join(f"{at.get((k, m), float('nan')):.1f}" for k in kinds) + " |")
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
