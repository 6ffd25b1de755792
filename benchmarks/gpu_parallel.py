#!/usr/bin/env python3
"""Tensor and pipeline parallelism on GPUs: TP 2 and PP 2 against TP 1 through real vLLM engines.

    python benchmarks/gpu_parallel.py --out $OUT/gpu_parallel.json --tokenizer-dir .gpu-bundle/tok \
        [--models tiny,smollm2] [--smollm2 /root/sw-ckpt] [--runs tp1,tp2,pp2,tp2-graphs,fp32] [--timeout 300]

* ``tiny``: a small random Llama (hidden 256, 4 heads of 64, GQA 2 KV heads, intermediate 1024, 2 layers) with
  two planted super weights in layer 0's down_proj, one on each side of its row-parallel TP 2 split (input
  columns 17 and 700 of 1024), converted here (W4 channel, asymmetric, 0.1% hold-out, SWs restored);
* ``smollm2``: a real converted SmolLM2-135M checkpoint (``superweight convert smollm2 ... --preset default``).

Each run is one engine in its own process (tests/vllm_runner.py, greedy, prompt logprobs); its log streams to
``$OUT/parallel-<model>-<run>.log`` with every thread's stack dumped if it is still running after
``--hang-dump`` seconds (how a hang shows where it is). Compared with TP 1 of the same dtype: greedy tokens
equal and the largest |prompt-logprob difference|; with the float32 transformers reference of the dequantized,
restored weights: mean |prompt-logprob error|. Results are appended to ``--out`` as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HANGDUMP = os.path.join(HERE, "hangdump")  # sitecustomize: stack dumps of vLLM's worker processes too
sys.path.insert(0, ROOT)
T0 = time.time()
PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
]
TINY_SWS = [{"layer": 0, "row": 5, "col": 17}, {"layer": 0, "row": 5, "col": 700}]
RUNS = {  # name -> engine spec overrides
    "tp1": dict(tp=1, pp=1, dtype="bfloat16", eager=True),
    "tp2": dict(tp=2, pp=1, dtype="bfloat16", eager=True),
    "pp2": dict(tp=1, pp=2, dtype="bfloat16", eager=True),
    "tp2-graphs": dict(tp=2, pp=1, dtype="bfloat16", eager=False),  # torch.compile + CUDA graphs
    # diagnosis of the TP 2 + CUDA graphs failure: which part is at fault
    "tp2-graphs-float": dict(tp=2, pp=1, dtype="bfloat16", eager=False, use_src=True),  # vLLM alone, unquantized
    "tp2-graphs-nocar": dict(
        tp=2, pp=1, dtype="bfloat16", eager=False, engine_kwargs={"disable_custom_all_reduce": True}
    ),
    "tp2-graphs-nocorr": dict(tp=2, pp=1, dtype="bfloat16", eager=False, env={"SUPERWEIGHT_DISABLE_CORRECTION": "1"}),
    # vLLM's torch symmetric-memory all-reduce (two-shot for 2 GPUs; on by default, not switched off by
    # disable_custom_all_reduce) is the prime suspect: the first crash surfaced in CUDASymmetricMemory
    "tp2-graphs-nosymm": dict(tp=2, pp=1, dtype="bfloat16", eager=False, env={"VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}),
    "tp2-graphs-float-nosymm": dict(
        tp=2, pp=1, dtype="bfloat16", eager=False, use_src=True, env={"VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
    ),
    "tp2-graphs-blocking": dict(tp=2, pp=1, dtype="bfloat16", eager=False, env={"CUDA_LAUNCH_BLOCKING": "1"}),
    "fp32": dict(tp=1, pp=1, dtype="float32", eager=True),  # no 16-bit kernel: the torch fallback
    "fp32-tp2": dict(tp=2, pp=1, dtype="float32", eager=True),
}
# single-token decoding on one GPU (issue 12): each prompt alone, CUDA graphs, the greedy token's log-probability at
# every step; compared with ``m1-marlin`` (vLLM's Marlin at one token, our GEMV off) instead of TP 1. The W4 kernel
# modes that serve one token with our CUDA GEMV (over Marlin's tensors by default, over Humming's with
# ``humming-gemv``) against Marlin and Humming on the same real weights.
_M1 = dict(tp=1, pp=1, dtype="bfloat16", eager=False, one_by_one=True, decode_logprobs=True)
RUNS.update(
    {
        # the mode named in every run: a SUPERWEIGHT_W4_KERNEL in the caller's environment must not leak into them
        "m1-marlin": dict(_M1, env={"SUPERWEIGHT_CUDA_GEMV": "0", "SUPERWEIGHT_W4_KERNEL": "auto"}),
        "m1-gemv": dict(_M1, compare="m1-marlin", env={"SUPERWEIGHT_W4_KERNEL": "auto"}),
        "m1-humming": dict(_M1, compare="m1-marlin", env={"SUPERWEIGHT_W4_KERNEL": "humming"}),
        "m1-humming-gemv": dict(_M1, compare="m1-marlin", env={"SUPERWEIGHT_W4_KERNEL": "humming-gemv"}),
        # session 27: m1-gemv's engine died (illegal memory access) in its profile run, right after loading the
        # compiled graph m1-marlin had cached. The same with every launch synchronous and no compile cache (the
        # faulting kernel named in the traceback), and eager (no torch.compile at all)
        "m1-gemv-blocking": dict(
            _M1,
            compare="m1-marlin",
            env={"SUPERWEIGHT_W4_KERNEL": "auto", "CUDA_LAUNCH_BLOCKING": "1", "VLLM_DISABLE_COMPILE_CACHE": "1"},
        ),
        "m1-gemv-eager": dict(_M1, eager=True, compare="m1-marlin", env={"SUPERWEIGHT_W4_KERNEL": "auto"}),
    }
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def build_tiny(workdir: str, tok_dir: str) -> str:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_superweight.convert import build_quant_config, convert

    src, dst = os.path.join(workdir, "tiny-src"), os.path.join(workdir, "tiny-w4")
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for sw in TINY_SWS:
            m.model.layers[0].mlp.down_proj.weight[sw["row"], sw["col"]] = 1.5
    m.save_pretrained(src)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), src)
    qc = build_quant_config(None, bits=4, block="channel", symmetric=False, holdout=1e-3)
    convert(src, dst, qc, super_weights=TINY_SWS, progress=False, log=None)
    return dst


def reference_logprobs(ckpt: str, ids: list[list[int]]) -> list[list[float]]:
    import torch

    from vllm_superweight.checkpoint import load_dequantized_model

    model, _ = load_dequantized_model(ckpt, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p in ids:
            lg = model(torch.tensor([p])).logits[0].float().log_softmax(-1)
            out.append(lg[torch.arange(len(p) - 1), torch.tensor(p[1:])].tolist())
    del model
    return out


def run_engine(spec: dict, log_path: str, timeout: float) -> tuple[list | None, float, str]:
    t = time.time()
    with open(log_path, "w") as lf:
        env = dict(os.environ)
        if spec.get("hang_dump_s"):  # every process of the run (vLLM's workers too) dumps its stacks at that time
            env["SW_HANG_DUMP_S"] = str(spec["hang_dump_s"])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [HANGDUMP, env.get("PYTHONPATH", "")]))
        p = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "vllm_runner.py"), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=lf,
            text=True,
            start_new_session=True,
            env=env,
        )
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            stdout, _ = p.communicate()
            return None, time.time() - t, f"timed out after {timeout:.0f}s"
        lf.write(stdout)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return None, time.time() - t, f"rc={p.returncode}"
    return json.loads(lines[-1][len("RESULT ") :]), time.time() - t, "ok"


def compare_runs(res: list[dict], base: list[dict], name: str) -> dict:
    """Greedy tokens equal to ``base``'s, the largest prompt log-probability difference and, where both runs recorded
    them, the largest difference of the greedy tokens' log-probabilities over the decode steps both took the same
    way (a step after the first differing token compares different contexts, so each prompt stops there)."""
    out: dict = {
        f"tokens_equal_{name}": all(x["tokens"] == y["tokens"] for x, y in zip(res, base)),
        f"max_abs_dlogprob_vs_{name}": max(
            abs(u - v) for x, y in zip(res, base) for u, v in zip(x["prompt_logprobs"], y["prompt_logprobs"])
        ),
    }
    if all("decode_logprobs" in x for x in res + base):
        d, steps = 0.0, 0
        for x, y in zip(res, base):
            for tx, ty, u, v in zip(x["tokens"], y["tokens"], x["decode_logprobs"], y["decode_logprobs"]):
                d, steps = max(d, abs(u - v)), steps + 1
                if tx != ty:
                    break
        out[f"max_abs_decode_dlogprob_vs_{name}"] = d
        out["decode_steps_compared"] = steps
    return out


def kernel_lines(log_path: str) -> list[str]:
    with open(log_path, errors="replace") as f:
        return sorted({ln.split("superweight_rtn", 1)[1].strip() for ln in f if "superweight_rtn W" in ln})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_parallel.json"))
    ap.add_argument("--tokenizer-dir", default=os.path.join(ROOT, ".gpu-bundle", "tok"))
    ap.add_argument("--workdir", default="/root/swpar")
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--smollm2", default="/root/sw-ckpt", help="a converted SmolLM2 checkpoint directory")
    ap.add_argument("--runs", default="tp1,tp2,pp2,tp2-graphs,fp32")
    ap.add_argument("--timeout", type=float, default=300.0, help="per engine")
    ap.add_argument("--hang-dump", type=float, default=200.0)
    ap.add_argument("--budget-s", type=float, default=560.0)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    os.makedirs(args.workdir, exist_ok=True)
    logdir = os.path.dirname(os.path.abspath(args.out))
    results = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    try:  # how the GPUs reach each other decides which all-reduce vLLM can use
        import torch

        if torch.cuda.device_count() >= 2:
            p2p = torch.cuda.can_device_access_peer(0, 1)
            log(f"GPUs: {torch.cuda.device_count()}; peer access 0<->1: {p2p}")
            results.append(dict(run="machine", gpus=torch.cuda.device_count(), peer_access_0_1=bool(p2p)))
    except Exception as e:  # noqa: BLE001
        log(f"peer-access check failed: {e}")
    for model in args.models.split(","):
        if model == "tiny":
            ckpt = build_tiny(args.workdir, args.tokenizer_dir)
        elif model == "smollm2":
            ckpt = args.smollm2
            if not os.path.exists(os.path.join(ckpt, "config.json")):
                log(f"skip smollm2: no checkpoint at {ckpt}")
                continue
        else:
            raise SystemExit(f"unknown model {model}")
        tok = AutoTokenizer.from_pretrained(ckpt)
        ids = [tok(p).input_ids for p in PROMPTS]
        ref = reference_logprobs(ckpt, ids)
        base: dict[str, list] = {}
        for run in args.runs.split(","):
            left = args.budget_s - (time.time() - T0)
            if left < 60:
                log(f"skip {model}/{run}: budget")
                continue
            over = {k: v for k, v in RUNS[run].items() if k not in ("use_src", "compare")}
            use_src = RUNS[run].get("use_src", False)
            if use_src and model != "tiny":
                log(f"skip {model}/{run}: no float source here")
                continue
            spec = dict(
                model=os.path.join(args.workdir, "tiny-src") if use_src else ckpt,
                prompts=ids,
                max_tokens=16,
                prompt_logprobs=True,
                hang_dump_s=args.hang_dump,
                gpu_memory_utilization=0.3,
                **over,
            )
            lp = os.path.join(logdir, f"parallel-{model}-{run}.log")
            log(f"{model}/{run}: {RUNS[run]}")
            # torch.compile of two workers + graph capture takes longer than an eager start
            limit = args.timeout * (2 if not RUNS[run].get("eager", True) else 1)
            res, dt, status = run_engine(spec, lp, min(limit, left - 10))
            rec = dict(model=model, run=run, **RUNS[run], seconds=round(dt, 1), status=status, kernels=kernel_lines(lp))
            if res is not None and use_src:
                rec["tokens"] = [r["tokens"] for r in res]  # another model: nothing to compare with
            elif res is not None:
                err = [abs(a - b) for r, rr in zip(res, ref) for a, b in zip(r["prompt_logprobs"], rr)]
                rec["mean_abs_err_vs_fp32_reference"] = sum(err) / len(err)
                rec["max_abs_err_vs_fp32_reference"] = max(err)
                # the baseline: the run named by ``compare`` where it ran, else the first run of this dtype (TP 1)
                named = RUNS[run].get("compare")
                if named:
                    if named in base:
                        rec.update(compare_runs(res, base[named], named))
                    else:
                        rec["baseline_missing"] = named  # list it first in --runs
                elif run.startswith("m1-"):  # a baseline other runs name
                    base[run] = res
                    rec["baseline"] = True
                elif RUNS[run]["dtype"] not in base:
                    base[RUNS[run]["dtype"]] = res
                    rec["baseline"] = True
                else:
                    rec.update(compare_runs(res, base[RUNS[run]["dtype"]], "tp1"))
                rec["tokens"] = [r["tokens"] for r in res]
            results.append(rec)
            with open(args.out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
            log(f"  -> {status} in {dt:.0f}s; " + json.dumps({k: v for k, v in rec.items() if k not in ("tokens",)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
