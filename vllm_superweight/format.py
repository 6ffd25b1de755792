"""The superweight_rtn checkpoint format, specified in one place (see FORMAT.md for the prose).

Everything that reads or writes a checkpoint (converter, vLLM plugin, eval, tests) goes through the names,
constants and validators in this module. The format is versioned by ``FORMAT_VERSION``; readers refuse any
other major version.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

QUANT_METHOD = "superweight_rtn"
FORMAT_VERSION = "1.0"
SIDECAR_NAME = "superweights.json"
REPORT_NAME = "conversion_report.json"

SUPPORTED_BITS = (3, 4, 8)
ACT_SCHEMES = ("none", "int8-token", "int8-tensor")
CLIP_METHODS = ("none", "zscore", "block_pct", "tensor_pct", "iqr", "mse")

# Tensor suffixes of one quantized Linear ``<prefix>.<suffix>`` in the safetensors shards.
W_PACKED = "weight_packed"  # int32 [N, ceil(K / (32 // bits))], compressed-tensors pack_to_int32, packed along K
W_SCALE = "weight_scale"  # float [N // R, K // G]  (group/channel: [N, K // G]; rows:R: [N // R, 1]; tensor: [1, 1])
W_ZERO = "weight_zero_point"  # int32, same block grid as W_SCALE packed along dim 0 (asymmetric only)
W_SHAPE = "weight_shape"  # int64 [2] = (N, K)
SPARSE_INDEX = "sparse_index"  # int32 [2, nnz]: (row, col) of every held-out weight (super weights + --holdout)
SPARSE_VALUE = "sparse_value"  # float [nnz]: the exact original values (checkpoint dtype)
ACT_OUTLIERS = "act_outlier_channels"  # int32 [S]: input channels kept in 16-bit when activations are int8

LINEAR_SUFFIXES = (W_PACKED, W_SCALE, W_ZERO, W_SHAPE, SPARSE_INDEX, SPARSE_VALUE, ACT_OUTLIERS)

# Modules never quantized (matched against the module name).
DEFAULT_IGNORE = ["re:.*embed_tokens$", "re:.*lm_head$", "re:.*norm$", "re:.*layernorm$"]


class FormatError(ValueError):
    """A checkpoint or an option that the format cannot represent / a reader cannot serve."""


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How the quantization blocks tile one [N, K] weight.

    kind == "group":   groups of ``group`` consecutive input elements within a row (``channel`` = whole row).
    kind == "rows":    blocks of ``rows`` whole rows (R * K contiguous elements: the paper's flattened blocks).
    kind == "tensor":  one block for the whole matrix.
    """

    kind: str  # "group" | "channel" | "rows" | "tensor"
    size: int = 0  # G for group, R for rows

    @staticmethod
    def parse(text: str | int) -> "BlockLayout":
        s = str(text).strip().lower()
        if s in ("channel", "row", "per-channel"):
            return BlockLayout("channel")
        if s in ("tensor", "per-tensor"):
            return BlockLayout("tensor")
        m = re.fullmatch(r"rows:(\d+)", s)
        if m:
            r = int(m.group(1))
            if r < 1:
                raise FormatError(f"block {text!r}: rows:R needs R >= 1")
            return BlockLayout("rows", r) if r > 1 else BlockLayout("channel")
        m = re.fullmatch(r"g?(\d+)", s)
        if m:
            g = int(m.group(1))
            if g < 2 or g % 2:
                raise FormatError(f"block {text!r}: group size must be an even number >= 2")
            return BlockLayout("group", g)
        raise FormatError(
            f"unknown block layout {text!r}; use a group size (32, 64, 128, 256, ...), 'channel', 'rows:R' or 'tensor'"
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
                raise FormatError(
                    f"group size {self.size} does not divide the input dimension {k} "
                    f"(choose a group that divides {k}, e.g. {_divisor_hint(k)}, or 'channel')"
                )
            return n, k // self.size
        if self.kind == "channel":
            return n, 1
        if self.kind == "rows":
            if n % self.size:
                raise FormatError(
                    f"rows:{self.size} does not divide the output dimension {n} "
                    f"(choose R dividing {n}, e.g. {_divisor_hint(n)})"
                )
            return n // self.size, 1
        return 1, 1

    def rows_per_block(self, n: int) -> int:
        return {"group": 1, "channel": 1, "rows": self.size, "tensor": n}[self.kind]

    def kernel_group_size(self, k: int) -> int:
        """Group size handed to vLLM's kernels after the load-time expansion (-1 = channel-wise)."""
        return self.size if self.kind == "group" else -1


def _divisor_hint(x: int) -> str:
    ds = [d for d in (32, 64, 96, 128, 192, 256, 512) if x % d == 0]
    return ", ".join(map(str, ds)) or "1"


@dataclasses.dataclass
class QuantConfig:
    """The ``quantization_config`` block of config.json (what ``superweight convert`` writes)."""

    bits: int = 4
    block: str = "channel"
    symmetric: bool = False
    clip: str = "none"  # one of CLIP_METHODS
    clip_threshold: float | None = None
    holdout: float = 0.0  # fraction of the largest-|w| weights of every matrix kept exact (besides super weights)
    restore_super_weights: bool = True
    activations: str = "none"  # one of ACT_SCHEMES
    ignore: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_IGNORE))
    sidecar: str = SIDECAR_NAME
    format_version: str = FORMAT_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"unsupported bits {self.bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        BlockLayout.parse(self.block)
        if self.clip not in CLIP_METHODS:
            raise FormatError(f"unknown clip method {self.clip!r}; one of {', '.join(CLIP_METHODS)}")
        if self.activations not in ACT_SCHEMES:
            raise FormatError(f"unknown activation scheme {self.activations!r}; one of {', '.join(ACT_SCHEMES)}")
        if not (0.0 <= float(self.holdout) < 0.5):
            raise FormatError(f"holdout fraction must be in [0, 0.5), got {self.holdout}")
        if self.activations != "none":
            if self.bits != 8 or not self.symmetric:
                raise FormatError("int8 activations need --bits 8 --symmetric (int8 x int8 GEMM)")
            if BlockLayout.parse(self.block).kind == "group":
                raise FormatError("int8 activations need per-row weight scales: --block channel, rows:R or tensor")

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout.parse(self.block)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "bits": self.bits,
            "block": str(self.layout),
            "symmetric": self.symmetric,
            "clip": {"method": self.clip, "threshold": self.clip_threshold},
            "holdout": self.holdout,
            "restore_super_weights": self.restore_super_weights,
            "activations": self.activations,
            "ignore": list(self.ignore),
            "packing": "pack-quantized",
            "sidecar": self.sidecar,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if str(d.get("quant_method", "")).lower() != QUANT_METHOD:
            raise FormatError(f"quant_method is {d.get('quant_method')!r}, not {QUANT_METHOD!r}")
        ver = str(d.get("format_version", ""))
        if ver.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise FormatError(
                f"checkpoint format version {ver or '(missing)'} is not supported by this vllm-superweight "
                f"(reads {FORMAT_VERSION.split('.')[0]}.x); re-convert the model with this version"
            )
        for key in ("bits", "block"):
            if key not in d:
                raise FormatError(f"quantization_config lacks {key!r}")
        clip = d.get("clip") or {}
        return cls(
            bits=int(d["bits"]),
            block=str(d["block"]),
            symmetric=bool(d.get("symmetric", False)),
            clip=str(clip.get("method", "none")),
            clip_threshold=clip.get("threshold"),
            holdout=float(d.get("holdout", 0.0)),
            restore_super_weights=bool(d.get("restore_super_weights", True)),
            activations=str(d.get("activations", "none")),
            ignore=list(d.get("ignore", DEFAULT_IGNORE)),
            sidecar=str(d.get("sidecar", SIDECAR_NAME)),
            format_version=ver,
        )


def pack_factor(bits: int) -> int:
    return 32 // bits


def packed_cols(k: int, bits: int) -> int:
    return math.ceil(k / pack_factor(bits))


def is_ignored(name: str, ignore: list[str]) -> bool:
    for pat in ignore:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Sidecar (superweights.json)
# ----------------------------------------------------------------------------------------------------------
def float_bits_hex(value: float, dtype: str) -> str:
    """Bit pattern of ``value`` in ``dtype`` as hex (so the exact original value survives JSON)."""
    import struct

    if dtype in ("float32", "fp32"):
        return struct.pack(">f", value).hex()
    if dtype in ("float16", "fp16", "half"):
        return struct.pack(">e", value).hex()
    if dtype in ("bfloat16", "bf16"):
        return struct.pack(">f", value).hex()[:4]
    raise FormatError(f"unsupported dtype {dtype}")


def float_from_bits_hex(h: str, dtype: str) -> float:
    import struct

    if dtype in ("float32", "fp32"):
        return struct.unpack(">f", bytes.fromhex(h))[0]
    if dtype in ("float16", "fp16", "half"):
        return struct.unpack(">e", bytes.fromhex(h))[0]
    if dtype in ("bfloat16", "bf16"):
        return struct.unpack(">f", bytes.fromhex(h + "0000"))[0]
    raise FormatError(f"unsupported dtype {dtype}")


def load_sidecar(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"super-weight sidecar {path} is missing (the checkpoint is incomplete)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"super-weight sidecar {path} is not valid JSON: {e}") from None
    ver = str(data.get("format_version", ""))
    if ver.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise FormatError(f"sidecar {path} has format version {ver or '(missing)'}; expected {FORMAT_VERSION}")
    for key in ("super_weights", "activation_outliers"):
        if not isinstance(data.get(key), list):
            raise FormatError(f"sidecar {path} lacks the list {key!r}")
    for sw in data["super_weights"]:
        for key in ("module", "row", "col", "value", "bits", "dtype"):
            if key not in sw:
                raise FormatError(f"sidecar {path}: super weight entry {sw} lacks {key!r}")
    return data


def check_super_weights_in_range(sidecar: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> None:
    """Raise FormatError if a sidecar super weight names an unknown module or lies outside its matrix."""
    for sw in sidecar["super_weights"]:
        mod = sw["module"]
        if mod not in shapes:
            raise FormatError(f"super weight {mod}[{sw['row']}, {sw['col']}]: no such quantized module")
        n, k = shapes[mod]
        if not (0 <= int(sw["row"]) < n and 0 <= int(sw["col"]) < k):
            raise FormatError(
                f"super weight {mod}[{sw['row']}, {sw['col']}] lies outside its matrix of shape [{n}, {k}]"
            )
