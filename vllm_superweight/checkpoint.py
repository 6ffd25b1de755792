"""Read converted checkpoints back as float (the reference the serving path must match).

``load_dequantized_model`` rebuilds a plain transformers model whose Linear weights are the dequantized integer
weights with every held-out weight (super weights, --holdout) restored exactly: what ``superweight_rtn`` serves,
computed without any kernel. Used by tests (logit comparisons), ``superweight inspect`` and eval spot checks.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from .format import LINEAR_SUFFIXES, W_PACKED, FormatError, QuantConfig
from .quantize import dequantize_tensors


def read_quant_config(ckpt: str) -> tuple[dict, QuantConfig]:
    try:
        with open(os.path.join(ckpt, "config.json")) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{ckpt}: no config.json") from None
    qd = cfg.get("quantization_config")
    if not qd:
        raise FormatError(f"{ckpt}: config.json has no quantization_config (not a superweight_rtn checkpoint)")
    return cfg, QuantConfig.from_dict(qd)


def iter_tensors(ckpt: str):
    """(name, tensor) over every safetensors shard of the checkpoint (index order if an index exists)."""
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    for fn in files:
        with safe_open(os.path.join(ckpt, fn), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def dequantized_state_dict(ckpt: str, restore: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF-named float state dict: quantized Linears dequantized (held-out weights restored if ``restore``)."""
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
        plain[mod + ".weight"] = dequantize_tensors(ts, qc.bits, qc.symmetric, qc.block, restore=restore).to(dtype)
    return plain


def load_dequantized_model(ckpt: str, restore: bool = True, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a transformers model holding the dequantized, super-weight-restored weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg_dict, _ = read_quant_config(ckpt)
    cfg_dict = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = dequantized_state_dict(ckpt, restore=restore, dtype=dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise FormatError(f"{ckpt}: tensors do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    return model, tok
