"""The converter: source model -> superweight_rtn checkpoint (``superweight convert``), one module per job.

* ``plan``: validate the source and plan the conversion (quantized Linears, tiling, super weights, NaN/Inf);
* ``process``: quantize one Linear (its tensors, statistics, verified super weights);
* ``prompt``: what the detection prompt's forward pass tells the quantizer (grid-fit weights, hold-out budget and
  ranking);
* ``save``: the destination (overwrite rules, temporary directory, atomic commit), the shard writer;
* ``report``: config.json, the sidecar, the conversion report, the conversion id;
* ``options``: presets (package data) and option parsing;
* ``pipeline``: ``convert()``, the stages in order.

Input streaming (safetensors shards, GGUF state dicts) lives beside the model sources in ``vllm_superweight.models``.
"""

from __future__ import annotations

from .errors import ConversionError
from .options import (
    PRESET_KEYS,
    build_quant_config,
    list_presets,
    load_preset,
    parse_clip,
    parse_grid_params,
    parse_size,
    torch_dtype,
)
from .pipeline import convert, published_match, read_super_weights_json, run_detection
from .plan import Plan, make_plan, normalize_outliers, quantized_module, resolve_module
from .save import DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILES, Destination, ShardWriter

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "PRESET_KEYS",
    "TOKENIZER_FILES",
    "ConversionError",
    "Destination",
    "Plan",
    "ShardWriter",
    "build_quant_config",
    "convert",
    "list_presets",
    "load_preset",
    "make_plan",
    "normalize_outliers",
    "parse_clip",
    "parse_grid_params",
    "parse_size",
    "published_match",
    "quantized_module",
    "read_super_weights_json",
    "resolve_module",
    "run_detection",
    "torch_dtype",
]
