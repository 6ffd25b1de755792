#!/usr/bin/env python3
"""Serving cost on the CPU (vLLM CPU build): weight memory and decode speed of checkpoints, one engine each.

    python benchmarks/cpu_serving.py --out benchmarks/results/cpu_serving.json NAME=CKPT [NAME=CKPT ...]

Each checkpoint is served in its own process (offline ``LLM``, in-process engine, bf16, eager, 1 OMP thread as
vLLM binds it on this 2-core machine): the bytes of the served model's parameters and buffers (what the kernels
hold after load), the kernel the plugin chose, and greedy decode throughput for 64 new tokens after a 64-token
prompt at batch 1 and 8 (best of 3). Records carry the CPU's ISA (AVX2 / AVX-512 / AVX-512+AMX), which decides
the weight-only kernel (vLLM's AVX2 build has no ``cpu_gemm_wna16``: the plugin then serves torch's own int4 GEMM,
``AtenInt4CPUKernel``, or where that cannot run dequantizes once at load and serves ``F.linear``, in float32 where
the CPU emulates bf16). ``--emulate-avx2`` measures the AVX2 choice on an AVX-512 machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# torch's ATen, oneDNN and MKL held to AVX2: what an AVX2-only CPU runs (read at process start-up)
AVX2_ENV = dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if os.environ.get("SW_BENCH_EMULATE_AVX2") == "1":  # choose kernels as on vLLM's AVX2 build of a CPU without bf16
    from vllm_superweight.kernels.linear import base, weight_only
    _has_op = base.has_op
    base.has_op = lambda name, namespace="_C": name != "cpu_gemm_wna16" and _has_op(name, namespace)
    weight_only._cpu_has_16bit_gemm = lambda: False
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0)
sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def weight_bytes(worker):
    m = worker.model_runner.model
    ts = {id(t): t for t in list(m.parameters()) + list(m.buffers())}
    return sum(t.numel() * t.element_size() for t in ts.values())


res = {"weights_gib": round(llm.collective_rpc(weight_bytes)[0] / 2**30, 4)}
for batch in (1, 8):
    ps = [TokensPrompt(prompt_token_ids=[1 + (7 * i + j) % 5000 for j in range(64)]) for i in range(batch)]
    llm.generate(ps, sp, use_tqdm=False)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    res[f"decode_tok_s_b{batch}"] = round(batch * 64 / min(times), 1)
print("RESULT " + json.dumps(res), flush=True)
"""


def isa() -> str:
    flags = open("/proc/cpuinfo").read()
    if "avx512f" in flags:  # AMX (bf16 tiles): vLLM's int4 kernel uses them; ours keep 16-bit activations there
        return "AVX-512+AMX" if "amx_bf16" in flags else "AVX-512"
    return "AVX2" if "avx2" in flags else "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="NAME=CHECKPOINT_DIR")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_serving.json"))
    ap.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="on an AVX-512 CPU: kernels chosen as on an AVX2 one (no cpu_gemm_wna16, no native bf16) and torch's "
        "ATen, oneDNN and MKL held to AVX2 (vLLM's own ops, e.g. attention, keep AVX-512)",
    )
    args = ap.parse_args()
    emulate = {}
    if args.emulate_avx2:  # its own inductor cache: kernels compiled under these settings crashed a native run
        emulate = dict(
            AVX2_ENV,
            SW_BENCH_EMULATE_AVX2="1",
            TORCHINDUCTOR_CACHE_DIR=os.path.join(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor"), "avx2"),
        )
    recs = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            recs = json.load(f)
    for item in args.ckpts:
        name, _, path = item.partition("=")
        env = dict(
            os.environ,
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            VLLM_HOST_IP="127.0.0.1",
            **emulate,
        )
        t = time.time()
        p = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env)
        out = p.stdout + p.stderr
        rec = {
            "name": name,
            "ckpt": path,
            "cpu": isa() + (" (AVX2 emulated: kernel choice, ATen, oneDNN, MKL)" if emulate else ""),
            "cores": os.cpu_count(),
            "seconds": round(time.time() - t, 1),
            "date": time.strftime("%Y-%m-%d"),
            "knobs": {k: v for k, v in sorted(env.items()) if k.startswith(("SUPERWEIGHT_", "VLLM_DISABLED_KERNELS"))},
        }
        k = sorted({ln.split("superweight_rtn", 1)[1].strip() for ln in out.splitlines() if "superweight_rtn W" in ln})
        if not k:  # not ours: say what vLLM serves it with (its own method, or none)
            try:
                with open(os.path.join(path, "config.json")) as f:
                    qm = json.load(f).get("quantization_config", {}).get("quant_method")
            except (OSError, ValueError):
                qm = None
            k = [f"vLLM {qm}" if qm else "(unquantized)"]
        rec["kernels"] = k
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            rec["status"] = f"failed rc={p.returncode}: {out[-500:]}"
        else:
            rec.update(json.loads(lines[-1][7:]))
            rec["status"] = "ok"
        print(json.dumps(rec), flush=True)
        recs.append(rec)
        with open(args.out, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
