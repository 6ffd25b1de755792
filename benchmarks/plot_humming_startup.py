"""Plot Humming's first call a 7B layer shape: the H200 profile (humming_startup.py) beside the CPU stand-in
(diag/humming_startup_cpu.py), with Humming's pyelftools lookups and with kernels/cubin.py's.

    python benchmarks/plot_humming_startup.py --h200 'benchmarks/results/humming_startup_s31_{}_h200.json' \
        --cpu benchmarks/results/humming_startup_s31_cpu.json --out benchmarks/results/humming_startup_s31.png
"""

from __future__ import annotations

import argparse
import json
import os


def bars(h200_pattern: str, cpu_path: str) -> tuple[list[str], dict[str, list[float]]]:
    """Shapes and, per series label, the seconds of each shape's first call."""
    series: dict[str, list[float]] = {}
    shapes: list[str] = []
    for tag, label in (
        ("cold", "H200, pyelftools, cold"),
        ("warm", "H200, pyelftools, warm"),
        ("ranges", "H200, 8 ranges, warm"),
    ):
        path = h200_pattern.format(tag)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = json.load(f)["shapes"]
        shapes = shapes or [r["shape"] for r in rows]
        series[label] = [next(r["first_call_s"] for r in rows if r["shape"] == s) for s in shapes]
    if cpu_path and os.path.exists(cpu_path):
        with open(cpu_path) as f:
            passes = json.load(f)["passes"]
        shapes = shapes or list(dict.fromkeys(p["shape"] for p in passes))
        for reader, name in (("slow", "pyelftools"), ("fast", "kernels/cubin.py")):
            for cache in ("cold", "warm"):
                got = {p["shape"]: p["seconds"] for p in passes if p["reader"] == reader and p["cache"] == cache}
                if got:
                    series[f"CPU stand-in, {name}, {cache}"] = [got.get(s, 0.0) for s in shapes]
    return shapes, series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--h200", default="benchmarks/results/humming_startup_s31_{}_h200.json")
    ap.add_argument("--cpu", default="benchmarks/results/humming_startup_s31_cpu.json")
    ap.add_argument("--out", default="benchmarks/results/humming_startup_s31.png")
    args = ap.parse_args()
    shapes, series = bars(args.h200, args.cpu)
    if not series:
        raise SystemExit("no records found")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(shapes))]
        b = ax.bar(xs, vals, width, label=label)
        ax.bar_label(b, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("first call of the shape (s)")
    ax.set_title("Humming's kernel table for a Llama-2-7B layer shape (92 kernels): where the start-up went")
    ax.set_ylim(0, 1.4 * max(max(v) for v in series.values()))
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.set_xlabel("H200 passes under cProfile (s31); CPU stand-in: 2-core EPYC, NVRTC sm_90a, GPU stubbed", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
