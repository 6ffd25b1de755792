"""Read converted checkpoints: validate them (header-only) and read them back as float.

``validate_checkpoint`` is what a reader (the vLLM plugin at engine start, ``superweight inspect``) calls first: it
reads config.json, the sidecar and the safetensors HEADERS (plus the 16-byte ``weight_shape`` tensors and the
sparse entries of the few modules holding super weights) and refuses, with one FormatError naming the module /
tensor / field, anything the format does not allow. It needs only the standard library (and numpy).

``load_dequantized_model`` rebuilds a plain transformers model whose Linear weights are the dequantized integer
weights with every held-out weight (super weights, --holdout) restored exactly: what ``superweight_rtn`` serves,
computed without any kernel. Used by tests (logit comparisons), ``superweight inspect`` and eval spot checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

from .format import (
    ACT_OUTLIERS,
    FORMAT_MAJOR,
    LINEAR_SUFFIXES,
    SPARSE_INDEX,
    SPARSE_VALUE,
    W_PACKED,
    W_SCALE,
    W_SHAPE,
    W_ZERO,
    FormatError,
    QuantConfig,
    Sidecar,
    check_sidecar,
    float_from_bits_hex,
    is_ignored,
    pack_factor,
    packed_cols,
    resolve_inside,
)
from .models import SAFETENSORS_ELEM_BYTES

INDEX_NAME = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_MAX_HEADER = 100 * 2**20


# ----------------------------------------------------------------------------------------------------------
# safetensors headers (no torch)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorHeader:
    name: str
    file: str  # absolute path of the shard
    dtype: str  # safetensors dtype ("I32", "BF16", ...)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    def read(self) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise FormatError(f"{os.path.basename(self.file)}: tensor {self.name} is truncated")
        return data


def read_safetensors_header(path: str) -> dict[str, TensorHeader]:
    """Every tensor's dtype, shape and byte range from a safetensors file; FormatError if the file is not a
    complete safetensors file (bad header, or data that ends beyond the end of the file: truncated)."""
    fn = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise FormatError(f"{fn}: not a safetensors file or truncated ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{fn}: cannot read ({e.strerror or e})") from None
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{fn}: corrupt safetensors header") from None
    if not isinstance(hdr, dict):
        raise FormatError(f"{fn}: corrupt safetensors header")
    base, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorHeader] = {}
    for name, e in hdr.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{fn}: corrupt safetensors header entry for {name}") from None
        if end > data_len:
            raise FormatError(f"{fn}: truncated (tensor {name} ends at byte {base + end}, the file has {size})")
        if (
            dtype not in SAFETENSORS_ELEM_BYTES
            or begin < 0
            or end - begin != math.prod(shape) * SAFETENSORS_ELEM_BYTES[dtype]
        ):
            raise FormatError(f"{fn}: corrupt safetensors header entry for {name}")
        out[name] = TensorHeader(name, path, dtype, shape, base + begin, end - begin)
    return out


def weight_files(ckpt_dir: str) -> list[str]:
    """The safetensors shards of a checkpoint (those of the index when there is one), each inside ``ckpt_dir``."""
    idx = os.path.join(ckpt_dir, INDEX_NAME)
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            names = sorted(set(wm.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{INDEX_NAME}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [resolve_inside(ckpt_dir, n, f"{INDEX_NAME} weight_map entry") for n in names]
        for n, p in zip(names, files, strict=True):
            if not os.path.isfile(p):
                raise FormatError(f"shard {n} named in {INDEX_NAME} is missing")
    else:
        files = [
            resolve_inside(ckpt_dir, n, "weight file")
            for n in sorted(os.listdir(ckpt_dir))
            if n.endswith(".safetensors")
        ]
    if not files:
        raise FormatError(f"{ckpt_dir}: no *.safetensors weights")
    return files


def read_headers(ckpt_dir: str) -> dict[str, TensorHeader]:
    out: dict[str, TensorHeader] = {}
    for path in weight_files(ckpt_dir):
        for name, th in read_safetensors_header(path).items():
            if name in out:
                raise FormatError(
                    f"tensor {name} appears in both {os.path.basename(out[name].file)} and {os.path.basename(path)}"
                )
            out[name] = th
    return out


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def read_config(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{ckpt_dir}: no config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return cfg


def read_quant_config(ckpt: str) -> tuple[dict, QuantConfig]:
    """(config.json as a dict, its parsed quantization_config)."""
    cfg = read_config(ckpt)
    qd = cfg.get("quantization_config")
    if not qd:
        raise FormatError(f"{ckpt}: config.json has no quantization_config (not a superweight_rtn checkpoint)")
    return cfg, QuantConfig.from_dict(qd, where="config.json: quantization_config")


def _expect(mod: str, th: TensorHeader, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, why: str = "") -> None:
    suffix = th.name[len(mod) + 1 :]
    if th.dtype not in dtypes:
        raise FormatError(f"tensor {th.name}: dtype {th.dtype}, expected {' or '.join(dtypes)} for {suffix}")
    if shape is not None and th.shape != shape:
        raise FormatError(f"tensor {th.name}: shape {list(th.shape)}, expected {list(shape)}{why}")


def _check_linear(mod: str, ts: dict[str, TensorHeader], q: QuantConfig) -> tuple[int, int]:
    """The format's rules for the tensors of one quantized Linear; returns its (N, K)."""
    for suffix in (W_PACKED, W_SCALE, W_SHAPE):
        if suffix not in ts:
            raise FormatError(f"quantized module {mod} lacks tensor {mod}.{suffix} (has {', '.join(sorted(ts))})")
    if q.symmetric and W_ZERO in ts:
        raise FormatError(
            f"tensor {mod}.{W_ZERO} is present but quantization_config.symmetric is true (symmetric "
            "flipped?): the checkpoint and its config.json disagree"
        )
    if not q.symmetric and W_ZERO not in ts:
        raise FormatError(
            f"quantized module {mod} lacks tensor {mod}.{W_ZERO} but quantization_config.symmetric is "
            "false (symmetric flipped?): the checkpoint and its config.json disagree"
        )
    _expect(mod, ts[W_SHAPE], ("I64",), (2,))
    n, k = (int.from_bytes(ts[W_SHAPE].read()[i : i + 8], "little", signed=True) for i in (0, 8))
    if n < 1 or k < 1:
        raise FormatError(f"tensor {mod}.{W_SHAPE} holds ({n}, {k}), not a matrix shape")
    disagree = f" for bits {q.bits}, block {q.layout} of [{n}, {k}]: the checkpoint and its config.json disagree"
    _expect(mod, ts[W_PACKED], ("I32",), (n, packed_cols(k, q.bits)), disagree)
    try:
        nb, ng = q.layout.grid(n, k)
    except FormatError as e:
        raise FormatError(f"{mod} [{n}, {k}]: {e}: the checkpoint and its config.json disagree") from None
    _expect(mod, ts[W_SCALE], tuple(_FLOAT_DTYPES), (nb, ng), disagree)
    if W_ZERO in ts:
        _expect(mod, ts[W_ZERO], ("I32",), (math.ceil(nb / pack_factor(q.bits)), ng), disagree)
    if (SPARSE_INDEX in ts) != (SPARSE_VALUE in ts):
        have, lack = (SPARSE_INDEX, SPARSE_VALUE) if SPARSE_INDEX in ts else (SPARSE_VALUE, SPARSE_INDEX)
        raise FormatError(f"quantized module {mod} has {mod}.{have} but lacks {mod}.{lack}")
    if SPARSE_INDEX in ts:
        si, sv = ts[SPARSE_INDEX], ts[SPARSE_VALUE]
        _expect(mod, si, ("I32",), None)
        if len(si.shape) != 2 or si.shape[0] != 2:
            raise FormatError(f"tensor {si.name}: shape {list(si.shape)}, expected [2, nnz]")
        _expect(mod, sv, tuple(_FLOAT_DTYPES), (si.shape[1],), f" (one value per entry of {SPARSE_INDEX})")
    if ACT_OUTLIERS in ts:
        ao = ts[ACT_OUTLIERS]
        _expect(mod, ao, ("I32",), None)
        if len(ao.shape) != 1:
            raise FormatError(f"tensor {ao.name}: shape {list(ao.shape)}, expected [S]")
    return n, k


def _check_sparse_data(mod: str, ts: dict[str, TensorHeader], n: int, k: int) -> None:
    """The held-out entries of one module lie inside its [n, k] matrix and are finite; outlier channels < k."""
    import numpy as np

    if SPARSE_INDEX in ts:
        idx = np.frombuffer(ts[SPARSE_INDEX].read(), dtype="<i4").reshape(2, -1)
        bad = np.nonzero((idx[0] < 0) | (idx[0] >= n) | (idx[1] < 0) | (idx[1] >= k))[0]
        if bad.size:
            r, c = (int(x) for x in idx[:, bad[0]])
            raise FormatError(
                f"tensor {mod}.{SPARSE_INDEX}: entry {int(bad[0])} = ({r}, {c}) lies outside the matrix [{n}, {k}]"
            )
        sv = ts[SPARSE_VALUE]
        raw = sv.read()
        if sv.dtype == "F32":
            finite = np.isfinite(np.frombuffer(raw, dtype="<f4"))
        else:  # exponent bits all ones: Inf / NaN (bfloat16: 8 exponent bits, float16: 5)
            mask = 0x7F80 if sv.dtype == "BF16" else 0x7C00
            finite = (np.frombuffer(raw, dtype="<u2") & mask) != mask
        if not finite.all():
            raise FormatError(f"tensor {sv.name}: entry {int(np.argmin(finite))} is not a finite number")
    if ACT_OUTLIERS in ts:
        ch = np.frombuffer(ts[ACT_OUTLIERS].read(), dtype="<i4")
        bad = ch[(ch < 0) | (ch >= k)]
        if bad.size:
            raise FormatError(f"tensor {mod}.{ACT_OUTLIERS}: channel {int(bad[0])} lies outside the input size {k}")


def _check_super_weight_values(
    sidecar: Sidecar, modules: dict[str, dict[str, TensorHeader]], q: QuantConfig, where: str
) -> None:
    """Every restored super weight is among its module's sparse entries, with the sidecar's exact value."""
    import numpy as np

    for mod, sws in sidecar.by_module().items():
        sws = [sw for sw in sws if sw.restored and q.restore_super_weights]
        if not sws:
            continue
        ts = modules[mod]
        if SPARSE_INDEX not in ts:
            sw = sws[0]
            raise FormatError(
                f"{where}: super weight {mod}[{sw.row}, {sw.col}] is restored but {mod} has no {SPARSE_INDEX}"
            )
        idx = np.frombuffer(ts[SPARSE_INDEX].read(), dtype="<i4").reshape(2, -1)
        sv = ts[SPARSE_VALUE]
        vals = sv.read()
        width = sv.nbytes // max(sv.shape[0], 1)
        for sw in sws:
            hit = np.nonzero((idx[0] == sw.row) & (idx[1] == sw.col))[0]
            at = f"{where}: super weight {mod}[{sw.row}, {sw.col}]"
            if hit.size == 0:
                raise FormatError(f"{at} is missing from {mod}.{SPARSE_INDEX} (the checkpoint does not restore it)")
            if _FLOAT_DTYPES[sv.dtype] != sw.dtype:
                raise FormatError(f"{at}: sidecar dtype {sw.dtype} but {sv.name} is {_FLOAT_DTYPES[sv.dtype]}")
            i = int(hit[0])
            stored = vals[i * width : (i + 1) * width][::-1].hex()  # little-endian on disk, big-endian hex in JSON
            if stored != sw.bits:
                raise FormatError(
                    f"{at}: sidecar value {sw.value!r} differs from the checkpoint's "
                    f"{float_from_bits_hex(stored, sw.dtype)!r}"
                )


def _check_conversion_id(q: QuantConfig, sidecar: Sidecar, sidecar_name: str) -> None:
    a, b = q.conversion_id, sidecar.conversion_id
    if a != b:
        raise FormatError(
            f"sidecar {sidecar_name} comes from another conversion: its conversion_id {b!r} differs "
            f"from config.json's quantization_config.conversion_id {a!r}"
        )
    for name, ver in (
        ("config.json quantization_config", q.format_version),
        (f"sidecar {sidecar_name}", sidecar.format_version),
    ):
        if a is None and ver != f"{FORMAT_MAJOR}.0":
            raise FormatError(f"{name}: conversion_id: missing (required from format {FORMAT_MAJOR}.1)")


def validate_checkpoint(ckpt_dir: str) -> tuple[QuantConfig, Sidecar]:
    """(QuantConfig, Sidecar) of a superweight_rtn checkpoint, after checking everything a reader relies on.

    Reads config.json, the sidecar, the safetensors headers and the small tensors (shapes, held-out entries, outlier
    channels), never the packed weights; raises one FormatError naming
    the module / tensor / field for: a bad quantization_config, a sidecar or shard name leading out of the
    directory, a sidecar from another conversion, a quantized module lacking a tensor, a zero point present with
    ``symmetric: true`` or absent with ``false``, tensor shapes / dtypes that disagree with bits and block, a
    ``sparse_index`` without ``sparse_value`` (or of the wrong shape), held-out entries outside the matrix or not
    finite, outlier channels outside the input, a super weight that names a module not
    quantized here, lies outside its matrix, is not among its module's sparse entries or has another value.
    """
    if not os.path.isdir(ckpt_dir):
        raise FormatError(f"{ckpt_dir}: not a checkpoint directory")
    _, q = read_quant_config(ckpt_dir)
    sidecar_path = resolve_inside(ckpt_dir, q.sidecar, "config.json: quantization_config.sidecar")
    sidecar = Sidecar.load(sidecar_path)
    _check_conversion_id(q, sidecar, q.sidecar)
    modules: dict[str, dict[str, TensorHeader]] = {}
    for name, th in read_headers(ckpt_dir).items():
        mod, _, suffix = name.rpartition(".")
        if suffix in LINEAR_SUFFIXES:
            modules.setdefault(mod, {})[suffix] = th
    shapes: dict[str, tuple[int, int]] = {}
    for mod in sorted(modules):
        if is_ignored(mod, q.ignore):
            raise FormatError(f"module {mod} is quantized in the checkpoint but matches quantization_config.ignore")
        shapes[mod] = _check_linear(mod, modules[mod], q)
        _check_sparse_data(mod, modules[mod], *shapes[mod])
    if not shapes:
        raise FormatError(f"{ckpt_dir}: no quantized Linear in the checkpoint (no *.{W_PACKED} tensor)")
    where = f"sidecar {q.sidecar}"
    check_sidecar(sidecar, shapes, where=where)
    _check_super_weight_values(sidecar, modules, q, where)
    return q, sidecar


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` looks like a superweight_rtn checkpoint (config.json's quant_method; nothing validated)."""
    try:
        cfg = read_config(path)
    except (FormatError, OSError):
        return False
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "superweight_rtn"


# ----------------------------------------------------------------------------------------------------------
# float read-back (torch)
# ----------------------------------------------------------------------------------------------------------
def iter_tensors(ckpt: str) -> Iterator[tuple[str, Any]]:
    """(name, tensor) over every safetensors shard of the checkpoint (index order if an index exists)."""
    from safetensors import safe_open

    for path in weight_files(ckpt):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def dequantized_state_dict(ckpt: str, restore: bool = True, dtype: Any = None) -> dict[str, Any]:
    """HF-named float state dict: quantized Linears dequantized (held-out weights restored if ``restore``)."""
    import torch

    from .quantize import dequantize_tensors

    dtype = dtype or torch.float32
    _, qc = read_quant_config(ckpt)
    plain: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in iter_tensors(ckpt):
        mod, _, suffix = name.rpartition(".")
        if suffix in LINEAR_SUFFIXES:
            groups.setdefault(mod, {})[suffix] = t
        else:
            plain[name] = t.to(dtype) if t.is_floating_point() else t
    for mod, ts in groups.items():
        if W_PACKED not in ts:
            raise FormatError(f"{ckpt}: {mod} has {sorted(ts)} but no weight_packed")
        plain[mod + ".weight"] = dequantize_tensors(ts, qc.bits, qc.symmetric, qc.layout, restore=restore).to(dtype)
    return plain


def load_dequantized_model(ckpt: str, restore: bool = True, dtype: Any = None):
    """(model, tokenizer): a transformers model holding the dequantized, super-weight-restored weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    cfg_dict, _ = read_quant_config(ckpt)
    cfg_dict = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = dequantized_state_dict(ckpt, restore=restore, dtype=dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise FormatError(
            f"{ckpt}: tensors do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    return model, tok
