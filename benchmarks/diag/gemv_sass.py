"""Diagnostic (session 34, no GPU needed): what the CUDA GEMV's main loop costs in instructions, per launch
configuration and token count -- NVRTC compiles the kernel for sm_90 on the CPU (the same sources and cache the
layers use), Triton's bundled ``nvdisasm`` disassembles it, and the innermost loop holding the chunk's math (HMMA for
the tensor-core form, FFMA otherwise) and the ring's copies is counted by opcode. Registers, spills and static
shared memory come from the cubin's own ``.nv.info`` attributes and section sizes.

Why: the H100's kernel benchmark (s33-s34) has the tensor-core form with x through the ring at 57.4 us a 7B layer for
one token but 68.3 / 72.2 at 2 / 8 tokens, while its weight stream does not change; this shows what the compiler
made of each token count (e.g. S2R and divergent-branch pairs inside the loop at 2-4 tokens).

    python benchmarks/diag/gemv_sass.py [--config 4:4:12:2:1:0:1:1:0:1] [--mts 1,2,4,8] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

# .nv.info attribute codes (EIATTR_*) read here: register count, frame size (spills land there), max stack size
_REGCOUNT, _FRAME, _MAXSTACK = 0x2F, 0x11, 0x23
OPS = ("HMMA", "FFMA", "LDS", "LDG", "LDGSTS", "S2R", "BSSY", "BRA", "LOP3", "SHF", "IMAD", "HADD2", "I2FP")


def nvdisasm() -> str | None:
    """Triton's bundled nvdisasm (the venv's), else one on PATH."""
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        if os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    from shutil import which

    return which("nvdisasm")


def cubin_info(cub: bytes) -> dict[str, int]:
    """Registers / frame bytes (spills) / stack from ``.nv.info``, static shared memory and code bytes from the
    section sizes of an ELF64 cubin."""
    (shoff,) = struct.unpack_from("<Q", cub, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cub, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cub, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    out: dict[str, int] = {}
    for name_off, _typ, _flags, _addr, off, size, *_ in secs:
        name = cub[strtab + name_off : cub.index(b"\0", strtab + name_off)].decode()
        if name == ".nv.info":
            d, i = cub[off : off + size], 0
            while i + 2 <= len(d):
                fmt, attr = d[i], d[i + 1]
                if fmt == 4:  # EIFMT_SVAL: 2-byte size, then (symbol, value) for these attributes
                    (n,) = struct.unpack_from("<H", d, i + 2)
                    if n >= 8 and attr in (_REGCOUNT, _FRAME, _MAXSTACK):
                        key = {_REGCOUNT: "regs", _FRAME: "frame_bytes", _MAXSTACK: "stack_bytes"}[attr]
                        out[key] = struct.unpack_from("<I", d, i + 8)[0]
                    i += 4 + n
                elif fmt == 3:  # EIFMT_HVAL
                    i += 4
                else:
                    i += 2
        elif name.startswith(".nv.shared.") and not name.startswith(".nv.shared.reserved"):
            out["smem_bytes"] = size
        elif name.startswith(".text."):
            out["code_bytes"] = size
    return out


def main_loop(sass: str, marker: str) -> collections.Counter:
    """Opcode counts of the smallest loop (a backward branch to a label) whose body holds ``marker`` and the ring's
    copies (LDGSTS): the chunk loop, not the epilogue's gathers."""
    lines = sass.splitlines()
    at = re.compile(r"/\*([0-9a-f]{4,})\*/")
    labels: dict[str, int] = {}
    for k, line in enumerate(lines):
        if line.strip().startswith(".L_x"):
            for nxt in lines[k + 1 : k + 6]:
                if m := at.search(nxt):
                    labels[line.strip().rstrip(":")] = int(m.group(1), 16)
                    break
    code = [(int(m.group(1), 16), line) for line in lines if (m := at.search(line))]
    best: list[str] | None = None
    for a, line in code:
        t = re.search(r"BRA\b.*?(\.L_x_\d+)", line)
        if t and labels.get(t.group(1), a + 1) < a:
            body = [x for b, x in code if labels[t.group(1)] <= b <= a]
            found = all(any(op in x for x in body) for op in (marker, "LDGSTS"))
            if found and (best is None or len(body) < len(best)):
                best = body
    ops: collections.Counter = collections.Counter()
    for x in best or []:
        if m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", x):
            ops[m.group(1)] += 1
    return ops


def main() -> None:
    import torch

    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=":".join(map(str, CG.SERVE_MMA)), help="colon-separated launch config")
    ap.add_argument("--shape", default="12288,4096,128", help="N,K,GROUP (default: the 7B qkv)")
    ap.add_argument("--mts", default="", help="token counts compiled (default: 1..the form's maximum, powers of 2)")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    nd = nvdisasm()
    if nd is None:
        sys.exit("gemv_sass: no nvdisasm (Triton's bundled one or on PATH)")
    cfg = tuple(int(f) for f in args.config.split(":"))
    n, k, g = (int(v) for v in args.shape.split(","))
    plan = CG.gemv_plan(n, k, g, False, torch.bfloat16, "cpu", config=cfg)
    mts = [int(m) for m in args.mts.split(",")] if args.mts else [m for m in (1, 2, 4, 8) if m <= plan.max_m]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mt in mts:
            cub = CG.cached_cubin(CG.kernel_source(plan, mt), args.arch)
            path = os.path.join(tmp, f"k{mt}.cubin")
            with open(path, "wb") as f:
                f.write(cub)
            sass = subprocess.run([nd, "-c", path], capture_output=True, text=True, check=True).stdout
            ops = main_loop(sass, "HMMA" if plan.mma else "FFMA")
            row = {"config": list(cfg), "mt": mt, **cubin_info(cub), "loop_instructions": sum(ops.values())}
            row["loop_ops"] = {op: ops[op] for op in OPS if ops[op]}
            rows.append(row)
            print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
