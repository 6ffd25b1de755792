"""Our GEMV over Marlin's layout (``kernels/cuda_marlin_gemv.py``), CUDA-core and tensor-core forms.

* CPU: launch planning (split-K, chunk size, shared-memory budget, token limits of each form) and the shapes it
  refuses, with reasons; the kernel is not offered without CUDA; compiled kernels are cached on disk.
* ``@pytest.mark.gpu``: y = x W^T from vLLM's CUDA repack of random codes equals the float64 reference of the same
  Marlin tensors (``marlin_dequant_reference``) for M = 1..4 (CUDA-core form) and 1..8 (tensor-core form), bf16
  and fp16, grouped (16 / 32 / 64 / 128), channel-wise and one-group layers, symmetric and asymmetric, with and
  without bias, with and without split-K; the held-out terms read inside the kernel equal the reference of the
  restored weights; bitwise reproducible run to run; inside a CUDA graph equal to eager; and close to vLLM's
  Marlin on Llama-2-7B shapes.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from vllm_superweight.kernels import cuda_marlin_gemv as CG

# the tensor-core form's first default (sessions 23-24; session 25's adds 8-row chunks, fewer split-K blocks, prefetch)
MMA_FIRST = (4, 4, 24, 2, 1, 0, 1)
# configurations the prefetch test runs without and with the 8th field (gemv_precompile.py compiles both)
PF_BASES = (CG.DEFAULT_CONFIG, (8, 4, 24, 2, 1, 0), CG.config_with(CG.MMA_CONFIG, pf=0), (8, 2, 24, 3, 1, 0, 1))

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# CPU: planning
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,k,group,msg",
    [
        (100, 4096, 128, "N % 64"),
        (4096, 4100, 128, "K % 16"),
        (4096, 4096, 96, "power of two"),
        (4096, 4096, 24, "16 times"),
    ],
)
def test_plan_refuses_shapes_it_cannot_read(n, k, group, msg):
    with pytest.raises(ValueError, match=msg):
        CG.gemv_plan(n, k, group, True, torch.bfloat16, "cpu")


def test_plan_refuses_float32_and_oversized_configs():
    with pytest.raises(ValueError, match="bf16 or fp16"):
        CG.gemv_plan(4096, 4096, 128, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="48 KB"):
        CG.gemv_plan(4096, 4096, 128, True, torch.bfloat16, "cpu", config=(8, 8, 24, 4))
    assert CG.gemv_plan(4096, 4096, 128, True, torch.bfloat16, "cpu").lean  # the default form


def test_x_through_the_ring_is_a_planned_option():
    """SW_XR: not with PDL (its prologue copies x before the launch's wait would allow); its x slots count against
    the 48 KB (the tensor-core form's 8-row chunks of 4 warps no longer fit); off, the source is as before."""
    xr = CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=XR_CONFIGS[0])
    assert xr.xr and xr.mma and "#define SW_XR 1" in CG.kernel_source(xr, 8)
    plain = CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.MMA_CONFIG)
    assert not plain.xr and "SW_XR 1" not in CG.kernel_source(plain, 8)
    assert CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.config_with(xr=1)).xr  # CUDA cores
    for bad in (CG.config_with(XR_CONFIGS[0], pdl=1), CG.config_with(pdl=1, xr=1)):
        with pytest.raises(ValueError, match="before a PDL launch"):
            CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=bad)
    with pytest.raises(ValueError, match="48 KB"):
        CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.config_with(CG.MMA_CONFIG, xr=1))


@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (12288, 4096, 128), (4096, 11008, 128), (22016, 4096, 64)])
def test_plan_covers_every_row_once_and_keeps_groups_whole(n, k, group):
    p = CG.gemv_plan(n, k, group, False, torch.bfloat16, "cpu")
    rows = k // 16
    assert p.u >= 1 and rows % p.u == 0 and p.rpw % p.u == 0
    assert p.splits * p.warps * p.rpw >= rows > (p.splits * p.warps - 1) * p.rpw - p.rpw * p.warps
    # a chunk never straddles two groups unless it holds whole groups
    assert p.grows % p.u == 0 or p.u % p.grows == 0
    assert p.tiles == n // 64 and p.has_zero and p.bf16
    # the grid asks for about the warps wanted (132 SMs assumed off the GPU), never fewer rows than one chunk
    assert p.tiles * -(-rows // p.rpw) <= max(132 * CG.DEFAULT_CONFIG[2], p.tiles * -(-rows // p.u))


def test_tensor_core_form_plans_up_to_eight_tokens():
    mma = CG.gemv_plan(4096, 11008, 128, False, torch.bfloat16, "cpu", config=CG.MMA_CONFIG)
    one = CG.gemv_plan(4096, 11008, 128, False, torch.bfloat16, "cpu")
    assert mma.mma and mma.max_m == CG.MAX_M == 8 and not mma.lean
    assert not one.mma and one.max_m == CG.MAX_M_FFMA == 4
    with pytest.raises(ValueError, match="no lean decoding"):
        CG.gemv_plan(4096, 4096, 128, True, torch.bfloat16, "cpu", config=(4, 4, 24, 2, 1, 1, 1))
    # 8 warps: the ring and a separate 8-token reduction do not fit in 48 KB, so the warps' partial sums take their
    # own ring slots after the main loop; a ring of 8-row chunks does not fit even then
    wide = CG.gemv_plan(4096, 4096, 128, True, torch.bfloat16, "cpu", config=(4, 8, 24, 2, 1, 0, 1))
    assert wide.ralias and wide.warps == 8 and not mma.ralias and not one.ralias
    with pytest.raises(ValueError, match="48 KB"):
        CG.gemv_plan(4096, 4096, 128, True, torch.bfloat16, "cpu", config=(8, 8, 24, 2, 1, 0, 1))
    x = torch.zeros(9, 11008, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="1..8 tokens"):
        CG.marlin_gemv_cuda(x, None, None, None, mma)
    with pytest.raises(ValueError, match="1..4 tokens"):
        CG.marlin_gemv_cuda(x[:5], None, None, None, one)


def test_prefetch_plans_group_wise_layers_within_shared_memory():
    """The 8th config field prefetches a chunk's group constants through the ring: planned for group-wise layers
    (channel-wise ones read their one set after the loop) where its shared slots fit beside the ring in 48 KB (a
    chunk of 4 rows over 16-row groups needs 4 sets): a speed option, dropped where it cannot apply."""
    pf = CG.DEFAULT_CONFIG + (0, 1)
    assert CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=pf).pf
    assert not CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu").pf
    assert not CG.gemv_plan(4096, 4096, -1, False, torch.bfloat16, "cpu", config=pf).pf
    assert CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.MMA_CONFIG).mma
    assert CG.gemv_plan(4096, 4096, 16, True, torch.bfloat16, "cpu", config=CG.DEFAULT_CONFIG).grows == 1
    # 8 warps x 2 stages x 4 sets of constants do not fit beside the ring and the 4-token reduction: no prefetch
    assert not CG.gemv_plan(4096, 4096, 16, True, torch.bfloat16, "cpu", config=pf).pf
    assert CG.gemv_plan(4096, 4096, 16, True, torch.bfloat16, "cpu", config=(4, 4, 24, 2, 1, 1, 0, 1)).pf


def test_config_with_sets_named_fields_and_pads_the_ones_before():
    assert CG.config_with(MMA_FIRST, pf=1) == MMA_FIRST + (1,)
    assert CG.config_with(CG.MMA_CONFIG, pf=0)[7] == 0 and CG.config_with(CG.MMA_CONFIG, pf=1) == CG.MMA_CONFIG
    assert CG.config_with(pdl=1) == CG.DEFAULT_CONFIG + (0, 0, 1)
    assert CG.config_with(CG.DEFAULT_CONFIG + (0, 1), pdl=1) == CG.DEFAULT_CONFIG + (0, 1, 1)
    with pytest.raises(ValueError):
        CG.config_with(bogus=1)


def _bench_module():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cuda_gemv_bench.py")
    spec = importlib.util.spec_from_file_location("cuda_gemv_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_recommends_only_what_beat_the_default_by_the_margin():
    """cuda_gemv_bench.py --recommend-env: the knob gpu_run.sh's throughput stage sources in the same lease --
    starting from what the layers serve by default (SERVE_ONE), which only a measured configuration faster by the
    margin replaces."""
    B = _bench_module()
    cw, serve = CG.config_with, ":".join(map(str, CG.SERVE_ONE))
    knob = "SUPERWEIGHT_CUDA_GEMV"
    assert (
        CG.SERVE_ONE == (4, 8, 24, 2, 1, 1, 0, 1, 0, 1)
        and CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.SERVE_ONE).xr
    )
    rows = [{"part": "main", "kernel": "marlin", "m": m, "us": 66.0} for m in (1, 2, 4, 8)]
    assert B.recommend(rows) == {}  # nothing of ours measured
    rows += [{"part": "main", "kernel": k, "m": m, "us": us} for k, m, us in (("cuda", 1, 60.5), ("mma", 8, 90.0))]
    assert B.recommend(rows) == {knob: "1@one=" + serve}  # the default unmeasured: kept

    def add(part, kind, m, cfg, us):
        rows.append({"part": part, "kernel": kind, "m": m, "config": list(cfg), "us": us})

    add("sweep", "cuda", 1, CG.SERVE_ONE, 61.0)  # measured, and the plain form (60.5) is < 1 % faster: kept
    assert B.recommend(rows) == {knob: "1@one=" + serve}
    assert B.recommend(rows, margin=0.0) == {knob: "1@one=" + ":".join(map(str, CG.DEFAULT_CONFIG))}
    add("sweep", "cuda", 1, CG.SERVE_ONE, 57.4)  # the faster of two measurements of one configuration counts
    add("sweep", "cuda", 1, (4, 8, 16, 2, 1, 1, 0, 0, 0, 1), 57.0)  # not 1 % faster
    assert B.recommend(rows) == {knob: "1@one=" + serve}
    add("pf-sweep", "cuda", 1, (4, 8, 32, 2, 1, 1, 0, 1), 50.0)  # a faster shape without x through the ring
    add("pdl", "cuda-dep", 1, (4, 8, 32, 2, 1, 1, 0, 1), 55.0)
    add("pdl", "cuda-dep", 1, cw((4, 8, 32, 2, 1, 1, 0, 1), pdl=1), 52.0)  # PDL judged on the pair measured
    assert B.recommend(rows) == {knob: "1@one=4:8:32:2:1:1:0:1:1"}
    add("sweep", "cuda", 1, (4, 8, 24, 2, 1, 1, 0, 0, 0, 1), 45.0)  # x through the ring wins: no PDL with it
    assert B.recommend(rows) == {knob: "1@one=4:8:24:2:1:1:0:0:0:1"}
    mma = (4, 4, 12, 2, 1, 0, 1, 1, 0, 1)
    for m, us in ((2, 60.0), (4, 62.0), (8, 66.0)):  # beats Marlin at 2 and 4; at 8 within the margin
        add("pf-sweep", "mma", m, mma, us)
    assert B.recommend(rows) == {knob: "4@one=4:8:24:2:1:1:0:0:0:1,mma=4:4:12:2:1:0:1:1:0:1"}
    add("pf-sweep", "mma", 2, mma, 70.0)  # slower than Marlin at 2 (the min of 60 and 70 still counts)
    assert B.recommend(rows)[knob].startswith("4@")
    rows = [r for r in rows if not (r["kernel"] == "mma" and r["m"] == 2)]
    add("pf-sweep", "mma", 2, mma, 70.0)
    assert B.recommend(rows)[knob] == "1@one=4:8:24:2:1:1:0:0:0:1"  # never past an M where it lost
    # the throughput method's pair (--engine-env): the single-token choice, the fastest tensor-core shape at 8 tokens
    # even where Marlin was faster (that method's alternative is Humming)
    assert B.engine_env(rows) == {"SW_XR_ONE": "4:8:24:2:1:1:0:0:0:1", "SW_XR_MMA": "4:4:12:2:1:0:1:1:0:1"}
    add("mma-sweep", "mma", 8, (4, 4, 8, 2, 1, 0, 1, 1, 0, 1), 64.0)
    add("mma-sweep", "mma", 1, (4, 4, 6, 2, 1, 0, 1, 1, 0, 1), 40.0)  # one token: not the 8-token choice
    assert B.engine_env(rows)["SW_XR_MMA"] == "4:4:8:2:1:0:1:1:0:1"
    assert B.engine_env([]) == {}


def test_benchmark_table_has_the_tensor_core_epilogue_column(tmp_path):
    """cuda_gemv_bench.py's table: the tensor-core form with the held-out terms inside (``mma-fused``, what
    SUPERWEIGHT_CUDA_GEMV=8 runs for held-out layers at 2-8 tokens) beside Marlin + SELL, per M."""
    import json

    B = _bench_module()
    rows = [
        {"part": "main", "kernel": kind, "m": m, "us": us, "frac_peak": 0.3}
        for kind, m, us in (("marlin", 8, 66.4), ("marlin+sell", 8, 72.9), ("mma-fused", 8, 70.1), ("mma", 8, 68.0))
    ]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"meta": {"device": "H200", "peak_tbs": 4.8}, "results": rows}))
    B.write_table(str(path))
    md = (tmp_path / "b.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| M |"))
    row = next(line for line in md.splitlines() if line.startswith("| 8 |"))
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["tensor-core, SELL inside"] == "70.1 (30%)" and cells["Marlin + SELL"] == "72.9 (30%)"
    # the single-token sweep lists each shape's held-out terms inside / after it where they were timed
    one = list(CG.SERVE_ONE)
    rows += [
        {"part": "sweep", "kernel": "cuda", "m": 1, "config": one, "us": 57.4, "frac_peak": 0.55},
        {"part": "sweep-held", "kernel": "cuda-fused", "m": 1, "config": one, "us": 63.2},
        {"part": "sweep-held", "kernel": "cuda+sell", "m": 1, "config": one, "us": 68.0},
        {"part": "sweep", "kernel": "cuda", "m": 1, "config": list(CG.DEFAULT_CONFIG), "us": 65.2, "frac_peak": 0.48},
    ]
    path.write_text(json.dumps({"meta": {"device": "H100", "peak_tbs": 3.35}, "results": rows}))
    B.write_table(str(path))
    lines = [line for line in (tmp_path / "b.md").read_text().splitlines() if line.startswith("* (")]
    assert lines == [
        f"* {tuple(one)}: 57.4 us (55%); held-out terms inside 63.2 / after 68.0 us",
        f"* {CG.DEFAULT_CONFIG}: 65.2 us (48%)",
    ]


def test_benchmark_table_has_the_sell_pdl_section(tmp_path):
    """cuda_gemv_bench.py --sellpdl: per M the plain GEMV, with SW_TRIG, + SELL, + SELL as its programmatic
    dependent and the terms inside (spread), one row a size whichever form serves it (the single-token form at one
    token: ``cuda*``), a missing time as nan, and how many bitwise checks passed."""
    import json

    B = _bench_module()
    times = {8: (("mma", 65.9), ("mma-trig", 66.0), ("mma+sell", 84.9), ("mma+sell-pdl", 77.5), ("mma-fused", 86.9))}
    times[1] = (("cuda", 56.6), ("cuda-trig", 56.4), ("cuda+sell", 67.4), ("cuda+sell-pdl", 61.0))
    rows = [
        {"part": "sellpdl", "kernel": kind, "m": m, "us": us, "frac_peak": 0.4}
        for m, kinds in times.items()
        for kind, us in kinds
    ]
    rows += [{"part": "sellpdl-check", "m": 8, "shape": s_, "bitwise_equal": s_ != "down"} for s_ in ("qkv", "down")]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"meta": {"device": "H100", "peak_tbs": 3.35}, "results": rows}))
    B.write_table(str(path))
    md = (tmp_path / "b.md").read_text()
    assert "bitwise equal to the plain pair: 1/2" in md
    assert "| 8 | 65.9 | 66.0 | 84.9 | 77.5 | 86.9 |" in md.splitlines()
    assert "| 1 | 56.6 | 56.4 | 67.4 | 61.0 | nan |" in md.splitlines()


def test_benchmark_chooses_the_held_out_placement_and_fold(tmp_path):
    """cuda_gemv_bench.py --spe / --held-env: the SW_SPE placement fastest at one token and over 2-8 tokens (kept at
    0 unless faster by the margin), and fold=N up to the last token count where the terms inside beat the SELL kernel
    after the GEMV at every count up to it; the table lists each placement per M."""
    import json

    B = _bench_module()
    cw = CG.config_with
    assert B.held_env([]) == {}
    rows = []

    def add(kind, m, cfg, us):
        rows.append({"part": "spe", "kernel": kind, "m": m, "config": list(cfg), "us": us, "frac_peak": 0.4})

    add("cuda", 1, CG.SERVE_ONE, 58.0)
    add("cuda+sell", 1, CG.SERVE_ONE, 69.0)
    for spe, us in zip(B.SPE_VALUES, (68.0, 67.9, 62.0, 61.0)):  # spread + early fastest at one token
        add("cuda-fused", 1, cw(CG.SERVE_ONE, spe=spe), us)
    for m, plain, sell, fused in ((2, 60.0, 75.0, (80.0, 79.0, 70.0, 71.0)), (4, 64.0, 80.0, (86.0, 85.0, 74.0, 75.0))):
        add("mma", m, CG.SERVE_MMA, plain)
        add("mma+sell", m, CG.SERVE_MMA, sell)
        for spe, us in zip(B.SPE_VALUES, fused):
            add("mma-fused", m, cw(CG.SERVE_MMA, spe=spe), us)
    env = B.held_env(rows)
    one, mma = ":".join(map(str, cw(CG.SERVE_ONE, spe=3))), ":".join(map(str, cw(CG.SERVE_MMA, spe=2)))
    assert env == {"SW_HELD_ONE": one, "SW_HELD_MMA": mma, "SW_HELD_FOLD": "4"}
    add("mma", 8, CG.SERVE_MMA, 72.0)
    add("mma+sell", 8, CG.SERVE_MMA, 90.0)
    for spe, us in zip(B.SPE_VALUES, (120.0, 118.0, 95.0, 96.0)):  # inside loses at 8 tokens: fold stops at 4
        add("mma-fused", 8, cw(CG.SERVE_MMA, spe=spe), us)
    assert B.held_env(rows)["SW_HELD_FOLD"] == "4"
    rows[2]["us"] = rows[3]["us"] = rows[4]["us"] = rows[5]["us"] = 70.0  # one token: inside loses to after
    env = B.held_env(rows)
    assert env["SW_HELD_FOLD"] == "0" and env["SW_HELD_ONE"] == ":".join(map(str, CG.SERVE_ONE))  # no gain: spe 0
    rows.append({"part": "spe-check", "m": 1, "shape": "o", "early_equal": True, "spread_early_equal": True})
    rows[-1]["rel_spread"] = 1e-3
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"meta": {"device": "H100", "peak_tbs": 3.35}, "results": rows}))
    B.write_table(str(path))
    md = (tmp_path / "s.md").read_text().splitlines()
    assert "| 8 | 72.0 | 90.0 | 120.0 | 118.0 | 95.0 | 96.0 |" in md and "bitwise 1/1" in "".join(md)


def test_programmatic_dependent_launch_is_a_plan_field():
    assert CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.DEFAULT_CONFIG + (0, 0, 1)).pdl
    assert not CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu", config=CG.DEFAULT_CONFIG + (0, 1)).pdl
    assert not CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu").pdl
    # the launch configuration handed to cuLaunchKernelEx has the driver's layout (x86-64)
    assert ctypes.sizeof(CG._LaunchConfig) == 56 and CG._LaunchConfig.stream.offset == 32
    assert ctypes.sizeof(CG._LaunchAttr) == 72 and CG._LaunchAttr.value.offset == 8


def _nvrtc_or_skip():
    try:
        from torch.cuda._utils import _get_gpu_rtc_library

        return _get_gpu_rtc_library()
    except Exception as e:  # noqa: BLE001  (a CPU-only torch: no libnvrtc)
        pytest.skip(f"this torch has no NVRTC: {e}")


@pytest.mark.parametrize("arch", ["90", "80"])
def test_kernel_sources_compile_without_a_gpu(arch):
    """torch's own NVRTC (no GPU, no toolkit) compiles the kernel for Hopper and Ampere: the defaults, the tensor-core
    form with the prefetch and the PDL launch, with 8 warps (partial sums in the ring's slots), a channel-wise layer,
    a ring chunk over several groups."""
    lib = _nvrtc_or_skip()
    cases = [
        (None, 128, False, (1, 4)),
        (CG.config_with(CG.MMA_CONFIG, pf=1, pdl=1), 128, False, (8,)),
        ((4, 8, 24, 2, 1, 0, 1, 1), 128, True, (8,)),
        (CG.DEFAULT_CONFIG + (0, 0, 1), -1, False, (1,)),
        ((8, 4, 24, 2, 1, 0, 0, 1), 32, False, (2,)),
    ]
    # Humming's layouts (SW_WSWAP / SW_ZLIN): both decodings of the CUDA-core form and the tensor-core form
    cases += [
        (CG.DEFAULT_CONFIG, 128, False, (1,), CG.LAYOUT_HUMMING_SM90),
        ((4, 4, 24, 4, 1, 0), 128, False, (1,), CG.LAYOUT_HUMMING_SM90),
        (CG.MMA_CONFIG, 128, False, (8,), CG.LAYOUT_HUMMING_SM90),
        (CG.DEFAULT_CONFIG, 64, False, (1,), CG.LAYOUT_HUMMING),
        (XR_CONFIGS[0], 128, False, (2, 8), CG.LAYOUT_HUMMING_SM90),
        (XR_CONFIGS[1], -1, True, (5,)),
        (XR_ONE, 128, False, (1, 4), CG.LAYOUT_HUMMING_SM90),
    ]
    for cfg, group, sym, mts, *layout in cases:
        plan = CG.gemv_plan(4096, 4096, group, sym, torch.bfloat16, "cpu", config=cfg, layout=(layout or [0])[0])
        for mt in mts:
            assert CG.nvrtc_cubin(CG.kernel_source(plan, mt), arch, lib)[:4] == b"\x7fELF", (cfg, mt, layout)
    wide = CG.gemv_plan(4096, 4096, 128, True, torch.bfloat16, "cpu", config=(4, 8, 24, 2, 1, 0, 1, 1))
    assert wide.ralias and wide.pf and "#define SW_RALIAS 1" in CG.kernel_source(wide, 8)


def test_precompile_fills_the_disk_cache_in_parallel(monkeypatch, tmp_path):
    """Sources compiled by worker processes land in the cubin cache (each distinct source once), and a later load
    reads them from there without compiling."""
    lib = _nvrtc_or_skip()
    monkeypatch.setenv("SUPERWEIGHT_CACHE_DIR", str(tmp_path))
    plan = CG.gemv_plan(4096, 4096, 128, False, torch.bfloat16, "cpu")
    srcs = [CG.kernel_source(plan, 1), CG.kernel_source(plan, 2)]
    assert CG.precompile(srcs + srcs[:1], "90", workers=2) == 2
    assert len(list((tmp_path / "cubin").glob("*.cubin"))) == 2
    monkeypatch.setattr(CG, "nvrtc_cubin", lambda *a, **k: pytest.fail("compiled again"))
    assert CG.cached_cubin(srcs[1], "90", lib)[:4] == b"\x7fELF"


def test_channelwise_and_one_group_layers_plan_without_groups():
    assert CG.gemv_plan(4096, 4096, -1, True, torch.float16, "cpu").grows == 0
    assert CG.gemv_plan(4096, 4096, 4096, True, torch.float16, "cpu").grows == 0
    assert CG.gemv_plan(4096, 4096, 128, True, torch.float16, "cpu").grows == 8


def test_compiled_kernels_are_cached_on_disk_and_a_bad_cache_is_skipped(monkeypatch, tmp_path):
    """The cubin is compiled once per (source, architecture, NVRTC version) and read back after; an empty file is
    recompiled and replaced; a cache that cannot be written still returns the compiled code."""
    compiled = []

    def fake_nvrtc(src, arch, lib=None):
        compiled.append((src, arch))
        return f"cubin:{arch}:{len(src)}".encode()

    monkeypatch.setattr(CG, "nvrtc_cubin", fake_nvrtc)
    monkeypatch.setattr(CG, "_nvrtc_version", lambda lib: "13.0")
    root = str(tmp_path / "cache")
    a = CG.cached_cubin("src-a", "90", lib=object(), root=root)
    assert a == b"cubin:90:5" and len(compiled) == 1
    assert CG.cached_cubin("src-a", "90", lib=object(), root=root) == a and len(compiled) == 1  # from disk
    files = sorted((tmp_path / "cache" / "cubin").iterdir())
    assert len(files) == 1 and files[0].read_bytes() == a and not list((tmp_path / "cache" / "cubin").glob("*partial*"))
    CG.cached_cubin("src-a", "100", lib=object(), root=root)  # another architecture: its own entry
    CG.cached_cubin("src-b", "90", lib=object(), root=root)  # another source
    assert len(compiled) == 3
    monkeypatch.setattr(CG, "_nvrtc_version", lambda lib: "13.1")  # another compiler
    CG.cached_cubin("src-a", "90", lib=object(), root=root)
    assert len(compiled) == 4
    files[0].write_bytes(b"")  # a truncated entry is compiled again
    monkeypatch.setattr(CG, "_nvrtc_version", lambda lib: "13.0")
    assert CG.cached_cubin("src-a", "90", lib=object(), root=root) == a and len(compiled) == 5
    assert files[0].read_bytes() == a
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert CG.cached_cubin("src-a", "90", lib=object(), root=str(blocker)) == a and len(compiled) == 6


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from vllm_superweight import envs

    monkeypatch.setenv(envs.CACHE_DIR, str(tmp_path))
    assert envs.cache_dir() == str(tmp_path)
    monkeypatch.delenv(envs.CACHE_DIR)
    assert envs.cache_dir().endswith(".cache/vllm-superweight")


# ---------------------------------------------------------------------------------------------------------------
# CPU: the kernel's lane algebra, emulated on vLLM's own Marlin layout
# ---------------------------------------------------------------------------------------------------------------
def _lane_words(qm: torch.Tensor, n: int) -> torch.Tensor:
    """[R, tiles, 32 lanes, 4 words] uint32 (as int64): the 16 bytes lane ``L`` of tile ``T`` loads from row ``r``
    (``qp = qm + T * 32 + L`` over uint4s)."""
    return (qm.to(torch.int64) & 0xFFFFFFFF).view(qm.shape[0], n // 64, 32, 4)


def _nib(w: torch.Tensor, b: int) -> torch.Tensor:
    return (w >> (4 * b)) & 15


def _codes_cuda_core(words: torch.Tensor, n: int, k: int, wswap: bool = False) -> torch.Tensor:
    """The codes [N, K] as the CUDA-core form reads them (``word_fma``: column 16 u + c takes nibbles 0 / 4 / 1 / 5 at
    k = 2t / 2t + 1 / 2t + 8 / 2t + 9 of its row tile, column 16 u + 8 + c nibbles 2 / 6 / 3 / 7; with SW_WSWAP
    (Humming's sm_90 layout) 0 / 4 / 2 / 6 and 1 / 5 / 3 / 7)."""
    q = torch.full((n, k), -1, dtype=torch.int64)
    bits_a, bits_b = ((0, 4, 2, 6), (1, 5, 3, 7)) if wswap else ((0, 4, 1, 5), (2, 6, 3, 7))
    for lane in range(32):
        c, t = lane >> 2, lane & 3
        for u in range(4):
            w = words[:, :, lane, u]  # [R, tiles]
            for col, bits in ((16 * u + c, bits_a), (16 * u + 8 + c, bits_b)):
                for kk, b in zip((2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9), bits, strict=True):
                    q[col::64, kk::16] = _nib(w, b).T
    return q


def _codes_tensor_core(words: torch.Tensor, n: int, k: int, wswap: bool = False) -> torch.Tensor:
    """The codes [N, K] as the tensor-core form feeds them to ``mma.m16n8k16`` (PTX fragment rule for A, 16 x 16,
    row-major: a0 = rows g, cols 2t, 2t + 1; a1 = rows g + 8; a2 = cols + 8; a3 = both; the low half of a register
    is the lower column), with A's row i the output column 16 u + i and A's column the k of the row tile; the
    kernel makes a0 / a2 / a1 / a3 from the word shifted by 0 / 4 / 8 / 12, nibbles at bits 0-3 and 16-19 (with
    SW_WSWAP, Humming's sm_90 layout: a0 / a1 / a2 / a3)."""
    q = torch.full((n, k), -1, dtype=torch.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        frags = ((0, g, 2 * t), (4, g, 2 * t + 8), (8, g + 8, 2 * t), (12, g + 8, 2 * t + 8))
        if wswap:
            frags = ((0, g, 2 * t), (4, g + 8, 2 * t), (8, g, 2 * t + 8), (12, g + 8, 2 * t + 8))
        for u in range(4):
            w = words[:, :, lane, u]
            for shift, row, kcol in frags:
                a = w >> shift
                q[16 * u + row :: 64, kcol::16] = (a & 15).T  # low half: the lower column
                q[16 * u + row :: 64, kcol + 1 :: 16] = ((a >> 16) & 15).T
    return q


def _lane_scales_zeros(ms: torch.Tensor, mz: torch.Tensor | None, n: int, groups: int, zlin: bool = False):
    """[G, N] scales and zero points as a lane reads them (``load_scales`` / ``load_zero``: lane c's eight values at
    8 c .. 8 c + 7 of its tile, i-th for column 16 (i >> 1) + 8 (i & 1) + c; the i-th zero point at nibble
    (i >> 1) + 4 (i & 1) of Marlin's word, nibble i of Humming's: SW_ZLIN)."""
    s = torch.zeros(groups, n, dtype=torch.float64)
    z = torch.full((groups, n), 8, dtype=torch.int64)
    for tile in range(n // 64):
        for c in range(8):
            for i in range(8):
                col = tile * 64 + 16 * (i >> 1) + 8 * (i & 1) + c
                s[:, col] = ms[:, tile * 64 + 8 * c + i].double()
                if mz is not None:
                    zw = mz[:, tile * 8 + c].to(torch.int64) & 0xFFFFFFFF
                    z[:, col] = (zw >> (4 * (i if zlin else (i >> 1) + 4 * (i & 1)))) & 15
    return s, z


def _humming_layout(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, sm90: bool):
    """Humming's tensors (humming-kernels 0.1.10 as vLLM's HummingLinearKernel leaves them) from codes [N, K], scales
    and zero points [N, G]: an independent transcription of its repack kernel's and torch reorders' index maps
    (process.cuh / utils/weight.py; emulated on the CPU literally): weight [K/16, 2N] int32, scale [G, N], zero
    point [G, N/8] int32."""
    n, k = q.shape
    nn, kk = torch.arange(n)[:, None], torch.arange(k)[None, :]
    col = 128 * (nn // 64) + 16 * (nn % 8) + 4 * ((kk % 8) // 2) + (nn % 64) // 16
    if sm90:
        p = 4 * (kk % 2) + 2 * ((kk // 8) % 2) + (nn // 8) % 2
    else:
        p = 4 * (kk % 2) + 2 * ((nn // 8) % 2) + (kk // 8) % 2
    w = torch.zeros(k // 16, 2 * n, dtype=torch.int64)
    w.index_put_((kk.expand(n, k) // 16, col), q.to(torch.int64) << (4 * p), accumulate=True)
    w = ((w + 2**31) % 2**32 - 2**31).to(torch.int32)
    pos = (64 * (nn // 64) + 8 * (nn % 8) + (nn % 64) // 8).reshape(-1)
    hs = torch.empty(scales.shape[1], n, dtype=scales.dtype)
    hs[:, pos] = scales.T
    hz = None
    if zeros is not None:
        zw = torch.zeros(zeros.shape[1], n // 8, dtype=torch.int64)
        word = (8 * (nn // 64) + nn % 8).reshape(-1)
        shift = (4 * ((nn % 64) // 8)).reshape(-1)
        zw.index_add_(1, word, zeros.T.to(torch.int64) << shift)  # distinct nibbles of a word: add = or
        hz = ((zw + 2**31) % 2**32 - 2**31).to(torch.int32)
    return w, hs, hz


@pytest.mark.parametrize("sm90", [True, False])
@pytest.mark.parametrize("n,k,group,sym", [(128, 256, 64, False), (192, 512, 128, True)])
def test_both_forms_read_hummings_layout(n, k, group, sym, sm90):
    """Humming's tensors are Marlin's tile for tile: on vLLM's own (python reference) Marlin repack of the same codes,
    Humming's sm_90 words are Marlin's with each nibble's index bits 0 and 1 swapped (other GPUs: the same words),
    its scales are Marlin's, its zero points Marlin's without the 0, 2, 4, 6, 1, 3, 5, 7 interleave -- so both
    forms read them with SW_WSWAP / SW_ZLIN (GemvPlan.layout) and get the layer's codes, scales and zero points."""
    pytest.importorskip("vllm")
    from test_triton_marlin_deq import marlin_layout

    g = torch.Generator().manual_seed(n * k)
    ng = k // group
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, ng, generator=g) * 0.01 + 0.002).to(torch.bfloat16)
    zeros = None if sym else torch.randint(0, 16, (n, ng), generator=g)
    hw, hs, hz = _humming_layout(q, scales, zeros, sm90)
    qm, ms, mz = marlin_layout({"q": q, "scales": scales, "zeros": zeros, "sym": sym}, n, k, group)
    mwords = qm.to(torch.int64) & 0xFFFFFFFF
    swapped = torch.zeros_like(mwords)
    for p in range(8):
        pp = (p & 4) | ((p & 1) << 1) | ((p >> 1) & 1)
        swapped |= ((mwords >> (4 * p)) & 15) << (4 * (pp if sm90 else p))
    assert torch.equal(hw.to(torch.int64) & 0xFFFFFFFF, swapped)
    assert torch.equal(hs, ms)
    if zeros is not None:
        mzw, lin = mz.to(torch.int64) & 0xFFFFFFFF, torch.zeros(mz.shape, dtype=torch.int64)
        for nib, e in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):  # Marlin's nibble p holds element e
            lin |= ((mzw >> (4 * nib)) & 15) << (4 * e)
        assert torch.equal(hz.to(torch.int64) & 0xFFFFFFFF, lin)
    words = _lane_words(hw, n)
    assert torch.equal(_codes_cuda_core(words, n, k, wswap=sm90), q)
    assert torch.equal(_codes_tensor_core(words, n, k, wswap=sm90), q)
    assert not torch.equal(_codes_cuda_core(words, n, k, wswap=not sm90), q)  # the flag matters
    s_, z_ = _lane_scales_zeros(hs, hz, n, ng, zlin=True)
    assert torch.equal(s_, scales.T.double())
    assert torch.equal(z_, zeros.T if not sym else torch.full((ng, n), 8))
    if zeros is not None:
        assert not torch.equal(_lane_scales_zeros(hs, hz, n, ng)[1], zeros.T)
    plan = CG.gemv_plan(n, k, group, sym, torch.bfloat16, "cpu", layout=CG.LAYOUT_HUMMING_SM90 if sm90 else 2)
    src = CG.kernel_source(plan, 1)
    assert f"#define SW_WSWAP {int(sm90)}\n#define SW_ZLIN 1\n" in src
    assert "SW_WSWAP" not in CG.kernel_source(CG.gemv_plan(n, k, group, sym, torch.bfloat16, "cpu"), 1)[:600]
    with pytest.raises(ValueError, match="one-group"):  # Humming keeps the grouped scale order there
        CG.gemv_plan(n, k, k, sym, torch.bfloat16, "cpu", layout=CG.LAYOUT_HUMMING_SM90)


@pytest.mark.parametrize("n,k,group,sym", [(128, 256, 64, False), (192, 512, 128, True), (64, 384, 128, False)])
def test_both_forms_read_vllms_marlin_layout(n, k, group, sym):
    """On vLLM's own (python reference) Marlin repack of random codes: the CUDA-core form's nibble map (verified on
    the H200 against float64, session 22) and the tensor-core form's A-fragment map give the same codes, and both
    are the layer's codes; each lane's scales and zero points are its columns'; and the tensor-core form's whole
    arithmetic (exact q - z, one MMA per word and row tile with the tokens as N, fp32 group scaling, C fragment to
    columns / tokens) equals x W^T for 1-8 tokens."""
    pytest.importorskip("vllm")
    from test_triton_marlin_deq import marlin_layout

    g = torch.Generator().manual_seed(n + k)
    ng = k // group
    inputs = {
        "q": torch.randint(0, 16, (n, k), generator=g),
        "scales": (torch.rand(n, ng, generator=g) * 0.01 + 0.002).to(torch.bfloat16),
        "zeros": None if sym else torch.randint(0, 16, (n, ng), generator=g),
        "sym": sym,
    }
    qm, ms, mz = marlin_layout(inputs, n, k, group)
    assert tuple(qm.shape) == (k // 16, 2 * n)  # unpadded: what gemv_plan accepts
    words = _lane_words(qm, n)
    assert torch.equal(_codes_cuda_core(words, n, k), inputs["q"])
    assert torch.equal(_codes_tensor_core(words, n, k), inputs["q"])
    s, z = _lane_scales_zeros(ms, mz, n, ng)
    assert torch.equal(s, inputs["scales"].T.double())
    assert torch.equal(z, inputs["zeros"].T if not sym else torch.full((ng, n), 8))

    # the tensor-core form's arithmetic, fragment by fragment
    zeros = torch.full((n, ng), 8) if sym else inputs["zeros"]
    w_ref = (inputs["q"] - zeros.repeat_interleave(group, 1)).double()
    w_ref *= inputs["scales"].double().repeat_interleave(group, 1)
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).double()
        xb = torch.zeros(8, k, dtype=torch.float64)
        xb[:m] = x  # B: token c's x, zero beyond M
        y = torch.zeros(8, n, dtype=torch.float64)
        for tile in range(n // 64):
            for u in range(4):
                cols = tile * 64 + 16 * u + torch.arange(16)
                for gi in range(ng):
                    acc = torch.zeros(16, 8, dtype=torch.float64)  # D: 16 columns x 8 tokens
                    for r in range(gi * group // 16, (gi + 1) * group // 16):
                        a = inputs["q"][cols, 16 * r : 16 * r + 16].double() - z[gi, cols].double()[:, None]
                        acc += a @ xb[:, 16 * r : 16 * r + 16].T
                    y[:, cols] += (s[gi, cols][:, None] * acc).T
        torch.testing.assert_close(y[:m], x @ w_ref.T, rtol=1e-12, atol=1e-12)


def _epilogue_terms(sp, maps, x: torch.Tensor, n: int, warps: int, spd: int = 4) -> torch.Tensor:
    """The held-out terms [M, N] as the kernel's lanes gather them (fp64): lane 4 c + t of warp w owns column
    (g * warps + w) * 8 + c of each tile, its slots t + 4 d (d < spd from the registers, then the rest of the slice
    from memory), its heavy row's CSR run from hptr + t in steps of 4; the 4 lanes of a column summed."""
    ell = sp["ell_cols"].to(torch.int64) & 0xFFFFFFFF  # [blocks, L, 32]
    L = ell.shape[1]
    flat = ell.reshape(-1)
    hrng, hrows = maps["hrng"].tolist(), sp["hrows"].tolist()
    hptr, hcols = sp["hptr"].tolist(), (sp["hcols"].to(torch.int64) & 0xFFFFFFFF).tolist()
    dt = sp["ell_vals"].dtype

    def val(slot: int) -> float:
        return torch.tensor([slot >> 16], dtype=torch.int32).to(torch.int16).view(dt).double().item()

    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    groups = -(-64 // (warps * 8))
    for tile in range(n // 64):
        for g in range(groups):
            for w in range(warps):
                cb = (g * warps + w) * 8
                if cb >= 64:
                    continue
                for lane in range(32):
                    c, t = lane >> 2, lane & 3
                    col = tile * 64 + cb + c
                    blk = col >> 5
                    at = lambda dd, blk=blk, col=col: flat[(blk * L + dd) * 32 + (col & 31)].item()  # noqa: E731
                    slots = [at(t + 4 * d) for d in range(spd) if t + 4 * d < L]
                    slots += [at(dd) for dd in range(t + 4 * spd, L, 4)]
                    for h in range(hrng[blk], hrng[blk + 1]):
                        if hrows[h] == col:
                            slots += [hcols[j] for j in range(hptr[h] + t, hptr[h + 1], 4)]
                    for sl in filter(None, slots):
                        out[:, col] += val(sl) * x[:, sl & 0xFFFF].double()
    return out


@pytest.mark.parametrize("warps", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_epilogue_lanes_gather_every_held_out_term_once(warps, dtype):
    """The held-out terms as the kernel's lanes would gather them from ``prepare_sparse(pack=...)`` slots (light
    slices deeper than the registers hold, two heavy rows, values split into exact terms) equal S x for every
    column, whatever the warps a block (one or two column groups a warp)."""
    from vllm_superweight.kernels import prepare_sparse

    n, k = 128, 512
    rows, cols, vals, dense = _held_out(n, k, dtype, seed=4)
    extra = torch.arange(24)  # one light row 24 deep: slots beyond the 16 the registers hold
    rows = torch.cat([rows, torch.full((24,), 77)])
    cols, vals = torch.cat([cols, extra * 7]), torch.cat([vals, torch.linspace(-1, 1, 24)])
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense.index_put_((rows, cols), vals.double(), accumulate=True)
    sp = prepare_sparse(rows, cols, vals, n, k, "cpu", layout="sell", pack=dtype, depth=32)
    assert sp["ell_cols"].shape[1] > 16 and sp["hcols"].numel() > 0  # both the deep slices and the CSR part
    maps = CG.sparse_maps(sp, n)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _epilogue_terms(sp, maps, x, n, warps)
    want = x.double() @ dense.T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU answer")
def test_not_available_without_cuda():
    ok, why = CG.available()
    assert not ok and "CUDA" in why


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
def _layer(n, k, group, sym, dtype, seed=0):
    pytest.importorskip("vllm")
    from test_triton_marlin_deq import marlin_layout

    from vllm_superweight.kernels.triton_marlin_deq import marlin_dequant_reference

    g = torch.Generator().manual_seed(seed)
    ng = 1 if group in (-1, 0) or group >= k else k // group
    inputs = {
        "q": torch.randint(0, 16, (n, k), generator=g),
        "scales": (torch.rand(n, ng, generator=g) * 0.01 + 0.002).to(dtype),
        "zeros": None if sym else torch.randint(0, 16, (n, ng), generator=g),
        "sym": sym,
    }
    qm, ms, mz = marlin_layout(inputs, n, k, group, device="cuda")
    w = marlin_dequant_reference(qm, ms, mz, n, k, group, sym)  # [N, K] float64 on the CPU
    return qm, ms, mz, w


def _graph_of(fn):
    """A CUDA graph holding ``fn()``, captured after one warm-up call on a side stream (lazy compiles and allocations
    outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _close(y, ref, dtype, roundings=0):
    """y within the GEMV's tolerance of ``ref``, plus half a unit in the last place of ``ref``'s largest magnitude for
    each of ``roundings`` extra roundings of an intermediate y (e.g. the GEMV's output before a separate correction
    adds to it and rounds again)."""
    err = (y.double().cpu() - ref).abs().max().item()
    half_ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    tol = ((4e-3 if dtype == torch.bfloat16 else 1e-3) + roundings * half_ulp) * ref.abs().max().item() + 1e-3
    assert err <= tol, f"max |err| {err:.3g} > {tol:.3g}"


# the tensor-core form with x through the ring (SW_XR, session 32): 8-row chunks of 2 warps, 4-row chunks of 4 warps;
# the CUDA-core form's default (lean) with it
XR_CONFIGS = ((8, 2, 12, 2, 1, 0, 1, 1, 0, 1), (4, 4, 12, 2, 1, 0, 1, 1, 0, 1))
XR_ONE = (*CG.DEFAULT_CONFIG, 0, 0, 0, 1)

# the launch configurations the float-reference GPU test runs besides the default (lean) one: the exact first form
# (4 warps a block), the tensor-core form (1-8 tokens; also 2-row chunks, 3 stages); with the group constants
# prefetched through the ring (a chunk within a group, a chunk of several groups: 8 rows); the tensor-core form with
# 8 warps, its partial sums in the ring's slots (ralias), with and without the prefetch
GPU_CONFIGS = (
    (4, 4, 24, 4, 1, 0),
    CG.MMA_CONFIG,
    MMA_FIRST,
    (2, 4, 16, 3, 1, 0, 1),
    (4, 4, 24, 2, 1, 1, 0, 1),
    (8, 4, 24, 2, 1, 0, 0, 1),
    (4, 4, 24, 2, 1, 0, 1, 1),
    CG.config_with(CG.MMA_CONFIG, pdl=1),
    (8, 2, 24, 3, 1, 0, 1, 1),
    (4, 8, 24, 2, 1, 0, 1),
    (4, 8, 24, 2, 1, 0, 1, 1),
    *XR_CONFIGS,
    XR_ONE,
)

CASES = [
    # n, k, group, sym: split-K and not, every group kind, asymmetric zero points
    (4096, 4096, 128, True),
    (4096, 11008, 128, False),
    (12288, 4096, 64, False),
    (192, 528, 16, True),
    (320, 1024, 32, False),
    (256, 4096, -1, False),
    (128, 512, 512, True),
]


XR_CASES = [(4096, 11008, 128, False), (192, 528, 16, True), (256, 4096, -1, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,k,group,sym", XR_CASES, ids=[f"{n}x{k}-g{g}" for n, k, g, _ in XR_CASES])
def test_x_through_the_ring_equals_the_plain_tensor_core_form(n, k, group, sym, dtype):
    """SW_XR moves where x comes from (shared memory, copied with the weights), not the arithmetic: bit for bit the
    plain form of the same launch shape -- the tensor-core form at 2-8 tokens, the CUDA-core form at 1-4 (split-K, an
    odd K, channel-wise) -- also from an x view whose rows are not 16-byte aligned, and inside a CUDA graph."""
    qm, ms, mz, w = _layer(n, k, group, sym, dtype, seed=11)
    g = torch.Generator().manual_seed(2)
    for cfg in (*XR_CONFIGS, XR_ONE):
        xr = CG.gemv_plan(n, k, group, sym, dtype, "cuda", config=cfg)
        plain = CG.gemv_plan(n, k, group, sym, dtype, "cuda", config=cfg[:9])
        assert xr.xr and not plain.xr and (xr.u, xr.rpw, xr.splits) == (plain.u, plain.rpw, plain.splits)
        for m in (2, 5, 8) if xr.mma else (1, 3, 4):
            x = torch.randn(m, k, generator=g).to(dtype).cuda()
            want = CG.marlin_gemv_cuda(x, qm, ms, mz, plain)
            assert torch.equal(CG.marlin_gemv_cuda(x, qm, ms, mz, xr), want), (cfg, m)
            _close(want, x.double().cpu() @ w.T, dtype)
            wide = torch.zeros(m, k + 3, dtype=dtype, device="cuda")
            wide[:, 3:] = x  # rows 6 bytes past 16-byte alignment
            assert torch.equal(CG.marlin_gemv_cuda(wide[:, 3:], qm, ms, mz, xr), want), (cfg, m, "view")
        out = torch.empty_like(want)
        graph = _graph_of(lambda: CG.marlin_gemv_cuda(x, qm, ms, mz, xr, out=out))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want), (cfg, "graph")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,k,group,sym", CASES, ids=[f"{n}x{k}-g{g}-{'sym' if s else 'asym'}" for n, k, g, s in CASES])
def test_gemv_equals_float_reference(n, k, group, sym, dtype):
    qm, ms, mz, w = _layer(n, k, group, sym, dtype)
    plans = []
    for c in (None, *GPU_CONFIGS):
        try:
            plans.append(CG.gemv_plan(n, k, group, sym, dtype, "cuda", config=c))
        except ValueError as e:  # K = 528: one-row chunks, whose slots cannot hold 8 warps' 8-token sums
            assert "48 KB" in str(e) and c[1] == 8 and k // 16 % 2, (c, e)
    g = torch.Generator().manual_seed(1)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    for m in (1, 2, 3, 4, 5, 8):
        x = torch.randn(m, k, generator=g).to(dtype)
        for b in (None, bias):
            ref = x.double() @ w.T + (0 if b is None else b.double())
            for plan in plans:
                if m <= plan.max_m:
                    y = CG.marlin_gemv_cuda(x.cuda(), qm, ms, mz, plan, None if b is None else b.cuda())
                    _close(y, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 8], ids=["cuda-core", "tensor-core"])
def test_gemv_reproducible_and_graph_safe(m):
    n, k = 4096, 11008
    qm, ms, mz, w = _layer(n, k, 128, False, torch.bfloat16, seed=3)
    plan = CG.gemv_plan(n, k, 128, False, torch.bfloat16, "cuda", config=CG.MMA_CONFIG if m > 1 else None)
    assert plan.splits > 1  # the split-K path with the tile counters
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    first = CG.marlin_gemv_cuda(x, qm, ms, mz, plan)
    for _ in range(20):
        assert torch.equal(CG.marlin_gemv_cuda(x, qm, ms, mz, plan), first)
    out = torch.empty_like(first)
    graph = _graph_of(lambda: CG.marlin_gemv_cuda(x, qm, ms, mz, plan, out=out))
    out.zero_()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)])
def test_gemv_close_to_vllm_marlin_on_7b_shapes(n, k):
    pytest.importorskip("vllm")
    import vllm_linear as VL

    g = torch.Generator().manual_seed(n + k)
    wd = {
        "q": torch.randint(0, 16, (n, k), generator=g).cuda(),
        "scales": (torch.rand(n, k // 128, generator=g) * 0.01 + 0.002).to(torch.bfloat16).cuda(),
        "zeros": torch.randint(0, 16, (n, k // 128), generator=g).cuda(),
        "group": 128,
        "symmetric": False,
        "n": n,
        "k": k,
    }
    layer, kobj = VL.build_mp_layer(wd, "marlin")
    from vllm_superweight.kernels.linear.base import W_PACKED, W_SCALE, W_ZERO, tensor

    plan = CG.gemv_plan(n, k, 128, False, torch.bfloat16, "cuda")
    mma = CG.gemv_plan(n, k, 128, False, torch.bfloat16, "cuda", config=CG.MMA_CONFIG)
    for m, p in ((1, plan), (4, plan), (1, mma), (8, mma)):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
        ym = kobj.apply_weights(layer, x)
        src = getattr(kobj, "shadow", layer)
        y = CG.marlin_gemv_cuda(x, tensor(src, W_PACKED), tensor(src, W_SCALE), tensor(src, W_ZERO), p)
        rel = float((y.float() - ym.float()).norm() / ym.float().norm())
        assert rel < 5e-3, rel


def _held_out(n, k, dtype, seed):
    """Held-out entries over a light spread and two heavy rows (so both the slices and the CSR part are read),
    values exact in ``dtype`` and not, plus their dense [N, K] float64 matrix."""
    g = torch.Generator().manual_seed(seed)
    nnz = max(8, n * k // 1000)
    rows = torch.cat([torch.randint(0, n, (nnz,), generator=g), torch.full((40,), 3), torch.full((70,), n - 1)])
    cols = torch.cat(
        [
            torch.randint(0, k, (nnz,), generator=g),
            torch.randperm(k, generator=g)[:40],
            torch.randperm(k, generator=g)[:70],
        ]
    )
    vals = torch.randn(rows.numel(), generator=g) * 0.5
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense.index_put_((rows, cols), vals.double(), accumulate=True)
    return rows, cols, vals, dense


def _packed_held_out(n, k, dtype, seed):
    """``_held_out``'s entries as the epilogue reads them: packed SELL slots on the GPU, their maps, and the dense
    float64 matrix."""
    from vllm_superweight.kernels import prepare_sparse

    rows, cols, vals, dense = _held_out(n, k, dtype, seed)
    sp = prepare_sparse(rows, cols, vals, n, k, "cuda", layout="sell", pack=dtype)
    return sp, CG.sparse_maps(sp, n), dense


def epilogue_configs(k: int) -> tuple:
    """The launch configurations the held-out epilogue test runs on a layer of K ``k`` (gemv_precompile.py compiles
    them for ``gpu_run.sh spe``)."""
    cfgs: tuple = (CG.DEFAULT_CONFIG, MMA_FIRST, CG.DEFAULT_CONFIG + (0, 1), CG.MMA_CONFIG)  # the last two: prefetch
    if k // 16 % 2 == 0:  # the tensor-core form with 8 warps, its partial sums in the ring's slots
        cfgs += ((4, 8, 24, 2, 1, 0, 1),)
    cfgs += (*XR_CONFIGS, XR_ONE)  # x through the ring (both forms): the held-out twin's engines run them
    # the terms spread over the split-K blocks (SW_SPE 2) and also before the main loop (3), on the served forms
    return cfgs + tuple(CG.config_with(base, spe=spe) for base in (CG.SERVE_ONE, CG.SERVE_MMA) for spe in (2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,k,group,sym", CASES, ids=[f"{n}x{k}-g{g}" for n, k, g, s in CASES])
def test_gemv_epilogue_adds_held_out_terms_exactly(n, k, group, sym, dtype):
    """y = x (W + S)^T + b with S's packed SELL slots read in the epilogue equals the float64 reference of the
    dequantized weights plus the held-out values (light slices and heavy CSR rows, split-K and not, every group kind
    incl. channel-wise: the one-copy pair's default since session 24; M = 1..8; x through the ring or not; the
    terms in the first split-K block or spread over all, after or before the main loop), and the separate correction
    after the plain GEMV within one rounding of y."""
    from vllm_superweight.kernels import sparse_correction

    qm, ms, mz, w = _layer(n, k, group, sym, dtype, seed=7)
    sp, maps, dense = _packed_held_out(n, k, dtype, seed=n + k)
    assert sp["hcols"].numel() > 0  # the heavy rows went to the CSR part
    cfgs = epilogue_configs(k)
    plans = [CG.gemv_plan(n, k, group, sym, dtype, "cuda", config=c) for c in cfgs]
    g = torch.Generator().manual_seed(2)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    for m in (1, 2, 4, 8):
        x = torch.randn(m, k, generator=g).to(dtype)
        ref = x.double() @ (w + dense).T + bias.double()
        for plan in plans:
            if m > plan.max_m:
                continue
            y = CG.marlin_gemv_cuda(x.cuda(), qm, ms, mz, plan, bias.cuda(), sparse=sp, maps=maps)
            _close(y, ref, dtype)
            sep = sparse_correction(CG.marlin_gemv_cuda(x.cuda(), qm, ms, mz, plan, bias.cuda()), x.cuda(), sp)
            step = ref.abs().max().item() * (2**-7 if dtype == torch.bfloat16 else 2**-10)
            assert (y.double() - sep.double()).abs().max().item() <= 2 * step
    with pytest.raises(ValueError, match="packed SELL"):
        CG.marlin_gemv_cuda(x.cuda(), qm, ms, mz, plans[1], sparse=sp)  # no maps (a form 8 tokens fit)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("spe", [0, 3], ids=["first-block", "spread-early"])
def test_gemv_epilogue_is_graph_safe_and_reproducible(spe):
    n, k, dtype = 4096, 11008, torch.bfloat16
    qm, ms, mz, w = _layer(n, k, 128, False, dtype, seed=5)
    sp, maps, dense = _packed_held_out(n, k, dtype, seed=9)
    plan = CG.gemv_plan(n, k, 128, False, dtype, "cuda", config=CG.config_with(CG.SERVE_ONE, spe=spe) if spe else None)
    assert plan.splits > 1
    x = torch.randn(1, k, device="cuda").to(dtype)
    first = CG.marlin_gemv_cuda(x, qm, ms, mz, plan, sparse=sp, maps=maps)
    _close(first, x.double().cpu() @ (w + dense).T, dtype)
    out = torch.empty_like(first)
    graph = _graph_of(lambda: CG.marlin_gemv_cuda(x, qm, ms, mz, plan, out=out, sparse=sp, maps=maps))
    out.zero_()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k,group,sym", CASES, ids=[f"{n}x{k}-g{g}" for n, k, g, s in CASES])
def test_prefetched_group_constants_change_nothing(n, k, group, sym):
    """The prefetch (8th config field) moves where a group's scales and zero points are read from (shared memory,
    copied with the chunk's rows), not the arithmetic: bitwise the same y as without it, both forms, every M, with
    the held-out terms in the epilogue or not, split-K or not."""

    dtype = torch.bfloat16
    qm, ms, mz, w = _layer(n, k, group, sym, dtype, seed=11)
    sp, maps, _ = _packed_held_out(n, k, dtype, seed=n + 3)
    g = torch.Generator().manual_seed(4)
    for base in PF_BASES:
        off = CG.gemv_plan(n, k, group, sym, dtype, "cuda", config=base)
        on = CG.gemv_plan(n, k, group, sym, dtype, "cuda", config=CG.config_with(base, pf=1))
        assert on.pf == (off.grows > 0)  # (these configurations leave room for the prefetch's slots)
        for m in range(1, off.max_m + 1):
            x = torch.randn(m, k, generator=g).to(dtype).cuda()
            for kw in ({}, {"sparse": sp, "maps": maps}):
                a = CG.marlin_gemv_cuda(x, qm, ms, mz, off, **kw)
                b = CG.marlin_gemv_cuda(x, qm, ms, mz, on, **kw)
                assert torch.equal(a, b), (base, m, bool(kw))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_programmatic_dependent_launch_reads_what_the_kernels_before_it_wrote():
    """Launched as a programmatic dependent (9th config field, sm_90+; elsewhere a plain launch), the GEMV requests
    its weights before ``griddepcontrol.wait`` and reads x, the split-K workspace and y only after it: inside a CUDA
    graph whose first kernel rewrites x and whose two GEMVs (split-K, one workspace) follow back to back, every replay
    equals the plain launches on the new x, bitwise."""

    n, k, dtype = 4096, 11008, torch.bfloat16
    qm, ms, mz, w = _layer(n, k, 128, False, dtype, seed=13)
    sp, maps, _ = _packed_held_out(n, k, dtype, seed=17)
    plain = CG.gemv_plan(n, k, 128, False, dtype, "cuda")
    pdl = CG.gemv_plan(n, k, 128, False, dtype, "cuda", config=CG.DEFAULT_CONFIG + (0, 0, 1))
    assert pdl.pdl and pdl.splits > 1
    src = torch.empty(1, k, device="cuda", dtype=dtype)
    x = torch.empty_like(src)
    y1 = torch.empty(1, n, device="cuda", dtype=dtype)
    y2 = torch.empty_like(y1)

    def step():
        x.copy_(src)  # the kernel before: writes x
        CG.marlin_gemv_cuda(x, qm, ms, mz, pdl, out=y1)
        CG.marlin_gemv_cuda(x, qm, ms, mz, pdl, out=y2, sparse=sp, maps=maps)  # right after: the same workspace

    src.normal_()
    graph = _graph_of(step)
    for i in range(4):
        src.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(i)).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y1, CG.marlin_gemv_cuda(src, qm, ms, mz, plain)), i
        assert torch.equal(y2, CG.marlin_gemv_cuda(src, qm, ms, mz, plain, sparse=sp, maps=maps)), i
        step()  # eagerly too
        torch.cuda.synchronize()
        assert torch.equal(y1, CG.marlin_gemv_cuda(src, qm, ms, mz, plain)), i


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008)], ids=["qkv", "down"])
def test_sell_kernel_as_the_trig_gemvs_programmatic_dependent(n, k):
    """``sellpdl=1``: the tensor-core GEMV with SW_TRIG lets the SELL kernel after it launch at once (programmatic
    stream serialization); that kernel gathers and multiplies beside the GEMV and reads y only after
    ``griddepcontrol.wait``. Inside a CUDA graph whose first kernel rewrites x, at 5-8 tokens (past the default fold),
    every replay equals the GEMV + SELL pair launched plainly, bitwise, and the float reference of the restored
    weights within the GEMV's tolerance; with ``fold=0`` single tokens too, through the single-token form."""
    import dataclasses

    from vllm_superweight.kernels import sparse_correction

    dtype = torch.bfloat16
    qm, ms, mz, w = _layer(n, k, 128, False, dtype, seed=23)
    sp, _, dense = _packed_held_out(n, k, dtype, seed=29)
    forms = []
    for base, sizes in ((CG.SERVE_MMA, (5, 8)), (CG.SERVE_ONE, (1,))):
        plain = CG.gemv_plan(n, k, 128, False, dtype, "cuda", config=CG.config_with(base, spe=2))
        forms += [(plain, dataclasses.replace(plain, trig=True), m) for m in sizes]
    for plain, trig, m in forms:
        src = torch.empty(m, k, device="cuda", dtype=dtype)
        x = torch.empty_like(src)
        y = torch.empty(m, n, device="cuda", dtype=dtype)

        def step():
            x.copy_(src)  # the kernel before: writes x
            CG.marlin_gemv_cuda(x, qm, ms, mz, trig, out=y)
            sparse_correction(y, x, sp, pdl=True)

        src.normal_()
        graph = _graph_of(step)
        for i in range(4):
            src.copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(dtype))
            y.zero_()
            graph.replay()
            torch.cuda.synchronize()
            want = sparse_correction(CG.marlin_gemv_cuda(src, qm, ms, mz, plain), src, sp)
            assert torch.equal(y, want), (m, i)
            # the pair rounds the GEMV's y to bf16 before the SELL kernel adds to it (s38, H200: 0.121 against the
            # GEMV-alone tolerance 0.093 at 8 tokens on the qkv shape, bitwise equal to the plain pair)
            _close(y, src.double().cpu() @ (w + dense).T, dtype, roundings=1)
            y.zero_()
            step()  # eagerly too
            torch.cuda.synchronize()
            assert torch.equal(y, want), (m, i)


# ---------------------------------------------------------------------------------------------------------------
# CPU: the kernel itself under the host emulation (tests/cuda_emu.py)
# ---------------------------------------------------------------------------------------------------------------
GEMV_PARAMS = ["const uint4*", "const u16*", "const u16*", "const u32*", "const u16*", "u16*", "float*", "u32*"]
GEMV_PARAMS += ["int"] * 7 + ["u32", "u32", "const u32*", "int", "const int*", "const int*", "const int*"]
GEMV_PARAMS += ["const u32*", "int"]


def _emu_gemv(plan, x, qm, scale, zero, bias=None, sparse=None, maps=None):
    """``marlin_gemv_cuda``'s launch, argument for argument, run by the host emulation on CPU tensors."""
    cuda_emu = pytest.importorskip("cuda_emu")
    if cuda_emu.compiler() is None:
        pytest.skip("no host C++20 compiler with <barrier> and _Float16 (tests/cuda_emu.py)")
    m = x.shape[0]
    lib = cuda_emu.build(CG.kernel_source(plan, m), "sw_marlin_gemv", GEMV_PARAMS)
    y = torch.full((m, plan.n), float("nan"), dtype=x.dtype)
    ws = torch.full((plan.splits * plan.max_m * plan.n,), float("nan"), dtype=torch.float32)
    cnt = torch.zeros(plan.tiles, dtype=torch.int32)
    dummy = qm
    ell = hr = hp = hc = hg = None
    if sparse is not None:
        ell, hr, hp, hc, hg = sparse["ell_cols"], sparse["hrows"], sparse["hptr"], sparse["hcols"], maps["hrng"]
    args = [qm, x, scale, zero if zero is not None else dummy, bias if bias is not None else dummy, y, ws, cnt]
    args += [m, plan.n, plan.k // 16, x.stride(0), y.stride(0), plan.rpw, int(bias is not None)]
    args += list(CG.launch_constants(plan))
    args += [ell if ell is not None else dummy, ell.shape[1] if ell is not None else 0]
    args += [t if t is not None else dummy for t in (hg, hr, hp, hc)] + [int(ell is not None)]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    bad = cuda_emu.launch(lib, (plan.tiles, plan.splits), plan.warps * 32, 0, args, check=tensors)
    assert bad == 0, f"{bad} loads outside the buffers passed"
    assert torch.equal(cnt, torch.zeros_like(cnt)), "the split-K counters were not re-armed"
    return y


def _codes_layer(n, k, group, sym, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ng = 1 if group in (-1, 0) or group >= k else k // group
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, ng, generator=g) * 0.01 + 0.002).to(dtype)
    zeros = None if sym else torch.randint(0, 16, (n, ng), generator=g)
    z = torch.full((n, ng), 8) if sym else zeros
    gs = k // ng
    w = (q - z.repeat_interleave(gs, 1)).double() * scales.double().repeat_interleave(gs, 1)
    return q, scales, zeros, w


EMU_CONFIGS = {  # the default (lean CUDA-core), the exact CUDA-core form, the tensor-core form (prefetch), 8 warps
    "lean": CG.DEFAULT_CONFIG,
    "exact": (4, 4, 24, 4, 1, 0),
    "mma": CG.MMA_CONFIG,
    "mma-w8": (4, 8, 24, 2, 1, 0, 1),
    "mma-xr": XR_CONFIGS[0],  # x through the ring (SW_XR): B fragments from shared memory
    "lean-xr": XR_ONE,
}


@pytest.mark.parametrize("layout", ["marlin", "humming-sm90", "humming"])
@pytest.mark.parametrize("cfg", list(EMU_CONFIGS))
@pytest.mark.parametrize("n,k,group,sym", [(128, 512, 64, False), (192, 1024, 128, True)])
def test_host_emulated_gemv_vs_reference(n, k, group, sym, cfg, layout):
    """The GEMV's own CUDA source run on the CPU (tests/cuda_emu.py: host threads, warp-exchange MMA with the PTX
    fragment layout) over Marlin's and Humming's layouts: y = x (W + S)^T + b equals the float64 reference of the
    dequantized codes plus the held-out terms (light slices and heavy rows, read in the epilogue), with and without
    split-K (the second shape: 2 blocks a tile with these configurations' planning), and without the held-out terms
    equals x W^T + b -- every form the GPU runs, including session 29's tensor-core form over Humming's tensors with
    the terms inside, which no GPU has run yet."""
    dtype = torch.bfloat16
    q, scales, zeros, w = _codes_layer(n, k, group, sym, dtype, seed=n + k)
    if layout == "marlin":
        pytest.importorskip("vllm")
        from test_triton_marlin_deq import marlin_layout

        qm, ms, mz = marlin_layout({"q": q, "scales": scales, "zeros": zeros, "sym": sym}, n, k, group)
        lay = CG.LAYOUT_MARLIN
    else:
        qm, ms, mz = _humming_layout(q, scales, zeros, sm90=layout == "humming-sm90")
        lay = CG.LAYOUT_HUMMING_SM90 if layout == "humming-sm90" else CG.LAYOUT_HUMMING
    plan = CG.gemv_plan(n, k, group, sym, dtype, "cpu", config=EMU_CONFIGS[cfg], layout=lay)
    if k == 1024:
        assert plan.splits > 1
    from vllm_superweight.kernels import prepare_sparse

    rows, cols, vals, dense = _held_out(n, k, dtype, seed=3)
    sp = prepare_sparse(rows, cols, vals, n, k, "cpu", layout="sell", pack=dtype)
    maps = CG.sparse_maps(sp, n)
    assert sp["hcols"].numel() > 0
    g = torch.Generator().manual_seed(1)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    # ~20 terms a row, all in slices (depth = the longest row): the slots past the ones a lane keeps in registers
    flat = torch.randperm(n * k, generator=torch.Generator().manual_seed(4))[: 20 * n]
    r2, c2 = flat // k, flat % k
    v2 = (torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5)) * 0.5).to(dtype).float()  # 1 slot each
    deep = torch.zeros(n, k, dtype=torch.float64)
    deep.index_put_((r2, c2), v2.double(), accumulate=True)
    sp2 = prepare_sparse(r2, c2, v2, n, k, "cpu", layout="sell", pack=dtype, depth=int(torch.bincount(r2).max()))
    assert sp2["ell_cols"].shape[1] > 16 and sp2["hcols"].numel() == 0
    for i, m in enumerate((1, 3) if not plan.mma else (2, 8)):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = _emu_gemv(plan, x, qm, ms, mz, bias, sp, maps)
        _close(y, x.double() @ (w + dense).T + bias.double(), dtype)
        y0 = _emu_gemv(plan, x, qm, ms, mz, bias)
        _close(y0, x.double() @ w.T + bias.double(), dtype)
        if i == 0:
            y2 = _emu_gemv(plan, x, qm, ms, mz, None, sp2, CG.sparse_maps(sp2, n))
            _close(y2, x.double() @ (w + deep).T, dtype)


@pytest.mark.parametrize("cfg", ["lean", "mma"])
def test_host_emulated_gemv_fp16_and_channelwise(cfg):
    """fp16 activations (the tensor-core form's fp16 MMA and its 1024 + q decoding) on a channel-wise layer over
    Marlin's layout (Marlin's single-scale permutation)."""
    pytest.importorskip("vllm")
    from test_triton_marlin_deq import marlin_layout

    n, k, dtype = 128, 256, torch.float16
    q, scales, zeros, w = _codes_layer(n, k, -1, False, dtype, seed=5)
    qm, ms, mz = marlin_layout({"q": q, "scales": scales, "zeros": zeros, "sym": False}, n, k, -1)
    plan = CG.gemv_plan(n, k, -1, False, dtype, "cpu", config=EMU_CONFIGS[cfg])
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    _close(_emu_gemv(plan, x, qm, ms, mz), x.double() @ w.T, dtype)


@pytest.mark.parametrize("cfg", ["lean-xr", "mma-xr", "mma"])
def test_host_emulated_held_out_placement(cfg):
    """SW_SPE (the 11th field) moves the held-out terms before the main loop (bit 0) and spreads a lane's slot rounds
    and heavy-row entries over the tile's split-K blocks (bit 1). Under the host emulation, on a split-K shape with
    heavy rows and with slices deeper than a lane's registers: before = after bit for bit (same sums, same order),
    spread early = spread late bit for bit, and spread equals the float64 reference (each term in exactly one
    block's partial: a term dropped or added twice would show)."""
    dtype = torch.bfloat16
    n, k, group, sym = 192, 1024, 128, True
    q, scales, zeros, w = _codes_layer(n, k, group, sym, dtype, seed=n + k)
    qm, ms, mz = _humming_layout(q, scales, zeros, sm90=True)
    from vllm_superweight.kernels import prepare_sparse

    rows, cols, vals, dense = _held_out(n, k, dtype, seed=3)
    flat = torch.randperm(n * k, generator=torch.Generator().manual_seed(4))[: 68 * n]
    r2, c2 = flat // k, flat % k
    v2 = (torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5)) * 0.5).to(dtype).float()
    rows, cols = torch.cat([rows, r2]), torch.cat([cols, c2])
    vals = torch.cat([vals.float(), v2])
    dense = dense.clone()
    dense.index_put_((r2, c2), v2.double(), accumulate=True)
    sp = prepare_sparse(rows, cols, vals, n, k, "cpu", layout="sell", pack=dtype, depth=80)
    assert sp["hcols"].numel() > 0  # heavy rows
    maps = CG.sparse_maps(sp, n)
    plans = {
        spe: CG.gemv_plan(
            n,
            k,
            group,
            sym,
            dtype,
            "cpu",
            config=CG.config_with(EMU_CONFIGS[cfg], spe=spe),
            layout=CG.LAYOUT_HUMMING_SM90,
        )
        for spe in (0, 1, 2, 3)
    }
    # slices deeper than a lane's registers hold even when spread (4 lanes x SW_SPD 4 rounds x S blocks)
    assert plans[2].splits > 1 and sp["ell_cols"].shape[1] > 16 * plans[2].splits and plans[3].spe == 3
    g = torch.Generator().manual_seed(1)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    m = 1 if cfg == "lean-xr" else 8
    x = torch.randn(m, k, generator=g).to(dtype)
    y = {spe: _emu_gemv(p, x, qm, ms, mz, bias, sp, maps) for spe, p in plans.items()}
    assert torch.equal(y[1], y[0])
    assert torch.equal(y[3], y[2])
    ref = x.double() @ (w + dense).T + bias.double()
    _close(y[2], ref, dtype)
    _close(y[0], ref, dtype)
    with pytest.raises(ValueError, match="spe"):
        CG.gemv_plan(n, k, group, sym, dtype, "cpu", config=CG.config_with(EMU_CONFIGS[cfg], spe=4))
