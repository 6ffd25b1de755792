"""The kernel interface of superweight_rtn Linears (the shape of vLLM's ``MPLinearKernel`` / ``ScaledMMLinearKernel``).

A kernel class says whether THIS machine can run a layer (``can_implement``: the platform, the ops the vLLM build
really has, dtypes, shapes), transforms the loaded parameters into its layout (``process_weights_after_loading``)
and computes ``y = x W^T + b`` plus the exact sparse correction of the held-out weights (``apply_weights``).
The scheme registers the parameters under the names below and only delegates; the choice among kernels is made
from one priority list (``kernels.linear.choose_kernel``).

This package is a leaf: it imports torch, and vLLM lazily inside methods; never the converter or the plugin.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import Any, cast

import torch

# Parameter names the schemes register (the checkpoint's tensor names, FORMAT.md).
W_PACKED = "weight_packed"
W_SCALE = "weight_scale"
W_ZERO = "weight_zero_point"
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class SWLinearConfig:
    """What a kernel needs to know about one Linear layer (on this tensor-parallel rank)."""

    prefix: str
    bits: int  # checkpoint bits: 3, 4 or 8
    symmetric: bool
    group_size: int  # -1: one scale per output row (channel; rows:R and tensor are expanded to this at load)
    activations: str  # "none" (weight-only) | "int8-token" | "int8-tensor"
    act_dtype: torch.dtype
    full_shape: tuple[int, int]  # (K, N) of the whole layer
    partition_shape: tuple[int, int]  # (K_p, N_p) of this rank
    device_type: str = "cpu"  # where the weights live ("cuda", "cpu", ...)
    holdout: float = 0.0  # fraction of weights held out exactly (besides super weights); 0 when the correction is off

    @property
    def kernel_bits(self) -> int:
        """Bits of the kernels' storage type: 3-bit codes ride in 4-bit slots."""
        return 4 if self.bits <= 4 else 8

    @property
    def weight_only(self) -> bool:
        return self.activations == "none"

    def scalar_type(self):
        from vllm.scalar_type import scalar_types

        return {
            (4, True): scalar_types.uint4b8,
            (4, False): scalar_types.uint4,
            (8, True): scalar_types.uint8b128,
            (8, False): scalar_types.uint8,
        }[(self.kernel_bits, self.symmetric)]

    def mp_config(self):
        """vLLM's ``MPLinearLayerConfig`` for this layer (weight-only kernels)."""
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig

        return MPLinearLayerConfig(
            full_weight_shape=self.full_shape,
            partition_weight_shape=self.partition_shape,
            weight_type=self.scalar_type(),
            act_type=self.act_dtype,
            group_size=self.group_size,
            zero_points=not self.symmetric,
            has_g_idx=False,
        )


# ----------------------------------------------------------------------------------------------------------
# what the machine really has
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _import_platform_ops() -> None:
    """Load vLLM's compiled ops for this machine (``vllm._C``, or ``_C_AVX2`` / ``_C_AVX512`` on x86 CPUs)."""
    try:
        from vllm.platforms import current_platform

        current_platform.import_kernels()
    except Exception:  # no vLLM (converter-only installs): no ops
        pass


def has_op(name: str, namespace: str = "_C") -> bool:
    """True if ``torch.ops.<namespace>.<name>`` exists in this process (vLLM's builds differ by ISA: the AVX2
    CPU library lacks ``cpu_gemm_wna16``, which the AVX-512 one has)."""
    _import_platform_ops()
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def missing_ops(*names: str) -> list[str]:
    return [n for n in names if not has_op(n)]


def platform() -> Any:
    from vllm.platforms import current_platform

    return current_platform


# ----------------------------------------------------------------------------------------------------------
# the kernel interface
# ----------------------------------------------------------------------------------------------------------
class SWLinearKernel(ABC):
    """One way to run a superweight_rtn Linear: the GEMM over the scheme's parameters + the exact sparse
    correction ``y[:, r] += w[r, c] * x[:, c]`` of the held-out weights (super weights and ``holdout``).

    By default the correction is the separate sparse kernel of ``vllm_superweight.kernels`` after the GEMM; a
    kernel that fuses it into its GEMM overrides ``set_sparse`` / ``apply_weights``.
    """

    #: vLLM kernel class this one delegates to (for ``VLLM_DISABLED_KERNELS`` and logs), if any
    wraps: str | None = None

    def __init__(self, config: SWLinearConfig) -> None:
        self.config = config
        self.sparse_keys: list[str] = []

    @classmethod
    @abstractmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        """(True, None) if this machine can run layer ``c`` with this kernel, else (False, why)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Turn the loaded checkpoint-layout parameters into this kernel's layout (in place on ``layer``)."""

    @abstractmethod
    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K] @ W^T (+ bias)`` -> ``[M, N]`` (the held-out positions of W are 0 here)."""

    def describe(self) -> str:
        return type(self).__name__ + (f"({self.wraps})" if self.wraps else "")

    def set_act_outliers(self, layer: torch.nn.Module, channels: torch.Tensor) -> None:
        """The layer's activation-outlier input channels (this rank's, local coordinates), before processing. Only
        kernels that quantize the activations of a weight-only layer themselves use them; the rest ignore them."""
        return None

    # ---- sparse correction ---------------------------------------------------------------------------------
    def set_sparse(self, layer: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Attach this rank's held-out entries (local coordinates, unique) to ``layer``; empty = no correction."""
        self.sparse_keys = []
        if rows.numel() == 0:
            return
        from .. import prepare_sparse

        c = self.config
        device = _param_device(layer)
        sp = prepare_sparse(rows, cols, vals, c.partition_shape[1], c.partition_shape[0], device)
        for k, v in sp.items():
            layer.register_buffer(f"sw_sp_{k}", v, persistent=False)
        self.sparse_keys = list(sp)

    def apply_sparse(self, layer: torch.nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse_keys:
            return y
        from .. import sparse_correction

        return sparse_correction(y, x, {k: getattr(layer, f"sw_sp_{k}") for k in self.sparse_keys})

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self.apply_gemm(layer, x2, bias)
        y = self.apply_sparse(layer, y, x2)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _param_device(layer: torch.nn.Module) -> torch.device:
    for p in layer.parameters(recurse=False):
        return p.device
    for b in layer.buffers(recurse=False):
        return b.device
    return torch.device("cpu")


def tensor(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """``layer.<name>`` as a tensor (a registered parameter or buffer; typed for mypy, no runtime check)."""
    return cast(torch.Tensor, getattr(layer, name))


def replace_parameter(layer: torch.nn.Module, name: str, data: torch.Tensor | None) -> None:
    """Swap ``layer.<name>`` for a plain frozen parameter over ``data`` (or drop it when ``data`` is None)."""
    if name in layer._parameters:
        del layer._parameters[name]
    elif hasattr(layer, name):
        delattr(layer, name)
    if data is not None:
        layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
