"""Experiment (session 16; its third mode became the opt-in ``SUPERWEIGHT_CPU_W4A8=1`` in session 17): on CPUs with
AMX, vLLM's fast int4 path quantizes activations to int8 per token (W4A8). Our plugin serves weight-only
checkpoints that way only on request (session 16: SmolLM2 33.51 vs 32.51 as vLLM does it). This asks what the
product's own recipe gives there: the sidecar's activation-outlier channels taken out of the int8 quantization
(zeroed in the int8 operand) and added back as a 16-bit product with those weight columns. One checkpoint,
WikiText-2 perplexity and eval time, three ways, each in its own process (in-process engine):

* ``w4a16``: what the plugin serves (16-bit activations);
* ``w4a8``: vLLM's W4A8 as it is;
* ``w4a8-split``: W4A8 with the outlier channels in 16-bit.

    python benchmarks/diag/cpu_w4a8_split.py CKPT --data WIKI.raw --out benchmarks/results/cpu_w4a8_split_amx.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("w4a16", "w4a8", "w4a8-split")


def patch(mode: str, ckpt: str) -> None:
    """The mode in this process: ``w4a8-split`` is the plugin's opt-in (``SUPERWEIGHT_CPU_W4A8=1``, session 17);
    ``w4a8`` the same with the outlier channels withheld from the kernel (vLLM's W4A8 as it is)."""
    from vllm_superweight import envs
    from vllm_superweight.kernels.linear import weight_only as WO

    if mode == "w4a16":
        os.environ[envs.CPU_W4A8] = "0"
        return
    os.environ[envs.CPU_W4A8] = "1"
    if mode == "w4a8":
        WO.CPUWNA16Kernel.set_act_outliers = lambda self, layer, channels: None  # type: ignore[method-assign]


def child(args) -> int:
    patch(args.mode, args.ckpt)
    from vllm_superweight import eval as ev

    return ev.main(
        [args.ckpt, "--window", "512", "--max-tokens", str(args.max_tokens), "--data", args.data]
        + ["--json", args.json, "--no-progress"]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="cpu_w4a8_split.json")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    recs = []
    for mode in MODES:
        tmp = f"{args.out}.{mode}.tmp"
        t0 = time.time()
        cmd = [sys.executable, __file__, args.ckpt, "--data", args.data, "--mode", mode, "--json", tmp]
        p = subprocess.run(cmd + ["--max-tokens", str(args.max_tokens)], env=env, capture_output=True, text=True)
        rec = {"mode": mode, "rc": p.returncode, "wall_s": round(time.time() - t0, 1)}
        if p.returncode == 0:
            with open(tmp) as f:
                r = json.load(f)
            os.remove(tmp)
            keys = ("ppl", "ppl_ci95_bootstrap", "tokens", "seconds_scoring", "tokens_per_s")
            rec.update({k: r[k] for k in keys if k in r})
        else:
            rec["error"] = (p.stderr or p.stdout)[-800:]
        kern = [ln for ln in (p.stdout + p.stderr).splitlines() if "W4 linears" in ln]
        rec["kernel"] = kern[0].split("W4 linears: ")[-1] if kern else None
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    with open(args.out, "w") as f:
        json.dump({"ckpt": args.ckpt, "max_tokens": args.max_tokens, "records": recs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
