#!/usr/bin/env python3
"""CPU weight-only kernels, one Linear at a time: microseconds per GEMM of each kernel the plugin can choose on
this CPU, over a model's layer shapes and a few batch sizes (tokens), with the weight bytes each one holds.

    python benchmarks/cpu_kernel_bench.py --out benchmarks/results/cpu_kernel_bench.json [--emulate-avx2]

Kernels (built through the plugin's own classes, as vLLM's loader would): ``CPUWNA16Kernel`` (vLLM's int4 GEMM,
where the build has ``cpu_gemm_wna16``), ``AtenInt4CPUKernel`` (torch's int4 GEMM), ``TorchDequantKernel`` in
bf16 and in float32 (the fallback; float32 is what it holds where the CPU emulates bf16). Random W4 g64 weights
(asymmetric), bf16 activations, one thread per core as torch sets it; median of ``--iters`` calls after warm-up.
``--emulate-avx2`` re-runs itself with torch's ATen, oneDNN and MKL held to AVX2 (what an AVX2-only CPU runs)
and without ``cpu_gemm_wna16``. A markdown table goes beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cpu_serving import AVX2_ENV  # the same AVX2 limits as the serving benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {  # (N, K) of a decoder layer's four GEMMs
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
    "llama-1b-like": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)],
}


def _bench(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def run(model: str, ms: list[int], iters: int, emulate: bool) -> list[dict]:
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import vllm_linear as VL

    from vllm_superweight.kernels.linear import base
    from vllm_superweight.kernels.linear import weight_only as WO

    if emulate:
        real = base.has_op
        base.has_op = lambda name, namespace="_C": name != "cpu_gemm_wna16" and real(name, namespace)
    kinds = [("cpu", None), ("cpu-int4", None), ("torch", True), ("torch", False)]
    recs = []
    for n, k in SHAPES[model]:
        w = VL.random_w4(n, k, 64, False, "cpu", seed=n + k)
        for name, native16 in kinds:
            label = name if native16 is None else ("torch-bf16" if native16 else "torch-fp32")
            if native16 is not None:
                WO._cpu_has_16bit_gemm = lambda v=native16: v  # type: ignore[assignment]
            try:
                layer, kern = VL.build_mp_layer(w, name, act_dtype=torch.bfloat16)
            except RuntimeError as e:  # this machine cannot run it (e.g. no cpu_gemm_wna16)
                recs.append({"model": model, "n": n, "k": k, "kernel": label, "skipped": str(e).splitlines()[0][-160:]})
                continue
            nbytes = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
            for m in ms:
                x = torch.randn(m, k).to(torch.bfloat16)
                us = _bench(lambda: kern.apply_weights(layer, x), iters)
                recs.append(
                    {
                        "model": model,
                        "n": n,
                        "k": k,
                        "kernel": label,
                        "m": m,
                        "us": round(us, 1),
                        "weight_bytes": nbytes,
                    }
                )
                print(json.dumps(recs[-1]), flush=True)
    return recs


def table(recs: list[dict]) -> str:
    """Markdown: µs per decoder layer (sum of its four GEMMs) per kernel and batch, and the layer's weight MiB."""
    out = []
    for model in sorted({r["model"] for r in recs}):
        rs = [r for r in recs if r["model"] == model and "us" in r]
        kernels = list(dict.fromkeys(r["kernel"] for r in rs))
        ms = sorted({r["m"] for r in rs})
        cpu = rs[0]["cpu"] if rs else ""
        out.append(f"{model} ({cpu}), µs per decoder layer (4 GEMMs), bf16 activations, W4 g64:\n")
        out.append("| kernel | weights (MiB) | " + " | ".join(f"M = {m}" for m in ms) + " |")
        out.append("|---|---:|" + "---:|" * len(ms))
        for kn in kernels:
            per_m = [sum(r["us"] for r in rs if r["kernel"] == kn and r["m"] == m) for m in ms]
            mib = sum(r["weight_bytes"] for r in rs if r["kernel"] == kn and r["m"] == ms[0]) / 2**20
            out.append(f"| {kn} | {mib:.1f} | " + " | ".join(f"{u:,.0f}" for u in per_m) + " |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_kernel_bench.json"))
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--m", default="1,8,64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--emulate-avx2", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    if args.emulate_avx2 and not args.child:  # ATen reads its capability at start-up: a fresh process
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child"]
        return subprocess.run(cmd, env=dict(os.environ, **AVX2_ENV)).returncode
    flags = open("/proc/cpuinfo").read()
    cpu = ("AVX-512" if "avx512f" in flags else "AVX2") + (" (AVX2 emulated)" if args.emulate_avx2 else "")
    recs = []
    for model in args.models.split(","):
        recs += [
            dict(r, cpu=cpu, date=time.strftime("%Y-%m-%d")) for r in run(model, ms, args.iters, args.emulate_avx2)
        ]
    old = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = [r for r in json.load(f) if r.get("cpu") != cpu]
    recs = old + recs
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(recs, f, indent=1)
    os.replace(tmp, args.out)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(table([r for r in recs if r.get("cpu") == c]) for c in dict.fromkeys(r["cpu"] for r in recs)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
