#!/usr/bin/env python3
"""Is there a super weight the detector missed? Zero the strongest candidates one at a time, measure perplexity.

    python benchmarks/ablate_candidates.py gemma3-270m [--layers 9] [--max-tokens 4096] [--out JSON]

Candidates: the weight that joins layer 0's largest down_proj input spike to its largest output channel (from
``superweight detect``'s profile, recomputed here with one forward pass on the paper's prompt), and the largest-|w|
weight of each of the first ``--layers`` down_proj matrices. Perplexity: transformers on the dequantized model,
WikiText-2 test (first ``--max-tokens`` tokens, windows of 512). A super weight moves it by orders of magnitude
(SmolLM2: 29 -> 343 for one weight); ordinary weights by well under 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vllm_superweight.eval import perplexity_transformers  # noqa: E402
from vllm_superweight.models import decoder_layers, load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model source (alias such as gemma3-270m, HF dir or GGUF)")
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prompt", default="Apple Inc. is a worldwide tech company.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    layers = decoder_layers(model)
    seen = {}

    def hook(mod, inp, out):
        seen["in"], seen["out"] = inp[0].detach().abs()[0], out.detach().abs()[0]

    h = layers[0].mlp.down_proj.register_forward_hook(hook)
    with torch.inference_mode():
        model(**tok(args.prompt, return_tensors="pt"))
    h.remove()
    col = int(seen["in"].max(0).values.argmax())
    row = int(seen["out"].max(0).values.argmax())
    cands = [(f"L0 down_proj[{row},{col}] (largest input spike -> largest output)", 0, row, col)]
    for i in range(min(args.layers, len(layers))):
        w = layers[i].mlp.down_proj.weight
        r, c = divmod(int(w.abs().argmax()), w.shape[1])
        cands.append((f"L{i} down_proj largest |w| [{r},{c}] = {float(w[r, c]):.3g}", i, r, c))

    def ppl():
        return perplexity_transformers(model, tok, max_tokens=args.max_tokens, window=512, progress=False)["ppl"]

    res = {"base": ppl()}
    print(f"base: {res['base']:.4f}", flush=True)
    for name, i, r, c in cands:
        w = layers[i].mlp.down_proj.weight
        old = w.data[r, c].clone()
        with torch.no_grad():
            w.data[r, c] = 0
        res[name] = ppl()
        with torch.no_grad():
            w.data[r, c] = old
        print(f"{name}: {res[name]:.4f} ({(res[name] / res['base'] - 1) * 100:+.2f}%)", flush=True)
    out = args.out or os.path.join(HERE, "results", f"{args.model.replace('/', '_')}_ablation.json")
    with open(out, "w") as f:
        json.dump(
            {
                "model": args.model,
                "text": f"WikiText-2 test, first {args.max_tokens} tokens, windows 512, "
                "transformers on the dequantized weights",
                "ppl": res,
            },
            f,
            indent=1,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
