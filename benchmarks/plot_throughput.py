#!/usr/bin/env python3
"""Plot + table from the throughput records (benchmarks/throughput.py).

    python benchmarks/plot_throughput.py [benchmarks/results/throughput.json] [--out-dir benchmarks/results]
        [--name throughput]

Writes ``<name>.png`` (left: offline throughput per method for each input/output pair; right: latency per
method at each batch size) and ``<name>.md`` (tables naming the GPU and vLLM version, ratios vs bf16 / AWQ /
SmoothQuant, the W4 kernel and the weight memory / KV-cache tokens read from vLLM's log). When a (variant, config)
was measured more than once, the latest record wins in those tables; where the records carry ``lease_call`` (several
engines of one method in one lease, merged from the calls' JSONs), a last table lists every engine and the means
that the ratios of a repeated comparison should use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from engine_profile import profile_table  # noqa: E402
from model_shapes import DEFAULT_SHAPE, SHAPES  # noqa: E402

ORDER = [
    "bf16",
    "awq",
    "smoothquant",
    "sw-w4-channel",
    "sw-w4-channel-nosw",
    "sw-w4-g128",
    "sw-w4-g128-nosw",
    "sw-w4-channel-holdout",
    "sw-default",
    "sw-w8a8",
]
LABEL = {
    "bf16": "bf16",
    "awq": "AWQ W4A16 g128",
    "smoothquant": "SmoothQuant W8A8",
    "sw-w4-channel": "SW-RTN W4 channel",
    "sw-w4-channel-nosw": "SW-RTN W4 channel (no SW)",
    "sw-w4-g128": "SW-RTN W4 g128",
    "sw-w4-g128-nosw": "SW-RTN W4 g128 (no SW)",
    "sw-w4-channel-holdout": "SW-RTN W4 channel +0.1% hold-out",
    "sw-w4-g128-holdout": "SW-RTN W4 g128 +0.1% hold-out",
    "sw-w4-g128-holdout-qkv": "SW-RTN W4 g128 +0.1% hold-out, all of it in q/k/v",
    "sw-default": "SW-RTN default (W4 g64 +0.1% hold-out)",
    "sw-w8a8": "SW-RTN W8A8 + outlier ch.",
    "sw-w8a8-azp": "SW-RTN W8A8 + outlier ch., first in the zero-point epilogue",
    "sw-w8a8-noazp": "SW-RTN W8A8 + outlier ch., all as a side product",
    "sw-w8a8-cutlass": "SW-RTN W8A8 + outlier ch., CUTLASS at every batch",
    "sw-w8a8-gsplit": "SW-RTN W8A8 + outlier ch., split fused into x's producer (compiled)",
    # the next two were removed in session 50 (no gain measured); their labels stay for the records they wrote
    "sw-w8a8-gsplit-direct": "SW-RTN W8A8 + outlier ch., split fused, vLLM's CUTLASS ops called directly",
    "sw-w8a8-gdispatch": "SW-RTN W8A8 + outlier ch., split fused, GEMM chosen in the compiled graph",
    "sw-w8a8-t32": "SW-RTN W8A8 + outlier ch., Triton up to 32 tokens in every layer (s13-s42 routing)",
}


KERNEL_SUFFIX = {
    "-fold8": " → held-out terms inside the GEMV up to 8 tokens (spread over its split-K blocks)",
    "-sellpdl0": " → GEMV + SELL kernel as its programmatic dependent at 1-8 tokens (fold=0)",
    "-dq256": " → Humming + SELL up to 255 tokens, then dequantize + cuBLAS",
    "-dq1024": " → Humming + SELL up to 1023 tokens, then dequantize + cuBLAS",
    "-dq384": " → Humming + SELL up to 383 tokens, then dequantize + cuBLAS (s40 default)",
    "-dq96": " → Humming + SELL up to 95 tokens, then dequantize + cuBLAS (s6-s39 default)",
    "-inside4": " → terms inside the GEMV up to 4 tokens, SELL kernel plainly after it at 5-8 (s36-s38 defaults)",
    "-sellpdl": " → SELL kernel as the tensor-core GEMV's programmatic dependent (5-8 tokens)",
    "-mdeq1": " → Marlin + dequantize pair, one W4 copy",
    "-mdeq": " → Marlin + dequantize pair, two W4 copies",
    "-dual": " → Marlin/Machete pair",
    "-fused": " → fused",
    "-gemv": " → GEMV + correction at batch 1",
    "-unroll": " → unrolled SELL correction (session 12's default)",
    "-humming": " → vLLM's Humming backend, one W4 copy",
    "-humgemv-ovl": " → one Humming copy + CUDA GEMV, correction on a side stream beside the GEMM",
    "-humgemv-ranges": " → one Humming copy + CUDA GEMV, one Humming kernel a token range",
    "-humgemv-panel": " → one Humming copy + CUDA GEMV, correction with x in shared memory",
    "-humgemv-mma8": " → one Humming copy + CUDA GEMV, held-out layers' 2-8 tokens on its tensor cores, terms inside",
    "-humgemv": " → one Humming copy, our CUDA GEMV over it at batch 1",
    "-ovl": " → correction on a side stream beside the GEMM",
    "-panel": " → correction with x in shared memory",
    "-mhum": " → Marlin/Humming pair, two W4 copies",
    "-marlin": " → vLLM's Marlin alone, one W4 copy",
    "-cg": " → CUDA GEMV at batch 1, correction after it",
    "-cg1": " → one W4 copy, CUDA GEMV at batch 1",
    "-cgfused": " → CUDA GEMV at batch 1, correction in its epilogue (s23 first form)",
    "-nocg": " → Marlin at batch 1",
    "-cgin": " → CUDA GEMV at batch 1, correction in its epilogue",
    "-cgsell": " → CUDA GEMV at batch 1, correction after it",
    "-cg8": " → one W4 copy, our GEMV up to 8 tokens (tensor cores from 2, held-out layers, terms inside)",
    "-cg8in": " → our GEMV up to 8 tokens, correction inside it",
    "-cgdef": " → CUDA GEMV's launch configuration pinned to the package's (control)",
}


def label(v: str) -> str:
    for suf, text in KERNEL_SUFFIX.items():
        if v.endswith(suf) and v not in LABEL:
            return LABEL.get(v[: -len(suf)], v[: -len(suf)]) + text
    return LABEL.get(v, v)


def kernel_of(r: dict) -> str:
    """The W4 kernels vLLM's log named for the engine ("Machete+Marlin(M<=48)"), each with the first layer that
    took it when the engine chose more than one (e.g. q/k/v with a hold-out, the others without), or "–"."""
    found = []
    for k in r.get("kernels") or []:
        if k.startswith("W4 linears: "):
            kernel, _, first = k[len("W4 linears: ") :].partition(" (first: ")
            found.append((kernel, first.rstrip(")").rsplit(".", 1)[-1]))
    if len(found) == 1:
        return found[0][0]
    return " / ".join(f"{kernel} ({where})" for kernel, where in found) or "–"


def variant_of(r: dict) -> str:
    if r.get("variant"):
        return r["variant"]
    m = r["method"]
    if m.startswith("superweight_rtn"):
        v = f"sw-w{r.get('bits')}" + ("a8" if r.get("activations", "none") != "none" else "")
        if r.get("bits") == 4:
            v += "-" + ("channel" if r.get("block") == "channel" else f"g{r.get('block')}")
        if r.get("holdout"):
            v += "-holdout"
        if m.endswith("no_sw"):
            v += "-nosw"
        return v
    return m


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def load(path: str) -> list[dict]:
    """The records of ``path``, the latest per (variant, config)."""
    return latest_records(read_records(path))


def latest_records(recs: list[dict]) -> list[dict]:
    """The latest record per (variant, config) of a records file's list."""
    latest: dict = OrderedDict()
    for r in recs:
        kind = r.get("kind") or ("latency" if r.get("latency_s") and r.get("batch", 0) <= 256 else "throughput")
        key = (variant_of(r), kind, r["input_len"], r["output_len"], r["batch"] if kind != "throughput" else 0)
        latest[key] = dict(r, kind=kind, variant=variant_of(r))
    return list(latest.values())


def engines_table(raw: list[dict]) -> str:
    """Markdown: every engine of a merged lease (records with ``lease_call``; ``raw`` = the file's records, not
    deduplicated) -- latency per batch and saturated throughput per (in, out) -- then each method's mean and the
    ratio to SmoothQuant's (or AWQ's) mean (latency: baseline / this; throughput: this / baseline). "" when no record
    has ``lease_call``."""
    recs = [dict(r, variant=variant_of(r)) for r in raw if "lease_call" in r]
    if not recs:
        return ""
    engines: dict = OrderedDict()
    for r in recs:
        lat = r.get("kind") == "latency"
        col = ("latency", r["batch"]) if lat else ("throughput", r["input_len"], r["output_len"])
        engines.setdefault((r["variant"], r["lease_call"]), {})[col] = r.get("latency_s" if lat else "tokens_per_s")
    cols = sorted({c for vals in engines.values() for c in vals}, key=lambda c: (c[0] != "latency", c[1:]))
    head = [f"batch {c[1]} (s)" if c[0] == "latency" else f"{c[1]} / {c[2]} (tok/s)" for c in cols]
    lines = [
        "## Every engine of the lease (call order), means and ratios",
        "",
        "| method | call | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    fmt = lambda c, v: "–" if v is None else (f"{v:.3f}" if c[0] == "latency" else f"{v:,.0f}")  # noqa: E731
    for (v, call), vals in engines.items():
        lines.append(f"| {label(v)} | {call} | " + " | ".join(fmt(c, vals.get(c)) for c in cols) + " |")
    means: dict = OrderedDict()
    for v in ordered(v for v, _ in engines):
        per = [vals for (vv, _), vals in engines.items() if vv == v]
        means[v] = {}
        for c in cols:
            xs = [p[c] for p in per if p.get(c) is not None]
            means[v][c] = sum(xs) / len(xs) if xs else None
    base = next((b for b in ("smoothquant", "awq") if b in means), None)
    lines += ["", "| method (engines) | " + " | ".join(head) + (f" | × {label(base)} (mean)" if base else "") + " |"]
    lines.append("|---|" + "---|" * (len(cols) + (1 if base else 0)))
    for v, mv in means.items():
        n = sum(1 for vv, _ in engines if vv == v)
        row = f"| {label(v)} ({n}) | " + " | ".join(fmt(c, mv[c]) for c in cols)
        if base:
            ratios = []
            for c in cols:
                a, b = mv[c], means[base][c]
                if a is None or b is None:
                    ratios.append("–")
                else:
                    ratios.append(f"{(b / a) if c[0] == 'latency' else (a / b):.3f}")
            row += " | " + " / ".join(ratios)
        lines.append(row + " |")
    return "\n".join(lines) + "\n"


def read_dmon(path: str, day_of: float) -> list[tuple[float, float, float]]:
    """``nvidia-smi dmon -s pc -o T`` lines (gpu_run.sh's SW_DMON log) as (epoch s, power W, SM clock MHz). dmon
    prints the time of day only: the date is the UTC day of ``day_of`` (an epoch second of the same lease; the GPU
    machine runs in UTC), a day added where the clock wraps past midnight."""
    import datetime as dt

    base = dt.datetime.fromtimestamp(day_of, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    rows: list[tuple[float, float, float]] = []
    prev, extra = -1.0, 0.0
    with open(path) as f:
        for ln in f:
            parts = ln.split()
            if ln.startswith("#") or len(parts) < 7 or parts[2] == "-" or parts[6] == "-":
                continue
            h, m, sec = (int(v) for v in parts[0].split(":"))
            t = h * 3600 + m * 60 + sec
            if t < prev:
                extra += 86400.0
            prev = t
            rows.append((base.timestamp() + extra + t, float(parts[2]), float(parts[6])))
    return rows


def power_table(raw: list[dict], dmon: dict) -> str:
    """Markdown: every latency repeat of each engine with the GPU's mean power over it and the lowest SM clock
    (``dmon``: lease call -> rows of ``read_dmon``, or None -> rows for records without ``lease_call``). A repeat
    that draws less power at the same clocks left the GPU idle longer (host-side time), where a throttled one runs
    at lower clocks. "" without matching records."""
    lines = []
    for r in raw:
        rows = dmon.get(r.get("lease_call"))
        starts = r.get("latency_starts") or []
        if rows is None or r.get("kind") != "latency" or not starts:
            continue
        cells, clocks = [], []
        for start, dur in zip(starts, r.get("latencies") or []):
            w = [(p, c) for t, p, c in rows if start - 0.5 < t <= start + dur]  # 1 s samples: 1-2 a repeat
            if w:
                cells.append(f"{dur:.3f} ({sum(p for p, _ in w) / len(w):.0f})")
                clocks.append(min(c for _, c in w))
            else:
                cells.append(f"{dur:.3f} (–)")
        lo = f"{min(clocks):.0f}" if clocks else "–"
        call = r.get("lease_call", "–")
        lines.append(f"| {label(variant_of(r))} | {call} | {r['batch']} | {' · '.join(cells)} | {lo} |")
    if not lines:
        return ""
    head = [
        "## GPU power and clock during each latency repeat (nvidia-smi dmon, 1 s samples)",
        "",
        "| method | call | batch | repeats: s (mean W) | lowest SM MHz |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def ordered(variants):
    return sorted(set(variants), key=lambda v: (ORDER.index(v) if v in ORDER else len(ORDER), v))


def table(recs):
    gpus = sorted({r.get("gpu", "?") for r in recs})
    vllms = sorted({r.get("vllm", "?") for r in recs})
    layers = sorted({SHAPES[r.get("shape", DEFAULT_SHAPE)]["layers"] for r in recs})
    lines = [
        "# Throughput and latency",
        "",
        f"GPU: **{', '.join(gpus)}** · vLLM {', '.join(vllms)} · random-weight Llama-2-7B-shaped model "
        f"(hidden 4096, intermediate 11008, {' / '.join(map(str, layers))} layers); generated by "
        "`benchmarks/throughput.py`, plotted by `benchmarks/plot_throughput.py`.",
        "",
    ]
    thr = [r for r in recs if r["kind"] == "throughput"]
    lat = [r for r in recs if r["kind"] == "latency"]
    by = {
        (r["variant"], r["input_len"], r["output_len"], r["batch"] if r["kind"] == "latency" else 0, r["kind"]): r
        for r in recs
    }
    if thr:
        pairs = sorted({(r["input_len"], r["output_len"]) for r in thr}, key=lambda p: -p[0])
        n_prompts = {(r["input_len"], r["output_len"]): r["num_prompts"] for r in reversed(thr)}
        lines += ["## Offline throughput (total tokens/s; random prompts, ignore_eos)", ""]
        mem = any(r.get("weights_gib") for r in thr)
        hdr = (
            "| method | bits | block | hold-out | "
            + ("W4 kernel | weights (GiB) | KV-cache tokens | " if mem else "")
            + " | ".join(f"in {a} / out {b} (n={n_prompts[(a, b)]})" for a, b in pairs)
            + " | vs AWQ | vs SmoothQuant |"
        )
        lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for v in ordered(r["variant"] for r in thr):
            row = next(r for r in thr if r["variant"] == v)
            cells = []
            ratios_awq, ratios_sq = [], []
            for a, b in pairs:
                r = by.get((v, a, b, 0, "throughput"))
                cells.append(f"{r['tokens_per_s']:,.0f}" if r else "–")
                for base, acc in (("awq", ratios_awq), ("smoothquant", ratios_sq)):
                    rb = by.get((base, a, b, 0, "throughput"))
                    if r and rb:
                        acc.append(r["tokens_per_s"] / rb["tokens_per_s"])
            fmt = lambda xs: " / ".join(f"{x:.2f}×" for x in xs) or "–"  # noqa: E731
            extra = ""
            if mem:
                kv = row.get("kv_cache_tokens")
                extra = f"{kernel_of(row)} | {row.get('weights_gib') or '–'} | " + (f"{kv:,}" if kv else "–") + " | "
            lines.append(
                f"| {label(v)} | {row.get('bits')} | {row.get('block') or '–'} | "
                f"{row.get('holdout') or 0:g} | " + extra + " | ".join(cells) + f" | {fmt(ratios_awq)} | "
                f"{fmt(ratios_sq)} |"
            )
        lines.append("")
    if lat:
        cfgs = sorted({(r["input_len"], r["output_len"], r["batch"]) for r in lat}, key=lambda c: (c[0], c[1], c[2]))
        lines += ["## Latency (s per batch generated to completion; lower is better)", ""]
        # a run without offline-throughput records has no memory table above: its weight memory and KV-cache
        # tokens (vLLM's log) go here, as does the date of each row (rows of several leases can share a table)
        mem = not thr and any(r.get("weights_gib") for r in lat)
        hdr = (
            "| method | "
            + ("W4 kernel | weights (GiB) | KV-cache tokens | " if mem else "")
            + " | ".join(f"batch {c} (in {a} / out {b})" for a, b, c in cfgs)
            + " | vs AWQ (AWQ's time / this one's, per batch) |"
            + (" measured |" if mem else "")
        )
        lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for v in ordered(r["variant"] for r in lat):
            cells, ratios = [], []
            for a, b, c in cfgs:
                r = by.get((v, a, b, c, "latency"))
                cells.append(f"{r['latency_s']:.3f} ({1000 * r['latency_s'] / b:.2f} ms/tok)" if r else "–")
                ra = by.get(("awq", a, b, c, "latency"))
                if r and ra and v != "awq":
                    ratios.append(f"{ra['latency_s'] / r['latency_s']:.3f}×")
            row = next(r for r in lat if r["variant"] == v)
            extra = ""
            if mem:
                kv = row.get("kv_cache_tokens")
                extra = f"{kernel_of(row)} | {row.get('weights_gib') or '–'} | " + (f"{kv:,}" if kv else "–") + " | "
            when = f" {str(row.get('time', '–'))[:16]} |" if mem else ""
            lines.append(f"| {label(v)} | " + extra + " | ".join(cells) + f" | {' / '.join(ratios) or '–'} |" + when)
        lines.append("")
    return "\n".join(lines) + "\n"


def lease_times(recs, gap_h: float = 1.0) -> dict[str, str]:
    """Each variant's first record time (" · MM-DD HH:MM") where the records span more than ``gap_h`` hours (several
    leases in one plot), else nothing."""
    import datetime as dt

    first: dict[str, dt.datetime] = {}
    for r in recs:
        try:
            t = dt.datetime.strptime(str(r.get("time", ""))[:16], "%Y-%m-%d %H:%M")
        except ValueError:
            continue
        first[r["variant"]] = min(t, first.get(r["variant"], t))
    if not first or max(first.values()) - min(first.values()) <= dt.timedelta(hours=gap_h):
        return {}
    return {v: t.strftime(" · %m-%d %H:%M") for v, t in first.items()}


def log_axis(values: list[float]) -> bool:
    """Latencies on a log axis only where they span more than 2x (batches 1 to 64 side by side); a single batch
    size's engines, a few % apart, go on a linear axis from 0 (a log axis over 2.09-2.22 s drew 5 % as a wall)."""
    return bool(values) and max(values) > 2 * min(values)


def plot(recs, png: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [r for r in recs if r["kind"] == "throughput"]
    lat = [r for r in recs if r["kind"] == "latency"]
    gpus = ", ".join(sorted({r.get("gpu", "?") for r in recs}))
    # one colour per method in both panels (a method measured in only one of them keeps its colour)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {v: palette[i % len(palette)] for i, v in enumerate(ordered(r["variant"] for r in recs))}
    panels = [
        (
            thr,
            "tokens_per_s",
            "Offline throughput",
            "total tokens/s",
            lambda r: f"in {r['input_len']}/out {r['output_len']}",
        ),
        (
            lat,
            "latency_s",
            "Latency (in/out as labelled)",
            "seconds per batch",
            lambda r: f"batch {r['batch']} (in {r['input_len']}/out {r['output_len']})",
        ),
    ]
    panels = [p for p in panels if p[0]]  # a run of one kind only: one panel, no empty half
    # rows measured in different leases (hours apart) say when, so no one reads them as one lease's comparison
    when = lease_times(recs)
    fig, grid = plt.subplots(1, max(1, len(panels)), figsize=(7.5 * max(1, len(panels)), 5.5), squeeze=False)
    axes = list(grid[0])
    for ax, (rs, key, title, ylabel, group) in zip(axes, panels):
        variants = ordered(r["variant"] for r in rs)
        groups = list(
            OrderedDict.fromkeys(
                group(r)
                for r in sorted(rs, key=lambda r: (r["batch"] if r["kind"] == "latency" else 0, -r["input_len"]))
            )
        )
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            xs, ys = [], []
            for j, g in enumerate(groups):
                r = next((r for r in rs if r["variant"] == v and group(r) == g), None)
                if r:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=label(v) + when.get(v, ""), color=colour[v])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_title(f"{title} — {gpus}")
        ax.set_ylabel(ylabel)
        if key == "latency_s" and log_axis([r[key] for r in rs if r.get(key)]):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # as many legend columns as fit the figure's width (fontsize 8: ~14 characters an inch)
    ncol = min(5, max(1, len(labels)))
    while ncol > 1 and max(len(lab) for lab in labels) * ncol > 14 * fig.get_figwidth():
        ncol -= 1
    rows = -(-len(labels) // ncol) if labels else 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, min(0.45, 0.04 + 0.045 * rows), 1, 1))
    fig.savefig(png, dpi=120)
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "throughput.json"))
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="throughput", help="file stem of the table and plot")
    ap.add_argument(
        "--dmon",
        action="append",
        default=[],
        metavar="[CALL=]PATH",
        help="gpu_run.sh's SW_DMON log (of lease call CALL of a merged file): power and clock per latency repeat",
    )
    args = ap.parse_args()
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.json))
    raw = read_records(args.json)
    recs = latest_records(raw)
    if not recs:
        print("no records", file=sys.stderr)
        return 1
    os.makedirs(out_dir, exist_ok=True)
    md = table(recs)
    prof = profile_table(recs)  # throughput.py --profile-batches: where a decode step's GPU time goes
    if prof:
        md += "\n" + prof
    every = engines_table(raw)
    if every:
        md += "\n" + every
    if args.dmon:
        day = next((r["latency_starts"][0] for r in raw if r.get("latency_starts")), None)
        dmon: dict = {}
        for spec in args.dmon:
            call, _, path = spec.rpartition("=")
            dmon[int(call) if call else None] = read_dmon(path, day) if day is not None else []
        power = power_table(raw, dmon)
        if power:
            md += "\n" + power
    with open(os.path.join(out_dir, f"{args.name}.md"), "w") as f:
        f.write(md)
    plot(recs, os.path.join(out_dir, f"{args.name}.png"))
    print(md)
    print(f"wrote {out_dir}/{args.name}.md and {args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
