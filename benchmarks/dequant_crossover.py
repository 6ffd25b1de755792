#!/usr/bin/env python3
"""Micro-benchmark: from how many tokens a held-out layer on the one Humming copy should leave Humming + the SELL
correction for dequantize-with-restore + cuBLAS (``HummingGemvKernel.DEQUANT_MIN_M``, ``SUPERWEIGHT_DEQUANT_MIN_M``);
``--kernel marlin-deq1``: the same question for the one-copy Marlin pair (what serves held-out checkpoints without
``humming-kernels``, off Hopper, or under tensor parallel), whose switch is still s6's 96 tokens.

Why (session 39): the default, 96 tokens, was measured in session 6 for Marlin + the correction of that time against
the dequantize path; since session 36 the held-out default is the one Humming copy (faster than Marlin from 16
tokens) with the unrolled SELL kernel (s12), and the hold-out still costs -6.0 % / -8.5 % saturated (H100, s39) where
decode batches of ~100-256 tokens dequantize the q/k/v weight every step (s17 put that at 8 % of in 128 / out 128).
This times ``HummingGemvKernel.run`` itself on the default preset's placement (a 7B ``qkv_proj``, 12288 x 4096 g128
asymmetric, with the layer's 0.1 % hold-out all in it: 0.40 %), forced down each path by its ``min_m``, beside
Humming alone (no correction), after checking both paths against a float64 reference of the restored weights.

    python benchmarks/dequant_crossover.py --out $OUT/dequant_crossover.json [--ms 64,96,128,...] [--layers 4]
        [--kernel humming-gemv|marlin-deq1]

Session 40 (H100, Humming): Humming + SELL wins up to 256 tokens, dequantize from 384 (now Humming's default).

Timing: median of CUDA-graph replays over ``--layers`` copies (4 x 25 MB of codes: beyond the L2), per layer.
Writes the JSON after every batch size and a markdown table beside it; ``--recommend-env FILE`` appends
``SUPERWEIGHT_DEQUANT_MIN_M=M`` where the dequantize path wins from M on at every larger size measured and M differs
from the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from sparse_bench import LLAMA7B_LAYER_WEIGHTS  # noqa: E402  (the default preset's budget: 0.1 % of a 7B layer)

PATHS = ("gemm", "gemm+sell", "deq+cublas")  # the copy's GEMM alone, with the SELL correction, dequantize + cuBLAS
ALIASES = {"humming": "gemm", "humming+sell": "gemm+sell"}  # the names of s40's records (Humming only then)
GEMM_NAMES = {"humming-gemv": "Humming", "marlin-deq1": "Marlin"}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def by_m(rows: list[dict]) -> dict[int, dict[str, float]]:
    """The timed rows as {M: {path: us}} (check rows carry no time; s40's path names read as today's)."""
    us: dict[int, dict[str, float]] = {}
    for r in rows:
        if "us" in r:
            us.setdefault(r["m"], {})[ALIASES.get(r["path"], r["path"])] = r["us"]
    return us


def crossover(us: dict[int, dict[str, float]]) -> int | None:
    """The smallest measured M from which ``deq+cublas`` is faster than ``gemm+sell`` at that M and at every larger
    M measured; None where it never is (or the last size measured is not a win)."""
    pick = None
    for m in sorted(us, reverse=True):
        row = us[m]
        if "deq+cublas" not in row or "gemm+sell" not in row:
            continue
        if row["deq+cublas"] < row["gemm+sell"]:
            pick = m
        else:
            break
    return pick


def table(rows: list[dict], meta: dict) -> str:
    """Markdown: one row per M, us per layer by path, the held-out path's cost over the GEMM alone, the faster one."""
    us = by_m(rows)
    g = meta.get("gemm", "Humming")
    head = f"# Held-out layer on one {g} copy: {g} + SELL vs dequantize + cuBLAS"
    head += f" ({meta.get('device', '?')})\n\n"
    head += (
        f"{meta.get('shape')} g128 asym, {meta.get('nnz')} held-out terms ({100 * meta.get('density', 0):.2f} %); us a "
        f"layer, median of CUDA-graph replays over {meta.get('layers')} copies; default switch: "
        f"{meta.get('default_min_m')} tokens.\n\n"
    )
    out = [head, f"| M | {g} alone | {g} + SELL | dequantize + cuBLAS | faster with the hold-out |"]
    out.append("|---|---|---|---|---|")
    for m in sorted(us):
        row = us[m]
        h, hs, dq = (row.get(p) for p in PATHS)
        cells = [f"{v:.1f}" if v is not None else "–" for v in (h, hs, dq)]
        if h is not None and hs is not None:
            cells[1] += f" (+{100 * (hs / h - 1):.0f} %)"
        if h is not None and dq is not None:
            cells[2] += f" (+{100 * (dq / h - 1):.0f} %)"
        best = "–" if hs is None or dq is None else ("dequantize" if dq < hs else f"{g} + SELL")
        out.append(f"| {m} | " + " | ".join(cells) + f" | {best} |")
    pick = crossover(us)
    out.append("")
    out.append(f"Dequantize from: {pick if pick is not None else 'never (in the sizes measured)'} tokens.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--ms",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=[96, 128, 256, 192, 384, 512, 64, 1024, 2048],
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--holdout", type=float, default=1e-3, help="fraction of a 7B layer's weights, all in qkv")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--recommend-env", help="append SUPERWEIGHT_DEQUANT_MIN_M=M if the crossover moved")
    ap.add_argument("--kernel", choices=sorted(GEMM_NAMES), default="humming-gemv", help="which one-copy kernel")
    args = ap.parse_args(argv)

    import torch
    import vllm_linear as VL
    from w4_fused_bench import time_graph

    if not torch.cuda.is_available():
        raise SystemExit("dequant_crossover: needs a CUDA GPU (vLLM's Marlin, Humming for the default kernel)")
    dev = torch.device("cuda")
    n, k = 12288, 4096
    nnz = round(args.holdout * LLAMA7B_LAYER_WEIGHTS)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(),
        "shape": [n, k],
        "nnz": nnz,
        "density": nnz / (n * k),
        "layers": args.layers,
        "gemm": GEMM_NAMES[args.kernel],
        "torch": torch.__version__,
    }
    rows: list[dict] = []

    def save() -> None:
        out = os.path.abspath(args.out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        meta["elapsed_s"] = round(time.time() - T0, 1)
        with open(out + ".tmp", "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
        os.replace(out + ".tmp", out)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(table(rows, meta))

    layers = []
    for li in range(args.layers):
        r, c, v = VL.random_holdout(n, k, nnz, seed=li)
        w = VL.random_w4(n, k, 128, False, dev, seed=li, holdout=(r, c))
        layer, kobj = VL.build_mp_layer(w, args.kernel, sparse=(r, c, v))
        if not kobj.sp:
            raise SystemExit(f"dequant_crossover: the held-out terms did not take the packed path ({kobj.describe()})")
        layers.append((layer, kobj, w, r, c, v))
    meta["kernel"] = layers[0][1].describe()
    served_min_m = layers[0][1].min_m  # the switch this kernel serves with (its own default or the knob)
    meta["default_min_m"] = served_min_m
    log(f"built {len(layers)} layers ({meta['kernel']}), {nnz} held-out terms each")

    def run(path: str, x: torch.Tensor) -> None:
        for layer, kobj, *_ in layers:
            if path == "gemm" and args.kernel == "humming-gemv":
                kobj.large.apply_gemm(layer, x, None)
            elif path == "gemm":
                kobj._small_gemm(x, None)  # Marlin (our GEMV only up to its few tokens, never at these sizes)
            else:
                kobj.min_m = 1 << 30 if path == "gemm+sell" else 2
                kobj.run(x, None)

    # correctness first: both held-out paths against float64 (dequantized codes, held-out positions restored)
    layer, kobj, w, r, c, v = layers[0]
    ref_w = VL.dequant_w4(w).double()
    ref_w[r.to(dev), c.to(dev)] = v.double().to(dev)
    for m in (64, 256):
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        ref = x.double() @ ref_w.T
        for path in PATHS[1:]:
            kobj.min_m = 1 << 30 if path == "gemm+sell" else 2
            y = kobj.run(x, None).double()
            rel = float((y - ref).norm() / ref.norm())
            rows.append({"m": m, "path": path, "check_rel": rel})
            if not rel < 2e-2:
                save()
                raise SystemExit(f"dequant_crossover: {path} at M={m} is off the float64 reference by {rel:.3g}")
    log("check: both paths within 2e-2 of the float64 reference at M = 64 and 256")
    save()

    for m in args.ms:
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: M = {m} and on not measured")
            break
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        got = {}
        for path in PATHS:
            us = time_graph(lambda p=path: run(p, x), args.iters) / len(layers)
            rows.append({"m": m, "path": path, "us": us})
            got[path] = us
        log(f"M={m:5d}  " + "  ".join(f"{p} {got[p]:7.1f} us" for p in PATHS))
        save()
    for _, kobj, *_ in layers:
        kobj.min_m = served_min_m
    pick = crossover(by_m(rows))
    meta["crossover_m"] = pick
    save()
    log(f"dequantize wins from M = {pick}" if pick is not None else "dequantize never wins in the sizes measured")
    if args.recommend_env and pick is not None and pick != served_min_m:
        with open(args.recommend_env, "a") as f:
            f.write(f"SUPERWEIGHT_DEQUANT_MIN_M={pick}\n")
        log(f"recommend: SUPERWEIGHT_DEQUANT_MIN_M={pick} -> {args.recommend_env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
