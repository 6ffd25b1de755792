"""The converter: source model -> superweight_rtn checkpoint (``superweight convert``).

Pipeline (every check happens before anything is written; the output is built in ``DST.partial-<pid>`` and renamed
to DST only when complete, so an interrupted or failed run leaves no half-written checkpoint):

1. resolve + validate the source (files, architecture, tensor headers, block tiling of every quantized Linear,
   NaN/Inf, user-given super-weight coordinates);
2. detect super weights and activation-outlier channels on the float model (``vllm_superweight.detect``), unless
   the caller gives them; the model is freed before quantization;
3. stream the weights tensor by tensor (HF safetensors: shard by shard through ``safe_open``; GGUF: the
   dequantized transformers state dict), RTN-quantize every Linear of the decoder layers with the super weights
   (and the ``holdout`` fraction) held out, copy the rest in the output dtype, write bounded output shards;
4. write config.json (+ quantization_config), tokenizer / generation files, the sidecar (superweights.json) and
   the conversion report, verify that every super weight comes back bit-exact, rename into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import re
import shutil
import time
from typing import Any, Iterable, Iterator

from . import __version__
from .format import (
    ACT_OUTLIERS,
    REPORT_NAME,
    SIDECAR_NAME,
    FORMAT_VERSION,
    FormatError,
    QuantConfig,
    float_bits_hex,
    is_ignored,
    load_sidecar,
)
from .models import (
    Source,
    SourceError,
    TensorInfo,
    check_architecture,
    hf_weight_files,
    is_tied,
    read_config,
    read_safetensors_headers,
    resolve_source,
    source_hash,
)

DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # output shards of at most ~2 GB (one tensor larger than that gets its own)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
)

DTYPES = ("bfloat16", "float16", "float32")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Parts of multimodal checkpoints that are never quantized (only the text decoder is).
_EXTRA_IGNORE = {"vision_tower": "re:.*vision_tower.*", "multi_modal_projector": "re:.*multi_modal_projector.*"}


class ConversionError(FormatError):
    """A conversion that cannot proceed (bad option, bad input); nothing has been written."""


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def torch_dtype(name: str):
    import torch

    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if name not in table:
        raise ConversionError(f"unsupported dtype {name!r}; one of {', '.join(DTYPES)}")
    return table[name]


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def layer_of(name: str) -> int | None:
    m = None
    for m in _LAYER_RE.finditer(name):
        pass
    return int(m.group(1)) if m else None


def quantized_module(name: str, shape: tuple[int, ...], ignore: list[str]) -> str | None:
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
    m = None
    for m in _LAYER_RE.finditer(name):
        pass
    if m is None:
        return None
    tail = name[m.start():].lstrip(".")
    cands = [x for x in modules if x == tail or x.endswith("." + tail)]
    return cands[0] if len(cands) == 1 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def _f(x) -> float | None:
    return None if x is None else float(x)


# ----------------------------------------------------------------------------------------------------------
# super weights given by the user (--super-weights JSON | none)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SWSpec:
    """One super weight to hold out: where it is plus what detection said about it (if anything)."""

    module: str | None
    layer: int | None
    row: int
    col: int
    input_spike: float | None = None
    output_spike: float | None = None
    confirmed: bool | None = None
    ablation: Any = None

    @classmethod
    def coerce(cls, x) -> "SWSpec":
        if isinstance(x, SWSpec):
            return x
        if isinstance(x, (list, tuple)):
            if len(x) != 3:
                raise ConversionError(f"super weight {x!r}: expected [layer, row, col]")
            return cls(None, int(x[0]), int(x[1]), int(x[2]))
        if isinstance(x, dict):
            get = x.get
        else:  # a detect.SuperWeight (or anything with the attributes)
            def get(k, default=None):
                return getattr(x, k, default)
        try:
            row, col = int(get("row")), int(get("col"))
        except (TypeError, ValueError):
            raise ConversionError(f"super weight {x!r}: needs integer 'row' and 'col'") from None
        layer = get("layer")
        module = get("module")
        if module is None and layer is None:
            raise ConversionError(f"super weight {x!r}: needs 'module' or 'layer'")
        return cls(
            module=str(module) if module is not None else None,
            layer=int(layer) if layer is not None else None,
            row=row,
            col=col,
            input_spike=_f(get("input_spike")),
            output_spike=_f(get("output_spike")),
            confirmed=get("confirmed"),
            ablation=get("ablation"),
        )


def read_super_weights_json(path: str) -> tuple[list[SWSpec], list[dict] | None]:
    """Super weights (+ activation outliers when present) from a JSON file.

    Accepted: a sidecar (``superweights.json`` of a checkpoint), the output of ``superweight detect --json``, or a
    bare list of ``{"layer"|"module", "row", "col"}`` objects / ``[layer, row, col]`` triples.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"--super-weights {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"--super-weights {path}: not valid JSON ({e})") from None
    outliers = None
    if isinstance(data, dict):
        if "super_weights" not in data or not isinstance(data["super_weights"], list):
            raise ConversionError(f"--super-weights {path}: expected a list or an object with a 'super_weights' list")
        items = data["super_weights"]
        if "activation_outliers" in data:
            outliers = normalize_outliers(data["activation_outliers"])
    elif isinstance(data, list):
        items = data
    else:
        raise ConversionError(f"--super-weights {path}: expected a list or an object with a 'super_weights' list")
    return [SWSpec.coerce(x) for x in items], outliers


def normalize_outliers(ao) -> list[dict]:
    """Activation outliers as a list of {"module", "channels", "magnitudes"} (from a dict or a list)."""
    out = []
    if isinstance(ao, dict):
        items = [(k, v) for k, v in ao.items()]
    elif isinstance(ao, list):
        items = [(e.get("module"), e) for e in ao if isinstance(e, dict)]
    else:
        raise ConversionError(f"activation outliers: expected a dict or a list, got {type(ao).__name__}")
    for mod, v in items:
        if isinstance(v, dict):
            ch = [int(c) for c in v.get("channels", [])]
            mag = [float(m) for m in v.get("magnitudes", [])]
        else:
            ch, mag = [int(c) for c in v], []
        out.append({"module": str(mod), "channels": ch, "magnitudes": mag})
    return out


# ----------------------------------------------------------------------------------------------------------
# the plan: everything known before any weight is read
# ----------------------------------------------------------------------------------------------------------
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


def _default_dtype(source: Source, cfg: dict) -> str:
    if source.kind == "gguf":
        return "bfloat16"  # GGUF tensors are dequantized to fp32; serve in bf16 (the original HF release's dtype)
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    if d is None and isinstance(cfg.get("text_config"), dict):
        d = cfg["text_config"].get("dtype") or cfg["text_config"].get("torch_dtype")
    d = str(d).replace("torch.", "") if d else "bfloat16"
    return d if d in DTYPES else "bfloat16"


def _plan(source: Source, cfg: dict, tensors: dict[str, TensorInfo], qcfg: QuantConfig, out_dtype) -> Plan:
    mt = check_architecture(cfg)
    if cfg.get("quantization_config"):
        qc = cfg["quantization_config"]
        qm = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ConversionError(
            f"{source.path} is already quantized (quantization_config.quant_method={qm!r}); convert a float model"
        )
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
        raise ConversionError(f"block {layout} does not tile {which}{bad[0]}")
    if not quant:
        raise ConversionError(f"{source.path}: found no Linear weights inside decoder layers to quantize")
    return Plan(source, cfg, mt, out_dtype, tensors, quant, drop, ignore)


def _resolve_sws(specs: list[SWSpec], plan: Plan) -> list[SWSpec]:
    """Map every super weight to a quantized module of the checkpoint and check it lies inside the matrix."""
    out = []
    seen = set()
    for sw in specs:
        name = sw.module if sw.module is not None else f"model.layers.{sw.layer}.mlp.down_proj"
        mod = resolve_module(name, plan.quant)
        if mod is None:
            raise ConversionError(
                f"super weight {name}[{sw.row}, {sw.col}]: no such quantized module in {plan.source.name}"
                + (f" (the model has {1 + max(layer_of(m) or 0 for m in plan.quant)} layers)" if plan.quant else "")
            )
        n, k = plan.quant[mod]
        if not (0 <= sw.row < n and 0 <= sw.col < k):
            raise ConversionError(
                f"super weight {mod}[{sw.row}, {sw.col}] lies outside its matrix of shape [{n}, {k}]"
            )
        key = (mod, sw.row, sw.col)
        if key in seen:
            continue
        seen.add(key)
        out.append(dataclasses.replace(sw, module=mod, layer=layer_of(mod)))
    return out


def _resolve_outliers(outliers: list[dict], plan: Plan) -> list[dict]:
    out = []
    for e in outliers:
        mod = resolve_module(e["module"], plan.quant)
        if mod is None:
            continue  # e.g. a module the format does not quantize
        k = plan.quant[mod][1]
        chans = [int(c) for c in e["channels"]]
        bad = [c for c in chans if not 0 <= c < k]
        if bad:
            raise ConversionError(f"activation-outlier channel {bad[0]} of {mod} lies outside its input size {k}")
        out.append({"module": mod, "channels": chans, "magnitudes": [float(m) for m in e.get("magnitudes", [])]})
    out.sort(key=lambda e: (layer_of(e["module"]) or 0, e["module"]))
    return out


# ----------------------------------------------------------------------------------------------------------
# input streams
# ----------------------------------------------------------------------------------------------------------
def _iter_hf(plan: Plan, progress: bool, desc: str) -> Iterator[tuple[str, Any]]:
    """(name, tensor) shard by shard, tensor by tensor (sorted names), through safe_open (memory-mapped)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, info in plan.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.tensors), desc=desc, unit="tensor")
    try:
        for path in sorted(by_file):
            try:
                f = safe_open(path, framework="pt")
            except Exception as e:
                raise SourceError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
            with f:
                for name in sorted(by_file[path]):
                    try:
                        t = f.get_tensor(name)
                    except Exception as e:
                        raise SourceError(f"{path}: cannot read tensor {name} ({e})") from None
                    yield name, t
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()


_ELEM_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def _source_bytes(plan: "Plan") -> tuple[int, bool]:
    """(bytes of all input tensors, whether any is float32) from the safetensors headers."""
    total, f32 = 0, False
    for info in plan.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        total += n * _ELEM_BYTES.get(info.dtype, 4)
        f32 = f32 or info.dtype == "F32"
    return total, f32


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _iter_state_dict(sd: dict, progress: bool, desc: str) -> Iterator[tuple[str, Any]]:
    for name in _progress(sorted(sd), progress, desc=desc, unit="tensor"):
        yield name, sd[name]


def _check_finite(name: str, t) -> None:
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return
    # max/min propagate NaN and keep +-Inf: two cheap reductions instead of a full isfinite mask
    if not bool(torch.isfinite(torch.stack([t.amax().float(), t.amin().float()])).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ConversionError(f"tensor {name} holds {kind} values (first at index {bad}); refusing to convert")


def _check_cast(name: str, t, out_dtype) -> None:
    """A finite source tensor that overflows the output dtype (e.g. |w| > 65504 in float16) is an error."""
    import torch

    if t.numel() and not bool(torch.isfinite(torch.stack([t.amax().float(), t.amin().float()])).all()):
        raise ConversionError(
            f"tensor {name} overflows {dtype_name(out_dtype)} (values beyond its range); use --dtype bfloat16 "
            "or float32"
        )


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Accumulates output tensors and writes safetensors shards of bounded size (deterministic bytes)."""

    def __init__(self, directory: str, max_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.dir = directory
        self.max_bytes = int(max_bytes)
        self.cur: dict[str, Any] = {}
        self.cur_bytes = 0
        self.parts: list[tuple[str, list[str], int]] = []  # (temp file name, tensor names, bytes)
        self.total_bytes = 0

    def add(self, name: str, t) -> None:
        nb = t.numel() * t.element_size()
        if self.cur and self.cur_bytes + nb > self.max_bytes:
            self.flush()
        self.cur[name] = t.detach().cpu().contiguous()
        self.cur_bytes += nb

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.cur:
            return
        fn = f"part-{len(self.parts) + 1:05d}.safetensors"
        path = os.path.join(self.dir, fn)
        save_file(self.cur, path, metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600 files; give them the usual permissions
        self.parts.append((fn, sorted(self.cur), self.cur_bytes))
        self.total_bytes += self.cur_bytes
        self.cur, self.cur_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the parts to HF shard names, write the index when sharded; returns the file names."""
        self.flush()
        if len(self.parts) == 1:
            os.replace(os.path.join(self.dir, self.parts[0][0]), os.path.join(self.dir, "model.safetensors"))
            return ["model.safetensors"]
        n = len(self.parts)
        weight_map: dict[str, str] = {}
        names = []
        for i, (fn, tnames, _) in enumerate(self.parts, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, fn), os.path.join(self.dir, final))
            names.append(final)
            for t in tnames:
                weight_map[t] = final
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return names


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _output_config(plan: Plan, qcfg: QuantConfig, model=None) -> dict:
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


def _copy_tokenizer_files(plan: Plan, tmp: str, tokenizer=None, model=None) -> list[str]:
    copied = []
    if plan.source.kind == "hf":
        for fn in sorted(os.listdir(plan.source.path)):
            if fn in TOKENIZER_FILES or fn.endswith(".model") or fn.endswith(".tiktoken"):
                src = os.path.join(plan.source.path, fn)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, fn))
                    copied.append(fn)
        return copied
    before = set(os.listdir(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if model is not None and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    return sorted(set(os.listdir(tmp)) - before)


# ----------------------------------------------------------------------------------------------------------
# detection (lazy import: the detector lives in its own module)
# ----------------------------------------------------------------------------------------------------------
def run_detection(model, tokenizer, prompt: str | None, progress: bool = True, **kw):
    """DetectionResult of ``vllm_superweight.detect.detect_super_weights`` (separate so tests can stub it)."""
    from . import detect

    if prompt is None:
        prompt = detect.DEFAULT_PROMPT
    return detect.detect_super_weights(model, tokenizer, prompt, progress=progress, **kw)


def published_match(source: Source, cfg: dict, result):
    try:
        from .detect import match_published
    except ImportError:
        return None
    try:
        m = match_published(source.name if source.kind == "gguf" else source.path, cfg, result)
    except Exception:  # informational only
        return None
    return m


def _jsonable(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    if hasattr(x, "item"):
        try:
            return x.item()
        except Exception:
            pass
    return str(x)


# ----------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------
def convert(
    src: str,
    dst: str,
    qcfg: QuantConfig,
    *,
    prompt: str | None = None,
    super_weights: list | None = None,
    activation_outliers: list | dict | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    detect_kwargs: dict | None = None,
    log=print,
) -> dict:
    """Convert ``src`` into a superweight_rtn checkpoint at ``dst``; returns the conversion report (dict).

    ``super_weights``: None = detect them; a list (possibly empty) = use these (dicts / [layer, row, col] /
    detect.SuperWeight); ``activation_outliers`` goes with an explicit list (else none are written).
    Raises FormatError (SourceError, ConversionError) on bad input; nothing is written then.
    """
    import torch

    t_start = time.perf_counter()
    qcfg.validate()
    log = log or (lambda *a, **k: None)
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConversionError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError("--device cuda: CUDA is not available on this machine")

    # ---- 1. validate: source, destination, headers, shapes --------------------------------------------------
    source = resolve_source(src)
    dst = os.path.abspath(dst)
    src_abs = os.path.realpath(source.path if source.kind == "hf" else source.path)
    if os.path.realpath(dst) == src_abs or src_abs.startswith(os.path.realpath(dst) + os.sep) or (
        source.kind == "hf" and os.path.realpath(dst).startswith(src_abs + os.sep)
    ):
        raise ConversionError(f"DST {dst} would overlap the source {source.path}; choose another directory")
    if os.path.lexists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst) or "."
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConversionError(f"{parent} is not a directory")
    cfg = read_config(source)
    check_architecture(cfg)
    out_name = dtype or _default_dtype(source, cfg)
    out_dtype = torch_dtype(out_name)
    if source.kind == "hf" and cfg.get("quantization_config"):
        _plan(source, cfg, {}, qcfg, out_dtype)  # raises "already quantized"

    model = tokenizer = None
    state_dict = None
    if source.kind == "hf":
        tensors = read_safetensors_headers(hf_weight_files(source))
        plan = _plan(source, cfg, tensors, qcfg, out_dtype)
    else:
        from .models import load_model

        log(f"loading {source.name} (GGUF, dequantized by transformers) ...")
        model, tokenizer = load_model(source, cfg=cfg)
        state_dict = {k: v for k, v in model.state_dict().items()}
        tensors = {k: TensorInfo(k, None, tuple(v.shape), dtype_name(v.dtype)) for k, v in state_dict.items()}
        plan = _plan(source, cfg, tensors, qcfg, out_dtype)

    user_sws = None
    if super_weights is not None:
        user_sws = _resolve_sws([SWSpec.coerce(x) for x in super_weights], plan)

    # NaN / Inf anywhere (and every tensor readable) before detection and before anything is written
    stream = _iter_hf(plan, progress, "checking") if state_dict is None else _iter_state_dict(state_dict, False, "")
    for name, t in stream:
        _check_finite(name, t)

    # ---- 2. detection --------------------------------------------------------------------------------------
    t_det = time.perf_counter()
    detection = None
    if user_sws is None:
        if model is None:
            from .models import load_model

            det_dtype = None
            nbytes, has_f32 = _source_bytes(plan)
            ram = _total_ram()
            if has_f32 and ram and nbytes > 0.6 * ram:
                det_dtype = torch.bfloat16  # a float32 7B model (28 GB) would not fit: detect in bfloat16
                log(f"the float32 source ({nbytes / 2**30:.1f} GiB) is large for this machine's "
                    f"{ram / 2**30:.0f} GiB: detecting in bfloat16")
            log(f"loading {source.name} for super-weight detection ...")
            model, tokenizer = load_model(source, dtype=det_dtype, cfg=cfg)
        if device.startswith("cuda"):
            model.to(device)
        log("detecting super weights ...")
        detection = run_detection(model, tokenizer, prompt, progress=progress, **(detect_kwargs or {}))
        sws = _resolve_sws([SWSpec.coerce(s) for s in detection.super_weights], plan)
        outliers = _resolve_outliers(normalize_outliers(detection.activation_outliers or {}), plan)
        if device.startswith("cuda"):
            model.to("cpu")
    else:
        sws = user_sws
        outliers = _resolve_outliers(normalize_outliers(activation_outliers), plan) if activation_outliers else []
        if qcfg.activations != "none" and not outliers:
            log("warning: no activation-outlier channels given; int8 activations will quantize every channel")
    det_s = time.perf_counter() - t_det
    published = None
    if detection is not None:
        published = getattr(detection, "published", None) or published_match(source, cfg, detection)
        if published:
            log(f"published super-weight index: {json.dumps(_jsonable(published))[:400]}")
    if detection is not None:
        prompt_used = getattr(detection, "prompt", prompt)
        thresholds = _jsonable(getattr(detection, "thresholds", None))
    else:
        prompt_used, thresholds = None, None
    if source.kind == "hf":
        model = None  # free the float model before quantizing (streaming from here on)
        gc.collect()
    for sw in sws:
        note = "" if qcfg.restore_super_weights else " (not restored)"
        log(f"super weight: {sw.module}[{sw.row}, {sw.col}]{note}")
    if not sws:
        log("warning: no super weights found/given; only the --holdout fraction is kept exact")

    # ---- 3./4. quantize + write into a temporary directory -------------------------------------------------
    os.makedirs(parent, exist_ok=True)
    stale = sorted(f for f in os.listdir(parent) if f.startswith(os.path.basename(dst) + ".partial-"))
    if stale:
        log(f"note: leftover temporary directories of killed conversions in {parent}: {', '.join(stale)} "
            "(safe to delete when no conversion is running)")
    tmp = f"{dst}.partial-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.remove(tmp)
    os.makedirs(tmp)
    try:
        report = _write_checkpoint(
            plan, qcfg, tmp, sws, outliers, state_dict, model, tokenizer, device, progress, max_shard_bytes, log
        )
        del state_dict
        gc.collect()
        t_end = time.perf_counter()
        report["timing"].update({"detection_s": round(det_s, 3), "total_s": round(t_end - t_start, 3)})
        report["timing"]["params_per_s_total"] = round(report["totals"]["params_total"] / max(t_end - t_start, 1e-9))
        sidecar = {
            "format_version": FORMAT_VERSION,
            "super_weights": report.pop("_sidecar_sws"),
            "activation_outliers": outliers,
            "provenance": {
                "source": source.name if source.kind == "gguf" else source.path,
                "source_kind": source.kind,
                "source_sha256": source_hash(source),
                "prompt": prompt_used,
                "thresholds": thresholds,
                "detection": "detect" if detection is not None else ("user" if super_weights else "none"),
                "tool": f"vllm-superweight {__version__}",
                "created": _now(),
                "published_match": _jsonable(published),
                "output_dtype": dtype_name(out_dtype),
            },
        }
        _write_json(os.path.join(tmp, qcfg.sidecar or SIDECAR_NAME), sidecar)
        load_sidecar(os.path.join(tmp, qcfg.sidecar or SIDECAR_NAME))  # self-check
        report["created"] = sidecar["provenance"]["created"]
        report["source"] = sidecar["provenance"]["source"]
        _write_json(os.path.join(tmp, REPORT_NAME), report)
        _commit(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t = report["timing"]
    log(
        f"wrote {dst}: {report['totals']['modules_quantized']} Linear modules, "
        f"{report['totals']['params_quantized']:,} parameters quantized in {t['quantize_s']:.1f} s "
        f"({t['params_per_s']:,.0f} params/s); total {t['total_s']:.1f} s; "
        f"{report['totals']['output_bytes'] / 1e6:.1f} MB"
    )
    return report


def _commit(tmp: str, dst: str, overwrite: bool) -> None:
    """Move the finished checkpoint into place (an old DST is replaced only now)."""
    if os.path.lexists(dst):
        if not overwrite:  # appeared while we were converting
            raise ConversionError(f"{dst} appeared during the conversion; not replacing it (use --overwrite)")
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    else:
        os.replace(tmp, dst)


def _write_checkpoint(plan, qcfg, tmp, sws, outliers, state_dict, model, tokenizer, device, progress, max_shard_bytes,
                      log) -> dict:
    import torch

    from .quantize import dequantize_tensors, quantize_weight, select_holdout, to_tensors

    out_dtype = plan.out_dtype
    layout = qcfg.layout
    sw_by_mod: dict[str, list[SWSpec]] = {}
    for sw in sws:
        sw_by_mod.setdefault(sw.module, []).append(sw)
    outl_by_mod = {e["module"]: e["channels"] for e in outliers} if qcfg.activations != "none" else {}

    writer = ShardWriter(tmp, max_shard_bytes)
    modules: dict[str, dict] = {}
    sidecar_sws: list[dict] = []
    verify: list[dict] = []
    params_q = params_total = held_total = 0
    bytes_q_in = bytes_q_out = 0
    t_q = 0.0
    stream = _iter_hf(plan, progress, "quantizing") if state_dict is None else _iter_state_dict(
        state_dict, progress, "quantizing")
    for name, t in stream:
        if name in plan.drop:
            continue
        params_total += t.numel()
        mod = quantized_module(name, tuple(t.shape), plan.ignore)
        if mod is None or mod not in plan.quant:
            if t.is_floating_point() and t.dtype != out_dtype:
                t = t.to(out_dtype)
                _check_cast(name, t, out_dtype)
            writer.add(name, t)
            continue
        t0 = time.perf_counter()
        w = t.to(out_dtype)
        if t.dtype != out_dtype:
            _check_cast(name, w, out_dtype)
        if device != "cpu":
            w = w.to(device)
        coords = [(sw.row, sw.col) for sw in sw_by_mod.get(mod, [])]
        mask = select_holdout(w, qcfg.holdout, extra=coords if qcfg.restore_super_weights else ())
        if not qcfg.restore_super_weights:
            for r, c in coords:  # ablation: the super weight is quantized like any other weight
                mask[r, c] = False
        try:
            ql = quantize_weight(w, qcfg.bits, layout, qcfg.symmetric, qcfg.clip, qcfg.clip_threshold, mask,
                                 scale_dtype=out_dtype)
        except FormatError as e:
            raise ConversionError(f"{name}: {e}") from None
        ts = {k: v.detach().cpu() for k, v in to_tensors(ql, out_dtype).items()}
        if mod in outl_by_mod:
            ts[ACT_OUTLIERS] = torch.tensor(sorted(set(outl_by_mod[mod])), dtype=torch.int32)
        t_q += time.perf_counter() - t0
        for suffix in sorted(ts):
            writer.add(f"{mod}.{suffix}", ts[suffix])
        st = dict(ql.stats)
        st["layer"] = layer_of(mod)
        st["super_weights"] = len(coords)
        st["bytes"] = int(sum(v.numel() * v.element_size() for v in ts.values()))
        modules[mod] = st
        params_q += w.numel()
        held_total += st["held_out"]
        bytes_q_in += w.numel() * w.element_size()
        bytes_q_out += st["bytes"]
        if coords:
            deq = dequantize_tensors(ts, qcfg.bits, qcfg.symmetric, layout, restore=True)
            wc = w.detach().cpu()
            held = set()
            if "sparse_index" in ts:
                held = set(zip(ts["sparse_index"][0].tolist(), ts["sparse_index"][1].tolist()))
            for sw in sw_by_mod[mod]:
                orig = wc[sw.row, sw.col]
                got = deq[sw.row, sw.col].to(out_dtype)
                exact = bool(got.view(torch.int16 if out_dtype != torch.float32 else torch.int32)
                             == orig.view(torch.int16 if out_dtype != torch.float32 else torch.int32))
                restored = (sw.row, sw.col) in held
                if qcfg.restore_super_weights and not (restored and exact):
                    raise ConversionError(
                        f"internal error: super weight {mod}[{sw.row}, {sw.col}] does not come back bit-exact "
                        f"({float(got)} != {float(orig)})"
                    )
                value = float(orig)
                dn = dtype_name(out_dtype)
                sidecar_sws.append({
                    "module": mod, "layer": layer_of(mod), "row": sw.row, "col": sw.col,
                    "value": value, "bits": float_bits_hex(value, dn), "dtype": dn,
                    "input_spike": sw.input_spike, "output_spike": sw.output_spike,
                    "confirmed": sw.confirmed,  # None: not checked by ablation
                    "restored": restored,
                })
                verify.append({"module": mod, "row": sw.row, "col": sw.col, "value": value,
                               "dequantized": float(got), "restored": restored, "bit_exact": exact,
                               "abs_err": abs(float(got) - value)})
        del w, mask, ql
    files = writer.finish()

    cfg_out = _output_config(plan, qcfg, model)
    _write_json(os.path.join(tmp, "config.json"), cfg_out)
    copied = _copy_tokenizer_files(plan, tmp, tokenizer, model)
    if not any(f in copied for f in ("tokenizer.json", "vocab.json")) and not any(f.endswith(".model") for f in copied):
        log("warning: the source has no tokenizer files; serve the checkpoint with `vllm serve DST --tokenizer ...`")

    # per-layer summary of the per-module stats
    layers: dict[int, dict] = {}
    for mod, st in modules.items():
        L = layers.setdefault(st["layer"], {"layer": st["layer"], "modules": 0, "params": 0, "sq_err": 0.0,
                                            "max_abs_err": 0.0, "max_rel_fro_err": 0.0, "clipped": 0, "held_out": 0})
        n = st["shape"][0] * st["shape"][1]
        L["modules"] += 1
        L["params"] += n
        L["sq_err"] += st["mse"] * n
        L["max_abs_err"] = max(L["max_abs_err"], st["max_abs_err"])
        L["max_rel_fro_err"] = max(L["max_rel_fro_err"], st["rel_fro_err"])
        L["clipped"] += st["clipped"]
        L["held_out"] += st["held_out"]
    per_layer = []
    for k in sorted(layers):
        L = layers.pop(k)
        L["mse"] = L.pop("sq_err") / max(L["params"], 1)
        per_layer.append(L)
    sorted_sws = sorted(sidecar_sws, key=lambda e: (e["layer"], e["module"], e["row"], e["col"]))
    return {
        "format_version": FORMAT_VERSION,
        "tool": f"vllm-superweight {__version__}",
        "quantization_config": cfg_out["quantization_config"],
        "output_dtype": dtype_name(out_dtype),
        "device": device,
        "files": files + sorted(f for f in copied),
        "totals": {
            "modules_quantized": len(modules),
            "params_quantized": params_q,
            "params_total": params_total,
            "held_out": held_total,
            "held_out_fraction": held_total / max(params_q, 1),
            "quantized_bytes_in": bytes_q_in,
            "quantized_bytes_out": bytes_q_out,
            "output_bytes": writer.total_bytes,
            "bits_per_weight": 8 * bytes_q_out / max(params_q, 1),
        },
        "super_weights": {
            "found": len(sws),
            "restored": sum(1 for v in verify if v["restored"]),
            "all_bit_exact": all(v["bit_exact"] for v in verify if v["restored"]),
            "verify": sorted(verify, key=lambda v: (layer_of(v["module"]) or 0, v["module"], v["row"], v["col"])),
        },
        "activation_outliers": {"modules": len(outliers), "written": sorted(outl_by_mod)},
        "timing": {"quantize_s": round(t_q, 3), "params_per_s": round(params_q / max(t_q, 1e-9))},
        "per_layer": per_layer,
        "modules": dict(sorted(modules.items(), key=lambda kv: (kv[1]["layer"], kv[0]))),
        "_sidecar_sws": sorted_sws,
    }


# ----------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------
PRESET_KEYS = {f.name for f in dataclasses.fields(QuantConfig)} - {"format_version", "quant_method", "sidecar"}


def preset_dirs() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.join(os.path.dirname(here), "quant_configs"), os.path.join(here, "data", "quant_configs")]
    return [d for d in dirs if os.path.isdir(d)]


def list_presets() -> list[str]:
    names = set()
    for d in preset_dirs():
        names |= {f[:-5] for f in os.listdir(d) if f.endswith(".json")}
    return sorted(names)


def load_preset(name_or_path: str) -> dict:
    """A preset's QuantConfig fields (a name from quant_configs/ or a path to a JSON file)."""
    path = None
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        path = name_or_path
    else:
        for d in preset_dirs():
            p = os.path.join(d, name_or_path + ".json")
            if os.path.isfile(p):
                path = p
                break
    if path is None:
        raise ConversionError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets()) or '(none)'}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"preset {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"preset {path}: expected a JSON object")
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "description"}
    unknown = set(data) - PRESET_KEYS
    if unknown:
        raise ConversionError(f"preset {path}: unknown keys {sorted(unknown)}; allowed: {sorted(PRESET_KEYS)}")
    return data


def parse_clip(text: str) -> tuple[str, float | None]:
    method, _, thr = text.partition(":")
    method = method.strip().lower()
    if not thr:
        return method, None
    try:
        return method, float(thr)
    except ValueError:
        raise ConversionError(f"--clip {text!r}: threshold {thr!r} is not a number") from None


def build_quant_config(preset: str | None = "default", **overrides) -> QuantConfig:
    """QuantConfig from a preset with explicit (non-None) overrides; validated."""
    fields = load_preset(preset) if preset else {}
    for k, v in overrides.items():
        if v is not None:
            fields[k] = v
    try:
        return QuantConfig(**fields)
    except TypeError as e:
        raise ConversionError(f"bad quantization options: {e}") from None


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise ConversionError(f"bad size {text!r}; e.g. 2GB, 500MB")
    unit = (m.group(2) or "").rstrip("b")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    v = int(float(m.group(1)) * mult)
    if v <= 0:
        raise ConversionError(f"bad size {text!r}")
    return v
