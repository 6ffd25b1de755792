"""The superweight_rtn checkpoint format, specified in one place (see FORMAT.md for the prose).

Everything that reads or writes a checkpoint (converter, vLLM plugin, eval, tests) goes through the names,
constants, types and validators of this module. One type per concept, each validated in one place:

* ``BlockLayout``: how the quantization blocks tile a weight (``BlockLayout.parse`` is the only parser);
* ``QuantConfig``: the ``quantization_config`` block of config.json (``from_dict`` is strict and names the field);
* ``SuperWeight``: one super weight (detected, requested by the user, or listed in a sidecar);
* ``Sidecar``: ``superweights.json`` (super weights, activation-outlier channels, provenance, conversion id);
* ``check_sidecar``: super weights / outlier channels against the shapes of the quantized Linears;
* ``resolve_inside``: a file name read from a checkpoint must stay inside the checkpoint directory.

The format is versioned by ``FORMAT_VERSION``; readers accept every minor version of their major version.
This module needs only the standard library (the vLLM plugin, the converter and the llm-compressor venv import it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import numbers
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

QUANT_METHOD = "superweight_rtn"
FORMAT_VERSION = "1.4"  # 1.1: conversion_id in config + sidecar; 1.2: grid / holdout_budget; 1.3: holdout_rank;
# 1.4: holdout_modules (1.2-1.4 add informational fields only: the tensors and their meaning are unchanged)
FORMAT_MAJOR = FORMAT_VERSION.split(".")[0]
SIDECAR_NAME = "superweights.json"
REPORT_NAME = "conversion_report.json"
PACKING = "pack-quantized"

SUPPORTED_BITS = (3, 4, 8)
DTYPES = ("bfloat16", "float16", "float32")  # checkpoint dtypes (scales, sparse values, unquantized tensors)


class _StrEnum(str, enum.Enum):
    """A str-valued enum that compares, hashes, prints and serializes as its value (``ActScheme.NONE == "none"``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ActScheme(_StrEnum):
    NONE = "none"
    INT8_TOKEN = "int8-token"  # int8 dynamic per token
    INT8_TENSOR = "int8-tensor"  # int8 dynamic per tensor


class ClipMethod(_StrEnum):
    NONE = "none"
    ZSCORE = "zscore"
    BLOCK_PCT = "block_pct"
    TENSOR_PCT = "tensor_pct"
    IQR = "iqr"
    MSE = "mse"


class GridMethod(_StrEnum):
    MINMAX = "minmax"  # the block's range (after clipping)
    HQQ = "hqq"  # fitted to the block's weights (half-quadratic splitting, integer zero points: grid.fit_grid)


class GridWeight(_StrEnum):
    NONE = "none"  # every weight of a block counts the same in the fit (weights only)
    PROMPT = "prompt"  # weighted per input column by one prompt's input RMS^2 (the detector's forward pass)


class HoldoutBudget(_StrEnum):
    UNIFORM = "uniform"  # ceil(holdout * N * K) largest-|w| weights of every matrix
    REL_OUT = "rel_out"  # the same total spent where one prompt's relative output error drops most
    REL_W = "rel_w"  # the same total spent where the relative weight error drops most


class HoldoutRank(_StrEnum):
    ABS = "abs"  # the largest |w| of a matrix are held out (absent from a config: this)
    PROMPT = "prompt"  # the largest |w| x the column's input RMS over one prompt (the detector's forward pass)


GRID_PARAM_KEYS = ("iters", "lp", "beta", "kappa")
ACT_SCHEMES = tuple(a.value for a in ActScheme)
GRID_METHODS = tuple(g.value for g in GridMethod)
GRID_WEIGHTS = tuple(g.value for g in GridWeight)
HOLDOUT_BUDGETS = tuple(b.value for b in HoldoutBudget)
HOLDOUT_RANKS = tuple(r.value for r in HoldoutRank)
CLIP_METHODS = tuple(c.value for c in ClipMethod)

# Tensor suffixes of one quantized Linear ``<prefix>.<suffix>`` in the safetensors shards.
W_PACKED = "weight_packed"  # int32 [N, ceil(K / (32 // bits))], compressed-tensors pack_to_int32, packed along K
W_SCALE = "weight_scale"  # float [NB, NG] (group/channel: [N, K // G]; rows:R: [N // R, 1]; tensor: [1, 1])
W_ZERO = "weight_zero_point"  # int32 [ceil(NB / (32 // bits)), NG], packed along dim 0 (asymmetric only)
W_SHAPE = "weight_shape"  # int64 [2] = (N, K)
SPARSE_INDEX = "sparse_index"  # int32 [2, nnz]: (row, col) of every held-out weight (super weights + --holdout)
SPARSE_VALUE = "sparse_value"  # float [nnz]: the exact original values (checkpoint dtype)
ACT_OUTLIERS = "act_outlier_channels"  # int32 [S]: input channels kept in 16-bit when activations are int8

LINEAR_SUFFIXES = (W_PACKED, W_SCALE, W_ZERO, W_SHAPE, SPARSE_INDEX, SPARSE_VALUE, ACT_OUTLIERS)

# Modules never quantized (matched against the module name).
DEFAULT_IGNORE = ("re:.*embed_tokens$", "re:.*lm_head$", "re:.*norm$", "re:.*layernorm$")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class FormatError(ValueError):
    """A checkpoint or an option that the format cannot represent / a reader cannot serve (one-line message)."""


# ----------------------------------------------------------------------------------------------------------
# typed field readers: every message names the field (callers prefix where the field lives)
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _context(prefix: str) -> Iterator[None]:
    """Prefix the message of a FormatError raised inside (``prefix`` + ``"field: problem"``)."""
    try:
        yield
    except FormatError as e:
        raise FormatError(f"{prefix}{e}") from None


def _int(v: Any, field: str, what: str = "an integer") -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise FormatError(f"{field}: expected {what}, got {v!r}")
    return int(v)


def _num(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise FormatError(f"{field}: expected a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise FormatError(f"{field}: expected a finite number, got {f!r}")
    return f


def _opt_num(v: Any, field: str) -> float | None:
    return None if v is None else _num(v, field)


def _bool(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise FormatError(f"{field}: expected true or false, got {v!r}")
    return v


def _opt_bool(v: Any, field: str) -> bool | None:
    return None if v is None else _bool(v, field)


def _str(v: Any, field: str) -> str:
    if not isinstance(v, str) or not v:
        raise FormatError(f"{field}: expected a non-empty string, got {v!r}")
    return v


def _obj(v: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise FormatError(f"{field}: expected an object, got {v!r}")
    return v


def _list(v: Any, field: str) -> list[Any]:
    if not isinstance(v, (list, tuple)):
        raise FormatError(f"{field}: expected a list, got {v!r}")
    return list(v)


def _enum(cls: type[_StrEnum], v: Any, field: str, what: str) -> Any:
    if isinstance(v, cls):
        return v
    if isinstance(v, str):
        try:
            return cls(v.strip().lower())
        except ValueError:
            pass
    raise FormatError(f"{field}: unknown {what} {v!r}; one of {', '.join(m.value for m in cls)}")


def _version(v: Any, field: str, what: str) -> tuple[str, int]:
    """(version, minor) of a supported ``MAJOR.MINOR`` version string; FormatError otherwise."""
    ver = v if isinstance(v, str) else ("" if v is None else repr(v))
    m = re.fullmatch(r"(\d+)\.(\d+)", ver) if isinstance(v, str) else None
    if m is None or m.group(1) != FORMAT_MAJOR:
        raise FormatError(
            f"{field}: {what} format version {ver or '(missing)'} is not supported by this vllm-superweight "
            f"(reads {FORMAT_MAJOR}.x, writes {FORMAT_VERSION}); re-convert the model with this version"
        )
    return ver, int(m.group(2))


def layer_of(name: str) -> int | None:
    """The decoder layer index in a module / tensor name (the last ``layers.<i>.``), or None."""
    ms = list(_LAYER_RE.finditer(name))
    return int(ms[-1].group(1)) if ms else None


def dtype_name(dt: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (works on torch dtypes and on their names)."""
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------
# Block layouts
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How the quantization blocks tile one [N, K] weight.

    kind == "group":   groups of ``size`` consecutive input elements within a row.
    kind == "channel": one whole row.
    kind == "rows":    blocks of ``size`` whole rows (R * K contiguous elements: the paper's flattened blocks).
    kind == "tensor":  one block for the whole matrix.
    """

    kind: str  # "group" | "channel" | "rows" | "tensor"
    size: int = 0  # G for group, R for rows

    def __post_init__(self) -> None:
        if self.kind == "group" and (self.size < 2 or self.size % 2):
            raise FormatError(f"block: group size must be an even number >= 2, got {self.size}")
        if self.kind == "rows" and self.size < 2:
            raise FormatError(f"block: rows:R needs R >= 2, got {self.size}")
        if self.kind not in ("group", "channel", "rows", "tensor"):
            raise FormatError(f"block: unknown block kind {self.kind!r}")

    @staticmethod
    def parse(text: Any) -> BlockLayout:
        """The one parser of block strings: ``"64"``/``"g64"``, ``"channel"``, ``"rows:R"``, ``"tensor"``."""
        if isinstance(text, BlockLayout):
            return text
        if isinstance(text, bool) or not isinstance(text, (str, int)):
            raise FormatError(f"block: expected a block layout string, got {text!r}")
        s = str(text).strip().lower()
        if s in ("channel", "row", "per-channel"):
            return BlockLayout("channel")
        if s in ("tensor", "per-tensor"):
            return BlockLayout("tensor")
        m = re.fullmatch(r"rows:(\d+)", s)
        if m:
            r = int(m.group(1))
            if r < 1:
                raise FormatError(f"block: {text!r}: rows:R needs R >= 1")
            return BlockLayout("rows", r) if r > 1 else BlockLayout("channel")
        m = re.fullmatch(r"g?(\d+)", s)
        if m:
            g = int(m.group(1))
            if g < 2 or g % 2:
                raise FormatError(f"block: {text!r}: group size must be an even number >= 2")
            return BlockLayout("group", g)
        raise FormatError(
            f"block: unknown block layout {text!r}; use a group size (32, 64, 128, 256, ...), 'channel', 'rows:R' "
            "or 'tensor'"
        )

    def __str__(self) -> str:
        if self.kind == "group":
            return str(self.size)
        if self.kind == "rows":
            return f"rows:{self.size}"
        return self.kind

    def grid(self, n: int, k: int) -> tuple[int, int]:
        """(row blocks, column groups) of the scale grid for an [n, k] weight; raises if it does not tile."""
        if self.kind == "group":
            if k % self.size:
                raise FormatError(f"group size {self.size} does not divide the input dimension {k}")
            return n, k // self.size
        if self.kind == "channel":
            return n, 1
        if self.kind == "rows":
            if n % self.size:
                raise FormatError(f"rows:{self.size} does not divide the output dimension {n}")
            return n // self.size, 1
        return 1, 1

    def rows_per_block(self, n: int) -> int:
        return {"group": 1, "channel": 1, "rows": self.size, "tensor": n}[self.kind]


_GROUP_CANDIDATES = (32, 64, 128, 256)
_ROWS_CANDIDATES = (2, 4, 8, 16, 32, 64)


def tiling_hint(layout: BlockLayout, shapes: Iterable[tuple[int, int]]) -> str:
    """What to choose instead of ``layout`` so that EVERY [N, K] of ``shapes`` is tiled (never group 1)."""
    shapes = list(shapes)
    if layout.kind == "rows":
        ok = [r for r in _ROWS_CANDIDATES if all(n % r == 0 for n, _ in shapes)]
        if ok:
            return f"R values that tile every quantized Linear of this model: {', '.join(map(str, ok))}"
        return "no rows:R tiles every quantized Linear of this model; use 'channel' or 'tensor'"
    ok = [g for g in _GROUP_CANDIDATES if all(k % g == 0 for _, k in shapes)]
    if ok:
        return f"group sizes that tile every quantized Linear of this model: {', '.join(map(str, ok))}, or 'channel'"
    return "no group size tiles every quantized Linear of this model; use 'channel'"


def pack_factor(bits: int) -> int:
    return 32 // bits


def packed_cols(k: int, bits: int) -> int:
    return math.ceil(k / pack_factor(bits))


def is_ignored(name: str, ignore: Iterable[str]) -> bool:
    return matches_any(name, ignore)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """``name`` is one of ``patterns``: a module name, a suffix of it after a dot (``q_proj``), or ``re:REGEX``
    matching the whole name (the syntax of ``ignore`` and ``holdout_modules``)."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# quantization_config
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, init=False)
class QuantConfig:
    """The ``quantization_config`` block of config.json (what ``superweight convert`` writes), validated.

    ``QuantConfig(bits=4, block="64", ...)`` for callers (``block`` is parsed once into ``layout``);
    ``QuantConfig.from_dict(d)`` for untrusted JSON (strict types, messages name the field).
    """

    bits: int
    layout: BlockLayout
    symmetric: bool
    clip: ClipMethod
    clip_threshold: float | None
    holdout: float  # fraction of the weights of every matrix kept exact (besides super weights; holdout_rank)
    restore_super_weights: bool
    activations: ActScheme
    ignore: tuple[str, ...]
    sidecar: str
    format_version: str
    quant_method: str
    conversion_id: str | None  # format >= 1.1: the id shared with the sidecar (None: not converted yet / 1.0)
    grid: GridMethod  # how block scales / zero points are chosen (the stored tensors are the same either way)
    grid_params: tuple[tuple[str, float], ...]  # overrides of grid.DEFAULT_GRID_PARAMS (hqq), sorted
    grid_weight: GridWeight
    holdout_budget: HoldoutBudget
    holdout_rank: HoldoutRank  # which weights the hold-out keeps (format >= 1.3; absent: abs)
    # the matrices the hold-out is spent in (format >= 1.4; empty / absent: every matrix): the total stays
    # ``holdout`` x all quantized weights; the others keep their super weights only
    holdout_modules: tuple[str, ...]

    def __init__(
        self,
        bits: int = 4,
        block: str | int | BlockLayout | None = None,
        symmetric: bool = False,
        clip: str | ClipMethod = "none",
        clip_threshold: float | None = None,
        holdout: float = 0.0,
        restore_super_weights: bool = True,
        activations: str | ActScheme = "none",
        ignore: Iterable[str] | None = None,
        sidecar: str = SIDECAR_NAME,
        format_version: str = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        conversion_id: str | None = None,
        *,
        layout: BlockLayout | str | None = None,
        grid: str | GridMethod = "minmax",
        grid_params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        grid_weight: str | GridWeight = "none",
        holdout_budget: str | HoldoutBudget = "uniform",
        holdout_rank: str | HoldoutRank = "abs",
        holdout_modules: Iterable[str] | None = None,
    ) -> None:
        if block is not None and layout is not None:
            raise FormatError("block: give block or layout, not both")
        b = layout if layout is not None else (block if block is not None else "channel")
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
            raise FormatError(f"bits: expected an integer ({', '.join(map(str, SUPPORTED_BITS))}), got {bits!r}")
        if int(bits) not in SUPPORTED_BITS:
            raise FormatError(f"bits: unsupported bits {bits!r}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        lay = BlockLayout.parse(b)
        sym = _bool(symmetric, "symmetric")
        cm = _enum(ClipMethod, clip, "clip", "clip method")
        thr = _opt_num(clip_threshold, "clip_threshold")
        ho = _num(holdout, "holdout")
        if not 0.0 <= ho < 0.5:
            raise FormatError(f"holdout: holdout fraction must be in [0, 0.5), got {holdout}")
        rsw = _bool(restore_super_weights, "restore_super_weights")
        act = _enum(ActScheme, activations, "activations", "activation scheme")
        ign = _patterns(DEFAULT_IGNORE if ignore is None else ignore, "ignore")
        hmods = _patterns(holdout_modules or (), "holdout_modules")
        if hmods and ho <= 0:
            raise FormatError("holdout_modules: names the matrices a hold-out is spent in; it needs holdout > 0")
        sc = _str(sidecar, "sidecar")
        _version(format_version, "format_version", "checkpoint")
        if quant_method != QUANT_METHOD:
            raise FormatError(f"quant_method: {quant_method!r} is not {QUANT_METHOD!r}")
        if conversion_id is not None:
            _conversion_id(conversion_id, "conversion_id")
        gm = _enum(GridMethod, grid, "grid", "grid method")
        gw = _enum(GridWeight, grid_weight, "grid_weight", "grid weighting")
        hb = _enum(HoldoutBudget, holdout_budget, "holdout_budget", "hold-out budget")
        hr = _enum(HoldoutRank, holdout_rank, "holdout_rank", "hold-out ranking")
        gp_items = dict(grid_params.items() if isinstance(grid_params, Mapping) else (grid_params or ()))
        for key, v in gp_items.items():
            if key not in GRID_PARAM_KEYS:
                raise FormatError(f"grid_params.{key}: unknown parameter; one of {', '.join(GRID_PARAM_KEYS)}")
            gp_items[key] = _int(v, f"grid_params.{key}") if key == "iters" else _num(v, f"grid_params.{key}")
        gp = tuple(sorted(gp_items.items()))
        if gm == GridMethod.MINMAX and (gp or gw != GridWeight.NONE):
            raise FormatError("grid: grid_params / grid_weight need grid 'hqq' (min/max has nothing to fit)")
        if act != ActScheme.NONE:
            if int(bits) != 8 or not sym:
                raise FormatError("activations: int8 activations need --bits 8 --symmetric (int8 x int8 GEMM)")
            if lay.kind == "group":
                raise FormatError(
                    "activations: int8 activations need per-row weight scales: --block channel, rows:R or tensor"
                )
        for name, value in (
            ("bits", int(bits)),
            ("layout", lay),
            ("symmetric", sym),
            ("clip", cm),
            ("clip_threshold", thr),
            ("holdout", ho),
            ("restore_super_weights", rsw),
            ("activations", act),
            ("ignore", ign),
            ("sidecar", sc),
            ("format_version", format_version),
            ("quant_method", quant_method),
            ("conversion_id", conversion_id),
            ("grid", gm),
            ("grid_params", gp),
            ("grid_weight", gw),
            ("holdout_budget", hb),
            ("holdout_rank", hr),
            ("holdout_modules", hmods),
        ):
            object.__setattr__(self, name, value)

    @property
    def block(self) -> str:
        """The layout as written in config.json (``str(self.layout)``)."""
        return str(self.layout)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes`` (validated again); ``block=`` is accepted as well as ``layout=``."""
        if "block" in changes:
            changes["layout"] = changes.pop("block")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "bits": self.bits,
            "block": str(self.layout),
            "symmetric": self.symmetric,
            "clip": {"method": self.clip.value, "threshold": self.clip_threshold},
            "holdout": self.holdout,
            "restore_super_weights": self.restore_super_weights,
            "activations": self.activations.value,
            "ignore": list(self.ignore),
            "packing": PACKING,
            "sidecar": self.sidecar,
        }
        if self.conversion_id is not None:
            d["conversion_id"] = self.conversion_id
        if self.grid != GridMethod.MINMAX or self.holdout_budget != HoldoutBudget.UNIFORM:
            d["grid"] = {"method": self.grid.value, "params": dict(self.grid_params), "weight": self.grid_weight.value}
            d["holdout_budget"] = self.holdout_budget.value
        d["holdout_rank"] = self.holdout_rank.value
        if self.holdout_modules:
            d["holdout_modules"] = list(self.holdout_modules)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "quantization_config") -> QuantConfig:
        """Strict reader of config.json's ``quantization_config``; unknown keys are ignored (minor versions)."""
        if not isinstance(d, Mapping):
            raise FormatError(f"{where}: expected an object, got {d!r}")
        d = dict(d)
        p = f"{where}."
        qm = d.get("quant_method")
        if not isinstance(qm, str) or qm.lower() != QUANT_METHOD:
            raise FormatError(f"{p}quant_method: quant_method is {qm!r}, not {QUANT_METHOD!r}")
        with _context(p):
            ver, _ = _version(d.get("format_version"), "format_version", "checkpoint")
            for key in ("bits", "block"):
                if key not in d:
                    raise FormatError(f"{key}: missing")
            bits = _int(d["bits"], "bits", f"an integer ({', '.join(map(str, SUPPORTED_BITS))})")
            block = d["block"]
            if isinstance(block, bool) or not isinstance(block, (str, int)):
                raise FormatError(f"block: expected a block layout string, got {block!r}")
            clip = d.get("clip", {"method": "none", "threshold": None})
            clip = _obj({"method": "none"} if clip is None else clip, "clip")
            method = clip.get("method", "none")
            if not isinstance(method, str):
                raise FormatError(f"clip.method: expected a string, got {method!r}")
            packing = d.get("packing", PACKING)
            if packing != PACKING:
                raise FormatError(f"packing: {packing!r} is not {PACKING!r}")
            ignore = d.get("ignore", list(DEFAULT_IGNORE))
            for i, pat in enumerate(_list(ignore, "ignore")):
                _str(pat, f"ignore[{i}]")
            hmods = d.get("holdout_modules") or []
            for i, pat in enumerate(_list(hmods, "holdout_modules")):
                _str(pat, f"holdout_modules[{i}]")
            cid = d.get("conversion_id")
            grid = _obj(d.get("grid") or {"method": "minmax"}, "grid")
            gparams = _obj(grid.get("params") or {}, "grid.params")
            try:
                return cls(
                    bits=bits,
                    block=block,
                    symmetric=d.get("symmetric", False),
                    clip=method,
                    clip_threshold=clip.get("threshold"),
                    holdout=d.get("holdout", 0.0),
                    restore_super_weights=d.get("restore_super_weights", True),
                    activations=d.get("activations", "none"),
                    ignore=ignore,
                    sidecar=d.get("sidecar", SIDECAR_NAME),
                    format_version=ver,
                    conversion_id=cid,
                    grid=grid.get("method", "minmax"),
                    grid_params=gparams,
                    grid_weight=grid.get("weight", "none"),
                    holdout_budget=d.get("holdout_budget", "uniform"),
                    holdout_rank=d.get("holdout_rank", "abs"),
                    holdout_modules=hmods,
                )
            except FormatError as e:
                if str(e).startswith("clip_threshold:"):
                    raise FormatError(f"clip.threshold{str(e)[len('clip_threshold') :]}") from None
                if str(e).startswith("clip:"):
                    raise FormatError(f"clip.method{str(e)[len('clip') :]}") from None
                for ours, theirs in (
                    ("grid_params.", "grid.params."),
                    ("grid_weight:", "grid.weight:"),
                    ("grid:", "grid.method:"),
                ):
                    if str(e).startswith(ours):
                        raise FormatError(theirs + str(e)[len(ours) :]) from None
                raise


def _patterns(pats: Any, field: str) -> tuple[str, ...]:
    """A validated tuple of module names / name suffixes / ``re:`` patterns (``ignore``, ``holdout_modules``)."""
    out = () if isinstance(pats, str) else tuple(pats)
    if isinstance(pats, str) or not all(isinstance(p, str) and p for p in out):
        raise FormatError(f"{field}: expected a list of module names / 're:' patterns, got {pats!r}")
    for p in out:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise FormatError(f"{field}: bad pattern {p!r} ({e})") from None
    return out


def _conversion_id(v: Any, field: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[0-9A-Za-z_-]{8,128}", v):
        raise FormatError(f"{field}: expected an id of 8-128 letters/digits, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------------------
# Super weights and the sidecar (superweights.json)
# ----------------------------------------------------------------------------------------------------------
_HEX_DIGITS = {"float32": 8, "float16": 4, "bfloat16": 4}


def float_bits_hex(value: float, dtype: str) -> str:
    """Bit pattern of ``value`` in ``dtype`` as hex, big-endian (so the exact original value survives JSON)."""
    if dtype in ("float32", "fp32"):
        return struct.pack(">f", value).hex()
    if dtype in ("float16", "fp16", "half"):
        return struct.pack(">e", value).hex()
    if dtype in ("bfloat16", "bf16"):
        return struct.pack(">f", value).hex()[:4]
    raise FormatError(f"dtype: unsupported dtype {dtype!r}; one of {', '.join(DTYPES)}")


def float_from_bits_hex(h: str, dtype: str) -> float:
    if dtype in ("float32", "fp32"):
        return struct.unpack(">f", bytes.fromhex(h))[0]
    if dtype in ("float16", "fp16", "half"):
        return struct.unpack(">e", bytes.fromhex(h))[0]
    if dtype in ("bfloat16", "bf16"):
        return struct.unpack(">f", bytes.fromhex(h + "0000"))[0]
    raise FormatError(f"dtype: unsupported dtype {dtype!r}; one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class SuperWeight:
    """One super weight ``<module>.weight[row, col]`` (nn.Linear [out, in]) of a down projection.

    A *requested* super weight (user input, before conversion) may lack ``value``/``dtype``; a detected one or a
    sidecar entry has them, and ``bits`` is then the value's bit pattern in ``dtype`` (derived when not given,
    checked when given). ``layer`` is derived from ``module`` when not given.
    """

    module: str
    row: int
    col: int
    value: float | None = None  # exact original value (in ``dtype``)
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"
    bits: str | None = None  # hex bit pattern of value in dtype, big-endian
    layer: int | None = None
    restored: bool = True  # held out and restored exactly (False: quantized like any weight, an ablation)
    input_spike: float | None = None  # x[t, col] when it was found (signed)
    output_spike: float | None = None  # y[t, row] when it was found (signed)
    confirmed: bool | None = None  # None: not checked by ablation
    ablation: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "module", _str(self.module, "module"))
        set_(self, "row", _int(self.row, "row"))
        set_(self, "col", _int(self.col, "col"))
        if self.layer is None:
            set_(self, "layer", layer_of(self.module))
        else:
            set_(self, "layer", _int(self.layer, "layer"))
        set_(self, "restored", _bool(self.restored, "restored"))
        set_(self, "input_spike", _opt_num(self.input_spike, "input_spike"))
        set_(self, "output_spike", _opt_num(self.output_spike, "output_spike"))
        set_(self, "confirmed", _opt_bool(self.confirmed, "confirmed"))
        if self.ablation is not None:
            _obj(self.ablation, "ablation")
        if self.value is not None:
            set_(self, "value", _num(self.value, "value"))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise FormatError(f"dtype: unsupported dtype {self.dtype!r}; one of {', '.join(DTYPES)}")
        if self.bits is not None:
            if not isinstance(self.bits, str) or not re.fullmatch(r"[0-9a-fA-F]+", self.bits):
                raise FormatError(f"bits: expected a hex string, got {self.bits!r}")
            if self.value is None or self.dtype is None:
                raise FormatError("bits: given without value and dtype")
            set_(self, "bits", self.bits.lower())
        if self.value is not None and self.dtype is not None:
            want = float_bits_hex(self.value, self.dtype)
            if float_from_bits_hex(want, self.dtype) != self.value:
                raise FormatError(f"value: {self.value!r} is not representable in {self.dtype}")
            if self.bits is None:
                set_(self, "bits", want)
            elif len(self.bits) != _HEX_DIGITS[self.dtype] or self.bits != want:
                raise FormatError(
                    f"bits: {self.bits!r} is not the bit pattern of value {self.value!r} in {self.dtype} ({want!r})"
                )
        elif self.value is not None or self.dtype is not None:
            raise FormatError("value and dtype: give both or neither")

    @property
    def coord(self) -> tuple[int | None, int, int]:
        return (self.layer, self.row, self.col)

    @property
    def requested(self) -> bool:
        """A location only (no value yet)."""
        return self.value is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "module": self.module,
            "layer": self.layer,
            "row": self.row,
            "col": self.col,
            "value": self.value,
            "bits": self.bits,
            "dtype": self.dtype,
            "input_spike": self.input_spike,
            "output_spike": self.output_spike,
            "confirmed": self.confirmed,
            "restored": self.restored,
        }
        if self.ablation is not None:
            d["ablation"] = dict(self.ablation)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, require_value: bool = True) -> SuperWeight:
        """From JSON (a sidecar entry; ``require_value=False``: a user request ``{"module"|"layer", "row", "col"}``).

        Raises FormatError naming the field (relative: ``"row: expected an integer, got 'abc'"``)."""
        if not isinstance(d, Mapping):
            raise FormatError(f"expected an object, got {d!r}")
        need = ("module", "row", "col", "value", "bits", "dtype") if require_value else ("row", "col")
        for key in need:
            if key not in d:
                raise FormatError(f"{key}: missing")
        module = d.get("module")
        if module is None:
            if d.get("layer") is None:
                raise FormatError("module: missing (give 'module' or 'layer')")
            module = f"model.layers.{_int(d['layer'], 'layer')}.mlp.down_proj"
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "module"}
        if "restored" in kw and kw["restored"] is None:
            kw.pop("restored")
        return cls(module=module, **kw)

    @classmethod
    def coerce(cls, x: Any) -> SuperWeight:
        """A requested super weight from user input: ``[layer, row, col]``, a dict, a SuperWeight, or any object
        with the attributes (e.g. a detection result)."""
        if isinstance(x, SuperWeight):
            return x
        if isinstance(x, (list, tuple)):
            if len(x) != 3:
                raise FormatError(f"expected [layer, row, col], got {list(x)!r}")
            layer = _int(x[0], "layer")
            return cls(module=f"model.layers.{layer}.mlp.down_proj", layer=layer, row=x[1], col=x[2])
        if isinstance(x, Mapping):
            return cls.from_dict(x, require_value=False)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls.from_dict({k: getattr(x, k) for k in names if getattr(x, k, None) is not None}, require_value=False)


@dataclasses.dataclass(frozen=True)
class ActivationOutliers:
    """Input channels of one quantized Linear kept in 16-bit when activations are int8."""

    module: str
    channels: tuple[int, ...]
    magnitudes: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "module", _str(self.module, "module"))
        object.__setattr__(
            self, "channels", tuple(_int(c, f"channels[{i}]") for i, c in enumerate(_list(self.channels, "channels")))
        )
        object.__setattr__(
            self,
            "magnitudes",
            tuple(_num(m, f"magnitudes[{i}]") for i, m in enumerate(_list(self.magnitudes, "magnitudes"))),
        )
        if self.magnitudes and len(self.magnitudes) != len(self.channels):
            raise FormatError(f"magnitudes: {len(self.magnitudes)} values for {len(self.channels)} channels")

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "channels": list(self.channels), "magnitudes": list(self.magnitudes)}

    @classmethod
    def from_dict(cls, d: Any) -> ActivationOutliers:
        d = _obj(d, "(entry)")
        for key in ("module", "channels"):
            if key not in d:
                raise FormatError(f"{key}: missing")
        return cls(d["module"], d["channels"], d.get("magnitudes") or ())


@dataclasses.dataclass(frozen=True)
class Sidecar:
    """``superweights.json``: the super weights, the activation-outlier channels, provenance, conversion id."""

    super_weights: tuple[SuperWeight, ...] = ()
    activation_outliers: tuple[ActivationOutliers, ...] = ()
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    conversion_id: str | None = None
    format_version: str = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "super_weights", tuple(self.super_weights))
        object.__setattr__(self, "activation_outliers", tuple(self.activation_outliers))
        seen: dict[tuple[str, int, int], int] = {}
        for i, sw in enumerate(self.super_weights):
            if not isinstance(sw, SuperWeight):
                raise FormatError(f"super_weights[{i}]: expected a SuperWeight, got {sw!r}")
            key = (sw.module, sw.row, sw.col)
            if key in seen:
                raise FormatError(
                    f"super_weights[{i}]: {sw.module}[{sw.row}, {sw.col}] is listed twice "
                    f"(also super_weights[{seen[key]}])"
                )
            seen[key] = i
        mods: set[str] = set()
        for i, ao in enumerate(self.activation_outliers):
            if not isinstance(ao, ActivationOutliers):
                raise FormatError(f"activation_outliers[{i}]: expected ActivationOutliers, got {ao!r}")
            if ao.module in mods:
                raise FormatError(f"activation_outliers[{i}]: module {ao.module} is listed twice")
            mods.add(ao.module)
        _obj(self.provenance, "provenance")
        if self.conversion_id is not None:
            _conversion_id(self.conversion_id, "conversion_id")
        _version(self.format_version, "format_version", "sidecar")

    def by_module(self) -> dict[str, list[SuperWeight]]:
        out: dict[str, list[SuperWeight]] = {}
        for sw in self.super_weights:
            out.setdefault(sw.module, []).append(sw)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format_version": self.format_version}
        if self.conversion_id is not None:
            d["conversion_id"] = self.conversion_id
        d["super_weights"] = [sw.to_dict() for sw in self.super_weights]
        d["activation_outliers"] = [ao.to_dict() for ao in self.activation_outliers]
        d["provenance"] = dict(self.provenance)
        return d

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: Any, where: str = "sidecar") -> Sidecar:
        """Strict reader; messages are ``"<where>: <field path>: <problem>"``."""
        p = f"{where}: "
        if not isinstance(d, Mapping):
            raise FormatError(f"{p}expected a JSON object, got {type(d).__name__}")
        with _context(p):
            ver, _ = _version(d.get("format_version"), "format_version", "sidecar")
            sws = []
            for key in ("super_weights", "activation_outliers"):
                if not isinstance(d.get(key), list):
                    raise FormatError(f"{key}: expected a list, got {d.get(key)!r}")
            for i, e in enumerate(d["super_weights"]):
                if not isinstance(e, Mapping):
                    raise FormatError(f"super_weights[{i}]: expected an object, got {e!r}")
                with _context(f"super_weights[{i}]."):
                    sws.append(SuperWeight.from_dict(e))
            aos = []
            for i, e in enumerate(d["activation_outliers"]):
                if not isinstance(e, Mapping):
                    raise FormatError(f"activation_outliers[{i}]: expected an object, got {e!r}")
                with _context(f"activation_outliers[{i}]."):
                    aos.append(ActivationOutliers.from_dict(e))
            prov = d.get("provenance") or {}
            _obj(prov, "provenance")
            cid = d.get("conversion_id")
            return cls(tuple(sws), tuple(aos), dict(prov), cid, ver)

    @classmethod
    def load(cls, path: str) -> Sidecar:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise FormatError(f"super-weight sidecar {path} is missing (the checkpoint is incomplete)") from None
        except IsADirectoryError:
            raise FormatError(f"super-weight sidecar {path} is a directory, not a JSON file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"super-weight sidecar {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, where=f"sidecar {path}")


def check_sidecar(
    sidecar: Sidecar, shapes: Mapping[str, tuple[int, int]], *, where: str = "sidecar", in_what: str = "the checkpoint"
) -> None:
    """Every super weight names a quantized module of ``shapes`` (module -> (N, K)) and lies inside its matrix;
    every activation-outlier channel lies inside its module's input. FormatError (one line) otherwise."""
    for sw in sidecar.super_weights:
        at = f"{where}: super weight {sw.module}[{sw.row}, {sw.col}]"
        if sw.module not in shapes:
            layers = [x for x in (layer_of(m) for m in shapes) if x is not None]
            hint = f" (the model has {1 + max(layers)} layers)" if layers else ""
            raise FormatError(f"{at}: no such quantized module in {in_what}{hint}")
        n, k = shapes[sw.module]
        if not (0 <= sw.row < n and 0 <= sw.col < k):
            raise FormatError(f"{at} lies outside its matrix of shape [{n}, {k}]")
    for ao in sidecar.activation_outliers:
        if ao.module not in shapes:
            raise FormatError(f"{where}: activation outliers of {ao.module}: no such quantized module in {in_what}")
        k = shapes[ao.module][1]
        bad = [c for c in ao.channels if not 0 <= c < k]
        if bad:
            raise FormatError(
                f"{where}: activation-outlier channel {bad[0]} of {ao.module} lies outside its input size {k}"
            )


# ----------------------------------------------------------------------------------------------------------
# file names read from a checkpoint
# ----------------------------------------------------------------------------------------------------------
def resolve_inside(ckpt_dir: str, name: Any, what: str) -> str:
    """The path of file ``name`` (read from config.json / the safetensors index) inside ``ckpt_dir``.

    Refuses absolute paths, ``..`` components and symbolic links that lead out of the checkpoint directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FormatError(f"{what}: expected a file name, got {name!r}")
    if os.path.isabs(name) or name.startswith("~"):
        raise FormatError(f"{what}: {name!r} is an absolute path; it must name a file inside the checkpoint directory")
    if ".." in re.split(r"[\\/]+", name):
        raise FormatError(f"{what}: {name!r} leads out of the checkpoint directory")
    root = os.path.realpath(ckpt_dir)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise FormatError(
            f"{what}: {name!r} resolves to {path}, outside the checkpoint directory {ckpt_dir} (symbolic link)"
        )
    return path


# ----------------------------------------------------------------------------------------------------------
# compatibility with readers written against format 1.0 (dict sidecars)
# ----------------------------------------------------------------------------------------------------------
def load_sidecar(path: str) -> dict[str, Any]:
    """``Sidecar.load(path).to_dict()`` (kept for dict-based callers; prefer ``Sidecar.load``)."""
    return Sidecar.load(path).to_dict()


def check_super_weights_in_range(sidecar: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]]) -> None:
    """``check_sidecar`` for a dict holding a ``super_weights`` list (kept for dict-based callers)."""
    sws = []
    for i, e in enumerate(_list(sidecar.get("super_weights", []), "super_weights")):
        with _context(f"super_weights[{i}]."):
            sws.append(e if isinstance(e, SuperWeight) else SuperWeight.from_dict(e, require_value=False))
    check_sidecar(Sidecar(tuple(sws)), shapes)
