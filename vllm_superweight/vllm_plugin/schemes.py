"""Linear schemes of superweight_rtn (one class per scheme, like vLLM's compressed-tensors schemes).

* ``SWWeightOnlyScheme`` (W3/W4/W8, A16): integer weights + per-row/group scales expanded at load, GEMM by the
  platform's mixed-precision kernel chosen by vLLM (Machete/Marlin on CUDA, CPUWNA16 on CPU) or, where none
  fits (e.g. 8-bit on CPU), a torch dequantized GEMM;
* ``SWW8A8Scheme`` (W8A8 int8): int8 weights with per-row scales, activations quantized dynamically per token
  (or per tensor) except the listed outlier channels, which stay 16-bit:
  ``y = W · Q(x with outlier channels removed) + W[:, S] · x[:, S]``.

Both add the exact sparse correction of the held-out weights beside the GEMM,
``y[:, r] += w[r, c] · x[:, c]`` (the packed weights hold 0 at those positions), only on layers that have
held-out entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import BlockLayout, FormatError
from . import loading
from .loading import LinearSpec, kernel_bits


_LOGGED_KERNELS: set = set()


def _log_kernel_once(kind: str, desc: str, prefix: str) -> None:
    """One INFO line per distinct kernel choice in this process (which GEMM serves the layers)."""
    if (kind, desc) in _LOGGED_KERNELS:
        return
    _LOGGED_KERNELS.add((kind, desc))
    from vllm.logger import init_logger

    init_logger("vllm_superweight").info("superweight_rtn %s linears: %s (first: %s)", kind, desc, prefix)


def _kernels():
    from .. import kernels

    return kernels


class SWScheme:
    """Shared parts: placeholders for variable-length tensors, sparse correction."""

    def __init__(self, qcfg, prefix: str, sparse_enabled: bool, super_weights: list[dict]):
        self.qcfg = qcfg
        self.prefix = prefix
        self.layout = BlockLayout.parse(qcfg.block)
        self.sparse_enabled = sparse_enabled
        self.super_weights = super_weights  # sidecar entries of this module

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _register_extras(self, layer) -> None:
        from vllm.model_executor.utils import set_weight_attrs

        layer._sw_stash = {}
        for name in ("sparse_index", "sparse_value", "act_outlier_channels"):
            p = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": loading.stash_loader(layer, name)})
            layer.register_parameter(name, p)

    def _check_super_weights(self, layer) -> None:
        """Every sidecar super weight of this module must be among its held-out entries, with the same value."""
        if not self.super_weights:
            return
        idx_by = layer._sw_stash.get("sparse_index", {})
        val_by = layer._sw_stash.get("sparse_value", {})
        entries = {}
        for sid, idx in idx_by.items():
            if sid is not None:
                continue  # super weights live in down_proj (never a merged layer)
            for r, c, v in zip(idx[0].tolist(), idx[1].tolist(), val_by[sid].float().tolist()):
                entries[(r, c)] = v
        n_full = int(layer.output_size)
        for sw in self.super_weights:
            r, c = int(sw["row"]), int(sw["col"])
            if not (0 <= r < n_full and 0 <= c < int(layer.input_size)):
                raise FormatError(
                    f"super weight {self.prefix}[{r}, {c}] lies outside its matrix [{n_full}, {layer.input_size}]"
                )
            if sw.get("restored", True) and self.qcfg.restore_super_weights:
                if (r, c) not in entries:
                    raise FormatError(
                        f"super weight {self.prefix}[{r}, {c}] is listed in the sidecar but missing from the "
                        "checkpoint's sparse_index: the checkpoint is inconsistent"
                    )
                if entries[(r, c)] != float(sw["value"]):
                    raise FormatError(
                        f"super weight {self.prefix}[{r}, {c}]: sidecar value {sw['value']!r} differs from the "
                        f"checkpoint's held-out value {entries[(r, c)]!r}"
                    )

    def _finalize_sparse(self, layer, device) -> None:
        rows, cols, vals = loading.finalize_sparse(layer, lambda sid: loading.shard_rows(layer, sid))
        layer.sw_nnz = int(rows.numel()) if self.sparse_enabled else 0
        layer.sw_sparse_keys = []
        if layer.sw_nnz:
            sp = _kernels().prepare_sparse(
                rows, cols, vals, layer.output_size_per_partition, layer.input_size_per_partition, device
            )
            for k, v in sp.items():
                layer.register_buffer(f"sw_sp_{k}", v, persistent=False)
            layer.sw_sparse_keys = list(sp)

    def _sparse(self, layer) -> dict:
        return {k: getattr(layer, f"sw_sp_{k}") for k in layer.sw_sparse_keys}

    def _drop_placeholders(self, layer) -> None:
        for name in ("sparse_index", "sparse_value", "act_outlier_channels"):
            if name in layer._parameters:
                del layer._parameters[name]
        layer._sw_stash = {}

    def _apply_sparse(self, layer, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not layer.sw_nnz:
            return y
        y2 = y.reshape(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        return _kernels().sparse_correction(y2, x2, self._sparse(layer)).reshape(y.shape)


class SWWeightOnlyScheme(SWScheme):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, weight_loader):
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.model_executor.parameter import (
            BasevLLMParameter,
            ChannelQuantScaleParameter,
            GroupQuantScaleParameter,
            PackedColumnParameter,
            PackedvLLMParameter,
        )
        from vllm.scalar_type import scalar_types

        qc = self.qcfg
        n_p = sum(output_partition_sizes)
        k_p = input_size_per_partition
        kb = kernel_bits(qc.bits)
        pf = 32 // kb
        sym = qc.symmetric
        group = self.layout.kind == "group"
        g = self.layout.size if group else -1
        if group and k_p % g:
            raise FormatError(f"{self.prefix}: group size {g} does not divide this rank's input size {k_p}")
        if n_p % pf:
            raise FormatError(f"{self.prefix}: output size {n_p} per rank is not a multiple of {pf}")
        spec = LinearSpec(self.prefix, qc.bits, self.layout, sym, input_size)
        self.spec = spec
        layer.params_dtype = params_dtype
        layer.input_size_per_partition = k_p
        layer.output_size_per_partition = n_p

        wtype = {(4, True): scalar_types.uint4b8, (4, False): scalar_types.uint4,
                 (8, True): scalar_types.uint8b128, (8, False): scalar_types.uint8}[(kb, sym)]
        self.mp_config = MPLinearLayerConfig(
            full_weight_shape=(input_size, output_size),
            partition_weight_shape=(k_p, n_p),
            weight_type=wtype,
            act_type=params_dtype,
            group_size=g,
            zero_points=not sym,
            has_g_idx=False,
        )
        try:
            kernel_type = choose_mp_linear_kernel(self.mp_config)
        except ValueError:
            kernel_type = None  # torch fallback (dequantize once at load)
        if kernel_type is not None and kernel_type.__name__ == "CPUWNA16LinearKernel" and params_dtype == torch.float32:
            kernel_type = None  # cpu_gemm_wna16 has no fp32 path
        kernel_type, self.small_kernel_type = self._per_batch_kernels(kernel_type)
        self.kernel_type = kernel_type

        def n_of(sid):
            return loading.shard_rows(layer, sid)

        weight = PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=pf,
            data=torch.empty(n_p, k_p // pf, dtype=torch.int32),
            weight_loader=loading.wrap_loader(weight_loader, lambda w, sid: spec.weight_for_kernel(w, n_of(sid))),
        )
        ng_p = k_p // g if group else 1
        s_loader = loading.wrap_loader(weight_loader, lambda s, sid: spec.scale_for_kernel(s, n_of(sid), params_dtype))
        if group:
            scale = GroupQuantScaleParameter(output_dim=0, input_dim=1, data=torch.empty(n_p, ng_p, dtype=params_dtype),
                                             weight_loader=s_loader)
        else:
            scale = ChannelQuantScaleParameter(output_dim=0, data=torch.empty(n_p, 1, dtype=params_dtype),
                                               weight_loader=s_loader)
        layer.register_parameter("weight_packed", weight)
        layer.register_parameter("weight_scale", scale)
        if not sym:
            z_loader = loading.wrap_loader(weight_loader, lambda z, sid: spec.zero_for_kernel(z, n_of(sid)))
            zdata = torch.zeros(n_p // pf, ng_p, dtype=torch.int32)
            if group:
                zp = PackedvLLMParameter(input_dim=1, output_dim=0, packed_dim=0, packed_factor=pf, data=zdata,
                                         weight_loader=z_loader)
            else:
                zp = PackedColumnParameter(output_dim=0, packed_dim=0, packed_factor=pf, data=zdata,
                                           weight_loader=z_loader)
            layer.register_parameter("weight_zero_point", zp)
        layer.register_parameter(
            "weight_shape", BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        )
        self._register_extras(layer)
        names = dict(w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                     w_zp_param_name="weight_zero_point", w_gidx_param_name="weight_g_idx")
        if kernel_type is not None:
            self.kernel = kernel_type(self.mp_config, **names)
        self.small_kernel = self.small_kernel_type(self.mp_config, **names) if self.small_kernel_type else None
        self.dual = None

    def _per_batch_kernels(self, kernel_type):
        """(kernel for every M / for large M, kernel for small M or None) from SUPERWEIGHT_W4_KERNEL."""
        from ..kernels import w4_dispatch

        mode = w4_dispatch.kernel_mode()
        if kernel_type is None or mode == "vllm":
            return kernel_type, None
        from vllm.model_executor.kernels.linear.mixed_precision.machete import MacheteLinearKernel
        from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel

        if kernel_type not in (MacheteLinearKernel, MarlinLinearKernel):
            return kernel_type, None  # CPU, ROCm, ...: vLLM's choice
        if mode in ("marlin", "machete"):
            forced = MarlinLinearKernel if mode == "marlin" else MacheteLinearKernel
            ok, why = forced.can_implement(self.mp_config)
            if not ok:
                raise FormatError(f"{self.prefix}: SUPERWEIGHT_W4_KERNEL={mode} cannot run this layer: {why}")
            return forced, None
        if kernel_type is MacheteLinearKernel and MarlinLinearKernel.can_implement(self.mp_config)[0]:
            return kernel_type, MarlinLinearKernel  # auto / dual
        return kernel_type, None

    def process_weights_after_loading(self, layer) -> None:
        self._check_super_weights(layer)
        device = layer.weight_packed.device
        self._finalize_sparse(layer, device)
        self._drop_placeholders(layer)
        del layer._parameters["weight_shape"]
        layer.sw_kernel = self.kernel_type.__name__ if self.kernel_type is not None else "torch-dequant"
        if self.small_kernel is not None:
            from ..kernels import w4_dispatch

            # Marlin's copy is made from the loaded weights before Machete repacks them in place.
            self.dual = w4_dispatch.DualW4(
                layer, self.kernel, self.small_kernel, ["weight_packed", "weight_scale", "weight_zero_point"],
                w4_dispatch.marlin_max_m(), key=self.prefix)
        if self.kernel_type is not None:
            self.kernel.process_weights_after_loading(layer)
        else:
            self._dequantize_for_torch(layer)
        if self.dual is not None:
            layer.sw_kernel = self.dual.describe()
        _log_kernel_once("W%d" % self.qcfg.bits, layer.sw_kernel, self.prefix)

    def _dequantize_for_torch(self, layer) -> None:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        kb = kernel_bits(self.qcfg.bits)
        n_p, k_p = layer.output_size_per_partition, layer.input_size_per_partition
        q = unpack_from_int32(layer.weight_packed.data, kb, torch.Size((n_p, k_p)), packed_dim=1).float()
        s = layer.weight_scale.data.float()
        ng = s.shape[1]
        q = q.view(n_p, ng, k_p // ng)
        if not self.qcfg.symmetric:
            z = unpack_from_int32(layer.weight_zero_point.data, kb, torch.Size((n_p, ng)), packed_dim=0).float()
            q = q - z[..., None]
        w = (q * s[..., None]).reshape(n_p, k_p).to(layer.params_dtype)
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            if name in layer._parameters:
                del layer._parameters[name]
        layer.register_parameter("weight", torch.nn.Parameter(w, requires_grad=False))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dual is not None:
            y = self.dual.apply(x, bias)
        elif self.kernel_type is not None:
            y = self.kernel.apply_weights(layer, x, bias)
        else:
            y = F.linear(x, layer.weight, bias)
        return self._apply_sparse(layer, y, x)


class SWW8A8Scheme(SWScheme):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, weight_loader):
        from vllm.model_executor.kernels.linear import init_int8_linear_kernel
        from vllm.model_executor.parameter import BasevLLMParameter, ChannelQuantScaleParameter, ModelWeightParameter

        qc = self.qcfg
        n_p, k_p = sum(output_partition_sizes), input_size_per_partition
        spec = LinearSpec(self.prefix, qc.bits, self.layout, True, input_size)
        self.spec = spec
        self.per_token = qc.activations == "int8-token"
        layer.params_dtype = params_dtype
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = k_p
        layer.output_size_per_partition = n_p

        def n_of(sid):
            return loading.shard_rows(layer, sid)

        w = ModelWeightParameter(
            input_dim=1, output_dim=0, data=torch.empty(n_p, k_p, dtype=torch.int8),
            weight_loader=loading.wrap_loader(weight_loader, lambda t, sid: spec.unpack_weight(t, n_of(sid))),
        )
        s = ChannelQuantScaleParameter(
            output_dim=0, data=torch.empty(n_p, 1, dtype=torch.float32),
            weight_loader=loading.wrap_loader(
                weight_loader, lambda t, sid: spec.scale_for_kernel(t, n_of(sid), torch.float32)),
        )
        layer.register_parameter("weight_packed", w)  # checkpoint name; unpacked int8 [N_p, K_p] here
        layer.register_parameter("weight_scale", s)
        layer.register_parameter("input_scale", None)
        layer.register_parameter("input_zero_point", None)
        if not hasattr(layer, "azp_adj"):
            layer.register_parameter("azp_adj", None)
        layer.register_parameter(
            "weight_shape", BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        )
        self._register_extras(layer)
        self.kernel = None
        if self.per_token:
            self.kernel = init_int8_linear_kernel(
                is_channelwise=True, is_static_input_scheme=False, input_symmetric=True, module_name=self.prefix
            )

    def process_weights_after_loading(self, layer) -> None:
        self._check_super_weights(layer)
        w8 = layer._parameters.pop("weight_packed")
        layer.register_parameter("weight", torch.nn.Parameter(w8.data, requires_grad=False))
        device = layer.weight.device
        self._finalize_sparse(layer, device)
        outl = loading.finalize_outliers(layer).to(device)
        self._drop_placeholders(layer)
        del layer._parameters["weight_shape"]
        layer.sw_n_outliers = int(outl.numel())
        if layer.sw_n_outliers:
            # 16-bit side product for the outlier channels: W[:, S] dequantized (per-row scales), stored [S, N].
            w_out = (layer.weight.data[:, outl].float() * layer.weight_scale.data.float()).to(layer.params_dtype)
            po = _kernels().prepare_outliers(outl, layer.input_size_per_partition, device)
            layer.register_buffer("sw_outlier_idx", po["idx"], persistent=False)
            layer.register_buffer("sw_outlier_mask", po["mask"], persistent=False)
            keep = torch.ones(layer.input_size_per_partition, dtype=layer.params_dtype, device=device)
            keep[outl] = 0
            layer.register_buffer("sw_outlier_keep", keep, persistent=False)
            layer.register_buffer("sw_outlier_w", w_out.t().contiguous(), persistent=False)  # [S, N]
        self.fused = False
        if self.kernel is not None:
            from vllm.platforms import current_platform

            self.kernel.process_weights_after_loading(layer)
            self.fused = current_platform.is_cuda() and type(self.kernel).__name__.startswith("Cutlass")
            layer.sw_kernel = type(self.kernel).__name__ + ("+fused-split" if self.fused else "")
        else:
            # per-tensor dynamic activations: torch int8 GEMM (torch._int_mm) on [K, N] weights.
            layer.weight = torch.nn.Parameter(layer.weight.data.t().contiguous(), requires_grad=False)
            layer.sw_kernel = "torch-int8-tensor"
        _log_kernel_once("W8A8", layer.sw_kernel, self.prefix)

    def _split(self, layer, x: torch.Tensor):
        if layer.sw_n_outliers:
            return _kernels().int8_quant_outlier_split(x, layer.sw_outlier_idx, self.per_token,
                                                       outlier_mask=layer.sw_outlier_mask)
        return _kernels().int8_quant_outlier_split(x, None, self.per_token)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        K = _kernels()
        x2 = x.reshape(-1, x.shape[-1])
        if self.kernel is not None and not self.fused:
            # vLLM's own int8 kernel (oneDNN on CPU) quantizes per token itself: hand it x without the outliers.
            xm = x2 * layer.sw_outlier_keep if layer.sw_n_outliers else x2
            y = self.kernel.apply_weights(layer, xm, bias)
            if layer.sw_n_outliers:
                y = K.add_outlier_side_product(y, x2.index_select(1, layer.sw_outlier_idx), layer.sw_outlier_w)
        else:
            xq, xs, xo = self._split(layer, x2)
            if self.fused:
                from vllm import _custom_ops as ops

                y = ops.cutlass_scaled_mm(xq, layer.weight, scale_a=xs, scale_b=layer.weight_scale,
                                          out_dtype=x.dtype, bias=bias)
            else:
                acc = torch._int_mm(xq, layer.weight)
                y = (acc.float() * xs * layer.weight_scale.view(1, -1)).to(x.dtype)
                if bias is not None:
                    y = y + bias
            if layer.sw_n_outliers:
                y = K.add_outlier_side_product(y, xo, layer.sw_outlier_w)
        y = self._apply_sparse(layer, y, x2)
        return y.reshape(*x.shape[:-1], y.shape[-1])
