"""Test and benchmark harness: one Linear outside an engine, through the plugin's kernel classes.

Builds one layer's parameters exactly as the plugin registers them (vLLM parameter classes, compressed-tensors
packing along K) and runs one of our kernels (``vllm_superweight.kernels.linear``) on them; also random W4/W8
weights and their float references. Used by tests/test_gpu_kernels.py, tests/kernels/ and
benchmarks/kernel_bench.py (which puts tests/ on sys.path). Needs vLLM.
"""

from __future__ import annotations

import torch

_TP_READY = False


def single_process_tp() -> None:
    """vLLM's parameter classes read the tensor-parallel rank at construction: outside an engine, set up vLLM's
    own single-process distributed state (world size 1, gloo) once, through its public API."""
    global _TP_READY
    if _TP_READY:
        return
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(
                world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0, backend="gloo"
            )
            initialize_model_parallel(1, 1)
    _TP_READY = True


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


def random_w4(
    n: int,
    k: int,
    group: int,
    symmetric: bool,
    device,
    dtype=torch.bfloat16,
    seed: int = 0,
    holdout: tuple | None = None,
) -> dict:
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


def random_holdout(n: int, k: int, nnz: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nnz`` distinct held-out positions of an [n, k] weight drawn uniformly (a random-weight model has no
    structure to place them by) and their values, bf16-exact: (rows, cols, vals), CPU tensors. The benchmarks'
    stand-in for a layer's hold-out; ``random_w4(..., holdout=(rows, cols))`` makes the codes there dequantize to 0."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n * k, generator=g)[:nnz]
    vals = (torch.randn(flat.numel(), generator=g) * 0.05).to(torch.bfloat16).float()
    return flat // k, flat % k, vals


def dequant_w4(w: dict) -> torch.Tensor:
    """float32 [N, K] dequantized weight ((q - z) * s; z = 8 when symmetric)."""
    n, k, group = w["n"], w["k"], w["group"]
    gs = k if group == -1 else group
    q = w["q"].float().reshape(n, k // gs, gs)
    z = 8.0 if w["symmetric"] else w["zeros"].float()[..., None]
    return ((q - z) * w["scales"].float()[..., None]).reshape(n, k)


KERNELS = (
    "machete",
    "marlin",
    "cpu",
    "dual",
    "marlin-deq",
    "marlin-deq1",
    "torch",
    "fused",
    "humming",
    "marlin-humming",
    "auto",
)


def build_mp_layer(
    w: dict,
    kernel: str,
    act_dtype=torch.bfloat16,
    max_m: int | None = None,
    bias: torch.Tensor | None = None,
    sparse: tuple | None = None,
    act_outliers: list[int] | None = None,
    holdout: float = 0.0,
):
    """(layer, kernel) with the plugin's parameters and one of OUR kernel classes (kernels/linear):
    ``kernel`` in {"machete", "marlin", "cpu" (CPUWNA16), "dual" (Marlin for M <= ``max_m``, Machete above),
    "marlin-deq" (Marlin + separate correction for M <= ``max_m``, dequantize + cuBLAS above), "marlin-deq1" (the
    same, dequantizing from Marlin's own copy),
    "torch" (dequantize-once fallback), "cpu-int4" (torch's CPU int4 GEMM), "fused" (our Triton W4 GEMM,
    correction inside), "humming" (vLLM's
    Humming backend, if installed), "marlin-humming" (Marlin for M <= ``max_m``, Humming above), "humming-gemv"
    (one Humming copy, single tokens through our CUDA GEMV over its tensors), "auto" (the
    priority list)}. ``sparse`` = (rows, cols, vals) attaches held-out entries (the kernel's own sparse
    correction); ``act_outliers`` hands the kernel the layer's activation-outlier input channels before
    processing, as the plugin does from the sidecar (kernels that take
    them); ``holdout`` is the checkpoint's hold-out fraction as the scheme hands it to every layer's config (the
    ``auto`` choice reads it). ``kernel.apply_weights(layer, x, bias)`` runs it."""
    single_process_tp()
    from vllm.model_executor.parameter import (
        ChannelQuantScaleParameter,
        GroupQuantScaleParameter,
        PackedColumnParameter,
        PackedvLLMParameter,
    )

    from vllm_superweight.kernels.linear import SWLinearConfig, choose_kernel
    from vllm_superweight.kernels.linear import weight_only as WO

    n, k, group, sym = w["n"], w["k"], w["group"], w["symmetric"]
    dev = w["q"].device
    cfg = SWLinearConfig(
        prefix=f"bench#{id(w):x}.{kernel}",
        bits=4,
        symmetric=sym,
        group_size=group,
        activations="none",
        act_dtype=act_dtype,
        full_shape=(k, n),
        partition_shape=(k, n),
        device_type=dev.type,
        holdout=holdout,
    )
    classes = {
        "machete": WO.MacheteKernel,
        "marlin": WO.MarlinKernel,
        "cpu": WO.CPUWNA16Kernel,
        "dual": WO.DualMarlinMacheteKernel,
        "torch": WO.TorchDequantKernel,
        "cpu-int4": WO.AtenInt4CPUKernel,
        "fused": WO.FusedTritonW4Kernel,
        "humming": WO.HummingKernel,
        "marlin-humming": WO.DualMarlinHummingKernel,
        "humming-gemv": WO.HummingGemvKernel,
    }
    classes["marlin-deq"] = WO.MarlinDequantKernel
    classes["marlin-deq1"] = WO.MarlinDequantOneCopyKernel
    KC = choose_kernel(cfg) if kernel == "auto" else classes[kernel]
    if kernel not in ("dual", "marlin-deq", "marlin-deq1", "marlin-humming", "humming-gemv"):
        ok, why = KC.can_implement(cfg)
        if not ok:
            raise RuntimeError(f"{KC.__name__} cannot implement {cfg}: {why}")

    def noop(*a, **kw):
        return None

    layer = torch.nn.Module()
    # what vLLM's LinearBase carries and some of its kernels read (Humming's repack)
    layer.input_size = layer.input_size_per_partition = k
    layer.output_size, layer.output_partition_sizes = n, [n]
    layer.params_dtype, layer.has_bias = act_dtype, bias is not None
    layer.register_parameter(
        "weight_packed",
        PackedvLLMParameter(
            data=pack_int32(w["q"], 4, 1), input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=noop
        ),
    )
    s = w["scales"].to(act_dtype)
    if group == -1:
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(data=s, output_dim=0, weight_loader=noop))
    else:
        layer.register_parameter(
            "weight_scale", GroupQuantScaleParameter(data=s, output_dim=0, input_dim=1, weight_loader=noop)
        )
    if not sym:
        zp = pack_int32(w["zeros"], 4, 0)
        if group == -1:
            p = PackedColumnParameter(data=zp, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=noop)
        else:
            p = PackedvLLMParameter(
                data=zp, input_dim=1, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=noop
            )
        layer.register_parameter("weight_zero_point", p)
    if bias is not None:
        layer.register_parameter("bias", torch.nn.Parameter(bias.clone().to(act_dtype), requires_grad=False))
    layer.to(dev)
    if kernel in ("dual", "marlin-humming"):
        kobj = classes[kernel](cfg, max_m=max_m)
    elif kernel in ("marlin-deq", "marlin-deq1"):
        kobj = classes[kernel](cfg, min_m=None if max_m is None else max_m + 1)
    else:
        kobj = KC(cfg)
    if act_outliers is not None:
        kobj.set_act_outliers(layer, torch.tensor(act_outliers, dtype=torch.long))
    kobj.process_weights_after_loading(layer)
    if sparse is None:  # the plugin always attaches the (possibly empty) held-out entries after processing
        z = torch.zeros(0, dtype=torch.long)
        sparse = (z, z, torch.zeros(0))
    kobj.set_sparse(layer, *sparse)
    layer._sw_kernel = kobj  # keeps it alive (the dual registry holds weak references)
    return layer, kobj


def random_w8(n: int, k: int, device, seed: int = 0) -> dict:
    """int8 weight [N, K] with per-row float32 scales (symmetric), the W8A8 layout; ``w_t`` is the [K, N]
    column-major view ``cutlass_scaled_mm`` takes."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8, device=device)
    s = torch.rand(n, 1, generator=g, device=device) * 1e-3 + 1e-4
    return {"w": w, "w_t": w.t(), "scale": s, "n": n, "k": k}


def dequant_w8(w: dict) -> torch.Tensor:
    return w["w"].float() * w["scale"]
