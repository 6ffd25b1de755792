"""Presets and option parsing of the converter (``superweight convert --preset NAME --bits ...``).

Presets are package data: ``quant_configs/*.json`` at the top of the repository, installed as the package
``vllm_superweight.quant_configs`` (setuptools ``package-dir``) and read with ``importlib.resources``, so a wheel
install finds them as well as an editable one.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from typing import Any

from ..format import DTYPES, BlockLayout, FormatError, QuantConfig
from .errors import ConversionError

PRESET_PACKAGE = "vllm_superweight.quant_configs"
PRESET_KEYS = frozenset(
    {
        "bits",
        "block",
        "symmetric",
        "clip",
        "clip_threshold",
        "holdout",
        "restore_super_weights",
        "activations",
        "ignore",
        "grid",
        "grid_params",
        "grid_weight",
        "holdout_budget",
        "holdout_rank",
        "holdout_modules",
    }
)


def _preset_files() -> dict[str, Any]:
    """name -> a readable resource (importlib.resources Traversable or path) of every preset JSON."""
    out: dict[str, Any] = {}
    try:
        root = importlib.resources.files(PRESET_PACKAGE)
        for entry in root.iterdir():
            if entry.name.endswith(".json") and entry.is_file():
                out[entry.name[:-5]] = entry
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    if not out:  # a source checkout on PYTHONPATH without an install: the top-level directory
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        d = os.path.join(here, "quant_configs")
        if os.path.isdir(d):
            for fn in os.listdir(d):
                if fn.endswith(".json"):
                    out[fn[:-5]] = _PathResource(os.path.join(d, fn))
    return out


class _PathResource:
    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.basename(path)

    def read_text(self, encoding: str = "utf-8") -> str:
        with open(self.path, encoding=encoding) as f:
            return f.read()

    def __str__(self) -> str:
        return self.path


def list_presets() -> list[str]:
    return sorted(_preset_files())


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's QuantConfig fields (a name from quant_configs/ or a path to a JSON file)."""
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        res: Any = _PathResource(name_or_path)
        label = name_or_path
    else:
        res = _preset_files().get(name_or_path)
        label = f"{name_or_path}.json"
        if res is None:
            available = ", ".join(list_presets()) or "(none)"
            raise ConversionError(f"unknown preset {name_or_path!r}; available: {available}")
    try:
        data = json.loads(res.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"preset {label}: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"preset {label}: expected a JSON object")
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "description"}
    unknown = set(data) - PRESET_KEYS
    if unknown:
        raise ConversionError(f"preset {label}: unknown keys {sorted(unknown)}; allowed: {sorted(PRESET_KEYS)}")
    return data


def parse_clip(text: str) -> tuple[str, float | None]:
    """``"zscore:9"`` -> ("zscore", 9.0); ``"mse"`` -> ("mse", None)."""
    method, _, thr = text.partition(":")
    method = method.strip().lower()
    if not thr:
        return method, None
    try:
        return method, float(thr)
    except ValueError:
        raise ConversionError(f"--clip {text!r}: threshold {thr!r} is not a number") from None


def parse_grid_params(text: str) -> dict[str, float | int]:
    """``"iters=8,beta=30.5"`` -> {"iters": 8, "beta": 30.5}: integers stay integers (``iters`` must be one); the
    keys and ranges are checked by QuantConfig."""
    out: dict[str, float | int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ConversionError(f"--grid-params {text!r}: expected KEY=VALUE pairs, e.g. iters=8,beta=30")
        try:
            out[key.strip()] = int(val)
        except ValueError:
            try:
                out[key.strip()] = float(val)
            except ValueError:
                raise ConversionError(f"--grid-params {text!r}: {key.strip()}={val!r} is not a number") from None
    return out


def build_quant_config(preset: str | None = "default", **overrides: Any) -> QuantConfig:
    """QuantConfig from a preset with explicit (non-None) overrides; validated.

    A ``clip`` override without ``clip_threshold`` resets the preset's threshold (the method's default applies)."""
    fields = load_preset(preset) if preset else {}
    if overrides.get("clip") is not None and "clip_threshold" not in overrides:
        fields.pop("clip_threshold", None)
    for k, v in overrides.items():
        if v is not None or k == "clip_threshold":
            fields[k] = v
    if fields.get("holdout_modules") and overrides.get("holdout_modules") is None and _preset_places_wrongly(fields):
        fields.pop("holdout_modules")
    try:
        return QuantConfig(**fields)
    except TypeError as e:
        raise ConversionError(f"bad quantization options: {e}") from None


def _preset_places_wrongly(fields: dict[str, Any]) -> bool:
    """Whether a preset's ``holdout_modules`` no longer applies after the caller's overrides: no hold-out left
    (``--holdout 0``), or blocks that are not groups -- with per-channel / row / tensor blocks the hold-out in q/k/v
    only kept 34% (SmolLM2) and 88% (Gemma-3) of what every matrix gains (session 14), so every matrix it is."""
    if float(fields.get("holdout") or 0) <= 0:
        return True
    try:
        return BlockLayout.parse(fields.get("block")).kind != "group"
    except FormatError:  # QuantConfig says what is wrong with the block
        return False


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2e9, ``"512MiB"`` -> 2**29."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise ConversionError(f"bad size {text!r}; e.g. 2GB, 500MB")
    unit = (m.group(2) or "").rstrip("b")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    v = int(float(m.group(1)) * mult)
    if v <= 0:
        raise ConversionError(f"bad size {text!r}")
    return v


def torch_dtype(name: str) -> Any:
    """torch dtype of an output dtype name."""
    import torch

    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
    }
    if name not in table:
        raise ConversionError(f"unsupported dtype {name!r}; one of {', '.join(DTYPES)}")
    return table[name]
