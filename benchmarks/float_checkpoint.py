"""The float reference of a model source as a plain HF directory (safetensors): what the quality benchmarks serve
as "float" and calibrate AWQ / SmoothQuant from (benchmark scaffolding, not part of the package).

    from float_checkpoint import write_float_checkpoint   # benchmarks/ on sys.path
"""

from __future__ import annotations

import json
import os
import shutil


def write_float_checkpoint(source, out_dir: str, *, dtype: str = "float32", zero: list[dict] | None = None) -> str:
    """Write an HF directory (safetensors) of the dequantized float model of ``source`` (alias, GGUF or dir).

    ``quantization_config`` (transformers records the GGUF type there) is dropped so vLLM serves plain float
    weights. ``zero``: list of {"module", "row", "col"} weights set to 0 (the super-weight ablation).
    """
    import torch

    from vllm_superweight.models import load_model

    model, tok = load_model(source, dtype=torch.float32)
    if zero:
        mods = dict(model.named_modules())
        with torch.no_grad():
            for z in zero:
                m = mods.get(z["module"])
                if m is None:
                    raise KeyError(f"module {z['module']} not in the model")
                m.weight[int(z["row"]), int(z["col"])] = 0.0
    model = model.to(getattr(torch, dtype))
    # The GGUF weights are already dequantized to float: forget the GGUF "quantizer" so the model serializes.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    tmp = out_dir.rstrip("/") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
