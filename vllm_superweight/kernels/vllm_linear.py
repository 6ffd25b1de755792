"""Stand-alone vLLM linear kernels for tests and micro-benchmarks (outside an engine).

Builds one layer's parameters exactly as the plugin registers them (vLLM parameter classes, compressed-tensors
packing along K) and runs vLLM's own kernel classes on them: ``MacheteLinearKernel`` / ``MarlinLinearKernel``
(CUDA) or ``CPUWNA16LinearKernel`` (CPU build) for W4A16, ``cutlass_scaled_mm`` + ``scaled_int8_quant`` for
W8A8. Also the float reference (dequantized weights). Needs vLLM; not used on the serving path.
"""

from __future__ import annotations

import torch


def _patch_tp_single_process() -> None:
    """vLLM parameters read the TP rank at construction; outside an engine pretend to be rank 0 of 1."""
    import vllm.model_executor.parameter as P

    P.get_tensor_model_parallel_rank = lambda: 0
    P.get_tensor_model_parallel_world_size = lambda: 1


def pack_int32(v: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) along ``dim``: element ``p*j + i`` at bits ``[bits*i, bits*(i+1))``."""
    pf = 32 // bits
    v = v.to(torch.int64).movedim(dim, -1)
    assert v.shape[-1] % pf == 0
    v = v.reshape(*v.shape[:-1], v.shape[-1] // pf, pf)
    shifts = torch.arange(pf, device=v.device, dtype=torch.int64) * bits
    p = (v << shifts).sum(-1)
    p = torch.where(p >= 2**31, p - 2**32, p).to(torch.int32)
    return p.movedim(-1, dim).contiguous()


def random_w4(n: int, k: int, group: int, symmetric: bool, device, dtype=torch.bfloat16, seed: int = 0,
              holdout: tuple | None = None) -> dict:
    """Random 4-bit codes + scales (+ zero points), generated on ``device``. ``group`` = -1 for channel-wise.

    ``holdout`` = (rows, cols): those positions get the code that dequantizes to exactly 0 (the format's rule);
    the exact values come back through the sparse correction.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    ng = 1 if group == -1 else k // group
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32, device=device)
    scales = (torch.rand(n, ng, generator=g, device=device) * 0.01 + 0.002).to(dtype)
    zeros = None if symmetric else torch.randint(0, 16, (n, ng), generator=g, dtype=torch.int32, device=device)
    if holdout is not None:
        r, c = (t.to(device).long() for t in holdout)
        gi = c // (k if group == -1 else group)
        q[r, c] = 8 if symmetric else zeros[r, gi]
    return {"q": q, "scales": scales, "zeros": zeros, "group": group, "symmetric": symmetric, "n": n, "k": k}


def dequant_w4(w: dict) -> torch.Tensor:
    """float32 [N, K] dequantized weight ((q - z) * s; z = 8 when symmetric)."""
    n, k, group = w["n"], w["k"], w["group"]
    gs = k if group == -1 else group
    q = w["q"].float().reshape(n, k // gs, gs)
    z = 8.0 if w["symmetric"] else w["zeros"].float()[..., None]
    return ((q - z) * w["scales"].float()[..., None]).reshape(n, k)


def build_mp_layer(w: dict, kernel: str, act_dtype=torch.bfloat16, max_m: int | None = None,
                   bias: torch.Tensor | None = None):
    """(layer, kernel_obj) with vLLM's MP kernel class ``kernel`` in {"machete", "marlin", "cpu", "auto"}, or
    "dual" (Machete + Marlin dispatched per M by ``w4_dispatch.DualW4``, Marlin for M <= ``max_m``)."""
    _patch_tp_single_process()
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.model_executor.parameter import (
        ChannelQuantScaleParameter,
        GroupQuantScaleParameter,
        PackedColumnParameter,
        PackedvLLMParameter,
    )
    from vllm.scalar_type import scalar_types

    n, k, group, sym = w["n"], w["k"], w["group"], w["symmetric"]
    dev = w["q"].device
    cfg = MPLinearLayerConfig(full_weight_shape=(k, n), partition_weight_shape=(k, n),
                              weight_type=scalar_types.uint4b8 if sym else scalar_types.uint4, act_type=act_dtype,
                              group_size=group, zero_points=not sym, has_g_idx=False)
    if kernel in ("machete", "dual"):
        from vllm.model_executor.kernels.linear.mixed_precision.machete import MacheteLinearKernel as KC
    elif kernel == "marlin":
        from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel as KC
    elif kernel == "cpu":
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel as KC
    else:
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

        KC = choose_mp_linear_kernel(cfg)
    ok, why = KC.can_implement(cfg)
    if not ok:
        raise RuntimeError(f"{KC.__name__} cannot implement {cfg}: {why}")

    def noop(*a, **kw):
        return None

    layer = torch.nn.Module()
    layer.register_parameter("weight_packed", PackedvLLMParameter(
        data=pack_int32(w["q"], 4, 1), input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=noop))
    s = w["scales"].to(act_dtype)
    if group == -1:
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(data=s, output_dim=0, weight_loader=noop))
    else:
        layer.register_parameter("weight_scale", GroupQuantScaleParameter(data=s, output_dim=0, input_dim=1,
                                                                          weight_loader=noop))
    if not sym:
        zp = pack_int32(w["zeros"], 4, 0)
        if group == -1:
            p = PackedColumnParameter(data=zp, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=noop)
        else:
            p = PackedvLLMParameter(data=zp, input_dim=1, output_dim=0, packed_dim=0, packed_factor=8,
                                    weight_loader=noop)
        layer.register_parameter("weight_zero_point", p)
    if bias is not None:
        layer.register_parameter("bias", torch.nn.Parameter(bias.clone().to(act_dtype), requires_grad=False))
    names = dict(w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                 w_zp_param_name="weight_zero_point", w_gidx_param_name="weight_g_idx")
    kobj = KC(cfg, **names)
    layer.to(dev)
    if kernel == "dual":
        from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel

        from .w4_dispatch import DualW4, marlin_max_m

        layer.output_size_per_partition = n
        dual = DualW4(layer, kobj, MarlinLinearKernel(cfg, **names), ["weight_packed", "weight_scale",
                                                                        "weight_zero_point"],
                      max_m if max_m is not None else marlin_max_m(), key=f"bench#{id(layer):x}")
        kobj.process_weights_after_loading(layer)
        layer._sw_dual = dual  # keeps it alive (the registry holds weak references)
        return layer, _DualAsKernel(dual)
    kobj.process_weights_after_loading(layer)
    return layer, kobj


class _DualAsKernel:
    """``apply_weights(layer, x, bias)`` facade over a DualW4 (what benchmarks and tests call)."""

    def __init__(self, dual):
        self.dual = dual

    def apply_weights(self, layer, x, bias=None):
        return self.dual.apply(x, bias)


def random_w8(n: int, k: int, device, seed: int = 0) -> dict:
    """int8 weight [N, K] with per-row float32 scales (symmetric), the W8A8 layout; ``w_t`` is the [K, N]
    column-major view ``cutlass_scaled_mm`` takes."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8, device=device)
    s = torch.rand(n, 1, generator=g, device=device) * 1e-3 + 1e-4
    return {"w": w, "w_t": w.t(), "scale": s, "n": n, "k": k}


def dequant_w8(w: dict) -> torch.Tensor:
    return w["w"].float() * w["scale"]
