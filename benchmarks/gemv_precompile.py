"""Fill the CUDA GEMV's cubin cache in parallel before its GPU tests and micro-benchmark (``gpu_run.sh prefetch``).

NVRTC compiles one kernel source on one core (~0.5 s); the GPU tests of ``tests/test_cuda_marlin_gemv.py`` and the
sweeps of ``benchmarks/cuda_gemv_bench.py`` need several hundred distinct kernels (configuration x token count x
group kind x dtype), which the tests would otherwise compile one after another. This compiles a superset of them
with one process a core into ``SUPERWEIGHT_CACHE_DIR``; the tests and the benchmark then load them from there.

    python benchmarks/gemv_precompile.py [--workers N] [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def sources(configs: list[tuple[int, ...]] | None = None) -> list[str]:
    """Every kernel the GPU tests and the micro-benchmark's parts need; with ``configs``: only those configurations
    (and their plain twins, without x through the ring) over the 7B shapes, plus the x-through-the-ring GPU test's
    (``gpu_run.sh xr``)."""
    import cuda_gemv_bench as B
    import test_cuda_marlin_gemv as T
    import torch

    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    bf, fp = torch.bfloat16, torch.float16
    if configs is not None:
        xr_cfgs = {*T.XR_CONFIGS, T.XR_ONE}
        cfgs = {CG.DEFAULT_CONFIG, CG.MMA_CONFIG, CG.SERVE_ONE, CG.SERVE_MMA, *configs, *(c[:9] for c in configs)}
        jobs = [
            (n, k, g, sym, dt, c)
            for n, k, g, sym in T.XR_CASES
            for dt in (bf, fp)
            for c in xr_cfgs | {c[:9] for c in xr_cfgs}
        ]
        jobs += [(n, k, 128, False, bf, c) for n, k in B.SHAPES.values() for c in cfgs]
        # configurations placing the held-out terms (SW_SPE, field 11): also the held-out epilogue GPU test (bf16)
        if any(len(c) > 10 and c[10] for c in configs):
            jobs += [(n, k, g, sym, bf, c) for n, k, g, sym in T.CASES for c in T.epilogue_configs(k)]
        return _plan_sources(jobs)
    # the GPU tests: every case, both dtypes, the configurations they run (each base also with the prefetch, as the
    # bitwise test runs them; the PDL test: the default with the PDL flag)
    test_cfgs = {CG.DEFAULT_CONFIG, *T.GPU_CONFIGS, CG.config_with(pdl=1)}
    for base in T.PF_BASES:
        test_cfgs |= {tuple(base), CG.config_with(base, pf=1)}
    jobs = [(n, k, g, sym, dt, c) for n, k, g, sym in T.CASES for dt in (bf, fp) for c in test_cfgs]
    # the micro-benchmark: the 7B layers in bf16, every configuration its parts and sweeps run
    bench_cfgs = {CG.DEFAULT_CONFIG, CG.MMA_CONFIG, CG.SERVE_ONE, CG.SERVE_MMA, *B.SWEEP, *B.MMA_SWEEP}
    bench_cfgs |= {cfg for _, cfg in B.PF_SWEEP}
    bench_cfgs |= {c for _, cfg, _ in B.PF_PAIRS for c in (cfg, CG.config_with(cfg, pf=1))}
    bench_cfgs |= {c for _, cfg in B.PDL_CASES for c in (cfg, CG.config_with(cfg, pdl=1))}
    jobs += [(n, k, 128, False, bf, c) for n, k in B.SHAPES.values() for c in bench_cfgs]
    return _plan_sources(jobs)


def _plan_sources(jobs: list[tuple]) -> list[str]:
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    out = []
    for n, k, g, sym, dtype, c in jobs:
        try:
            plan = CG.gemv_plan(n, k, g, sym, dtype, "cpu", config=c)
        except ValueError:
            continue
        out += [CG.kernel_source(plan, mt) for mt in range(1, plan.max_m + 1)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--arch", default=None, help="sm_<arch> (default: this GPU's)")
    ap.add_argument("--configs", default=None, help="only these configurations ('U:W:..;...', see sources())")
    args = ap.parse_args()
    import torch

    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    arch = args.arch
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    t0 = time.time()
    cfgs = None if args.configs is None else [tuple(int(f) for f in c.split(":")) for c in args.configs.split(";") if c]
    srcs = sources(cfgs)
    n = CG.precompile(srcs, arch, args.workers)
    print(f"gemv_precompile: {n} kernels for sm_{arch} in the cache ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
