"""Humming's first call of a layer shape, reproduced on a CPU: its whole kernel table prepared, no GPU needed.

What a layer shape's first batch costs under vLLM's Humming backend (``SUPERWEIGHT_W4_KERNEL=humming*``) is Humming's
``HummingKernel.prepare_kernels``: one kernel per token-count range of its heuristic table (92 for a 7B shape on
Hopper), each rendered, compiled by NVRTC unless its cubin is cached, its mangled name looked up in the cubin, and
registered. All of that but the registration runs on a CPU: this script stubs the device queries (an H200: sm_90,
132 SMs) and the launcher's ``register_kernel`` (a GPU-side table), compiles with the NVRTC of the venv's
``nvidia`` CUDA 13 wheels, and times the pass -- with Humming's own pyelftools symbol lookups ("slow") and with
``vllm_superweight.kernels.cubin``'s ("fast"), each in a fresh process, on an empty cache (cold) and again on the
filled one (warm: an engine restart). Session 31 found this cost on the H200 (``humming_startup.py``, under cProfile:
23-26 s a 7B shape, cold or warm, ~90 % pyelftools) and checked the fix here while no GPU was lent.

Needs ``humming-kernels==0.1.10`` and ``pyelftools`` importable (e.g. ``pip install --no-deps --target DIR`` from the
GPU bundle's wheels, then ``--humming-path DIR``):

    python benchmarks/diag/humming_startup_cpu.py --humming-path /tmp/hmsite --out RESULT.json [--shapes qkv_proj]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from humming_startup import SHAPES_7B  # noqa: E402  (the GPU profile's shapes: one table for both)


def _cuda_wheel_dirs() -> dict[str, str]:
    """LD_LIBRARY_PATH (libnvrtc-builtins) and CUDA_INCLUDE_PATH from the venv's nvidia CUDA 13 wheels."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        cu = os.path.join(base, "cu13")
        if os.path.isdir(os.path.join(cu, "include")):
            lib = os.path.join(cu, "lib")
            return {
                "LD_LIBRARY_PATH": lib
                + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else ""),
                "CUDA_INCLUDE_PATH": os.path.join(cu, "include"),
            }
    raise SystemExit("no nvidia/cu13 wheel (NVRTC, CUDA headers) in this environment")


def _child(shape: str, reader: str) -> None:
    """One pass in this process: stub the GPU, prepare the shape's kernel table, print one JSON line."""
    import types
    import zlib

    sys.modules.setdefault("pynvml", types.ModuleType("pynvml"))  # imported by Humming's device helpers, unused here
    import torch

    props = types.SimpleNamespace(major=9, minor=0, name="NVIDIA H200", multi_processor_count=132)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_name = lambda *a, **k: props.name
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0
    import humming.ops as hops
    import humming.utils.device as hdev
    from humming import dtypes
    from humming.jit import runtime
    from humming.kernel import humming as hk
    from humming.layer import HummingLayerMeta

    hdev.get_device_num_sms = lambda *a, **k: props.multi_processor_count
    runtime.KernelRuntime._ensure_cuda_context = staticmethod(lambda: None)
    # the launcher's id for a kernel (the value HummingKernel.load_cubin asserts), without the GPU-side table
    hops.register_kernel = lambda path, name: (zlib.crc32(path.encode()) << 30) + zlib.crc32(name.encode())
    if reader == "fast":
        sys.path.insert(0, ROOT)
        from vllm_superweight.kernels.cubin import install_humming_reader

        assert install_humming_reader(), "kernels/cubin.py did not install"
    n, k = SHAPES_7B[shape]
    meta = HummingLayerMeta(
        shape_n=n,
        shape_k=k,
        b_dtype=dtypes.uint4,
        a_dtype=dtypes.bfloat16,
        c_dtype=dtypes.bfloat16,
        bs_dtype=dtypes.bfloat16,
        weight_scale_group_size=128,
        has_zero_point=True,
    )
    t = time.time()
    table = hk.HummingKernel.prepare_kernels(meta.to_str())
    seconds = time.time() - t
    import humming.utils.jit as hjit

    print(
        json.dumps(
            {
                "shape": shape,
                "reader": reader,
                "kernels": int(table.numel()) // 4,
                "seconds": round(seconds, 3),
                "reader_state": getattr(hjit.find_kernel_name_in_cubin, "state", "humming's own"),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--humming-path", default="", help="a directory holding humming-kernels and pyelftools")
    ap.add_argument("--shapes", default=",".join(SHAPES_7B))
    ap.add_argument("--readers", default="slow,fast", help="passes per shape, each cold then warm")
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "READER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    env = dict(os.environ, **_cuda_wheel_dirs())
    if args.humming_path:
        env["PYTHONPATH"] = args.humming_path + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rec: dict = {"cpu_count": os.cpu_count(), "passes": []}
    for shape in args.shapes.split(","):
        for reader in args.readers.split(","):
            cache = tempfile.mkdtemp(prefix="humming-cache-")
            try:
                for state in ("cold", "warm"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--out", args.out, "--child", shape, reader],
                        env=dict(env, HUMMING_CACHE_DIR=cache),
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                    if out.returncode or not lines:
                        raise SystemExit(f"{shape}/{reader}/{state} failed:\n{out.stderr[-3000:]}")
                    row = json.loads(lines[-1]) | {"cache": state}
                    rec["passes"].append(row)
                    print(row, flush=True)
                    with open(args.out + ".tmp", "w") as f:
                        json.dump(rec, f, indent=1)
                    os.replace(args.out + ".tmp", args.out)
            finally:
                shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
