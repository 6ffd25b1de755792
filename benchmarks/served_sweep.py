#!/usr/bin/env python3
"""Micro-benchmark: what serves a W4 decoder layer at each batch size, M = 1..256 -- issue 12's kernel table.

One Llama-2-7B-shaped decoder layer's four GEMMs (qkv, o, gate_up, down; g128 asymmetric codes, random: speed does not
depend on values), each built through the plugin's kernel classes exactly as an engine builds it, for three engines:

* ``awq``: vLLM's Machete (what AWQ's compressed-tensors W4A16 g128 checkpoint runs on Hopper);
* ``ours``: ``SUPERWEIGHT_W4_KERNEL=auto``, the priority list's choice on this machine (on Hopper with
  ``humming-kernels``: the one Humming copy, our CUDA GEMV for 1-8 tokens);
* ``ours+holdout``: the same with the default preset's placement of the 0.1 % hold-out -- 0.1 % of the layer's
  weights, all of it in q/k/v (0.40 % of that matrix), restored by the kernel's own sparse correction.

Every layer is checked against a float64 reference of its dequantized, restored weights first (M = 1, 8, 64); then
each M is timed as the median of CUDA-graph replays over ``--layers`` copies of the layer (4 x 101 MB of codes:
beyond the L2), per layer. The table gives us a layer, x AWQ, the hold-out's cost over the same engine without it,
and the share of the HBM peak the engine without hold-out reaches (bytes: packed codes + bf16 scales + packed zero
points + x + y; the peak from the device name: H100 3.35 TB/s, H200 4.8 TB/s) -- the M = 1 target is 60 %.

    python benchmarks/served_sweep.py --out $OUT/served_sweep.json [--ms 1,2,4,...] [--layers 4] [--engines ...]
    python benchmarks/served_sweep.py --plot results/served_sweep_X.json     # the table and plot again, here

``--dry-run-cpu`` runs the whole flow on the CPU with small shapes and wall-clock timing (the CPU kernel classes
for every engine: it checks the script, not the kernels). Writes the JSON after every M, a markdown table and
(where matplotlib is installed) a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from kernel_bench import SHAPES, peak_bw  # noqa: E402  (one 7B layer's four GEMMs; HBM peak by device name)

DRY_SHAPES = {"qkv": (384, 256), "o": (256, 256), "gate_up": (512, 256), "down": (256, 384)}
GROUP = 128
DRY_GROUP = 64
#: engine -> (kernel name for tests/vllm_linear.build_mp_layer, hold-out in qkv)
ENGINES = {
    "awq": ("machete", False),
    "ours": ("auto", False),
    "ours+holdout": ("auto", True),
    "marlin": ("marlin", False),  # not timed unless --engines names it: vLLM's Marlin, the M = 1 reference
}
DEFAULT_ENGINES = ("awq", "ours", "ours+holdout")
LABELS = {
    "awq": "AWQ (vLLM's Machete)",
    "ours": "ours, no hold-out",
    "ours+holdout": "ours + 0.1 % hold-out in q/k/v",
    "marlin": "vLLM's Marlin",
}
DEFAULT_MS = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256]
CHECK_MS = (1, 8, 64)
CHECK_TOL = 2e-2
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def peak_tbs(device_name: str, override: float | None = None) -> float:
    return peak_bw(device_name, override)


def weight_bytes(shapes: dict, group: int) -> int:
    """Packed 4-bit codes + bf16 group scales + packed 4-bit zero points of a layer's GEMMs (no hold-out)."""
    return sum(n * k // 2 + n * (k // group) * 2 + n * (k // group) // 2 for n, k in shapes.values())


def layer_bytes(shapes: dict, group: int, m: int) -> int:
    """What one pass over a layer must move at M tokens: the weights once, x and y in bf16."""
    return weight_bytes(shapes, group) + sum(m * (n + k) * 2 for n, k in shapes.values())


def hbm_share(shapes: dict, group: int, m: int, us: float, peak: float) -> float:
    """The fraction of the HBM peak (TB/s) a pass over the layer in ``us`` microseconds reaches."""
    return layer_bytes(shapes, group, m) / (us * 1e-6) / 1e12 / peak


def by_m(rows: list[dict]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.get("us") is not None:
            out.setdefault(int(r["m"]), {})[r["engine"]] = float(r["us"])
    return out


def table(rows: list[dict], meta: dict) -> str:
    """Markdown: a row per M -- us a layer per engine, x AWQ, the hold-out's cost, HBM share of ours."""
    us = by_m(rows)
    marlin = any("marlin" in row for row in us.values())
    peak = meta.get("peak_tbs", float("nan"))
    shapes = meta.get("shapes", SHAPES)
    group = meta.get("group", GROUP)
    head = [
        f"# What serves a W4 decoder layer at each batch size ({meta.get('device', '?')})",
        "",
        f"One Llama-2-7B-shaped layer's four GEMMs (qkv, o, gate_up, down), g{group} asymmetric; us a layer, "
        + (
            "wall clock (a dry run on the CPU: small shapes, the CPU's kernel for every engine). Kernels: "
            if meta.get("dry_run")
            else f"median of CUDA-graph replays over {meta.get('layers')} copies. Kernels: "
        )
        + "; ".join(f"{LABELS.get(e, e)}: `{d}`" for e, d in meta.get("kernels", {}).items())
        + f". Hold-out: {meta.get('nnz')} terms in qkv ({100 * meta.get('density', 0):.2f} % of it, "
        f"0.1 % of the layer). HBM share: the engine without hold-out, {peak} TB/s peak.",
        "",
        "| M | AWQ (µs) | ours (µs) | × AWQ | ours, % of HBM peak | ours + hold-out (µs) | × AWQ | vs no hold-out |"
        + (" Marlin (µs) |" if marlin else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if marlin else ""),
    ]
    out = list(head)
    for m in sorted(us):
        row = us[m]
        a, o, h = row.get("awq"), row.get("ours"), row.get("ours+holdout")

        def f(v):
            return "–" if v is None else f"{v:.1f}"

        def x(base, v):
            return "–" if base is None or v is None else f"{base / v:.3f}"

        hbm = "–"
        if o is not None and peak == peak:
            hbm = f"{100 * hbm_share(shapes, group, m, o, peak):.1f} %"
        cost = "–" if o is None or h is None else f"{100 * (h / o - 1):+.1f} %"
        out.append(
            f"| {m} | {f(a)} | {f(o)} | {x(a, o)} | {hbm} | {f(h)} | {x(a, h)} | {cost} |"
            + (f" {f(row.get('marlin'))} |" if marlin else "")
        )
    checks = [r for r in rows if "check_rel" in r]
    if checks:
        worst = max(checks, key=lambda r: r["check_rel"])
        out += [
            "",
            f"Checked first against float64 (dequantized codes, held-out values restored), M = "
            f"{', '.join(str(m) for m in sorted({r['m'] for r in checks}))}: worst relative error "
            f"{worst['check_rel']:.2e} ({worst['engine']}, {worst['shape']}, M = {worst['m']}).",
        ]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], meta: dict, png: str) -> bool:
    """us a layer against M (log-log) per engine, and x AWQ below; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    us = by_m(rows)
    ms = sorted(us)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    lines = (("awq", "s-", "C0"), ("ours", "o-", "C1"), ("ours+holdout", "^--", "C2"), ("marlin", "x:", "C3"))
    for eng, style, color in lines:
        pts = [(m, us[m][eng]) for m in ms if eng in us[m]]
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=LABELS[eng])
        if eng != "awq":
            rel = [(m, us[m]["awq"] / us[m][eng]) for m in ms if eng in us[m] and "awq" in us[m]]
            if rel:
                bx.plot(*zip(*rel), style, color=color, label=LABELS[eng])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("µs a 7B layer (4 GEMMs)")
    ax.set_title(f"W4 layer by batch size, {meta.get('device', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    bx.axhline(1.0, color="grey", lw=1)
    bx.set_ylabel("× AWQ (higher is faster)")
    bx.set_xlabel("tokens in the batch (M)")
    bx.grid(True, which="both", alpha=0.3)
    bx.set_xticks(ms)
    bx.set_xticklabels([str(m) for m in ms])
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def write(out: str, rows: list[dict], meta: dict, with_plot: bool = False) -> None:
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta["elapsed_s"] = round(time.time() - T0, 1)
    with open(out + ".tmp", "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1, default=str)
    os.replace(out + ".tmp", out)
    base = os.path.splitext(out)[0]
    with open(base + ".md.tmp", "w") as fh:
        fh.write(table(rows, meta))
    os.replace(base + ".md.tmp", base + ".md")
    if with_plot and plot(rows, meta, base + ".png.tmp.png"):
        os.replace(base + ".png.tmp.png", base + ".png")


def build(engines: list[str], layers: int, shapes: dict, group: int, nnz: int, holdout: float, dev, dry: bool):
    """engine -> [ {shape: (layer, kernel, weights, sparse)} per layer copy ]; the same codes for every engine. A
    held-out engine's every GEMM gets the checkpoint's hold-out fraction in its config, as the scheme hands it (the
    ``auto`` choice reads it), and the terms themselves in qkv only (the default preset's placement)."""
    import vllm_linear as VL

    built: dict[str, list[dict]] = {}
    for eng in engines:
        kname, held = ENGINES[eng]
        if dry:
            kname = "auto"  # the CPU's own choice stands in for every engine (script check only)
        copies = []
        for li in range(layers):
            lay = {}
            for name, (n, k) in shapes.items():
                sp = VL.random_holdout(n, k, nnz, seed=li) if held and name == "qkv" else None
                w = VL.random_w4(n, k, group, False, dev, seed=li * 7 + n + k, holdout=None if sp is None else sp[:2])
                layer, kobj = VL.build_mp_layer(w, kname, sparse=sp, holdout=holdout if held else 0.0)
                if sp is not None and not (getattr(kobj, "sp", None) or getattr(kobj, "sparse_keys", None)):
                    raise SystemExit(f"served_sweep: {eng} {name}: the held-out terms found no correction path")
                lay[name] = (layer, kobj, w, sp)
            copies.append(lay)
        built[eng] = copies
        log(f"built {eng}: {layers} x {len(shapes)} GEMMs, {copies[0]['qkv'][1].describe()}")
    return built


def check(built: dict, ms, dev, rows: list[dict]) -> None:
    """Layer copy 0 of every engine against float64 of its dequantized codes with the held-out values restored."""
    import torch
    import vllm_linear as VL

    for eng, copies in built.items():
        for name, (layer, kobj, w, sp) in copies[0].items():
            ref_w = VL.dequant_w4(w).double()
            if sp is not None:
                r, c, v = sp
                ref_w[r.to(ref_w.device), c.to(ref_w.device)] = v.double().to(ref_w.device)
            for m in ms:
                x = torch.randn(m, w["k"], device=dev).to(torch.bfloat16)
                ref = x.double() @ ref_w.T
                y = kobj.apply_weights(layer, x).double()
                rel = float((y - ref).norm() / ref.norm())
                rows.append({"engine": eng, "shape": name, "m": m, "check_rel": rel})
                if not rel < CHECK_TOL:
                    raise SystemExit(f"served_sweep: {eng} {name} M={m} is off float64 by {rel:.3g}")


def timer(dry: bool):
    if dry:

        def wall(fn, iters: int) -> float:
            ts = []
            for _ in range(max(3, min(iters, 5))):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e6)
            return statistics.median(ts)

        return wall
    from w4_fused_bench import time_graph

    return time_graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON path (the table .md and plot .png beside it)")
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",") if v], default=DEFAULT_MS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--holdout", type=float, default=1e-3, help="fraction of the layer's weights, all in qkv")
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"any of {','.join(ENGINES)}")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop timing new batch sizes after this")
    ap.add_argument("--peak-bw", type=float, default=None, help="TB/s (default: from the device name)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="small shapes on the CPU: checks the script only")
    ap.add_argument("--plot", metavar="JSON", help="only re-write the table and plot of an earlier run's JSON")
    args = ap.parse_args(argv)

    if args.plot:
        with open(args.plot) as fh:
            rec = json.load(fh)
        base = os.path.splitext(os.path.abspath(args.plot))[0]
        with open(base + ".md", "w") as fh:
            fh.write(table(rec["results"], rec["meta"]))
        drew = plot(rec["results"], rec["meta"], base + ".png")
        log(f"wrote {base}.md" + (f" and {base}.png" if drew else " (no matplotlib: no plot)"))
        return 0
    if not args.out:
        ap.error("--out is required (or --plot JSON)")
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {sorted(ENGINES)}")

    import torch

    dry = args.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        raise SystemExit("served_sweep: needs a CUDA GPU (vLLM's Machete and the plugin's CUDA kernels); --dry-run-cpu")
    dev = torch.device("cpu" if dry else "cuda")
    shapes = DRY_SHAPES if dry else SHAPES
    group = DRY_GROUP if dry else GROUP
    layers = 1 if dry else args.layers
    weights = sum(n * k for n, k in shapes.values())
    nnz = round(args.holdout * weights)
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": name,
        "peak_tbs": peak_tbs(name, args.peak_bw),
        "shapes": shapes,
        "group": group,
        "layers": layers,
        "nnz": nnz,
        "density": nnz / (shapes["qkv"][0] * shapes["qkv"][1]),
        "holdout": args.holdout,
        "torch": torch.__version__,
        "dry_run": dry,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SUPERWEIGHT_")},
    }
    rows: list[dict] = []
    built = build(engines, layers, shapes, group, nnz, args.holdout, dev, dry)
    meta["kernels"] = {e: c[0]["qkv"][1].describe() for e, c in built.items()}
    meta["kernels_by_shape"] = {e: {nm: t[1].describe() for nm, t in c[0].items()} for e, c in built.items()}
    check(built, (1, 3) if dry else CHECK_MS, dev, rows)
    log(f"check: every engine's GEMMs within {CHECK_TOL} of float64")
    write(args.out, rows, meta)

    time_fn = timer(dry)
    xs_k = {name: k for name, (n, k) in shapes.items()}
    for m in args.ms:
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: M = {m} and on not measured")
            meta["stopped_at_m"] = m
            break
        xs = {nm: torch.randn(m, k, device=dev).to(torch.bfloat16) for nm, k in xs_k.items()}
        got = {}
        for eng, copies in built.items():

            def run(cs=copies):
                for lay in cs:
                    for nm in shapes:
                        layer, kobj, _, _ = lay[nm]
                        kobj.apply_weights(layer, xs[nm])

            try:
                us = time_fn(run, args.iters) / len(copies)
            except Exception as e:  # noqa: BLE001  (record and go on: the other engines' numbers still count)
                rows.append({"engine": eng, "m": m, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"})
                log(f"M={m} {eng} failed: {type(e).__name__}: {e}")
                continue
            rows.append({"engine": eng, "m": m, "us": us})
            got[eng] = us
        log(f"M={m:4d}  " + "  ".join(f"{e} {v:8.1f} us" for e, v in got.items()))
        write(args.out, rows, meta)
    o1 = by_m(rows).get(1, {}).get("ours")
    if o1 and not math.isnan(meta["peak_tbs"]):
        share = hbm_share(shapes, group, 1, o1, meta["peak_tbs"])
        meta["ours_m1_hbm_share"] = round(share, 4)
        log(f"M = 1: ours {o1:.1f} us a layer = {100 * share:.1f} % of the HBM peak (target 60 %)")
    elif math.isnan(meta["peak_tbs"]):
        log("peak bandwidth unknown for this device: no HBM share (--peak-bw)")
    write(args.out, rows, meta, with_plot=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
