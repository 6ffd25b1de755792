"""The kernel layer (vllm_superweight/kernels/linear): selection by what the machine really has, the fallbacks'
numbers, the per-batch dispatch rule. CPU; the CUDA kernels' numbers are in tests/test_gpu_kernels.py.

vLLM's AVX2 CPU build has no ``cpu_gemm_wna16`` (its AVX-512 build has): the "op missing" case is forced here
by hiding the op, so CI covers both paths on either kind of CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")

from vllm_superweight import envs  # noqa: E402
from vllm_superweight.kernels.linear import (  # noqa: E402
    W8A8_KERNELS,
    WEIGHT_ONLY_KERNELS,
    NoKernelError,
    SWLinearConfig,
    base,
    choose_kernel,
    explain,
)
from vllm_superweight.kernels.linear import w8a8 as W8  # noqa: E402
from vllm_superweight.kernels.linear import weight_only as WO  # noqa: E402


def cfg(dtype=torch.bfloat16, acts="none", bits=4, group=64, sym=False, k=256, n=128):
    return SWLinearConfig(
        prefix="model.layers.0.mlp.down_proj",
        bits=bits,
        symmetric=sym,
        group_size=group,
        activations=acts,
        act_dtype=dtype,
        full_shape=(k, n),
        partition_shape=(k, n),
        device_type="cpu",
    )


@pytest.fixture
def clean_env(monkeypatch):
    for v in (envs.W4_KERNEL, envs.MARLIN_MAX_M, "VLLM_DISABLED_KERNELS"):
        monkeypatch.delenv(v, raising=False)


def hide_ops(monkeypatch, *names):
    real = base.has_op
    monkeypatch.setattr(base, "has_op", lambda name, namespace="_C": name not in names and real(name, namespace))


# ---- selection ------------------------------------------------------------------------------------------------
def test_priority_lists_end_in_a_universal_fallback():
    assert WEIGHT_ONLY_KERNELS[-1] is WO.TorchDequantKernel and W8A8_KERNELS[-1] is W8.TorchInt8Kernel
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert WO.TorchDequantKernel.can_implement(cfg(dt, group=96, k=96 * 3, n=40))[0]
        assert W8.TorchInt8Kernel.can_implement(cfg(dt, acts="int8-tensor", bits=8, group=-1, sym=True))[0]


def test_bf16_on_this_cpu_takes_vllms_int4_kernel_only_on_amx(clean_env):
    """torch's int4 GEMM first (1.5x vLLM's CPUWNA16 on an AVX-512 EPYC; the only int4 kernel of vLLM's AVX2
    build), except on CPUs with AMX tiles where vLLM's kernel can run (not measured against each other there)."""
    vllm_first = base.has_op("cpu_gemm_wna16") and torch.cpu._is_amx_tile_supported()
    assert choose_kernel(cfg()) is (WO.CPUWNA16Kernel if vllm_first else WO.AtenInt4CPUKernel)
    why = dict((n, w) for n, _, w in explain(cfg()))
    if not base.has_op("cpu_gemm_wna16"):  # an AVX2 machine: the reason names the op
        assert "cpu_gemm_wna16" in why["CPUWNA16Kernel"]


@pytest.mark.parametrize("amx", [True, False])
def test_amx_cpus_keep_vllms_int4_kernel_first(clean_env, monkeypatch, amx):
    if not base.has_op("cpu_gemm_wna16"):
        pytest.skip("this CPU's vLLM build has no cpu_gemm_wna16 (torch's int4 GEMM serves W4 whatever the CPU)")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert choose_kernel(cfg()) is (WO.CPUWNA16Kernel if amx else WO.AtenInt4CPUKernel)
    ok, why = WO.AtenInt4CPUKernel.can_implement(cfg())
    assert ok is (not amx) and (not amx or "AMX" in why)
    monkeypatch.setenv(envs.W4_KERNEL, "cpu-int4")  # forced: served on any CPU
    assert choose_kernel(cfg()) is WO.AtenInt4CPUKernel
    monkeypatch.delenv(envs.W4_KERNEL)
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "AtenInt4CPUKernel")  # vLLM's kernel behind it
    assert choose_kernel(cfg()) is WO.CPUWNA16Kernel


def test_missing_op_takes_torchs_int4_gemm_then_the_dequantize_fallback(clean_env, monkeypatch):
    """vLLM's AVX2 build (no cpu_gemm_wna16): torch's own int4 GEMM keeps the layer 4-bit; what it cannot take
    (N not a multiple of 16, a group size that is not a multiple of 32) falls to the dequantize-once kernel."""
    hide_ops(monkeypatch, "cpu_gemm_wna16")
    ok, why = WO.CPUWNA16Kernel.can_implement(cfg())
    assert not ok and "cpu_gemm_wna16" in why
    for c in (cfg(), cfg(torch.float16), cfg(group=-1, k=288), cfg(group=96, k=288), cfg(sym=True, group=256, k=512)):
        assert choose_kernel(c) is WO.AtenInt4CPUKernel, c
    assert WO.AtenInt4CPUKernel.kernel_group(cfg(group=-1, k=288)) == 32  # channel-wise over K = 9 x 32
    assert WO.AtenInt4CPUKernel.kernel_group(cfg(group=-1, k=1536)) == 256
    assert WO.AtenInt4CPUKernel.kernel_group(cfg(group=96, k=288)) == 32
    for c, reason in ((cfg(n=40), "multiple of 16"), (cfg(group=-1, k=40), "multiple of 32"), (cfg(bits=8), "4-bit")):
        assert choose_kernel(c) is WO.TorchDequantKernel, c
        ok, why = WO.AtenInt4CPUKernel.can_implement(c)
        assert not ok and reason in why


def test_w8a8_missing_onednn_falls_back(clean_env, monkeypatch):
    c = cfg(acts="int8-token", bits=8, group=-1, sym=True)
    assert choose_kernel(c) is (W8.VllmInt8Kernel if base.has_op("onednn_scaled_mm") else W8.TorchInt8Kernel)
    hide_ops(monkeypatch, "onednn_scaled_mm")
    assert choose_kernel(c) is W8.TorchInt8Kernel
    # per-tensor activations: vLLM's kernels quantize per token only
    assert choose_kernel(cfg(acts="int8-tensor", bits=8, group=-1, sym=True)) is W8.TorchInt8Kernel


def test_fused_triton_kernel_is_opt_in_and_cuda_only(clean_env, monkeypatch):
    assert WO.FusedTritonW4Kernel not in WEIGHT_ONLY_KERNELS  # untimed on a GPU: not chosen automatically
    ok, why = WO.FusedTritonW4Kernel.can_implement(cfg())
    assert not ok and "CUDA" in why
    monkeypatch.setenv(envs.W4_KERNEL, "fused")
    with pytest.raises(NoKernelError, match="SUPERWEIGHT_W4_KERNEL=fused cannot run"):
        choose_kernel(cfg())


def test_humming_kernels_are_opt_in_and_say_why_they_cannot_run(clean_env, monkeypatch):
    # vLLM's Humming backend (alone: one copy; or above Marlin's batches: two copies) is never picked by the
    # priority list; forced on a machine without CUDA (or without the optional package) it is a clear error
    assert WO.HummingKernel not in WEIGHT_ONLY_KERNELS and WO.DualMarlinHummingKernel not in WEIGHT_ONLY_KERNELS
    ok, why = WO.HummingKernel.can_implement(cfg())
    assert not ok and ("CUDA" in why or "not installed" in why)
    ok, why = WO.HummingKernel.can_implement(cfg(group=-1))  # channel-wise: refused on any machine (its first
    assert not ok and "channel-wise" in why  # batch hung on an H200, session 19)
    ok, why = WO.DualMarlinHummingKernel.can_implement(cfg())
    assert not ok and "SUPERWEIGHT_W4_KERNEL=auto" in why  # the pair only when asked for
    assert choose_kernel(cfg()) not in (WO.HummingKernel, WO.DualMarlinHummingKernel)
    for mode in ("humming", "marlin-humming"):
        monkeypatch.setenv(envs.W4_KERNEL, mode)
        with pytest.raises(NoKernelError, match=f"SUPERWEIGHT_W4_KERNEL={mode} cannot run"):
            choose_kernel(cfg())
    monkeypatch.setenv(envs.W4_KERNEL, "marlin-humming")
    assert envs.marlin_max_m(envs.DEFAULT_HUMMING_MARLIN_MAX_M) == 32
    monkeypatch.setenv(envs.MARLIN_MAX_M, "40")
    assert envs.marlin_max_m(envs.DEFAULT_HUMMING_MARLIN_MAX_M) == 40


def test_float32_never_reaches_a_16bit_kernel(clean_env):
    c = cfg(torch.float32)
    assert choose_kernel(c) is WO.TorchDequantKernel
    for k in (WO.MacheteKernel, WO.MarlinKernel, WO.CPUWNA16Kernel, WO.AtenInt4CPUKernel, WO.VllmMPKernel):
        ok, why = k.can_implement(c)
        assert not ok and "16-bit" in why


def test_forcing_and_disabling(clean_env, monkeypatch):
    monkeypatch.setenv(envs.W4_KERNEL, "torch")
    assert choose_kernel(cfg()) is WO.TorchDequantKernel
    monkeypatch.setenv(envs.W4_KERNEL, "marlin")  # no CUDA here
    with pytest.raises(NoKernelError, match="SUPERWEIGHT_W4_KERNEL=marlin cannot run model.layers.0.mlp.down_proj"):
        choose_kernel(cfg())
    monkeypatch.setenv(envs.W4_KERNEL, "exllama")
    with pytest.raises(ValueError, match="SUPERWEIGHT_W4_KERNEL"):
        choose_kernel(cfg())
    monkeypatch.delenv(envs.W4_KERNEL)
    monkeypatch.setenv(envs.W4_KERNEL, "cpu-int4")
    assert choose_kernel(cfg()) is WO.AtenInt4CPUKernel
    monkeypatch.delenv(envs.W4_KERNEL)
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "AtenInt4CPUKernel,CPUWNA16LinearKernel")  # vLLM's class name too
    assert choose_kernel(cfg()) is WO.TorchDequantKernel
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "TorchDequantKernel,CPUWNA16Kernel,AtenInt4CPUKernel")
    with pytest.raises(NoKernelError, match="disabled by VLLM_DISABLED_KERNELS"):
        choose_kernel(cfg())


def test_knobs(monkeypatch):
    monkeypatch.delenv(envs.W4_KERNEL, raising=False)
    monkeypatch.delenv(envs.MARLIN_MAX_M, raising=False)
    assert envs.w4_kernel() == "auto" and envs.marlin_max_m() == envs.DEFAULT_MARLIN_MAX_M
    monkeypatch.setenv(envs.W4_KERNEL, "Dual")
    monkeypatch.setenv(envs.MARLIN_MAX_M, "16")
    assert envs.w4_kernel() == "dual" and envs.marlin_max_m() == 16  # the pair, never the dequantize pair
    monkeypatch.setenv(envs.MARLIN_MAX_M, "many")
    with pytest.raises(ValueError, match="not an integer"):
        envs.marlin_max_m()
    monkeypatch.setenv(envs.DISABLE_CORRECTION, "yes")
    assert envs.disable_correction()


# ---- numbers --------------------------------------------------------------------------------------------------
def _entries(n, k, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n * k, generator=g)[:nnz]
    return flat // k, flat % k, torch.randn(nnz, generator=g)


@pytest.mark.parametrize("kernel", ["torch", "cpu", "cpu-int4"])
@pytest.mark.parametrize("group,sym", [(-1, False), (64, False), (32, True), (96, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_only_kernels_match_the_dequantized_reference(kernel, group, sym, dtype, monkeypatch):
    import vllm_linear as VL

    if kernel == "cpu" and (dtype != torch.bfloat16 or not base.has_op("cpu_gemm_wna16")):
        pytest.skip("CPUWNA16 needs bf16 activations here and the AVX-512 build's cpu_gemm_wna16")
    if kernel == "cpu-int4" and dtype == torch.float32:
        pytest.skip("the CPU int4 GEMM serves 16-bit activations")
    if kernel == "cpu-int4":  # chosen by name, as on CPUs with AMX (where vLLM's CPUWNA16 otherwise comes first)
        monkeypatch.setenv(envs.W4_KERNEL, "cpu-int4")
    n, k = 96, 192
    r, c, v = _entries(n, k, 20, seed=group + 7)
    w = VL.random_w4(n, k, group, sym, "cpu", dtype=dtype, holdout=(r, c), seed=3)
    bias = torch.randn(n)
    layer, kern = VL.build_mp_layer(w, kernel, act_dtype=dtype, bias=bias, sparse=(r, c, v))
    want = {"torch": "TorchDequantKernel", "cpu": "CPUWNA16Kernel", "cpu-int4": "AtenInt4CPUKernel"}[kernel]
    assert kern.describe().startswith(want)
    w_ref = VL.dequant_w4(w)
    w_ref[r, c] = v  # the held-out weights come back exactly
    for m in (1, 5, 33):
        x = torch.randn(2, m, k).to(dtype)
        y = kern.apply_weights(layer, x, layer.bias)
        ref = x.float() @ w_ref.T + bias.to(dtype).float()
        assert y.shape == (2, m, n) and y.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < tol, m
        y0 = kern.apply_gemm(layer, x.reshape(-1, k), layer.bias)  # without the correction
        err0 = float((y0.float() - ref.reshape(-1, n)).norm() / ref.norm())
        assert err0 > tol and err0 > 10 * err, (m, err0, err)  # the correction is what brings the error down


@pytest.mark.parametrize("amx", ["yes", "no", "refused"])
def test_cpu_int4_kernel_never_takes_vllms_w4a8_path(monkeypatch, amx):
    """vLLM's CPU int4 kernel quantizes activations to int8 per token (W4A8) on AMX CPUs unless
    VLLM_CPU_INT4_W4A8=0 (its default is on); a super activation then costs the rest of its token its precision
    (a Xeon with AMX: SmolLM2 perplexity 33.51 vs 32.51). Our weight-only layers are prepared for the 16-bit path
    with the variable at its default, AMX or not (AMX is faked here, so the GEMM is not run under the fake);
    vLLM's module keeps its own setting for other models. AMX tiles stay in use on the 16-bit path, unless the OS
    refuses the process their state ("refused"): then the AVX-512 path over the same weights."""
    if not base.has_op("cpu_gemm_wna16"):
        pytest.skip("this CPU's vLLM build has no cpu_gemm_wna16 (the torch fallback serves W4)")
    import vllm_linear as VL
    from vllm.model_executor.kernels.linear.mixed_precision import cpu as vcpu

    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx != "no")
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: amx == "yes")
    envs_before = vcpu.envs
    assert envs_before.VLLM_CPU_INT4_W4A8  # vLLM's default: its W4A8 path wherever the CPU has AMX
    for group in (64, -1):
        w = VL.random_w4(128, 256, group, False, "cpu", dtype=torch.bfloat16, seed=4)
        layer, kern = VL.build_mp_layer(w, "cpu", act_dtype=torch.bfloat16, bias=torch.zeros(128))
        assert isinstance(kern, WO.CPUWNA16Kernel) and layer.use_w4a8 is False
        assert layer.isa_hint == ("amx" if amx == "yes" else "vec")
    assert vcpu.envs is envs_before


def test_cpu_int4_kernel_keeps_a_super_activation_exact_enough():
    """On this machine, for real: a token with one channel 100x the others (a super activation) through the CPU
    int4 kernel is as accurate as the bf16 torch fallback (W4A8's per-token int8 would be ~25x worse, measured)."""
    if not base.has_op("cpu_gemm_wna16"):
        pytest.skip("this CPU's vLLM build has no cpu_gemm_wna16 (the torch fallback serves W4)")
    import vllm_linear as VL

    n, k = 192, 576
    w = VL.random_w4(n, k, 64, False, "cpu", dtype=torch.bfloat16, seed=5)
    w_ref = VL.dequant_w4(w)
    errs = {}
    for kernel in ("cpu", "torch"):
        layer, kern = VL.build_mp_layer(w, kernel, act_dtype=torch.bfloat16, bias=torch.zeros(n))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(9, k, generator=g)
        x[:, 37] *= 100.0
        x = x.to(torch.bfloat16)
        ref = x.float() @ w_ref.T
        y = kern.apply_weights(layer, x, layer.bias)
        errs[kernel] = float((y.float() - ref).norm() / ref.norm())
    assert errs["cpu"] < 3 * errs["torch"] + 1e-3, errs


def _amx_granted() -> bool:
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(torch.cpu._is_amx_tile_supported() and init is not None and init())


def test_cpu_w4a8_opt_in_keeps_the_outlier_channels_in_16_bit(monkeypatch):
    """``SUPERWEIGHT_CPU_W4A8=1`` on this machine, for real (AMX CPUs): vLLM's W4A8 GEMM with the layer's outlier
    channel zeroed in the int8 operand and added back in 16-bit is within 3x the 16-bit path's error; the same
    W4A8 GEMM without the channel list is > 5x worse (so the split is what keeps it, and W4A8 really ran)."""
    if not base.has_op("cpu_gemm_wna16") or not _amx_granted():
        pytest.skip("needs vLLM's int4 CPU op and AMX (vLLM's W4A8 path)")
    import vllm_linear as VL

    n, k = 192, 576
    w = VL.random_w4(n, k, 64, False, "cpu", dtype=torch.bfloat16, seed=5)
    w_ref = VL.dequant_w4(w)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, k, generator=g)
    x[:, 37] *= 100.0
    x = x.to(torch.bfloat16)
    ref = x.float() @ w_ref.T
    errs, kinds = {}, {}
    for name, knob, chans in (("w4a16", "0", [37]), ("split", "1", [37]), ("w4a8", "1", [])):
        monkeypatch.setenv(envs.CPU_W4A8, knob)
        layer, kern = VL.build_mp_layer(w, "cpu", act_dtype=torch.bfloat16, bias=torch.zeros(n), act_outliers=chans)
        y = kern.apply_weights(layer, x, layer.bias)
        assert y.dtype == torch.bfloat16 and y.shape == (9, n)
        errs[name] = float((y.float() - ref).norm() / ref.norm())
        kinds[name] = (kern.w4a8, kern.split is not None, kern.describe())
    assert kinds["w4a16"][:2] == (False, False) and "W4A8" not in kinds["w4a16"][2]
    assert kinds["split"][:2] == (True, True) and "outlier channels in 16-bit" in kinds["split"][2]
    assert kinds["w4a8"][:2] == (True, False)
    assert errs["split"] < 3 * errs["w4a16"] + 1e-3, errs
    assert errs["w4a8"] > 5 * errs["split"], errs
    # groups vLLM's W4A8 repack cannot block by 128 (channel-wise K = 576: SmolLM2's hidden size; g192) keep the
    # 16-bit path instead of failing to load
    monkeypatch.setenv(envs.CPU_W4A8, "1")
    for group in (-1, 192):
        w = VL.random_w4(n, k, group, False, "cpu", dtype=torch.bfloat16, seed=6)
        layer, kern = VL.build_mp_layer(w, "cpu", act_dtype=torch.bfloat16, bias=torch.zeros(n), act_outliers=[37])
        assert kern.w4a8 is False and kern.split is None
        y = kern.apply_weights(layer, x, layer.bias)
        ref = x.float() @ VL.dequant_w4(w).T
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2, group


@pytest.mark.parametrize("amx", ["no", "refused"])
def test_cpu_w4a8_opt_in_needs_amx(monkeypatch, amx):
    """Without AMX (or without the OS's permission for its tile state) the opt-in is ignored: the 16-bit path, as
    on every CPU by default (AMX faked here; runs on any CPU whose vLLM build has the int4 op)."""
    if not base.has_op("cpu_gemm_wna16"):
        pytest.skip("this CPU's vLLM build has no cpu_gemm_wna16 (the torch fallback serves W4)")
    import vllm_linear as VL

    monkeypatch.setenv(envs.CPU_W4A8, "1")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx != "no")
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: False)
    w = VL.random_w4(128, 256, 64, False, "cpu", dtype=torch.bfloat16, seed=4)
    layer, kern = VL.build_mp_layer(w, "cpu", act_dtype=torch.bfloat16, bias=torch.zeros(128), act_outliers=[3])
    assert layer.use_w4a8 is False and kern.w4a8 is False and kern.split is None
    assert "W4A8" not in kern.describe()
    y = kern.apply_weights(layer, torch.ones(2, 256, dtype=torch.bfloat16), layer.bias)
    ref = torch.ones(2, 256) @ VL.dequant_w4(w).T
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-2


def test_cpu_int4_kernel_runs_as_the_first_op_of_a_fresh_process():
    """Where vLLM's CPU int4 kernel picks AMX tiles, the process needs the OS's permission for tile data first;
    vLLM's worker asks at start-up, so a layer used outside a worker (a script, a benchmark) with no other matrix
    op before it died of SIGILL at its first GEMM on a Xeon with AMX. The kernel asks itself now (a fresh process
    whose first op is ours: exits 0; it was killed by SIGILL before)."""
    if not base.has_op("cpu_gemm_wna16"):
        pytest.skip("this CPU's vLLM build has no cpu_gemm_wna16 (the torch fallback serves W4)")
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import vllm_linear as VL\n"
        "w = VL.random_w4(128, 256, 64, False, 'cpu', dtype=torch.bfloat16, seed=3)\n"
        "layer, kern = VL.build_mp_layer(w, 'cpu', act_dtype=torch.bfloat16, bias=torch.zeros(128))\n"
        "y = kern.apply_gemm(layer, torch.ones(2, 256, dtype=torch.bfloat16), None)\n"
        "print('ISA', layer.isa_hint, tuple(y.shape), bool(torch.isfinite(y).all()))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "(2, 128) True" in p.stdout, p.stdout[-500:]


@pytest.mark.parametrize("native", [True, False])
def test_torch_fallback_computes_in_fp32_where_the_cpu_emulates_bf16(monkeypatch, native):
    import vllm_linear as VL

    monkeypatch.setattr(WO, "_cpu_has_16bit_gemm", lambda: native)
    n, k = 64, 128
    w = VL.random_w4(n, k, 64, False, "cpu", seed=1)
    layer, kern = VL.build_mp_layer(w, "torch", act_dtype=torch.bfloat16)
    assert layer.weight.dtype == (torch.bfloat16 if native else torch.float32)
    assert kern.describe() == ("TorchDequantKernel" if native else "TorchDequantKernel(float32)")
    x = torch.randn(3, k).to(torch.bfloat16)
    y = kern.apply_weights(layer, x)
    ref = x.float() @ VL.dequant_w4(w).to(torch.bfloat16).float().T  # weights rounded to bf16 either way
    assert y.dtype == torch.bfloat16 and float((y.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("kernel_cls", [W8.TorchInt8Kernel, W8.VllmInt8Kernel])
@pytest.mark.parametrize("acts", ["int8-token", "int8-tensor"])
def test_w8a8_kernels_keep_outlier_channels_in_16_bit(kernel_cls, acts):
    if not kernel_cls.can_implement(cfg(acts=acts, bits=8, group=-1, sym=True))[0]:
        pytest.skip(f"{kernel_cls.__name__} cannot run {acts} here")
    import vllm_linear as VL

    VL.single_process_tp()
    n, k = 64, 128
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    outl = torch.tensor([3, 77])
    c = SWLinearConfig("l", 8, True, -1, acts, torch.bfloat16, (k, n), (k, n), "cpu")
    layer = torch.nn.Module()
    layer.register_parameter("weight_packed", torch.nn.Parameter(w8.clone(), requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(scale.clone(), requires_grad=False))
    layer.logical_widths = [n]
    kern = kernel_cls(c)
    kern.set_outliers(layer, outl)
    kern.process_weights_after_loading(layer)
    x = torch.randn(9, k, generator=g).to(torch.bfloat16)
    x[:, 3] *= 300.0  # a super-activation channel: int8 with it in range would crush the rest
    y = kern.apply_weights(layer, x)
    wd = w8.float() * scale
    ref = x.float() @ wd.T
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < 2e-2, err


@pytest.mark.parametrize("outl", [[], [3], [3, 77]])
def test_w8a8_op_bodies_hand_cutlass_the_right_operands(monkeypatch, outl):
    """The opaque ops' bodies above the Triton bound -- ``run`` on x (``w8a8_mm``) and ``run_q`` on the operands the
    compiled graph split (``w8a8_mm_q``, SUPERWEIGHT_W8A8_GRAPH_SPLIT) -- pass the split's operands where vLLM's
    ``cutlass_scaled_mm[_azp]`` take them and add the outlier channels the zero point does not carry: checked with
    torch stand-ins of vLLM's functions (their real kernels run in the GPU tests) against the float reference of the
    int8 weights with the outlier channels in 16 bit; both bodies give the same bits."""
    import vllm._custom_ops as vops

    from vllm_superweight.kernels import sparse_layout as SL

    monkeypatch.setenv(envs.W8A8_TRITON, "8/16")
    monkeypatch.setenv(envs.W8A8_AZP, "1")
    monkeypatch.setattr(W8, "missing_ops", lambda *names: [])
    n, k = 64, 128
    g = torch.Generator().manual_seed(len(outl))
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    c = SWLinearConfig("ops.body.test", 8, True, -1, "int8-token", torch.bfloat16, (k, n), (k, n), "cuda")
    layer = torch.nn.Module()
    layer.register_parameter("weight_packed", torch.nn.Parameter(w8.clone(), requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(scale.clone(), requires_grad=False))
    kern = W8.CutlassSplitInt8Kernel(c)
    assert kern.azp and kern.tri_max_m == 8 and kern.tri_max_m_out == 16
    kern.set_outliers(layer, torch.tensor(outl, dtype=torch.long))
    kern.process_weights_after_loading(layer)
    calls = []

    def mm(a, b, scale_a, scale_b, out_dtype, bias=None):  # (scale_a * a) @ (b * scale_b^T) + bias
        calls.append("mm")
        acc = (a.long() @ b.long()).double() * scale_a.double() * scale_b.double().reshape(1, -1)
        return (acc + (0 if bias is None else bias.double())).to(out_dtype)

    def mm_azp(a, b, scale_a, scale_b, out_dtype, azp_adj, azp=None, bias=None):  # minus azp[m] * azp_adj[n] first
        calls.append("azp")
        acc = a.long() @ b.long() - azp.long().reshape(-1, 1) * azp_adj.long().reshape(1, -1)
        acc = acc.double() * scale_a.double() * scale_b.double().reshape(1, -1)
        return (acc + (0 if bias is None else bias.double())).to(out_dtype)

    monkeypatch.setattr(vops, "cutlass_scaled_mm", mm)
    monkeypatch.setattr(vops, "cutlass_scaled_mm_azp", mm_azp)
    monkeypatch.setattr(W8.CutlassSplitInt8Kernel, "_split", lambda self, lay, t: SL.int8_split_torch(t, None))
    import vllm_superweight.kernels as K

    monkeypatch.setattr(K, "int8_quant_outlier_split_azp", lambda t, i, m=None: SL.int8_split_azp_torch(t, i))
    x = torch.randn(20, k, generator=g).to(torch.bfloat16)  # above both bounds: CUTLASS
    for ch in outl:
        x[:, ch] *= 300.0
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    ref = x.float() @ (w8.float() * scale).T + bias.float()
    if outl:
        xq, xs, xo, azp = SL.int8_split_azp_torch(x, torch.tensor(outl, dtype=torch.int32))
    else:
        xq, xs, xo, azp = (*SL.int8_split_torch(x, None)[:2], None, None)
    y_q = kern.run_q(xq, xs, xo, azp, bias, torch.bfloat16)
    y_x = kern.run(x, bias)
    assert calls == (["azp", "azp"] if outl else ["mm", "mm"])
    for y in (y_q, y_x):
        assert y.shape == (20, n) and y.dtype == torch.bfloat16
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(y_q, y_x)


# ---- the per-batch pair (logic only; the real Marlin/Machete pair runs in tests/test_gpu_kernels.py) -------------
class _Recording(WO.TorchDequantKernel):
    """Stands in for Marlin/Machete: repacks the weight in place at load (scaled) and records the batch sizes."""

    def __init__(self, config, scale):
        super().__init__(config)
        self.scale, self.calls = scale, []

    def process_weights_after_loading(self, layer):
        layer.weight_packed.data = layer.weight_packed.data * self.scale
        if self.scale == 7.0 and getattr(layer, "bias", None) is not None:
            layer.bias.data = layer.bias.data.flip(0)  # Marlin permutes the bias into its layout

    def apply_gemm(self, layer, x, bias=None):
        self.calls.append(x.shape[0])
        y = x @ (layer.weight_packed.data / self.scale).t()
        if bias is not None:
            y = y + (bias.flip(0) if self.scale == 7.0 else bias)
        return y


@pytest.mark.parametrize("with_bias", [False, True])
def test_dual_dispatch_rule_and_independent_copies(with_bias):
    c = SWLinearConfig("test.layer", 4, False, -1, "none", torch.float32, (5, 6), (5, 6), "cpu")
    layer = torch.nn.Module()
    w = torch.randn(6, 5)
    layer.weight_packed = torch.nn.Parameter(w.clone(), requires_grad=False)
    bias = torch.randn(6) if with_bias else None
    if with_bias:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    large, small = _Recording(c, 3.0), _Recording(c, 7.0)
    d = WO.DualMarlinMacheteKernel(c, large=large, small=small, max_m=4)
    d.process_weights_after_loading(layer)
    assert WO.lookup("test.layer") is d
    assert not any("shadow" in n for n, _ in layer.named_parameters())  # the copy is not a registered submodule
    for m in (1, 4, 5, 64):
        x = torch.randn(m, 5)
        y = d.apply_weights(layer, x, layer.bias if with_bias else None)
        torch.testing.assert_close(y, x @ w.t() + (bias if with_bias else 0), rtol=1e-5, atol=1e-5)
    assert small.calls == [1, 4] and large.calls == [5, 64]
    y3 = d.apply_weights(layer, torch.randn(2, 3, 5), None)  # 3-D input: dispatch counts tokens
    assert y3.shape == (2, 3, 6) and large.calls[-1] == 6
    with pytest.raises(RuntimeError, match="no layer registered"):
        WO.lookup("no.such.layer")


def test_clone_param_keeps_the_vllm_class_and_layout():
    import vllm_linear as VL

    VL.single_process_tp()
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    p = PackedvLLMParameter(
        data=torch.arange(12, dtype=torch.int32).view(3, 4),
        input_dim=1,
        output_dim=0,
        packed_dim=1,
        packed_factor=8,
        weight_loader=lambda *a: None,
    )
    q = WO.clone_param(p)
    assert type(q) is PackedvLLMParameter
    assert (q.input_dim, q.output_dim, q.packed_dim, q.packed_factor) == (1, 0, 1, 8)
    assert torch.equal(q.data, p.data) and q.data.data_ptr() != p.data.data_ptr()
    s = GroupQuantScaleParameter(data=torch.ones(3, 2), output_dim=0, input_dim=1, weight_loader=lambda *a: None)
    t = WO.clone_param(s)
    assert type(t) is GroupQuantScaleParameter and (t.input_dim, t.output_dim) == (1, 0)


def test_marlin_dequant_pair_only_for_bulk_holdout_on_cuda(clean_env, monkeypatch):
    """The Marlin + dequantize pair comes first for checkpoints with a bulk hold-out, on CUDA (auto, or forced by
    SUPERWEIGHT_W4_KERNEL=marlin-deq); =dual keeps the Marlin / Machete pair and =vllm vLLM's kernel for them. The
    reasons say why not, and forcing it where it cannot run is a clear error."""

    held = dataclasses.replace(cfg(), holdout=1e-3)
    names = [e[0] for e in explain(held)]
    assert names[1:3] == ["MarlinDequantOneCopyKernel", "MarlinDequantKernel"]  # after the one Humming copy
    ok, why = WO.MarlinDequantKernel.can_implement(held)
    assert not ok and "CUDA" in why  # auto: only this machine (a CPU) rules it out
    assert choose_kernel(held) is not WO.MarlinDequantKernel
    for mode in ("dual", "vllm", "fused"):
        monkeypatch.setenv(envs.W4_KERNEL, mode)
        ok, why = WO.MarlinDequantKernel.can_implement(held)
        assert not ok and f"SUPERWEIGHT_W4_KERNEL={mode}" in why
    monkeypatch.setenv(envs.W4_KERNEL, "dual")
    ok, why = WO.DualMarlinMacheteKernel.can_implement(held)
    assert not ok and "SUPERWEIGHT_W4_KERNEL" not in why  # dual is allowed; only the missing CUDA ops say no
    with pytest.raises(NoKernelError, match="SUPERWEIGHT_W4_KERNEL=dual cannot run"):
        choose_kernel(held)
    monkeypatch.setenv(envs.W4_KERNEL, "marlin-deq")
    ok, why = WO.MarlinDequantKernel.can_implement(cfg())
    assert not ok and "hold-out 0" in why
    ok, why = WO.MarlinDequantKernel.can_implement(held)
    assert not ok and "CUDA" in why  # this machine: CPU
    ok, why = WO.MarlinDequantKernel.can_implement(dataclasses.replace(held, device_type="cuda", group_size=96))
    assert not ok and ("group size 96" in why or "CUDA" in why)
    with pytest.raises(NoKernelError, match="SUPERWEIGHT_W4_KERNEL=marlin-deq cannot run"):
        choose_kernel(held)
    monkeypatch.setenv(envs.DEQUANT_MIN_M, "x")
    with pytest.raises(ValueError, match="SUPERWEIGHT_DEQUANT_MIN_M"):
        envs.dequant_min_m()
    monkeypatch.setenv(envs.DEQUANT_MIN_M, "200")
    assert envs.dequant_min_m() == 200 and envs.graph_knobs()[envs.DEQUANT_MIN_M] == "200"


def test_one_copy_marlin_dequant_pair_is_the_default_for_held_out_checkpoints(clean_env, monkeypatch):
    """MarlinDequantOneCopyKernel (dequantizing from Marlin's own copy) comes right after the one Humming copy (which
    auto takes only on Hopper with humming-kernels installed): auto takes it for checkpoints with a bulk hold-out on
    CUDA (here, a CPU: its reason says CUDA), not for those without one (the Marlin / Machete pair is faster there);
    SUPERWEIGHT_W4_KERNEL=marlin-deq1 forces it (any hold-out), other modes rule it out, and forcing it where it
    cannot run is a clear error."""

    held = dataclasses.replace(cfg(), holdout=1e-3)
    assert WEIGHT_ONLY_KERNELS[:2] == [WO.HummingGemvKernel, WO.MarlinDequantOneCopyKernel]
    assert explain(held)[1][0] == "MarlinDequantOneCopyKernel"
    ok, why = WO.MarlinDequantOneCopyKernel.can_implement(held)
    assert not ok and "CUDA" in why  # auto: only this machine (a CPU) rules it out
    ok, why = WO.MarlinDequantOneCopyKernel.can_implement(dataclasses.replace(cfg(), device_type="cuda"))
    assert not ok and "hold-out 0" in why
    for mode in ("dual", "vllm", "marlin-deq"):
        monkeypatch.setenv(envs.W4_KERNEL, mode)
        ok, why = WO.MarlinDequantOneCopyKernel.can_implement(held)
        assert not ok and f"SUPERWEIGHT_W4_KERNEL={mode}" in why
    monkeypatch.setenv(envs.W4_KERNEL, "marlin-deq1")
    ok, why = WO.MarlinDequantOneCopyKernel.can_implement(dataclasses.replace(cfg(), device_type="cuda"))
    assert not ok and "hold-out" not in why  # forced: any hold-out; only Marlin itself is missing here
    ok, why = WO.MarlinDequantOneCopyKernel.can_implement(held)
    assert not ok and "CUDA" in why
    ok, why = WO.MarlinDequantKernel.can_implement(held)
    assert not ok and "marlin-deq1" in why  # the two-copy pair steps aside
    with pytest.raises(NoKernelError, match="SUPERWEIGHT_W4_KERNEL=marlin-deq1 cannot run"):
        choose_kernel(held)
    ok, why = WO.MarlinDequantOneCopyKernel.can_implement(dataclasses.replace(held, act_dtype=torch.float32))
    assert not ok


# ---- the CUDA GEMV over Marlin's tensors (SUPERWEIGHT_CUDA_GEMV) ----------------------------------------------
def test_cuda_gemv_knob_parses_and_refuses(monkeypatch):
    monkeypatch.delenv(envs.CUDA_GEMV, raising=False)
    assert envs.cuda_gemv_max_m() == envs.DEFAULT_CUDA_GEMV_MAX_M == 1  # single-token batches (measured end to end)
    # unset parts fall to the kernel class's defaults (the one Humming copy: 8 tokens, every layer, fold 4 spread)
    assert envs.cuda_gemv_max_m(8) == 8 and envs.cuda_gemv_every_layer(True) and envs.cuda_gemv_fold_max_m(4) == 4
    monkeypatch.setenv(envs.CUDA_GEMV, "1@fold=2")
    assert envs.cuda_gemv_max_m(8) == 1 and envs.cuda_gemv_every_layer(True) and envs.cuda_gemv_fold_max_m(4) == 2
    monkeypatch.setenv(envs.CUDA_GEMV, "@layers=held")
    assert envs.cuda_gemv_max_m(8) == 8 and not envs.cuda_gemv_every_layer(True)
    monkeypatch.setenv(envs.CUDA_GEMV, "0")
    assert envs.cuda_gemv_max_m() == 0
    monkeypatch.setenv(envs.CUDA_GEMV, "4")
    assert envs.cuda_gemv_max_m() == 4
    monkeypatch.setenv(envs.CUDA_GEMV, "8")
    assert envs.cuda_gemv_max_m() == 8
    assert envs.cuda_gemv_configs() == {}
    for bad in ("9", "-1", "one"):
        monkeypatch.setenv(envs.CUDA_GEMV, bad)
        with pytest.raises(ValueError, match=envs.CUDA_GEMV):
            envs.cuda_gemv_max_m()
    # launch configurations after '@' (what cuda_gemv_bench.py --recommend-env writes)
    monkeypatch.setenv(envs.CUDA_GEMV, "4@one=4:8:32:2:1:1:0:1:1, mma=4:8:24:2:1:0:1:1")
    assert envs.cuda_gemv_max_m() == 4
    assert envs.cuda_gemv_configs() == {"one": (4, 8, 32, 2, 1, 1, 0, 1, 1), "mma": (4, 8, 24, 2, 1, 0, 1, 1)}
    monkeypatch.setenv(envs.CUDA_GEMV, "@one=4:4:24:4")
    assert envs.cuda_gemv_max_m() == 1 and envs.cuda_gemv_configs() == {"one": (4, 4, 24, 4)}
    monkeypatch.setenv(envs.CUDA_GEMV, "8@mma=4:4:12:2:1:0:1:1:0:1,layers=all")  # x through the ring; every layer
    assert envs.cuda_gemv_configs() == {"mma": (4, 4, 12, 2, 1, 0, 1, 1, 0, 1)} and envs.cuda_gemv_every_layer()
    monkeypatch.setenv(envs.CUDA_GEMV, "8@layers=held")
    assert envs.cuda_gemv_configs() == {} and not envs.cuda_gemv_every_layer()
    assert envs.cuda_gemv_fold_max_m() == envs.DEFAULT_CUDA_GEMV_FOLD == 1  # held-out terms inside for 1 token
    monkeypatch.setenv(envs.CUDA_GEMV, "8@fold=8,layers=all")
    assert envs.cuda_gemv_fold_max_m() == 8 and envs.cuda_gemv_every_layer() and envs.cuda_gemv_configs() == {}
    monkeypatch.setenv(envs.CUDA_GEMV, "4@fold=0")
    assert envs.cuda_gemv_fold_max_m() == 0 and envs.cuda_gemv_max_m() == 4
    for bad in ("8@fold=9", "8@fold=-1", "8@fold=", "8@fold=two"):
        monkeypatch.setenv(envs.CUDA_GEMV, bad)
        with pytest.raises(ValueError, match="fold=N"):
            envs.cuda_gemv_fold_max_m()
    # the SELL kernel as the GEMV's programmatic dependent: off unless given
    monkeypatch.setenv(envs.CUDA_GEMV, "8")
    assert not envs.cuda_gemv_sell_pdl()
    monkeypatch.setenv(envs.CUDA_GEMV, "@sellpdl=1")
    assert envs.cuda_gemv_sell_pdl() and envs.cuda_gemv_max_m(8) == 8 and envs.cuda_gemv_fold_max_m(4) == 4
    monkeypatch.setenv(envs.CUDA_GEMV, "8@fold=2,sellpdl=0")
    assert not envs.cuda_gemv_sell_pdl(True) and envs.cuda_gemv_fold_max_m() == 2
    for bad in ("8@sellpdl=2", "8@sellpdl=", "8@sellpdl=yes"):
        monkeypatch.setenv(envs.CUDA_GEMV, bad)
        with pytest.raises(ValueError, match="sellpdl=0 or sellpdl=1"):
            envs.cuda_gemv_sell_pdl()
    monkeypatch.setenv(envs.CUDA_GEMV, "8")
    assert not envs.cuda_gemv_every_layer()
    monkeypatch.setenv(envs.CUDA_GEMV, "8@layers=some")
    with pytest.raises(ValueError, match="layers=held"):
        envs.cuda_gemv_every_layer()
    monkeypatch.setenv(envs.CUDA_GEMV, "8@one=4:8:24:2:1:1:0:1:0:1:3,mma=4:4:12:2:1:0:1:1:0:1:2")  # + SW_SPE
    assert envs.cuda_gemv_configs() == {
        "one": (4, 8, 24, 2, 1, 1, 0, 1, 0, 1, 3),
        "mma": (4, 4, 12, 2, 1, 0, 1, 1, 0, 1, 2),
    }
    for bad in ("1@two=4:8:24:2", "1@one=4:8", "1@one=4:x:24:2", "1@one=4:8:24:2:1:1:0:1:0:1:1:1", "1@mma=-4:8:24:2"):
        monkeypatch.setenv(envs.CUDA_GEMV, bad)
        with pytest.raises(ValueError, match="after '@'"):
            envs.cuda_gemv_configs()
    monkeypatch.setenv(envs.CUDA_GEMV, "8@mma=4:8:24:2:1:1")  # a CUDA-core configuration for the tensor-core form
    with pytest.raises(ValueError, match="7th field"):
        envs.cuda_gemv_configs()


def _pair_with_marlin_copy(n=128, k=256, device="cpu"):
    """A one-copy Marlin + dequantize pair as process_weights_after_loading leaves it (Marlin's tensors in the
    shadow module), without running vLLM's Marlin repack (a CUDA layer's config, CPU tensors)."""
    kern = WO.MarlinDequantOneCopyKernel.__new__(WO.MarlinDequantOneCopyKernel)
    base.SWLinearKernel.__init__(kern, dataclasses.replace(cfg(n=n, k=k, group=64, sym=True), device_type="cuda"))
    kern._init_pair(WO.MarlinKernel.__new__(WO.MarlinKernel))
    kern.gemv_max_m, kern.min_m, kern._min_m_given = 0, 96, True
    qm = torch.zeros(k // 16, 2 * n, dtype=torch.int32, device=device)
    kern.shadow.register_parameter(base.W_PACKED, torch.nn.Parameter(qm, requires_grad=False))
    sc = torch.ones(k // 64, n, dtype=torch.bfloat16, device=device)
    kern.shadow.register_parameter(base.W_SCALE, torch.nn.Parameter(sc, requires_grad=False))
    return kern


def test_cuda_gemv_stays_off_when_turned_off_and_says_why_it_cannot_run(monkeypatch, caplog):
    monkeypatch.setenv(envs.CUDA_GEMV, "0")
    kern = _pair_with_marlin_copy()
    kern._plan_cuda_gemv()
    assert kern.cgemv is None and kern.cgemv_max_m == 0
    assert "CUDA-GEMV" not in kern.describe()
    monkeypatch.setenv(envs.CUDA_GEMV, "1")
    monkeypatch.setattr(WO, "_NOT_PLANNED", {})
    with caplog.at_level("WARNING", logger="vllm.superweight_rtn"):
        kern._plan_cuda_gemv()
    assert kern.cgemv is None and kern.cgemv_max_m == 0  # Marlin's tensors are not on CUDA here
    assert "stays on Marlin for 1 token: not on CUDA" in caplog.text
    assert kern.describe().startswith("CUDA-GEMV(M<=1)/")
    kern.config = dataclasses.replace(kern.config, device_type="cpu")  # a CPU layer: silent, not advertised
    caplog.clear()
    monkeypatch.setattr(WO, "_NOT_PLANNED", {})
    kern._plan_cuda_gemv()
    assert kern.cgemv is None and not caplog.text and kern.describe().startswith("Marlin(")
    monkeypatch.setenv(envs.CUDA_GEMV, "0")
    assert kern.describe().startswith("Marlin(")


@pytest.mark.parametrize("pair", ["one-copy", "dual", "one-copy-every"])
def test_small_batches_route_to_the_cuda_gemv_up_to_its_token_count(monkeypatch, pair):
    """Single tokens: the GEMV's CUDA-core form (with the layer's own bias); 2..MAX_M: its tensor-core form -- on the
    one-copy pair only where it adds held-out terms in its epilogue (alone it is slower than Marlin there, s25)
    unless SUPERWEIGHT_CUDA_GEMV says layers=all, on the two-copy pair always (its documented opt-in); above MAX_M:
    Marlin."""
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    every = "@layers=all" if pair == "one-copy-every" else ""
    monkeypatch.setenv(envs.CUDA_GEMV, "6" + every)
    kern = _pair_with_marlin_copy()
    if pair == "dual":  # the same object as the Marlin / Machete pair would route it
        kern.MMA_HELD_ONLY = False
    assert WO.MarlinDequantOneCopyKernel.MMA_HELD_ONLY and not WO.DualMarlinMacheteKernel.MMA_HELD_ONLY
    one = CG.gemv_plan(128, 256, 64, True, torch.bfloat16, "cpu")
    mma = CG.gemv_plan(128, 256, 64, True, torch.bfloat16, "cpu", config=CG.MMA_CONFIG)
    kern.cgemv, kern.cgemv_mma, kern.cgemv_max_m = one, mma, 6
    calls = []
    monkeypatch.setattr(
        CG,
        "marlin_gemv_cuda",
        lambda x, qm, s, z, p, bias, sparse=None, maps=None: calls.append(
            ("gemv", x.shape[0], bias, p.mma, sparse is not None)
        ),
    )

    class FakeMarlin:
        def apply_gemm(self, layer, x, bias):
            calls.append(("marlin", x.shape[0], bias))

    kern.small = FakeMarlin()
    bias = torch.zeros(128)
    for m in (1, 2, 6, 7):
        kern._small_gemm(torch.zeros(m, 256), bias if m == 1 else None)
    assert calls[0][:2] == ("gemv", 1) and calls[0][2] is bias  # the layer's own bias, not Marlin's permuted one
    assert calls[0][3] is False  # one token: the CUDA-core form
    if pair != "one-copy":
        assert calls[1:3] == [("gemv", 2, None, True, False), ("gemv", 6, None, True, False)]  # tensor-core form
    else:
        assert calls[1:3] == [("marlin", 2, None), ("marlin", 6, None)]  # nothing to fold in: Marlin
    assert calls[3] == ("marlin", 7, None)
    # held-out terms: inside the GEMV's epilogue up to fold=N tokens (default 1), the separate SELL kernel after the
    # plain GEMV above it; past MAX_M the caller's GEMM + correction (Marlin here)
    from vllm_superweight import kernels as K

    def after(gemm, x, sp, n, pdl=False):
        assert not pdl  # (no trig plan on the Marlin copies)
        y = gemm()
        calls.append(("sell", x.shape[0], n))
        return y

    monkeypatch.setattr(K, "gemm_then_correction", after)
    sp = {"ell_cols": torch.zeros(1, 1)}
    sep = "," if every else "@"
    for fold, inside in ((None, ()), ("6", (2, 6)), ("2", (2,)), ("0", ())):
        monkeypatch.setenv(envs.CUDA_GEMV, "6" + every + (f"{sep}fold={fold}" if fold else ""))
        calls.clear()
        for m in (2, 6, 7):
            kern._small_gemm(torch.zeros(m, 256), None, sp, {})
        want: list[tuple] = []
        for m in (2, 6):
            folded = m in inside
            want += [("gemv", m, None, True, True)] if folded else [("gemv", m, None, True, False), ("sell", m, 128)]
        assert calls == want + [("marlin", 7, None)], fold
    calls.clear()
    kern._small_gemm(torch.zeros(1, 256), None, sp, {})  # fold=0: single tokens too
    assert calls == [("gemv", 1, None, False, False), ("sell", 1, 128)]


@pytest.mark.parametrize(
    "corr,packed,want1",
    [
        # default (session 24; H200, 7B layer: 66.4 us vs 71.6 after it): ONE call, the GEMV given the packed
        # slots and their maps
        (None, True, [("gemv", 1, True)]),
        ("inside", True, [("gemv", 1, True)]),
        # corr=sell: the GEMV, then the separate SELL correction
        ("sell", True, [("gemv", 1, False), ("sell", 1)]),
        # slots that cannot be packed (K beyond 16-bit columns): the GEMV alone, the index correction after it
        ("inside", False, [("gemv", 1, False), ("index", 1)]),
        (None, False, [("gemv", 1, False), ("index", 1)]),
    ],
)
def test_one_copy_pair_routes_its_held_out_terms(monkeypatch, corr, packed, want1):
    """Single-token batches of the one-copy pair run the CUDA GEMV with the held-out terms in its epilogue (default)
    or after it (``SUPERWEIGHT_ONECOPY_CONFIG=corr=sell``); two tokens: Marlin, then the separate correction."""
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    if corr:
        monkeypatch.setenv(envs.ONECOPY_CONFIG, f"corr={corr}")
    else:
        monkeypatch.delenv(envs.ONECOPY_CONFIG, raising=False)
    kern = _pair_with_marlin_copy()
    kern.cgemv, kern.cgemv_max_m = CG.gemv_plan(128, 256, 64, True, torch.bfloat16, "cpu"), 1
    kern.sp = {"ell_cols": torch.ones(4, 1, 32, dtype=torch.int32)} if packed else {}
    kern.cmaps = {"hrng": torch.zeros(5, dtype=torch.int32)} if packed else None
    kern.held, kern.deq = 4, {}
    calls = []

    def gemv(x, qm, s, z, p, bias, sparse, maps):
        assert (sparse is None) == (maps is None) and (sparse is None or (sparse is kern.sp and maps is kern.cmaps))
        calls.append(("gemv", x.shape[0], sparse is not None))
        return torch.zeros(x.shape[0], 128)

    class FakeMarlin:
        def apply_gemm(self, layer, x, bias):
            calls.append(("marlin", x.shape[0]))
            return torch.zeros(x.shape[0], 128)

    kern.small = FakeMarlin()
    monkeypatch.setattr(CG, "marlin_gemv_cuda", gemv)
    import vllm_superweight.kernels as K
    import vllm_superweight.kernels.triton_marlin_deq as TMD

    monkeypatch.setattr(K, "sparse_correction", lambda y, x, sp, pdl=False: calls.append(("sell", x.shape[0])) or y)
    monkeypatch.setattr(
        TMD, "index_correction_", lambda y, x, deq, config=None: calls.append(("index", x.shape[0])) or y
    )
    kern.run(torch.zeros(1, 256), None)
    assert calls == want1
    calls.clear()
    kern.run(torch.zeros(2, 256), None)
    assert calls == [("marlin", 2), ("sell" if packed else "index", 2)]


def test_one_copy_pair_plans_the_epilogue_terms_only_for_packed_slots():
    """set_sparse gives the planned GEMV the maps of packed slots; a layer whose K needs more than 16-bit columns
    has none (its correction stays after the GEMV)."""
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    rows, cols = torch.tensor([0, 5, 5, 100]), torch.tensor([1, 2, 200, 3])
    vals = torch.tensor([0.5, -2.0, 1.0, 3.0])
    for k in (256, 65536 + 256):
        kern = _pair_with_marlin_copy(k=k)
        kern.cgemv, kern.cgemv_max_m = CG.gemv_plan(128, k, 64, True, torch.bfloat16, "cpu"), 1
        kern.set_sparse(torch.nn.Module(), rows, cols, vals)
        assert kern.held == 4
        if k <= 65536:
            assert kern.sp and kern.cmaps is not None
            assert kern.cmaps["hrng"].shape == (128 // 32 + 1,)
        else:
            assert not kern.sp and kern.cmaps is None


def test_onecopy_config_takes_corr_inside(monkeypatch):
    monkeypatch.setenv(envs.ONECOPY_CONFIG, "corr=inside,gemv=0")
    assert envs.onecopy_config() == {"corr": ("inside",), "gemv": (0,)}
    monkeypatch.setenv(envs.ONECOPY_CONFIG, "corr=outside")
    with pytest.raises(ValueError, match="sell|inside"):
        envs.onecopy_config()


@pytest.mark.parametrize("error", [0.0, 0.3, float("nan")])
def test_tensor_core_form_is_checked_against_the_cuda_core_form_at_load(monkeypatch, error):
    """The load-time check runs the tensor-core form on MAX_M random tokens and the CUDA-core form one token at a
    time on the layer's own tensors; it passes when they agree and raises on a mismatch (or NaN)."""
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    kern = _pair_with_marlin_copy()
    one = CG.gemv_plan(128, 256, 64, True, torch.bfloat16, "cpu")
    mma = CG.gemv_plan(128, 256, 64, True, torch.bfloat16, "cpu", config=CG.MMA_CONFIG)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    seen = []

    def gemv(x, qm, s, z, plan):
        seen.append((plan.mma, x.shape[0]))
        y = x.float() @ w.T
        return y + error * y.abs().mean() if plan.mma else y

    monkeypatch.setattr(CG, "marlin_gemv_cuda", gemv)
    if error == 0.0:
        kern._check_mma(CG, one, mma, 5)
    else:
        with pytest.raises(RuntimeError, match="differs from the CUDA-core form"):
            kern._check_mma(CG, one, mma, 5)
    assert seen == [(True, 5)] + [(False, 1)] * 5


@pytest.mark.parametrize("compiles", [True, False, "one-token-only", "mma-mismatch"])
def test_cuda_gemv_is_compiled_at_load_and_a_failure_keeps_marlin(monkeypatch, caplog, compiles):
    """The plan and NVRTC's compile happen in process_weights_after_loading: a machine whose torch cannot compile the
    kernel keeps Marlin (with the reason logged) instead of failing in the first forward; where only the
    tensor-core form fails, single tokens keep the GEMV and 2..MAX_M tokens Marlin."""
    import types

    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    kern = _pair_with_marlin_copy()
    fake_qm = types.SimpleNamespace(is_cuda=True, shape=(256 // 16, 2 * 128), device=torch.device("cpu"))
    monkeypatch.setattr(WO, "tensor", lambda mod, name: fake_qm)
    monkeypatch.setattr(CG, "available", lambda: (True, None))
    compiled = []

    def prepare(plan, max_m, min_m=1):
        if not compiles or (compiles == "one-token-only" and plan.mma):
            raise RuntimeError("cuda GEMV: NVRTC failed: (test)")
        compiled.append((plan.mma, min_m, max_m))

    def check(CG_, one, mma, max_m):
        if compiles == "mma-mismatch":
            raise RuntimeError("its tensor-core form differs from the CUDA-core form by 0.7 (relative)")

    monkeypatch.setattr(CG, "prepare", prepare)
    monkeypatch.setattr(kern, "_check_mma", check)
    monkeypatch.setattr(WO, "_NOT_PLANNED", {})
    monkeypatch.setenv(envs.CUDA_GEMV, "2")
    with caplog.at_level("WARNING", logger="vllm.superweight_rtn"):
        kern._plan_cuda_gemv()
    if compiles in ("one-token-only", "mma-mismatch"):
        assert compiled[0] == (False, 1, 1) and kern.cgemv is not None and kern.cgemv_mma is None
        assert kern.cgemv_max_m == 1
        assert "stays on Marlin for 2 tokens: its tensor-core form: RuntimeError" in caplog.text
    elif compiles:
        # the single-token form, then the tensor-core form for 2 tokens, both compiled at load
        assert compiled == [(False, 1, 1), (True, 2, 2)] and kern.cgemv_max_m == 2
        assert kern.cgemv.n == 128 and kern.cgemv.k == 256 and kern.cgemv.grows == 4 and not kern.cgemv.mma
        # what the layers serve without a configuration given: x through the ring in both forms (session 34)
        assert kern.cgemv_mma.mma and kern.cgemv_mma.xr and kern.cgemv_mma.u == CG.SERVE_MMA[0] == 4
        assert kern.cgemv.warps == CG.DEFAULT_CONFIG[1] and kern.cgemv.xr and not kern.cgemv.pdl
        # configurations given with the knob reach both plans
        monkeypatch.setenv(envs.CUDA_GEMV, "2@one=4:4:24:4:1:1:0:0:1,mma=4:8:24:2:1:0:1")
        kern._plan_cuda_gemv()
        assert (kern.cgemv.warps, kern.cgemv.stages, kern.cgemv.pdl, kern.cgemv.mma) == (4, 4, True, False)
        assert kern.cgemv_mma.mma and kern.cgemv_mma.warps == 8 and not (kern.cgemv.xr or kern.cgemv_mma.xr)
    else:
        assert kern.cgemv is None and kern.cgemv_max_m == 0
        assert "stays on Marlin for 1-2 tokens: RuntimeError: cuda GEMV: NVRTC failed" in caplog.text


# ---- one Humming copy, single tokens through the CUDA GEMV over Humming's tensors (humming-gemv) ----------------
class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on CUDA (the planning's checks, no GPU)."""

    @property
    def is_cuda(self):  # type: ignore[override]
        return True


def _humming_gemv_kernel(n=128, k=256, sym=False, bias=False):
    large = WO.HummingKernel.__new__(WO.HummingKernel)  # (vLLM's Humming class needs the package: not built)
    kern = WO.HummingGemvKernel(dataclasses.replace(cfg(n=n, k=k, group=64, sym=sym), device_type="cuda"), large)
    layer = torch.nn.Module()
    layer.weight = torch.zeros(k // 16, 2 * n, dtype=torch.int32).as_subclass(_FakeCuda)
    layer.weight_scale = torch.ones(k // 64, n, dtype=torch.bfloat16)
    if not sym:
        layer.zero_point = torch.zeros(k // 64, n // 8, dtype=torch.int32)
    layer.bias = torch.nn.Parameter(torch.zeros(n)) if bias else None
    kern.has_bias = bias
    kern._layer = __import__("weakref").ref(layer)
    return kern, layer


def test_humming_gemv_is_one_copy_and_auto_takes_it_only_where_measured(monkeypatch):
    """The one Humming copy heads auto's list but takes a layer only where it was measured end to end (s36: Hopper,
    humming-kernels installed, unsplit layers, vLLM's batch-invariant mode off); forced (humming-gemv) it runs
    wherever Humming can. Its GEMV defaults: 1-8 tokens on every layer."""
    from vllm_superweight.kernels import linear as L

    monkeypatch.delenv(envs.CUDA_GEMV, raising=False)
    monkeypatch.delenv(envs.BATCH_INVARIANT, raising=False)
    monkeypatch.setenv(envs.W4_KERNEL, "humming-gemv")
    assert envs.w4_kernel() == "humming-gemv" and L.FORCED["humming-gemv"] is WO.HummingGemvKernel
    assert L.WEIGHT_ONLY_KERNELS[0] is WO.HummingGemvKernel
    ok, why = WO.HummingGemvKernel.can_implement(cfg())  # a CPU layer: Humming cannot
    assert not ok and "HummingKernel" in why
    # Humming itself able to run (the package and a GPU are not here): what auto adds on top
    monkeypatch.setattr(WO.HummingKernel, "can_implement", classmethod(lambda cls, c: (True, None)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: cap[0])
    gpu = dataclasses.replace(cfg(), device_type="cuda")
    shard = dataclasses.replace(gpu, full_shape=(gpu.full_shape[0], 2 * gpu.full_shape[1]))
    assert WO.HummingGemvKernel.can_implement(shard) == (True, None)  # forced: wherever Humming runs
    monkeypatch.setenv(envs.W4_KERNEL, "auto")
    assert WO.HummingGemvKernel.can_implement(gpu) == (True, None)
    assert L.choose_kernel(gpu) is WO.HummingGemvKernel
    assert L.choose_kernel(dataclasses.replace(gpu, holdout=1e-3)) is WO.HummingGemvKernel
    refusals = {"tensor-parallel shard": shard, "CUDA only": cfg()}
    refusals["group size 96"] = dataclasses.replace(
        gpu, group_size=96, full_shape=(96 * 4, 128), partition_shape=(96 * 4, 128)
    )
    refusals["group size -1"] = dataclasses.replace(gpu, group_size=-1)
    for why_part, c in refusals.items():
        ok, why = WO.HummingGemvKernel.can_implement(c)
        assert not ok and why_part in why
        assert L.choose_kernel(c) is not WO.HummingGemvKernel
    cap[0] = (8, 0)
    ok, why = WO.HummingGemvKernel.can_implement(gpu)
    assert not ok and "sm_8x" in why
    cap[0] = (9, 0)
    monkeypatch.setenv(envs.BATCH_INVARIANT, "1")
    ok, why = WO.HummingGemvKernel.can_implement(gpu)
    assert not ok and "VLLM_BATCH_INVARIANT=1" in why and envs.graph_knobs()[envs.BATCH_INVARIANT] == "1"
    monkeypatch.delenv(envs.BATCH_INVARIANT)
    monkeypatch.setenv(envs.W4_KERNEL, "dual")
    ok, why = WO.HummingGemvKernel.can_implement(gpu)
    assert not ok and "SUPERWEIGHT_W4_KERNEL=dual" in why
    # auto's choice depends on whether the package is installed: vLLM's compile cache must see it
    assert envs.graph_knobs()["humming"] == ("1" if envs.humming_installed() else "0")
    kern, _ = _humming_gemv_kernel()
    assert kern.small is kern.large and kern.max_m == 1  # one kernel object, one copy
    assert kern.describe() == "CUDA-GEMV(M<=8)/Humming (one copy)"  # the default: 1-8 tokens, every layer
    monkeypatch.setenv(envs.CUDA_GEMV, "1")
    assert kern.describe() == "CUDA-GEMV(M<=1)/Humming (one copy)"
    monkeypatch.setenv(envs.CUDA_GEMV, "8@layers=held")
    assert kern.describe() == "CUDA-GEMV(M<=1; held-out M<=8)/Humming (one copy)"
    monkeypatch.setenv(envs.CUDA_GEMV, "8")
    assert kern.describe() == "CUDA-GEMV(M<=8)/Humming (one copy)"
    monkeypatch.setenv(envs.CUDA_GEMV, "0")
    assert kern.describe() == "Humming (one copy)"


@pytest.mark.parametrize(
    "case", ["sm90", "sm80", "mismatch", "bias", "padded", "off", "missing", "mma8", "mma-bad", "unset"]
)
def test_humming_gemv_plans_over_hummings_tensors_and_checks_them_at_load(monkeypatch, caplog, case):
    """Load time: the GEMV's plan reads Humming's own tensors with the layout of the GPU (sm_90: Humming's wgmma form),
    compiled and checked against Humming's output on the layer's weights; a mismatch, a layer with a bias or a padded
    weight keep Humming for single tokens (logged). Then one token runs the GEMV over the layer's tensors, two
    tokens Humming. With SUPERWEIGHT_CUDA_GEMV=8 the tensor-core form over the same tensors and layout is planned
    too, checked against the single-token form (8 tokens at once vs one at a time); if it disagrees, one token
    keeps the GEMV and 2-8 tokens stay on Humming (logged)."""
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    kern, layer = _humming_gemv_kernel(bias=case == "bias")
    if case == "padded":
        layer.weight = torch.zeros(256 // 16, 2 * 256, dtype=torch.int32).as_subclass(_FakeCuda)
    if case == "missing":
        del layer.weight
    monkeypatch.setenv(envs.CUDA_GEMV, {"off": "0", "mma8": "8@layers=held", "mma-bad": "8"}.get(case, "1"))
    if case == "unset":  # the kernel's defaults: 1-8 tokens through the GEMV on every layer
        monkeypatch.delenv(envs.CUDA_GEMV)
    monkeypatch.setattr(WO, "_NOT_PLANNED", {})
    monkeypatch.setattr(CG, "available", lambda: (True, None))
    monkeypatch.setattr(CG, "prepare", lambda plan, max_m, min_m=1: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 0) if case == "sm80" else (9, 0))
    calls = []

    def gemv(x, w, scale, zero, plan, bias=None, **kw):
        calls.append(("gemv", x.shape[0], w is layer.weight, scale is layer.weight_scale, zero is layer.zero_point))
        if plan.mma:
            calls[-1] += ("mma", plan.layout)
        return torch.ones(x.shape[0], 128) * (2.0 if case == "mma-bad" and plan.mma else 1.0)

    def humming(lay, x, bias):
        calls.append(("humming", x.shape[0]))
        return torch.ones(x.shape[0], 128) * (3.0 if case == "mismatch" else 1.0)

    monkeypatch.setattr(CG, "marlin_gemv_cuda", gemv)
    monkeypatch.setattr(kern.large, "apply_gemm", humming)
    with caplog.at_level("WARNING", logger="vllm.superweight_rtn"):
        kern._plan_humming_gemv(layer)
    if case in ("mma8", "mma-bad", "unset"):
        one = ("gemv", 1, True, True, True)
        mma = one[:1] + (8,) + one[2:] + ("mma", CG.LAYOUT_HUMMING_SM90)
        assert calls == [one, ("humming", 1), mma] + [one] * 8  # Humming checks the one; the one checks the mma
        assert kern.cgemv is not None and kern.cgemv.layout == CG.LAYOUT_HUMMING_SM90
        if case == "mma-bad":
            assert kern.cgemv_mma is None and kern.cgemv_max_m == 1
            assert "stays on Humming + correction for 2-8 tokens: its tensor-core form: RuntimeError" in caplog.text
            return
        assert kern.cgemv_mma is not None and kern.cgemv_mma.mma and kern.cgemv_max_m == 8 and not caplog.text
        calls.clear()
        kern.run(torch.zeros(2, 256, dtype=torch.bfloat16), None)
        if case == "mma8":  # layers=held and no held-out terms here: Humming from 2 tokens
            assert calls == [("humming", 2)]
            monkeypatch.setenv(envs.CUDA_GEMV, "8@layers=all")  # ... unless every layer takes the tensor-core form
        assert kern.describe() == "CUDA-GEMV(M<=8)/Humming (one copy)"
        calls.clear()
        for m in (1, 2, 8, 9):
            kern.run(torch.zeros(m, 256, dtype=torch.bfloat16), None)
        assert calls == [one, mma[:1] + (2,) + mma[2:], mma, ("humming", 9)]
        return
    if case in ("sm90", "sm80"):
        want = CG.LAYOUT_HUMMING_SM90 if case == "sm90" else CG.LAYOUT_HUMMING
        assert kern.cgemv is not None and kern.cgemv.layout == want and kern.cgemv_max_m == 1
        assert calls == [("gemv", 1, True, True, True), ("humming", 1)]  # the load-time check
        calls.clear()
        kern.run(torch.zeros(1, 256, dtype=torch.bfloat16), None)
        kern.run(torch.zeros(2, 256, dtype=torch.bfloat16), None)
        assert calls == [("gemv", 1, True, True, True), ("humming", 2)]
        return
    assert kern.cgemv is None
    if case == "off":
        assert not caplog.text and not calls
        return
    why = {
        "mismatch": "differs from Humming's output by 0.667",
        "bias": "a layer with a bias",
        "padded": "is not [K/16, 2N] int32",
        "missing": "packed weight (layer.weight) not found",
    }[case]
    assert "stays on Humming for 1 token: " in caplog.text and why in caplog.text
    calls.clear()
    kern.run(torch.zeros(1, 256, dtype=torch.bfloat16), None)
    assert calls == [("humming", 1)]


@pytest.mark.parametrize(
    "case",
    [
        "confirmed",
        "not-confirmed",
        "bias",
        "mma",
        "mma-not-hopper",
        "mma-inside4",
        "mma-fold8",
        "mma-given",
        "mma-prep-fails",
        "mma-sellpdl",
        "mma-sellpdl-fold8",
        "mma-sellpdl-fold0",
        "mma-sellpdl-fails",
        "mma-sellpdl-one-fails",
    ],
)
def test_humming_gemv_held_out_paths(monkeypatch, caplog, case):
    """Held-out entries on one Humming copy, as on the one-copy Marlin pair: single tokens add them in the GEMV's
    epilogue, batches below SUPERWEIGHT_DEQUANT_MIN_M run Humming + the packed SELL correction, larger ones
    dequantize from Humming's tensors (its layout) with the values restored. Where the layout was not confirmed at
    load (GEMV off or its check failed) or the layer has a bias: the base class's correction after every GEMM.
    With the tensor-core form planned (SUPERWEIGHT_CUDA_GEMV=8), 2-8 tokens run it, then the SELL correction (or,
    with fold=8, with the terms in its epilogue). Held-out layers re-plan both forms with the terms spread over the
    split-K blocks (SW_SPE 2) unless SUPERWEIGHT_CUDA_GEMV gives that form's configuration. On Hopper's layout the
    default (s39) is sellpdl with fold 0: every held-out batch of 1-8 tokens through the GEMV's SW_TRIG plan, then the
    SELL kernel as its programmatic dependent; with sellpdl=0 (or off Hopper) where every plan spreads, fold defaults
    to 4 tokens (H100, s36), else to 1. A re-plan that cannot compile keeps the plain plan (logged); a single-token
    SW_TRIG plan that cannot compile moves single tokens back inside the GEMV (fold 1), both failing: fold 4."""
    import vllm_superweight.kernels as K
    from vllm_superweight.kernels import cuda_marlin_gemv as CG
    from vllm_superweight.kernels import triton_marlin_deq as MD

    monkeypatch.setenv(envs.DEQUANT_MIN_M, "96")
    # the mma form's configuration given (not spread) and the failed re-plan with sellpdl off: fold 1
    knob = {"mma-fold8": "8@fold=8", "mma-given": "8@mma=4:4:12:2:1:0:1:1:0:1,sellpdl=0", "mma-inside4": "8@sellpdl=0"}
    knob["mma-prep-fails"] = "8@sellpdl=0"
    knob["mma-sellpdl"] = "8@fold=4,sellpdl=1"  # the SELL kernel as the dependent past a fold of 4
    knob["mma-sellpdl-fold8"] = "8@fold=8,sellpdl=1"  # nothing past the fold: no trig plan
    knob["mma-sellpdl-fold0"] = "8@fold=0,sellpdl=1"  # single tokens past the fold too: both forms trigger
    knob["mma-sellpdl-fails"] = "8@sellpdl=1"
    knob["mma-not-hopper"] = "8@sellpdl=1"  # off Hopper's layout the knob is ignored: no trig plan, fold 4
    knob = knob.get(case, "8")  # "mma", "mma-sellpdl-one-fails": the defaults
    monkeypatch.setenv(envs.CUDA_GEMV, knob)
    monkeypatch.setattr(WO, "_NOT_PLANNED", {})
    prepared = []

    def prepare(plan, max_m, min_m=1):
        one_fails = case == "mma-sellpdl-one-fails" and plan.trig and not plan.mma
        if case == "mma-prep-fails" or (case == "mma-sellpdl-fails" and plan.trig) or one_fails:
            raise RuntimeError("cuda GEMV: NVRTC failed: (test)")
        prepared.append((plan.mma, plan.spe, min_m, max_m) + (("trig",) if plan.trig else ()))

    monkeypatch.setattr(CG, "prepare", prepare)
    kern, layer = _humming_gemv_kernel(bias=case == "bias")
    kern.min_m = envs.dequant_min_m()
    if case != "not-confirmed":
        kern.cgemv = CG.gemv_plan(128, 256, 64, False, torch.bfloat16, "cpu", layout=CG.LAYOUT_HUMMING_SM90)
        kern.cgemv_max_m, kern.layout = 1, CG.LAYOUT_HUMMING_SM90
    if case == "mma-not-hopper":  # Humming's layout off Hopper: no programmatic dependent launch
        kern.layout = CG.LAYOUT_HUMMING
    if case.startswith("mma"):
        kern.cgemv_mma = CG.gemv_plan(
            128, 256, 64, False, torch.bfloat16, "cpu", config=CG.MMA_CONFIG, layout=CG.LAYOUT_HUMMING_SM90
        )
        kern.cgemv_max_m = 8
    rows, cols = torch.tensor([3, 70, 100]), torch.tensor([5, 200, 17])
    with caplog.at_level("WARNING", logger="vllm.superweight_rtn"):
        kern.set_sparse(layer, rows, cols, torch.tensor([0.5, -1.0, 2.0]))
    spread = {"confirmed": [(False, 2, 1, 1)], "mma": [(False, 2, 1, 1), (True, 2, 2, 8)]}
    spread["mma-fold8"], spread["mma-given"] = spread["mma"], spread["confirmed"]
    plain = spread["mma"]
    spread["mma-inside4"] = spread["mma-not-hopper"] = spread["mma-fold8"] = plain
    # sellpdl=1: the spread tensor-core plan again with SW_TRIG, for the batches past the fold (5-8 tokens)
    spread["mma-sellpdl"] = plain + [(True, 2, 5, 8, "trig")]
    # fold=0 (the default on Hopper's layout): the tensor-core form's trig plan from 2 tokens and the single-token
    # form's for 1
    spread["mma-sellpdl-fold0"] = spread["mma"] = plain + [(True, 2, 2, 8, "trig"), (False, 2, 1, 1, "trig")]
    spread["mma-sellpdl-one-fails"] = plain + [(True, 2, 2, 8, "trig")]
    spread["mma-sellpdl-fold8"] = spread["mma-sellpdl-fails"] = plain
    spread["confirmed"] = spread["confirmed"] + [(False, 2, 1, 1, "trig")]  # the single-token form alone: fold 0 too
    assert prepared == spread.get(case, [])  # re-planned and compiled at load, the given form left alone
    if case in spread:
        assert kern.cgemv.spe == 2 and (kern.cgemv_mma is None or kern.cgemv_mma.spe == (case != "mma-given") * 2)
        # the trig plan only where asked for; the plain plans never trigger
        mma_trig = ("mma", "mma-sellpdl", "mma-sellpdl-fold0", "mma-sellpdl-one-fails")
        assert (kern.cgemv_trig is not None) == (case in mma_trig) and not kern.cgemv.trig
        assert (kern.cgemv_trig_one is not None) == (case in ("confirmed", "mma", "mma-sellpdl-fold0"))
        assert kern.cgemv_mma is None or not kern.cgemv_mma.trig
        # the fold settled at load: 0 under sellpdl, 1 where only the single-token trig plan failed, 4 where both
        # did or sellpdl is off (every plan spread), 8 where given
        fold = {"mma": 0, "mma-sellpdl-fold0": 0, "mma-sellpdl-one-fails": 1, "mma-fold8": 8, "mma-sellpdl-fold8": 8}
        fold["confirmed"], fold["mma-given"] = 0, 1
        assert kern._fold() == fold.get(case, 4)
    if case == "mma-prep-fails":
        assert kern.cgemv.spe == 0 and kern.cgemv_mma.spe == 0
        assert "stays on the first split-K block for its held-out terms: SW_SPE=2: RuntimeError" in caplog.text
    if case == "mma-sellpdl-fails":
        assert "stays on two plain launches for its SELL correction at 2-8 tokens: sellpdl: RuntimeError" in caplog.text
    if case == "mma-sellpdl-one-fails":
        assert "stays on two plain launches for its SELL correction at 1-1 tokens: sellpdl: RuntimeError" in caplog.text
    calls = []
    monkeypatch.setattr(
        CG,
        "marlin_gemv_cuda",
        lambda x, w, s, z, plan, bias=None, sparse=None, maps=None: (
            calls.append(
                (
                    "gemv",
                    x.shape[0],
                    sparse is kern.sp and bool(sparse),
                    maps is kern.cmaps,
                    plan.trig and "trig" or plan.mma,
                )
            )
            or torch.zeros(1, 128)
        ),
    )
    monkeypatch.setattr(kern.large, "apply_gemm", lambda lay, x, b: calls.append(("humming", x.shape[0])) or
                        torch.zeros(x.shape[0], 128))  # fmt: skip
    monkeypatch.setattr(
        K,
        "sparse_correction",
        lambda y, x, sp, pdl=False: calls.append(("sell-pdl" if pdl else "sell", x.shape[0])) or y,
    )
    monkeypatch.setattr(MD, "marlin_deq_mm", lambda x, w, s, z, lay, bias=None, layout=0: calls.append(
        ("deq", x.shape[0], lay is kern.deq, layout)) or torch.zeros(x.shape[0], 128))  # fmt: skip
    for m in (1, 4, 8, 95, 96, 300):
        kern.run(torch.zeros(m, 256, dtype=torch.bfloat16), None)
    inside, after = [("gemv", 4, True, True, True)], [("gemv", 4, False, False, True), ("sell", 4)]
    four_eight = {
        "confirmed": [("humming", 4), ("sell", 4), ("humming", 8), ("sell", 8)],
        # spread (the default): fold=4, the terms in its epilogue up to 4 tokens, the SELL kernel after it above
        "mma-inside4": inside + [("gemv", 8, False, False, True), ("sell", 8)],
        "mma-fold8": inside + [("gemv", 8, True, True, True)],  # fold=8 given: the terms in its epilogue
        # sellpdl=1: past the fold the trig plan, then the SELL kernel as its programmatic dependent
        "mma-sellpdl": inside + [("gemv", 8, False, False, "trig"), ("sell-pdl", 8)],
        "mma-sellpdl-fold8": inside + [("gemv", 8, True, True, True)],
        "mma-sellpdl-fold0": [("gemv", 4, False, False, "trig"), ("sell-pdl", 4), ("gemv", 8, False, False, "trig")]
        + [("sell-pdl", 8)],
        # only the single-token trig plan did not compile: fold 1, 2-8 tokens as under the default
        # the trig plan did not compile: the two plain launches (logged)
        "mma-sellpdl-fails": inside + [("gemv", 8, False, False, True), ("sell", 8)],
        # the mma form's configuration given (not spread) or the re-plan failed: fold=1, SELL after it from 2
        "mma-given": after + [("gemv", 8, False, False, True), ("sell", 8)],
    }
    four_eight["mma-prep-fails"] = four_eight["mma-given"]
    four_eight["mma"] = four_eight["mma-sellpdl-one-fails"] = four_eight["mma-sellpdl-fold0"]
    four_eight["mma-not-hopper"] = four_eight["mma-inside4"]
    if case in four_eight:
        assert kern.sparse_keys == [] and kern.sp and kern.deq and kern.cmaps is not None and kern.held == 3
        pdl_one = case in ("confirmed", "mma", "mma-sellpdl-fold0")
        one = [("gemv", 1, False, False, "trig"), ("sell-pdl", 1)] if pdl_one else [("gemv", 1, True, True, False)]
        assert calls == [
            *one,
            *four_eight[case],
            ("humming", 95), ("sell", 95),
            ("deq", 96, True, kern.layout),
            ("deq", 300, True, kern.layout),
        ]  # fmt: skip
    else:  # the base class's buffers: corrected after the op (apply_weights), not inside it
        assert kern.sparse_keys and not kern.sp and not kern.deq
        assert [c[0] for c in calls] == ["gemv" if case == "bias" else "humming"] + ["humming"] * 5


@pytest.mark.parametrize("given", [None, "96", "1024"])
def test_humming_gemv_dequantizes_held_out_layers_from_its_own_crossover(monkeypatch, given):
    """On the one Humming copy, held-out layers keep Humming + the SELL correction up to 383 tokens and dequantize
    (values restored) + cuBLAS from 384 -- the crossover measured on it (H100, s40), not the 96 set for Marlin in
    s6 that other kernels keep; SUPERWEIGHT_DEQUANT_MIN_M, where given, wins."""
    from vllm_superweight.kernels import triton_marlin_deq as MD

    if given is None:
        monkeypatch.delenv(envs.DEQUANT_MIN_M, raising=False)
    else:
        monkeypatch.setenv(envs.DEQUANT_MIN_M, given)
    kern, _ = _humming_gemv_kernel()
    want = 384 if given is None else int(given)
    assert kern.min_m == want and envs.dequant_min_m() == (96 if given is None else want)
    kern.sp = {"slots": torch.zeros(1)}  # a layer with held-out terms
    calls = []
    monkeypatch.setattr(kern, "_small_gemm", lambda x, b, sp=None, maps=None: calls.append(("humming+sell", len(x))))
    monkeypatch.setattr(MD, "marlin_deq_mm", lambda x, *a, **k: calls.append(("deq", len(x))))
    for m in (want - 1, want):
        kern.run(torch.zeros(m, 256, dtype=torch.bfloat16), None)
    assert calls == [("humming+sell", want - 1), ("deq", want)]


def test_humming_ranges_knob_and_tuning_table(monkeypatch):
    """SUPERWEIGHT_HUMMING_RANGES: one Humming kernel a token range, each with Humming's own heuristic configuration at
    the range's top (the open last range's at 8192), handed to Humming as its tuning table; unset, Humming's table."""
    import json
    import sys
    import types

    monkeypatch.delenv(envs.HUMMING_RANGES, raising=False)
    assert envs.humming_ranges() is None
    monkeypatch.setenv(envs.HUMMING_RANGES, "8, 16,64")
    assert envs.humming_ranges() == (8, 16, 64)
    for bad in ("8,8", "16,8", "0,8", "8,x", "8,,16"):
        monkeypatch.setenv(envs.HUMMING_RANGES, bad)
        with pytest.raises(ValueError, match="SUPERWEIGHT_HUMMING_RANGES"):
            envs.humming_ranges()
    rows = json.loads(WO.humming_tuning((8, 16, 64), lambda m: {"block_shape": [m, 256, 64]}))
    assert [r[:2] for r in rows] == [[0, 8], [8, 16], [16, 64], [64, 1 << 30]]
    assert [r[2]["block_shape"][0] for r in rows] == [8, 16, 64, 8192]

    # the kernel: its table built at load from the layer's Humming meta and compute config, then passed to Humming
    asked: list[tuple] = []
    fake_tune = types.ModuleType("humming.tune")
    fake_tune.get_heuristics_config = lambda meta, shape_m, **kw: asked.append((meta, shape_m, kw)) or {"m": shape_m}
    monkeypatch.setitem(sys.modules, "humming", types.ModuleType("humming"))
    monkeypatch.setitem(sys.modules, "humming.tune", fake_tune)
    monkeypatch.setattr(WO._VllmMixedPrecision, "process_weights_after_loading", lambda self, layer: None)
    kern = WO.HummingKernel.__new__(WO.HummingKernel)
    kern.tuning = None
    layer = torch.nn.Module()
    layer.humming_metas = {"": "META"}
    layer.compute_config = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"})
    monkeypatch.setenv(envs.HUMMING_RANGES, "16,128")
    kern.process_weights_after_loading(layer)
    assert [a[1] for a in asked] == [16, 128, 8192] and all(a[0] == "META" for a in asked)
    assert asked[0][2] == {"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"}
    calls: list[dict] = []

    class FakeMethod:
        @staticmethod
        def forward_layer(**kw):
            calls.append(kw)
            return torch.zeros(kw["inputs"].shape[0], 6)

    import vllm.utils.humming as VH

    monkeypatch.setitem(VH.__dict__, "HummingMethod", FakeMethod)  # (setattr would import humming through the facade)
    out = kern.apply_gemm(layer, torch.zeros(2, 3, 5), None)
    assert out.shape == (2, 3, 6) and calls[0]["inputs"].shape == (6, 5)
    assert json.loads(calls[0]["tuning_config"])[0] == [0, 16, {"m": 16}]
    assert calls[0]["compute_config"] == layer.compute_config
