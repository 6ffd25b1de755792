"""Dequantizing W4 from vLLM's Marlin layout (``kernels/triton_marlin_deq.py``): the one-copy large-batch path.

* CPU: the inverse mapping (``marlin_dequant_reference``) reads back exactly the codes, scales and zero points that
  vLLM's own python reference of the Marlin layout (``marlin_weights`` / ``get_weight_perm``,
  ``marlin_permute_scales``, ``marlin_zero_points``, with ``marlin_padded_nk`` padding) stored, for grouped,
  channel-wise and one-group layers, symmetric and asymmetric, padded and unpadded shapes; shape checks.
* Triton interpreter (``TRITON_INTERPRET=1``, subprocess, ``-k interp_``): the kernel's output is bitwise the
  output of ``triton_w4.dequant_into`` on the same layer (our own layout, held-out values restored), in bf16 and
  fp16, and ``marlin_deq_mm`` matches the float64 reference.
* ``@pytest.mark.gpu``: the same against vLLM's CUDA repack (``gptq_marlin_repack``) on Llama-2-7B shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_w4 import _dense, check_close, make_layer  # noqa: E402
from triton_interp import BoundsGuard, interp_only, not_interp, run_interp_tests  # noqa: E402

from vllm_superweight.kernels import triton_marlin_deq as MD  # noqa: E402
from vllm_superweight.kernels import triton_w4 as T  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def marlin_layout(inputs: dict, n: int, k: int, group: int, device="cpu"):
    """(qm, scale, zero) as vLLM's Marlin kernel holds the layer (python reference of the repack, or the CUDA
    repack itself on a GPU), from the unsigned codes / scales / zero points of ``make_layer``."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_padded_nk,
        marlin_permute_scales,
        marlin_zero_points,
    )
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import get_weight_perm, marlin_weights

    g = group if group and group > 0 else -1
    np_, kp = marlin_padded_nk(n, k, g)
    q = inputs["q"]
    qk = torch.zeros(kp, np_, dtype=torch.int64)
    qk[:k, :n] = q.T
    s = inputs["scales"]
    ng = s.shape[1]
    ngp = kp // g if g > 0 else 1
    sp = torch.zeros(ngp, np_, dtype=s.dtype)
    sp[:ng, :n] = s.T
    if device != "cpu":
        from vllm import _custom_ops as ops

        qg = torch.zeros(kp // 8, np_, dtype=torch.int64)  # GPTQ packing: 8 codes along K per int32
        for i in range(8):
            qg |= qk[i::8] << (4 * i)
        qg = torch.where(qg >= 2**31, qg - 2**32, qg).to(torch.int32).to(device)
        empty = torch.empty(0, dtype=torch.int32, device=device)
        qm = ops.gptq_marlin_repack(qg, perm=empty, size_k=kp, size_n=np_, num_bits=4)
    else:
        qm = marlin_weights(qk, kp, np_, 4, get_weight_perm(4))
    ms = marlin_permute_scales(sp, kp, np_, g)
    mz = None
    if not inputs["sym"]:
        zp = torch.zeros(ngp, np_, dtype=torch.int32)
        zp[:ng, :n] = inputs["zeros"].T.to(torch.int32)
        mz = marlin_zero_points(zp, ngp, np_, 4)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(qm), to(ms), to(mz)


# (n, k, group, sym): unpadded, N padded to 64, K padded to 128 (SmolLM2's 576), channel-wise, one group = K
SHAPES = [
    (192, 256, 128, False),
    (128, 384, 64, True),
    (70, 256, 64, False),
    (64, 576, 64, False),
    (128, 200, -1, False),
    (64, 128, 128, True),
    (96, 192, 32, False),
]


@not_interp
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_reference_inverts_vllm_marlin_layout(shape):
    n, k, group, sym = shape
    inputs, _ = make_layer(n, k, group, sym, seed=n + k)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    got = MD.marlin_dequant_reference(qm, ms, mz, n, k, group if group > 0 else 0, sym)
    assert torch.equal(got, _dense(inputs))  # no held-out entries here: the codes alone


@not_interp
def test_mapping_is_a_bijection_on_each_tile():
    """Every (word, nibble) of a 16 x 64 Marlin tile is hit by exactly one weight (no two weights share a code)."""
    kk = torch.arange(16)[:, None]
    nn = torch.arange(64)[None, :]
    _, w, b = MD.word_nibble(kk, nn)
    slots = (w * 8 + b).flatten()
    assert torch.equal(torch.sort(slots).values, torch.arange(1024))
    for single in (False, True):
        cols = MD.scale_col(torch.arange(128), single)
        assert torch.equal(torch.sort(cols).values, torch.arange(128))
    zw, zb = MD.zero_word_nibble(torch.arange(128))
    assert torch.equal(torch.sort(zw * 8 + zb).values, torch.arange(128))


@not_interp
def test_shape_checks():
    n, k, group = 128, 256, 128
    inputs, _ = make_layer(n, k, group, False, seed=3)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    lay = MD.marlin_deq_layout(None, None, None, n, k, group, False, torch.bfloat16, "cpu")
    c = MD.check_marlin_tensors(qm, ms, mz, lay)
    assert (c["kp"], c["np"], c["single"]) == (256, 128, False)
    with pytest.raises(ValueError, match="zero points"):
        MD.check_marlin_tensors(qm, ms, None, lay)
    with pytest.raises(ValueError, match="scales"):
        MD.check_marlin_tensors(qm, ms[:1], mz, lay)
    wide = MD.marlin_deq_layout(None, None, None, 256, k, group, False, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="does not hold"):
        MD.check_marlin_tensors(qm, ms, mz, wide)
    with pytest.raises(ValueError, match="group"):
        MD.marlin_deq_layout(None, None, None, n, k, 24, False, torch.bfloat16, "cpu")
    assert MD.memory_bytes(lay) == lay["sp_ptr"].numel() * 4 + 4


@not_interp
@pytest.mark.parametrize(
    "which,sym,single,f16,nsb_p",
    [
        ("dequant", False, False, False, 64),
        ("dequant", True, True, True, 64),
        ("correction", False, False, False, 64),  # K <= 16384 at the default sparse block of 256
        ("correction", False, False, True, 128),  # up to 32768 (70B's down_proj: 28672)
    ],
)
def test_compile_sm90_without_spills(which, sym, single, f16, nsb_p):
    """Every launch configuration of both kernels lowers for sm_90 and ptxas takes it without spills (no GPU
    here: this is what the interpreter cannot check)."""
    for config in MD.DEQ_VARIANTS if which == "dequant" else MD.CORR_VARIANTS:
        r = MD.compile_sm90(which, sym=sym, single=single, f16=f16, nsb_p=nsb_p, config=config)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (config, r)
        assert r["regs"] is not None and r["regs"] <= 255, (config, r)


@not_interp
def test_flat_dequant_variants_use_no_shared_memory():
    """Every dequantizer variant keeps one register layout from the loaded words to the stores: no shared memory
    in the sm_90 PTX (st/ld.shared, stmatrix, ldmatrix) and one barrier (before the held-out values). The removed
    plane form reordered through shared memory -- what made dequantizing Marlin's layout slow (H200: 254 us per 7B
    layer vs 164 flat, 149 for our own layout). Removed forms are refused."""
    import re

    def smem_ops(config):
        r = MD.compile_sm90("dequant", keep_asm=True, config=config)
        ptx = str(r["asm"]["ptx"])
        return len(re.findall(r"\.shared\b|\.shared\.", ptx)), len(re.findall(r"\bbar\.sync", ptx)), r["smem"]

    assert MD.DEQ_CONFIG in MD.DEQ_VARIANTS
    assert all(smem_ops(c) == (0, 1, 0) for c in MD.DEQ_VARIANTS), [smem_ops(c) for c in MD.DEQ_VARIANTS]
    lay = MD.marlin_deq_layout(None, None, None, 64, 128, 64, False, torch.bfloat16, "cpu")
    q = torch.zeros(8, 128, dtype=torch.int32)
    with pytest.raises(ValueError, match="form 1 was removed"):
        MD.dequant_marlin_into(q, torch.ones(2, 64, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.int32),
                               lay, config=(128, 4, 1))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Triton interpreter
# ------------------------------------------------------------------------------------------------------------
@not_interp
def test_triton_interpreter_subprocess():
    run_interp_tests(__file__)


# (n, k, group, sym, nnz, heavy, sw, dtype, sp_block)
INTERP_CASES = [
    (192, 256, 128, False, 40, 0, True, torch.bfloat16, 256),
    (70, 256, 64, True, 30, 60, False, torch.bfloat16, 128),
    (64, 576, 64, False, 50, 0, True, torch.float16, 512),
    (128, 200, -1, False, 20, 30, True, torch.bfloat16, 256),
    (64, 128, 128, True, 0, 0, False, torch.bfloat16, 256),
    (96, 192, 32, False, 25, 0, False, torch.float16, 256),
]


@interp_only
@pytest.mark.parametrize("case", range(len(INTERP_CASES)), ids=[str(c) for c in INTERP_CASES])
def test_interp_equals_own_layout_dequant(case):
    n, k, group, sym, nnz, heavy, sw, dtype, spb = INTERP_CASES[case]
    inputs, prep = make_layer(n, k, group, sym, nnz=nnz, heavy=heavy, sw=sw, seed=case, dtype=dtype, sp_block=spb)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    lay = MD.marlin_deq_layout(
        inputs["rows"], inputs["cols"], inputs["vals"], n, k, group, sym, dtype, "cpu", sp_block=spb
    )
    want = T.dequant_into(prep)
    for config in (MD.DEQ_CONFIG, (128, 4), (256, 8, 2)):  # tile widths / warps (a third field 2 is accepted)
        got = MD.dequant_marlin_into(qm, ms, mz, lay, config=config)
        assert got.shape == (k, n) and got.dtype == dtype
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (case, config)
    if nnz or sw:  # the restored values are really there
        r, c = inputs["rows"], inputs["cols"]
        assert torch.equal(got[c, r].float(), inputs["vals"].to(dtype).float())


# (n, k, group, sym, nnz, dtype): shapes Humming keeps unpadded (N % 64, K % 16; its N padding to 256 aside)
HUMMING_CASES = [
    (192, 256, 128, False, 40, torch.bfloat16),
    (64, 128, 128, True, 0, torch.bfloat16),  # one group spanning K: Humming keeps the grouped scale order
    (128, 512, 64, False, 30, torch.float16),
]


@interp_only
@pytest.mark.parametrize("case", range(len(HUMMING_CASES)), ids=[str(c) for c in HUMMING_CASES])
def test_interp_dequantizes_hummings_tensors(case):
    """``layout=`` Humming's sm_90 / other-GPU tensors (``test_cuda_marlin_gemv._humming_layout``, the transcription
    of its repack): bitwise the same weights as our own layout's dequantizer on the same layer (held-out values
    restored), and the host reference reads them back."""
    from test_cuda_marlin_gemv import _humming_layout

    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    n, k, group, sym, nnz, dtype = HUMMING_CASES[case]
    inputs, prep = make_layer(n, k, group, sym, nnz=nnz, heavy=0, sw=False, seed=case, dtype=dtype)
    lay = MD.marlin_deq_layout(inputs["rows"], inputs["cols"], inputs["vals"], n, k, group, sym, dtype, "cpu")
    want = T.dequant_into(prep)
    for layout, sm90 in ((CG.LAYOUT_HUMMING_SM90, True), (CG.LAYOUT_HUMMING, False)):
        hw, hs, hz = _humming_layout(inputs["q"], inputs["scales"].to(dtype), inputs["zeros"], sm90)
        got = MD.dequant_marlin_into(hw, hs, hz, lay, layout=layout)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (case, layout)
        ref = MD.marlin_dequant_reference(hw, hs, hz, n, k, group, sym, layout=layout)
        assert torch.equal(ref, MD.marlin_dequant_reference(*marlin_layout(inputs, n, k, group), n, k, group, sym))
        if layout == CG.LAYOUT_HUMMING_SM90:  # the flag matters: Marlin's reading of Humming's words is wrong
            wrong = MD.dequant_marlin_into(hw, hs, hz, lay)
            assert not torch.equal(wrong.view(torch.int16), want.view(torch.int16))


# (n, k, group, sym): K not a multiple of 128 that Marlin keeps unpadded (N % 128 == 0, K % 64 == 0: SmolLM2's
# gate_up 3072 x 576 and q/k/v 960 -> 1024 x 576), its g32 kin, and K padded by Marlin (576 -> 640) for contrast
BOUNDS_CASES = [(128, 576, 64, False), (128, 576, 64, True), (256, 320, 32, False), (64, 576, 64, False)]


@interp_only
@pytest.mark.parametrize("case", BOUNDS_CASES, ids=str)
def test_interp_dequant_reads_nothing_past_its_tensors(case):
    """Every address the dequantizer (Marlin's and Humming's readings) loads or stores lies inside its tensors.
    Session 27: in the last 128-row block of K = 576 (g64) it reloaded group 9's scales and zero points -- a row
    past the end of both (unused: the stores are masked by K) -- and an engine serving the real SmolLM2 checkpoint on
    the H200 died of an illegal memory access in its 16,384-token profile run with, by where the allocator had put
    things, exactly such a read. The output stays bitwise our own layout's."""
    from test_cuda_marlin_gemv import _humming_layout

    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    n, k, group, sym = case
    inputs, prep = make_layer(n, k, group, sym, nnz=30, heavy=0, sw=True, seed=4, dtype=torch.bfloat16)
    lay = MD.marlin_deq_layout(inputs["rows"], inputs["cols"], inputs["vals"], n, k, group, sym, torch.bfloat16, "cpu")
    want = T.dequant_into(prep)
    hw, hs, hz = _humming_layout(inputs["q"], inputs["scales"].to(torch.bfloat16), inputs["zeros"], True)
    for tensors, layout in ((marlin_layout(inputs, n, k, group), 0), ((hw, hs, hz), CG.LAYOUT_HUMMING_SM90)):
        out = torch.empty(n * k, dtype=torch.bfloat16)
        with BoundsGuard([*tensors, out, *lay.values()]) as guard:
            got = MD.dequant_marlin_into(*tensors, lay, out, layout=layout)
        assert not guard.bad, (case, layout, guard.bad)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (case, layout)


@interp_only
@pytest.mark.parametrize("config", MD.DEQ_VARIANTS, ids=str)
def test_interp_every_dequant_config(config):
    """Every launch configuration the benchmark may choose gives bitwise the same weights (N not a multiple of
    the tile width, two groups per K block, held-out values, K not a multiple of 16 rows' blocks)."""
    n, k, group, sym = 200, 320, 64, False
    inputs, prep = make_layer(n, k, group, sym, nnz=40, heavy=30, sw=True, seed=3)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    lay = MD.marlin_deq_layout(inputs["rows"], inputs["cols"], inputs["vals"], n, k, group, sym, torch.bfloat16, "cpu")
    got = MD.dequant_marlin_into(qm, ms, mz, lay, config=config)
    assert torch.equal(got.view(torch.int16), T.dequant_into(prep).view(torch.int16)), config


@interp_only
@pytest.mark.parametrize("config", MD.CORR_VARIANTS, ids=str)
def test_interp_every_correction_config(config):
    """Every correction kernel / configuration: y + x S^T within one rounding, rows without entries untouched;
    a heavy row (many entries in one K block) takes several steps of the 2-D kernel."""
    n, k, m = 80, 1408, 3
    inputs, _ = make_layer(n, k, 64, False, nnz=900, heavy=120, sw=True, seed=4)
    r, c, v = inputs["rows"], inputs["cols"], inputs["vals"]
    lay = MD.marlin_deq_layout(r, c, v, n, k, 64, False, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y0 = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    y = MD.index_correction_(y0.clone(), x, lay, config=config)
    s = torch.zeros(n, k, dtype=torch.float64)
    s.index_put_((r, c), v.double(), accumulate=True)
    ref = y0.double() + x.double() @ s.T
    assert ((y.double() - ref).abs() <= 2.0**-7 * ref.abs() + 1e-6).all(), config
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[r] = False
    assert torch.equal(y[:, untouched], y0[:, untouched])


@interp_only
def test_interp_mm_matches_reference():
    n, k, group = 70, 256, 64
    inputs, _ = make_layer(n, k, group, False, nnz=40, heavy=20, sw=True, seed=11)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    lay = MD.marlin_deq_layout(
        inputs["rows"], inputs["cols"], inputs["vals"], n, k, group, False, torch.bfloat16, "cpu"
    )
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(19, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    y = MD.marlin_deq_mm(x, qm, ms, mz, lay, b)
    assert y.shape == (19, n)
    check_close(y, x, inputs, b, tag="marlin_deq_mm")


@interp_only
@pytest.mark.parametrize(
    "n,k,m,dtype,spb,value_dtype,nnz,br",
    [
        (70, 256, 1, torch.bfloat16, 256, None, 60, 16),
        (96, 576, 17, torch.float16, 512, None, 60, 32),
        (200, 384, 5, torch.bfloat16, 128, torch.float32, 60, 16),  # values the act dtype cannot hold: 2-3 terms
        (48, 1408, 3, torch.bfloat16, 256, None, 3000, 16),  # many entries per tile: several chunks over 6 blocks
    ],
)
def test_interp_index_correction(n, k, m, dtype, spb, value_dtype, nnz, br):
    """The small-batch correction from the restore index: y + x S^T with fp32 accumulation, one rounding, rows
    without entries left bitwise as they were."""
    inputs, _ = make_layer(n, k, 64, False, nnz=nnz, heavy=40, sw=True, seed=m, dtype=dtype, value_dtype=value_dtype)
    r, c, v = inputs["rows"], inputs["cols"], inputs["vals"]
    lay = MD.marlin_deq_layout(r, c, v, n, k, 64, False, dtype, "cpu", sp_block=spb)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y0 = torch.randn(m, n, generator=gen).to(dtype)
    y = y0.clone()
    with BoundsGuard([x, y, *lay.values()]) as guard:  # (K = 576 / 1408: not multiples of 128)
        MD.index_correction_(y, x, lay, br=br)
    assert not guard.bad, guard.bad
    s = torch.zeros(n, k, dtype=torch.float64)
    s.index_put_((r, c), v.double(), accumulate=True)
    ref = y0.double() + x.double() @ s.T
    tol = 2.0**-7 * ref.abs() + 1e-6
    assert ((y.double() - ref).abs() <= tol).all()
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[r] = False
    if untouched.any():
        assert torch.equal(y[:, untouched], y0[:, untouched])
    assert not torch.equal(y[:, ~untouched], y0[:, ~untouched])


class PyMarlin:
    """Test double for vLLM's Marlin on a CPU (its CUDA repack and GEMM cannot run here): the repack by vLLM's own
    python reference of the layout (``marlin_layout``), the GEMM over the weights read back from it."""

    def __init__(self, n: int, k: int, group: int, sym: bool) -> None:
        self.n, self.k, self.group, self.sym = n, k, group, sym

    def process_weights_after_loading(self, shadow: torch.nn.Module) -> None:
        from vllm_superweight.kernels.linear.base import replace_parameter

        n, k, g = self.n, self.k, self.group
        codes = T._unpack_ct(shadow.weight_packed.data, n, k, 1)
        s = shadow.weight_scale.data
        z = None if self.sym else T._unpack_ct(shadow.weight_zero_point.data, n, s.shape[1], 0)
        inputs = {"q": codes, "scales": s, "zeros": z, "sym": self.sym}
        qm, ms, mz = marlin_layout(inputs, n, k, g)
        replace_parameter(shadow, "weight_packed", qm)
        replace_parameter(shadow, "weight_scale", ms)
        if mz is not None:
            replace_parameter(shadow, "weight_zero_point", mz)

    def apply_gemm(self, shadow, x, bias):
        zero = None if self.sym else shadow.weight_zero_point
        w = MD.marlin_dequant_reference(
            shadow.weight_packed, shadow.weight_scale, zero, self.n, self.k, max(self.group, 0), self.sym
        )
        y = x.double() @ w.T
        return (y if bias is None else y + bias.double()).to(x.dtype)


@interp_only
@pytest.mark.parametrize("group,sym,gemv", [(64, False, 0), (-1, True, 0), (64, False, 4), (-1, True, 2)])
def test_interp_one_copy_kernel_class(monkeypatch, group, sym, gemv):
    """MarlinDequantOneCopyKernel: the checkpoint tensors MOVE into Marlin's module (the layer keeps no W4 tensor of
    its own: one copy); small batches run Marlin + the separate correction (or, ``gemv=MAX_M``, up to MAX_M tokens
    the GEMV over Marlin's tensors with the correction in its epilogue), large ones dequantize from Marlin's
    tensors with the held-out values restored; all match the float64 reference of the restored weights, with
    bias."""
    monkeypatch.setenv("SUPERWEIGHT_ONECOPY_CONFIG", f"gemv={gemv}")
    from vllm_linear import pack_int32

    from vllm_superweight.kernels.linear import SWLinearConfig
    from vllm_superweight.kernels.linear import weight_only as WO

    n, k = 96, 256
    inputs, _ = make_layer(n, k, group, sym, nnz=30, heavy=10, sw=True, seed=7)
    cfg = SWLinearConfig(
        prefix="t.one_copy",
        bits=4,
        symmetric=sym,
        group_size=group,
        activations="none",
        act_dtype=torch.bfloat16,
        full_shape=(k, n),
        partition_shape=(k, n),
        device_type="cpu",
        holdout=1e-3,
    )
    layer = torch.nn.Module()
    P = torch.nn.Parameter
    layer.register_parameter("weight_packed", P(pack_int32(inputs["q"], 4, 1), requires_grad=False))
    layer.register_parameter("weight_scale", P(inputs["scales"].clone(), requires_grad=False))
    if not sym:
        layer.register_parameter("weight_zero_point", P(pack_int32(inputs["zeros"], 4, 0), requires_grad=False))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    layer.register_parameter("bias", P(bias.clone(), requires_grad=False))
    monkeypatch.setattr(WO, "MarlinKernel", lambda c: PyMarlin(n, k, group, sym))
    kd = WO.MarlinDequantOneCopyKernel(cfg, min_m=8)
    kd.process_weights_after_loading(layer)
    assert not {"weight_packed", "weight_scale", "weight_zero_point"} & set(layer._parameters)
    assert kd.shadow.weight_packed.shape == (k // 16, 2 * 128)  # N padded to 128 in Marlin's copy
    kd.set_sparse(layer, inputs["rows"], inputs["cols"], inputs["vals"])
    from vllm_superweight.kernels.sparse_layout import packed_dtype

    assert packed_dtype(kd.sp) == torch.bfloat16  # small batches: the packed SELL correction
    assert bool(kd.gmaps) == bool(gemv) and kd.describe().startswith("GEMV" if gemv else "Marlin")
    if gemv:  # the GEMV serves these batches: Marlin (the test double) must not run
        monkeypatch.setattr(kd.small, "apply_gemm", None)
        gen = torch.Generator().manual_seed(3)
        for m in range(1, gemv + 1):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            check_close(kd.apply_weights(layer, x, layer.bias), x, inputs, bias, tag=f"GEMV M={m}")
        return
    gen = torch.Generator().manual_seed(2)
    for m in (3, 8, 21):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        y = kd.apply_weights(layer, x, layer.bias)
        check_close(y, x, inputs, bias, tag=f"M={m}")
    monkeypatch.setenv("SUPERWEIGHT_ONECOPY_CONFIG", "corr=2d:16:64:2")  # the restore index's correction instead
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
    check_close(kd.apply_weights(layer, x, layer.bias), x, inputs, bias, tag="index correction")


# ------------------------------------------------------------------------------------------------------------
# GPU: vLLM's CUDA repack
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "shape",
    [
        (4096, 4096, 128, False, 1e-3),
        (11008, 4096, 128, True, 1e-3),
        (4096, 11008, -1, False, 1e-3),
        (576, 576, 64, False, 1e-3),  # SmolLM2's shape: Marlin pads K to 640
        (4096, 4096, 128, False, 0.0),  # no hold-out: nothing restored, nothing corrected
    ],
)
def test_gpu_vs_vllm_repack(shape):
    """On vLLM's CUDA repack: the dequantized weights bitwise those of our own layout's dequantizer, the dense GEMM
    over them for M = 300 / 4096, and Marlin's output + the index correction for M = 1 / 7 / 95, all against the
    float reference of the restored weights."""
    n, k, group, sym, h = shape
    inputs, prep = make_layer(n, k, group, sym, nnz=int(n * k * h), sw=h > 0, seed=1, device="cuda")
    qm, ms, mz = marlin_layout(inputs, n, k, group, device="cuda")
    lay = MD.marlin_deq_layout(inputs["rows"], inputs["cols"], inputs["vals"], n, k, group, sym, torch.bfloat16, "cuda")
    want = T.dequant_into(prep)
    for config in (MD.DEQ_CONFIG, (128, 4), (256, 8)):  # the default and two other tile widths: bitwise
        got = MD.dequant_marlin_into(qm, ms, mz, lay, config=config)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), config
    for m in (300, 4096):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = MD.marlin_deq_mm(x, qm, ms, mz, lay)
        check_close(y, x, inputs, tag=f"deq M={m}")
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        apply_gptq_marlin_linear,
        marlin_make_workspace_new,
    )
    from vllm.scalar_type import scalar_types

    empty = torch.empty(0, dtype=torch.int32, device="cuda")
    for m in (1, 7, 95):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = apply_gptq_marlin_linear(
            input=x,
            weight=qm,
            weight_scale=ms,
            weight_zp=empty if sym else mz,
            g_idx=empty,
            g_idx_sort_indices=empty,
            workspace=marlin_make_workspace_new(x.device),
            wtype=scalar_types.uint4b8 if sym else scalar_types.uint4,
            input_size_per_partition=k,
            output_size_per_partition=n,
            is_k_full=True,
        )
        y0 = y.clone()
        MD.index_correction_(y, x, lay)
        check_close(y, x, inputs, tag=f"marlin+index M={m}")
        if h:
            assert not torch.equal(y, y0)
            import vllm_superweight.kernels as K

            sp = K.prepare_sparse(inputs["rows"], inputs["cols"], inputs["vals"], n, k, "cuda", layout="sell",
                                  pack=torch.bfloat16)  # fmt: skip
            y2 = y0.clone()
            K.sparse_correction(y2, x, sp)  # the packed SELL correction (the one-copy pair's default)
            check_close(y2, x, inputs, tag=f"marlin+packed sell M={m}")


def test_onecopy_config_env(monkeypatch):
    """SUPERWEIGHT_ONECOPY_CONFIG (the micro-benchmark's pick) parses into the launch configurations; a malformed
    value is refused with the expected form, not ignored."""
    from vllm_superweight import envs

    monkeypatch.setenv(envs.ONECOPY_CONFIG, "deq=512:4,corr=seq:16:32:0")
    assert envs.onecopy_config() == {"deq": (512, 4), "corr": ("seq", 16, 32, 0)}
    monkeypatch.setenv(envs.ONECOPY_CONFIG, "deq=128:4:2")
    assert envs.onecopy_config() == {"deq": (128, 4, 2)}
    monkeypatch.setenv(envs.ONECOPY_CONFIG, "corr=2d:16:64:2")
    assert envs.onecopy_config() == {"corr": ("2d", 16, 64, 2)}
    monkeypatch.setenv(envs.ONECOPY_CONFIG, "deq=64:2:2,corr=sell,gemv=4")
    assert envs.onecopy_config() == {"deq": (64, 2, 2), "corr": ("sell",), "gemv": (4,)}
    for bad in ("deq=128", "corr=fast:16:64:2", "deq=a:b", "warp=4", "gemv=5", "gemv=x", "gemv=1:2"):
        monkeypatch.setenv(envs.ONECOPY_CONFIG, bad)
        with pytest.raises(ValueError, match="expected deq="):
            envs.onecopy_config()
    monkeypatch.delenv(envs.ONECOPY_CONFIG)
    assert envs.onecopy_config() == {}


@not_interp
@pytest.mark.parametrize(
    "nnz,env,arg,want", [(0, None, None, 256), (3, None, None, 256), (40, None, None, 96), (0, "64", None, 64),
                         (0, None, 8, 8)],
)  # fmt: skip
def test_one_copy_threshold_by_hold_out(monkeypatch, nnz, env, arg, want):
    """The one-copy pair keeps Marlin up to 256 tokens for layers without a bulk hold-out (Marlin + a few entries
    beats dequantize + cuBLAS there: H200, 7B layer, M = 128: 200 vs 298 us), the dequantize path from
    ``min_m`` on where the hold-out is >= 1e-4; an explicit threshold (argument or SUPERWEIGHT_DEQUANT_MIN_M)
    is never changed."""
    from vllm_linear import pack_int32

    from vllm_superweight.kernels.linear import SWLinearConfig
    from vllm_superweight.kernels.linear import weight_only as WO

    if env is None:
        monkeypatch.delenv("SUPERWEIGHT_DEQUANT_MIN_M", raising=False)
    else:
        monkeypatch.setenv("SUPERWEIGHT_DEQUANT_MIN_M", env)
    n, k = 128, 256  # 1e-4 of 32768 weights: 3.3 entries
    inputs, _ = make_layer(n, k, 64, False, nnz=nnz, seed=3)
    cfg = SWLinearConfig(
        prefix="t.threshold", bits=4, symmetric=False, group_size=64, activations="none", act_dtype=torch.bfloat16,
        full_shape=(k, n), partition_shape=(k, n), device_type="cpu", holdout=1e-3,
    )  # fmt: skip
    layer = torch.nn.Module()
    P = torch.nn.Parameter
    layer.register_parameter("weight_packed", P(pack_int32(inputs["q"], 4, 1), requires_grad=False))
    layer.register_parameter("weight_scale", P(inputs["scales"].clone(), requires_grad=False))
    layer.register_parameter("weight_zero_point", P(pack_int32(inputs["zeros"], 4, 0), requires_grad=False))
    monkeypatch.setattr(WO, "MarlinKernel", lambda c: PyMarlin(n, k, 64, False))
    kd = WO.MarlinDequantOneCopyKernel(cfg, min_m=arg)
    kd.process_weights_after_loading(layer)
    empty = torch.zeros(0, dtype=torch.int64)
    r, c, v = (inputs["rows"], inputs["cols"], inputs["vals"]) if nnz else (empty, empty, torch.zeros(0))
    kd.set_sparse(layer, r, c, v)
    assert kd.min_m == want and f"Marlin(M<{want})" in kd.describe()
