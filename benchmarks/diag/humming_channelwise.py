"""Experiment (session 20): does vLLM's Humming backend run a channel-wise (group -1) W4 layer?

Session 19 (H200): a channel-wise 4096 x 11008 layer under Humming did not return within 195 s (group 128: 25 s with
its JIT), so ``HummingKernel.can_implement`` refuses channel-wise layers. This builds the same layer with the
refusal lifted in this process only and times each step (pack, the first batch with its JIT, later batches) with
a flush after each, so a call killed by its time limit still shows where it stopped. Run it under a ``timeout``;
``VLLM_BATCH_INVARIANT=1`` hands Humming its mode without stream-K (the cross-CTA reduction is the likeliest part to
wait forever).

    VLLM_BATCH_INVARIANT=1 timeout 120 python3 -u benchmarks/diag/humming_channelwise.py --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,17,300")
    ap.add_argument("--group", type=int, default=-1)
    args = ap.parse_args()

    import torch

    import tests.vllm_linear as VL
    from vllm_superweight.kernels.linear import weight_only as WO

    rec: dict = {"group": args.group, "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", ""), "steps": []}

    def step(name: str, **kw) -> None:
        rec["steps"].append({"step": name, **kw})
        print(json.dumps(rec["steps"][-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)

    # the refusal lifted here only: the parent class's checks (CUDA, SM90, the package) still apply
    WO.HummingKernel.can_implement = classmethod(lambda cls, c: super(WO.HummingKernel, cls).can_implement(c))
    n, k = 4096, 11008
    w = VL.random_w4(n, k, args.group, False, "cuda", seed=13)
    t0 = time.time()
    layer, kern = VL.build_mp_layer(w, "humming")
    torch.cuda.synchronize()
    step("pack", s=round(time.time() - t0, 2), compute_config=getattr(layer, "compute_config", None))
    ref_w = VL.dequant_w4(w)
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        step("start", m=m)
        t0 = time.time()
        y = kern.apply_weights(layer, x)
        torch.cuda.synchronize()
        first = time.time() - t0
        t0 = time.time()
        for _ in range(10):
            kern.apply_weights(layer, x)
        torch.cuda.synchronize()
        ref = x.float() @ ref_w.T
        rel = float((y.float() - ref).norm() / ref.norm())
        step("done", m=m, first_s=round(first, 2), us=round((time.time() - t0) / 10 * 1e6, 1), rel_err=rel)


if __name__ == "__main__":
    main()
