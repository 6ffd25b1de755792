"""W8A8 int8 kernels with 16-bit activation-outlier channels, in priority order (see ``kernels.linear``):

    y = W · Q(x with the outlier channels S set to 0) + W[:, S] · x[:, S]

* ``CutlassSplitInt8Kernel`` (CUDA): our fused Triton quantize-with-outlier-split (one pass over x) + vLLM's
  CUTLASS ``cutlass_scaled_mm``; per token or per tensor. With ``SUPERWEIGHT_W8A8_AZP=1`` (per token) the first
  outlier channel rides CUTLASS's per-token zero-point epilogue (``cutlass_scaled_mm_azp``): the split also
  writes it as an int32 on the token's step (``azp``), the epilogue subtracts ``azp[m] * W_int8[n, c0]`` from
  the int32 accumulator, so one channel needs no side product (``kernels.sparse_layout.int8_split_azp_torch``).
  Batches of up to ``SUPERWEIGHT_W8A8_TRITON`` tokens (32 on Hopper by default; its own bound for layers with
  outlier channels, which above it pay the zero-point epilogue) run our Triton int8 GEMM instead
  (``kernels.triton_int8_mm``: every outlier channel in its epilogue, no zero point, no side product) behind one
  opaque op (``torch.ops.superweight.w8a8_mm``) that picks the kernel from the token count at run time.
  With ``SUPERWEIGHT_W8A8_GRAPH_SPLIT=1`` (per token, under torch.compile) the split is traced into the graph
  as torch ops (``sparse_layout.int8_split_fusable``), so Inductor fuses it into the kernel that produces x
  (the RMSNorm, SiLU * up) instead of running it as its own pass; the opaque op then takes the int8 operands
  (``torch.ops.superweight.w8a8_mm_q``). (Sessions 47-50 also tried, opt-in, calling vLLM's CUTLASS ops directly
  from the op's body and a ``torch.cond`` on the token count in the graph: neither measured faster end to end on
  the H100, both removed; see ``benchmarks/ISSUE12_LOG.md``.)
* ``VllmInt8Kernel`` (per token): vLLM's own int8 kernel for this platform (oneDNN on x86 CPUs), which quantizes
  the activations itself: it is handed x with the outlier channels zeroed. Used only if its ops exist.
* ``TorchInt8Kernel``: every platform and dtype: our split + ``torch._int_mm`` (CPU) or an exact-enough float
  GEMM of the int8 operands (elsewhere).

The scheme registers ``weight_packed`` as int8 ``[N, K]`` (unpacked at load) and ``weight_scale`` float32
``[N, 1]``; ``set_outliers`` gives the kernel this rank's outlier input channels before the weights are processed.
"""

from __future__ import annotations

import weakref

import torch

from .base import (
    SIXTEEN_BIT,
    W_PACKED,
    W_SCALE,
    SWLinearConfig,
    SWLinearKernel,
    missing_ops,
    platform,
    replace_parameter,
    tensor,
)


class _Int8Base(SWLinearKernel):
    def __init__(self, config: SWLinearConfig) -> None:
        super().__init__(config)
        self.per_token = config.activations == "int8-token"
        self.n_outliers = 0

    @classmethod
    def _int8_config(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if c.activations not in ("int8-token", "int8-tensor"):
            return False, "weight-only layer"
        return True, None

    def set_outliers(self, layer: torch.nn.Module, idx: torch.Tensor) -> None:
        """Register this rank's outlier channels: the 16-bit side product ``W[:, S]`` (dequantized with the
        per-row scales, stored [S, N]) and the masks the activation split uses."""
        from .. import prepare_outliers

        self.n_outliers = int(idx.numel())
        if not self.n_outliers:
            return
        w8 = getattr(layer, W_PACKED).data  # int8 [N, K]
        device = w8.device
        idx = idx.to(device)
        w_out = (w8[:, idx].float() * getattr(layer, W_SCALE).data.float()).to(self.config.act_dtype)
        po = prepare_outliers(idx, self.config.partition_shape[0], device)
        layer.register_buffer("sw_outlier_idx", po["idx"], persistent=False)
        layer.register_buffer("sw_outlier_mask", po["mask"], persistent=False)
        keep = torch.ones(self.config.partition_shape[0], dtype=self.config.act_dtype, device=device)
        keep[idx] = 0
        layer.register_buffer("sw_outlier_keep", keep, persistent=False)
        layer.register_buffer("sw_outlier_w", w_out.t().contiguous(), persistent=False)  # [S, N]

    def _split(self, layer: torch.nn.Module, x: torch.Tensor):
        from .. import int8_quant_outlier_split

        if self.n_outliers:
            return int8_quant_outlier_split(
                x, tensor(layer, "sw_outlier_idx"), self.per_token, outlier_mask=tensor(layer, "sw_outlier_mask")
            )
        return int8_quant_outlier_split(x, None, self.per_token)

    def _add_outliers(self, layer: torch.nn.Module, y: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        if not self.n_outliers:
            return y
        from .. import add_outlier_side_product

        return add_outlier_side_product(y, x_out, tensor(layer, "sw_outlier_w"))


class CutlassSplitInt8Kernel(_Int8Base):
    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        ok, why = cls._int8_config(c)
        if not ok:
            return ok, why
        if c.device_type != "cuda":
            return False, "CUDA only"
        if c.act_dtype not in SIXTEEN_BIT:
            return False, f"cutlass_scaled_mm writes 16-bit outputs only, not {c.act_dtype}"
        k_p, n_p = c.partition_shape
        if k_p % 16 or n_p % 16:
            return False, f"CUTLASS int8 needs K and N multiples of 16 (got {k_p}, {n_p})"
        from .. import ops as _ops

        if not _ops.TRITON_OK:
            return False, "Triton is not available (the activation split)"
        missing = missing_ops("cutlass_scaled_mm")
        if missing:
            return False, f"this vLLM build has no {missing[0]}"
        return True, None

    def __init__(self, config: SWLinearConfig) -> None:
        super().__init__(config)
        from ... import envs
        from ..sparse_layout import AZP_K_MAX

        self.azp = (
            envs.w8a8_azp()
            and self.per_token
            and config.partition_shape[0] <= AZP_K_MAX
            and not missing_ops("cutlass_scaled_mm_azp")
        )
        cap = platform().get_device_capability() if config.device_type == "cuda" else None
        hopper = cap is not None and cap.major == 9
        self.tri_max_m, self.tri_table, self.tri_max_m_out = envs.w8a8_triton(hopper=hopper)
        self.graph_split = self.per_token and envs.w8a8_graph_split()
        self.key = config.prefix  # stable across runs: it is baked into compiled graphs (see weight_only)
        self.n = config.partition_shape[1]
        self._layer: weakref.ref | None = None

    @property
    def tri_bound(self) -> int:
        """The largest batch this layer runs on the Triton GEMM: layers with outlier channels have their own bound
        (``SUPERWEIGHT_W8A8_TRITON``'s OUT_MAX_M), the others MAX_M."""
        return self.tri_max_m_out if self.n_outliers else self.tri_max_m

    def describe(self) -> str:
        gemm = "cutlass_scaled_mm_azp: first outlier channel in the epilogue" if self.azp else "cutlass_scaled_mm"
        tri = f"; M<={self.tri_bound}: triton int8 GEMM, outliers in its epilogue" if self.tri_bound else ""
        split = "split fused into x's producer when compiled" if self.graph_split else "triton split"
        return f"CutlassSplitInt8Kernel({split} + {gemm}{tri})"

    def set_outliers(self, layer: torch.nn.Module, idx: torch.Tensor) -> None:
        super().set_outliers(layer, idx)
        if not (self.azp and self.n_outliers):
            return
        # the first (sorted) outlier channel goes to the epilogue: azp_adj = its int8 weight column, [1, N] int32;
        # the side product keeps the others
        c0 = tensor(layer, "sw_outlier_idx")[:1].long()
        w8 = getattr(layer, W_PACKED).data
        layer.register_buffer("sw_outlier_azp_adj", w8.index_select(1, c0).t().to(torch.int32).contiguous(), False)
        # sw_outlier_w keeps every channel ([S, N]): the zero-point path reads rows 1.. (a contiguous view), the
        # Triton GEMM all of them

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w8 = getattr(layer, W_PACKED).data
        replace_parameter(layer, W_PACKED, None)
        replace_parameter(layer, "weight", w8.t())  # [K, N] column-major view: what CUTLASS takes
        if self.tri_bound:
            self._layer = weakref.ref(layer)
            _REGISTRY[self.key] = self

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.graph_split and x.is_cuda and torch.compiler.is_compiling():
            xq, xs, xo, azp = self.split_fusable(layer, x)
            if not self.tri_bound:
                return self._cutlass_q(layer, xq, xs, xo, azp, bias, x.dtype)
            return torch.ops.superweight.w8a8_mm_q(xq, xs, xo, azp, bias, self.n, x.dtype, self.key)
        if self.tri_bound and x.is_cuda:
            return torch.ops.superweight.w8a8_mm(x, bias, self.n, self.key)
        return self._cutlass(layer, x, bias)

    def split_fusable(self, layer: torch.nn.Module, x: torch.Tensor):
        """(xq, scales, x_out or None, azp or None) as torch ops (``sparse_layout.int8_split_fusable``): what the
        compiled graph computes in x's producer. With the zero point on, the token's absmax is raised as
        ``int8_split_azp_torch`` raises it at every batch size (the Triton GEMM then reads the same operands;
        only tokens whose outlier exceeds 2^22 steps of the rest are affected)."""
        from ..sparse_layout import int8_split_fusable

        if not self.n_outliers:
            return int8_split_fusable(x, None, None)
        idx, keep = tensor(layer, "sw_outlier_idx"), tensor(layer, "sw_outlier_keep")
        return int8_split_fusable(x, idx, keep, azp=self.azp)

    def _live(self) -> torch.nn.Module:
        layer = self._layer() if self._layer is not None else None
        if layer is None:
            raise RuntimeError(f"{self.key}: the layer was freed")
        return layer

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Eager dispatch on the token count (the body of ``torch.ops.superweight.w8a8_mm``)."""
        layer = self._live()
        if x.shape[0] > self.tri_bound:
            return self._cutlass(layer, x, bias)
        xq, xs, xo = self._split(layer, x)
        return self._triton(layer, xq, xs, xo, bias, x.dtype)

    def run_q(
        self,
        xq: torch.Tensor,
        xs: torch.Tensor,
        xo: torch.Tensor | None,
        azp: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """The same dispatch on operands already split (the body of ``torch.ops.superweight.w8a8_mm_q``)."""
        layer = self._live()
        if xo is not None and xo.stride(-1) != 1:
            xo = xo.contiguous()
        if xq.shape[0] > self.tri_bound:
            return self._cutlass_q(layer, xq.contiguous(), xs, xo, azp, bias, out_dtype)
        return self._triton(layer, xq.contiguous(), xs, xo, bias, out_dtype)

    def _triton(
        self,
        layer: torch.nn.Module,
        xq: torch.Tensor,
        xs: torch.Tensor,
        xo: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        from .. import ops as _ops

        w_out = tensor(layer, "sw_outlier_w") if self.n_outliers else None
        w_nk = tensor(layer, "weight").t()  # the checkpoint's [N, K] row-major int8
        cfg = _ops.triton_int8_mm.config_for(xq.shape[0], self.n, w_nk.shape[1], self.tri_table)
        return _ops.triton_int8_mm.int8_mm_outliers(
            xq, w_nk, xs, tensor(layer, "weight_scale"), xo if w_out is not None else None, w_out, bias, out_dtype, cfg
        )

    def _cutlass(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Split x as CUTLASS's path reads it (with the zero point where it is on), then ``_cutlass_q``."""
        if self.azp and self.n_outliers:
            from .. import int8_quant_outlier_split_azp

            xq, xs, xo, azp = int8_quant_outlier_split_azp(
                x, tensor(layer, "sw_outlier_idx"), tensor(layer, "sw_outlier_mask")
            )
            return self._cutlass_q(layer, xq, xs, xo, azp, bias, x.dtype)
        xq, xs, xo = self._split(layer, x)
        return self._cutlass_q(layer, xq, xs, xo, None, bias, x.dtype)

    def _cutlass_q(
        self,
        layer: torch.nn.Module,
        xq: torch.Tensor,
        xs: torch.Tensor,
        xo: torch.Tensor | None,
        azp: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        from vllm import _custom_ops as ops

        if self.azp and self.n_outliers:
            from .. import add_outlier_side_product

            if azp is None or xo is None:
                raise RuntimeError(f"{self.key}: the zero-point path needs azp and x_out from the split")
            y = ops.cutlass_scaled_mm_azp(
                xq,
                tensor(layer, "weight"),
                scale_a=xs,
                scale_b=tensor(layer, "weight_scale"),
                out_dtype=out_dtype,
                azp_adj=tensor(layer, "sw_outlier_azp_adj"),
                azp=azp,
                bias=bias,
            )
            return add_outlier_side_product(y, xo[:, 1:], tensor(layer, "sw_outlier_w")[1:])
        w, ws = tensor(layer, "weight"), tensor(layer, "weight_scale")
        y = ops.cutlass_scaled_mm(xq, w, scale_a=xs, scale_b=ws, out_dtype=out_dtype, bias=bias)
        return self._add_outliers(layer, y, xo) if xo is not None else y


_REGISTRY: weakref.WeakValueDictionary[str, CutlassSplitInt8Kernel] = weakref.WeakValueDictionary()


def registered(op: str, key: str) -> CutlassSplitInt8Kernel:
    """The layer registered under ``key``: the bodies of ``torch.ops.superweight.w8a8_mm`` / ``w8a8_mm_q``
    (registered with their fakes by ``kernels.ops``) call its ``run`` / ``run_q``."""
    kern = _REGISTRY.get(key)
    if kern is None:
        raise RuntimeError(f"superweight.{op}: no layer registered under {key!r}")
    return kern


class VllmInt8Kernel(_Int8Base):
    """vLLM's int8 ScaledMM kernel for this platform (per-token dynamic activations, symmetric)."""

    @classmethod
    def _ops_for_platform(cls) -> tuple[str, ...]:
        if platform().is_cpu():
            return ("create_onednn_scaled_mm_handler", "onednn_scaled_mm", "dynamic_scaled_int8_quant")
        return ()

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        ok, why = cls._int8_config(c)
        if not ok:
            return ok, why
        if c.activations != "int8-token":
            return False, "vLLM's int8 kernels quantize per token only here"
        if c.device_type != "cpu" and c.act_dtype not in SIXTEEN_BIT:
            return False, f"vLLM's GPU int8 kernels write 16-bit outputs only, not {c.act_dtype}"
        missing = missing_ops(*cls._ops_for_platform())
        if missing:
            return False, f"this vLLM build has no {', '.join(missing)}"
        return True, None

    def __init__(self, config: SWLinearConfig) -> None:
        super().__init__(config)
        from vllm.model_executor.kernels.linear import init_int8_linear_kernel

        self.impl = init_int8_linear_kernel(
            is_channelwise=True, is_static_input_scheme=False, input_symmetric=True, module_name=config.prefix
        )
        self.wraps = type(self.impl).__name__

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w8 = getattr(layer, W_PACKED).data
        replace_parameter(layer, W_PACKED, None)
        replace_parameter(layer, "weight", w8)
        for name in ("input_scale", "input_zero_point", "azp_adj"):
            if not hasattr(layer, name):
                layer.register_parameter(name, None)
        self.impl.process_weights_after_loading(layer)

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xm = x * tensor(layer, "sw_outlier_keep") if self.n_outliers else x
        y = self.impl.apply_weights(layer, xm, bias)
        if self.n_outliers:
            from .. import add_outlier_side_product

            y = add_outlier_side_product(
                y, x.index_select(1, tensor(layer, "sw_outlier_idx")), tensor(layer, "sw_outlier_w")
            )
        return y


class TorchInt8Kernel(_Int8Base):
    """Any platform and dtype: our activation split, then ``torch._int_mm`` on CPU, elsewhere a float GEMM of the
    int8 operands (products and sums of int8 are exact in fp32 up to K*127^2 < 2^24, i.e. K <= 1040; beyond
    that the fp32 rounding is ~1e-7 relative)."""

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        return cls._int8_config(c)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w8 = getattr(layer, W_PACKED).data
        replace_parameter(layer, W_PACKED, None)
        replace_parameter(layer, "weight", w8.t().contiguous())  # [K, N]

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xq, xs, xo = self._split(layer, x)
        if xq.is_cuda:
            acc = xq.float() @ tensor(layer, "weight").float()
        else:
            acc = torch._int_mm(xq, tensor(layer, "weight")).float()
        y = (acc * xs * tensor(layer, "weight_scale").view(1, -1)).to(x.dtype)
        if bias is not None:
            y = y + bias
        return self._add_outliers(layer, y, xo)
