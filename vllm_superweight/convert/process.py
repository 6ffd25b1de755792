"""Process one tensor: RTN-quantize one Linear weight into the format's tensors, with its statistics and the
super weights it holds, each verified to come back bit-exact."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from .. import quantize
from ..format import ACT_OUTLIERS, SPARSE_INDEX, FormatError, QuantConfig, SuperWeight, dtype_name, layer_of
from .errors import ConversionError
from .plan import check_cast


@dataclasses.dataclass
class LinearResult:
    tensors: dict[str, Any]  # suffix -> tensor (CPU), what the checkpoint stores for this module
    stats: dict[str, Any]  # quantization error, clipped / held-out counts, bytes (the report's per-module entry)
    super_weights: list[SuperWeight]  # the sidecar entries (exact value in the output dtype, restored or not)
    verify: list[dict[str, Any]]  # the report's bit-exactness check of every super weight
    seconds: float


def quantize_linear(
    name: str,
    mod: str,
    t: Any,
    qcfg: QuantConfig,
    out_dtype: Any,
    device: str = "cpu",
    super_weights: Sequence[SuperWeight] = (),
    outlier_channels: Sequence[int] | None = None,
    holdout_count: int | None = None,
    fit_weight: Any = None,
    holdout_scale: Any = None,
) -> LinearResult:
    """Quantize the weight ``t`` of Linear ``mod`` (tensor ``name``): super weights (and the ``holdout`` fraction,
    or ``holdout_count`` largest weights under a budget) held out and restored exactly, unless
    ``qcfg.restore_super_weights`` is false (then quantized like any weight). ``fit_weight`` [K]: per-input-column
    weight of the grid fit (``grid: hqq``, ``grid_weight: prompt``). ``holdout_scale`` [K]: rank the hold-out by
    ``|w| x holdout_scale[col]`` instead of ``|w|`` (``holdout_rank: prompt``: the prompt's input RMS).
    """
    import torch

    t0 = time.perf_counter()
    w = t.to(out_dtype)
    if t.dtype != out_dtype:
        check_cast(name, w, out_dtype)
    if device != "cpu":
        w = w.to(device)
    coords = [(sw.row, sw.col) for sw in super_weights]
    mask = quantize.select_holdout(
        w,
        qcfg.holdout,
        extra=coords if qcfg.restore_super_weights else [],
        count=holdout_count,
        col_scale=holdout_scale,
    )
    if not qcfg.restore_super_weights:
        for r, c in coords:  # ablation: the super weight is quantized like any other weight
            mask[r, c] = False
    try:
        ql = quantize.quantize_weight(
            w,
            qcfg.bits,
            qcfg.layout,
            qcfg.symmetric,
            qcfg.clip.value,
            qcfg.clip_threshold,
            mask,
            scale_dtype=out_dtype,
            grid=qcfg.grid.value,
            grid_params=dict(qcfg.grid_params) or None,
            col_weight=None if fit_weight is None else fit_weight.to(w.device),
        )
    except FormatError as e:
        raise ConversionError(f"{name}: {e}") from None
    ts = {k: v.detach().cpu() for k, v in quantize.to_tensors(ql, out_dtype).items()}
    if outlier_channels:
        ts[ACT_OUTLIERS] = torch.tensor(sorted(set(outlier_channels)), dtype=torch.int32)
    seconds = time.perf_counter() - t0
    st = dict(ql.stats)
    st["layer"] = layer_of(mod)
    st["super_weights"] = len(coords)
    st["bytes"] = int(sum(v.numel() * v.element_size() for v in ts.values()))
    entries, verify = _verify_super_weights(mod, w, ts, qcfg, out_dtype, super_weights)
    return LinearResult(ts, st, entries, verify, seconds)


def _verify_super_weights(
    mod: str, w: Any, ts: dict[str, Any], qcfg: QuantConfig, out_dtype: Any, super_weights: Sequence[SuperWeight]
) -> tuple[list[SuperWeight], list[dict[str, Any]]]:
    import torch

    if not super_weights:
        return [], []
    deq = quantize.dequantize_tensors(ts, qcfg.bits, qcfg.symmetric, qcfg.layout, restore=True)
    wc = w.detach().cpu()
    held: set[tuple[int, int]] = set()
    if SPARSE_INDEX in ts:
        held = set(zip(ts[SPARSE_INDEX][0].tolist(), ts[SPARSE_INDEX][1].tolist(), strict=True))
    bits_view = torch.int32 if out_dtype == torch.float32 else torch.int16
    dn = dtype_name(out_dtype)
    entries, verify = [], []
    for sw in super_weights:
        orig = wc[sw.row, sw.col]
        got = deq[sw.row, sw.col].to(out_dtype)
        exact = bool(got.view(bits_view) == orig.view(bits_view))
        restored = (sw.row, sw.col) in held
        if qcfg.restore_super_weights and not (restored and exact):
            raise ConversionError(
                f"internal error: super weight {mod}[{sw.row}, {sw.col}] does not come back "
                f"bit-exact ({float(got)} != {float(orig)})"
            )
        value = float(orig)
        entries.append(
            dataclasses.replace(
                sw, module=mod, layer=layer_of(mod), value=value, dtype=dn, bits=None, restored=restored
            )
        )
        verify.append(
            {
                "module": mod,
                "row": sw.row,
                "col": sw.col,
                "value": value,
                "dequantized": float(got),
                "restored": restored,
                "bit_exact": exact,
                "abs_err": abs(float(got) - value),
            }
        )
    return entries, verify
