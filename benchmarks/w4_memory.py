#!/usr/bin/env python3
"""Exact weight memory of each W4 serving path for a Llama-2-7B-shaped model, from the real load-time builders.

    python benchmarks/w4_memory.py [--holdout 1e-3] [--group 128] [--out benchmarks/results/w4_memory.json]

Counts every tensor a quantized Linear keeps after loading, per path, with the load-time code the plugin runs
(``triton_w4.prepare_w4``, ``kernels.prepare_sparse(layout="sell")``, ``triton_marlin_deq.marlin_deq_layout``) on
vLLM's merged shapes (qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008; 32 layers) with a random
``--holdout`` fraction of each matrix held out (bf16-exact values, as converted checkpoints store them). No GPU
needed: the tensors' sizes do not depend on the device. Marlin's repacked tensors have exactly the sizes of the
compressed-tensors checkpoint tensors (codes K*N/2 bytes, bf16 scales, int4 zero points packed into int32), which
is also what an AWQ checkpoint of the same shape stores: that is the "AWQ" row. vLLM's own log is the measurement
of record (``throughput.py``'s ``weights_gib``); this script says where each byte goes. Machete's prepacked copy
(the ``dual`` pair) is not modelled (its size is measured: 7.25 GiB with Marlin's copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vllm_superweight.kernels import prepare_sparse  # noqa: E402
from vllm_superweight.kernels import triton_marlin_deq as MD  # noqa: E402
from vllm_superweight.kernels import triton_w4 as T  # noqa: E402

HIDDEN, INTER, LAYERS, VOCAB = 4096, 11008, 32, 32000
MERGED = {"qkv_proj": (3 * HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN), "gate_up_proj": (2 * INTER, HIDDEN)}
MERGED["down_proj"] = (HIDDEN, INTER)
GIB = 1 << 30


def nbytes(ts) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


def layer_bytes(n: int, k: int, group: int, holdout: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ng = k // group
    marlin = n * k // 2 + ng * n * 2 + ng * n // 2  # codes + bf16 scales + packed int4 zero points
    nnz = int(round(holdout * n * k))
    flat = torch.randperm(n * k, generator=g)[:nnz]
    rows, cols = flat // k, flat % k
    vals = (torch.randn(nnz, generator=g) * 0.05).to(torch.bfloat16).float()
    sell = nbytes(prepare_sparse(rows, cols, vals, n, k, "cpu", layout="sell").values()) if nnz else 0
    deq1 = MD.memory_bytes(MD.marlin_deq_layout(rows, cols, vals, n, k, group, False, torch.bfloat16, "cpu"))
    packed = (
        nbytes(prepare_sparse(rows, cols, vals, n, k, "cpu", layout="sell", pack=torch.bfloat16).values()) if nnz else 0
    )
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int64)
    codes[rows, cols] = 8
    scales = torch.full((n, ng), 0.01, dtype=torch.bfloat16)
    zeros = torch.full((n, ng), 8, dtype=torch.int64)
    prep = T.prepare_w4(codes, scales, zeros, group, False, rows, cols, vals, n, k, "cpu")
    ours = T.memory_bytes(prep)["total"]
    return {
        "n": n,
        "k": k,
        "nnz": nnz,
        "awq": marlin,
        "marlin-deq1": marlin + deq1 + packed,  # restore index (large M) + packed SELL slots (small M)
        "marlin-deq": marlin + sell + ours,
        "fused": ours,
        "parts": {
            "marlin": marlin,
            "sell_index": sell,
            "packed_sell": packed,
            "restore_index": deq1,
            "triton_w4_layout": ours,
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--holdout", type=float, nargs="+", default=[0.0, 1e-3])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results", "w4_memory.json"))
    args = p.parse_args(argv)
    unquant = 2 * VOCAB * HIDDEN * 2 + (2 * LAYERS + 1) * HIDDEN * 2  # embeddings + lm_head + norms, bf16
    recs = []
    for h in args.holdout:
        t0 = time.time()
        per = {name: layer_bytes(n, k, args.group, h, seed=i) for i, (name, (n, k)) in enumerate(MERGED.items())}
        paths = ("awq", "marlin-deq1", "marlin-deq", "fused")
        lin = {pth: LAYERS * sum(v[pth] for v in per.values()) for pth in paths}
        rec = {
            "shape": "llama2-7b",
            "group": args.group,
            "holdout": h,
            "linears_gib": {pth: round(b / GIB, 4) for pth, b in lin.items()},
            "model_gib": {pth: round((b + unquant) / GIB, 4) for pth, b in lin.items()},
            "vs_awq_linears": {pth: round(b / lin["awq"], 4) for pth, b in lin.items()},
            "per_layer": per,
            "seconds": round(time.time() - t0, 1),
        }
        recs.append(rec)
        print(f"hold-out {h:g}: " + ", ".join(f"{pth} {rec['model_gib'][pth]:.3f} GiB "
                                              f"({rec['vs_awq_linears'][pth]:.4f}x)" for pth in paths))  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(recs, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table(recs))
    print(f"wrote {args.out} and {md}")
    return 0


LABELS = {
    "awq": "AWQ (W4 codes + bf16 scales + packed zero points)",
    "marlin-deq": "Marlin + dequantize pair, two copies (`marlin-deq`)",
    "marlin-deq1": "**Marlin + dequantize pair, one copy (`marlin-deq1`, default for held-out checkpoints)**",
    "fused": "our Triton layout (`fused`)",
}


def table(recs: list[dict]) -> str:
    """The README's table: quantized-Linear GiB per path and hold-out, and the ratio to AWQ at the largest one."""
    hs = [r["holdout"] for r in recs]
    last = recs[-1]
    head = "| path | " + " | ".join(f"hold-out {h:g}" for h in hs) + f" | vs AWQ ({last['holdout']:g}) |"
    lines = [head, "|---|" + "---:|" * (len(hs) + 1)]
    for pth, label in LABELS.items():
        cells = [f"{r['linears_gib'][pth]:.3f} GiB" for r in recs]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {last['vs_awq_linears'][pth]:.4f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
