"""Assemble what is written beside the tensors: config.json, the sidecar, the conversion report, the conversion id."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .. import __version__
from ..format import FORMAT_VERSION, ActivationOutliers, QuantConfig, Sidecar, SuperWeight, dtype_name, layer_of


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if hasattr(x, "item"):
        try:
            return x.item()
        except Exception:
            pass
    return str(x)


def conversion_id(
    source_sha256: str,
    qcfg: QuantConfig,
    out_dtype: Any,
    super_weights: Sequence[SuperWeight],
    outliers: Sequence[ActivationOutliers],
) -> str:
    """A content id of the conversion (32 hex digits): the source weights' sha256, the quantization options, the
    output dtype and the super-weight / outlier lists. Deterministic: the same inputs give the same checkpoint."""
    payload = {
        "source_sha256": source_sha256,
        "quantization_config": {k: v for k, v in qcfg.to_dict().items() if k != "conversion_id"},
        "dtype": dtype_name(out_dtype),
        "super_weights": sorted((sw.module, sw.row, sw.col) for sw in super_weights),
        "activation_outliers": [(ao.module, list(ao.channels)) for ao in outliers],
        "tool": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def output_config(plan: Any, qcfg: QuantConfig, model: Any = None) -> dict[str, Any]:
    """config.json of the checkpoint: the source's config, the output dtype and ``quantization_config``."""
    if plan.source.kind == "gguf" and model is not None:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(model).__name__]
    else:
        cfg = dict(plan.cfg)
    dn = dtype_name(plan.out_dtype)
    cfg["dtype"] = dn
    cfg["torch_dtype"] = dn
    if isinstance(cfg.get("text_config"), dict):
        for key in ("dtype", "torch_dtype"):
            if key in cfg["text_config"]:
                cfg["text_config"][key] = dn
    qd = qcfg.to_dict()
    qd["ignore"] = list(plan.ignore)
    cfg["quantization_config"] = qd
    return cfg


def build_sidecar(
    super_weights: Sequence[SuperWeight],
    outliers: Sequence[ActivationOutliers],
    cid: str,
    provenance: Mapping[str, Any],
) -> Sidecar:
    sws = sorted(super_weights, key=lambda e: (e.layer or 0, e.module, e.row, e.col))
    return Sidecar(tuple(sws), tuple(outliers), dict(provenance), cid, FORMAT_VERSION)


def per_layer_summary(modules: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    layers: dict[int, dict[str, Any]] = {}
    for st in modules.values():
        L = layers.setdefault(
            st["layer"],
            {
                "layer": st["layer"],
                "modules": 0,
                "params": 0,
                "sq_err": 0.0,
                "max_abs_err": 0.0,
                "max_rel_fro_err": 0.0,
                "clipped": 0,
                "held_out": 0,
            },
        )
        n = st["shape"][0] * st["shape"][1]
        L["modules"] += 1
        L["params"] += n
        L["sq_err"] += st["mse"] * n
        L["max_abs_err"] = max(L["max_abs_err"], st["max_abs_err"])
        L["max_rel_fro_err"] = max(L["max_rel_fro_err"], st["rel_fro_err"])
        L["clipped"] += st["clipped"]
        L["held_out"] += st["held_out"]
    out = []
    for k in sorted(layers):
        L = layers[k]
        L["mse"] = L.pop("sq_err") / max(L["params"], 1)
        out.append(L)
    return out


def build_report(
    *,
    qcfg_dict: Mapping[str, Any],
    out_dtype: Any,
    device: str,
    files: list[str],
    modules: Mapping[str, Mapping[str, Any]],
    params_total: int,
    output_bytes: int,
    super_weights_found: int,
    verify: list[dict[str, Any]],
    outliers: Sequence[ActivationOutliers],
    outliers_written: list[str],
    timing: Mapping[str, Any],
    source: str,
    created: str,
    conversion_id: str,
) -> dict[str, Any]:
    params_q = sum(st["shape"][0] * st["shape"][1] for st in modules.values())
    held = sum(st["held_out"] for st in modules.values())
    bytes_q_out = sum(st["bytes"] for st in modules.values())
    return {
        "format_version": FORMAT_VERSION,
        "conversion_id": conversion_id,
        "tool": f"vllm-superweight {__version__}",
        "created": created,
        "source": source,
        "quantization_config": dict(qcfg_dict),
        "output_dtype": dtype_name(out_dtype),
        "device": device,
        "files": files,
        "totals": {
            "modules_quantized": len(modules),
            "params_quantized": params_q,
            "params_total": params_total,
            "held_out": held,
            "held_out_fraction": held / max(params_q, 1),
            "quantized_bytes_in": sum(st["bytes_in"] for st in modules.values()),
            "quantized_bytes_out": bytes_q_out,
            "output_bytes": output_bytes,
            "bits_per_weight": 8 * bytes_q_out / max(params_q, 1),
        },
        "super_weights": {
            "found": super_weights_found,
            "restored": sum(1 for v in verify if v["restored"]),
            "all_bit_exact": all(v["bit_exact"] for v in verify if v["restored"]),
            "verify": sorted(verify, key=lambda v: (layer_of(v["module"]) or 0, v["module"], v["row"], v["col"])),
        },
        "activation_outliers": {"modules": len(outliers), "written": sorted(outliers_written)},
        "timing": dict(timing),
        "per_layer": per_layer_summary(modules),
        "modules": {
            k: {kk: vv for kk, vv in v.items() if kk != "bytes_in"}
            for k, v in sorted(modules.items(), key=lambda kv: (kv[1]["layer"], kv[0]))
        },
    }
