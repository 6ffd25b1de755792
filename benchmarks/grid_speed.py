"""Quantization speed of the grid solvers on Llama-2-7B-shaped matrices (issue #11).

Times what the converter does per Linear -- ``select_holdout`` + ``quantize_weight`` + ``to_tensors`` -- on
random heavy-tailed bf16 weights of Llama-2-7B's shapes (per layer: q, k, v, o 4096x4096; gate, up 11008x4096;
down 4096x11008), for min/max and for the HQQ-style fit at several iteration counts, and extrapolates to the 32
layers (6.48 G quantized parameters). Prints and writes JSON.

    python benchmarks/grid_speed.py --device cpu --layers 0.25 --threads 2
    python benchmarks/grid_speed.py --device cuda --layers 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vllm_superweight.quantize import quantize_weight, select_holdout, to_tensors  # noqa: E402

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
LAYERS = 32
PARAMS_7B = LAYERS * sum(n * k for n, k in SHAPES)


def heavy(n, k, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    w /= (torch.rand(n, k, generator=g, device=device) + 0.15).sqrt()
    return w.to(torch.bfloat16)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _pack_fallback(v: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pure-torch stand-in for compressed-tensors' pack_to_int32 (same work: 32 // bits codes per int32)."""
    per = 32 // bits
    u = (v.to(torch.int32) + 2 ** (bits - 1)).movedim(dim, -1)
    pad = (-u.shape[-1]) % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, per)
    shifts = torch.arange(per, device=u.device, dtype=torch.int32) * bits
    return (u << shifts).sum(-1, dtype=torch.int32).movedim(-1, dim).contiguous()


try:
    import compressed_tensors  # noqa: F401

    PACKER = "compressed-tensors"
except ImportError:  # the GPU machine's image lacks it: same work in plain torch
    import vllm_superweight.quantize as _q

    _q._pack = _pack_fallback
    PACKER = "torch fallback"


def time_setting(mats, block, grid, gp, holdout, device, weighted=False):
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for w in mats:
        mask = select_holdout(w, holdout)
        cw = None
        if weighted and grid != "minmax":
            cw = torch.rand(w.shape[1], device=w.device) ** 4 + 0.1  # stands in for fit_weight_from_rms(...)
        ql = quantize_weight(
            w, 4, block, False, holdout_mask=mask, scale_dtype=torch.bfloat16, grid=grid, grid_params=gp, col_weight=cw
        )
        ts = to_tensors(ql, torch.bfloat16)
        for t in ts.values():
            t.cpu()  # what the converter writes
        n += w.numel()
    sync(device)
    return n, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=float, default=1.0, help="layers timed (fractional: that many matrices)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--blocks", default="128,channel")
    ap.add_argument("--iters", default="0,2,4,8,20")
    ap.add_argument("--holdout", type=float, default=1e-3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--weighted", default="0,1", help="0: data-free fit, 1: prompt-weighted fit (col_weight)")
    ap.add_argument(
        "--budget",
        action="store_true",
        help="also time the hold-out budget's first pass (grid.budget_curve, min/max, rel_out, 7 points per matrix)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    nmat = max(1, int(round(args.layers * len(SHAPES))))
    shapes = [SHAPES[i % len(SHAPES)] for i in range(nmat)]
    # for a fraction of a layer, keep the layer's mix of shapes (largest first)
    mats = [heavy(n, k, i, dev) for i, (n, k) in enumerate(shapes)]
    layer_params = sum(n * k for n, k in SHAPES)
    out = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "packer": PACKER,
        "params_7b": PARAMS_7B,
        "timed_params": sum(w.numel() for w in mats),
        "results": [],
    }
    # warm-up (CUDA context, allocator)
    time_setting(mats[:1], "128", "hqq", {"iters": 1}, args.holdout, dev)
    for block in args.blocks.split(","):
        for it in [int(x) for x in args.iters.split(",")]:
            for wtd in [int(x) for x in args.weighted.split(",")]:
                if it == 0 and wtd:
                    continue
                grid, gp = ("minmax", None) if it == 0 else ("hqq", {"iters": it})
                n, dt = time_setting(mats, block, grid, gp, args.holdout, dev, bool(wtd))
                rate = n / dt
                rec = {
                    "block": block,
                    "grid": grid,
                    "iters": it,
                    "weighted": bool(wtd),
                    "params_per_s": rate,
                    "llama2_7b_minutes": PARAMS_7B / rate / 60,
                }
                out["results"].append(rec)
                print(
                    f"{dev} block {block:8s} {grid:6s} iters {it:3d} weighted {wtd}: {rate / 1e6:8.2f} M params/s"
                    f" -> Llama-2-7B quantization {PARAMS_7B / rate / 60:7.2f} min",
                    flush=True,
                )
    if args.budget:
        from vllm_superweight.grid import budget_curve

        for block in args.blocks.split(","):
            sync(dev)
            t0 = time.perf_counter()
            for w in mats:
                act = torch.rand(w.shape[1], device=w.device) + 0.1
                budget_curve(w, args.holdout, 4, block, metric="rel_out", act=act)
            sync(dev)
            dt = time.perf_counter() - t0
            rate = sum(w.numel() for w in mats) / dt
            rec = {
                "block": block,
                "budget_pass": True,
                "params_per_s": rate,
                "llama2_7b_minutes": PARAMS_7B / rate / 60,
            }
            out["results"].append(rec)
            print(
                f"{dev} block {block:8s} budget first pass (7 min/max points): {rate / 1e6:8.2f} M params/s -> "
                f"Llama-2-7B {PARAMS_7B / rate / 60:7.2f} min",
                flush=True,
            )
    del layer_params
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
