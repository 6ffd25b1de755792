"""Grid-solver and hold-out-budget study (issue #11): data-free W4/W3 against AWQ, in memory, plain transformers.

For each configuration every decoder Linear of the float model is quantized with ``vllm_superweight.quantize``
(held-out mask from ``select_holdout`` with the detected super weights as extra coordinates, or from the budget),
dequantized, held-out weights restored exactly, rounded to bf16 (what the served bf16 kernels compute), written
back into the model, and perplexity is computed with a plain transformers forward pass (fp32 activations; every
parameter rounded to bf16 first, as vLLM serves it) on

* ``pydoc``: the English prose of Python's documentation (``pydoc_data.topics``, sorted keys, joined with
  blank lines -- the AWQ calibration text of make_baselines.py), first ``--pydoc-tokens`` tokens: SELECTION;
* ``wiki``: WikiText-2 raw test, first 16,384 tokens, the protocol of ``vllm_superweight.eval``: REPORT ONLY.

Windows of 512, non-overlapping, BOS rule and scored positions as ``eval.perplexity_transformers``.
Effective bits = bytes of every format tensor of the quantized Linears (packed codes, scales, packed zero points,
sparse index int32 x 2 + values, shape) x 8 / number of quantized weights.

    python benchmarks/grid_study.py prepare smollm2
    python benchmarks/grid_study.py run smollm2 --config 'bits=4,block=64,grid=hqq,holdout=1e-3' --texts pydoc
    python benchmarks/grid_study.py ckpt gemma3-270m runs/x/ckpt --label 'w4-g128-hqq --holdout-rank prompt'
    python benchmarks/grid_study.py report

``ckpt``: a checkpoint written by ``superweight convert`` (dequantized, held-out weights restored, every weight
bf16-rounded as above) on the same cached texts: the converter's own path against this in-memory harness.

Caches (git-ignored): runs/grid_study/<model>/ (float model, detection, token ids, prompt activation scales).
Results: benchmarks/results/grid_study.json (one record per model x config x text).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vllm_superweight import eval as sw_eval  # noqa: E402
from vllm_superweight import grid as sw_grid  # noqa: E402
from vllm_superweight.convert import quantized_module  # noqa: E402
from vllm_superweight.format import DEFAULT_IGNORE, BlockLayout  # noqa: E402
from vllm_superweight.quantize import (  # noqa: E402
    dequantize,
    holdout_count,
    quantize_weight,
    select_holdout,
    to_tensors,
)

CACHE = os.path.join(ROOT, "runs", "grid_study")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "grid_study.json")
WINDOW = 512
WIKI_TOKENS = 16384


def cache_dir(model: str) -> str:
    d = os.path.join(CACHE, model)
    os.makedirs(d, exist_ok=True)
    return d


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# ----------------------------------------------------------------------------------------------------------
# prepare: float model, detection, token ids, one-prompt activation scales
# ----------------------------------------------------------------------------------------------------------
def prepare(model: str) -> None:
    from float_checkpoint import write_float_checkpoint
    from transformers import AutoTokenizer

    d = cache_dir(model)
    fdir = os.path.join(d, "float")
    if not os.path.exists(os.path.join(fdir, "config.json")):
        t0 = time.time()
        write_float_checkpoint(model, fdir, dtype="float32")
        print(f"[prepare] float model -> {fdir} ({time.time() - t0:.0f} s)")
    tok = AutoTokenizer.from_pretrained(fdir)
    ids_path = os.path.join(d, "ids.json")
    if not os.path.exists(ids_path):
        wiki = sw_eval.tokenize_text(tok, sw_eval.load_text(sw_eval.default_text_path()))[:WIKI_TOKENS]
        pyd = sw_eval.tokenize_text(tok, pydoc_text())
        with open(ids_path, "w") as f:
            json.dump({"wiki": wiki, "pydoc": pyd, "bos": sw_eval.default_bos(tok)}, f)
        print(f"[prepare] tokens: wiki {len(wiki)}, pydoc {len(pyd)}")
    det_path = os.path.join(d, "detection.json")
    m = None
    if not os.path.exists(det_path):
        from vllm_superweight.detect import detect_super_weights

        m = load_float(model)
        res = detect_super_weights(m, tok, progress=False)
        sws = [{"module": s.module, "row": s.row, "col": s.col, "value": s.value} for s in res.super_weights]
        with open(det_path, "w") as f:
            json.dump({"super_weights": sws, "prompt": res.prompt}, f, indent=1)
        print(f"[prepare] {len(sws)} super weights: {sws}")
    act_path = os.path.join(d, "prompt_act.pt")
    if not os.path.exists(act_path):
        from vllm_superweight.detect import DEFAULT_PROMPT

        m = m or load_float(model)
        torch.save(sw_grid.prompt_input_rms(m, tok, DEFAULT_PROMPT, _linears(m)), act_path)
        print(f"[prepare] prompt activation scales -> {act_path}")


def load_float(model: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(os.path.join(cache_dir(model), "float"), dtype=torch.float32)
    m.eval()
    return m


def _linears(m) -> dict[str, torch.nn.Module]:
    out = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and quantized_module(
            name + ".weight", tuple(mod.weight.shape), DEFAULT_IGNORE
        ):
            out[name] = mod
    return out


# ----------------------------------------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------------------------------------
def perplexity(m, ids: list[int], bos: int | None, max_tokens: int, batch: int = 4) -> dict:
    windows = sw_eval.make_windows(ids, WINDOW, max_tokens)
    prompts, n_ctx = sw_eval.build_prompts(windows, bos)
    nll, count = 0.0, 0
    t0 = time.time()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            x = torch.tensor(prompts[i : i + batch], dtype=torch.long)
            logits = m(input_ids=x).logits
            lp = torch.log_softmax(logits[:, n_ctx - 1 : -1].float(), dim=-1)
            tgt = x[:, n_ctx:]
            nll -= float(lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double().sum())
            count += tgt.numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------------------
def parse_config(text: str) -> dict:
    cfg = {
        "bits": 4,
        "block": "64",
        "grid": "minmax",
        "holdout": 0.0,
        "budget": "uniform",
        "sw": True,
        "iters": None,
        "lp": None,
        "beta": None,
        "kappa": None,
        "score_p": None,
        "metric": "rel_out",
        "bgrid": "minmax",
        "fitw": "none",
        "sel": "abs",
        "damp": None,
        "only": None,
        "layers": None,  # "A-B": the hold-out only in decoder layers A..B (with or without only=)
        "lspend": None,  # with layers=: "density" keeps the full placement's per-matrix density (less in total)
        "struct": None,  # "colsR[max|l2]": slice-column hold-out (whole columns of R-row slices; see slice_columns)
    }
    if text in ("float",):
        return {"float": True}
    for part in filter(None, text.split(",")):
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in cfg:
            raise SystemExit(f"unknown config key {k!r}")
        if k in ("bits", "iters"):
            cfg[k] = int(v)
        elif k in ("holdout", "lp", "beta", "kappa", "score_p", "damp"):
            cfg[k] = float(v)
        elif k == "sw":
            cfg[k] = v.lower() in ("1", "true", "yes")
        else:
            cfg[k] = v
    return cfg


def in_layers(name: str, span: str | None) -> bool:
    """Whether module ``name`` (``...layers.<i>....``) lies in decoder layers ``span`` = "A-B" (inclusive; None:
    all)."""
    if not span:
        return True
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    lo, hi = (int(v) for v in span.split("-"))
    return m is not None and lo <= int(m.group(1)) <= hi


def slice_columns(w: torch.Tensor, count: int, rows: int, score: str, extra=()) -> torch.Tensor:
    """A structured hold-out (experiment, s45): the same ``count`` of weights as whole columns of ``rows``-row
    slices, so a kernel gathers each chosen x column once per slice instead of once per term. The (slice, column)
    pairs are ranked by the slice's largest |w| in that column (``max``) or the column's sum of squares over the
    slice (``l2``); the top ``round(count / rows)`` pairs are held out, every row of the slice in that column, plus
    the ``extra`` coordinates (the super weights) as single entries."""
    n, k = w.shape
    if n % rows:
        raise SystemExit(f"slice_columns: {n} rows are not a multiple of {rows}")
    a = w.abs().float().reshape(n // rows, rows, k)
    sc = a.amax(1) if score == "max" else a.pow(2).sum(1)  # [slices, k]
    pairs = min(sc.numel(), max(0, round(count / rows)))
    mask = torch.zeros(n // rows, rows, k, dtype=torch.bool)
    if pairs:
        top = torch.topk(sc.reshape(-1), pairs).indices
        sl, col = top // k, top % k
        mask[sl, :, col] = True
    mask = mask.reshape(n, k)
    for r, c in extra:
        mask[r, c] = True
    return mask


def parse_struct(text: str) -> tuple[int, str]:
    """``colsR`` / ``colsRmax`` / ``colsRl2`` -> (R, score); default score ``max``."""
    import re

    m = re.fullmatch(r"cols(\d+)(max|l2)?", text)
    if not m:
        raise SystemExit(f"struct={text!r}: expected colsR, colsRmax or colsRl2")
    return int(m.group(1)), m.group(2) or "max"


def config_key(cfg: dict) -> str:
    if cfg.get("float"):
        return "float"
    return ",".join(f"{k}={cfg[k]}" for k in sorted(cfg) if cfg[k] is not None)


def grid_params(cfg: dict) -> dict | None:
    gp = {k: cfg[k] for k in ("iters", "lp", "beta", "kappa", "score_p") if cfg.get(k) is not None}
    return gp or None


def quantize_model(model: str, m, cfg: dict, log=print) -> dict:
    """Quantize every decoder Linear of ``m`` in place (dequantized + restored, bf16-rounded); return stats."""
    d = cache_dir(model)
    with open(os.path.join(d, "detection.json")) as f:
        sws = json.load(f)["super_weights"]
    sw_by_mod: dict[str, list] = {}
    for s in sws:
        sw_by_mod.setdefault(s["module"], []).append((s["row"], s["col"]))
    lins = _linears(m)
    layout = BlockLayout.parse(cfg["block"])
    weights = {n: mod.weight.detach().to(torch.bfloat16) for n, mod in lins.items()}
    extras = {n: (sw_by_mod.get(n, []) if cfg["sw"] else []) for n in lins}
    act = None
    if cfg["fitw"] != "none" or cfg["sel"] != "abs":
        act = {n: v["skip_first"] for n, v in torch.load(os.path.join(d, "prompt_act.pt")).items()}

    def col_weight(n):
        # importance of each input column in the fit: prompt RMS ^ power, damped towards its mean
        if cfg["fitw"] == "none":
            return None
        pw = {"act1": 1.0, "act2": 2.0, "acth": 0.5}[cfg["fitw"]]
        a = act[n].float().clamp_min(1e-12).pow(pw)
        a = a / a.mean()
        return a + (cfg["damp"] or 0.0)

    t0 = time.time()
    counts = None
    if cfg["holdout"] > 0 and cfg["budget"] != "uniform":
        act_all = torch.load(os.path.join(d, "prompt_act.pt")) if cfg["metric"] in ("rel_out", "out") else None
        counts = sw_grid.holdout_budget(
            weights,
            cfg["holdout"],
            cfg["bits"],
            layout,
            extras=extras,
            metric=cfg["metric"],
            act_rms=act_all,
            scheme=cfg["budget"],
            grid=cfg["bgrid"],
            scale_dtype=torch.bfloat16,
            col_scales=(act if cfg["sel"] == "act" else None),
        )
    if cfg["holdout"] > 0 and (cfg.get("only") or cfg.get("layers")):
        # the same total hold-out (a fraction of ALL quantized weights) spent only in the matrices whose names contain
        # one of the '+'-separated parts (and, with layers=A-B, lie in decoder layers A..B), in proportion to their
        # sizes; the others keep just their super weights. lspend=density: each chosen matrix gets the density the
        # placement would give it over all layers (the layers left out simply lose theirs)
        if counts is not None:
            raise SystemExit("only= / layers= take the uniform budget")
        parts = cfg["only"].split("+") if cfg.get("only") else [""]
        placed = [n for n in lins if any(p in n for p in parts)]
        chosen = [n for n in placed if in_layers(n, cfg.get("layers"))]
        if not chosen:
            raise SystemExit(f"only={cfg['only']} layers={cfg.get('layers')}: no matrix matches")
        total = cfg["holdout"] * sum(w.numel() for w in weights.values())
        size = sum(weights[n].numel() for n in (placed if cfg.get("lspend") == "density" else chosen))
        counts = {n: (round(total * weights[n].numel() / size) if n in chosen else 0) for n in lins}
    t_budget = time.time() - t0
    bits_total = 0
    numel = 0
    held = 0
    t_q = 0.0
    per = {}
    for n, mod in lins.items():
        w = weights[n]
        cs = act[n] if cfg["sel"] == "act" else None
        if cfg.get("struct") and cfg["holdout"] > 0:
            if cs is not None:
                raise SystemExit("struct= ranks by |w| only (sel=abs)")
            cnt = counts[n] if counts is not None else holdout_count(cfg["holdout"], w.numel())
            r_, sc_ = parse_struct(cfg["struct"])
            mask = slice_columns(w, cnt, r_, sc_, extras[n]) if cnt else select_holdout(w, 0.0, extras[n], count=0)
        elif counts is not None:
            mask = select_holdout(w, 0.0, extras[n], count=counts[n], col_scale=cs)
        else:
            mask = select_holdout(w, cfg["holdout"], extras[n], col_scale=cs)
        t1 = time.time()
        ql = quantize_weight(
            w,
            cfg["bits"],
            layout,
            False,
            holdout_mask=mask,
            scale_dtype=torch.bfloat16,
            grid=cfg["grid"],
            grid_params=grid_params(cfg),
            col_weight=col_weight(n),
        )
        t_q += time.time() - t1
        ts = to_tensors(ql, torch.bfloat16)
        bits_total += sum(t.numel() * t.element_size() * 8 for t in ts.values())
        numel += w.numel()
        held += ql.stats["held_out"]
        deq = dequantize(ql.q, ql.scale, ql.zero, layout)
        if ql.sparse_rows.numel():
            deq[ql.sparse_rows, ql.sparse_cols] = ql.sparse_vals.float()
        with torch.no_grad():
            mod.weight.copy_(deq.to(torch.bfloat16).float())
        per[n] = {
            "held_out": ql.stats["held_out"],
            "rel_fro_err": ql.stats["rel_fro_err"],
            "clipped": ql.stats["clipped"],
        }
    return {
        "effective_bits": bits_total / numel,
        "quantized_params": numel,
        "held_out": held,
        "held_out_fraction": held / numel,
        "seconds_quantize": round(t_q, 1),
        "seconds_budget": round(t_budget, 1),
        "params_per_s": round(numel / max(t_q, 1e-9)),
        "per_module": per,
    }


def _bf16_round_(m) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def load_results() -> list[dict]:
    if not os.path.exists(RESULTS):
        return []
    with open(RESULTS) as f:
        return json.load(f)


def save_record(rec: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        recs = load_results()
        recs = [
            r
            for r in recs
            if not (r["model"] == rec["model"] and r["config"] == rec["config"] and r["text"] == rec["text"])
        ]
        recs.append(rec)
        recs.sort(key=lambda r: (r["model"], r["text"], r["config"]))
        tmp = RESULTS + ".tmp"
        with open(tmp, "w") as f:
            json.dump(recs, f, indent=1)
        os.replace(tmp, RESULTS)


def eval_checkpoint(
    model: str, ckpt: str, label: str, texts: list[str], pydoc_tokens: int, threads: int, batch: int = 4
) -> None:
    """Perplexity of a converter checkpoint on the cached texts (record config ``ckpt:<label>``)."""
    from safetensors import safe_open

    from vllm_superweight.checkpoint import load_dequantized_model, read_quant_config
    from vllm_superweight.format import LINEAR_SUFFIXES, W_SHAPE

    torch.set_num_threads(threads)
    with open(os.path.join(cache_dir(model), "ids.json")) as f:
        ids = json.load(f)
    _, qc = read_quant_config(ckpt)
    bits_total = numel = held = 0
    for fn in sorted(os.listdir(ckpt)):
        if not fn.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(ckpt, fn), framework="pt") as f:
            for name in f.keys():
                suffix = name.rpartition(".")[2]
                if suffix not in LINEAR_SUFFIXES:
                    continue
                t = f.get_tensor(name)
                bits_total += t.numel() * t.element_size() * 8
                if suffix == W_SHAPE:
                    numel += int(t[0]) * int(t[1])
                elif suffix == "sparse_value":
                    held += t.numel()
    m, _ = load_dequantized_model(ckpt, restore=True, dtype=torch.float32)
    _bf16_round_(m)
    texts = [t if t != "pydoc" or pydoc_tokens == 8192 else f"pydoc{pydoc_tokens}" for t in texts]
    for t in texts:
        res = perplexity(
            m, ids["wiki" if t == "wiki" else "pydoc"], ids["bos"], WIKI_TOKENS if t == "wiki" else pydoc_tokens, batch
        )
        rec = {
            "model": model,
            "config": f"ckpt:{label}",
            "text": t,
            "ppl": res["ppl"],
            "tokens": res["tokens"],
            "effective_bits": bits_total / numel,
            "cfg": {"ckpt": label, "quantization_config": qc.to_dict()},
            "stats": {"held_out": held, "held_out_fraction": held / numel, "quantized_params": numel},
            "seconds_eval": res["seconds"],
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        save_record(rec)
        print(f"[{model}] {t:5s} ppl {res['ppl']:8.3f}  bits {bits_total / numel:.3f}  ckpt:{label}", flush=True)


def run(
    model: str, configs: list[str], texts: list[str], pydoc_tokens: int, force: bool, threads: int, batch: int = 4
) -> None:
    torch.set_num_threads(threads)
    d = cache_dir(model)
    with open(os.path.join(d, "ids.json")) as f:
        ids = json.load(f)
    # the selection text's label carries its length when it is not the default 8,192 tokens
    texts = [t if t != "pydoc" or pydoc_tokens == 8192 else f"pydoc{pydoc_tokens}" for t in texts]
    done = {(r["config"], r["text"]) for r in load_results() if r["model"] == model}
    base = None
    for text_cfg in configs:
        cfg = parse_config(text_cfg)
        key = config_key(cfg)
        todo = [t for t in texts if force or (key, t) not in done]
        if not todo:
            print(f"[{model}] {key}: done")
            continue
        if base is None:
            base = load_float(model)
            _bf16_round_(base)
            orig = {n: mod.weight.detach().clone() for n, mod in _linears(base).items()}
        else:
            with torch.no_grad():
                for n, mod in _linears(base).items():
                    mod.weight.copy_(orig[n])
        st = {"effective_bits": 16.0} if cfg.get("float") else quantize_model(model, base, cfg)
        for t in todo:
            tok_ids = ids["wiki" if t == "wiki" else "pydoc"]
            mt = WIKI_TOKENS if t == "wiki" else pydoc_tokens
            res = perplexity(base, tok_ids, ids["bos"], mt, batch=batch)
            rec = {
                "model": model,
                "config": key,
                "text": t,
                "ppl": res["ppl"],
                "tokens": res["tokens"],
                "effective_bits": st["effective_bits"],
                "cfg": cfg,
                "stats": {k: v for k, v in st.items() if k != "per_module"},
                "seconds_eval": res["seconds"],
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            save_record(rec)
            extra = "" if cfg.get("float") else f" held {st['held_out_fraction']:.2e} q {st['seconds_quantize']}s"
            print(f"[{model}] {t:5s} ppl {res['ppl']:8.3f}  bits {st['effective_bits']:.3f}  {key}{extra}", flush=True)
        if not cfg.get("float") and os.environ.get("GRID_STUDY_PER_MODULE"):
            with open(os.path.join(d, "per_module_" + str(abs(hash(key))) + ".json"), "w") as f:
                json.dump(st["per_module"], f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("model")
    b = sub.add_parser("run")
    b.add_argument("model")
    b.add_argument(
        "--config",
        action="append",
        required=True,
        help="k=v,... (bits, block, grid, holdout, budget,"
        " sw, iters, lp, beta, kappa, score_p, metric, bgrid) or 'float'",
    )
    b.add_argument("--texts", default="pydoc", help="pydoc,wiki")
    b.add_argument("--pydoc-tokens", type=int, default=8192)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--force", action="store_true")
    b.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    e = sub.add_parser("ckpt", help="perplexity of a `superweight convert` checkpoint on the cached texts")
    e.add_argument("model")
    e.add_argument("ckpt")
    e.add_argument("--label", required=True, help="the record's name (e.g. the convert options)")
    e.add_argument("--texts", default="pydoc", help="pydoc,wiki")
    e.add_argument("--pydoc-tokens", type=int, default=8192)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    c = sub.add_parser("report")
    c.add_argument("--md", default=os.path.join(ROOT, "benchmarks", "results", "grid_study.md"))
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.model)
    elif args.cmd == "run":
        run(args.model, args.config, args.texts.split(","), args.pydoc_tokens, args.force, args.threads, args.batch)
    elif args.cmd == "ckpt":
        eval_checkpoint(
            args.model, args.ckpt, args.label, args.texts.split(","), args.pydoc_tokens, args.threads, args.batch
        )
    else:
        report(args.md)
    return 0


LABELS = {
    "grid=minmax": "min/max",
    "grid=hqq": "HQQ-int fit",
}


def describe(cfg: dict) -> str:
    """A short human label of one configuration."""
    if cfg.get("float"):
        return "float reference"
    if cfg.get("ckpt"):
        return f"converter checkpoint: `superweight convert {cfg['ckpt']}`"
    parts = [f"W{cfg['bits']} {'g' + cfg['block'] if cfg['block'].isdigit() else cfg['block']}"]
    if cfg["grid"] == "hqq":
        gp = ", ".join(f"{k} {cfg[k]:g}" for k in ("iters", "lp", "beta") if cfg.get(k) is not None)
        parts.append("HQQ-int fit" + (f" ({gp})" if gp else ""))
        if cfg.get("fitw", "none") != "none":
            parts.append(
                f"fit weighted by prompt RMS^{ {'act1': 1, 'act2': 2, 'acth': 0.5}[cfg['fitw']] }"
                + (f" + {cfg['damp']:g}" if cfg.get("damp") else "")
            )
    else:
        parts.append("min/max")
    if not cfg["sw"]:
        parts.append("no SW")
    if cfg["holdout"] > 0:
        h = f"hold-out {cfg['holdout']:g}"
        if cfg["budget"] != "uniform":
            h += f" budgeted ({cfg['metric']})"
        if cfg.get("sel", "abs") != "abs":
            h += ", ranked by abs(w) x prompt RMS"
        if cfg.get("only"):
            h += f", all in {cfg['only'].replace('+', ' + ')}"
        if cfg.get("struct"):
            r_, sc_ = parse_struct(cfg["struct"])
            h += f", as whole columns of {r_}-row slices (ranked by the slice's {sc_} abs(w))"
        if cfg.get("layers"):
            h += f", layers {cfg['layers']} only"
            if cfg.get("lspend") == "density":
                h += " (at the all-layer placement's density: less in total)"
        parts.append(h)
    return ", ".join(parts)


def report(md_path: str | None = None) -> None:
    recs = load_results()
    rows: dict[tuple, dict] = {}
    defaults = parse_config("")
    for r in recs:
        # records written before a config key existed carry its default: merge them under today's key
        cfg = r["cfg"] if r["cfg"].get("float") or r["cfg"].get("ckpt") else {**defaults, **r["cfg"]}
        r = dict(r, cfg=cfg)
        key = r["config"] if cfg.get("ckpt") else config_key(cfg)
        rows.setdefault((r["model"], key), {})[r["text"]] = r

    def fmt(x):
        return "" if x is None else f"{x:.2f}"

    lines = [
        "# Grid solver and hold-out budget study (issue #11)",
        "",
        "Generated by `python benchmarks/grid_study.py report` from `grid_study.json`. Plain transformers, fp32 "
        "activations, every weight bf16-rounded (as served); quantized Linears dequantized with their held-out "
        "weights restored. `pydoc4k` / `pydoc8k`: first 4,096 / 8,192 tokens of the English prose of Python's "
        "docs (`pydoc_data.topics`) -- the SELECTION text. `wiki`: WikiText-2 raw test, first 16,384 tokens, "
        "windows of 512 (the quality table's protocol) -- REPORT only. Effective bits: every stored tensor of "
        "the quantized Linears (packed codes, bf16 scales, packed int zero points, sparse index 2 x int32 + bf16 "
        "values) over the number of quantized weights. Through vLLM (quality.md, same wiki protocol): SmolLM2 "
        "float 28.14, RTN g64 37.53, g64 + hold-out 1e-3 36.53, AWQ g64 34.07, channel + hold-out 1e-3 40.97, "
        "naive channel 48.51; Gemma-3-270M float 22.60, RTN g128 36.37, + hold-out 1e-3 34.39, AWQ g128 30.34, "
        "channel + hold-out 1e-3 43.29, naive channel 53.64 (this harness reproduces SmolLM2 float / RTN g64 / "
        "hold-out: 28.13 / 37.51 / 36.52). `converter checkpoint` rows: `superweight convert` of the cached float "
        "model (runs/grid_study/<model>/float), evaluated by `grid_study.py ckpt` in this harness (the converter's own "
        "path; it reproduces the in-memory rows of the same settings exactly).",
        "",
    ]
    for model in sorted({m for m, _ in rows}):
        lines += [
            f"## {model}",
            "",
            "| configuration | pydoc4k | pydoc8k | wiki | eff. bits | config key |",
            "|---|---:|---:|---:|---:|---|",
        ]
        items = []
        for (m, key), tx in rows.items():
            if m != model:
                continue
            r0 = next(iter(tx.values()))
            vals = [tx.get(t, {}).get("ppl") for t in ("pydoc4096", "pydoc", "wiki")]
            items.append((r0["effective_bits"] if not r0["cfg"].get("float") else 99, key, r0, vals))
        for _bits, key, r0, vals in sorted(items, key=lambda x: (-x[0] if x[0] == 99 else x[0], x[1])):
            lines.append(
                f"| {describe(r0['cfg'])} | {fmt(vals[0])} | {fmt(vals[1])} | {fmt(vals[2])} | "
                f"{r0['effective_bits']:.3f} | `{key}` |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
