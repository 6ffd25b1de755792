#!/usr/bin/env python3
"""Micro-benchmark: the separate SELL correction of the default preset's hold-out (q/k/v only) at 2-64 tokens.

Why: with the 0.1 % hold-out spent in q/k/v (preset ``default``), a 7B layer's ``qkv_proj`` (12288 x 4096) carries
~202 k held-out terms (0.40 % of its weights), and between 2 and 95 tokens they are added by the SELL kernel after
the W4 GEMM (``kernels/triton_sparse.py``). End to end that costs +7.4 % at batch 64 (session 26; issue 12 wants
<= 5 %), ~18 us a layer. This benchmark times that kernel after vLLM's Marlin on the same shape, for launch
variants (``SparseTiles``: tokens per program, where the transposed path starts, warps) and layout variants (slice
depth, lanes: a load-time choice, reported only), checks each variant against a float64 reference first, and can
write the fastest launch variant as ``SUPERWEIGHT_SPARSE_TILES`` (``--recommend-env``; only where it beat the
default by > 2 % summed over the batches and lost nowhere by > 3 %).

    python benchmarks/sparse_bench.py --out $OUT/sparse_bench.json [--layers 4] [--ms 2,4,8,16,32,48,64]
    python benchmarks/sparse_bench.py --dry-run-cpu          # tiny shapes through the Triton interpreter
    ... --profile-ms 8,64    # then each kernel's device time per layer (torch.profiler): s28 measured the held-out
                             # engine's batch-64 gap at 17.7 us a layer against this bench's 14.5 -- the split
                             # between kernels and the time between them says which one to attack

With ``--panel`` (default on) the shared-memory SELL kernel (``kernels/cuda_sell.py``, ``SUPERWEIGHT_SPARSE_PANEL``)
is timed beside the Triton one on the same layouts: rows ``marlin+panel NAME`` for its launch variants
(``panel_variants``: token block, warps a block), checked against the same float64 reference first.

Layers: ``--layers`` copies (default 4: 4 x 25 MB of W4 codes, beyond the 60 MB L2) of a random g128 asymmetric
qkv layer with random held-out positions (speed does not depend on values). Timing: median of CUDA-graph replays
of all copies, per layer (``w4_fused_bench.time_graph``). JSON after every batch size, markdown table beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

if "--dry-run-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from vllm_linear import random_holdout  # noqa: E402  (tests/: the same hold-out as the other benchmarks)

LLAMA7B_LAYER_WEIGHTS = 12288 * 4096 + 4096 * 4096 + 22016 * 4096 + 4096 * 11008  # one layer's W4 weights
SELL_ORDER = ("ell_cols", "ell_vals", "ell_rb", "hrows", "hptr", "hcols", "hvals", "ucols")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def tile_variants(default) -> dict:
    """Launch variants, one knob away from the default each (name -> SparseTiles)."""
    r = dataclasses.replace
    return {
        "default": default,
        "bmt8": r(default, bm_transposed=8),
        "bmt32": r(default, bm_transposed=32),
        "bmt64": r(default, bm_transposed=64),
        "tmin8": r(default, transpose_min_m=8),
        "tmin32": r(default, transpose_min_m=32),
        "bmd1": r(default, bm_direct=1),
        "bmd4": r(default, bm_direct=4),
        "w1": r(default, warps=1),  # direct path (2..15 tokens)
        "w4": r(default, warps=4),
        "wt2": r(default, warps_t=2),  # transposed path (16+ tokens); 2 = derived from the tile, the default until s27
        "wt8": r(default, warps_t=8),
    }


def layout_jobs(variants: dict, layouts: list[str]) -> list[tuple[str, str]]:
    """The (layout, launch variant) pairs checked and timed: every variant on "L", the default launch on every other
    layout."""
    jobs = [("L", t) for t in variants if "L" in layouts]
    return jobs + [(ln, "default") for ln in layouts if ln != "L" and "default" in variants]


def panel_variants(max_m: int = 0) -> dict:
    """The shared-memory kernel's launch variants (name -> ``cuda_sell.PanelConfig``), one knob away from its default
    each: token blocks of at most 16 (default) or 8 tokens, 8 (default), 4 or 16 warps a block, 64 blocks in all.
    ``max_m`` above the kernel's own limit (96 tokens) raises every variant's, so batches of up to ``max_m`` tokens
    (s40's question: 128-256, where a block's panel copy replaces the most gathered bytes) are timed, not refused."""
    from vllm_superweight.kernels import cuda_sell as CS

    top = {"max_m": max_m} if max_m > CS.DEFAULT_MAX_M else {}
    return {
        "default": CS.PanelConfig(**top),
        "mb8": CS.PanelConfig(mb=8, **top),
        "w4": CS.PanelConfig(warps=4, **top),
        "w16": CS.PanelConfig(warps=16, **top),
        "b64": CS.PanelConfig(blocks=64, **top),  # half the panel copies at 64 tokens (one block every other SM)
    }


def panel_env(cfg) -> str:
    """``SUPERWEIGHT_SPARSE_PANEL`` for ``cfg``: the fields that differ from the default, or 1."""
    from vllm_superweight.kernels import cuda_sell as CS

    d = CS.PanelConfig()
    parts = [
        f"{f.name}={getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(d, f.name)
    ]
    return ",".join(parts) or "1"


def tiles_env(t, default) -> str:
    """SUPERWEIGHT_SPARSE_TILES for ``t``: the fields that differ from ``default``."""
    from vllm_superweight import envs

    keys = {field: key for key, field in envs._TILE_KEYS.items()}  # the env's own names
    return ",".join(f"{k}={getattr(t, f)}" for f, k in keys.items() if getattr(t, f) != getattr(default, f))


def recommend(us: dict, ms: list[int], default_name: str = "default", gain: float = 0.02, worst: float = 0.03):
    """The launch variant the measurements argue for: ``us[name][m]`` (us per layer, GEMM + correction). A variant
    qualifies if it ran at every M in ``ms``, its sum is more than ``gain`` below the default's and it is nowhere
    more than ``worst`` slower than the default. Returns (name or None, {name: sum})."""
    base = us.get(default_name, {})
    if not all(m in base for m in ms):
        return None, {}
    sums = {name: sum(v[m] for m in ms) for name, v in us.items() if all(m in v for m in ms)}
    ok = {
        name: s
        for name, s in sums.items()
        if name != default_name
        and s < (1 - gain) * sums[default_name]
        and all(us[name][m] <= (1 + worst) * base[m] for m in ms)
    }
    return (min(ok, key=ok.get) if ok else None), sums


def recommend_from_m(us: dict, ms: list[int], default_name: str = "default"):
    """Where no variant wins over every M (``recommend``), the smallest measured M from which one does (same rule over
    the batches from there up): ``(from_m, name)``, or ``(None, None)``; its env then gets ``FROM_M:``."""
    ms = sorted(ms)
    for i in range(1, len(ms)):
        best, _ = recommend(us, ms[i:], default_name)
        if best:
            return ms[i], best
    return None, None


def combine(names: list[str], variants: dict, default):
    """One SparseTiles taking every named variant's changed fields (later names win on a clash)."""
    out = default
    for name in names:
        t = variants[name]
        changed = {
            f.name: getattr(t, f.name) for f in dataclasses.fields(t) if getattr(t, f.name) != getattr(default, f.name)
        }
        out = dataclasses.replace(out, **changed)
    return out


class Bench:
    def __init__(self, args):
        from vllm_superweight.kernels import triton_sparse as TS

        self.TS, self.args = TS, args
        self.dry = args.dry_run_cpu
        self.dev = torch.device("cpu" if self.dry else "cuda")
        self.n, self.k = (192, 256) if self.dry else (12288, 4096)
        self.nnz = args.nnz or round(args.holdout * (LLAMA7B_LAYER_WEIGHTS if not self.dry else self.n * self.k * 4))
        self.rows: list[dict] = []
        self.meta: dict = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": "cpu-dry-run" if self.dry else torch.cuda.get_device_name(),
            "shape": [self.n, self.k],
            "nnz": self.nnz,
            "density": self.nnz / (self.n * self.k),
            "layers": args.layers,
            "torch": torch.__version__,
            "gemm": args.gemm,
        }
        self.marlin = None
        self.panels: dict = {}  # the shared-memory kernel's variants timed (set by run)
        if not self.dry and not args.no_vllm:
            try:
                import vllm
                import vllm_linear as VL

                self.marlin, self.meta["vllm"] = VL, vllm.__version__
            except Exception as e:  # noqa: BLE001
                self.meta["vllm"] = f"unavailable: {type(e).__name__}: {e}"

    def left(self) -> float:
        return self.args.budget_s - (time.time() - T0)

    def save(self) -> None:
        out = os.path.abspath(self.args.out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.meta["elapsed_s"] = round(time.time() - T0, 1)
        with open(out + ".tmp", "w") as f:
            json.dump({"meta": self.meta, "results": self.rows}, f, indent=1, default=str)
        os.replace(out + ".tmp", out)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(table(self.rows, self.meta))

    def build(self):
        import vllm_superweight.kernels as K

        n, k = self.n, self.k
        self.layers = []
        variants: dict = {}
        for li in range(self.args.layers):
            r, c, v = random_holdout(n, k, self.nnz, seed=li)
            lay = {"r": r, "c": c, "v": v, "marlin": None, "sell": {}}
            if self.marlin is not None:
                w = self.marlin.random_w4(n, k, 128, False, self.dev, seed=li, holdout=(r, c))
                lay["marlin"] = self.marlin.build_mp_layer(w, self.args.gemm)
            variants = variants or self.layout_kwargs(r)  # from the first layer's rows, used for all
            for name, kw in variants.items():
                lay["sell"][name] = K.prepare_sparse(r, c, v, n, k, self.dev, layout="sell", pack=torch.bfloat16, **kw)
            self.layers.append(lay)
        from vllm_superweight.kernels.sparse_layout import layout_stats

        self.meta["layouts"] = {name: layout_stats(sp) for name, sp in self.layers[0]["sell"].items()}
        log(f"built {len(self.layers)} layers, {self.nnz} entries each; layouts {self.meta['layouts']}")

    def layout_kwargs(self, rows: torch.Tensor) -> dict:
        """Layout variants from one layer's held-out rows: the load-time default and deeper slices (fewer heavy
        rows), other lane counts."""
        from vllm_superweight.kernels.sparse_layout import choose_depth

        counts = torch.bincount(rows, minlength=self.n)
        depth = choose_depth(counts)
        out = {"L": {}, "L+4": {"depth": depth + 4}, "L+8": {"depth": depth + 8}}
        out["Lmax"] = {"depth": int(counts.max())}
        out["lanes16"], out["lanes64"] = {"lanes": 16}, {"lanes": 64}
        return out

    def gemm(self, lay, x):
        if lay["marlin"] is None:
            return torch.zeros(x.shape[0], self.n, dtype=x.dtype, device=x.device)
        layer, kobj = lay["marlin"]
        return kobj.apply_weights(layer, x)

    def gemm_correct(self, x, lname: str, tiles) -> None:
        """Every layer's GEMM, then its correction (layout ``lname``) in place: the work the timings compare."""
        for lay in self.layers:
            self.correct(self.gemm(lay, x), x, lay["sell"][lname], tiles)

    def correct(self, y, x, sp, tiles):
        args = [sp[key] for key in SELL_ORDER]
        self.TS.sparse_correction_(y, x, *args, int(sp["nnz"].shape[0]), tiles=tiles)

    def correct_panel(self, y, x, sp, cfg) -> None:
        """The shared-memory kernel with launch knobs ``cfg`` (it must take the shape: a refusal is an error here)."""
        from vllm_superweight.kernels import cuda_sell as CS

        if not CS.sell_panel_(y, x, sp["ell_cols"], sp["ell_rb"], sp["hrows"], sp["hptr"], sp["hcols"], x.dtype, cfg):
            raise RuntimeError(f"the panel kernel did not take M = {x.shape[0]}")

    def gemm_panel(self, x, cfg) -> None:
        for lay in self.layers:
            self.correct_panel(self.gemm(lay, x), x, lay["sell"]["L"], cfg)

    def check(self, variants: dict, layouts: list[str]) -> dict:
        """Each variant's correction (on zeros) against a float64 reference, at 8 and 64 tokens: max |error| over
        the reference's magnitude. Variants failing it are not timed."""
        lay = self.layers[0]
        s = torch.zeros(self.n, self.k, dtype=torch.float64, device=self.dev)
        s.index_put_((lay["r"].to(self.dev), lay["c"].to(self.dev)), lay["v"].double().to(self.dev), accumulate=True)
        bad = {}
        for m in (8, 64):
            x = torch.randn(m, self.k, device=self.dev).to(torch.bfloat16)
            ref = x.double() @ s.T
            scale = float(ref.abs().max())
            for lname, tname in layout_jobs(variants, layouts):
                y = torch.zeros(m, self.n, dtype=torch.bfloat16, device=self.dev)
                self.correct(y, x, lay["sell"][lname], variants[tname])
                err = float((y.double() - ref).abs().max()) / scale
                if err > 1e-2:
                    bad[f"{lname}/{tname}@{m}"] = err
            for pname, cfg in self.panels.items():
                y = torch.zeros(m, self.n, dtype=torch.bfloat16, device=self.dev)
                try:
                    self.correct_panel(y, x, lay["sell"]["L"], cfg)
                except Exception as e:  # noqa: BLE001
                    bad[f"panel/{pname}@{m}"] = f"{type(e).__name__}: {str(e)[:200]}"
                    continue
                err = float((y.double() - ref).abs().max()) / scale
                if err > 1e-2:
                    bad[f"panel/{pname}@{m}"] = err
        del s
        return bad

    def time(self, fn) -> float | None:
        from w4_fused_bench import time_graph

        if self.dry:
            fn()
            return 1.0
        try:
            return time_graph(fn, self.args.iters) / len(self.layers)
        except Exception as e:  # noqa: BLE001
            self.rows.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
            traceback.print_exc()
            return None

    def run(self):
        TS = self.TS
        self.build()
        self.panels = panel_variants(max(self.args.ms)) if self.args.panel and not self.dry else {}
        variants = tile_variants(TS.DEFAULT_TILES)
        layouts = list(self.layers[0]["sell"])
        if self.args.triton_variants == "default":  # the Triton kernel's default launch on the default layout only
            variants, layouts = {"default": variants["default"]}, ["L"]
        bad = self.check(variants, layouts)
        self.meta["check_failures"] = bad
        log(f"reference check: {'all within 1e-2' if not bad else bad}")
        us: dict = {}  # "layout/tiles" -> {m: us}
        for m in self.args.ms:
            if self.left() < 20:
                self.rows.append({"m": m, "note": "skipped: time budget"})
                continue
            x = torch.randn(m, self.k, device=self.dev).to(torch.bfloat16)
            ys = [torch.zeros(m, self.n, dtype=torch.bfloat16, device=self.dev) for _ in self.layers]
            base = self.time(lambda: [self.gemm(lay, x) for lay in self.layers])
            self.rows.append({"m": m, "kind": "marlin", "us": base})
            for lname, tname in layout_jobs(variants, layouts):
                key = f"{lname}/{tname}"
                if any(b.startswith(key + "@") for b in bad):
                    continue
                t = variants[tname]

                u = self.time(lambda lname=lname, t=t: self.gemm_correct(x, lname, t))
                if u is None:
                    continue
                us.setdefault(key, {})[m] = u
                self.rows.append(
                    {"m": m, "kind": "marlin+sell " + key, "us": u, "over_gemm": u - base if base else None}
                )
            for pname, cfg in self.panels.items():
                if any(b.startswith(f"panel/{pname}@") for b in bad):
                    continue
                u = self.time(lambda cfg=cfg: self.gemm_panel(x, cfg))
                if u is None:
                    continue
                us.setdefault(f"panel/{pname}", {})[m] = u
                self.rows.append(
                    {"m": m, "kind": f"marlin+panel {pname}", "us": u, "over_gemm": u - base if base else None}
                )
            ov = self.time_overlapped(x) if self.args.overlap else None
            if ov is not None:
                self.rows.append(
                    {"m": m, "kind": "marlin+sell overlapped", "us": ov, "over_gemm": ov - base if base else None}
                )
            alone = self.time(
                lambda: [self.correct(y, x, lay["sell"]["L"], variants["default"]) for lay, y in zip(self.layers, ys)]
            )
            self.rows.append({"m": m, "kind": "sell alone L/default", "us": alone})
            if "default" in self.panels and "panel/default" in us and m in us["panel/default"]:
                pd = self.panels["default"]
                alone = self.time(
                    lambda: [self.correct_panel(y, x, lay["sell"]["L"], pd) for lay, y in zip(self.layers, ys)]
                )
                self.rows.append({"m": m, "kind": "panel alone default", "us": alone})
            log(f"M = {m}: marlin {base} us; " + ", ".join(f"{key} {v[m]:.1f}" for key, v in us.items() if m in v))
            self.save()
        self.recommend(us, variants)
        self.save()
        for m in self.args.profile_ms:
            if self.left() < 15:
                break
            self.profile(m, variants["default"])
            if "default" in self.panels and self.left() > 15:
                self.profile(m, variants["default"], panel=self.panels["default"])
            self.save()

    def profile(self, m: int, tiles, panel=None) -> None:
        """Where a layer's time goes at ``m`` tokens: the device time of each kernel (GEMM, gather-transpose, SELL) per
        layer, eager launches under torch.profiler. Against the CUDA-graph time of the same work (the rows above), what
        is left is the time between the kernels, which no kernel change removes. ``panel``: the shared-memory
        kernel with these knobs instead of the Triton one (row kind ``profile panel``)."""
        x = torch.randn(m, self.k, device=self.dev).to(torch.bfloat16)
        kind = "profile" if panel is None else "profile panel"

        def f():
            if panel is None:
                self.gemm_correct(x, "L", tiles)
            else:
                self.gemm_panel(x, panel)

        if self.dry:
            f()
            self.rows.append({"m": m, "kind": kind, "kernels": {}})
            return
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        for _ in range(3):
            f()
        torch.cuda.synchronize()
        iters = 10
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                f()
            torch.cuda.synchronize()
        avgs = [(e.key, float(e.self_device_time_total), int(e.count)) for e in prof.key_averages()]
        kt = kernel_table(avgs, iters * len(self.layers))
        self.rows.append({"m": m, "kind": kind, "kernels": kt})
        log(f"M = {m} per layer: " + ", ".join(f"{name[:40]} {v['us']:.1f} us" for name, v in list(kt.items())[:6]))

    def time_overlapped(self, x) -> float | None:
        """The GEMM and the default correction with SUPERWEIGHT_SPARSE_OVERLAP's schedule (the correction on a side
        stream into a float32 buffer, one add after the GEMM), checked first against the in-place result."""
        import vllm_superweight.kernels as K

        def step(lay, overlap):
            return K.gemm_then_correction(lambda: self.gemm(lay, x), x, lay["sell"]["L"], self.n, overlap=overlap)

        lay = self.layers[0]
        a, b = step(lay, True).float(), step(lay, False).float()
        err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
        if not err < 1e-2:
            self.rows.append({"m": x.shape[0], "kind": "overlapped", "error": f"differs from in place by {err:.3g}"})
            return None
        return self.time(lambda: [step(lay, True) for lay in self.layers])

    def recommend(self, us: dict, variants: dict):
        TS = self.TS
        ms = sorted(m for m in self.args.ms if m in us.get("L/default", {}))
        tiles_us = {key.split("/", 1)[1]: v for key, v in us.items() if key.startswith("L/")}
        best, sums = recommend(tiles_us, ms)
        rec: dict = {"ms": ms, "sums": sums, "pick": best}
        # the winners of single knobs together (if more than one knob won), timed once more, must beat the best alone
        winners = [name for name, s in sums.items() if name != "default" and s < 0.98 * sums.get("default", 0)]
        if len(winners) > 1 and self.left() > 30:
            both = combine(sorted(winners, key=lambda nm: -sums[nm]), variants, TS.DEFAULT_TILES)
            comb: dict = {}
            for m in ms:
                x = torch.randn(m, self.k, device=self.dev).to(torch.bfloat16)

                u = self.time(lambda x=x: self.gemm_correct(x, "L", both))
                if u is not None:
                    comb[m] = u
                    self.rows.append({"m": m, "kind": "marlin+sell L/combined", "us": u})
            variants = dict(variants, combined=both)
            best, sums = recommend(dict(tiles_us, combined=comb), ms)
            rec.update(pick=best, sums=sums, combined=tiles_env(both, TS.DEFAULT_TILES))
        if best:
            rec["env"] = tiles_env(variants[best], TS.DEFAULT_TILES)
        else:  # a variant that wins only from some batch size up: its overrides from there (FROM_M:...)
            from_m, name = recommend_from_m(tiles_us, ms)
            if name:
                rec.update(pick=name, from_m=from_m, env=f"{from_m}:{tiles_env(variants[name], TS.DEFAULT_TILES)}")
        pus = {key.split("/", 1)[1]: v for key, v in us.items() if key.startswith("panel/")}
        if pus and "L/default" in us:  # the panel kernel's best variant against the Triton default, same rule
            cand = dict(pus, triton=us["L/default"])
            cand["default"], cand["panel-default"] = cand.pop("triton"), cand.pop("default", {})
            pbest, psums = recommend(cand, ms)
            rec["panel"] = {"sums": psums, "pick": pbest}
            if pbest:
                name = "default" if pbest == "panel-default" else pbest
                rec["panel"]["env"] = panel_env(self.panels[name])
        self.meta["recommend"] = rec
        log(f"recommend: {rec}")
        if self.args.recommend_env and rec.get("env"):
            with open(self.args.recommend_env, "a") as f:
                f.write(f"export SUPERWEIGHT_SPARSE_TILES={shlex.quote(rec['env'])}\n")


def kernel_table(avgs: list[tuple[str, float, int]], calls: int) -> dict[str, dict]:
    """Per-kernel device time of one call from profiler averages ``(name, self device us in total, count)``: the
    kernels that ran on the device (device time > 0), most expensive first, each ``{"us": per call, "launches": per
    call}``."""
    if calls <= 0:
        raise ValueError("calls must be positive")
    out = {
        name: {"us": round(us / calls, 2), "launches": round(n / calls, 2)} for name, us, n in avgs if us > 0 and n > 0
    }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us"]))


def table(rows: list[dict], meta: dict) -> str:
    """Markdown: us per layer (GEMM + correction) per M and variant, and the correction's part over the GEMM."""
    ms = sorted({r["m"] for r in rows if r.get("us") is not None})
    kinds = list(dict.fromkeys(r["kind"] for r in rows if r.get("us") is not None))
    by = {(r["kind"], r["m"]): r["us"] for r in rows if r.get("us") is not None}
    gemm = meta.get("gemm", "marlin")
    head = (
        f"# SELL correction after {gemm.capitalize()}, {meta.get('device')}: "
        f"qkv {meta['shape'][0]}x{meta['shape'][1]}, "
        f"{meta['nnz']} held-out terms ({meta['density'] * 100:.2f} %), us per layer\n\n"
    )
    lines = ["| variant | " + " | ".join(f"M = {m}" for m in ms) + " |", "|---|" + "---:|" * len(ms)]
    for kind in kinds:
        # the records keep the kind "marlin..." whatever ran first (one name across sessions); the table says which
        label = gemm + kind[len("marlin") :] if kind.startswith("marlin") else kind
        lines.append(f"| {label} | " + " | ".join(f"{by[(kind, m)]:.1f}" if (kind, m) in by else "" for m in ms) + " |")
    rec = meta.get("recommend")
    tail = f"\n\nrecommend: {json.dumps(rec)}\n" if rec else "\n"
    prof = [r for r in rows if r.get("kind") in ("profile", "profile panel") and r.get("kernels")]
    if prof:
        tail += "\nDevice time per layer and kernel (torch.profiler, eager launches), us:\n\n"
        for r in prof:
            kern = ", ".join(f"`{name}` {v['us']:.1f} (x{v['launches']:g})" for name, v in r["kernels"].items())
            what = " (panel kernel)" if r["kind"] == "profile panel" else ""
            tail += f"* M = {r['m']}{what}: {kern}\n"
    return head + "\n".join(lines) + tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sparse_bench.json"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--holdout", type=float, default=1e-3, help="fraction of a 7B layer's weights, all in qkv")
    ap.add_argument("--nnz", type=int, default=0, help="held-out terms in qkv (default: from --holdout)")
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[64, 32, 16, 8, 48, 4, 2])
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument(
        "--profile-ms",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=[],
        help="after the timings: each kernel's device time per layer at these token counts (torch.profiler)",
    )
    ap.add_argument("--recommend-env", help="append SUPERWEIGHT_SPARSE_TILES=... if a variant won")
    ap.add_argument("--no-vllm", action="store_true", help="no Marlin GEMM before the correction")
    ap.add_argument(
        "--gemm",
        default="marlin",
        choices=("marlin", "humming"),
        help="vLLM's W4 kernel class before the correction; held-out layers on Hopper serve 16-383 tokens on the one "
        "Humming copy, whose blocks fill every SM (s44: a schedule that won after a GEMM leaving SMs free lost end to "
        "end after Humming)",
    )
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes through the Triton interpreter")
    ap.add_argument(
        "--no-overlap",
        dest="overlap",
        action="store_false",
        help="do not time SUPERWEIGHT_SPARSE_OVERLAP's schedule (correction on a side stream beside the GEMM)",
    )
    ap.add_argument(
        "--triton-variants",
        choices=("all", "default"),
        default="all",
        help="time every launch and layout variant of the Triton SELL kernel (all) or its default only",
    )
    ap.add_argument(
        "--no-panel",
        dest="panel",
        action="store_false",
        help="do not time the shared-memory SELL kernel (kernels/cuda_sell.py) beside the Triton one",
    )
    args = ap.parse_args(argv)
    if args.dry_run_cpu:
        args.layers, args.ms = 1, [2, 16]
        args.profile_ms = args.profile_ms and [16]
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
