#!/usr/bin/env python3
"""What the held-out corrections of a whole model cost per decode step, by where the hold-out sits (issue 12).

    python benchmarks/correction_cost.py --out benchmarks/results/correction_cost_cpu.json \
        all=CKPT_A qkv=CKPT_B none=CKPT_C [--device cpu|cuda] [--ms 1,8]

For every checkpoint: the held-out entries (and super weights) of each decoder layer's Linears, merged the way vLLM
serves them (q/k/v -> qkv_proj, gate/up -> gate_up_proj, o_proj, down_proj), prepared by the plugin's own
``prepare_sparse`` and applied with its ``sparse_correction`` (CPU: the torch path vLLM's CPU build runs; CUDA: the
Triton kernel), on random activations, all layers back to back = the corrections of one decode step. The GEMMs
themselves are not run: this is the part a checkpoint's hold-out adds. Rounds are interleaved over the checkpoints
(median of ``--rounds``) because the machine's speed drifts. One thread on the CPU, as vLLM binds it on a 2-core
machine. Records: {name, ckpt, device, m, corrected_gemms, entries, ms_per_step}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vllm_superweight.checkpoint import weight_files  # noqa: E402
from vllm_superweight.format import SPARSE_INDEX, SPARSE_VALUE, W_SHAPE, layer_of  # noqa: E402
from vllm_superweight.kernels import prepare_sparse, sparse_correction  # noqa: E402

MERGED = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]


def _tensors(ckpt: str) -> dict[str, torch.Tensor]:
    out = {}
    for fn in weight_files(ckpt):
        with safe_open(fn, "pt") as f:
            for k in f.keys():
                if k.rpartition(".")[2] in (SPARSE_INDEX, SPARSE_VALUE, W_SHAPE):
                    out[k] = f.get_tensor(k)
    return out


def served_corrections(ckpt: str, device: str) -> list[tuple[dict, int, int, int]]:
    """(prepared entries, N, K, entries) of every served Linear that holds any, in layer order."""
    ts = _tensors(ckpt)
    mods = sorted({k.rpartition(".")[0] for k in ts if k.endswith("." + W_SHAPE)})
    layers = sorted({m.rsplit(".", 2)[0] for m in mods}, key=lambda p: layer_of(p + "."))
    out = []
    for lay in layers:
        for group in MERGED:
            parts = [m for p in group for m in mods if m.startswith(lay + ".") and m.endswith("." + p)]
            if not parts:
                continue
            rows, cols, vals, off, k = [], [], [], 0, 0
            for m in parts:
                n, k = (int(v) for v in ts[f"{m}.{W_SHAPE}"].tolist())
                if f"{m}.{SPARSE_INDEX}" in ts:
                    idx = ts[f"{m}.{SPARSE_INDEX}"].long()
                    rows.append(idx[0] + off)
                    cols.append(idx[1])
                    vals.append(ts[f"{m}.{SPARSE_VALUE}"].float())
                off += n
            if rows:
                r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
                out.append((prepare_sparse(r, c, v, off, k, device), off, k, int(r.numel())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="NAME=CHECKPOINT_DIR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ms", default="1,8", help="tokens per step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = args.device
    named = [item.partition("=")[::2] for item in args.ckpts]
    corr = {name: served_corrections(path, dev) for name, path in named}
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    recs = []
    for m in (int(v) for v in args.ms.split(",")):
        times: dict[str, list[float]] = {name: [] for name, _ in named}
        for _ in range(args.rounds):
            for name, _ in named:
                work = [
                    (torch.randn(m, k, dtype=torch.bfloat16, device=dev), torch.randn(m, n, dtype=torch.bfloat16,
                     device=dev), sp)
                    for sp, n, k, _ in corr[name]
                ]  # fmt: skip
                for x, y, sp in work:  # warm-up (and Triton compilation on CUDA)
                    sparse_correction(y, x, sp)
                sync()
                t = time.perf_counter()
                for _ in range(args.iters):
                    for x, y, sp in work:
                        sparse_correction(y, x, sp)
                sync()
                times[name].append((time.perf_counter() - t) / args.iters * 1e3)
        for name, path in named:
            rec = {
                "name": name,
                "ckpt": path,
                "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu (1 thread)",
                "m": m,
                "corrected_gemms": len(corr[name]),
                "entries": sum(e for *_, e in corr[name]),
                "ms_per_step": round(statistics.median(times[name]), 4),
                "date": time.strftime("%Y-%m-%d"),
            }
            print(json.dumps(rec), flush=True)
            recs.append(rec)
    with open(args.out, "w") as f:
        json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
