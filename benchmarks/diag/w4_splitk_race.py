"""Diagnosis of the intermittent 22016x4096 g32 failure of the Triton W4 MMA kernel (second call off).

Runs one layer many times per variant and reports: calls off the reference, rows/columns of the bad outputs,
and whether the shared split-K workspace / counters are left non-zero after a call (they must stay zero).
GPU only; not part of the test suite. Usage: python benchmarks/diag/w4_splitk_race.py [--reps 40]

Finding (H200, 2026-12-01, benchmarks/results/w4_splitk_race_h200.json): only the LAST token row (M = 2, 3; never
M = 16), in runs of whole tiles, in 5-50 % of calls, with the workspace in use (split-K or the atomic correction)
and never without it; the workspace was never left dirty. Cause: in ``_store_tile`` the last arriver read the sums
in the accumulator's layout and re-zeroed them in the adds' layout with no barrier between, so a fast warp zeroed
words a slow one had not read yet. A per-thread fence.acq_rel.gpu before the counter did NOT help
(w4_splitk_race_fence_h200.json); a CTA barrier between the read and the zeroing is the fix (PTX-checked by
tests/test_triton_w4.py::test_split_k_epilogue_reads_every_sum_before_zeroing; GPU re-run owed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import test_triton_w4 as TT  # noqa: E402

from vllm_superweight.kernels import triton_w4 as T  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "w4_splitk_race.json"))
    a = ap.parse_args()
    n, k, group, sym = 22016, 4096, 32, True
    inputs, prep = TT._gpu_layer(n, k, group, sym, seed=n + k)
    w = inputs["dense"]
    ws, cnt, _ = T._workspace(torch.device("cuda"), T.prep_info(prep)["n_pad"])
    sp_rows = set(inputs["rows"].tolist())
    base = dict(T.pick_config(2))
    variants = {
        "default": base,
        "sp1": dict(base, SP=1),
        "sk1": dict(base, SK=1),
        "sk1_sp1": dict(base, SK=1, SP=1),
        "sk4": dict(base, SK=4),
    }
    res: dict = {"plan_default": {kk: v for kk, v in T.plan(2, T.prep_info(prep), base).items() if kk != "grid"}}
    for name, cfg in variants.items():
        for m in (2, 3, 16):
            torch.manual_seed(0)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.T
            mag = x.float().abs() @ w.abs().T
            tol = 2.0**-7 * ref.abs() + 2.0**-8 * mag + 1e-6
            r = {"bad_calls": 0, "dirty_calls": 0, "bad_rows": {}, "bad_on_sparse_rows": 0, "bad_total": 0,
                 "max_err": 0.0, "dirty_rows": {}, "cnt_dirty": 0, "first": []}  # fmt: skip
            for _ in range(a.reps):
                y = T.w4_mm(x, prep, config=cfg)
                torch.cuda.synchronize()
                bad = (y.float() - ref).abs() > tol
                if bad.any():
                    r["bad_calls"] += 1
                    idx = bad.nonzero()
                    r["bad_total"] += int(idx.shape[0])
                    r["max_err"] = max(r["max_err"], float((y.float() - ref).abs().max()))
                    for row in idx[:, 0].tolist():
                        r["bad_rows"][row] = r["bad_rows"].get(row, 0) + 1
                    r["bad_on_sparse_rows"] += sum(1 for c in idx[:, 1].tolist() if c in sp_rows)
                    if len(r["first"]) < 3:
                        r["first"].append(idx[:4].tolist())
                nz = (ws != 0).nonzero()
                if nz.numel() or bool((cnt != 0).any()):
                    r["dirty_calls"] += 1
                    r["cnt_dirty"] += int((cnt != 0).sum())
                    npad = T.prep_info(prep)["n_pad"]
                    for row in (nz[:, 0] // npad).tolist()[:1000]:
                        r["dirty_rows"][row] = r["dirty_rows"].get(row, 0) + 1
                    ws.zero_()
                    cnt.zero_()
            res[f"{name}/M{m}"] = r
            print(name, m, json.dumps(r)[:400], flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
