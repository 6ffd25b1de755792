"""W4A16 GEMM kernel chosen per batch size: Marlin for small M, Machete for large M (CUDA, Hopper).

vLLM's mixed-precision kernel selection puts Machete first on Hopper. Our kernel micro-benchmark (one
Llama-2-7B layer, H100, `benchmarks/results/kernel_bench*.json`) measures Machete slower than Marlin at small M
(decode at low concurrency) and faster at large M (prefill, saturated decode). ``DualW4`` keeps the layer's
weights in both layouts (the cost: the W4 weights twice in GPU memory) and dispatches on the number of tokens
at run time, inside one opaque custom op (``torch.ops.superweight.w4_dual_mm``), so that:

* torch.compile traces no branch on the (symbolic) batch size -- Dynamo sees one node with a fake impl;
* each CUDA graph vLLM captures (one per batch size) records the kernel that suits its size.

Knobs (environment, read when the scheme is built):
  ``SUPERWEIGHT_W4_KERNEL``   auto (default: dual where vLLM picked Machete and Marlin can run the layer),
                              dual (same as auto), vllm (vLLM's single choice), marlin, machete
  ``SUPERWEIGHT_MARLIN_MAX_M`` largest M sent to Marlin in dual mode (default ``DEFAULT_MARLIN_MAX_M``)
"""

from __future__ import annotations

import os
import weakref

import torch

# Crossover measured by benchmarks/kernel_bench.py (section w4, M sweep) on an H100: see NOTES.md.
DEFAULT_MARLIN_MAX_M = 48
MODES = ("auto", "dual", "vllm", "marlin", "machete")

_REGISTRY: "weakref.WeakValueDictionary[str, DualW4]" = weakref.WeakValueDictionary()


def kernel_mode() -> str:
    mode = os.environ.get("SUPERWEIGHT_W4_KERNEL", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SUPERWEIGHT_W4_KERNEL={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def marlin_max_m() -> int:
    v = os.environ.get("SUPERWEIGHT_MARLIN_MAX_M", "")
    try:
        return int(v) if v.strip() else DEFAULT_MARLIN_MAX_M
    except ValueError:
        raise ValueError(f"SUPERWEIGHT_MARLIN_MAX_M={v!r} is not an integer") from None


def _noop_loader(*args, **kwargs):  # the shadow's parameters are never loaded from a checkpoint
    return None


def clone_vllm_param(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A new parameter of the same vLLM parameter class and layout attributes, over a copy of the data."""
    kw = {}
    for a in ("input_dim", "output_dim", "packed_dim", "packed_factor", "marlin_tile_size"):
        if "_" + a in p.__dict__:
            kw[a] = p.__dict__["_" + a]
    try:
        return type(p)(data=p.data.clone(), weight_loader=_noop_loader, **kw)
    except TypeError:  # a plain torch Parameter
        return torch.nn.Parameter(p.data.clone(), requires_grad=False)


class DualW4:
    """Two vLLM MP kernels over the same W4 weights: ``small`` (Marlin) for M <= ``max_m``, ``large`` otherwise."""

    def __init__(self, layer: torch.nn.Module, large, small, param_names: list[str], max_m: int, key: str):
        self.large, self.small, self.max_m, self.key = large, small, int(max_m), key
        self.n = int(layer.output_size_per_partition)
        # The shadow holds the second copy of the weights; it is deliberately not a registered submodule (vLLM
        # would otherwise see its parameters in named_parameters()); it is owned by this object.
        self.shadow = torch.nn.Module()
        for name in param_names:
            p = getattr(layer, name, None)
            if p is not None:
                self.shadow.register_parameter(name, clone_vllm_param(p))
        # Marlin permutes the bias into its own layout: the shadow gets its own copy
        self.has_bias = getattr(layer, "bias", None) is not None
        if self.has_bias:
            self.shadow.register_parameter("bias", torch.nn.Parameter(layer.bias.data.clone(), requires_grad=False))
        self.small.process_weights_after_loading(self.shadow)
        self._layer = weakref.ref(layer)
        self.use_op = _op_available()
        # The key is baked into compiled graphs (vLLM caches them on disk), so it must be stable across runs: the
        # plugin uses the layer's module name, like vLLM's attention layers. A later engine in the same process
        # re-registers the same names (the newest layers win).
        _REGISTRY[key] = self

    @property
    def layer(self) -> torch.nn.Module:
        lay = self._layer()
        if lay is None:
            raise RuntimeError(f"{self.key}: the layer was freed")
        return lay

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Eager dispatch on the token count (the body of the custom op)."""
        if x.shape[0] <= self.max_m:
            # the layer's bias (Machete's layout) -> the shadow's Marlin-permuted copy
            return self.small.apply_weights(self.shadow, x, self.shadow.bias if bias is not None and self.has_bias
                                            else bias)
        return self.large.apply_weights(self.layer, x, bias)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.is_cuda and self.use_op:
            y = torch.ops.superweight.w4_dual_mm(x2, bias, self.n, self.key)
        else:
            y = self.run(x2, bias)
        return y.reshape(*x.shape[:-1], self.n)

    def describe(self) -> str:
        return f"{type(self.large).__name__}+{type(self.small).__name__}(M<={self.max_m})"


def lookup(key: str) -> DualW4:
    d = _REGISTRY.get(key)
    if d is None:
        raise RuntimeError(f"superweight.w4_dual_mm: no layer registered under {key!r}")
    return d


def _op_available() -> bool:
    try:
        torch.ops.superweight.w4_dual_mm.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


# custom-op body (registered, with its fake, by ops.register())
def dual_mm_impl(x: torch.Tensor, bias: torch.Tensor | None, n: int, key: str) -> torch.Tensor:
    return lookup(key).run(x, bias)
