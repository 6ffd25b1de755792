"""The linear scheme of superweight_rtn: registers a layer's checkpoint tensors as vLLM parameters and delegates
the math to a kernel chosen from one priority list (``vllm_superweight.kernels.linear``), like vLLM's
compressed-tensors schemes.

* weight-only (W3/W4/W8, A16): integer weights + per-row/group scales (+ integer zero points) expanded at load to
  what the mixed-precision kernels take;
* W8A8 int8: int8 weights with per-row scales; activations quantized dynamically per token (or per tensor)
  except the listed outlier channels, which stay 16-bit.

Both restore the held-out weights (super weights and ``holdout``) exactly: the kernel adds the sparse
correction ``y[:, r] += w[r, c] · x[:, c]`` (the packed weights hold 0 at those positions).
"""

from __future__ import annotations

import logging

import torch

from .. import envs
from ..format import FormatError
from ..kernels.linear import NoKernelError, SWLinearConfig, SWLinearKernel, choose_kernel
from ..kernels.linear import weight_only as WO
from . import loading
from .loading import LinearSpec, kernel_bits

_LOGGED_KERNELS: set = set()
_EXTRAS = ("sparse_index", "sparse_value", "act_outlier_channels")


def _log_kernel_once(kind: str, desc: str, prefix: str) -> None:
    """One INFO line per distinct kernel choice in this process (which GEMM serves the layers)."""
    if (kind, desc) in _LOGGED_KERNELS:
        return
    _LOGGED_KERNELS.add((kind, desc))
    from vllm.logger import init_logger

    init_logger("vllm.superweight_rtn").info("superweight_rtn %s linears: %s (first: %s)", kind, desc, prefix)


def _hint_humming_once(config: SWLinearConfig, chosen: type) -> None:
    """Where ``auto`` would take the one Humming copy but the optional package is missing (a Hopper GPU): say once
    what installing it buys. Two W4 copies (the Marlin / Machete pair) or a Marlin copy serve meanwhile."""
    if "humming" in _LOGGED_KERNELS or chosen is WO.HummingGemvKernel or envs.humming_installed():
        return
    if envs.w4_kernel() != "auto" or not WO.HummingGemvKernel.auto_can_implement(config)[0]:
        return  # (auto's own rule: Hopper, an unsplit layer, batch-invariant mode off)
    _LOGGED_KERNELS.add("humming")
    logging.getLogger("vllm.superweight_rtn").info(
        "superweight_rtn: %s serves %s; `pip install vllm-superweight[humming]` (humming-kernels) serves ONE W4 copy "
        "in Humming's layout instead (H100, 7B, s36: 1.39x / 1.27x / 1.06x AWQ at batch 1 / 8 / 64 from 0.985x "
        "AWQ's weight memory; the Marlin / Machete pair keeps two copies, 1.81x)",
        chosen.__name__,
        config.prefix,
    )


class SWLinearScheme:
    """One quantized Linear: ``create_weights`` (parameters + loaders), checks at load, then the kernel."""

    def __init__(
        self, qcfg, prefix: str, sparse_enabled: bool, super_weights: list, act_outliers: list[int] | None = None
    ):
        self.qcfg = qcfg
        self.prefix = prefix
        self.layout = qcfg.layout
        self.activations = str(getattr(qcfg.activations, "value", qcfg.activations))
        self.weight_only = self.activations == "none"
        self.sparse_enabled = sparse_enabled
        self.super_weights = super_weights  # sidecar entries of this module
        # the sidecar's activation-outlier channels (weight-only checkpoints; W8A8 ones carry them as tensors):
        # for kernels that quantize activations after all (``SUPERWEIGHT_CPU_W4A8``)
        self.act_outliers = list(act_outliers or [])
        self.kernel: SWLinearKernel | None = None
        self.required: list[str] = []

    # ---- create_weights --------------------------------------------------------------------------------------
    def create_weights(
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        weight_loader,
    ) -> None:
        from vllm.model_executor.parameter import BasevLLMParameter

        qc = self.qcfg
        n_p, k_p = sum(output_partition_sizes), input_size_per_partition
        group = self.layout.kind == "group"
        if group and k_p % self.layout.size:
            raise FormatError(
                f"{self.prefix}: group size {self.layout.size} does not divide this rank's input size {k_p}"
            )
        layer.params_dtype = params_dtype
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = k_p
        layer.output_size_per_partition = n_p
        config = SWLinearConfig(
            prefix=self.prefix,
            bits=qc.bits,
            symmetric=qc.symmetric if self.weight_only else True,
            group_size=self.layout.size if group else -1,
            activations=self.activations,
            act_dtype=params_dtype,
            full_shape=(input_size, output_size),
            partition_shape=(k_p, n_p),
            device_type=_target_device_type(),
            holdout=float(qc.holdout) if self.sparse_enabled else 0.0,
        )
        try:
            kernel_cls = choose_kernel(config)
        except NoKernelError as e:
            raise FormatError(str(e)) from None
        if self.weight_only:
            _hint_humming_once(config, kernel_cls)
        self.spec = LinearSpec(self.prefix, qc.bits, self.layout, config.symmetric, input_size)
        if self.weight_only:
            self._create_weight_only(layer, n_p, k_p, params_dtype, weight_loader)
        else:
            self._create_w8a8(layer, n_p, k_p, weight_loader)
        layer.register_parameter(
            "weight_shape",
            BasevLLMParameter(
                data=torch.empty(2, dtype=torch.int64),
                weight_loader=self._loader(layer, "weight_shape", weight_loader, lambda t, sid: t),
            ),
        )
        self.required.append("weight_shape")
        for name in _EXTRAS:
            from vllm.model_executor.utils import set_weight_attrs

            p = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": loading.stash_loader(layer, name)})
            layer.register_parameter(name, p)
        layer._sw_stash = {}
        self.kernel = kernel_cls(config)

    def _loader(self, layer, name, weight_loader, transform):
        return loading.wrap_loader(layer, name, weight_loader, transform)

    def _n_of(self, layer):
        return lambda sid: loading.shard_rows(layer, sid)

    def _create_weight_only(self, layer, n_p, k_p, params_dtype, weight_loader) -> None:
        from vllm.model_executor.parameter import (
            ChannelQuantScaleParameter,
            GroupQuantScaleParameter,
            PackedColumnParameter,
            PackedvLLMParameter,
        )

        spec, n_of = self.spec, self._n_of(layer)
        pf = 32 // kernel_bits(self.qcfg.bits)
        if n_p % pf:
            raise FormatError(f"{self.prefix}: output size {n_p} per rank is not a multiple of {pf}")
        group = self.layout.kind == "group"
        ng_p = k_p // self.layout.size if group else 1
        layer.register_parameter(
            "weight_packed",
            PackedvLLMParameter(
                input_dim=1,
                output_dim=0,
                packed_dim=1,
                packed_factor=pf,
                data=torch.empty(n_p, k_p // pf, dtype=torch.int32),
                weight_loader=self._loader(
                    layer, "weight_packed", weight_loader, lambda w, sid: spec.weight_for_kernel(w, n_of(sid))
                ),
            ),
        )
        s_loader = self._loader(
            layer, "weight_scale", weight_loader, lambda s, sid: spec.scale_for_kernel(s, n_of(sid), params_dtype)
        )
        sdata = torch.empty(n_p, ng_p, dtype=params_dtype)
        if group:
            scale = GroupQuantScaleParameter(output_dim=0, input_dim=1, data=sdata, weight_loader=s_loader)
        else:
            scale = ChannelQuantScaleParameter(output_dim=0, data=sdata, weight_loader=s_loader)
        layer.register_parameter("weight_scale", scale)
        self.required += ["weight_packed", "weight_scale"]
        if not self.qcfg.symmetric:
            z_loader = self._loader(
                layer, "weight_zero_point", weight_loader, lambda z, sid: spec.zero_for_kernel(z, n_of(sid))
            )
            zdata = torch.zeros(n_p // pf, ng_p, dtype=torch.int32)
            if group:
                zp = PackedvLLMParameter(
                    input_dim=1, output_dim=0, packed_dim=0, packed_factor=pf, data=zdata, weight_loader=z_loader
                )
            else:
                zp = PackedColumnParameter(
                    output_dim=0, packed_dim=0, packed_factor=pf, data=zdata, weight_loader=z_loader
                )
            layer.register_parameter("weight_zero_point", zp)
            self.required.append("weight_zero_point")

    def _create_w8a8(self, layer, n_p, k_p, weight_loader) -> None:
        from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter

        spec, n_of = self.spec, self._n_of(layer)
        layer.register_parameter(
            "weight_packed",
            ModelWeightParameter(  # checkpoint name; int8 [N_p, K_p] here
                input_dim=1,
                output_dim=0,
                data=torch.empty(n_p, k_p, dtype=torch.int8),
                weight_loader=self._loader(
                    layer, "weight_packed", weight_loader, lambda t, sid: spec.unpack_weight(t, n_of(sid))
                ),
            ),
        )
        layer.register_parameter(
            "weight_scale",
            ChannelQuantScaleParameter(
                output_dim=0,
                data=torch.empty(n_p, 1, dtype=torch.float32),
                weight_loader=self._loader(
                    layer,
                    "weight_scale",
                    weight_loader,
                    lambda t, sid: spec.scale_for_kernel(t, n_of(sid), torch.float32),
                ),
            ),
        )
        self.required += ["weight_packed", "weight_scale"]

    # ---- after loading ---------------------------------------------------------------------------------------
    def _check_super_weights(self, layer) -> None:
        """Every sidecar super weight of this module must be among its held-out entries, with the same value."""
        if not self.super_weights:
            return
        idx_by = layer._sw_stash.get("sparse_index", {})
        val_by = layer._sw_stash.get("sparse_value", {})
        entries = {}
        for sid, idx in idx_by.items():
            if sid is not None or sid not in val_by:
                continue  # super weights live in down_proj (never a merged layer)
            for r, c, v in zip(idx[0].tolist(), idx[1].tolist(), val_by[sid].float().tolist()):
                entries[(r, c)] = v
        n_full, k_full = int(layer.output_size), int(layer.input_size)
        for sw in self.super_weights:
            r, c = sw.row, sw.col
            if not (0 <= r < n_full and 0 <= c < k_full):
                raise FormatError(f"super weight {self.prefix}[{r}, {c}] lies outside its matrix [{n_full}, {k_full}]")
            if sw.restored and self.qcfg.restore_super_weights:
                if (r, c) not in entries:
                    raise FormatError(
                        f"super weight {self.prefix}[{r}, {c}] is listed in the sidecar but missing from the "
                        "checkpoint's sparse_index: the checkpoint is inconsistent"
                    )
                if entries[(r, c)] != sw.value:
                    raise FormatError(
                        f"super weight {self.prefix}[{r}, {c}]: sidecar value {sw.value!r} differs from the "
                        f"checkpoint's held-out value {entries[(r, c)]!r}"
                    )

    def process_weights_after_loading(self, layer) -> None:
        assert self.kernel is not None
        loading.check_loaded(layer, self.prefix, self.required)
        self._check_super_weights(layer)
        rows, cols, vals = loading.finalize_sparse(layer, lambda sid: loading.shard_rows(layer, sid))
        if not self.sparse_enabled:
            rows, cols, vals = rows[:0], cols[:0], vals[:0]
        outliers = None if self.weight_only else loading.finalize_outliers(layer)
        for name in _EXTRAS:
            if name in layer._parameters:
                del layer._parameters[name]
        del layer._parameters["weight_shape"]
        layer._sw_stash = {}
        if outliers is not None:
            self.kernel.set_outliers(layer, outliers)  # type: ignore[attr-defined]
        elif self.act_outliers:
            ch = loading.local_channels(layer, torch.tensor(self.act_outliers, dtype=torch.long))
            self.kernel.set_act_outliers(layer, ch)
        self.kernel.process_weights_after_loading(layer)
        self.kernel.set_sparse(layer, rows, cols, vals)
        layer.sw_nnz = int(rows.numel())
        layer.sw_kernel = self.kernel.describe()
        _log_kernel_once(f"W{self.qcfg.bits}" if self.weight_only else "W8A8", layer.sw_kernel, self.prefix)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)  # type: ignore[union-attr]


def _target_device_type() -> str:
    """Device type the weights will live on: vLLM builds the model under its device context."""
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)
    except Exception:
        return "cpu"
