"""The small-batch GEMV over Marlin's layout with the held-out correction in its epilogue
(``kernels/triton_marlin_gemv.py``).

* CPU: the SELL maps (row block -> slice, heavy-row ranges) against the layout they index; argument checks.
* sm_90 ahead-of-time compile (no GPU): every token count / variant lowers, ptxas reports no spills; the main loop
  loads the words as 16-byte vectors.
* Triton interpreter (``-k interp_``): y equals the float64 reference (W4 dequantized + held-out values, bias) within
  bf16 / fp16 rounding, for M = 1..4, grouped / channel-wise / one group, symmetric / asymmetric, padded shapes,
  heavy rows, every variant and column-group split.
* ``@pytest.mark.gpu``: the same against vLLM's CUDA repack on 7B shapes (``tests/test_gpu_kernels.py``'s pair test
  runs the kernel class).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_marlin_deq import marlin_layout  # noqa: E402
from test_triton_w4 import check_close, make_layer  # noqa: E402
from triton_interp import interp_only, not_interp, run_interp_tests  # noqa: E402

from vllm_superweight.kernels import prepare_sparse  # noqa: E402
from vllm_superweight.kernels import triton_marlin_gemv as MG  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _sparse(inputs, n, np_, k, dtype, device="cpu", depth=None):
    if inputs["rows"] is None:
        return None, None
    sp = prepare_sparse(
        inputs["rows"], inputs["cols"], inputs["vals"], n, k, device, layout="sell", pack=dtype, depth=depth
    )
    return sp, MG.gemv_maps(sp, np_)


@not_interp
def test_maps_index_the_layout():
    n, k = 200, 256
    inputs, _ = make_layer(n, k, 64, False, nnz=60, heavy=40, sw=True, seed=1)
    sp, maps = _sparse(inputs, n, 256, k, torch.bfloat16)
    assert set(maps) == {"hrng"} and maps["hrng"].shape == (9,)
    assert torch.equal(sp["ell_rb"], torch.arange(7, dtype=torch.int32))  # dense slices: block b is slice b
    hr = sp["hrows"].long()
    assert hr.numel() >= 1  # the heavy row of make_layer
    for rb in range(8):
        lo, hi = int(maps["hrng"][rb]), int(maps["hrng"][rb + 1])
        assert ((hr[lo:hi] // 32) == rb).all() and int(((hr // 32) == rb).sum()) == hi - lo
    unpacked = prepare_sparse(inputs["rows"], inputs["cols"], inputs["vals"], n, k, "cpu", layout="sell")
    with pytest.raises(ValueError, match="packed"):
        MG.gemv_maps(unpacked, 256)


@not_interp
def test_argument_checks():
    n, k = 64, 128
    inputs, _ = make_layer(n, k, 64, False, seed=2)
    qm, ms, mz = marlin_layout(inputs, n, k, 64)
    x = torch.zeros(5, k, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 4"):
        MG._launch_args(x, qm, ms, mz, n, k, 64, False, None, None, None, x, None, None, 132)
    with pytest.raises(ValueError, match="Marlin tensor"):
        MG._launch_args(x[:1, :64], qm, ms, mz, n, k, 64, False, None, None, None, x, None, None, 132)
    grid, _, consts, warps = MG._launch_args(x[:3], qm, ms, mz, n, k, 64, False, None, None, None, x, None, None, 132)
    assert consts["BM"] == 4 and consts["RT"] == MG._rt(MG.GEMV_CONFIGS[4][0], 4, 64) and not consts["HAS_SP"]
    assert grid == (64 // (8 * consts["GS"]),) and consts["WR"] * 4 * consts["GS"] == warps * 32
    assert MG._groups(22016, 132) == 2 and MG._groups(4096, 132) == 2 and MG._groups(576, 132) == 1


# ------------------------------------------------------------------------------------------------------------
# sm_90 ahead-of-time compile (no GPU needed)
# ------------------------------------------------------------------------------------------------------------
@not_interp
@pytest.mark.parametrize("bm", [1, 2, 4])
def test_compile_sm90_without_spills(bm):
    import re

    for config in [MG.GEMV_CONFIGS[bm]] + MG.GEMV_VARIANTS:
        for gs in (8, 2):
            r = MG.compile_sm90(bm=bm, config=config, gs=gs, keep_asm=True)
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (bm, config, gs, r["regs"])
            ptx = str(r["asm"]["ptx"])
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), (bm, config, gs)  # 16-byte word loads
    for kw in (dict(group=0, sym=True, depth=0, heavy=False), dict(group=32, f16=True), dict(group=64, sym=True)):
        r = MG.compile_sm90(bm=1, **kw)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (kw, r["regs"])


# ------------------------------------------------------------------------------------------------------------
# Triton interpreter
# ------------------------------------------------------------------------------------------------------------
@not_interp
def test_triton_interpreter_subprocess():
    run_interp_tests(__file__)


# (n, k, group, sym, nnz, heavy, sw, dtype, bias)
INTERP_CASES = [
    (192, 256, 128, False, 40, 0, True, torch.bfloat16, True),
    (70, 256, 64, True, 30, 60, False, torch.bfloat16, False),
    (64, 576, 64, False, 50, 0, True, torch.float16, True),
    (128, 200, -1, False, 20, 30, True, torch.bfloat16, False),
    (64, 128, 128, True, 0, 0, False, torch.bfloat16, True),
    (96, 192, 32, False, 25, 0, False, torch.float16, False),
]


@interp_only
@pytest.mark.parametrize("case", range(len(INTERP_CASES)), ids=[str(c) for c in INTERP_CASES])
def test_interp_matches_reference(case):
    n, k, group, sym, nnz, heavy, sw, dtype, with_bias = INTERP_CASES[case]
    inputs, _ = make_layer(n, k, group, sym, nnz=nnz, heavy=heavy, sw=sw, seed=case, dtype=dtype)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    np_ = qm.shape[1] // 2
    sp, maps = _sparse(inputs, n, np_, k, dtype)
    gen = torch.Generator().manual_seed(case)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = MG.marlin_gemv(x, qm, ms, mz, n, k, group, sym, sp, maps, bias)
        assert y.shape == (m, n) and y.dtype == dtype
        check_close(y, x, inputs, bias, tag=f"gemv case {case} m {m}")


@interp_only
@pytest.mark.parametrize("config", MG.GEMV_VARIANTS, ids=str)
def test_interp_every_variant_and_split(config):
    """Every variant the benchmark may choose, every column-group split, a shallow SELL (many heavy rows)."""
    n, k, group = 130, 384, 128
    inputs, _ = make_layer(n, k, group, False, nnz=120, heavy=50, sw=True, seed=7)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    sp, maps = _sparse(inputs, n, qm.shape[1] // 2, k, torch.bfloat16, depth=1)
    assert sp["hrows"].numel() > 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16)
    for gs in (1, 2, 4, 8):
        y = MG.marlin_gemv(x, qm, ms, mz, n, k, group, False, sp, maps, config=config, gs=gs)
        check_close(y, x, inputs, tag=f"gemv {config} gs {gs}")


@interp_only
def test_interp_deep_slices_without_heavy_rows():
    """Slices as deep as the longest row (the micro-benchmark's `depth max` layouts): no heavy rows at all, every
    held-out entry in a slot; the GEMV and the packed SELL correction both still match the reference."""
    from vllm_superweight.kernels import sparse_correction

    n, k, group = 130, 384, 128
    inputs, _ = make_layer(n, k, group, False, nnz=120, heavy=50, sw=True, seed=8)
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    deepest = int(torch.bincount(inputs["rows"].long(), minlength=n).max())
    sp, maps = _sparse(inputs, n, qm.shape[1] // 2, k, torch.bfloat16, depth=deepest)
    assert sp["hrows"].numel() == 0 and sp["ell_cols"].shape[1] == deepest
    gen = torch.Generator().manual_seed(4)
    for m in (1, 3):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        check_close(MG.marlin_gemv(x, qm, ms, mz, n, k, group, False, sp, maps), x, inputs, tag=f"deep gemv m {m}")
        y0 = MG.marlin_gemv(x, qm, ms, mz, n, k, group, False, None, None)  # Marlin's product alone
        check_close(sparse_correction(y0.clone(), x, sp), x, inputs, tag=f"deep packed sell m {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
@pytest.mark.parametrize("shape", [(4096, 4096, 128), (12288, 4096, 128), (4096, 11008, 128), (576, 576, 64)])
def test_gpu_vs_reference(shape):
    """vLLM's CUDA repack, 0.1% hold-out + a super weight, M = 1..4, bf16: within the bf16 bound of the fp32
    reference; rows without entries equal Marlin + nothing within one rounding."""
    n, k, group = shape
    inputs, _ = make_layer(n, k, group, False, nnz=n * k // 1000, sw=True, seed=n + k, device="cuda")
    qm, ms, mz = marlin_layout(inputs, n, k, group, device="cuda")
    sp, maps = _sparse(inputs, n, qm.shape[1] // 2, k, torch.bfloat16, device="cuda")
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        y = MG.marlin_gemv(x, qm, ms, mz, n, k, group, False, sp, maps)
        check_close(y, x, inputs, tag=f"gpu gemv {shape} m {m}")
