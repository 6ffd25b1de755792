#!/usr/bin/env python3
"""How much of Gemma's ``(1 + w)`` RMSNorm scale survives bf16 storage in a checkpoint (e.g. after AWQ folded its
smoothing scales into the norms): per norm, the largest and mean relative error of ``1 + bf16(w)`` against
``1 + w``, and whether the weights differ from the float reference's.

    python benchmarks/diag/gemma_norm_precision.py CKPT_DIR [FLOAT_DIR] [--top 8]
"""

from __future__ import annotations

import argparse
import glob
import os

import torch
from safetensors.torch import load_file


def tensors(d: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("float_dir", nargs="?")
    p.add_argument("--top", type=int, default=8)
    a = p.parse_args()
    ck = tensors(a.ckpt)
    ref = tensors(a.float_dir) if a.float_dir else {}
    rows = []
    for k, v in ck.items():
        if "norm" not in k or v.dim() != 1:
            continue
        one = 1 + v.double()
        err = (1 + v.to(torch.bfloat16).double() - one).abs() / one.abs().clamp_min(1e-12)
        changed = k in ref and not torch.allclose(ref[k].double(), v.double())
        rows.append((float(err.max()), float(err.mean()), float(one.abs().min()), changed, k))
    rows.sort(reverse=True)
    for mx, mean, mn, changed, k in rows[: a.top]:
        print(f"{k}: max rel. error of 1+w in bf16 {mx:.3g}, mean {mean:.3g}, min |1+w| {mn:.3g}, changed={changed}")
    print(f"{len(rows)} norms, {sum(r[3] for r in rows)} differ from the float reference")


if __name__ == "__main__":
    main()
