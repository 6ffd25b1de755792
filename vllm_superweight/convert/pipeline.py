"""``convert()``: the stages in order, each in its own module.

1. destination first (``save.Destination``: may we write there, is an old DST ours to replace; the temporary
   directory is created now, so an unwritable destination is found before anything slow runs);
2. validate + plan (``plan``): source, architecture, tensor headers, block tiling, requested super weights, NaN/Inf;
3. detect the super weights on the float model (``run_detection``; the model is loaded from exactly the
   safetensors files the converter streams, never from a pickle) unless the caller gives them;
4. stream the weights (``models.iter_safetensors`` / ``iter_state_dict``), quantize every Linear
   (``process.quantize_linear``), write bounded shards (``save.ShardWriter``);
5. config.json, sidecar, report (``report``), a header-only self-check (``checkpoint.validate_checkpoint``),
   then the atomic rename (``Destination.commit``). Any failure or interruption removes the temporary directory.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..checkpoint import validate_checkpoint
from ..format import REPORT_NAME, FormatError, Sidecar, SuperWeight
from ..models import (
    Source,
    TensorInfo,
    check_architecture,
    hf_weight_files,
    iter_safetensors,
    iter_state_dict,
    read_config,
    read_safetensors_headers,
    resolve_source,
    source_bytes,
    source_hash,
    total_ram,
)
from . import process, report
from . import prompt as prompt_stats
from .errors import ConversionError
from .options import torch_dtype
from .plan import (
    Plan,
    check_device,
    check_finite,
    default_dtype,
    make_plan,
    normalize_outliers,
    quantized_module,
    refuse_quantized_source,
    resolve_outliers,
    resolve_super_weights,
)
from .save import DEFAULT_MAX_SHARD_BYTES, Destination, ShardWriter, copy_tokenizer_files, write_errors, write_json


# ----------------------------------------------------------------------------------------------------------
# detection (lazy import: the detector lives in its own module)
# ----------------------------------------------------------------------------------------------------------
def run_detection(model: Any, tokenizer: Any, prompt: str | None, progress: bool = True, **kw: Any) -> Any:
    """DetectionResult of ``vllm_superweight.detect.detect_super_weights`` (separate so tests can stub it)."""
    from .. import detect

    if prompt is None:
        prompt = detect.DEFAULT_PROMPT
    return detect.detect_super_weights(model, tokenizer, prompt, progress=progress, **kw)


def published_match(source: Source, cfg: dict, result: Any) -> Any:
    try:
        from ..detect import match_published

        return match_published(source.name if source.kind == "gguf" else source.path, cfg, result)
    except Exception:  # informational only
        return None


def read_super_weights_json(path: str) -> tuple[list[SuperWeight], list[Any] | None]:
    """Requested super weights (+ activation outliers when present) from a JSON file.

    Accepted: a sidecar (``superweights.json`` of a checkpoint), the output of ``superweight detect --json``, or a
    bare list of ``{"layer"|"module", "row", "col"}`` objects / ``[layer, row, col]`` triples.
    """
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"--super-weights {path}: no such file") from None
    except IsADirectoryError:
        raise ConversionError(f"--super-weights {path}: is a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"--super-weights {path}: not valid JSON ({e})") from None
    outliers = None
    if isinstance(data, dict):
        if not isinstance(data.get("super_weights"), list):
            raise ConversionError(f"--super-weights {path}: expected a list or an object with a 'super_weights' list")
        items = data["super_weights"]
        if "activation_outliers" in data:
            outliers = normalize_outliers(data["activation_outliers"])
    elif isinstance(data, list):
        items = data
    else:
        raise ConversionError(f"--super-weights {path}: expected a list or an object with a 'super_weights' list")
    out = []
    for i, x in enumerate(items):
        try:
            out.append(SuperWeight.coerce(x))
        except FormatError as e:
            raise ConversionError(f"--super-weights {path}: super_weights[{i}]: {e}") from None
    return out, outliers


def _quiet(*_a: Any, **_k: Any) -> None:
    pass


@dataclasses.dataclass
class _Job:
    """One conversion's settings and the inputs in memory (a GGUF model and its state dict; None for HF dirs)."""

    plan: Plan
    qcfg: Any  # QuantConfig
    dest: Destination
    device: str
    progress: bool
    max_shard_bytes: int
    log: Callable[..., None]
    model: Any = None
    tokenizer: Any = None
    state_dict: dict | None = None
    input_rms: dict[str, Any] | None = None  # one prompt's per-channel input RMS of every quantized Linear
    holdout_counts: dict[str, int] | None = None  # per-matrix hold-out budget (None: uniform fraction)
    rms_prompt: str | None = None  # the prompt of input_rms

    def stream(self, desc: str):
        if self.state_dict is None:
            return iter_safetensors(self.plan.tensors, self.progress, desc)
        return iter_state_dict(self.state_dict, self.progress, desc)


# ----------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------
def convert(
    src: str,
    dst: str,
    qcfg: Any,
    *,
    prompt: str | None = None,
    super_weights: list | None = None,
    activation_outliers: Any = None,
    dtype: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    detect_kwargs: dict | None = None,
    log: Callable[..., None] | None = print,
) -> dict:
    """Convert ``src`` into a superweight_rtn checkpoint at ``dst``; returns the conversion report (dict).

    ``super_weights``: None = detect them; a list (possibly empty) = use these (SuperWeight / dicts /
    [layer, row, col]); ``activation_outliers`` goes with an explicit list (else none are written).
    Raises FormatError (SourceError, ConversionError) on bad input; nothing is written then.
    """
    t_start = time.perf_counter()
    log = log or _quiet
    check_device(device)
    source = resolve_source(src)
    dest = Destination(dst, source.path, overwrite)
    try:
        dest.prepare(log)
        rep = _convert(
            source,
            dest,
            qcfg,
            t_start,
            prompt=prompt,
            super_weights=super_weights,
            activation_outliers=activation_outliers,
            dtype=dtype,
            device=device,
            progress=progress,
            max_shard_bytes=max_shard_bytes,
            detect_kwargs=detect_kwargs,
            log=log,
        )
        t = rep["timing"]
        log(
            f"wrote {dest.final}: {rep['totals']['modules_quantized']} Linear modules, "
            f"{rep['totals']['params_quantized']:,} parameters quantized in {t['quantize_s']:.1f} s "
            f"({t['params_per_s']:,.0f} params/s); total {t['total_s']:.1f} s; "
            f"{rep['totals']['output_bytes'] / 1e6:.1f} MB"
        )
    except KeyboardInterrupt:
        if dest.committed:  # the checkpoint went into place just before the interrupt: say so, keep it
            raise KeyboardInterrupt(f"after {dest.final} was written complete") from None
        dest.abort()
        raise
    except BaseException:
        dest.abort()
        raise
    return rep


def _load_source(source: Source, qcfg: Any, dtype: str | None, log: Callable[..., None]):
    """(plan, model, tokenizer, state_dict): HF sources are planned from their headers (no weights read)."""
    cfg = read_config(source)
    check_architecture(cfg)
    refuse_quantized_source(source, cfg)
    out_dtype = torch_dtype(dtype or default_dtype(source, cfg))
    if source.kind == "hf":
        tensors = read_safetensors_headers(hf_weight_files(source))
        return make_plan(source, cfg, tensors, qcfg, out_dtype), None, None, None
    from ..models import load_model

    log(f"loading {source.name} (GGUF, dequantized by transformers) ...")
    model, tokenizer = load_model(source, cfg=cfg)
    state_dict = dict(model.state_dict())
    tensors = {
        k: TensorInfo(k, None, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()
    }
    return make_plan(source, cfg, tensors, qcfg, out_dtype), model, tokenizer, state_dict


def _load_float_model(job: _Job) -> None:
    """The float model, loaded from exactly the safetensors files the conversion streams (never a pickle)."""
    import torch

    plan, log = job.plan, job.log
    if job.model is None:
        from ..models import load_model

        det_dtype = None
        nbytes, has_f32 = source_bytes(plan.tensors)
        ram = total_ram()
        if has_f32 and ram and nbytes > 0.6 * ram:
            det_dtype = torch.bfloat16  # a float32 7B model (28 GB) would not fit: detect in bfloat16
            log(
                f"the float32 source ({nbytes / 2**30:.1f} GiB) is large for this machine's "
                f"{ram / 2**30:.0f} GiB: detecting in bfloat16"
            )
        log(f"loading {plan.source.name} for super-weight detection ...")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not job.progress:  # -q: transformers' own loading bar too
            hf_logging.disable_progress_bar()
        try:
            job.model, job.tokenizer = load_model(plan.source, dtype=det_dtype, cfg=plan.cfg, tensors=plan.tensors)
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def _detect(job: _Job, prompt: str | None, detect_kwargs: dict | None, detect: bool) -> Any:
    """Detection on the float model (when ``detect``) and, if the config asks for it, the same prompt's
    per-channel input RMS of every quantized Linear (one more forward pass)."""
    need_rms = prompt_stats.needs_prompt(job.qcfg)
    if not (detect or need_rms):
        return None
    _load_float_model(job)
    if job.device.startswith("cuda"):
        job.model.to(job.device)
    detection = None
    try:
        if detect:
            job.log("detecting super weights ...")
            detection = run_detection(job.model, job.tokenizer, prompt, progress=job.progress, **(detect_kwargs or {}))
        if need_rms:
            from ..detect import DEFAULT_PROMPT

            text = getattr(detection, "prompt", None) or prompt or DEFAULT_PROMPT
            job.input_rms = prompt_stats.input_rms(job.model, job.tokenizer, text, job.plan)
            job.rms_prompt = text
            missing = prompt_stats.missing_rms(job.qcfg, job.input_rms, job.plan)
            if missing:
                job.log(
                    f"warning: the prompt's forward pass did not reach {len(missing)} quantized Linears (e.g. "
                    f"{missing[0]}): their fit / hold-out use the weights alone"
                )
    finally:
        if job.device.startswith("cuda"):
            job.model.to("cpu")
    return detection


def _convert(
    source: Source,
    dest: Destination,
    qcfg: Any,
    t_start: float,
    *,
    prompt,
    super_weights,
    activation_outliers,
    dtype,
    device,
    progress,
    max_shard_bytes,
    detect_kwargs,
    log,
) -> dict:
    # ---- validate + plan ----------------------------------------------------------------------------------
    plan, model, tokenizer, state_dict = _load_source(source, qcfg, dtype, log)
    job = _Job(plan, qcfg, dest, device, progress, max_shard_bytes, log, model, tokenizer, state_dict)
    user_sws = None
    if super_weights is not None:
        user_sws = resolve_super_weights(super_weights, plan, where="super weights")
    for name, t in job.stream("checking"):  # NaN/Inf (and every tensor readable) before detection
        check_finite(name, t)

    # ---- detection ----------------------------------------------------------------------------------------
    t_det = time.perf_counter()
    detection = _detect(job, prompt, detect_kwargs, detect=user_sws is None)
    if user_sws is None:
        sws = resolve_super_weights(detection.super_weights, plan, where="detected super weights")
        outliers = resolve_outliers(normalize_outliers(detection.activation_outliers or {}), plan)
    else:
        sws = user_sws
        outliers = resolve_outliers(normalize_outliers(activation_outliers), plan) if activation_outliers else []
        if qcfg.activations != "none" and not outliers:
            log("warning: no activation-outlier channels given; int8 activations will quantize every channel")
    det_s = time.perf_counter() - t_det
    published = None
    if detection is not None:
        published = getattr(detection, "published", None) or published_match(source, plan.cfg, detection)
        if published:
            log(f"published super-weight index: {json.dumps(report.jsonable(published))[:400]}")
    if source.kind == "hf":
        job.model = None  # free the float model before quantizing (streaming from here on)
        gc.collect()
    sw_by_mod: dict[str, list[SuperWeight]] = {}
    for sw in sws:
        sw_by_mod.setdefault(sw.module, []).append(sw)
    job.holdout_counts = prompt_stats.holdout_counts(
        qcfg, plan, job.stream("hold-out budget"), sw_by_mod, job.input_rms, device, log
    )
    for sw in sws:
        log(f"super weight: {sw.module}[{sw.row}, {sw.col}]{'' if qcfg.restore_super_weights else ' (not restored)'}")
    if not sws:
        log("warning: no super weights found/given; only the --holdout fraction is kept exact")

    # ---- quantize + write into the temporary directory ----------------------------------------------------
    src_sha = source_hash(source)
    cid = report.conversion_id(src_sha, qcfg, plan.out_dtype, sws, outliers)
    job.qcfg = qcfg.replace(conversion_id=cid)
    with write_errors(dest.final):
        out = _write(job, sws, outliers)
        job.state_dict = None
        gc.collect()
        t_end = time.perf_counter()
        created = report.now()
        provenance = {
            "source": source.name if source.kind == "gguf" else source.path,
            "source_kind": source.kind,
            "source_sha256": src_sha,
            "prompt": getattr(detection, "prompt", prompt) if detection is not None else job.rms_prompt,
            "fit_prompt": job.rms_prompt,  # the one prompt whose input RMS weighted the fit / budget / ranking, if any
            "thresholds": report.jsonable(getattr(detection, "thresholds", None)) if detection is not None else None,
            "detection": "detect" if detection is not None else ("user" if super_weights else "none"),
            "tool": f"vllm-superweight {__version__}",
            "created": created,
            "published_match": report.jsonable(published),
            "output_dtype": str(plan.out_dtype).replace("torch.", ""),
        }
        sidecar: Sidecar = report.build_sidecar(out["super_weights"], outliers, cid, provenance)
        sidecar.save(os.path.join(dest.tmp, job.qcfg.sidecar))
        timing = {
            "quantize_s": round(out["quantize_s"], 3),
            "params_per_s": round(out["params_q"] / max(out["quantize_s"], 1e-9)),
            "detection_s": round(det_s, 3),
            "total_s": round(t_end - t_start, 3),
            "params_per_s_total": round(out["params_total"] / max(t_end - t_start, 1e-9)),
        }
        rep = report.build_report(
            qcfg_dict=out["config"]["quantization_config"],
            out_dtype=plan.out_dtype,
            device=device,
            files=out["files"],
            modules=out["modules"],
            params_total=out["params_total"],
            output_bytes=out["output_bytes"],
            super_weights_found=len(sws),
            verify=out["verify"],
            outliers=outliers,
            outliers_written=out["outliers_written"],
            timing=timing,
            source=provenance["source"],
            created=created,
            conversion_id=cid,
        )
        write_json(os.path.join(dest.tmp, REPORT_NAME), rep)
        try:
            validate_checkpoint(dest.tmp)  # the reader's checks on what was just written
        except FormatError as e:
            raise ConversionError(f"internal error: the written checkpoint does not validate: {e}") from None
        dest.commit()
    return rep


def _write(job: _Job, sws: list[SuperWeight], outliers: list) -> dict[str, Any]:
    """Stream, quantize and write every tensor into the temporary directory; then config.json and the tokenizer."""
    plan, qcfg, tmp = job.plan, job.qcfg, job.dest.tmp
    sw_by_mod: dict[str, list[SuperWeight]] = {}
    for sw in sws:
        sw_by_mod.setdefault(sw.module, []).append(sw)
    outl_by_mod = {e.module: list(e.channels) for e in outliers} if qcfg.activations != "none" else {}
    writer = ShardWriter(tmp, job.max_shard_bytes)
    modules: dict[str, dict] = {}
    entries: list[SuperWeight] = []
    verify: list[dict] = []
    params_total = params_q = 0
    t_q = 0.0
    for name, t in job.stream("quantizing"):
        if name in plan.drop:
            continue
        params_total += t.numel()
        mod = quantized_module(name, tuple(t.shape), plan.ignore)
        if mod is None or mod not in plan.quant:
            if t.is_floating_point() and t.dtype != plan.out_dtype:
                t = t.to(plan.out_dtype)
                process.check_cast(name, t, plan.out_dtype)
            writer.add(name, t)
            continue
        res = process.quantize_linear(
            name,
            mod,
            t,
            qcfg,
            plan.out_dtype,
            job.device,
            sw_by_mod.get(mod, ()),
            outl_by_mod.get(mod),
            holdout_count=None if job.holdout_counts is None else job.holdout_counts.get(mod),
            fit_weight=prompt_stats.fit_weight(qcfg, job.input_rms, mod),
            holdout_scale=prompt_stats.holdout_scale(qcfg, job.input_rms, mod),
        )
        t_q += res.seconds
        for suffix in sorted(res.tensors):
            writer.add(f"{mod}.{suffix}", res.tensors[suffix])
        res.stats["bytes_in"] = t.numel() * plan.out_dtype.itemsize
        modules[mod] = res.stats
        params_q += t.numel()
        entries += res.super_weights
        verify += res.verify
    files = writer.finish()
    cfg_out = report.output_config(plan, qcfg, job.model)
    write_json(os.path.join(tmp, "config.json"), cfg_out)
    copied = copy_tokenizer_files(plan.source, tmp, job.tokenizer, job.model)
    if not any(f in copied for f in ("tokenizer.json", "vocab.json")) and not any(f.endswith(".model") for f in copied):
        job.log(
            "warning: the source has no tokenizer files; serve the checkpoint with `vllm serve DST --tokenizer ...`"
        )
    return {
        "files": files + sorted(copied),
        "modules": modules,
        "super_weights": entries,
        "verify": verify,
        "params_total": params_total,
        "params_q": params_q,
        "quantize_s": t_q,
        "config": cfg_out,
        "output_bytes": writer.total_bytes,
        "outliers_written": sorted(outl_by_mod),
    }
