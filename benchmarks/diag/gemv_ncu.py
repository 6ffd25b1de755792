"""Diagnostic (session 35, GPU): the CUDA GEMV's launches for Nsight Compute -- what stalls the tensor-core form at 8
tokens where 2-4 tokens got faster with fewer instructions (H100, s35: 60.2 / 63.8 / 72.2 us a 7B layer at 2 / 4 / 8
tokens, the loop's instructions 467 / 469 / 477), and what the held-out terms cost inside it by placement (SW_SPE).

The driver builds one 7B layer (random words as Marlin's tensors: the kernel's speed does not depend on the values;
0.1 % held-out entries in packed SELL slots), warms every case up, then launches each case once, in the order it
prints (``launch i: shape M config held``) -- the order of the kernels in the report. Run under ncu by
``gpu_run.sh ncu`` (N: the number of cases, their warm-up launches):

    ncu --clock-control none -k regex:sw_marlin_gemv --launch-skip N ... python benchmarks/diag/gemv_ncu.py --once

Without ncu it times each case with CUDA events (median of ``--iters`` replays of a CUDA graph), so a run is useful
either way. ``--plan`` prints the launch order and exits (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

from cuda_gemv_bench import SHAPES  # noqa: E402  (the 7B layer's GEMMs)
from w4_fused_bench import time_graph  # noqa: E402  (median us of CUDA-graph replays)

from vllm_superweight.kernels import cuda_marlin_gemv as CG  # noqa: E402


def cases(spec: str) -> list[tuple[str, int, tuple[int, ...], bool]]:
    """``spec``: ';'-separated ``SHAPE:M:FORM[:SPE][:held]`` (FORM one | mma: SERVE_ONE / SERVE_MMA), or ``default``:
    gate_up and down at 4 and 8 tokens plain, then 8 tokens with the held-out terms in each placement."""
    if spec == "default":
        spec = ";".join(
            [f"{s}:{m}:mma" for s in ("gate_up", "down") for m in (4, 8)]
            + [f"down:8:mma:{spe}:held" for spe in (0, 1, 2, 3)]
            + ["down:1:one", "down:1:one:0:held", "down:1:one:3:held"]
        )
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        f = part.split(":")
        if len(f) < 3 or f[0] not in SHAPES or f[2] not in ("one", "mma"):
            raise SystemExit(f"gemv_ncu: bad case {part!r} (SHAPE:M:one|mma[:SPE][:held])")
        base = CG.SERVE_ONE if f[2] == "one" else CG.SERVE_MMA
        spe = int(f[3]) if len(f) > 3 and f[3].isdigit() else 0
        cfg = CG.config_with(base, spe=spe) if spe else tuple(base)
        out.append((f[0], int(f[1]), cfg, "held" in f[3:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="default")
    ap.add_argument("--holdout", type=float, default=1e-3)
    ap.add_argument("--iters", type=int, default=50, help="timing replays a case (without ncu)")
    ap.add_argument("--plan", action="store_true", help="print the launch order and exit")
    ap.add_argument(
        "--once",
        action="store_true",
        help="under ncu: after one warm-up launch a case (skip that many), one launch a case, no timing",
    )
    ap.add_argument("--json", default="", help="write the cases and their times here")
    args = ap.parse_args()
    todo = cases(args.cases)
    for i, (shape, m, cfg, held) in enumerate(todo):
        print(f"launch {i}: {shape} M={m} config={':'.join(map(str, cfg))} held={int(held)}", flush=True)
    if args.plan:
        return
    from vllm_superweight.kernels import prepare_sparse

    dev, bf = torch.device("cuda"), torch.bfloat16
    i32 = torch.iinfo(torch.int32)
    g = torch.Generator(device=dev).manual_seed(0)
    lay = {}
    for name in {c[0] for c in todo}:
        n, k = SHAPES[name]
        qm = torch.randint(i32.min, i32.max, (k // 16, 2 * n), generator=g, dtype=torch.int32, device=dev)
        sc = (torch.rand(k // 128, n, generator=g, device=dev) * 0.01 + 0.002).to(bf)
        zp = torch.randint(i32.min, i32.max, (k // 128, n // 8), generator=g, dtype=torch.int32, device=dev)
        gc = torch.Generator().manual_seed(n + k)
        flat = torch.randperm(n * k, generator=gc)[: max(1, round(n * k * args.holdout))]
        vals = (torch.randn(flat.numel(), generator=gc) * 0.05).to(bf).float()
        sp = prepare_sparse(flat // k, flat % k, vals, n, k, "cuda", layout="sell", pack=bf)
        lay[name] = (qm, sc, zp, sp, CG.sparse_maps(sp, n))
    runs = []
    for shape, m, cfg, held in todo:
        n, k = SHAPES[shape]
        qm, sc, zp, sp, maps = lay[shape]
        plan = CG.gemv_plan(n, k, 128, False, bf, dev, config=cfg)
        x = torch.randn(m, k, device=dev).to(bf)
        y = torch.empty(m, n, device=dev, dtype=bf)
        kw = {"sparse": sp, "maps": maps} if held else {}

        def f(x=x, plan=plan, y=y, kw=kw, qm=qm, sc=sc, zp=zp):
            CG.marlin_gemv_cuda(x, qm, sc, zp, plan, out=y, **kw)

        runs.append((f, plan))
    for f, _ in runs:  # compile + warm up every case before the profiled launches
        f()
    torch.cuda.synchronize()
    profiled = args.once
    results = []
    for i, ((f, plan), (shape, m, cfg, held)) in enumerate(zip(runs, todo)):
        rec = {"launch": i, "shape": shape, "m": m, "config": list(cfg), "held": held, "splits": plan.splits}
        if profiled:
            f()  # one launch each: ncu profiles it
        else:
            rec["us"] = round(time_graph(f, args.iters), 2)
            print(f"launch {i}: {shape} M={m} held={int(held)} spe={plan.spe} splits={plan.splits} {rec['us']} us")
        results.append(rec)
    torch.cuda.synchronize()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "profiled": profiled, "cases": results}, fh, indent=1)


if __name__ == "__main__":
    main()
