"""The small-batch W8A8 GEMM with the outlier channels in its epilogue (``kernels/triton_int8_mm.py``) and its
knob (``SUPERWEIGHT_W8A8_TRITON``).

* CPU: the knob's parsing, the per-M configuration lookup, argument checks.
* sm_90 ahead-of-time compile (no GPU): every M tile and the configurations the micro-benchmark sweeps lower
  without spills; the weight stream goes through 16-byte asynchronous copies.
* Triton interpreter (``-k interp_``): y equals the float64 reference (int8 GEMM x scales + outlier product + bias)
  within one rounding of y's dtype, per-token and per-tensor scales, ragged K / N / M, S = 0..5.
* ``@pytest.mark.gpu``: the W8A8 kernel class routed through the Triton GEMM for small batches and CUTLASS above,
  against the float reference and against the CUTLASS path, eagerly, replayed from a CUDA graph and compiled.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from triton_interp import interp_only, not_interp, run_interp_tests  # noqa: E402

from vllm_superweight import envs  # noqa: E402
from vllm_superweight.kernels import triton_int8_mm as TI  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# one ulp of y's dtype (the interpreter may truncate when it rounds)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-22}


def make_case(m, n, k, s, bias, per_token, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sa = torch.rand(m if per_token else 1, 1, generator=g) * 1e-2 + 1e-4
    sb = torch.rand(n, 1, generator=g) * 1e-2 + 1e-4
    xo = (torch.randn(m, s, generator=g) * 300).to(dtype)
    wo = (torch.randn(s, n, generator=g) * 0.05).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    args = [t.to(device) if t is not None else None for t in (xq, w, sa, sb, xo, wo, b)]
    return args


def reference(xq, w, sa, sb, xo, wo, b):
    """float64 on the operands' device (the GPU's fp64 units for 7B shapes), returned on the CPU."""
    d = lambda t: t.double()  # noqa: E731
    scale = d(sa).reshape(-1, 1) * d(sb).reshape(1, -1)
    ref = (d(xq) @ d(w).T) * scale + d(xo) @ d(wo)
    mag = (d(xq).abs() @ d(w).abs().T) * scale + d(xo).abs() @ d(wo).abs()
    if b is not None:
        ref = ref + d(b)
        mag = mag + d(b).abs()
    return ref.cpu(), mag.cpu()


def assert_close(y, ref, mag, dtype, tag=""):
    y = y.double().cpu()
    tol = ULP[dtype] * ref.abs() + 1e-5 * mag + 1e-30
    bad = (y - ref).abs() > tol
    assert not torch.isnan(y).any(), tag
    assert not bad.any(), (tag, int(bad.sum()), float(((y - ref).abs() / (mag + 1e-30)).max()))


# ------------------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------------------
@not_interp
def test_knob_parsing_and_config_lookup(monkeypatch):
    monkeypatch.delenv(envs.W8A8_TRITON, raising=False)  # unset: on for Hopper (measured there), off elsewhere
    d, d_out = envs.DEFAULT_W8A8_TRITON_MAX_M, envs.DEFAULT_W8A8_TRITON_OUT_MAX_M
    assert envs.w8a8_triton(hopper=True) == (d, {}, d_out) and 0 < d < d_out
    assert envs.w8a8_triton(hopper=False) == (0, {}, 0) and envs.graph_knobs()[envs.W8A8_TRITON] == "default"
    monkeypatch.setenv(envs.W8A8_TRITON, "0")
    assert envs.w8a8_triton(hopper=True) == (0, {}, 0) and envs.graph_knobs()[envs.W8A8_TRITON] == "0"
    raw = "32@1:bn=16,bk=512,warps=4,stages=6;16:bn=64,swap=1"
    monkeypatch.setenv(envs.W8A8_TRITON, raw)
    max_m, table, out_max_m = envs.w8a8_triton()
    assert max_m == 32 and table == {1: dict(bn=16, bk=512, warps=4, stages=6), 16: dict(bn=64, swap=1)}
    assert out_max_m == 32  # no own bound for layers with outlier channels: MAX_M
    assert envs.graph_knobs()[envs.W8A8_TRITON] == raw  # a restart with other tiles recompiles
    assert TI.config_for(1, 4096, 4096, table) == TI.Int8MMConfig(16, 512, 4, 6)
    base = TI.default_config(8, 4096, 4096)
    assert TI.config_for(8, 4096, 4096, table) == TI.Int8MMConfig(64, base.bk, base.warps, base.stages, swap=1)
    assert TI.config_for(17, 4096, 4096, table) == TI.default_config(17, 4096, 4096)  # no bucket covers 17
    # layers with outlier channels get their own bound; bm (tokens a program) and tma in the table
    monkeypatch.setenv(envs.W8A8_TRITON, "16/256@16:bn=32;256:bn=64,bk=128,swap=1,bm=128,tma=1")
    max_m, table, out_max_m = envs.w8a8_triton()
    assert (max_m, out_max_m) == (16, 256) and table[256] == dict(bn=64, bk=128, swap=1, bm=128, tma=1)
    assert TI.config_for(200, 12288, 4096, table) == TI.Int8MMConfig(64, 128, 4, 4, swap=1, bm=128, tma=1)
    assert TI.config_for(200, 12288, 4096, table).key() == "bn=64,bk=128,warps=4,stages=4,swap=1,bm=128,tma=1"
    # above 32 tokens the default puts 64 weight rows on the MMA's M side (session 43's H100 sweep)
    assert TI.default_config(64, 12288, 4096) == TI.Int8MMConfig(64, 128, 4, 4, swap=1)
    # the measured defaults grow K per step with M, then narrow it (sweep on an H200)
    assert [TI.default_config(m, 4096, 4096).bk for m in (1, 16, 32, 64)] == [256, 256, 512, 128]
    bads = ("x", "16@1:bq=3", "16@1:bk=48", "16@0:bn=16", "-1", "16@1:swap=2", "16@1:bn=0", "16/x", "16/-1")
    for bad in (*bads, "16@1:bm=24", "16@1:bm=8", "16@1:tma=2", "16@1:ws=2"):
        monkeypatch.setenv(envs.W8A8_TRITON, bad)
        with pytest.raises(ValueError, match=envs.W8A8_TRITON):
            envs.w8a8_triton()


@not_interp
def test_argument_checks():
    xq, w, sa, sb, xo, wo, _ = make_case(2, 32, 64, 2, False, True)
    with pytest.raises(ValueError, match="same K"):
        TI.int8_mm_outliers(xq, w[:, :32], sa, sb, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="unit column stride"):
        TI.int8_mm_outliers(xq, w, sa, sb, xo.t().contiguous().t(), wo, None, torch.bfloat16)
    y = TI.int8_mm_outliers(xq[:0], w, sa[:0], sb, None, None, None, torch.bfloat16)
    assert y.shape == (0, 32)


@not_interp
def test_compile_sm90_without_spills():
    cfgs = [TI.default_config(1, 4096, 4096), *TI.SWEEP]
    for m in (1, 16, 32, 64):
        for cfg in cfgs:
            for s, bias, even in ((0, False, True), (3, True, False)):
                r = TI.compile_sm90(m=m, config=cfg, s=s, bias=bias, even_k=even)
                assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (m, cfg, r["regs"])
                ptx = str(r["asm"]["ptx"])
                # the tiles stream through 16-byte asynchronous copies (8-byte ones only for a tiny x tile)
                copies = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]+\], \[[^]]+\], (0x\w+)", ptx)
                assert "0x10" in copies and set(copies) <= {"0x10", "0x8"}, (m, cfg, set(copies))
                # swapped operands put the weight tile on the MMA's M side: Hopper's wgmma from 64 rows
                if cfg.swap:
                    assert "wgmma" in ptx, (m, cfg)


@not_interp
def test_compile_sm90_large_batch_sweep():
    """The 33-512 token configurations (``SWEEP_BIG``): no spills, wgmma; 16-byte copies, or with ``tma`` only the
    tensor memory accelerator's bulk copies (one per tile per stage) and no per-thread copies."""
    for cfg in TI.SWEEP_BIG:
        for s, bias, even in ((1, False, True), (3, True, False)):
            r = TI.compile_sm90(m=64, config=cfg, s=s, bias=bias, even_k=even)
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (cfg, r["regs"])
            ptx = str(r["asm"]["ptx"])
            assert "wgmma" in ptx, cfg
            bulk = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
            thread_copies = re.findall(r"cp\.async\.\w+\.shared\.global", ptx)
            if cfg.tma:
                assert bulk >= 2 and not thread_copies, (cfg, bulk, len(thread_copies))
            else:
                assert not bulk and thread_copies, cfg
            # warp specialization: producer and consumer warps trade registers (setmaxnreg) where it splits 4 warps
            assert ("warp_specialize" in str(r["asm"]["ttgir"])) is bool(cfg.ws), cfg


# ------------------------------------------------------------------------------------------------------------
# Triton interpreter
# ------------------------------------------------------------------------------------------------------------
@not_interp
def test_triton_interpreter_subprocess():
    run_interp_tests(__file__)


# (m, n, k, s, bias, per_token, dtype)
INTERP_CASES = [
    (1, 70, 96, 0, False, True, torch.bfloat16),
    (3, 33, 100, 2, True, True, torch.bfloat16),
    (17, 64, 256, 1, False, False, torch.float16),
    (40, 50, 64, 5, True, True, torch.bfloat16),
    (5, 48, 320, 3, False, True, torch.float16),
    (2, 16, 32, 1, True, False, torch.bfloat16),
]


@interp_only
@pytest.mark.parametrize("case", range(len(INTERP_CASES)), ids=[str(c) for c in INTERP_CASES])
def test_interp_matches_reference(case):
    m, n, k, s, bias, per_token, dtype = INTERP_CASES[case]
    xq, w, sa, sb, xo, wo, b = make_case(m, n, k, s, bias, per_token, dtype, seed=case)
    ref, mag = reference(xq, w, sa, sb, xo, wo, b)
    cfgs = [TI.Int8MMConfig(16, 32, 4, 1), TI.Int8MMConfig(32, 64, 4, 2), TI.Int8MMConfig(32, 64, 4, 2, 1), None]
    # several M tiles a weight tile (bm 16 < M), and TMA descriptors (K % 16 == 0; else the pointer path)
    cfgs += [TI.Int8MMConfig(32, 64, 4, 2, 1, bm=16), TI.Int8MMConfig(64, 32, 4, 2, 1, bm=32, tma=1)]
    cfgs += [TI.Int8MMConfig(64, 32, 4, 2, 1, bm=32, tma=1, ws=1)]
    for cfg in cfgs:
        y = TI.int8_mm_outliers(xq, w, sa, sb, xo if s else None, wo if s else None, b, dtype, cfg)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close(y, ref, mag, dtype, tag=(INTERP_CASES[case], cfg))
    if s == 1 and m > 1:
        # one outlier column keeps whatever stride its size-1 dim had (torch's contiguity ignores it; H100 s50: a
        # cond's branch was handed stride M there): taken as it is, the same y
        xo_t = xo.as_strided((m, 1), (1, m))
        assert xo_t.stride(1) != 1 and xo_t.is_contiguous()
        y = TI.int8_mm_outliers(xq, w, sa, sb, xo_t, wo, b, dtype)
        assert_close(y, ref, mag, dtype, tag=(INTERP_CASES[case], "stride"))


# ------------------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
@pytest.mark.parametrize("shape", [(4096, 4096), (12288, 4096), (4096, 11008), (22016, 4096), (1000, 1200)])
def test_gpu_kernel_vs_reference(shape):
    n, k = shape
    for m in (1, 2, 7, 16, 33, 64, 300):
        for s, bias in ((0, False), (1, True), (4, False)):
            xq, w, sa, sb, xo, wo, b = make_case(m, n, k, s, bias, True, seed=m + s, device="cuda")
            ref, mag = reference(xq, w, sa, sb, xo, wo, b)
            # the default, plain and swapped operands, and large-batch tiles (two M tiles at 33 / 64; TMA)
            cfgs = (None, TI.SWEEP[1], TI.SWEEP[-1], TI.Int8MMConfig(64, 128, 8, 4, swap=1, bm=32, tma=1))
            for cfg in cfgs if m < 200 else (None, *TI.SWEEP_BIG[-6:]):
                y = TI.int8_mm_outliers(xq, w, sa, sb, xo if s else None, wo if s else None, b, torch.bfloat16, cfg)
                assert_close(y, ref, mag, torch.bfloat16, tag=(shape, m, s, cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
@pytest.mark.parametrize(
    "knob,out_max",
    [
        ("32@1:bn=16,bk=512;32:bn=32,bk=256,stages=3", 32),
        ("32/256@1:bn=16,bk=512;32:bn=32,bk=256,stages=3;64:bn=64,bk=128,swap=1,tma=1;256:bn=64,swap=1,bm=128", 256),
    ],
    ids=["one-bound", "outlier-layers-to-256"],
)
def test_gpu_w8a8_layer_routes_small_batches_through_triton(monkeypatch, knob, out_max):
    """SUPERWEIGHT_W8A8_TRITON=32[/256]: the W8A8 layer (zero point on) runs M <= 32 through the Triton GEMM --
    up to 256 where the layer has outlier channels and the knob says so -- larger M through CUTLASS; both match
    the float reference of the dequantized weights with the outlier channels in 16 bit, eagerly, from a CUDA graph
    and compiled (fullgraph), with and without a bias, with 0, 1 and 3 outliers."""
    from test_gpu_kernels import _cfg, _rel, _vl

    VL = _vl()
    VL.single_process_tp()
    from vllm_superweight.kernels.linear import w8a8 as W8

    monkeypatch.setenv(envs.W8A8_TRITON, knob)
    dev, n, k = "cuda", 4096, 4096
    w = VL.random_w8(n, k, dev, seed=5)
    w_ref = VL.dequant_w8(w)
    c = _cfg(torch.bfloat16, acts="int8-token", bits=8, group=-1, sym=True, k=k, n=n)
    calls = {"tri": 0}
    real = TI.int8_mm_outliers

    def counting(*a, **kw):
        calls["tri"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(TI, "int8_mm_outliers", counting)
    for outl in (torch.tensor([], dtype=torch.long), torch.tensor([1000]), torch.tensor([5, 1000, 3001])):
        layer = torch.nn.Module()
        layer.register_parameter("weight_packed", torch.nn.Parameter(w["w"].clone(), requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(w["scale"].clone(), requires_grad=False))
        kern = W8.CutlassSplitInt8Kernel(c)
        assert kern.tri_max_m == 32 and kern.tri_max_m_out == out_max
        kern.set_outliers(layer, outl)
        bound = out_max if outl.numel() else 32
        assert kern.tri_bound == bound and f"M<={bound}: triton int8 GEMM" in kern.describe()
        kern.process_weights_after_loading(layer)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        for m in (1, 5, 32, 33, 200, 256, 257):
            before = calls["tri"]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            if outl.numel():
                x[:, 1000] *= 2000.0
            for b in (None, bias):
                ref = x.float() @ w_ref.T + (0 if b is None else b.float())
                y = kern.apply_weights(layer, x, b)
                assert y.shape == (m, n) and _rel(y, ref) < 2e-2, (outl.tolist(), m, b is None)
            assert (calls["tri"] > before) is (m <= bound), (m, bound)
        x = torch.randn(8, k, device=dev, dtype=torch.bfloat16)
        kern.apply_weights(layer, x)  # compile the kernels outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = kern.apply_weights(layer, x)
        x.copy_(torch.randn_like(x))
        if outl.numel():
            x[:, 1000] *= 2000.0
        g.replay()
        torch.cuda.synchronize()
        assert _rel(yg, x.float() @ w_ref.T) < 2e-2
        cf = torch.compile(lambda t: kern.apply_weights(layer, t), fullgraph=True, dynamic=True)
        for m in (3, 40, 130):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            assert _rel(cf(x), x.float() @ w_ref.T) < 2e-2, m


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
def test_gpu_w8a8_graph_split_fuses_into_the_norm(monkeypatch):
    """SUPERWEIGHT_W8A8_GRAPH_SPLIT=1: compiled, the W8A8 layer's activation split is traced as torch ops (no
    ``int8_quant_outlier_split`` kernel of ours; the int8 operands go to ``w8a8_mm_q``), Inductor builds the
    residual-add RMSNorm and the split as one kernel (one outlier channel or none), and y matches the float
    reference of the dequantized weights with the outlier channels in 16 bit -- Triton (M <= bound) and CUTLASS
    (zero point) sides, 0 / 1 / 3 outlier channels, replayed from a CUDA graph too; eagerly the layer still runs
    our Triton split."""
    from test_gpu_kernels import _cfg, _rel, _vl
    from torch._inductor.utils import run_and_get_code

    VL = _vl()
    VL.single_process_tp()
    from vllm_superweight.kernels.linear import w8a8 as W8

    monkeypatch.setenv(envs.W8A8_GRAPH_SPLIT, "1")
    monkeypatch.delenv(envs.W8A8_TRITON, raising=False)
    monkeypatch.delenv(envs.W8A8_AZP, raising=False)
    dev, n, k = "cuda", 4096, 4096
    w = VL.random_w8(n, k, dev, seed=7)
    w_ref = VL.dequant_w8(w)
    c = _cfg(torch.bfloat16, acts="int8-token", bits=8, group=-1, sym=True, k=k, n=n)
    norm_w = (torch.rand(k, device=dev) + 0.5).to(torch.bfloat16)

    def norm(h, r):
        s = (h.float() + r.float()).to(torch.bfloat16)
        v = s.float()
        return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm_w

    for outl in (torch.tensor([], dtype=torch.long), torch.tensor([1000]), torch.tensor([5, 1000, 3001])):
        layer = torch.nn.Module()
        layer.register_parameter("weight_packed", torch.nn.Parameter(w["w"].clone(), requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(w["scale"].clone(), requires_grad=False))
        kern = W8.CutlassSplitInt8Kernel(c)
        assert kern.graph_split and "split fused into x's producer" in kern.describe()
        kern.set_outliers(layer, outl)
        kern.process_weights_after_loading(layer)
        bound = kern.tri_bound
        assert bound > 0

        def f(h, r):
            return kern.apply_weights(layer, norm(h, r))

        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, dynamic=True)
        codes: list[str] = []
        for m in (1, 8, bound, bound + 1, 300):
            h = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            r = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            if outl.numel():
                r[:, 1000] *= 3000.0  # a super activation riding the residual stream
            x = norm(h, r)
            ref = x.float() @ w_ref.T
            if not codes:
                y, codes = run_and_get_code(cf, h, r)
            else:
                y = cf(h, r)
            assert y.shape == (m, n) and _rel(y, ref) < 2e-2, (outl.tolist(), m)
            assert _rel(y, f(h, r)) < 2e-2, (outl.tolist(), m)  # the eager layer (our Triton split)
        code = "\n".join(codes)
        assert "w8a8_mm_q" in code and "int8_quant_outlier_split" not in code
        kernels = re.findall(r"^def (triton_\w+)\(", code, flags=re.M)
        print(f"outliers {outl.tolist()}: Inductor kernels {kernels}")
        # one outlier channel (the planted 7B model's layers): the norm, the split, the gather and the zero point in
        # one kernel (H100, s47); with three, Inductor gathers them from the norm in a kernel of their own
        reductions = [kn for kn in kernels if kn.startswith("triton_red")]
        assert len(reductions) == (1 if outl.numel() <= 1 else 2), kernels
        h = torch.randn(8, k, device=dev, dtype=torch.bfloat16)  # replayed from a CUDA graph
        r = torch.randn(8, k, device=dev, dtype=torch.bfloat16)
        cf(h, r)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = cf(h, r)
        h.copy_(torch.randn_like(h))
        g.replay()
        torch.cuda.synchronize()
        assert _rel(yg, norm(h, r).float() @ w_ref.T) < 2e-2
    torch._dynamo.reset()
