"""benchmarks/diag/gemv_sass.py (no GPU): the CUDA GEMV's chunk loop, compiled by NVRTC and disassembled."""

import subprocess

import pytest
import torch
from bench_module import load

from vllm_superweight.kernels import cuda_marlin_gemv as CG


def _sass(plan, mt, tmp_path):
    gs = load("diag/gemv_sass")
    nd = gs.nvdisasm()
    if nd is None:
        pytest.skip("no nvdisasm (Triton's bundled one)")
    try:
        cub = CG.cached_cubin(CG.kernel_source(plan, mt), "90")
    except Exception as e:  # noqa: BLE001  (a torch without NVRTC)
        pytest.skip(f"NVRTC unavailable: {e}")
    path = str(tmp_path / f"k{mt}.cubin")
    with open(path, "wb") as f:
        f.write(cub)
    return gs, cub, subprocess.run([nd, "-c", path], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("mt", [1, 2, 8])
def test_tensor_core_chunk_loop_holds_one_mma_a_word(mt, tmp_path):
    """SERVE_MMA's chunk (4 rows x 4 words a lane) is 16 HMMA and its ring copies, whatever the token count; the
    cubin's own attributes give registers (no spills) and the static shared memory, which grows with the x slices."""
    plan = CG.gemv_plan(12288, 4096, 128, False, torch.bfloat16, "cpu", config=CG.SERVE_MMA)
    gs, cub, sass = _sass(plan, mt, tmp_path)
    ops = gs.main_loop(sass, "HMMA")
    assert ops["HMMA"] == 16 and ops["LDGSTS"] >= 4 and ops["HADD2"] == 64  # 4 rows x 4 words x 4 pairs
    # session 34: the group check on the chunk's first row only and x's B fragments read without a branch -- the
    # loop was 567 / 691 / 621 instructions at 1 / 2 / 8 tokens with a divergent pair and a shared-window S2R on
    # every row at 2-4 tokens; now ~420-480 with one divergent pair or fewer a row
    assert sum(ops.values()) < 520 and ops["BSSY"] <= 4 and ops["S2R"] <= 4, dict(ops)
    info = gs.cubin_info(cub)
    assert 32 <= info["regs"] <= 255 and info.get("frame_bytes", 0) == 0
    ring = plan.warps * plan.stages * plan.u * (512 + 32 * mt)  # weights + x slices (SW_XR)
    assert ring < info["smem_bytes"] < ring + 16 * 1024


def test_cuda_core_chunk_loop_is_found_not_the_epilogue(tmp_path):
    """The CUDA-core form's chunk loop (8 FMAs a nibble word's 8 values, 16 words a chunk) -- not the held-out
    epilogue's gather loops, which hold FFMA too but no ring copies."""
    plan = CG.gemv_plan(4096, 11008, 128, False, torch.bfloat16, "cpu", config=CG.SERVE_ONE)
    gs, _, sass = _sass(plan, 1, tmp_path)
    ops = gs.main_loop(sass, "FFMA")
    assert ops["FFMA"] >= 128 and ops["LDGSTS"] >= 4 and ops["HMMA"] == 0
    assert not gs.main_loop("no code here", "FFMA")


@pytest.mark.parametrize("cfg,mt", [(CG.SERVE_MMA, 8), (CG.SERVE_ONE, 1)], ids=["tensor-core-8", "cuda-core-1"])
def test_split_k_sum_requests_every_partial_before_adding(cfg, mt, tmp_path):
    """The tile's last split-K block (after its counter's atomic) requests all of a thread's partials -- its outputs
    x up to 8 splits -- before the first add (session 35; the loop it replaced waited one L2 round trip per output
    and per 4 splits: 4 outputs a thread at 8 tokens), and holds no spills for it."""
    import re

    plan = CG.gemv_plan(4096, 11008, 128, False, torch.bfloat16, "cpu", config=cfg)
    assert plan.splits > 1
    gs, cub, sass = _sass(plan, mt, tmp_path)
    ins = [m.group(1) for line in sass.splitlines() if (m := re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line))]
    tail = ins[next(i for i, op in enumerate(ins) if op.startswith("ATOM") or " ATOM" in op) :]
    loads = [i for i, op in enumerate(tail) if "LDG.E.STRONG" in op]
    adds = [i for i, op in enumerate(tail) if re.match(r"(@!?U?P\d+ )?FADD", op)]
    ept = -(-mt * 64 // (plan.warps * 32))
    assert len(loads) == 8 * ept, len(loads)
    assert max(loads) < min(a for a in adds if a > loads[0])
    assert gs.cubin_info(cub).get("frame_bytes", 0) == 0


@pytest.mark.parametrize("mt", [1, 2, 8])
def test_trig_plan_lets_dependents_launch_and_changes_nothing_else(mt, tmp_path):
    """SW_TRIG (the plan the SELL kernel follows as a programmatic dependent, ``sellpdl=1``: the tensor-core form,
    with ``fold=0`` also the single-token form): one ``griddepcontrol.launch_dependents`` (SASS ``PREEXIT``) more, the
    same registers, no spills; the plain plan's source defines nothing new (its cached kernels keep their keys) and
    holds no such instruction."""
    import dataclasses
    import re

    base = CG.SERVE_ONE if mt == 1 else CG.SERVE_MMA
    plan = CG.gemv_plan(12288, 4096, 128, False, torch.bfloat16, "cpu", config=CG.config_with(base, spe=2))
    trig = dataclasses.replace(plan, trig=True)
    assert "SW_TRIG 1" in CG.kernel_source(trig, mt) and "#define SW_TRIG 1" not in CG.kernel_source(plan, mt)
    ops = {}
    for name, p in (("plain", plan), ("trig", trig)):
        gs, cub, sass = _sass(p, mt, tmp_path)
        ops[name] = [
            m.group(1) for line in sass.splitlines() if (m := re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line))
        ]
        ops[name + "-info"] = gs.cubin_info(cub)
    assert sum("PREEXIT" in op for op in ops["trig"]) == 1 and not any("PREEXIT" in op for op in ops["plain"])
    assert ops["trig-info"]["regs"] == ops["plain-info"]["regs"] and ops["trig-info"].get("frame_bytes", 0) == 0
