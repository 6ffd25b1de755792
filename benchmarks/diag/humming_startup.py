"""Diagnostic (session 30, for a GPU lease): where the one-Humming-copy kernels' start-up goes.

Session 29 measured 12-25 s per layer shape in Humming's first call (``ops.humming_gemm`` -> ``HummingKernel.
prepare_kernels``, which prepares a kernel for every token-count range of the shape at once), the same on the third
engine of a lease (so not the NVRTC / nvcc compile, which Humming caches on disk) -- the main reason
``SUPERWEIGHT_W4_KERNEL=humming-gemv`` (one W4 copy, 1.33x / 1.06x AWQ at batch 1 / 64, s27) is not the default. This
builds the Llama-2-7B layer shapes through vLLM's Humming kernel (``tests/vllm_linear.py``), times each shape's first
2-token call under cProfile, and writes per shape: the pack time, the first and second call, how many kernels Humming
prepared, and the functions that took the time (cumulative and own). Run it twice on one machine: the first run
compiles into ``HUMMING_CACHE_DIR`` (cold), the second finds every cubin there (warm: what an engine restart pays);
``--ranges`` runs it with ``SUPERWEIGHT_HUMMING_RANGES`` (one kernel a token range instead of Humming's table).

    python3 -u benchmarks/diag/humming_startup.py --out $OUT/humming_startup_cold.json
    python3 -u benchmarks/diag/humming_startup.py --out $OUT/humming_startup_warm.json
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

SHAPES_7B = {
    "qkv_proj": (12288, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (22016, 4096),
    "down_proj": (4096, 11008),
}


def top_functions(stats: pstats.Stats, key: str, n: int) -> list[dict]:
    """The ``n`` functions with the largest ``key`` ("cumulative" or "tottime") time of a profile, as records
    ``{function, calls, tottime_s, cumtime_s}`` (``function``: file:line(name), the file shortened to its last
    three path parts)."""
    col = {"cumulative": 5, "tottime": 4}[key]  # position in the rows below
    rows = []
    for (path, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(path.split("/")[-3:])
        rows.append((short, line, name, nc, tt, ct))
    rows.sort(key=lambda r: -r[col])
    return [
        {"function": f"{p}:{ln}({nm})", "calls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)}
        for p, ln, nm, nc, tt, ct in rows[:n]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES_7B), help="comma list of " + ",".join(SHAPES_7B))
    ap.add_argument("--m", type=int, default=2, help="tokens of the calls (Humming serves 2+ under humming-gemv)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument(
        "--ranges",
        default="",
        help="SUPERWEIGHT_HUMMING_RANGES for this run (e.g. 8,16,32,64,128,256,1024: one kernel a range)",
    )
    ap.add_argument(
        "--slow-elf",
        action="store_true",
        help="SUPERWEIGHT_HUMMING_FAST_ELF=0: Humming's own pyelftools symbol lookups (kernels/cubin.py off)",
    )
    args = ap.parse_args()
    if args.ranges:
        os.environ["SUPERWEIGHT_HUMMING_RANGES"] = args.ranges
    if args.slow_elf:
        os.environ["SUPERWEIGHT_HUMMING_FAST_ELF"] = "0"

    import cProfile

    import torch

    import tests.vllm_linear as VL

    cache = os.environ.get("HUMMING_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".humming/cache/"))
    n_cached = sum(len(f) for _, _, f in os.walk(cache)) if os.path.isdir(cache) else 0
    rec: dict = {"cache_dir": cache, "cached_files_at_start": n_cached, "m": args.m, "ranges": args.ranges}
    rec["shapes"] = []

    def save() -> None:
        with open(args.out + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    from humming.kernel.humming import HummingKernel

    for name in args.shapes.split(","):
        n, k = SHAPES_7B[name]
        w = VL.random_w4(n, k, 128, False, "cuda", seed=len(rec["shapes"]))
        t0 = time.time()
        layer, kern = VL.build_mp_layer(w, "humming")
        torch.cuda.synchronize()
        pack_s = time.time() - t0
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        before = len(HummingKernel._str2kernel_cache)
        prof = cProfile.Profile()
        t0 = time.time()
        prof.enable()
        kern.apply_weights(layer, x)
        torch.cuda.synchronize()
        prof.disable()
        first_s = time.time() - t0
        t0 = time.time()
        kern.apply_weights(layer, x)
        torch.cuda.synchronize()
        second_s = time.time() - t0
        new = list(HummingKernel._str2kernel_cache.values())[before:]
        kernels = sum(int(t.numel()) // 4 for t in new)
        import humming.utils.jit as hjit

        # kernels/cubin.py's reader: "ours" once its first answer matched Humming's, "theirs" if it did not
        elf = getattr(hjit.find_kernel_name_in_cubin, "state", "humming's own")
        st = pstats.Stats(prof)
        rec["shapes"].append(
            {
                "shape": name,
                "n": n,
                "k": k,
                "pack_s": round(pack_s, 3),
                "first_call_s": round(first_s, 3),
                "second_call_s": round(second_s, 4),
                "kernels_prepared": kernels,
                "symbol_reader": elf,
                "top_cumulative": top_functions(st, "cumulative", args.top),
                "top_own_time": top_functions(st, "tottime", args.top),
            }
        )
        print(
            f"{name}: pack {pack_s:.2f} s, first call {first_s:.2f} s ({kernels} kernels), second {second_s:.4f} s, "
            f"symbol reader {elf}"
        )
        save()


if __name__ == "__main__":
    main()
