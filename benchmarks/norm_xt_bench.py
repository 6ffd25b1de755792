#!/usr/bin/env python3
"""Micro-benchmark: can the compiled input RMSNorm write the transposed x that the SELL correction reads?

Why: at 64+ tokens the held-out q/k/v correction reads x transposed (``xt`` [K, M]), written by a separate
gather-transpose kernel (``triton_sparse._gather_transpose_kernel``): ~3.1 us a 7B layer at 64 tokens on the H200
(s45's engine profile), ~1.1 % of a batch-64 decode step -- about the hold-out's miss of issue 12's 5 % there.
x itself is the output of the layer's input RMSNorm, which vLLM's compiled graph runs as an Inductor kernel just
before. If Inductor writes ``y.t().contiguous()`` from the norm's own kernel (a second, transposed store) for less
than the separate kernel costs, the plugin can request it inside the compiled region and hand it to the op.

Timed per token count (CUDA-graph replays, ``triton.testing.do_bench_cudagraph``), K = 4096, bf16:

* ``norm``: the compiled fused add + RMSNorm alone (the engine's kernel today);
* ``norm+gather``: that plus today's gather-transpose kernel over all K columns (the default hold-out's distinct
  columns are nearly all of K);
* ``norm_xt``: one compiled function returning the norm's output and its transposed copy.

``norm+gather - norm`` is what the engine pays now, ``norm_xt - norm`` what the graph-written form would. Each compiled
variant's Inductor code is written beside the JSON (``--code-dir``), with its Triton kernel count, so "fused" is
read off the generated code, not inferred from a time. Correctness: the transposed output equals ``y.t()`` bitwise.

    python benchmarks/norm_xt_bench.py --out $OUT/norm_xt.json --code-dir $OUT/norm_xt_code [--ms 16,32,64,...]

Outcome (H100, session 46, ``results/norm_xt_s46_h100.md``): two Inductor kernels -- the transposed copy is a kernel
of its own, +1.9-2.3 us at 16-192 tokens against the gather-transpose's 2.1-3.0 at 16-64 and 3.4-6.1 at 96-256; as a
graph node it would also run at 1-8 tokens, which never read xt. Not pursued (benchmarks/KERNEL_NOTES.md, s46).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """The residual add + RMSNorm in float32, as vLLM's native path computes it: returns (normed, new residual)."""
    h = x.float() + residual.float()
    new_residual = h.to(x.dtype)
    var = h.pow(2).mean(dim=-1, keepdim=True)
    out = (h * torch.rsqrt(var + eps)).to(x.dtype) * weight
    return out, new_residual


def norm_and_transposed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    out, new_residual = fused_add_rmsnorm(x, residual, weight)
    return out, new_residual, out.t().contiguous()


def kernel_count(code: str) -> int:
    """Triton kernels defined in an Inductor output module."""
    return len(re.findall(r"@triton\.jit", code))


def compile_variant(fn, example, code_dir: str | None, name: str):
    """torch.compile with the token dimension dynamic (as vLLM compiles its graph), and its generated code."""
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    _, codes = run_and_get_code(compiled, *example)
    code = "\n\n# ---- next module ----\n\n".join(codes)
    if code_dir:
        os.makedirs(code_dir, exist_ok=True)
        with open(os.path.join(code_dir, f"{name}.py"), "w") as f:
            f.write(code)
    return compiled, kernel_count(code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="16,32,64,96,128,192,256,384")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rep", type=int, default=200, help="ms of replays per timing")
    ap.add_argument("--out", required=True)
    ap.add_argument("--code-dir", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("norm_xt_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from vllm_superweight.kernels.triton_sparse import _gather_transpose_kernel

    dev = torch.device("cuda")
    k = args.k
    ms = [int(v) for v in args.ms.split(",") if v]
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (1 + 0.1 * torch.randn(k, device=dev, generator=g)).to(torch.bfloat16)
    ucols = torch.arange(k, device=dev, dtype=torch.int32)
    ex = tuple(torch.randn(ms[0], k, device=dev, dtype=torch.bfloat16) for _ in range(2)) + (weight,)
    norm_c, norm_kernels = compile_variant(fused_add_rmsnorm, ex, args.code_dir, "norm")
    xt_c, xt_kernels = compile_variant(norm_and_transposed, ex, args.code_dir, "norm_xt")
    log(f"Inductor kernels: norm {norm_kernels}, norm_xt {xt_kernels}")
    rec: dict = {
        "gpu": torch.cuda.get_device_name(),
        "k": k,
        "kernels": {"norm": norm_kernels, "norm_xt": xt_kernels},
        "rows": [],
    }
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        res = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        xt = torch.empty(k, m, device=dev, dtype=torch.bfloat16)
        out, _, out_t = xt_c(x, res, weight)
        ref, _ = norm_c(x, res, weight)
        torch.cuda.synchronize()
        equal = bool(torch.equal(out_t, out.t()))
        norm_diff = float((out.float() - ref.float()).abs().max())  # two compiled kernels: may round apart

        def norm_gather(x=x, res=res, xt=xt, m=m):
            y, _ = norm_c(x, res, weight)
            _gather_transpose_kernel[(triton.cdiv(k, 64), triton.cdiv(m, 64))](
                y, ucols, xt, m, k, y.stride(0), y.stride(1), m, BU=64, BMT=64, num_warps=4
            )

        norm_gather()
        torch.cuda.synchronize()
        equal = equal and bool(torch.equal(xt, ref.t()))
        row = {"m": m, "equal": equal, "norm_max_diff": norm_diff}
        for name, fn in (
            ("norm", lambda x=x, res=res: norm_c(x, res, weight)),
            ("norm+gather", norm_gather),
            ("norm_xt", lambda x=x, res=res: xt_c(x, res, weight)),
        ):
            row[name] = round(1e3 * triton.testing.do_bench_cudagraph(fn, rep=args.rep), 2)  # us
        row["gather_cost"] = round(row["norm+gather"] - row["norm"], 2)
        row["fused_cost"] = round(row["norm_xt"] - row["norm"], 2)
        rec["rows"].append(row)
        log(f"m={m}: {row}")
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    lines = [
        f"# RMSNorm + transposed x ({rec['gpu']}, K = {k}, us; "
        f"Inductor kernels: norm {norm_kernels}, norm_xt {xt_kernels})",
        "",
        "| tokens | norm | norm + gather-transpose | norm with transposed output | gather cost | fused cost | equal |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rec["rows"]:
        cells = [r[c] for c in ("m", "norm", "norm+gather", "norm_xt", "gather_cost", "fused_cost", "equal")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["equal"] for r in rec["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
