"""Kernel selection for superweight_rtn Linears: one priority list per scheme, each kernel's ``can_implement``
asked in order (what this machine really has: platform, ops of the loaded vLLM build, dtypes, shapes), like
vLLM's ``kernels/linear/mixed_precision/__init__.py``. The last kernel of each list runs everywhere.
"""

from __future__ import annotations

from ... import envs
from .base import SWLinearConfig, SWLinearKernel, has_op, missing_ops
from .w8a8 import CutlassSplitInt8Kernel, TorchInt8Kernel, VllmInt8Kernel
from .weight_only import (
    AtenInt4CPUKernel,
    CPUWNA16Kernel,
    DualMarlinHummingKernel,
    DualMarlinMacheteKernel,
    FusedTritonW4Kernel,
    HummingGemvKernel,
    HummingKernel,
    MacheteKernel,
    MarlinDequantKernel,
    MarlinDequantOneCopyKernel,
    MarlinKernel,
    TorchDequantKernel,
    VllmMPKernel,
)

__all__ = [
    "SWLinearConfig",
    "SWLinearKernel",
    "WEIGHT_ONLY_KERNELS",
    "W8A8_KERNELS",
    "choose_kernel",
    "has_op",
    "missing_ops",
]

# in priority order (fastest first); the last one of each list can implement every layer. HummingGemvKernel takes
# `auto` only where it was measured (Hopper, humming-kernels installed, unsplit layers: auto_can_implement)
WEIGHT_ONLY_KERNELS: list[type[SWLinearKernel]] = [
    HummingGemvKernel,
    MarlinDequantOneCopyKernel,
    MarlinDequantKernel,
    DualMarlinMacheteKernel,
    MacheteKernel,
    MarlinKernel,
    AtenInt4CPUKernel,
    CPUWNA16Kernel,
    VllmMPKernel,
    TorchDequantKernel,
]
W8A8_KERNELS: list[type[SWLinearKernel]] = [CutlassSplitInt8Kernel, VllmInt8Kernel, TorchInt8Kernel]

# SUPERWEIGHT_W4_KERNEL=<mode> forcing one weight-only kernel
FORCED = {
    "marlin": MarlinKernel,
    "machete": MacheteKernel,
    "torch": TorchDequantKernel,
    "cpu-int4": AtenInt4CPUKernel,
    "fused": FusedTritonW4Kernel,
    "marlin-deq": MarlinDequantKernel,
    "marlin-deq1": MarlinDequantOneCopyKernel,
    "dual": DualMarlinMacheteKernel,
    "humming": HummingKernel,
    "marlin-humming": DualMarlinHummingKernel,
    "humming-gemv": HummingGemvKernel,
}


class NoKernelError(ValueError):
    """No kernel of the priority list can run the layer (only when one was forced)."""


def _names(k: type[SWLinearKernel]) -> set[str]:
    names = {k.__name__}
    vcls = getattr(k, "vllm_class", None)
    if vcls is not None:
        try:
            names.add(vcls().__name__)
        except (ImportError, NotImplementedError):
            pass
    return names


def choose_kernel(c: SWLinearConfig) -> type[SWLinearKernel]:
    """The first kernel of the layer's priority list that can run it on this machine."""
    candidates = WEIGHT_ONLY_KERNELS if c.weight_only else W8A8_KERNELS
    if c.weight_only:
        forced = FORCED.get(envs.w4_kernel())
        if forced is not None:
            ok, why = forced.can_implement(c)
            if not ok:
                raise NoKernelError(f"{envs.W4_KERNEL}={envs.w4_kernel()} cannot run {c.prefix}: {why}")
            return forced
    disabled = envs.disabled_kernels()
    reasons = []
    for k in candidates:
        if disabled & _names(k):
            reasons.append(f"{k.__name__}: disabled by VLLM_DISABLED_KERNELS")
            continue
        ok, why = k.can_implement(c)
        if ok:
            return k
        reasons.append(f"{k.__name__}: {why}")
    raise NoKernelError(f"no kernel can run {c.prefix}: " + "; ".join(reasons))


def explain(c: SWLinearConfig) -> list[tuple[str, bool, str | None]]:
    """(kernel, can implement, why not) for every candidate of the layer (diagnostics and tests)."""
    candidates = WEIGHT_ONLY_KERNELS if c.weight_only else W8A8_KERNELS
    return [(k.__name__, *k.can_implement(c)) for k in candidates]
