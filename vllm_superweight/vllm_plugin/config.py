"""vLLM quantization method ``superweight_rtn`` (registered on import; see ``vllm_superweight.register``)."""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .. import envs
from ..checkpoint import validate_checkpoint
from ..format import QUANT_METHOD, FormatError, QuantConfig, SuperWeight, is_ignored
from .schemes import SWLinearScheme

#: vLLM's fused linears of the Llama-style models, where a model class names none
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@register_quantization_config(QUANT_METHOD)
class SuperWeightRTNConfig(QuantizationConfig):
    """Config of a checkpoint written by ``superweight convert`` (config.json ``quantization_config``)."""

    def __init__(self, qcfg: QuantConfig | None = None, raw: dict | None = None) -> None:
        super().__init__()
        self.qcfg = qcfg
        self.raw = raw or {}
        self.sidecar = None  # format.Sidecar, read in maybe_update_config
        # Read in the frontend process and pickled to the workers with the config.
        self.sparse_enabled = not envs.disable_correction()
        self.super_weights_by_module: dict[str, list[SuperWeight]] = {}
        self.act_outliers_by_module: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"SuperWeightRTNConfig({self.raw})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SuperWeightRTNConfig:
        config = {k: v for k, v in config.items() if k != envs.SERVING_KNOBS_KEY}
        return cls(QuantConfig.from_dict(config), config)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> None:
        """Never overrides another method; for our checkpoints, records the graph-changing knobs
        (``envs.graph_knobs``) in the model's in-memory ``quantization_config``, which vLLM's compile-cache hash
        covers (``ModelConfig.compute_hash`` hashes the HF config). Nothing is written to disk."""
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD and hf_config is not None:
            qc = getattr(hf_config, "quantization_config", None)
            if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
                qc[envs.SERVING_KNOBS_KEY] = envs.graph_knobs()
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        if self.qcfg is None:
            raise FormatError(
                f"{model_name}: --quantization {QUANT_METHOD} needs a checkpoint written by `superweight convert` "
                "(its config.json has no quantization_config)"
            )
        if not os.path.isdir(model_name):
            raise FormatError(f"{QUANT_METHOD} serves local checkpoint directories; {model_name!r} is not one")
        # config.json, the sidecar (inside the checkpoint only), every tensor header: refused here, before any
        # weight is read, with one message naming the module/tensor/field (vllm_superweight.checkpoint)
        _, sidecar = validate_checkpoint(model_name)
        self.sidecar = sidecar
        self.super_weights_by_module = sidecar.by_module()
        self.act_outliers_by_module = {ao.module: ao.channels for ao in sidecar.activation_outliers}

    def act_outliers_for(self, prefix: str) -> list[int]:
        """The sidecar's activation-outlier input channels of vLLM module ``prefix`` (full input coordinates); a
        fused module (``qkv_proj``, ``gate_up_proj``: the model's ``packed_modules_mapping``) gets the union of its
        parts' (they share one input)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = (self.packed_modules_mapping or DEFAULT_PACKED_MODULES).get(leaf, [leaf])
        chans: set[int] = set(self.act_outliers_by_module.get(prefix, ()))
        for part in parts:
            chans.update(self.act_outliers_by_module.get(f"{parent}.{part}" if parent else part, ()))
        return sorted(chans)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        if self.qcfg is None:
            raise FormatError(f"--quantization {QUANT_METHOD} needs a checkpoint written by `superweight convert`")
        if is_ignored(prefix, self.qcfg.ignore):
            return UnquantizedLinearMethod()
        return SuperWeightRTNLinearMethod(self, prefix)


@register_weight_loader_v2_supported_method
class SuperWeightRTNLinearMethod(LinearMethodBase):
    def __init__(self, config: SuperWeightRTNConfig, prefix: str) -> None:
        self.config = config
        self.scheme = SWLinearScheme(
            config.qcfg,
            prefix,
            config.sparse_enabled,
            config.super_weights_by_module.get(prefix, []),
            config.act_outliers_for(prefix),
        )

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        self.scheme.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            extra_weight_attrs["weight_loader"],
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.scheme.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.scheme.apply(layer, x, bias)
