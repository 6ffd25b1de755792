#!/usr/bin/env python3
"""Paired comparison of two perplexity records scored on the same windows (``superweight eval --json`` output, or
one record of a results JSON list picked by model/row/dtype).

    python benchmarks/paired.py A.json B.json [--a-row ROW --b-row ROW --model M --dtype D]

Prints both perplexities with their bootstrap intervals, the mean per-window NLL difference B - A with its
standard error, how many windows B scores lower, and ``eval.paired_bootstrap``'s relative perplexity difference
with a 95% interval (windows resampled together): the way a 1% difference is told from window noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_superweight.eval import paired_bootstrap  # noqa: E402


def pick(path: str, row: str | None, model: str | None, dtype: str | None) -> dict:
    with open(path) as f:
        d = json.load(f)
    recs = d if isinstance(d, list) else [d]
    for key, want in (("row", row), ("model", model), ("dtype", dtype)):
        if want is not None:
            recs = [r for r in recs if r.get(key) == want]
    if len(recs) != 1:
        raise SystemExit(f"{path}: {len(recs)} records match (give --*-row / --model / --dtype)")
    return recs[0]


def compare(a: dict, b: dict) -> dict:
    wa, wb = a["window_nll"], b["window_nll"]
    if [w[1] for w in wa] != [w[1] for w in wb]:
        raise SystemExit("the two records were not scored on the same windows")
    d = [y[0] / y[1] - x[0] / x[1] for x, y in zip(wa, wb)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) / math.sqrt(n)
    return {
        "windows": n,
        "nll_diff_b_minus_a": mean,
        "nll_diff_stderr": se,
        "windows_b_lower": sum(1 for v in d if v < 0),
        "paired_bootstrap": paired_bootstrap(wa, wb),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--a-row")
    p.add_argument("--b-row")
    p.add_argument("--model")
    p.add_argument("--dtype")
    args = p.parse_args(argv)
    a = pick(args.a, args.a_row, args.model, args.dtype)
    b = pick(args.b, args.b_row, args.model, args.dtype)
    c = compare(a, b)
    for name, r in (("A", a), ("B", b)):
        ci = r.get("ppl_ci95_bootstrap") or [float("nan")] * 2
        print(f"{name}: {r.get('row', r.get('model_dir'))}  ppl {r['ppl']:.2f}  [{ci[0]:.2f} - {ci[1]:.2f}]")
    pb = c["paired_bootstrap"]
    print(
        f"B - A: mean NLL {c['nll_diff_b_minus_a']:+.4f} +- {c['nll_diff_stderr']:.4f} nats over {c['windows']} "
        f"windows (B lower in {c['windows_b_lower']}); ppl {pb['rel_diff']:+.2%} "
        f"[{pb['ci95'][0]:+.2%}, {pb['ci95'][1]:+.2%}]"
    )
    print(json.dumps(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
