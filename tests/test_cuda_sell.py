"""The shared-memory SELL correction (``kernels/cuda_sell.py``, opt-in ``SUPERWEIGHT_SPARSE_PANEL``).

* CPU: the plan (token block, shared memory, grid) from shapes; the knob; which corrections it takes; its CUDA
  source compiled by torch's NVRTC for Hopper and Ampere (no GPU); and the kernel itself run on the CPU through
  the host emulation of ``tests/cuda_emu.py`` (every thread a host thread, bounds-checked loads) against the
  float64 reference, over token counts that use every token-block width, odd K (the one-column panel copy),
  heavy rows, more slices than warps (the grid-stride loop), strided x and y.
* ``@pytest.mark.gpu``: the same against the reference and the Triton kernel on the GPU, inside a CUDA graph, and
  the op routed through it under the knob.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import assert_rounded_close, dense_reference, random_entries

import vllm_superweight.kernels as K
from vllm_superweight import envs
from vllm_superweight.kernels import cuda_sell as CS

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
H200 = CS.DeviceLimits(sms=132, smem_block=232448, smem_sm=233472)


# ------------------------------------------------------------------------------------------------------------
# plan and knob
# ------------------------------------------------------------------------------------------------------------
def test_plan_token_blocks_and_grid():
    """The token block is the smallest power of two holding the batch, at most 16; one block per (slice group,
    token block); as many blocks an SM as the shared memory holds; never more warps than tasks."""
    cfg = CS.PanelConfig()
    mbs = {m: CS.panel_plan(m, 4096, 384, H200, cfg)[0].mb for m in (1, 2, 3, 5, 8, 9, 16, 17, 64, 95)}
    assert mbs == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 16, 64: 16, 95: 16}
    p8 = CS.panel_plan(8, 4096, 384, H200, cfg)[0]
    assert p8.smem == 4096 * 8 * 2 and p8.grid == (48, 1) and p8.x2  # 384 tasks / 8 warps: 48 blocks
    p64 = CS.panel_plan(64, 4096, 384, H200, cfg)[0]
    assert p64.smem == 128 * 1024 and p64.grid == (33, 4)  # one 128 KB panel an SM: 132 blocks over 4 token blocks
    few = CS.panel_plan(64, 4096, 100_000, H200, CS.PanelConfig(per_sm=1))[0]
    assert few.grid == (33, 4)
    many = CS.panel_plan(8, 4096, 100_000, H200, cfg)[0]
    assert many.grid == (132 * 3, 1)  # 64 KB panels: 3 an SM
    assert not CS.panel_plan(8, 4097, 384, H200, cfg)[0].x2  # odd K: one column at a time
    assert CS.panel_plan(16, 4096, 384, H200, CS.PanelConfig(mb=4))[0].mb == 4
    assert CS.panel_plan(64, 4096, 384, H200, CS.PanelConfig(blocks=64))[0].grid == (16, 4)


def test_plan_refusals_and_shrinking_panels():
    cfg = CS.PanelConfig()
    assert CS.panel_plan(97, 4096, 384, H200, cfg)[0] is None  # beyond max_m: the Triton kernel
    assert CS.panel_plan(0, 4096, 384, H200, cfg)[0] is None
    assert CS.panel_plan(8, 4096, 0, H200, cfg)[1] == "no held-out entries"
    a100ish = CS.DeviceLimits(sms=108, smem_block=166912, smem_sm=167936)
    assert CS.panel_plan(64, 11008, 384, a100ish, cfg)[0].mb == 4  # 11008 x 8 x 2 > 163 KB: 4 tokens a panel
    small = CS.DeviceLimits(sms=8, smem_block=48 * 1024, smem_sm=64 * 1024)
    plan, why = CS.panel_plan(8, 40000, 10, small, cfg)
    assert plan is None and "exceeds" in why


def test_panel_knob(monkeypatch):
    monkeypatch.delenv(envs.SPARSE_PANEL, raising=False)
    assert envs.sparse_panel() is None and CS.config() is None
    monkeypatch.setenv(envs.SPARSE_PANEL, "0")
    assert CS.config() is None
    monkeypatch.setenv(envs.SPARSE_PANEL, "1")
    assert CS.config() == CS.PanelConfig()
    monkeypatch.setenv(envs.SPARSE_PANEL, "mb=8,warps=4,per_sm=2,max_m=64,blocks=40")
    assert CS.config() == CS.PanelConfig(mb=8, warps=4, per_sm=2, max_m=64, blocks=40)
    for bad in ("mb=3", "warps=0", "warps=33", "per_sm=9", "max_m=0", "bogus=1", "mb=x", "2"):
        monkeypatch.setenv(envs.SPARSE_PANEL, bad)
        with pytest.raises(ValueError, match="SUPERWEIGHT_SPARSE_PANEL"):
            envs.sparse_panel()


def test_takes_only_what_it_serves(monkeypatch):
    """Off by default; with the knob: CUDA tensors only, packed slots of 32 lanes, x and y of one 16-bit dtype."""
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    y = torch.zeros(4, 32, dtype=torch.bfloat16)
    ell = torch.zeros(1, 2, 32, dtype=torch.int32)
    monkeypatch.delenv(envs.SPARSE_PANEL, raising=False)
    assert not CS.takes(y, x, ell, torch.bfloat16)
    monkeypatch.setenv(envs.SPARSE_PANEL, "1")
    assert not CS.takes(y, x, ell, torch.bfloat16)  # CPU tensors: never
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert CS.takes(y, x, ell, torch.bfloat16)
    assert not CS.takes(y, x, ell, None)  # unpacked slots
    assert not CS.takes(y.float(), x, ell, torch.bfloat16)
    assert not CS.takes(y, x.float(), ell, torch.bfloat16)
    assert not CS.takes(y, x, torch.zeros(1, 2, 16, dtype=torch.int32), torch.bfloat16)  # 16 lanes
    assert not CS.takes(torch.zeros(32, 4, dtype=torch.bfloat16).t(), x, ell, torch.bfloat16)


@pytest.mark.parametrize("arch", ["90", "80"])
def test_sources_compile_without_a_gpu(arch):
    """torch's NVRTC compiles every variant (token blocks 1-16, bf16 / fp16 activations and slot values, both panel
    copies) for Hopper and Ampere."""
    try:
        from torch.cuda._utils import _get_gpu_rtc_library

        lib = _get_gpu_rtc_library()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this torch has no NVRTC: {e}")
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    for mb in (1, 2, 4, 8, 16):
        for bf16, pack in ((True, 1), (False, 2)):
            for x2 in (True, False):
                assert CG.nvrtc_cubin(CS.kernel_source(mb, 8, bf16, pack, x2), arch, lib)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="no variant"):
        CS.kernel_source(3, 8, True, 1, True)


# ------------------------------------------------------------------------------------------------------------
# the kernel on the CPU (host emulation)
# ------------------------------------------------------------------------------------------------------------
PANEL_PARAMS = ["const u16*", "u16*", "const u32*", "const int*", "const int*", "const int*", "const u32*"]
PANEL_PARAMS += ["int"] * 8


def _emu_run(y, x, sp, pack, cfg, limits):
    """The kernel, as planned for these shapes, run by the host emulation on CPU tensors (y in place). Returns the
    plan."""
    cuda_emu = pytest.importorskip("cuda_emu")
    if cuda_emu.compiler() is None:
        pytest.skip("no host C++20 compiler with <barrier> and _Float16 (tests/cuda_emu.py)")
    m, k = x.shape
    n = y.shape[1]
    ell, rb = sp["ell_cols"], sp["ell_rb"]
    s, depth, _ = ell.shape
    s_run = s if depth else 0
    h = sp["hrows"].shape[0]
    x2 = x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
    plan, why = CS.panel_plan(m, k, s_run + h, limits, cfg, x2=x2)
    assert plan is not None, why
    src = CS.kernel_source(plan.mb, plan.warps, x.dtype == torch.bfloat16, CS._pack_code(pack), plan.x2)
    lib = cuda_emu.build(src, CS.KERNEL, PANEL_PARAMS)
    # y inside a guarded buffer: 16 rows of -0.0 before and after it and in its row padding, compared bit for bit
    # after the run -- the kernel's read-add-round of y turns -0.0 into +0.0 even where it adds nothing, so any
    # write outside y's M x N elements shows
    g, ys = 16, y.stride(0)
    buf = torch.full((m + 2 * g, ys), -0.0, dtype=y.dtype)
    yv = buf[g : g + m, :n]
    yv.copy_(y)
    before = buf.clone().view(torch.int16)
    tensors = [x, yv, ell, rb, sp["hrows"], sp["hptr"], sp["hcols"]]
    ints = [m, n, k, s_run, depth, h, x.stride(0), ys]
    bad = cuda_emu.launch(lib, plan.grid, plan.warps * 32, plan.smem, tensors + ints, check=tensors)
    assert bad == 0, f"{bad} loads outside the buffers passed"
    after = buf.view(torch.int16)
    assert torch.equal(after[:g], before[:g]) and torch.equal(after[g + m :], before[g + m :]), "a write past y's rows"
    assert torch.equal(after[g : g + m, n:], before[g : g + m, n:]), "a write into y's row padding"
    y.copy_(yv)
    return plan


EMU_CASES = [  # (n, k, m, nnz, heavy, warps, sms)
    (200, 96, 1, 900, False, 8, 4),
    (200, 96, 2, 900, True, 2, 1),  # heavy rows; 7 slices + heavy rows over 2 warps: the grid-stride loop
    (130, 97, 3, 600, True, 4, 2),  # odd K: the one-column panel copy; 4-token block with a tail of 1
    (64, 250, 8, 1500, False, 8, 64),
    (97, 64, 13, 500, True, 2, 3),  # 16-token block, 3 tokens masked
    (150, 300, 40, 900, True, 4, 2),  # three token blocks, the last partial
]


@pytest.mark.parametrize("n,k,m,nnz,heavy,warps,sms", EMU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_emulated_kernel_vs_reference(n, k, m, nnz, heavy, warps, sms, dtype):
    gen = torch.Generator().manual_seed(n + 7 * k + 31 * m)
    r, c, v = random_entries(n, k, nnz, gen, heavy_row=n // 2 if heavy else None, heavy_len=k - 3 if heavy else 0)
    sp = K.prepare_sparse(r, c, v, n, k, "cpu", layout="sell", pack=dtype, depth=4 if heavy else None)
    if heavy:
        assert sp["hrows"].numel() >= 1
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = torch.randn(m, n, generator=gen).to(dtype)
    ref, mag = dense_reference(y, x, r, c, v, n, k)
    out = y.clone()
    limits = CS.DeviceLimits(sms=sms, smem_block=232448, smem_sm=233472)
    plan = _emu_run(out, x, sp, dtype, CS.PanelConfig(warps=warps), limits)
    assert plan.mb == min(16, 1 << (m - 1).bit_length())
    assert_rounded_close(out, ref, mag, dtype)
    # the same sums as the torch path of the same packed layout (the serving path on CPUs), within one rounding
    assert_rounded_close(K.sparse_correction(y.clone(), x, sp), ref, mag, dtype)


def test_host_emulated_kernel_strided_operands():
    """x rows with padding (x a column slice of a wider tensor: odd row stride, so the one-column copy) and y rows
    of a wider output (only N of them written: the padding columns keep their values)."""
    gen = torch.Generator().manual_seed(5)
    n, k, m = 100, 64, 6
    r, c, v = random_entries(n, k, 400, gen)
    sp = K.prepare_sparse(r, c, v, n, k, "cpu", layout="sell", pack=torch.bfloat16)
    xw = torch.randn(m, k + 3, generator=gen).to(torch.bfloat16)
    x = xw[:, 1 : k + 1]
    yw = torch.randn(m, n + 8, generator=gen).to(torch.bfloat16)
    y = yw[:, :n]
    ref, mag = dense_reference(y, x, r, c, v, n, k)
    pad = yw[:, n:].clone()
    plan = _emu_run(y, x, sp, torch.bfloat16, CS.PanelConfig(warps=2), H200)
    assert not plan.x2
    assert_rounded_close(y, ref, mag, torch.bfloat16)
    assert torch.equal(yw[:, n:], pad)


def test_host_emulated_kernel_rows_without_entries_untouched():
    """Rows with no held-out entry are not written (not even rounded again): a NaN placed in y there survives
    unchanged, and rows with entries are corrected."""
    n, k, m = 96, 64, 4
    r = torch.tensor([3, 3, 40, 95])
    c = torch.tensor([0, 63, 5, 7])
    v = torch.tensor([1.0, -2.0, 0.5, 4.0])
    sp = K.prepare_sparse(r, c, v, n, k, "cpu", layout="sell", pack=torch.bfloat16)
    x = torch.randn(m, k).to(torch.bfloat16)
    y = torch.zeros(m, n, dtype=torch.bfloat16)
    y[:, 10] = float("nan")
    _emu_run(y, x, sp, torch.bfloat16, CS.PanelConfig(), H200)
    assert torch.isnan(y[:, 10]).all()
    want = torch.zeros(m, n, dtype=torch.float64)
    want[:, 3] = x[:, 0].double() - 2 * x[:, 63].double()
    want[:, 40] = 0.5 * x[:, 5].double()
    want[:, 95] = 4 * x[:, 7].double()
    keep = torch.ones(n, dtype=torch.bool)
    keep[10] = False
    assert torch.allclose(y[:, keep].double(), want[:, keep].to(torch.bfloat16).double(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
def _gpu_entries(n, k, heavy, seed):
    gen = torch.Generator().manual_seed(seed)
    nnz = max(8, n * k // 250)
    return random_entries(n, k, nnz, gen, heavy_row=n // 3 if heavy else None, heavy_len=k // 2 if heavy else 0)


def _gpu_reference(y, x, r, c, v, n, k):
    """(y + x S^T, |y| + |x| |S|^T) in float64 on the GPU (the dense S of a 7B layer is 400 MB there)."""
    s = torch.zeros(n, k, dtype=torch.float64, device="cuda")
    s.index_put_((r.long().cuda(), c.long().cuda()), v.double().cuda(), accumulate=True)
    ref = y.double() + x.double() @ s.T
    mag = y.double().abs() + x.double().abs() @ s.abs().T
    return ref.cpu(), mag.cpu()


def _gpu_inputs(n, k, m, dtype, entries, seed):
    """x, y and their reference for ``m`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    y = torch.randn(m, n, generator=gen).to(dtype).cuda()
    return (x, y, *_gpu_reference(y, x, *entries, n, k))


def _gpu_layout(n, k, dtype, entries):
    return K.prepare_sparse(*entries, n, k, "cuda", layout="sell", pack=dtype)


def _panel(y, x, sp, dtype):
    return CS.sell_panel_(y, x, sp["ell_cols"], sp["ell_rb"], sp["hrows"], sp["hptr"], sp["hcols"], dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008), (1000, 700), (97, 61), (130, 4097)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_panel_vs_reference(n, k, dtype, monkeypatch):
    """Against the float64 reference at every token-block width and batches up to max_m, with heavy rows; beyond
    max_m it declines (the caller's Triton kernel then)."""
    monkeypatch.setenv(envs.SPARSE_PANEL, "1")
    for heavy in (False, True):
        entries = _gpu_entries(n, k, heavy, seed=n + k)
        sp = _gpu_layout(n, k, dtype, entries)
        for m in (1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 95, 96):
            x, y, ref, mag = _gpu_inputs(n, k, m, dtype, entries, seed=m)
            out = y.clone()
            assert _panel(out, x, sp, dtype), (n, k, m)
            torch.cuda.synchronize()
            assert_rounded_close(out, ref, mag, dtype)
        assert not _panel(y.clone(), torch.zeros(97, k, dtype=dtype, device="cuda"), sp, dtype)  # > max_m


@gpu
@needs_cuda
def test_cuda_panel_in_a_cuda_graph_and_through_the_op(monkeypatch):
    """Captured into a CUDA graph and replayed on new x: the eager result, bit for bit. Through
    ``kernels.sparse_correction`` with the knob: the panel kernel up to max_m tokens, the Triton kernel above
    (both against the reference)."""
    monkeypatch.setenv(envs.SPARSE_PANEL, "max_m=64")
    n, k, dtype = 12288, 4096, torch.bfloat16
    entries = _gpu_entries(n, k, False, seed=3)
    sp = _gpu_layout(n, k, dtype, entries)
    x, y, ref, mag = _gpu_inputs(n, k, 8, dtype, entries, seed=3)
    K.sparse_correction(torch.zeros_like(y), x, sp)  # compiled and loaded outside the capture
    static_x, static_y = x.clone(), torch.zeros_like(y)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        K.sparse_correction(static_y, static_x, sp)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    static_y.zero_()
    g.replay()
    eager = torch.zeros_like(y)
    assert _panel(eager, x2, sp, dtype)
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager)
    heavy = _gpu_entries(n, k, True, seed=4)
    sp = _gpu_layout(n, k, dtype, heavy)
    taken: list[int] = []
    real = CS.sell_panel_

    def spy(y, x, *a, **kw):
        done = real(y, x, *a, **kw)
        if done:
            taken.append(x.shape[0])
        return done

    monkeypatch.setattr(CS, "sell_panel_", spy)
    for m in (8, 64, 65, 200):
        x, y, ref, mag = _gpu_inputs(n, k, m, dtype, heavy, seed=m)
        assert_rounded_close(K.sparse_correction(y.clone(), x, sp), ref, mag, dtype)
    assert taken == [8, 64]


@pytest.mark.parametrize("seed", range(6))
def test_host_emulated_kernel_random_shapes(seed):
    """Random small shapes (N not a multiple of 32, K odd or even, 1-40 tokens, 1-8 warps, 1-3 SMs), every held-out
    row in slices or (depth 0) every one in the heavy CSR part, bf16 or fp16: the reference each time."""
    gen = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1, 150, (1,), generator=gen))
    k = int(torch.randint(2, 300, (1,), generator=gen))
    m = int(torch.randint(1, 41, (1,), generator=gen))
    nnz = int(torch.randint(1, max(2, n * k // 8), (1,), generator=gen))
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    depth = 0 if seed in (2, 5) else None
    r, c, v = random_entries(n, k, min(nnz, n * k), gen)
    sp = K.prepare_sparse(r, c, v, n, k, "cpu", layout="sell", pack=dtype, depth=depth)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = torch.randn(m, n, generator=gen).to(dtype)
    ref, mag = dense_reference(y, x, r, c, v, n, k)
    warps = int(torch.randint(1, 9, (1,), generator=gen))
    limits = CS.DeviceLimits(sms=int(torch.randint(1, 4, (1,), generator=gen)), smem_block=232448, smem_sm=233472)
    _emu_run(y, x, sp, dtype, CS.PanelConfig(warps=warps), limits)
    assert_rounded_close(y, ref, mag, dtype)
