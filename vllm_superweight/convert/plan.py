"""Validate and plan a conversion: everything known before any weight is read.

Which tensors are quantized (and their shapes), whether the block layout tiles every one of them, which output
dtype, where the requested super weights and activation-outlier channels land in the checkpoint's naming, and
whether the source's values are finite / fit the output dtype.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..format import (
    DTYPES,
    ActivationOutliers,
    FormatError,
    QuantConfig,
    Sidecar,
    SuperWeight,
    check_sidecar,
    dtype_name,
    is_ignored,
    layer_of,
    tiling_hint,
)
from ..models import Source, TensorInfo, check_architecture, is_tied
from .errors import ConversionError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Parts of multimodal checkpoints that are never quantized (only the text decoder is).
_EXTRA_IGNORE = {"vision_tower": "re:.*vision_tower.*", "multi_modal_projector": "re:.*multi_modal_projector.*"}


@dataclasses.dataclass
class Plan:
    source: Source
    cfg: dict
    model_type: str
    out_dtype: Any  # torch.dtype
    tensors: dict[str, TensorInfo]  # every input tensor
    quant: dict[str, tuple[int, int]]  # quantized module -> (N, K)
    drop: set[str]  # input tensors not written (lm_head when tied)
    ignore: list[str]


def check_device(device: str) -> None:
    import torch

    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConversionError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError("--device cuda: CUDA is not available on this machine")


def quantized_module(name: str, shape: tuple[int, ...], ignore: Iterable[str]) -> str | None:
    """The module name if tensor ``name`` is the weight of a Linear the format quantizes, else None.

    Quantized: 2-D ``*.weight`` tensors inside the decoder layers (``...layers.<i>....``) whose module is not
    ignored (embeddings, lm_head, norms and the ``ignore`` list stay in the output dtype).
    """
    if not name.endswith(".weight") or len(shape) != 2:
        return None
    mod = name[: -len(".weight")]
    if layer_of(mod) is None or is_ignored(mod, ignore):
        return None
    return mod


def resolve_module(name: str, modules: Iterable[str]) -> str | None:
    """Map a module name (transformers' naming, e.g. from detection) to the checkpoint's naming.

    Exact match first; otherwise the unique checkpoint module ending with the same ``layers.<i>.<rest>`` part
    (multimodal wrappers name the text decoder differently in memory and on disk).
    """
    modules = list(modules)
    if name in modules:
        return name
    ms = list(_LAYER_RE.finditer(name))
    if not ms:
        return None
    tail = name[ms[-1].start() :].lstrip(".")
    cands = [x for x in modules if x == tail or x.endswith("." + tail)]
    return cands[0] if len(cands) == 1 else None


def default_dtype(source: Source, cfg: dict) -> str:
    if source.kind == "gguf":
        return "bfloat16"  # GGUF tensors are dequantized to fp32; serve in bf16 (the original HF release's dtype)
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    if d is None and isinstance(cfg.get("text_config"), dict):
        d = cfg["text_config"].get("dtype") or cfg["text_config"].get("torch_dtype")
    d = dtype_name(d) if d else "bfloat16"
    return d if d in DTYPES else "bfloat16"


def refuse_quantized_source(source: Source, cfg: dict) -> None:
    if cfg.get("quantization_config"):
        qc = cfg["quantization_config"]
        qm = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ConversionError(
            f"{source.path} is already quantized (quantization_config.quant_method={qm!r}); convert a float model"
        )


def make_plan(source: Source, cfg: dict, tensors: dict[str, TensorInfo], qcfg: QuantConfig, out_dtype: Any) -> Plan:
    """Which tensors are quantized; refuses a block layout that does not tile EVERY quantized Linear."""
    mt = check_architecture(cfg)
    refuse_quantized_source(source, cfg)
    ignore = list(qcfg.ignore)
    for key, pat in _EXTRA_IGNORE.items():
        if pat not in ignore and any(key in n for n in tensors):
            ignore.append(pat)
    drop: set[str] = set()
    if is_tied(cfg):
        drop |= {n for n in tensors if n == "lm_head.weight" or n.endswith(".lm_head.weight")}
    layout = qcfg.layout
    quant: dict[str, tuple[int, int]] = {}
    bad: list[str] = []
    for name in sorted(tensors):
        info = tensors[name]
        mod = quantized_module(name, info.shape, ignore)
        if mod is None:
            continue
        n, k = info.shape
        try:
            layout.grid(n, k)
        except FormatError as e:
            bad.append(f"{mod} [{n}, {k}]: {e}")
        quant[mod] = (n, k)
    if bad:
        which = f"{len(bad)} of {len(quant)} quantized Linears, e.g. " if len(bad) > 1 else ""
        raise ConversionError(f"block {layout} does not tile {which}{bad[0]} ({tiling_hint(layout, quant.values())})")
    if not quant:
        raise ConversionError(f"{source.path}: found no Linear weights inside decoder layers to quantize")
    return Plan(source, cfg, mt, out_dtype, tensors, quant, drop, ignore)


def resolve_super_weights(requested: Iterable[Any], plan: Plan, where: str = "super weights") -> list[SuperWeight]:
    """Requested super weights in the checkpoint's module naming, deduplicated, checked against the matrices."""
    out: list[SuperWeight] = []
    seen: set[tuple[str, int, int]] = set()
    for x in requested:
        try:
            sw = SuperWeight.coerce(x)
        except FormatError as e:
            raise ConversionError(f"{where}: super weight {x!r}: {e}") from None
        mod = resolve_module(sw.module, plan.quant) or sw.module
        key = (mod, sw.row, sw.col)
        if key in seen:
            continue
        seen.add(key)
        out.append(dataclasses.replace(sw, module=mod, layer=layer_of(mod)))
    try:
        check_sidecar(Sidecar(tuple(out)), plan.quant, where=where, in_what=plan.source.name)
    except FormatError as e:
        raise ConversionError(str(e)) from None
    return out


def normalize_outliers(ao: Any) -> list[ActivationOutliers]:
    """Activation outliers from detection (a dict module -> {"channels", "magnitudes"}) or a sidecar list."""
    if ao is None:
        return []
    if isinstance(ao, Mapping):
        items = [(k, v) for k, v in ao.items()]
    elif isinstance(ao, (list, tuple)):
        items = [(getattr(e, "module", None) if not isinstance(e, Mapping) else e.get("module"), e) for e in ao]
    else:
        raise ConversionError(f"activation outliers: expected a dict or a list, got {type(ao).__name__}")
    out = []
    for i, (mod, v) in enumerate(items):
        try:
            if isinstance(v, ActivationOutliers):
                out.append(v)
            elif isinstance(v, Mapping):
                out.append(ActivationOutliers(mod, v.get("channels", ()), v.get("magnitudes") or ()))
            else:
                out.append(ActivationOutliers(mod, v))
        except FormatError as e:
            raise ConversionError(f"activation outliers[{i}]: {e}") from None
    return out


def resolve_outliers(outliers: Iterable[ActivationOutliers], plan: Plan) -> list[ActivationOutliers]:
    """Outlier channels of quantized modules (others dropped), in checkpoint naming, checked, sorted by layer."""
    out = []
    for e in outliers:
        mod = resolve_module(e.module, plan.quant)
        if mod is None:
            continue  # e.g. a module the format does not quantize
        out.append(dataclasses.replace(e, module=mod))
    out.sort(key=lambda e: (layer_of(e.module) or 0, e.module))
    try:
        check_sidecar(Sidecar((), tuple(out)), plan.quant, where="activation outliers", in_what=plan.source.name)
    except FormatError as e:
        raise ConversionError(str(e)) from None
    return out


def check_finite(name: str, t: Any) -> None:
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return
    # max/min propagate NaN and keep +-Inf: two cheap reductions instead of a full isfinite mask
    if not bool(torch.isfinite(torch.stack([t.amax().float(), t.amin().float()])).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ConversionError(f"tensor {name} holds {kind} values (first at index {bad}); refusing to convert")


def check_cast(name: str, t: Any, out_dtype: Any) -> None:
    """A finite source tensor that overflows the output dtype (e.g. |w| > 65504 in float16) is an error."""
    import torch

    if t.numel() and not bool(torch.isfinite(torch.stack([t.amax().float(), t.amin().float()])).all()):
        raise ConversionError(
            f"tensor {name} overflows {dtype_name(out_dtype)} (values beyond its range); use --dtype bfloat16 "
            "or float32"
        )
