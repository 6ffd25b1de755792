"""Weight-only (W3/W4/W8, 16-bit activations) kernels, in priority order (see ``kernels.linear``):

* ``MarlinDequantKernel`` (CUDA, checkpoints with a bulk hold-out >= 1e-4; first for them since measured end to end
  on an H200: saturated 1.22x / 1.65x, batch 64 1.28x the Marlin / Machete pair's throughput on the same held-out
  7B checkpoint, batch 1 equal; ``SUPERWEIGHT_W4_KERNEL=dual`` keeps that pair): Marlin (+ the separate sparse
  correction) for batches below ``SUPERWEIGHT_DEQUANT_MIN_M`` tokens; above, the layer is dequantized from our one-copy
  layout (``kernels/triton_w4.py``) into a shared scratch WITH the held-out values restored in the same kernel,
  then one cuBLAS GEMM: no correction pass over y, which made a 0.1 % hold-out cost 25 % of saturated throughput.
* ``DualMarlinMacheteKernel`` (CUDA, Hopper): Marlin for batches of up to ``SUPERWEIGHT_MARLIN_MAX_M`` tokens,
  Machete above, chosen per batch inside one opaque custom op (``torch.ops.superweight.w4_dual_mm``), so each
  CUDA graph vLLM captures records the kernel of its size. Costs a second copy of the W4 weights.
* ``MacheteKernel``, ``MarlinKernel`` (CUDA): vLLM's own kernels.
* ``AtenInt4CPUKernel`` (CPU, 16-bit activations; not on AMX CPUs where ``CPUWNA16`` can run): torch's own int4
  GEMM: 1.5x vLLM's ``CPUWNA16`` on an AVX-512 EPYC, and on vLLM's AVX2 build (no ``cpu_gemm_wna16``) the W4
  weights stay 4-bit instead of the fallback's float32 copy.
* ``CPUWNA16Kernel`` (CPU): vLLM's own kernel. vLLM's kernels are used only when the ops they call exist in this
  vLLM build (the AVX2 CPU build has no ``cpu_gemm_wna16``) and the activation dtype is 16-bit (none of them has a
  float32 path).
* ``VllmMPKernel``: whatever else vLLM's mixed-precision selection offers on this platform (ROCm, XPU, ...).
* ``TorchDequantKernel``: every platform, dtype and shape: the weights are dequantized ONCE at load into the
  activation dtype (4x the memory of W4 in 16-bit) and the GEMM is ``F.linear``.

Opt-in (``SUPERWEIGHT_W4_KERNEL=fused``; timed on an H200, slower than AWQ for 8-256 tokens): ``FusedTritonW4Kernel``,
our Triton W4A16 paths over one stored layout (``kernels/triton_w4.py``, ``PATHS``): a CUDA-core GEMV at M = 1,
the MMA kernel with the correction in its K loop up to 32 tokens, dequantize (held-out values restored) + cuBLAS
above.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ... import envs
from .base import (
    SIXTEEN_BIT,
    W_PACKED,
    W_SCALE,
    W_ZERO,
    SWLinearConfig,
    SWLinearKernel,
    missing_ops,
    platform,
    replace_parameter,
    tensor,
)

_PARAM_NAMES = dict(
    w_q_param_name=W_PACKED, w_s_param_name=W_SCALE, w_zp_param_name=W_ZERO, w_gidx_param_name="weight_g_idx"
)


class _VllmMixedPrecision(SWLinearKernel):
    """Delegates the GEMM to one of vLLM's ``MPLinearKernel`` classes (``vllm_class``)."""

    #: ops of ``torch.ops._C`` the vLLM kernel calls
    required_ops: tuple[str, ...] = ()

    @classmethod
    def vllm_class(cls) -> type:
        raise NotImplementedError

    @classmethod
    def ops_for(cls, c: SWLinearConfig) -> tuple[str, ...]:
        return cls.required_ops

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if c.act_dtype not in SIXTEEN_BIT:
            return False, f"{cls.__name__} has no {c.act_dtype} path (16-bit activations only)"
        try:
            vcls: Any = cls.vllm_class()
        except ImportError as e:
            return False, f"vLLM kernel unavailable ({e})"
        cap = platform().get_device_capability()
        if cap is not None and vcls.get_min_capability() > cap.to_int():
            return False, f"{vcls.__name__} needs compute capability {vcls.get_min_capability()}"
        ok, why = vcls.can_implement(c.mp_config())
        if not ok:
            return False, why
        missing = missing_ops(*cls.ops_for(c))
        if missing:
            return False, f"this vLLM build has no {', '.join(missing)} (CPU ISA / build without the op)"
        return True, None

    def __init__(self, config: SWLinearConfig) -> None:
        super().__init__(config)
        vcls = self.vllm_class()
        self.wraps = vcls.__name__
        self.impl = vcls(config.mp_config(), **_PARAM_NAMES)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.impl.process_weights_after_loading(layer)

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.impl.apply_weights(layer, x, bias)


class MacheteKernel(_VllmMixedPrecision):
    required_ops = ("machete_mm", "machete_prepack_B")

    @classmethod
    def vllm_class(cls) -> type:
        from vllm.model_executor.kernels.linear.mixed_precision.machete import MacheteLinearKernel

        return MacheteLinearKernel


class MarlinKernel(_VllmMixedPrecision):
    required_ops = ("marlin_gemm", "gptq_marlin_repack")

    @classmethod
    def vllm_class(cls) -> type:
        from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel

        return MarlinLinearKernel


class HummingKernel(_VllmMixedPrecision):
    """vLLM's Humming backend (the optional ``humming-kernels`` package, ``pip install vllm-superweight[humming]``:
    Hopper wgmma / TMA kernels compiled at run time -- NVRTC where cuda-python's bindings import, else nvcc -- at
    each layer shape's first batch, cached on disk; ONE repacked copy serves every batch size). Opt-in
    (``SUPERWEIGHT_W4_KERNEL=humming``), not in the priority list. H200, 7B shape, same lease as AWQ: 1.17x /
    1.13x / 1.07x AWQ at batch 1 / 8 / 64 and 1.06x / 1.07x saturated from 0.985x its weights. Not the default
    because (benchmarks/ISSUE12_LOG.md, sessions 19-20): its output is not bitwise reproducible at M <= 64
    (stream-K) unless ``VLLM_BATCH_INVARIANT=1``, which costs 2.1-2.5x in its kernels; vLLM 0.26 ranks it last and
    does not install it. Channel-wise layers are refused: their first batch never returned on an H200.

    At a layer shape's first batch Humming prepares a kernel for each token-count range of its heuristic table (28
    distinct kernels a 7B shape on Hopper); ``SUPERWEIGHT_HUMMING_RANGES`` hands it a coarser table instead
    (``humming_tuning``: one kernel a range, Humming's own configuration at the range's top; opt-in, session 30).
    Most of that first call was Humming finding each kernel's name in its cubin with pyelftools (s31, H200: ~90 % of
    23-26 s a shape); ``kernels.cubin`` serves those lookups, installed here before the first batch."""

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if c.group_size == -1:
            return False, "Humming: channel-wise layers refused (their first batch never returned on an H200)"
        return super().can_implement(c)

    @classmethod
    def vllm_class(cls) -> type:
        from vllm.model_executor.kernels.linear.mixed_precision.humming import HummingLinearKernel

        return HummingLinearKernel

    def __init__(self, config: SWLinearConfig) -> None:
        super().__init__(config)
        self.tuning: str | None = None  # SUPERWEIGHT_HUMMING_RANGES: Humming's kernels, one a token range

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from ..cubin import install_humming_reader

        install_humming_reader()  # before the shape's first batch: Humming's cubin lookups without pyelftools
        super().process_weights_after_loading(layer)
        tops = envs.humming_ranges()
        if tops:
            import json

            from humming.tune import get_heuristics_config

            metas: Any = layer.humming_metas  # set by vLLM's Humming kernel (prepare_humming_layer)
            meta = metas[""]
            raw: Any = getattr(layer, "compute_config", None)
            cc = json.loads(raw) if raw else {}
            self.tuning = humming_tuning(tops, lambda m: get_heuristics_config(meta, shape_m=m, **cc))

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.tuning is None:
            return super().apply_gemm(layer, x, bias)
        from vllm.utils.humming import HummingMethod

        flat = x.view(-1, x.size(-1))  # what vLLM's HummingLinearKernel does, with our kernel table
        out = HummingMethod.forward_layer(
            layer=layer, inputs=flat, compute_config=layer.compute_config, tuning_config=self.tuning
        )
        return out.view(*x.shape[:-1], out.size(-1))


HUMMING_LAST_M = 8192  # the token count whose configuration serves the last, open range (Humming's table's end)


def humming_tuning(tops: tuple[int, ...], config_at) -> str:
    """Humming's ``tuning_config`` for ranges (0, t1], (t1, t2], ..., (tn, inf): ``[[lo, hi, config], ...]`` as JSON,
    each range with ``config_at(top)`` -- Humming's own heuristic configuration for its top token count (the open
    range's at ``HUMMING_LAST_M``). One kernel a range where Humming's table would have one for every 8-token step of
    small batches."""
    import json

    rows: list[list] = []
    lo = 0
    for top in (*tops, None):
        cfg = config_at(top if top is not None else max(HUMMING_LAST_M, tops[-1] * 2))
        rows.append([lo, top if top is not None else 1 << 30, cfg])
        lo = top if top is not None else lo
    return json.dumps(rows)


class _EnvsW4A8:
    """``vllm.envs`` as vLLM's CPU int4 kernel reads it while it prepares OUR layers: its W4A8 path set by us."""

    def __init__(self, on: bool) -> None:
        self._on = on

    def __getattr__(self, name: str) -> Any:
        if name == "VLLM_CPU_INT4_W4A8":
            return self._on
        from vllm import envs as venvs

        return getattr(venvs, name)


class CPUWNA16Kernel(_VllmMixedPrecision):
    """vLLM's CPU int4 GEMM (``cpu_gemm_wna16``: AVX-512 builds; AMX tiles for bf16 where the CPU has them), with
    16-bit activations unless ``SUPERWEIGHT_CPU_W4A8=1``.

    vLLM 0.26 switches this kernel to W4A8 -- activations quantized to int8 per token (``int4_scaled_mm_cpu``) --
    on CPUs with AMX (bf16) unless ``VLLM_CPU_INT4_W4A8=0``. A super activation (hundreds of times the other
    channels) then leaves the rest of its token a few int8 steps: measured on a Xeon with AMX (session 16), the
    q/k/v-default SmolLM2 checkpoint's WikiText-2 perplexity 33.51 against 32.51 with the torch fallback and 32.54
    on the H200, and 24x the relative error of a bf16 GEMM on a layer with one 100x channel; a channel-wise layer
    with K = 576 (SmolLM2's hidden size) did not even load there (that path's repack blocks K by 128). Our W4
    checkpoints are weight-only, so their layers are prepared for the W4A16 path whatever that variable says
    (other models keep vLLM's choice).

    ``SUPERWEIGHT_CPU_W4A8=1`` (opt-in, AMX CPUs, bf16) takes the W4A8 path the paper's way: the layer's
    activation-outlier input channels (the sidecar's list, ``set_act_outliers``) are zeroed in the int8 operand and
    added back as a 16-bit product with their dequantized weight columns (a [S, N] tensor: S is 1-4 for most
    layers). SmolLM2 q/k/v default, session 16's experiment: WikiText-2 32.88 (W4A16 32.51, plain W4A8 33.51).
    """

    required_ops = ("cpu_gemm_wna16",)

    @classmethod
    def vllm_class(cls) -> type:
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

        return CPUWNA16LinearKernel

    def __init__(self, config: SWLinearConfig) -> None:
        super().__init__(config)
        self.act_outliers = torch.zeros(0, dtype=torch.long)
        self.split: tuple[torch.Tensor, torch.Tensor] | None = None  # (channels [S], weight columns [S, N])
        self.w4a8 = False  # decided at processing (vLLM's ``layer.use_w4a8``)

    def describe(self) -> str:
        name = super().describe()
        if not self.w4a8:
            return name
        return name + (" W4A8, outlier channels in 16-bit" if self.split is not None else " W4A8")

    def set_act_outliers(self, layer: torch.nn.Module, channels: torch.Tensor) -> None:
        self.act_outliers = channels.reshape(-1).long()

    def _want_w4a8(self) -> bool:
        """The opt-in W4A8 path where vLLM's kernel would take it (AMX, bf16), its repack takes the layer's groups, and
        the OS grants the tile state; otherwise the layer keeps the 16-bit path."""
        c = self.config
        if not envs.cpu_w4a8() or c.act_dtype != torch.bfloat16:
            return False
        g = c.partition_shape[0] if c.group_size == -1 else c.group_size
        if 128 % g and g % 128:  # vLLM's W4A8 repack blocks K by 128 (a channel-wise K = 576 failed to load)
            return False
        return bool(torch.cpu._is_amx_tile_supported()) and _amx_granted()

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from vllm.model_executor.kernels.linear.mixed_precision import cpu as vcpu

        want = self._want_w4a8()
        if want and self.act_outliers.numel():
            # the outlier channels' weight columns, dequantized before vLLM repacks the int4 codes
            cols = dequantize_checkpoint_w4(layer, self.config, cols=self.act_outliers)
            self.split = (self.act_outliers, cols.t().contiguous())
        saved = vcpu.envs
        vcpu.envs = _EnvsW4A8(want)  # type: ignore[assignment]
        try:
            self.impl.process_weights_after_loading(layer)
        finally:
            vcpu.envs = saved
        self.w4a8 = bool(getattr(layer, "use_w4a8", False))
        if self.w4a8 and not want:  # vLLM moved the decision elsewhere: refuse rather than serve it
            raise RuntimeError(f"{self.wraps} prepared a W4A8 layer (int8 activations) for a weight-only checkpoint")
        if not self.w4a8:
            self.split = None
        if getattr(layer, "isa_hint", None) == "amx" and not self.w4a8:
            # AMX tile data needs the kernel's per-process permission (arch_prctl XCOMP_PERM); vLLM's CPU worker asks
            # for it at start-up, but a layer used outside a worker died of SIGILL at its first GEMM (session 16):
            # ask here too (torch's own request; idempotent). Refused (an OS without it): the AVX-512 path, which
            # reads the same repacked weights.
            if not _amx_granted():
                setattr(layer, "isa_hint", "vec")  # noqa: B010 (a plain attribute vLLM's kernel reads)

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.split is None:
            return self.impl.apply_weights(layer, x, bias)
        idx, cols = self.split
        y = self.impl.apply_weights(layer, x.index_fill(-1, idx, 0), bias)  # int8 without the outlier channels
        return y.addmm_(x.index_select(-1, idx), cols)  # + those channels' product in 16-bit


_WRAPPED = (MacheteKernel, MarlinKernel, CPUWNA16Kernel)


class VllmMPKernel(_VllmMixedPrecision):
    """vLLM's own mixed-precision choice on platforms whose kernels we do not wrap one by one."""

    @classmethod
    def _choose(cls, c: SWLinearConfig) -> type:
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

        return choose_mp_linear_kernel(c.mp_config())

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if c.act_dtype not in SIXTEEN_BIT:
            return False, "16-bit activations only"
        try:
            vcls = cls._choose(c)
        except (ValueError, ImportError) as e:
            return False, str(e).splitlines()[0]
        if any(vcls is w.vllm_class() for w in _WRAPPED):
            return False, f"vLLM's choice {vcls.__name__} is covered (and was declined) above"
        return True, None

    def __init__(self, config: SWLinearConfig) -> None:
        SWLinearKernel.__init__(self, config)
        vcls = self._choose(config)
        self.wraps = vcls.__name__
        self.impl = vcls(config.mp_config(), **_PARAM_NAMES)


class AtenInt4CPUKernel(SWLinearKernel):
    """torch's own CPU int4 GEMM (``aten._weight_int4pack_mm_for_cpu``, vectorized per ISA by ATen: AVX2 and
    AVX-512 alike) for 16-bit activations. Where vLLM's build has no ``cpu_gemm_wna16`` (its AVX2 build) the W4
    layers stay 4-bit in memory instead of being dequantized to float32 (8x the W4 bytes); on AVX-512 CPUs without
    AMX it is ahead of vLLM's ``CPUWNA16`` too (SmolLM2-135M on a 2-core EPYC: decode 1.55x at batch 1, 1.52x at
    8; ``benchmarks/results/cpu_serving_avx512_s21.json``). On CPUs with AMX tiles vLLM's kernel (AMX, and the
    ``SUPERWEIGHT_CPU_W4A8`` opt-in) stays first: the two were not measured against each other there
    (``SUPERWEIGHT_W4_KERNEL=cpu-int4`` forces this one).

    The op computes ``w = (u - 8) * s + zf`` per group of 32, 64, 128 or 256 input channels, with scales and
    float zero terms in the activation dtype: a checkpoint's ``(q - z) * s`` maps to ``zf = (8 - z) * s`` (0 when
    symmetric), and a larger group (or a channel-wise layer) repeats its scale over the kernel's groups. ``zf`` is
    rounded to the activation dtype (bf16: within 1/64 of a quantization step). Needs N % 16 == 0 and a group size
    that is a multiple of 32; the held-out correction stays the separate sparse kernel.
    """

    GROUPS = (256, 128, 64, 32)  # what the op accepts, largest first

    @classmethod
    def kernel_group(cls, c: SWLinearConfig) -> int | None:
        """The op's group size for this layer: the largest it accepts that divides the layer's group (or K)."""
        k = c.partition_shape[0]
        gs = k if c.group_size == -1 else c.group_size
        return next((g for g in cls.GROUPS if gs % g == 0 and k % g == 0), None)

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if c.device_type != "cpu":
            return False, "CPU only"
        if c.kernel_bits != 4:
            return False, "4-bit codes only"
        if c.act_dtype not in SIXTEEN_BIT:
            return False, "16-bit activations only (float32 keeps the exactly dequantized weights)"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, "this torch has no aten._weight_int4pack_mm_for_cpu"
        if envs.w4_kernel() != "cpu-int4" and torch.cpu._is_amx_tile_supported() and not missing_ops("cpu_gemm_wna16"):
            return False, "a CPU with AMX: vLLM's CPUWNA16 (AMX tiles) comes first there (not measured against it)"
        n = c.partition_shape[1]
        if n % 16:
            return False, f"N = {n} is not a multiple of 16 (the op's packing)"
        if cls.kernel_group(c) is None:
            return False, f"group size {c.group_size} of K = {c.partition_shape[0]} is not a multiple of 32"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        c = self.config
        k, n = c.partition_shape
        g = self.kernel_group(c)
        assert g is not None
        q = unpack_from_int32(getattr(layer, W_PACKED).data, 4, torch.Size((n, k)), packed_dim=1)
        s = getattr(layer, W_SCALE).data.float()  # [N, groups of the checkpoint]
        rep = k // g // s.shape[1]  # kernel groups per checkpoint group
        if c.symmetric:
            zf = torch.zeros_like(s)
        else:
            z = unpack_from_int32(getattr(layer, W_ZERO).data, 4, torch.Size((n, s.shape[1])), packed_dim=0)
            zf = -z.float() * s  # (q - z) s = (u - 8) s + (8 - u_z) s, with q = u - 8 and z = u_z - 8 (signed codes)
        sz = torch.stack([s, zf], dim=-1).repeat_interleave(rep, dim=1)  # [N, K / g, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
        replace_parameter(layer, W_PACKED, packed)
        replace_parameter(layer, W_SCALE, sz.transpose(0, 1).contiguous().to(c.act_dtype))
        replace_parameter(layer, W_ZERO, None)
        self.group = g

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), tensor(layer, W_PACKED), self.group, tensor(layer, W_SCALE)
        )
        return y if bias is None else y.add_(bias)


class TorchDequantKernel(SWLinearKernel):
    """Any platform, dtype or shape: dequantize once at load, then ``F.linear``.

    On a CPU without native 16-bit matrix instructions (no AVX-512-BF16/AMX: e.g. AVX2-only EPYCs, where vLLM's
    build also lacks ``cpu_gemm_wna16``) torch's bf16/fp16 GEMM is emulated and 4-5x slower than fp32 (measured
    here: 0.71 vs 0.17 ms for a [1, 576] x [576, 1536] GEMV), so the weights are held in float32 there and the
    product is rounded once to the activation dtype: 8x the memory of the W4 weights instead of 4x.
    """

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        return True, None

    @staticmethod
    def compute_dtype(c: SWLinearConfig) -> torch.dtype:
        if c.device_type == "cpu" and c.act_dtype in SIXTEEN_BIT and not _cpu_has_16bit_gemm():
            return torch.float32
        return c.act_dtype

    def describe(self) -> str:
        cd = self.compute_dtype(self.config)
        return "TorchDequantKernel" + ("" if cd == self.config.act_dtype else f"({str(cd).replace('torch.', '')})")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        w = dequantize_checkpoint_w4(layer, c).to(self.compute_dtype(c))
        for name in (W_PACKED, W_SCALE, W_ZERO):
            replace_parameter(layer, name, None)
        replace_parameter(layer, "weight", w)

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = tensor(layer, "weight")
        if w.dtype == x.dtype:
            return F.linear(x, w, bias)
        return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(x.dtype)


def dequantize_checkpoint_w4(
    layer: torch.nn.Module, c: SWLinearConfig, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's [N, K] weights from its checkpoint tensors (packed codes, scales, zero points; before any kernel
    repacks them): ``(q - z) * s`` rounded once to the activation dtype, the weights every other kernel serves.
    ``cols``: only those input columns, [N, len(cols)] (the float work for them alone)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    kb = c.kernel_bits
    k_p, n_p = c.partition_shape
    q = unpack_from_int32(getattr(layer, W_PACKED).data, kb, torch.Size((n_p, k_p)), packed_dim=1)
    s = getattr(layer, W_SCALE).data.float()
    ng = s.shape[1]
    z = None
    if not c.symmetric:
        z = unpack_from_int32(getattr(layer, W_ZERO).data, kb, torch.Size((n_p, ng)), packed_dim=0).float()
    if cols is not None:  # per column: its group's scale and zero point
        g = cols.long() // (k_p // ng)
        qc = q[:, cols.long()].float()
        return ((qc if z is None else qc - z[:, g]) * s[:, g]).to(c.act_dtype)
    qg = q.float().view(n_p, ng, k_p // ng)
    if z is not None:
        qg = qg - z[..., None]
    return (qg * s[..., None]).reshape(n_p, k_p).to(c.act_dtype)


def _amx_granted() -> bool:
    """Ask the OS for this process's AMX tile state (torch's own request; idempotent): whether it was granted."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(init is not None and init())


def _cpu_has_16bit_gemm() -> bool:
    """Native bf16/fp16 matrix instructions on this CPU (AVX-512-BF16 or AMX), else torch emulates them."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class FusedTritonW4Kernel(SWLinearKernel):
    """Our Triton W4A16 paths (``kernels/triton_w4.py``): one stored layout for every batch size, the held-out
    correction (super weights + ``holdout``) inside every path -- the GEMV's epilogue, the MMA kernel's K loop, the
    dequantized weights -- so no second launch and no pass over y."""

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        from .. import triton_w4

        if c.device_type != "cuda":
            return False, "CUDA only"
        if not triton_w4.TRITON_OK:
            return False, "Triton is not available"
        if c.act_dtype not in SIXTEEN_BIT:
            return False, f"16-bit activations only, not {c.act_dtype}"
        if c.kernel_bits != 4:
            return False, "4-bit (and 3-bit) codes only"
        g = c.group_size
        if g not in (-1, 32, 64) and (g <= 0 or g % 128):
            return False, f"group size {g} (32, 64, multiples of 128 or channel-wise)"
        cap = platform().get_device_capability()
        if cap is None or cap.to_int() < 90:
            return False, "needs Hopper (wgmma)"
        return True, None

    def describe(self) -> str:
        return "FusedTritonW4Kernel(one layout, correction in the GEMM)"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass  # the repack needs the held-out entries: done in set_sparse, which the scheme always calls

    def set_sparse(self, layer: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        self.sparse_keys = to_w4_layout(self.config, layer, rows, cols, vals)

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from ..triton_w4 import w4_fused_mm

        return w4_fused_mm(x, w4_layout(layer, self.sparse_keys), bias)

    def apply_sparse(self, layer: torch.nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y  # inside the GEMM


def to_w4_layout(
    c: SWLinearConfig, layer: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor
) -> list[str]:
    """Repack the layer's checkpoint tensors (and its held-out entries) into ``triton_w4``'s one stored layout, held
    as ``sw_w4_<key>`` buffers of the layer; the checkpoint tensors are dropped. Returns the keys."""
    from ..triton_w4 import prepare_w4

    k_p, n_p = c.partition_shape
    prep = prepare_w4(
        getattr(layer, W_PACKED).data,
        getattr(layer, W_SCALE).data,
        None if c.symmetric else getattr(layer, W_ZERO).data,
        c.group_size,
        c.symmetric,
        rows,
        cols,
        vals,
        n=n_p,
        k=k_p,
        device=getattr(layer, W_PACKED).device,
        act_dtype=c.act_dtype,
    )
    for name in (W_PACKED, W_SCALE, W_ZERO):
        replace_parameter(layer, name, None)
    for key, t in prep.items():
        layer.register_buffer(f"sw_w4_{key}", t, persistent=False)
    return list(prep)


def w4_layout(layer: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The ``triton_w4`` layout held by ``layer`` (see ``to_w4_layout``)."""
    return {key: getattr(layer, f"sw_w4_{key}") for key in keys}


# ----------------------------------------------------------------------------------------------------------
# per-batch pair on Hopper
# ----------------------------------------------------------------------------------------------------------
_REGISTRY: weakref.WeakValueDictionary[str, DualMarlinMacheteKernel] = weakref.WeakValueDictionary()


def clone_param(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A parameter of the same class and attributes (vLLM's layout properties) over a copy of the data."""
    q = torch.Tensor._make_subclass(type(p), p.data.clone(), False)
    q.__dict__.update(p.__dict__)
    return q


_NOT_PLANNED: dict[str, str] = {}  # why a layer could not take the CUDA GEMV -> the first such layer


class DualMarlinMacheteKernel(SWLinearKernel):
    """Marlin for M <= ``max_m`` tokens, Machete above, over two copies of the W4 weights (Hopper).

    Measured (benchmarks/results/kernel_bench.json, section w4sweep, one Llama-2-7B layer on an H100): Marlin
    takes 0.76x Machete's time for M <= 8, 0.89-0.93x at 48 and 1.17x at 64.
    """

    wraps = "MacheteLinearKernel+MarlinLinearKernel"
    #: the ``SUPERWEIGHT_W4_KERNEL`` modes that pick this pair, the kernels it pairs (large, small), the large
    #: one's name in ``describe`` and the default of ``SUPERWEIGHT_MARLIN_MAX_M`` (their measured crossover)
    MODES: tuple[str, ...] = ("auto", "dual")
    PARTS: tuple[type[SWLinearKernel], type[SWLinearKernel]] = (MacheteKernel, MarlinKernel)
    LARGE_NAME = "Machete"
    DEFAULT_MAX_M = envs.DEFAULT_MARLIN_MAX_M
    #: what the CUDA GEMV serves where ``SUPERWEIGHT_CUDA_GEMV`` does not say: batches of up to GEMV_MAX_M tokens,
    #: 2..GEMV_MAX_M on every layer (GEMV_EVERY) or on held-out ones only, held-out layers' terms summed where
    #: HELD_SPE says (``cuda_marlin_gemv.CONFIG_FIELDS`` "spe"; 0: the tile's first split-K block after its loop) and
    #: inside the GEMV up to HELD_FOLD tokens (SELL kernel after it above)
    GEMV_MAX_M = envs.DEFAULT_CUDA_GEMV_MAX_M
    GEMV_EVERY = False
    HELD_SPE = 0
    HELD_FOLD = 4  # where every plan spreads its held-out terms (H100, s36: inside beats the SELL kernel at 1-4)
    #: held-out batches past the fold through the GEMV with SW_TRIG + the SELL kernel as its programmatic dependent
    #: (``sellpdl``) where ``SUPERWEIGHT_CUDA_GEMV`` does not say -- on Hopper only (``_pdl_capable``); with it the
    #: fold defaults to 0 (every held-out batch the GEMV serves, single tokens too)
    SELL_PDL = False

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if envs.w4_kernel() not in cls.MODES:
            return False, f"{envs.W4_KERNEL}={envs.w4_kernel()}"
        for k in cls.PARTS:
            ok, why = k.can_implement(c)
            if not ok:
                return False, f"{k.__name__}: {why}"
        return True, None

    def __init__(
        self,
        config: SWLinearConfig,
        large: SWLinearKernel | None = None,
        small: SWLinearKernel | None = None,
        max_m: int | None = None,
    ) -> None:
        super().__init__(config)
        self.large = large if large is not None else self.PARTS[0](config)
        self._init_pair(small if small is not None else self.PARTS[1](config))
        self.max_m = envs.marlin_max_m(self.DEFAULT_MAX_M) if max_m is None else int(max_m)

    def _init_pair(self, small: SWLinearKernel) -> None:
        """State of a pair behind the opaque op: the small-batch kernel with its own copy (``shadow``)."""
        self.small = small
        # The key is baked into compiled graphs (vLLM caches them on disk), so it must be stable across runs:
        # the layer's module name, like vLLM's attention layers. A later engine in the same process re-registers
        # the same names (the newest layers win).
        self.key = self.config.prefix
        self.n = self.config.partition_shape[1]
        self.shadow = torch.nn.Module()  # the second copy; owned here, not a submodule (vLLM must not see it)
        self.has_bias = False
        self._layer: weakref.ref | None = None
        self.cgemv: Any = None  # launch plan (GemvPlan) of the CUDA GEMV over Marlin's tensors (SUPERWEIGHT_CUDA_GEMV)
        self.cgemv_mma: Any = None  # its tensor-core form's plan, for 2..cgemv_max_m tokens
        # that plan with SW_TRIG, for held-out batches past the fold (the SELL kernel its programmatic dependent;
        # SUPERWEIGHT_CUDA_GEMV sellpdl=1, set at load by the kernels that support it)
        self.cgemv_trig: Any = None
        self.cgemv_trig_one: Any = None  # the single-token plan with SW_TRIG, where fold=0 (single tokens past it too)
        self.held_fold: int | None = None  # the fold settled at load (_plan_trig); None: from the plans and the knob
        self.cgemv_max_m = 0
        self.cmaps: dict[str, torch.Tensor] | None = None  # the GEMV epilogue's view of packed held-out slots
        self.held = 0  # held-out entries of the layer (set_sparse)

    def describe(self) -> str:
        return f"{self._cuda_gemv_name()}{self.LARGE_NAME}+Marlin(M<={self.max_m})"

    def _cuda_gemv_name(self) -> str:
        """What the layer's single-token batches are meant to run (logged before the weights are loaded: a layer
        whose plan then fails says so in its own warning)."""
        m = self._gemv_max_m() if self.config.device_type == "cuda" else 0
        if m > 1 and self.MMA_HELD_ONLY and not self._gemv_every():
            return f"CUDA-GEMV(M<=1; held-out M<={m})/"
        return f"CUDA-GEMV(M<={m})/" if m else ""

    #: 2..cgemv_max_m tokens through the GEMV's tensor-core form only where it adds held-out terms in its epilogue
    #: (the one-copy kernels): alone it is slower than Marlin at 2-8 tokens (H200, s25: 66.6-73.5 vs 66 us a 7B
    #: layer), so it pays only where it replaces a separate correction kernel
    MMA_HELD_ONLY = False

    def _gemv_serves(self, m: int, sparse: dict[str, torch.Tensor] | None) -> bool:
        """Whether our CUDA GEMV serves this ``m``-token batch (``sparse``: held-out terms for its epilogue)."""
        if self.cgemv is None or m > self.cgemv_max_m:
            return False
        return m == 1 or bool(sparse) or not self.MMA_HELD_ONLY or self._gemv_every()

    def _gemv_max_m(self) -> int:
        return envs.cuda_gemv_max_m(self.GEMV_MAX_M)

    def _gemv_every(self) -> bool:
        return envs.cuda_gemv_every_layer(self.GEMV_EVERY)

    def _fold(self) -> int:
        """The largest batch whose held-out terms the GEMV adds in its epilogue: settled at load (``held_fold``),
        else ``fold=N`` of the knob, else 0 where the SELL kernel runs as the GEMV's programmatic dependent
        (``_sell_pdl``), else the class's default for spread placements -- SW_SPE bit 1 -- (with the terms in one
        block, inside wins at one token only)."""
        if self.held_fold is not None:
            return self.held_fold
        return envs.cuda_gemv_fold_max_m(0 if self._sell_pdl() else self._inside_fold())

    def _inside_fold(self) -> int:
        """The default fold where the SELL kernel after the GEMV is launched plainly."""
        plans = [p for p in (self.cgemv, self.cgemv_mma) if p is not None]
        spread = bool(plans) and all(p.spe & 2 for p in plans)
        return self.HELD_FOLD if spread else envs.DEFAULT_CUDA_GEMV_FOLD

    def _pdl_capable(self) -> bool:
        """Whether this kernel plans the SW_TRIG GEMVs for a GPU with programmatic dependent launch (the one Humming
        copy on Hopper's layout); elsewhere ``sellpdl`` is ignored (no trig plan would exist to serve it)."""
        return False

    def _sell_pdl(self) -> bool:
        """``sellpdl`` of the knob, else the class's default (SELL_PDL) -- only where ``_pdl_capable``."""
        return self._pdl_capable() and envs.cuda_gemv_sell_pdl(self.SELL_PDL)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Marlin's copy is taken from the loaded weights before Machete repacks them in place.
        self._small_copy(layer)
        self.large.process_weights_after_loading(layer)
        self._layer = weakref.ref(layer)
        _REGISTRY[self.key] = self

    def _small_copy(self, layer: torch.nn.Module, move: bool = False) -> None:
        """The small-batch kernel's own copy of the loaded weights (and bias) in ``self.shadow``, processed. With
        ``move`` the checkpoint tensors themselves go there (and leave ``layer``): one copy."""
        for name in (W_PACKED, W_SCALE, W_ZERO):
            p = getattr(layer, name, None)
            if isinstance(p, torch.nn.Parameter):
                self.shadow.register_parameter(name, p if move else clone_param(p))
                if move:
                    replace_parameter(layer, name, None)
        self.has_bias = getattr(layer, "bias", None) is not None
        if self.has_bias:  # Marlin permutes the bias into its own layout: the shadow gets its own copy
            bias = tensor(layer, "bias").data.clone()
            self.shadow.register_parameter("bias", torch.nn.Parameter(bias, requires_grad=False))
        self.small.process_weights_after_loading(self.shadow)
        self._plan_cuda_gemv()

    def _plan_cuda_gemv(self) -> None:
        """With ``SUPERWEIGHT_CUDA_GEMV=MAX_M``, batches of up to MAX_M tokens that would go to Marlin run our GEMV
        over Marlin's own tensors (``kernels/cuda_marlin_gemv.py``; one token: its CUDA-core form, 2..MAX_M: its
        tensor-core form) where it can read the layer."""
        max_m = self._gemv_max_m()
        if not max_m or self.config.device_type != "cuda" or not isinstance(self.small, MarlinKernel):
            return
        from .. import cuda_marlin_gemv as CG

        c = self.config
        k_p, n_p = c.partition_shape
        qm = tensor(self.shadow, W_PACKED)
        ok, why = CG.available() if qm.is_cuda else (False, "not on CUDA")
        # the GEMV's contract is Marlin's unpadded layout (gemv_plan); vLLM 0.26 pads N (SmolLM2's q/k/v, 960 -> 1024)
        # or K (its o_proj, 576 -> 640): such a layer stays on Marlin (as the Humming form refuses any padding)
        if ok and tuple(qm.shape) != (k_p // 16, 2 * n_p):
            ok, why = False, f"Marlin padded N x K {n_p} x {k_p} to {qm.shape[1] // 2} x {qm.shape[0] * 16}"
        if ok:
            try:
                args = (n_p, k_p, c.group_size, c.symmetric, c.act_dtype, qm.device)
                plan = CG.gemv_plan(*args, config=CG.served_config("one"))  # single tokens: CUDA cores
                CG.prepare(plan, 1)  # compiled at load: a failure keeps Marlin, never breaks a forward
                mma, max_m = self._plan_mma(CG, args, plan, max_m)
                self.cgemv, self.cgemv_mma, self.cgemv_max_m = plan, mma, max_m
                return
            except (ValueError, RuntimeError, OSError) as e:
                why = f"{type(e).__name__}: {e}"
        _warn_once(why or "unknown", c.prefix, f"1-{max_m} tokens" if max_m > 1 else "1 token")

    def _plan_mma(
        self, CG: Any, args: tuple, one: Any, max_m: int, layout: int = 0, keeps: str = "Marlin"
    ) -> tuple[Any, int]:
        """2..max_m tokens (``SUPERWEIGHT_CUDA_GEMV`` above 1): the GEMV's tensor-core form over the tensors the
        CUDA-core form ``one`` reads, compiled and checked at load; (plan, max_m), or (None, 1) where it cannot run
        (logged once; single tokens still can)."""
        if max_m <= 1:
            return None, max_m
        try:
            mma = CG.gemv_plan(*args, config=CG.served_config("mma"), layout=layout)
            CG.prepare(mma, max_m, min_m=2)
            self._check_mma(CG, one, mma, max_m)
            return mma, max_m
        except (ValueError, RuntimeError, OSError) as e:
            span = f"2-{max_m} tokens" if max_m > 2 else "2 tokens"
            _warn_once(f"its tensor-core form: {type(e).__name__}: {e}", self.config.prefix, span, keeps=keeps)
            return None, 1

    def _check_mma(self, CG: Any, one: Any, mma: Any, max_m: int) -> None:
        """Load time, this layer's own weights: the tensor-core form on ``max_m`` random tokens against the CUDA-core
        form (measured on the H200 against float64) one token at a time; a mismatch raises RuntimeError, which
        leaves 2..max_m tokens on Marlin (Humming). Both forms sum in fp32 over the same bf16 / fp16 inputs, so they
        agree to ~1e-3; a wrong fragment mapping is off by O(1)."""
        qm, scale, zero = self._gemv_tensors()
        gen = torch.Generator(device=qm.device).manual_seed(0)
        x = torch.randn(max_m, one.k, generator=gen, device=qm.device).to(self.config.act_dtype)
        y = CG.marlin_gemv_cuda(x, qm, scale, zero, mma).float()
        ref = torch.cat([CG.marlin_gemv_cuda(x[i : i + 1], qm, scale, zero, one) for i in range(max_m)]).float()
        rel = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
        if not rel < 1e-2:  # NaN fails too
            raise RuntimeError(f"its tensor-core form differs from the CUDA-core form by {rel:.3g} (relative)")

    def _small_gemm(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        sparse: dict[str, torch.Tensor] | None = None,
        maps: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The small-batch GEMM over Marlin's copy: the CUDA GEMV where planned and the batch fits it (with
        ``sparse``: the held-out terms added in its epilogue up to ``fold=N`` tokens of SUPERWEIGHT_CUDA_GEMV, the
        separate SELL kernel after it above), else Marlin (which reads its own permuted copy of the bias)."""
        if self._gemv_serves(x.shape[0], sparse):
            from ..cuda_marlin_gemv import marlin_gemv_cuda

            qm, scale, zero = self._gemv_tensors()
            plan = self.cgemv if x.shape[0] == 1 else self.cgemv_mma
            if sparse and x.shape[0] > self._fold():
                # SUPERWEIGHT_CUDA_GEMV fold=N: a batch this large runs the GEMV plain, then the separate SELL
                # correction (H200, s31: faster than the terms inside at 2-8 tokens); with sellpdl=1 the correction
                # is the GEMV's programmatic dependent
                from .. import gemm_then_correction

                trig = self.cgemv_trig if x.shape[0] > 1 else self.cgemv_trig_one
                gemv = functools.partial(marlin_gemv_cuda, x, qm, scale, zero, trig or plan, bias)
                return gemm_then_correction(gemv, x, sparse, self.n, pdl=trig is not None)
            return marlin_gemv_cuda(x, qm, scale, zero, plan, bias, sparse=sparse, maps=maps)
        b = tensor(self.shadow, "bias") if (bias is not None and self.has_bias) else bias
        return self.small.apply_gemm(self.shadow, x, b)

    def _gemv_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The packed weight, scales and zero points (None: symmetric) the CUDA GEMV reads: Marlin's copy."""
        zero = None if self.config.symmetric else tensor(self.shadow, W_ZERO)
        return tensor(self.shadow, W_PACKED), tensor(self.shadow, W_SCALE), zero

    @property
    def layer(self) -> torch.nn.Module:
        lay = self._layer() if self._layer is not None else None
        if lay is None:
            raise RuntimeError(f"{self.key}: the layer was freed")
        return lay

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Eager dispatch on the token count (the body of the custom op)."""
        if x.shape[0] <= self.max_m:
            return self._small_gemm(x, bias)
        return self.large.apply_gemm(self.layer, x, bias)

    def apply_gemm(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda and _dual_op_available():
            return torch.ops.superweight.w4_dual_mm(x, bias, self.n, self.key)
        return self.run(x, bias)


_SHAPES_LOGGED: set[tuple[int, int]] = set()


def _log_first_of_shape(prefix: str, nk: tuple[int, int], plan_s: float, check_s: float) -> None:
    """Where a humming-gemv engine's load time goes (session 26: 71-77 s against 4 s for Humming alone, unexplained):
    for the first layer of each shape, the GEMV's plan (NVRTC compile or disk cache) and its check against Humming's
    output (whose first call may JIT-compile Humming's kernel for that shape)."""
    if nk not in _SHAPES_LOGGED:
        _SHAPES_LOGGED.add(nk)
        logging.getLogger("vllm.superweight_rtn").info(
            "humming-gemv %s (N=%d, K=%d): GEMV plan %.1f s, check against Humming %.1f s", prefix, *nk, plan_s, check_s
        )


def _warn_once(why: str, prefix: str, span: str, keeps: str = "Marlin") -> None:
    """Each reason the CUDA GEMV cannot serve a layer's batches of ``span`` once, with the first layer it kept on
    ``keeps`` for them."""
    if why not in _NOT_PLANNED:
        _NOT_PLANNED[why] = prefix
        logging.getLogger("vllm.superweight_rtn").warning(
            "%s: %s (and any like it) stays on %s for %s: %s", envs.CUDA_GEMV, prefix, keeps, span, why
        )


class DualMarlinHummingKernel(DualMarlinMacheteKernel):
    """Marlin for M <= ``max_m`` tokens (default 32), vLLM's Humming backend above, over two copies (Marlin's and
    Humming's), chosen per batch inside the same opaque op as the Marlin / Machete pair. Humming's kernels took
    0.80-0.91x Machete's time at 64-192 tokens on an H200 (7B layer) and Marlin stays faster up to 32; opt-in
    (``SUPERWEIGHT_W4_KERNEL=marlin-humming``) until measured end to end."""

    wraps = "HummingLinearKernel+MarlinLinearKernel"
    MODES = ("marlin-humming",)
    PARTS = (HummingKernel, MarlinKernel)
    LARGE_NAME = "Humming"
    DEFAULT_MAX_M = envs.DEFAULT_HUMMING_MARLIN_MAX_M


class HummingGemvKernel(DualMarlinMacheteKernel):
    """ONE copy in Humming's layout for every batch (vLLM's ``HummingLinearKernel``), single tokens through our CUDA
    GEMV over Humming's own tensors (``kernels.cuda_marlin_gemv``, ``LAYOUT_HUMMING_SM90`` on Hopper): humming-kernels'
    repack is Marlin's tile for tile (derived on the CPU from both packers, tests/test_cuda_marlin_gemv.py), so the
    GEMV that serves batch 1 at 0.9x Marlin's time reads it with two decoding flags. Humming alone (s20, H200, 7B):
    1.17x / 1.13x / 1.07x AWQ at batch 1 / 8 / 64, 1.06x / 1.07x saturated, from 0.985x its weights; its batch 1
    is where it trails Marlin. Checked at load on each layer's own weights against Humming's output (a mismatch, a
    layer with a bias -- Humming permutes it in place -- or a padded shape keeps Humming for it, logged).
    Held-out weights, as in the one-copy Marlin pair: single tokens add them in the GEMV's epilogue, batches below
    ``DEQUANT_MIN_M`` (384 tokens, s40; ``SUPERWEIGHT_DEQUANT_MIN_M`` where given) run Humming + the packed SELL
    correction, larger ones dequantize from Humming's own tensors with the held-out values restored
    (``triton_marlin_deq``, ``layout=``), then cuBLAS -- no correction pass over y where it costs most. With
    ``SUPERWEIGHT_CUDA_GEMV=2..8`` held-out layers' 2..8-token batches run the GEMV's tensor-core form over the same
    tensors with the terms in its epilogue instead of Humming + the correction (checked at load against the
    single-token form).

    First in ``auto``'s priority list since session 36 where it was measured -- a Hopper GPU (sm_90) with the optional
    ``humming-kernels`` package installed, an unsplit layer (tensor parallel not yet checked on it), vLLM's
    batch-invariant mode off (Humming's deterministic mode costs 2.1-2.5x) -- and there with the configuration
    measured end to end: every layer's 1-8 token batches through the GEMV (x through its ring); held-out layers'
    1-8 token batches through the GEMV with SW_TRIG and the SELL kernel as its programmatic dependent (``sellpdl``,
    fold 0; s39) -- with ``sellpdl=0`` their terms spread over the split-K blocks (SW_SPE 2) inside the GEMV up to 4
    tokens (s36-s38). H100, 7B, same lease as AWQ (s39, ``results/throughput_h100_s39.json``): 1.384x / 1.218x /
    1.039x AWQ at batch 1 / 8 / 64, 1.03x / 1.05x saturated, from 3.94 GiB (AWQ 4.0); with the 0.1 % q/k/v hold-out
    +0.5 / +4.2 / +5.2 % at 4.01 GiB (terms inside up to 4 tokens: +4.4 / +5.3 / +4.8 %). Elsewhere
    (``SUPERWEIGHT_W4_KERNEL=humming-gemv``) with Humming's own limits (``HummingKernel``)."""

    wraps = "HummingLinearKernel"
    MODES = ("auto", "humming-gemv")
    MMA_HELD_ONLY = True
    PARTS = (HummingKernel, HummingKernel)
    LARGE_NAME = "Humming"
    DEFAULT_MAX_M = 1
    GEMV_MAX_M = 8
    GEMV_EVERY = True
    HELD_SPE = 2
    # H100, s39, same lease, 7B, 0.1 % q/k/v hold-out (results/throughput_h100_s39.json): batch 1 / 8 / 64 0.736 /
    # 0.988 / 2.240 s against 0.764 / 0.998 / 2.231 with the terms inside up to 4 tokens (no hold-out: 0.732 / 0.948 /
    # 2.129); kernel (cuda_gemv_s39_sellpdl_h100.md, 0.1 % in all four GEMMs), us a layer at 1 / 2 / 4 / 8 tokens:
    # 61.6 / 64.9 / 68.2 / 77.5 against 64.2 / 70.0 / 73.4 / 84.0
    SELL_PDL = True
    # Held-out layers dequantize (values restored) + cuBLAS from this many tokens, not from SUPERWEIGHT_DEQUANT_MIN_M's
    # 96 (set in s6 for Marlin + the separate correction). H100, s40, 7B qkv with 0.40 % held out, us a layer
    # (results/dequant_crossover_h100_s40.md): Humming + SELL 48.7 / 54.0 / 87.6 against 100.4 / 100.2 / 102.7 at
    # 96 / 128 / 256 tokens, dequantizing wins from 384 (120.1 vs 131.2); end to end (throughput_h100_s40.json,
    # q/k/v hold-out, 400 prompts, two runs each): 13,579 -> 13,989 tok/s at 1024/256, 18,427 -> 18,796 at 128/128
    DEQUANT_MIN_M = 384

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        ok, why = super().can_implement(c)
        if ok and envs.w4_kernel() == "auto":
            return cls.auto_can_implement(c)
        return ok, why

    @classmethod
    def auto_can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        """Where ``auto`` takes the one Humming copy: what was measured (see the class docstring)."""
        if c.device_type != "cuda" or not torch.cuda.is_available():
            return False, "CUDA only"
        major = torch.cuda.get_device_capability()[0]
        if major != 9:
            return False, f"auto: measured on Hopper (sm_90) only, this GPU is sm_{major}x"
        if c.full_shape != c.partition_shape:
            return False, "auto: a tensor-parallel shard (one Humming copy not yet checked under TP)"
        from ..cuda_marlin_gemv import group_readable

        g, k = c.group_size, c.partition_shape[0]
        if not group_readable(g, k):
            return False, f"auto: group size {g} (measured: groups of 16 x 2^n dividing K, which the GEMV reads)"
        if envs.batch_invariant():
            return False, f"auto: {envs.BATCH_INVARIANT}=1 (Humming's batch-invariant mode costs 2.1-2.5x)"
        return True, None

    def __init__(self, config: SWLinearConfig, large: SWLinearKernel | None = None) -> None:
        large = large if large is not None else HummingKernel(config)
        super().__init__(config, large=large, small=large, max_m=1)  # one kernel object, one copy
        # from here on (held-out layers): dequantize + cuBLAS; SUPERWEIGHT_DEQUANT_MIN_M where given
        self.min_m = envs.dequant_min_m(self.DEQUANT_MIN_M)
        self.sp: dict[str, torch.Tensor] = {}  # packed SELL slots (small batches' correction)
        self.deq: dict[str, torch.Tensor] = {}  # restore index (large batches' dequantizer)
        # Humming's layout on this GPU (cuda_marlin_gemv.LAYOUT_*), once the GEMV's load-time check confirmed it (0:
        # not confirmed -- SUPERWEIGHT_CUDA_GEMV=0 or a failed check: held-out terms corrected after every GEMM)
        self.layout = 0

    def describe(self) -> str:
        return f"{self._cuda_gemv_name()}Humming (one copy)"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.has_bias = getattr(layer, "bias", None) is not None
        self.large.process_weights_after_loading(layer)
        self._layer = weakref.ref(layer)
        _REGISTRY[self.key] = self
        self._plan_humming_gemv(layer)

    def _gemv_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self._humming_tensors(self.layer)

    def _pdl_capable(self) -> bool:
        from .. import cuda_marlin_gemv as CG

        return self.layout == CG.LAYOUT_HUMMING_SM90  # confirmed at load on a Hopper GPU's Humming tensors

    def _humming_tensors(self, layer: torch.nn.Module) -> tuple[Any, Any, Any]:
        """Humming's weight [K/16, 2N] int32, scales [G, N] and zero points [G, N/8] (None: symmetric) on ``layer``."""
        zero = None if self.config.symmetric else getattr(layer, "zero_point", None)
        return getattr(layer, "weight", None), getattr(layer, "weight_scale", None), zero

    def _plan_humming_gemv(self, layer: torch.nn.Module) -> None:
        if not self._gemv_max_m() or self.config.device_type != "cuda":
            return
        from .. import cuda_marlin_gemv as CG

        c = self.config
        k, n = c.partition_shape
        w, scale, zero = self._humming_tensors(layer)
        why: str | None
        if not isinstance(w, torch.Tensor):
            ok, why = False, "Humming's packed weight (layer.weight) not found after its repack"
        else:
            ok, why = CG.available() if w.is_cuda else (False, "not on CUDA")
        if ok and (tuple(w.shape) != (k // 16, 2 * n) or w.dtype != torch.int32):
            ok, why = False, f"Humming's weight {tuple(w.shape)} {w.dtype} is not [K/16, 2N] int32 (padded?)"
        if ok and (scale is None or (zero is None and not c.symmetric)):
            ok, why = False, "Humming's weight_scale / zero_point not found on the layer"
        if ok and self.has_bias:
            ok, why = False, "a layer with a bias (Humming permutes it in place; not yet checked on a GPU)"
        if ok:
            try:
                sm90 = torch.cuda.get_device_capability(w.device)[0] == 9
                layout = CG.LAYOUT_HUMMING_SM90 if sm90 else CG.LAYOUT_HUMMING
                args = (n, k, c.group_size, c.symmetric, c.act_dtype, w.device)
                t0 = time.perf_counter()
                plan = CG.gemv_plan(*args, config=CG.served_config("one"), layout=layout)
                CG.prepare(plan, 1)
                t1 = time.perf_counter()
                self._check_against_humming(CG, layer, plan)
                _log_first_of_shape(c.prefix, (n, k), t1 - t0, time.perf_counter() - t1)
                # the layout is confirmed on this layer's weights: the dequantizer may read it too (set_sparse)
                self.cgemv, self.cgemv_max_m, self.layout = plan, 1, layout
                # SUPERWEIGHT_CUDA_GEMV=2..8: held-out layers' 2..MAX_M-token batches through the tensor-core form
                # with the terms in its epilogue (one kernel where Humming + the SELL correction take two); checked
                # against the single-token form just confirmed
                self.cgemv_mma, self.cgemv_max_m = self._plan_mma(
                    CG, args, plan, self._gemv_max_m(), layout=layout, keeps="Humming + correction"
                )
                return
            except (ValueError, RuntimeError, OSError) as e:
                why = f"{type(e).__name__}: {e}"
        _warn_once(why or "unknown", c.prefix, "1 token", keeps="Humming")

    def _check_against_humming(self, CG: Any, layer: torch.nn.Module, plan: Any) -> None:
        """Load time, this layer's own weights: the GEMV on one random token against Humming's own kernel. Humming
        rounds (q - z) s to the activation dtype before its MMA, the GEMV sums in fp32: they agree to ~1e-3; a wrong
        layout is off by O(1). RuntimeError where they differ by 1e-2 or more (relative)."""
        w, scale, zero = self._humming_tensors(layer)
        gen = torch.Generator(device=w.device).manual_seed(0)
        x = torch.randn(1, plan.k, generator=gen, device=w.device).to(self.config.act_dtype)
        ours = CG.marlin_gemv_cuda(x, w, scale, zero, plan).float()
        ref = self.large.apply_gemm(layer, x, None).float()
        rel = float((ours - ref).norm() / ref.norm().clamp_min(1e-30))
        if not rel < 1e-2:  # NaN fails too
            raise RuntimeError(f"the GEMV over Humming's tensors differs from Humming's output by {rel:.3g} (relative)")

    def set_sparse(self, layer: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Held-out entries after Humming's repack: packed SELL slots for the small batches (read in the GEMV's
        epilogue where it serves the batch) and the restore index of the large batches' dequantizer. Where those
        cannot apply (no CUDA GEMV layout known, K beyond 16-bit columns, a layer with a bias) the base class's
        separate correction after every GEMM."""
        from .. import prepare_sparse
        from ..sparse_layout import PACK_MAX_K

        c = self.config
        k_p, n_p = c.partition_shape
        self.sp, self.deq, self.cmaps, self.held = {}, {}, None, int(rows.numel())
        if not rows.numel() or not self.layout or k_p > PACK_MAX_K or self.has_bias:
            return super().set_sparse(layer, rows, cols, vals)
        from ..triton_marlin_deq import marlin_deq_layout

        self.sparse_keys = []  # the corrections below, inside the op
        w, _, _ = self._humming_tensors(layer)
        device = w.device
        self.sp = prepare_sparse(rows, cols, vals, n_p, k_p, device, layout="sell", pack=c.act_dtype)
        self.deq = marlin_deq_layout(rows, cols, vals, n_p, k_p, c.group_size, c.symmetric, c.act_dtype, device)
        if self.cgemv is not None:
            from ..cuda_marlin_gemv import sparse_maps

            self.cmaps = sparse_maps(self.sp, n_p)
            self._held_placement()
            self._plan_trig()

    def _plan_trig(self) -> None:
        """``sellpdl`` (SUPERWEIGHT_CUDA_GEMV; this class's default on Hopper, SELL_PDL): held-out batches past the
        fold run the GEMV with SW_TRIG, then the SELL kernel as its programmatic dependent -- the tensor-core form's
        plan for 2+ tokens (``cgemv_trig``) and, with fold 0 (its default), the single-token form's
        (``cgemv_trig_one``). Compiled now, like the other plans; a failure keeps that form's two plain launches
        (logged), and a failed single-token plan under the default fold moves single tokens back inside the GEMV
        (the plain pair is slower there: H200, s24, 71.6 vs 66.4 us a 7B layer). Settles ``held_fold``."""
        self.held_fold = self.cgemv_trig = self.cgemv_trig_one = None  # a re-load plans afresh
        fold = self._fold()
        if self._sell_pdl() and fold < self.cgemv_max_m:
            self.cgemv_trig = self._trig_of(self.cgemv_mma, max(2, fold + 1), self.cgemv_max_m)
            if fold == 0:
                self.cgemv_trig_one = self._trig_of(self.cgemv, 1, 1)
                if self.cgemv_trig_one is None and not envs.cuda_gemv_fold_given():
                    fold = 1 if self.cgemv_trig is not None else max(1, self._inside_fold())
        self.held_fold = fold

    def _trig_of(self, plan: Any, lo: int, hi: int) -> Any:
        """``plan`` with SW_TRIG, compiled for ``lo``-``hi`` tokens; None where there is no plan or it cannot
        compile (that form keeps its two plain launches, logged)."""
        if plan is None or lo > hi:
            return None
        from .. import cuda_marlin_gemv as CG

        trig = dataclasses.replace(plan, trig=True)
        try:
            CG.prepare(trig, hi, min_m=lo)
        except (ValueError, RuntimeError, OSError) as e:
            span = f"its SELL correction at {lo}-{hi} tokens"
            _warn_once(f"sellpdl: {type(e).__name__}: {e}", self.config.prefix, span, keeps="two plain launches")
            return None
        return trig

    def _held_placement(self) -> None:
        """A held-out layer's GEMV plans with the terms summed where HELD_SPE says, for each form whose launch
        configuration ``SUPERWEIGHT_CUDA_GEMV`` does not give (a given one keeps its own 11th field). Compiled now,
        like the plain forms; a failure keeps the plain plan (its terms in the first split-K block)."""
        if not self.HELD_SPE:
            return
        from .. import cuda_marlin_gemv as CG

        given = envs.cuda_gemv_configs()
        for form, attr, lo, hi in (("one", "cgemv", 1, 1), ("mma", "cgemv_mma", 2, self.cgemv_max_m)):
            plan = getattr(self, attr)
            if plan is None or form in given or plan.spe == self.HELD_SPE:
                continue
            held = dataclasses.replace(plan, spe=self.HELD_SPE)
            try:
                CG.prepare(held, hi, min_m=lo)
            except (ValueError, RuntimeError, OSError) as e:
                why = f"SW_SPE={self.HELD_SPE}: {type(e).__name__}: {e}"
                _warn_once(why, self.config.prefix, "its held-out terms", keeps="the first split-K block")
                continue
            setattr(self, attr, held)

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.sp:  # no held-out terms here (or the base class's correction after the op)
            if self._gemv_serves(x.shape[0], None):  # one token, or 2..MAX_M with layers=all
                return self._small_gemm(x, bias)
            return self.large.apply_gemm(self.layer, x, bias)
        if x.shape[0] < self.min_m or (self.cgemv is not None and x.shape[0] == 1):
            # one token: the terms in the GEMV's epilogue; up to min_m: Humming, then the correction
            return self._small_gemm(x, bias, self.sp, self.cmaps)
        from ..triton_marlin_deq import marlin_deq_mm

        w, scale, zero = self._humming_tensors(self.layer)
        return marlin_deq_mm(x, w, scale, zero, self.deq, bias, layout=self.layout)

    def _small_gemm(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        sparse: dict[str, torch.Tensor] | None = None,
        maps: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self._gemv_serves(x.shape[0], sparse):  # the GEMV over Humming's tensors
            return super()._small_gemm(x, bias, sparse, maps)
        if sparse:
            from .. import gemm_then_correction

            n_p = self.config.partition_shape[1]
            return gemm_then_correction(lambda: self.large.apply_gemm(self.layer, x, bias), x, sparse, n_p)
        return self.large.apply_gemm(self.layer, x, bias)


class MarlinDequantKernel(DualMarlinMacheteKernel):
    """Marlin (+ the separate sparse correction) for M < ``min_m`` tokens; from ``min_m`` on, W4 dequantized into a
    shared scratch with the held-out values restored (one Triton kernel over ``triton_w4``'s layout), then one
    cuBLAS GEMM. For checkpoints with a bulk hold-out, where the separate correction's pass over y is what large
    batches pay for (H200, one Llama-2-7B layer, 0.1 % hold-out, same lease, us: M=1024 Machete + correction
    1,277 vs 677; M=4096 5,010 vs 2,567; but M=96-128 239-249 vs 276-278; ``benchmarks/results/w4_paths*.json``).
    Two copies of the W4 weights, like the Marlin / Machete pair (Marlin's and ours), plus a scratch of the largest
    layer in the activation dtype (allocated at the first large batch: vLLM's profiling run)."""

    wraps = "MarlinLinearKernel+dequant/cuBLAS"
    MIN_HOLDOUT = 1e-4  # below this the correction is a few entries per layer and Machete is faster

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        if envs.w4_kernel() not in ("auto", "marlin-deq"):
            return False, f"{envs.W4_KERNEL}={envs.w4_kernel()}"
        if c.holdout < cls.MIN_HOLDOUT:
            return False, f"hold-out {c.holdout:g} < {cls.MIN_HOLDOUT:g} (the separate correction costs little)"
        return cls.machine_can(c)

    @classmethod
    def machine_can(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        """What the pair needs of the machine and the layer: CUDA + Triton, 4-bit codes, a group size both the
        dequantizer and Marlin take, and Marlin itself."""
        from .. import triton_w4

        if c.device_type != "cuda" or not triton_w4.TRITON_OK:
            return False, "CUDA + Triton only"
        if c.kernel_bits != 4:
            return False, "4-bit (and 3-bit) codes only"
        g = c.group_size
        if g not in (-1, 32, 64) and (g <= 0 or g % 128):
            return False, f"group size {g} (32, 64, multiples of 128 or channel-wise)"
        ok, why = MarlinKernel.can_implement(c)
        if not ok:
            return False, f"MarlinKernel: {why}"
        return True, None

    def __init__(self, config: SWLinearConfig, min_m: int | None = None) -> None:
        SWLinearKernel.__init__(self, config)
        self._init_pair(MarlinKernel(config))
        self.min_m = envs.dequant_min_m() if min_m is None else int(min_m)
        self.prep_keys: list[str] = []

    def describe(self) -> str:
        return f"{self._cuda_gemv_name()}Marlin(M<{self.min_m})+dequant/cuBLAS"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Marlin repacks a copy; the checkpoint tensors stay until set_sparse builds our layout from them
        self._small_copy(layer)
        self._layer = weakref.ref(layer)
        _REGISTRY[self.key] = self

    def set_sparse(self, layer: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        SWLinearKernel.set_sparse(self, self.shadow, rows, cols, vals)  # Marlin's separate correction
        self.prep_keys = to_w4_layout(self.config, layer, rows, cols, vals)

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] < self.min_m:
            y = self._small_gemm(x, bias)
            return SWLinearKernel.apply_sparse(self, self.shadow, y, x)
        from ..triton_w4 import w4_mm

        return w4_mm(x, w4_layout(self.layer, self.prep_keys), bias, config={"PATH": "deq"})

    def apply_sparse(self, layer: torch.nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y  # inside run(), on both paths


# Layers with (almost) no held-out entries: Marlin + their few-entry correction beats dequantize + cuBLAS up to 256
# tokens (H200, 7B layer, us, w4_onecopy_s9.md: M = 96 203 vs 297, 128 200 vs 298, 256 319 vs 331)
LIGHT_DEQUANT_MIN_M = 256
# The GEMV over Marlin's layout (correction in its epilogue) is opt-in (SUPERWEIGHT_ONECOPY_CONFIG=gemv=1): H200, 7B
# layer, M = 1: 78.3 us vs Marlin + packed SELL 79.7 (-1.8 %), M = 2 / 4 1.9-3.4x slower (triton_marlin_gemv.py)
GEMV_DEFAULT_MAX_M = 0


class MarlinDequantOneCopyKernel(MarlinDequantKernel):
    """The Marlin + dequantize pair over ONE copy of the W4 weights: Marlin's. Large batches dequantize straight
    from Marlin's repacked tensors (``kernels/triton_marlin_deq.py``; held-out values restored in the same kernel),
    so the layer holds Marlin's weights, a ~4-byte-per-entry restore index of the held-out entries (written into
    the dequantized weights of large batches) and, for small batches, the SELL correction after Marlin over 4-byte
    packed slots (``sparse_layout.build_sell(pack=...)``; the restore index's ``index_correction_`` where K
    needs more than 16 bits) -- weight memory about AWQ's (issue 12: 1.025x at 0.1%), not two W4 copies. The
    default for checkpoints with a bulk hold-out (>= 1e-4) since session 9 (H200, 7B shape, same lease as the
    two-copy pair: weights 4.02 vs 7.48 GiB, batch 1 / 64 equal, batch 8 +4%, saturated -3.5% / -4.2%;
    ``SUPERWEIGHT_W4_KERNEL=marlin-deq`` keeps the two copies). Its first form (gathering dequantizer, index
    correction) was slower (benchmarks/KERNEL_NOTES.md, session 8). ``SUPERWEIGHT_ONECOPY_CONFIG=gemv=N`` serves
    batches of up to N <= 4 tokens with the Triton GEMV over Marlin's tensors that adds the held-out terms in its
    epilogue (``kernels/triton_marlin_gemv.py``; opt-in: H200, M = 1 -1.8 % vs Marlin + SELL, slower from M = 2).
    On CUDA, the batches our CUDA GEMV serves (``SUPERWEIGHT_CUDA_GEMV``, single tokens by default) get the held-out
    terms in that GEMV's epilogue (the default since session 24: 66.4 us a 7B layer vs 71.6 with the SELL kernel
    after it; ``SUPERWEIGHT_ONECOPY_CONFIG=corr=sell`` keeps the separate kernel). With ``SUPERWEIGHT_CUDA_GEMV=2..8``
    only layers with held-out terms take its tensor-core form for 2..8 tokens (``MMA_HELD_ONLY``)."""

    wraps = "MarlinLinearKernel+dequant(Marlin layout)/cuBLAS"
    MMA_HELD_ONLY = True

    @classmethod
    def can_implement(cls, c: SWLinearConfig) -> tuple[bool, str | None]:
        mode = envs.w4_kernel()
        if mode not in ("auto", "marlin-deq1"):
            return False, f"{envs.W4_KERNEL}={mode}"
        if mode == "auto" and c.holdout < cls.MIN_HOLDOUT:
            return False, f"hold-out {c.holdout:g} < {cls.MIN_HOLDOUT:g} (the Marlin / Machete pair is faster)"
        return cls.machine_can(c)

    def __init__(self, config: SWLinearConfig, min_m: int | None = None) -> None:
        super().__init__(config, min_m)
        self._min_m_given = min_m is not None or envs.dequant_min_m_given()
        self.deq: dict[str, torch.Tensor] = {}
        self.sp: dict[str, torch.Tensor] = {}  # packed SELL slots of the small batches' correction
        self.gmaps: dict[str, torch.Tensor] = {}  # the GEMV's index into those slots
        gemv = envs.onecopy_config().get("gemv")
        self.gemv_max_m = GEMV_DEFAULT_MAX_M if gemv is None else gemv[0]

    def describe(self) -> str:
        small = f"GEMV+corr(M<={self.gemv_max_m})/" if self.gemv_max_m else ""
        return f"{small}{self._cuda_gemv_name()}Marlin(M<{self.min_m})+dequant(Marlin layout)/cuBLAS"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # the checkpoint tensors MOVE into Marlin's module (no copy) and are repacked there; the layer keeps its bias
        self._small_copy(layer, move=True)
        self._layer = weakref.ref(layer)
        _REGISTRY[self.key] = self

    def set_sparse(self, layer: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
        from .. import prepare_sparse
        from ..sparse_layout import PACK_MAX_K
        from ..triton_marlin_deq import marlin_deq_layout

        c = self.config
        k_p, n_p = c.partition_shape
        device = tensor(self.shadow, W_SCALE).device
        # the restore index: written into the dequantized weights of large batches (4 bytes an entry)
        self.deq = marlin_deq_layout(rows, cols, vals, n_p, k_p, c.group_size, c.symmetric, c.act_dtype, device)
        # small batches: the SELL correction over 4-byte packed slots (value bits | column); where K needs more
        # than 16 bits, the correction reads the restore index instead
        if not self._min_m_given and rows.numel() < self.MIN_HOLDOUT * n_p * k_p:
            self.min_m = max(self.min_m, LIGHT_DEQUANT_MIN_M)  # Marlin wins up to 256 tokens without a bulk hold-out
        self.sp = {}
        if rows.numel() and k_p <= PACK_MAX_K:
            self.sp = prepare_sparse(rows, cols, vals, n_p, k_p, device, layout="sell", pack=c.act_dtype)
        elif rows.numel():
            self.gemv_max_m = 0  # the GEMV reads packed slots only (16-bit columns)
        if self.sp and self.gemv_max_m:
            from ..triton_marlin_gemv import gemv_maps

            self.gmaps = gemv_maps(self.sp, tensor(self.shadow, W_PACKED).shape[1] // 2)
        self.held, self.cmaps = int(rows.numel()), None
        if self.cgemv is not None and self.sp:  # the CUDA GEMV can add these terms in its epilogue (corr=inside)
            from ..cuda_marlin_gemv import sparse_maps

            self.cmaps = sparse_maps(self.sp, n_p)

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from .. import gemm_then_correction
        from ..triton_marlin_deq import index_correction_, marlin_deq_mm

        if x.shape[0] <= self.gemv_max_m:  # the correction inside the GEMV's epilogue: one kernel
            from ..triton_marlin_gemv import marlin_gemv

            c = self.config
            k_p, n_p = c.partition_shape
            zp = None if c.symmetric else tensor(self.shadow, W_ZERO)
            qm, sc = tensor(self.shadow, W_PACKED), tensor(self.shadow, W_SCALE)
            return marlin_gemv(x, qm, sc, zp, n_p, k_p, c.group_size, c.symmetric, self.sp, self.gmaps, bias)
        if x.shape[0] < self.min_m:
            corr = envs.onecopy_config().get("corr")
            # the default: packed slots the GEMV's epilogue reads (or nothing held out); corr=sell keeps the
            # separate kernel after it (H200, 7B layer, M = 1: 66.4 us inside vs 71.6 after, session 24)
            inside = corr in (None, ("inside",)) and (self.cmaps is not None or not self.held)
            if inside and self.cgemv is not None and x.shape[0] <= self.cgemv_max_m:
                return self._small_gemm(x, bias, self.sp or None, self.cmaps)  # the terms in its epilogue
            if self.sp and (corr is None or corr[0] in ("sell", "inside")):
                n_p = self.config.partition_shape[1]
                return gemm_then_correction(lambda: self._small_gemm(x, bias), x, self.sp, n_p)
            kind = corr if corr and corr[0] not in ("sell", "inside") else None
            return index_correction_(self._small_gemm(x, bias), x, self.deq, config=kind)

        zero = None if self.config.symmetric else tensor(self.shadow, W_ZERO)
        return marlin_deq_mm(x, tensor(self.shadow, W_PACKED), tensor(self.shadow, W_SCALE), zero, self.deq, bias)


def lookup(key: str) -> DualMarlinMacheteKernel:
    d = _REGISTRY.get(key)
    if d is None:
        raise RuntimeError(f"superweight.w4_dual_mm: no layer registered under {key!r}")
    return d


def _dual_op_available() -> bool:
    try:
        torch.ops.superweight.w4_dual_mm.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def dual_mm_impl(x: torch.Tensor, bias: torch.Tensor | None, n: int, key: str) -> torch.Tensor:
    """Body of ``torch.ops.superweight.w4_dual_mm`` (registered with its fake by ``kernels.ops``)."""
    return lookup(key).run(x, bias)
