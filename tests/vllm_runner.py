"""Run one real vLLM engine in a subprocess and dump what the tests compare (JSON on stdout's last line).

Usage: python tests/vllm_runner.py SPEC_JSON   where SPEC = {"model", "dtype", "tp", "pp", "prompts" (token id
lists), "max_tokens", "prompt_logprobs": bool, "decode_logprobs": bool (the greedy token's log-probability at each
step), "one_by_one": bool (one generate call per prompt: decode steps of one token), "eager": bool, "env": {...},
"engine_kwargs": {...} (more LLM(...) arguments), "hang_dump_s": seconds (print every thread's stack if the run is
still going then, and again each period: finds hangs)}.
A fresh process per engine keeps tests independent
(vLLM's distributed state is process-global) and lets a test assert on a failing start-up's message.
"""

import faulthandler
import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    from vllm_superweight.envs import setdefault_vllm_env

    setdefault_vllm_env()
    if spec.get("hang_dump_s"):
        faulthandler.dump_traceback_later(float(spec["hang_dump_s"]), repeat=True, file=sys.stderr)
    tp, pp = int(spec.get("tp", 1)), int(spec.get("pp", 1))
    if tp * pp == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp * pp))
        )
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(
        model=spec["model"],
        max_model_len=spec.get("max_model_len", 512),
        enforce_eager=spec.get("eager", True),
        seed=0,
        dtype=spec.get("dtype", "auto"),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
    )
    if spec.get("quantization"):
        kw["quantization"] = spec["quantization"]
    if tp * pp > 1:
        kw["distributed_executor_backend"] = "mp"
    kw.update(spec.get("engine_kwargs", {}))
    if spec.get("gpu_memory_utilization"):
        kw["gpu_memory_utilization"] = float(spec["gpu_memory_utilization"])
    t0 = time.time()
    llm = LLM(**kw)
    print(f"ENGINE_READY {time.time() - t0:.1f}", flush=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=spec.get("max_tokens", 16),
        ignore_eos=True,
        prompt_logprobs=0 if spec.get("prompt_logprobs") else None,
        logprobs=0 if spec.get("decode_logprobs") else None,
    )
    if spec.get("one_by_one"):  # each prompt alone: every decode step is a batch of ONE token (M = 1 kernels)
        outs = [o for pr in prompts for o in llm.generate([pr], sp, use_tqdm=False)]
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    res = []
    for p, o in zip(spec["prompts"], outs):
        c = o.outputs[0]
        r = {"tokens": list(c.token_ids)}
        if spec.get("prompt_logprobs"):
            r["prompt_logprobs"] = [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        if spec.get("decode_logprobs"):  # the greedy token's log-probability at each decode step
            r["decode_logprobs"] = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
        res.append(r)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
