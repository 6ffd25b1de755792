"""Every environment knob of vllm-superweight, in one place, read lazily (at the call, never at import).

Only what users need is a knob:

=================================  =========================================================================
``SUPERWEIGHT_DISABLE_CORRECTION``  ``1``: serve without the exact sparse correction (super weights and held-out
                                    weights stay 0): an ablation switch, read by the engine's front end.
``SUPERWEIGHT_W4_KERNEL``           weight-only GEMM choice: ``auto`` (default: the first kernel of the priority list in
                                    ``kernels/linear`` that this machine can run: on a Hopper GPU with
                                    ``humming-kernels`` installed, unsplit layers, ``humming-gemv`` (ONE copy, since
                                    s36: H100 1.39x / 1.27x / 1.06x AWQ at batch 1 / 8 / 64); else on CUDA the
                                    ``marlin-deq1`` pair for checkpoints with a hold-out >= 1e-4, the ``dual`` pair for
                                    the others), ``vllm`` (vLLM's single kernel, never a per-batch pair: one W4 copy),
                                    ``dual`` (Marlin for small batches, Machete above, two W4 copies, correction
                                    separate), ``marlin-deq1`` (Marlin + the packed SELL correction for small batches;
                                    large ones dequantize from Marlin's own copy with the held-out values restored, then
                                    cuBLAS: ONE W4 copy), ``marlin-deq`` (the same pair over a second W4 copy in our own
                                    layout: H200, saturated +3.5-4%, twice the weight memory), ``marlin``, ``machete``,
                                    ``torch`` (the dequantize-once fallback), ``cpu-int4`` (torch's own CPU int4 GEMM;
                                    the default where vLLM's build has no ``cpu_gemm_wna16``), ``fused`` (our Triton W4
                                    GEMM with the held-out correction inside; opt-in: slower than AWQ at 8-256 tokens),
                                    ``humming`` (vLLM's Humming backend, ONE copy for every batch, correction separate;
                                    opt-in, needs ``pip install vllm-superweight[humming]`` and nvcc at run time:
                                    measurements and limits in ``kernels.linear.weight_only.HummingKernel``),
                                    ``marlin-humming`` (Marlin for small batches, Humming above: two copies; opt-in, not
                                    measured end to end), ``humming-gemv`` (ONE Humming copy; single tokens through our
                                    CUDA GEMV over Humming's own tensors, checked against Humming at load; held-out
                                    layers: the one-copy pair's paths, large batches dequantized from Humming's tensors;
                                    its GEMV serves 1-8 tokens on every layer unless ``SUPERWEIGHT_CUDA_GEMV`` says
                                    otherwise; H100 s36, 1.39x / 1.27x / 1.06x AWQ at batch 1 / 8 / 64 from one copy). A
                                    forced kernel that cannot run a layer is an error.
``SUPERWEIGHT_MARLIN_MAX_M``        largest batch (tokens) the per-batch pair sends to Marlin (default 48; 32 for
                                    ``marlin-humming``).
``SUPERWEIGHT_DEQUANT_MIN_M``       smallest batch (tokens) the ``marlin-deq`` pair serves by dequantizing into a
                                    scratch and one cuBLAS GEMM (default 96; the one-copy pair uses 256 for
                                    layers with a hold-out below 1e-4, where Marlin is faster up to there; the one
                                    Humming copy uses 384, its crossover measured on an H100 in s40).
``SUPERWEIGHT_ONECOPY_CONFIG``      launch configurations of the ``marlin-deq1`` kernels, as the micro-benchmark
                                    found them best on this GPU (``w4_fused_bench.py --sections onecopy``):
                                    ``deq=BN:WARPS[:SCATTER],corr=sell|inside|KIND:ROWS:SLOTS:WARPS,gemv=MAX_M``
                                    (any part may be left out; ``corr=inside`` (default where K <= 65536): the
                                    packed slots read in the CUDA GEMV's epilogue where it serves the batch (see
                                    SUPERWEIGHT_CUDA_GEMV; H200, 7B layer: 66.4 us vs 71.6 after it), the packed
                                    SELL correction kernel elsewhere; ``corr=sell``: that kernel after the GEMV
                                    too; the other kinds read the restore index;
                                    ``gemv=MAX_M`` (<= 4): batches of up to MAX_M tokens run the GEMV over
                                    Marlin's layout with the correction in its epilogue, ``gemv=0`` never).
``SUPERWEIGHT_CUDA_GEMV``           ``MAX_M`` (0-8): CUDA batches of up to MAX_M tokens that the per-batch pairs send
                                    to Marlin run our GEMV over Marlin's own tensors instead
                                    (``kernels.cuda_marlin_gemv``; compiled at load by torch's NVRTC, cached on
                                    disk); the one-copy pair adds its held-out terms in the GEMV's epilogue
                                    (``SUPERWEIGHT_ONECOPY_CONFIG=corr=sell``: after it). ``1`` (default; the one
                                    Humming copy's: ``8``, ``layers=all``, held-out terms spread over the
                                    split-K blocks -- SW_SPE 2 -- and ``fold=0,sellpdl=1`` on Hopper, as measured
                                    on the H100 in s36 and s39; any part given replaces only that part): single
                                    tokens, its CUDA-core form (H200, 7B layer: 0.89x Marlin's time; end to end, 0.1 %
                                    hold-out, one copy: batch 1 0.751 s vs Marlin's 0.807, AWQ 0.981). ``2``-``8``:
                                    also 2..MAX_M tokens, through its tensor-core form (opt-in: correct on the
                                    H200; s31: 61.5 / 65.1 / 68.4 us a 7B layer at 2 / 4 / 8 tokens vs Marlin's
                                    65.6 / 66.8 / 66.3). The one-copy kernels (the held-out default's Marlin
                                    copy, ``humming-gemv``) send only layers with held-out terms there; their
                                    other layers keep Marlin / Humming from 2 tokens. ``0``: Marlin.
                                    ``MAX_M@one=U:WARPS:PER_SM:STAGES[:MINB:LEAN:MMA:PF:PDL:XR:SPE],mma=...``: the
                                    launch configuration of either form (``kernels.cuda_marlin_gemv.CONFIG_FIELDS``;
                                    ``cuda_gemv_bench.py --recommend-env`` writes the fastest it measured; default
                                    ``SERVE_ONE`` / ``SERVE_MMA``, x through the ring: H100, s34, batch 1 0.731 s
                                    vs 0.820 without, one Humming copy);
                                    ``,layers=all``: the one-copy kernels send every layer there, not only held-out
                                    ones (s31: the tensor-core form is faster than Humming at 2-8 tokens);
                                    ``,fold=N`` (0-8, default 1; 4 where the plans spread the terms; 0 with
                                    ``sellpdl``, the one Humming copy's default on Hopper): held-out
                                    layers add their terms inside the
                                    GEMV's epilogue for batches of up to N tokens; the larger batches it serves
                                    run it without them, then the separate SELL correction (H200, s31, 7B layer,
                                    0.1 % everywhere, us at 2 / 4 / 8 tokens: inside 74.4 / 80.4 / 96.2, after it
                                    71.8 / 76.5 / 83.8; one token, s24: inside 66.4, after 71.6).
                                    ``,sellpdl=1|0`` (one Humming copy on Hopper, ignored elsewhere: on by
                                    default since s39, and the fold then 0): past the fold the GEMV is built
                                    to let the SELL kernel after it start at once (programmatic dependent
                                    launch; same sums, bitwise); with ``fold=0`` single tokens too. H100, s39,
                                    7B layer, us at 1 / 2 / 4 / 8 tokens: 61.6 / 64.9 / 68.2 / 77.5 vs the terms
                                    inside 64.2 / 70.0 / 73.4 / 84.0; end to end, 0.1 % q/k/v hold-out: batch
                                    1 / 8 0.736 / 0.988 s vs 0.764 / 0.998 (``sellpdl=0``: the s36-s38
                                    defaults, terms inside up to 4 tokens).
``SUPERWEIGHT_CACHE_DIR``           where compiled kernels and assembled model files are kept (default
                                    ``~/.cache/vllm-superweight``); unwritable: nothing is cached.
``SUPERWEIGHT_SPARSE_TILES``        launch parameters of the separate SELL correction (both pairs' small
                                    batches): ``bmd=TOKENS,tmin=M,bmt=TOKENS,tile=ELEMS,unroll=0|1,warps=W,wt=W``
                                    (any subset): tokens per program on the direct path, the smallest M of the
                                    transposed path, tokens per program there, gathered elements per step, the
                                    slice depth as one unrolled pass, warps per program on the direct path
                                    (default: from the tile) and on the transposed path (default 4). Segments by
                                    batch size: ``A;128:wt=8`` = A at every batch, the second part added from 128
                                    tokens (``;``-separated, later wins); from
                                    ``w4_fused_bench.py --sections onecopy`` (its ``sparse_tiles_env``),
                                    ``--sections unroll`` and ``sparse_bench.py``.
``SUPERWEIGHT_SPARSE_OVERLAP``      ``1``: where the separate SELL correction follows a W4 GEMM on CUDA (the small
                                    batches of the one-copy pairs and of ``humming-gemv``), it runs on a side
                                    stream while the GEMM runs, into a float32 buffer added to the GEMM's output
                                    after it (one rounding, as in place). Measured slower on the H200 (s29: 53.3
                                    vs 45.9 us a 7B qkv layer at 64 tokens, +3.8% at batch 64 end to end: the
                                    GEMM leaves no SM free); an experiment, kept for other GPUs. ``0`` (default):
                                    after the GEMM, in place.
``SUPERWEIGHT_SPARSE_PANEL``        ``1`` (or ``mb=TOKENS,warps=W,per_sm=B,max_m=M,blocks=B``, any subset): the
                                    separate SELL correction on CUDA (packed slots, 16-bit x and y, up to ``max_m``
                                    tokens, default 96) through ``kernels.cuda_sell``: each block copies x's rows
                                    of up to ``mb`` tokens (default 16) into shared memory once and its warps read
                                    every term's tokens there -- no transpose kernel, no gather from global memory
                                    per term (``blocks``: blocks in all, default SMs x blocks an SM). Opt-in and
                                    SLOWER (H200, s31, 7B q/k/v after Marlin: 10.6 vs 7.1 us at 8 tokens, 32.1 vs
                                    14.3 at 64; correct, kept for study); unset or ``0``: the Triton
                                    kernel (``SUPERWEIGHT_SPARSE_TILES``), which also serves whatever this kernel
                                    does not take.
``SUPERWEIGHT_HUMMING_RANGES``      ``T1,T2,...,Tn`` (increasing token counts): vLLM's Humming backend (the ``humming``
                                    kernel modes) gets ONE kernel for each range (0, T1], (T1, T2], ... (Tn, inf)
                                    -- Humming's own heuristic configuration at the range's top (at 8192 for the
                                    last) -- instead of its full table (92 ranges, 28 distinct kernels a 7B layer
                                    shape, each compiled / loaded at the shape's first batch: 12-25 s a shape on the
                                    H200, s29). Opt-in (session 30; s31, H200: 8 kernels, ~2 s a shape with
                                    pyelftools): fewer kernels, tiles sized for the range's top. Since s31 the
                                    symbol reader below removes most of the start-up anyway. Unset: Humming's table.
``SUPERWEIGHT_HUMMING_FAST_ELF``     ``1`` (default): Humming's two cubin symbol lookups (a kernel's mangled name, a
                                    config value) read the ELF with ``struct`` (``kernels.cubin``) instead of
                                    pyelftools -- ~0.25 s a kernel, 23-26 s a 7B shape's first batch on the H200
                                    (session 31; Humming's table on the CPU, warm cache: 0.4 s a shape vs 10); the
                                    first lookup is checked against Humming's own. ``0``: Humming's.
``SUPERWEIGHT_W8A8_AZP``            ``1`` (default): CUDA W8A8 layers with per-token activations carry their first
                                    outlier channel through vLLM's CUTLASS per-token zero-point epilogue
                                    (``cutlass_scaled_mm_azp``: no side product for it; the others, if any, stay
                                    a side product); ``0``: every outlier channel as a side product. H200, 7B
                                    shape, same lease: +0.8-2.4% at every batch over ``0`` (session 12).
``SUPERWEIGHT_W8A8_TRITON``         ``MAX_M[/OUT_MAX_M][@M1:KEY=V,..;M2:...]`` (keys bn, bk, warps, stages, swap,
                                    bm, tma, ws): CUDA W8A8 batches of up to MAX_M tokens run our Triton int8 GEMM
                                    with every outlier channel in its epilogue (``kernels.triton_int8_mm``), larger
                                    ones CUTLASS; OUT_MAX_M (default MAX_M) is the same bound for layers that HAVE
                                    outlier channels (above it they pay CUTLASS's zero-point epilogue, +1-9 %);
                                    after ``@``, launch configurations per M bucket (bucket = the smallest listed M
                                    >= the batch; from ``kernel_bench.py --sections w8`` / ``w8big``); ``0``:
                                    CUTLASS only. Unset on Hopper: ``32/64`` (MAX_M 32: H200, session 13,
                                    1.05-1.07x SmoothQuant's layer at M <= 16, batch-1 latency 1.055x; OUT_MAX_M
                                    64: H100, session 43, batch 64 1.004x SmoothQuant vs 0.974x with 32); 0 on
                                    other GPUs (not measured there).
``SUPERWEIGHT_W8A8_GRAPH_SPLIT``    ``1``: CUDA W8A8 layers with per-token activations trace their activation split
                                    (int8 quantization without the outlier channels) into the compiled graph as
                                    torch ops, so Inductor fuses it into the kernel that produces x (RMSNorm,
                                    SiLU * up) -- one pass over x and one graph node a layer fewer; ``0``
                                    (default): our Triton split kernel. Same-lease A/B on the H100 (session 51,
                                    32 layers): 1.4 % faster saturated, 1.2 % / ~2.5 % slower at batch 1 / 8 --
                                    not better everywhere, so opt-in.
``SUPERWEIGHT_CPU_W4A8``            ``1``: on CPUs with AMX, W4 layers take vLLM's W4A8 GEMM (activations int8 per
                                    token; ~6x faster at one token than the 16-bit path) with the checkpoint's
                                    activation-outlier channels (the sidecar's list) kept out of the int8
                                    quantization and added back as a 16-bit product. Opt-in: costs quality (SmolLM2
                                    WikiText-2 32.88 vs 32.51, session 16); ignored where the CPU has no AMX.
``SUPERWEIGHT_WIKITEXT``            the WikiText-2 raw test file ``superweight eval`` reads by default.
``SUPERWEIGHT_DEBUG``               ``1``: the CLIs print the traceback of an internal error, not one line.
=================================  =========================================================================

vLLM's own ``VLLM_DISABLED_KERNELS`` (comma-separated class names) is honoured too: naming one of our kernel
classes (or the vLLM kernel it wraps) skips it in the priority list.
"""

from __future__ import annotations

import functools
import os

DISABLE_CORRECTION = "SUPERWEIGHT_DISABLE_CORRECTION"
WIKITEXT = "SUPERWEIGHT_WIKITEXT"
DEBUG = "SUPERWEIGHT_DEBUG"
W4_KERNEL = "SUPERWEIGHT_W4_KERNEL"
MARLIN_MAX_M = "SUPERWEIGHT_MARLIN_MAX_M"
DEQUANT_MIN_M = "SUPERWEIGHT_DEQUANT_MIN_M"
CPU_W4A8 = "SUPERWEIGHT_CPU_W4A8"

ONECOPY_CONFIG = "SUPERWEIGHT_ONECOPY_CONFIG"
W8A8_AZP = "SUPERWEIGHT_W8A8_AZP"
W8A8_TRITON = "SUPERWEIGHT_W8A8_TRITON"
W8A8_GRAPH_SPLIT = "SUPERWEIGHT_W8A8_GRAPH_SPLIT"
_INT8_MM_KEYS = ("bn", "bk", "warps", "stages", "swap", "bm", "tma", "ws")
SPARSE_TILES = "SUPERWEIGHT_SPARSE_TILES"
SPARSE_OVERLAP = "SUPERWEIGHT_SPARSE_OVERLAP"
SPARSE_PANEL = "SUPERWEIGHT_SPARSE_PANEL"
HUMMING_RANGES = "SUPERWEIGHT_HUMMING_RANGES"
HUMMING_FAST_ELF = "SUPERWEIGHT_HUMMING_FAST_ELF"
CUDA_GEMV = "SUPERWEIGHT_CUDA_GEMV"
#: vLLM's batch-invariant mode (deterministic kernels; ``auto`` then keeps the Marlin / Machete pair)
BATCH_INVARIANT = "VLLM_BATCH_INVARIANT"
DEFAULT_CUDA_GEMV_MAX_M = 1
DEFAULT_CUDA_GEMV_FOLD = 1
CACHE_DIR = "SUPERWEIGHT_CACHE_DIR"
_TILE_KEYS = {
    "bmd": "bm_direct",
    "tmin": "transpose_min_m",
    "bmt": "bm_transposed",
    "tile": "tile_elems",
    "unroll": "unroll",
    "warps": "warps",
    "wt": "warps_t",
}
W4_KERNEL_MODES = (
    "auto",
    "dual",
    "vllm",
    "marlin",
    "machete",
    "torch",
    "cpu-int4",
    "fused",
    "marlin-deq",
    "marlin-deq1",
    "humming",
    "marlin-humming",
    "humming-gemv",
)
# Marlin / Humming crossover (benchmarks/results/kernel_bench_humming_s18_h200.json, 7B layer, us: M = 32 82.1 vs
# 83.1, M = 48 98.8 vs 89.0)
DEFAULT_HUMMING_MARLIN_MAX_M = 32
DEFAULT_MARLIN_MAX_M = 48  # crossover measured by benchmarks/kernel_bench.py (section w4sweep) on an H100
DEFAULT_DEQUANT_MIN_M = 96  # Marlin + separate correction vs dequantize + cuBLAS, 0.1 % hold-out, H200


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def disable_correction() -> bool:
    return _flag(DISABLE_CORRECTION)


def cpu_w4a8() -> bool:
    """Opt-in: vLLM's CPU W4A8 GEMM (AMX) for W4 layers, the sidecar's outlier channels in 16-bit."""
    return _flag(CPU_W4A8)


def sparse_overlap() -> bool:
    """Opt-in: the separate correction on a side CUDA stream beside the GEMM (``SUPERWEIGHT_SPARSE_OVERLAP``)."""
    return _flag(SPARSE_OVERLAP)


def w8a8_azp() -> bool:
    """On by default (H200, session 12: +0.8-2.4% over the plain split at every batch, same lease); ``0`` off."""
    return _flag(W8A8_AZP, default="1")


def w8a8_graph_split() -> bool:
    """Off by default (H100 s51, same lease as the default: faster saturated, slower at batch 1 and 8); ``1`` on."""
    return _flag(W8A8_GRAPH_SPLIT)


DEFAULT_W8A8_TRITON_MAX_M = 32  # Hopper; the H200 micro-benchmark's crossover to CUTLASS (session 13)
# Hopper, layers with outlier channels: the H100 w8big sweep's crossover to the zero-point epilogue (session 43:
# q/k/v + gate/up 65.3-66.2 us at 33-64 tokens vs 68.7-72.2 for the zero-point path, 71.6 vs 69.9 at 96)
DEFAULT_W8A8_TRITON_OUT_MAX_M = 64


def w8a8_triton(hopper: bool = True) -> tuple[int, dict[int, dict[str, int]], int]:
    """``SUPERWEIGHT_W8A8_TRITON`` parsed: (MAX_M, {bucket M: {bn, bk, ...} given}, OUT_MAX_M); (0, {}, 0) = off.
    Unset: ``DEFAULT_W8A8_TRITON_MAX_M`` / ``DEFAULT_W8A8_TRITON_OUT_MAX_M`` where ``hopper`` (the GPU they were
    measured on), else off."""
    raw = os.environ.get(W8A8_TRITON, "").strip()
    if not raw:
        if not hopper:
            return 0, {}, 0
        return DEFAULT_W8A8_TRITON_MAX_M, {}, DEFAULT_W8A8_TRITON_OUT_MAX_M
    return _parse_w8a8_triton(raw)


@functools.lru_cache(maxsize=8)
def _parse_w8a8_triton(raw: str) -> tuple[int, dict[int, dict[str, int]], int]:
    head, _, rest = raw.partition("@")
    table: dict[int, dict[str, int]] = {}
    try:
        plain, _, out = head.partition("/")
        max_m = int(plain)
        out_max_m = int(out) if out.strip() else max_m
        for entry in filter(None, (e.strip() for e in rest.split(";"))):
            bucket, _, fields = entry.partition(":")
            cfg = {}
            for part in filter(None, (p.strip() for p in fields.split(","))):
                key, _, val = part.partition("=")
                if key not in _INT8_MM_KEYS or int(val) < (0 if key in ("swap", "tma", "ws") else 1):
                    raise ValueError(part)
                cfg[key] = int(val)
            table[int(bucket)] = cfg
    except ValueError:
        raise ValueError(
            f"{W8A8_TRITON}={raw!r}: expected MAX_M[/OUT_MAX_M][@M:bn=..,bk=..,warps=..,stages=..,swap=0|1,bm=..,"
            "tma=0|1,ws=0|1;M:...] (integers)"
        ) from None
    if (
        max_m < 0
        or out_max_m < 0
        or any(b < 1 for b in table)
        or any(c.get("bk", 32) % 32 or max(c.get(f, 1) for f in ("swap", "tma", "ws")) > 1 for c in table.values())
        or any(c.get("bm", 16) < 16 or c.get("bm", 16) & (c.get("bm", 16) - 1) for c in table.values())
    ):
        raise ValueError(
            f"{W8A8_TRITON}={raw!r}: MAX_M, OUT_MAX_M >= 0, buckets >= 1, bk a multiple of 32, swap / tma / ws 0 or 1, "
            "bm a power of two >= 16"
        )
    return max_m, table, out_max_m


def w4_kernel() -> str:
    mode = os.environ.get(W4_KERNEL, "auto").strip().lower() or "auto"
    if mode not in W4_KERNEL_MODES:
        raise ValueError(f"{W4_KERNEL}={mode!r}: choose one of {', '.join(W4_KERNEL_MODES)}")
    return mode


def _int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not an integer") from None


def marlin_max_m(default: int = DEFAULT_MARLIN_MAX_M) -> int:
    return _int(MARLIN_MAX_M, default)


def dequant_min_m(default: int = DEFAULT_DEQUANT_MIN_M) -> int:
    return _int(DEQUANT_MIN_M, default)


def _cuda_gemv() -> tuple[int | None, dict[str, tuple[int, ...]], bool | None, int | None, bool | None]:
    """``SUPERWEIGHT_CUDA_GEMV=MAX_M[@one=A:B:..,mma=A:B:..,layers=held|all,fold=N,sellpdl=0|1]`` -> (MAX_M, launch
    configurations by form, whether the one-copy kernels send every layer's 2..MAX_M-token batches to the
    tensor-core form, the largest batch whose held-out terms go inside the GEMV's epilogue, whether the SELL kernel
    after the GEMV is launched as its programmatic dependent); None where the variable does not say (each kernel
    class has its own defaults). Read on every small-batch GEMM's dispatch, so the parse
    is cached per value of the variable."""
    return _parse_cuda_gemv(os.environ.get(CUDA_GEMV, "").strip())


@functools.lru_cache(maxsize=8)
def _parse_cuda_gemv(raw: str) -> tuple[int | None, dict[str, tuple[int, ...]], bool | None, int | None, bool | None]:
    head, _, tail = raw.partition("@")
    try:
        v = int(head) if head.strip() else None
    except ValueError:
        raise ValueError(f"{CUDA_GEMV}={raw!r}: MAX_M is not an integer") from None
    if v is not None and not 0 <= v <= 8:
        raise ValueError(f"{CUDA_GEMV}={v}: 0 (Marlin) to 8 tokens")
    configs: dict[str, tuple[int, ...]] = {}
    every: bool | None = None
    fold: int | None = None
    sell_pdl: bool | None = None
    for part in filter(None, (p.strip() for p in tail.split(","))):
        key, _, val = part.partition("=")
        key = key.strip()
        if key == "sellpdl":
            if val.strip() not in ("0", "1"):
                raise ValueError(f"{CUDA_GEMV}={raw!r}: sellpdl=0 or sellpdl=1, got {part!r}")
            sell_pdl = val.strip() == "1"
            continue
        if key == "fold":
            if not val.strip().isdigit() or int(val) > 8:
                raise ValueError(f"{CUDA_GEMV}={raw!r}: fold=N takes 0 to 8 tokens, got {part!r}")
            fold = int(val)
            continue
        if key == "layers":
            if val.strip() not in ("held", "all"):
                raise ValueError(f"{CUDA_GEMV}={raw!r}: layers=held (the default) or layers=all, got {part!r}")
            every = val.strip() == "all"
            continue
        try:
            cfg = tuple(int(f) for f in val.split(":"))
        except ValueError:
            cfg = ()
        if key not in ("one", "mma") or not 4 <= len(cfg) <= 11 or min(cfg) < 0:
            raise ValueError(
                f"{CUDA_GEMV}={raw!r}: after '@', one=U:WARPS:PER_SM:STAGES[:MINB:LEAN:MMA:PF:PDL:XR:SPE] and/or "
                f"mma=... and/or layers=held|all and/or fold=N and/or sellpdl=0|1 (non-negative integers; got {part!r})"
            )
        if key == "mma" and (len(cfg) < 7 or cfg[6] != 1):
            raise ValueError(f"{CUDA_GEMV}={raw!r}: the mma= configuration needs its 7th field (tensor cores) = 1")
        configs[key] = cfg
    return v, configs, every, fold, sell_pdl


def cuda_gemv_max_m(default: int = DEFAULT_CUDA_GEMV_MAX_M) -> int:
    """MAX_M of ``SUPERWEIGHT_CUDA_GEMV``; ``default`` (the kernel class's) where it gives none."""
    v = _cuda_gemv()[0]
    return default if v is None else v


def cuda_gemv_configs() -> dict[str, tuple[int, ...]]:
    """Launch configurations of the CUDA GEMV given after ``@`` in ``SUPERWEIGHT_CUDA_GEMV`` (``one``: single tokens,
    ``mma``: the tensor-core form), as ``benchmarks/cuda_gemv_bench.py --recommend-env`` finds them; {} = the
    package's defaults."""
    return _cuda_gemv()[1]


def cuda_gemv_every_layer(default: bool = False) -> bool:
    """``layers=all`` after ``@`` in ``SUPERWEIGHT_CUDA_GEMV``: the one-copy kernels (the held-out default's Marlin
    copy, ``humming-gemv``) send every layer's 2..MAX_M-token batches to the GEMV's tensor-core form, not only layers
    with held-out terms (session 31: it is faster than Humming at 2-8 tokens and than Marlin at 2-4); ``default``
    (the kernel class's) where the variable does not say."""
    v = _cuda_gemv()[2]
    return default if v is None else v


def cuda_gemv_fold_max_m(default: int = DEFAULT_CUDA_GEMV_FOLD) -> int:
    """``fold=N`` after ``@`` in ``SUPERWEIGHT_CUDA_GEMV``: held-out layers' batches of up to N tokens get their terms
    inside the GEMV's epilogue; larger ones it serves run it plain, then the separate SELL correction. Where the
    variable does not say: ``default``, the kernel's (1 where the terms are summed by the tile's first split-K block
    -- H200: inside wins at one token, s24, after it at 2, 4 and 8 tokens, s31; 4 where they are spread over its
    split-K blocks, SW_SPE 2 -- H100, s36: inside wins at 1-4 tokens, ties at 8)."""
    v = _cuda_gemv()[3]
    return default if v is None else v


def cuda_gemv_fold_given() -> bool:
    """Whether ``SUPERWEIGHT_CUDA_GEMV`` gives ``fold=N`` (then no kernel moves it)."""
    return _cuda_gemv()[3] is not None


def cuda_gemv_sell_pdl(default: bool = False) -> bool:
    """``sellpdl=1`` after ``@`` in ``SUPERWEIGHT_CUDA_GEMV``: held-out layers' batches past the fold run the GEMV
    (its tensor-core form; with ``fold=0`` single tokens the single-token form) with SW_TRIG (dependents may launch as
    soon as its blocks have started), then the SELL kernel as its programmatic dependent, whose loads and FMAs overlap
    the GEMV and which waits only before it touches y (one Humming copy + GEMV; Hopper). Where the variable does not
    say: ``default``, the kernel's (on for the one Humming copy on Hopper since s39 -- H100, 7B, 0.1 % q/k/v hold-out,
    with fold 0: batch 1 / 8 0.736 / 0.988 s vs 0.764 / 0.998 with the terms inside up to 4 tokens; kernel, us a
    layer at 1 / 2 / 4 / 8 tokens: 61.6 / 64.9 / 68.2 / 77.5 vs inside 64.2 / 70.0 / 73.4 / 84.0)."""
    v = _cuda_gemv()[4]
    return default if v is None else v


def cache_dir() -> str:
    """Root of what the package caches on disk (``SUPERWEIGHT_CACHE_DIR``, default ``~/.cache/vllm-superweight``)."""
    return os.environ.get(CACHE_DIR, "").strip() or os.path.join(os.path.expanduser("~"), ".cache", "vllm-superweight")


def dequant_min_m_given() -> bool:
    """Whether the user set ``SUPERWEIGHT_DEQUANT_MIN_M`` (then no kernel adapts it per layer)."""
    return bool(os.environ.get(DEQUANT_MIN_M, "").strip())


#: key under which the plugin copies the graph-changing knobs into the in-memory ``quantization_config``
SERVING_KNOBS_KEY = "_serving_knobs"


def graph_knobs() -> dict[str, str]:
    """The knobs that change what the served forward pass computes or which buffers it reads. vLLM keys its
    torch.compile / AOT cache on the model config, not on our environment, so the plugin adds these to the config
    it hashes: a restart with another kernel choice or with the correction off must never load a graph compiled
    for the other setting (seen on a 2x H200: ``KeyError: 'sw_sp_ell_cols'``)."""
    return {
        DISABLE_CORRECTION: "1" if disable_correction() else "0",
        W4_KERNEL: w4_kernel(),
        MARLIN_MAX_M: str(marlin_max_m()),
        DEQUANT_MIN_M: str(dequant_min_m()),
        W8A8_AZP: "1" if w8a8_azp() else "0",
        CPU_W4A8: "1" if cpu_w4a8() else "0",
        W8A8_TRITON: os.environ.get(W8A8_TRITON, "").strip() or "default",
        W8A8_GRAPH_SPLIT: "1" if w8a8_graph_split() else "0",
        "VLLM_DISABLED_KERNELS": ",".join(sorted(disabled_kernels())),
        # what ``auto`` picks on Hopper depends on these two (HummingGemvKernel.auto_can_implement)
        "humming": "1" if humming_installed() else "0",
        BATCH_INVARIANT: "1" if batch_invariant() else "0",
    }


def humming_installed() -> bool:
    """Whether the optional ``humming-kernels`` package is there: vLLM's own check, the one its Humming kernel asks."""
    from vllm.utils.import_utils import has_humming

    return has_humming()


def batch_invariant() -> bool:
    return _flag(BATCH_INVARIANT)


def disabled_kernels() -> set[str]:
    """Class names listed in vLLM's ``VLLM_DISABLED_KERNELS``."""
    return {s.strip() for s in os.environ.get("VLLM_DISABLED_KERNELS", "").split(",") if s.strip()}


def wikitext_path() -> str | None:
    return os.environ.get(WIKITEXT) or None


def debug() -> bool:
    return _flag(DEBUG)


# Environment our commands give vLLM unless the user set it: no usage-stats thread posting outside, the engine's
# message queue on the loopback, no model hub, a 1 GiB KV cache on CPU (vLLM would otherwise reserve 92% of RAM),
# no tokenizer thread pools competing with the engine. Harmless on GPUs.
VLLM_ENV_DEFAULTS = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def setdefault_vllm_env(env: dict | None = None) -> dict:
    """Fill ``env`` (default: ``os.environ``) with ``VLLM_ENV_DEFAULTS`` where unset; returns it."""
    target = os.environ if env is None else env
    for k, v in VLLM_ENV_DEFAULTS.items():
        target.setdefault(k, v)
    return target  # type: ignore[return-value]


def onecopy_config() -> dict[str, tuple]:
    """``SUPERWEIGHT_ONECOPY_CONFIG`` parsed: {"deq": (BN, WARPS[, SCATTER]), "corr": (KIND, ROWS, SLOTS, WARPS),
    "gemv": (MAX_M,)}, the parts given."""
    return _parse_onecopy(os.environ.get(ONECOPY_CONFIG, "").strip())


@functools.lru_cache(maxsize=8)
def _parse_onecopy(raw: str) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, _, val = part.partition("=")
        fields = val.split(":")
        try:
            if key == "deq" and len(fields) in (2, 3):
                out["deq"] = tuple(int(f) for f in fields)
                continue
            if key == "corr" and fields in (["sell"], ["inside"]):
                out["corr"] = (fields[0],)
                continue
            if key == "corr" and len(fields) == 4 and fields[0] in ("seq", "2d"):
                out["corr"] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
                continue
            if key == "gemv" and len(fields) == 1 and 0 <= int(fields[0]) <= 4:
                out["gemv"] = (int(fields[0]),)
                continue
        except ValueError:
            pass
        raise ValueError(
            f"{ONECOPY_CONFIG}={raw!r}: expected deq=BN:WARPS[:SCATTER],"
            "corr=sell|inside|KIND:ROWS:SLOTS:WARPS,gemv=0..4"
        )
    return out


def humming_fast_elf() -> bool:
    """``SUPERWEIGHT_HUMMING_FAST_ELF`` (default on): Humming's cubin symbol lookups from ``kernels.cubin``."""
    return _flag(HUMMING_FAST_ELF, "1")


def humming_ranges() -> tuple[int, ...] | None:
    """``SUPERWEIGHT_HUMMING_RANGES`` parsed: the increasing range tops, or None where unset."""
    return _parse_ranges(os.environ.get(HUMMING_RANGES, "").strip())


@functools.lru_cache(maxsize=8)
def _parse_ranges(raw: str) -> tuple[int, ...] | None:
    if not raw:
        return None
    parts = [p.strip() for p in raw.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"{HUMMING_RANGES}={raw!r}: expected increasing token counts, e.g. 8,16,32,64,128,256,1024")
    tops = tuple(int(p) for p in parts)
    if tops[0] < 1 or any(b <= a for a, b in zip(tops, tops[1:])):
        raise ValueError(f"{HUMMING_RANGES}={raw!r}: the token counts must be >= 1 and increasing")
    return tops


def sparse_panel() -> dict[str, int] | None:
    """``SUPERWEIGHT_SPARSE_PANEL`` parsed: None where off (unset, ``0``), else ``cuda_sell.PanelConfig`` field
    overrides (``{}`` for ``1``)."""
    return _parse_panel(os.environ.get(SPARSE_PANEL, "").strip())


_PANEL_KEYS = ("mb", "warps", "per_sm", "max_m", "blocks")


@functools.lru_cache(maxsize=8)
def _parse_panel(raw: str) -> dict[str, int] | None:
    if raw in ("", "0"):
        return None
    if raw == "1":
        return {}
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, _, val = part.partition("=")
        ok = key in _PANEL_KEYS and val.isdigit()
        if ok:
            v = int(val)
            ok = {
                "mb": 1 <= v <= 16 and not v & (v - 1),
                "warps": 1 <= v <= 32,
                "per_sm": 0 <= v <= 8,
                "max_m": v >= 1,
                "blocks": v >= 0,
            }[key]
        if not ok:
            raise ValueError(
                f"{SPARSE_PANEL}={raw!r}: expected 0, 1 or mb=1|2|4|8|16,warps=1..32,per_sm=0..8,max_m=M,blocks=B "
                "(any subset)"
            )
        out[key] = int(val)
    return out


def sparse_tiles(m: int = 0) -> dict[str, int]:
    """``SUPERWEIGHT_SPARSE_TILES`` parsed into ``triton_sparse.SparseTiles`` field overrides (the parts given) for a
    batch of ``m`` tokens: the value is one or more segments separated by ``;``, each ``FROM_M:overrides`` (or just
    ``overrides``: from 0 tokens); every segment whose FROM_M <= m applies, later ones winning on a clash."""
    raw = os.environ.get(SPARSE_TILES, "").strip()
    return dict(_tiles_for(raw, m)) if raw else {}  # a copy: the cached one stays as parsed


@functools.lru_cache(maxsize=512)
def _tiles_for(raw: str, m: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for from_m, over in _parse_tiles(raw):
        if m >= from_m:
            out.update(over)
    return out


@functools.lru_cache(maxsize=8)
def _parse_tiles(raw: str) -> tuple[tuple[int, dict[str, int]], ...]:
    segments = []
    for seg in filter(None, (p.strip() for p in raw.split(";"))):
        head, sep, body = seg.partition(":")
        if sep and not head.strip().isdigit():
            raise ValueError(f"{SPARSE_TILES}={raw!r}: a segment's FROM_M (before ':') must be a token count")
        segments.append((int(head) if sep else 0, _parse_tile_part(raw, body if sep else seg)))
    return tuple(segments)


def _parse_tile_part(raw: str, part_list: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in part_list.split(","))):
        key, _, val = part.partition("=")
        if key == "unroll" and val in ("0", "1"):
            out["unroll"] = int(val)
            continue
        if key not in _TILE_KEYS or key == "unroll" or not val.isdigit() or int(val) < 1 or int(val) & (int(val) - 1):
            raise ValueError(
                f"{SPARSE_TILES}={raw!r}: expected bmd=,tmin=,bmt=,tile=,warps=,wt= with powers of two, "
                "unroll=0|1 (segments FROM_M:... separated by ';')"
            )
        out[_TILE_KEYS[key]] = int(val)
    return out
