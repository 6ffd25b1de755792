"""Where a decode step's GPU time goes inside a vLLM engine, by kernel family -- from the torch-profiler traces vLLM
writes (``throughput.py --profile-batches 8,64``: after an engine's other measurements, one profiled generation a
batch size, its trace parsed here into one ``kind: "profile"`` record).

Why (session 38): the kernel benchmark put the q/k/v hold-out at 12.8 us a 7B layer at 8 tokens (0.41 ms a step over
32 layers), the engines paid 0.21 ms (3.77 vs 3.56 ms a step), and a 3.9 us a layer gain in the benchmark moved the
engine by 0.6 %. The same decode step, profiled inside both engines, says which kernels the hold-out really adds.

    python benchmarks/engine_profile.py throughput.json [--out profile.md]   # the table of a run's profile records

Since s45 a record also carries ``cpu_ops``: the host-side operators of the same window (ours, vLLM's, the torch
matmuls our wrappers call) by inclusive time a step -- whether an engine's eager steps are bound by its dispatch.

Families are matched on the kernel's name (first match wins); every kernel of the profiled window counts, the prompt's
prefill included (the same prompts in every engine compared), divided by the tokens generated per sequence.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics

# (family, substrings of the lower-cased kernel name); first match wins
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GEMV (ours)", ("sw_marlin_gemv",)),
    ("SELL correction (ours)", ("_sell_spmm", "sw_sell")),
    ("x transpose for the SELL kernel (ours)", ("_gather_transpose",)),
    ("dequantize with restore (ours)", ("marlin_deq", "_deq_kernel")),
    ("int8 GEMM (ours, Triton)", ("_int8_mm_kernel",)),
    ("activation int8 quantization, own kernel", ("_act_quant_split_kernel", "dynamic_scaled_int8_quant_kernel")),
    ("Humming GEMM", ("humming",)),
    ("Marlin", ("marlin",)),
    ("Machete", ("machete",)),
    ("attention", ("flash", "attn", "attention", "paged")),
    ("dense GEMM (cuBLAS / CUTLASS)", ("gemm", "cutlass", "nvjet", "xmma", "cublas")),
    ("norm / activation / rotary", ("rms", "norm", "silu", "act_and_mul", "rotary", "rope")),
)
OTHER = "other"


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return OTHER


def trace_files(directory: str, since: float) -> list[str]:
    """The trace files vLLM's profiler wrote in ``directory`` at or after ``since`` (epoch s), newest last."""
    found = [
        p
        for pat in ("*.pt.trace.json.gz", "*.pt.trace.json")
        for p in glob.glob(os.path.join(directory, "**", pat), recursive=True)
        if os.path.getmtime(p) >= since
    ]
    return sorted(found, key=os.path.getmtime)


def load_events(path: str, cats: tuple[str, ...] = ("kernel",)) -> dict[str, list[dict]]:
    """The complete events of each category in ``cats`` (``kernel``: GPU kernels; ``cpu_op``: host-side torch
    operators, nested ones included) of one Chrome trace, read once, as {cat: [{name, ts, dur} in us]}."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out: dict[str, list[dict]] = {c: [] for c in cats}
    for e in events:
        c = e.get("cat")
        if c in out and e.get("ph") == "X" and "ts" in e:
            out[c].append({"name": e.get("name", "?"), "ts": float(e["ts"]), "dur": float(e.get("dur", 0.0))})
    return out


def load_kernels(path: str) -> list[dict]:
    """The GPU kernel events (``cat`` kernel, complete events) of one Chrome trace, as {name, ts, dur} in us."""
    return load_events(path)["kernel"]


# host operators worth comparing between engines (s45: is our eager path's dispatch what the saturated W8A8 runs
# lose?): our ops, vLLM's compiled ops, and the torch ops our Python wrappers call
CPU_OP_KEYS: tuple[str, ...] = ("superweight::", "_c::", "vllm::", "aten::addmm", "aten::mm")


def cpu_summary(ops: list[dict], steps: int, top: int = 12) -> list[dict]:
    """The ``top`` host operators matching ``CPU_OP_KEYS`` by inclusive time (an op's time includes the ops it
    calls), per decode step: [{name, us_per_step, per_step}], largest first; [] when the trace holds none."""
    steps = max(1, steps)
    acc: dict[str, list[float]] = {}
    for o in ops:
        if any(k in o["name"].lower() for k in CPU_OP_KEYS):
            a = acc.setdefault(o["name"], [0.0, 0.0])
            a[0] += o["dur"]
            a[1] += 1
    ranked = sorted(acc.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        {"name": n[:120], "us_per_step": round(t / steps, 2), "per_step": round(c / steps, 2)} for n, (t, c) in ranked
    ]


def summarize(kernels: list[dict], steps: int, top: int = 15) -> dict:
    """Per decode step (``steps`` = tokens generated a sequence): us by family, busy (the kernels' summed time) and
    span (first start to last end: busy plus the GPU's idle gaps), and the ``top`` kernels by time."""
    if not kernels:
        raise ValueError("the trace holds no GPU kernel events (profiler without CUDA activity?)")
    steps = max(1, steps)
    by_fam: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        fam = family(k["name"])
        by_fam[fam] = by_fam.get(fam, 0.0) + k["dur"]
        acc = by_name.setdefault(k["name"], [0.0, 0.0])
        acc[0] += k["dur"]
        acc[1] += 1
    busy = sum(k["dur"] for k in kernels)
    span = max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "kernels": len(kernels),
        "busy_us_per_step": round(busy / steps, 2),
        "span_us_per_step": round(span / steps, 2),
        "family_us_per_step": {f: round(v / steps, 2) for f, v in sorted(by_fam.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": n[:160], "family": family(n), "us_per_step": round(t / steps, 2), "per_step": round(c / steps, 2)}
            for n, (t, c) in ranked
        ],
    }


#: a kernel every engine launches once a step, at its end: the sampler (``_gumbel_sample_kernel`` in vLLM 0.26)
STEP_MARKERS: tuple[str, ...] = ("sample",)


def step_summary(kernels: list[dict], markers: tuple[str, ...] = STEP_MARKERS, min_step_kernels: int = 8) -> dict:
    """The window cut into engine steps at the sampler's kernels: the first step (the prompts' prefill) and the
    median of the later (decode) steps -- busy, span and ``lead_gap`` (the GPU's idle time from the previous step's
    end to this step's first kernel: host work between steps) -- so that a gap between two engines can be placed in
    the prefill or in the decode steps. A step ends with its sampler's last marker kernel: marker kernels with fewer
    than ``min_step_kernels`` other kernels between them are one sampler (vLLM 0.26's sampler launches several
    matching kernels with a few others between them: cut at every marker, the H100 s47 profile of 128 steps gave
    387 "steps"); a forward pass has more kernels than that. A piece with fewer than a quarter of the median piece's
    kernels is no forward pass but a fragment (H100 s50: the window opened on 9 kernels and a marker, which stood
    as the "prefill": 23 us busy): it joins the step before it (the window's leading ones: the first step), counted
    in ``fragments``.
    {} when no marker kernel is found."""
    ks = sorted(kernels, key=lambda k: k["ts"])
    is_marker = [any(m in k["name"].lower() for m in markers) for k in ks]
    ends: list[int] = []  # index of each step's last marker kernel
    others = 0  # non-marker kernels since the last marker
    for i, mk in enumerate(is_marker):
        if not mk:
            others += 1
            continue
        if ends and others < min_step_kernels:
            ends[-1] = i  # the same sampler
        else:
            ends.append(i)
        others = 0
    if not ends:
        return {}
    steps = [ks[a + 1 : b + 1] for a, b in zip([-1, *ends[:-1]], ends)]
    floor = max(min_step_kernels, statistics.median(len(st) for st in steps) / 4)
    merged: list[list[dict]] = []
    fragments, lead = 0, []
    for st in steps:
        if len(st) >= floor:
            merged.append(lead + st)
            lead = []
            continue
        fragments += 1
        if merged:
            merged[-1] += st
        else:
            lead += st
    steps = merged or [lead]
    rows = []
    prev_end: float | None = None
    for st in steps:
        start = st[0]["ts"]
        end = max(k["ts"] + k["dur"] for k in st)
        rows.append(
            {
                "busy_us": sum(k["dur"] for k in st),
                "span_us": end - start,
                "lead_gap_us": 0.0 if prev_end is None else max(0.0, start - prev_end),
                "kernels": len(st),
            }
        )
        prev_end = end
    first, rest = rows[0], rows[1:]
    out = {"steps_found": len(rows), "first": {key: round(v, 1) for key, v in first.items()}}
    if fragments:
        out["fragments"] = fragments
    if rest:
        out["later_median"] = {key: round(statistics.median([r[key] for r in rest]), 1) for key in first}
    return out


def profile_table(records: list[dict]) -> str:
    """Markdown: us a decode step by family (rows) for each profiled engine and batch (columns), then busy and span."""
    recs = [r for r in records if r.get("kind") == "profile" and r.get("family_us_per_step")]
    if not recs:
        return ""
    cols = [(r.get("variant", r.get("method", "?")), r["batch"]) for r in recs]
    fams = [f for f, _ in FAMILIES if any(f in r["family_us_per_step"] for r in recs)]
    fams += [OTHER] if any(OTHER in r["family_us_per_step"] for r in recs) else []
    lines = [
        "## Where a decode step's GPU time goes (us a step; torch profiler inside the engine)",
        "",
        "| kernel family | " + " | ".join(f"{v} b{b}" for v, b in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(f"{r['family_us_per_step'].get(f, 0.0):.1f}" for r in recs) + " |")
    lines.append("| **busy (all kernels)** | " + " | ".join(f"**{r['busy_us_per_step']:.1f}**" for r in recs) + " |")
    lines.append("| span (busy + idle gaps) | " + " | ".join(f"{r['span_us_per_step']:.1f}" for r in recs) + " |")
    if any(r.get("step_profile") for r in recs):  # records since s47: the prefill step apart from the decode steps
        for part, label in (("first", "first step (prefill)"), ("later_median", "later steps, median")):
            for key in ("busy_us", "span_us", "lead_gap_us"):
                vals = [(r.get("step_profile") or {}).get(part, {}).get(key) for r in recs]
                cells = " | ".join("" if v is None else f"{v:.1f}" for v in vals)
                lines.append(f"| {label}: {key[:-3].replace('_', ' ')} (us) | {cells} |")
    # host operators (records since s45): the union of each record's six largest, inclusive us a step
    names = list(dict.fromkeys(o["name"] for r in recs for o in r.get("cpu_ops", [])[:6]))
    for n in names:
        vals = [{o["name"]: o["us_per_step"] for o in r.get("cpu_ops", [])}.get(n) for r in recs]
        lines.append(f"| host op `{n}` | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a throughput.py output with profile records")
    ap.add_argument("--out", help="markdown file to write (default: print)")
    args = ap.parse_args()
    with open(args.json) as f:
        table = profile_table(json.load(f))
    if not table:
        print(f"{args.json}: no profile records")
        return 1
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
