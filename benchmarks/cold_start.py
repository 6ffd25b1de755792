#!/usr/bin/env python3
"""Time-to-ready of ``vllm serve`` (cold and warm caches), ours beside AWQ, on the GPU machine.

    python benchmarks/cold_start.py --out $OUT/cold_start.json --ckpt awq-7b=/root/swbench/awq \
        --ckpt sw-7b=/root/swbench/sw-w4-g128 [--env sw-7b:SUPERWEIGHT_W4_KERNEL=humming-gemv] \
        [--modes cold,warm] [--timeout 420] [-- extra vllm serve args]

For each checkpoint and mode one ``vllm serve CKPT --host 127.0.0.1`` is started with its caches (vLLM's compile
cache, Inductor's, Triton's) in a directory of its own: ``cold`` empties it first (a fresh machine), ``warm``
reuses what the cold start left (a restart). The per-run cache directory also stands in for ``~/.cache``
(``XDG_CACHE_HOME``, FlashInfer's ``FLASHINFER_WORKSPACE_BASE``): on a fresh machine vLLM's first engine spends
~90 s JIT-compiling shared kernels there, and whichever method ran first would otherwise pay it alone. So do the
caches kept under the home directory itself: ours (``SUPERWEIGHT_CACHE_DIR``: the CUDA GEMV's cubins) and vLLM's
Humming backend's (``HUMMING_CACHE_DIR``: its nvcc builds, one per layer shape, ~11 s each on the H200).
``--env NAME:KEY=VALUE`` gives one checkpoint's runs an environment variable (e.g. the W4 kernel mode). The
checkpoint's files are read once before every run (``--preread``, default on) so the OS page cache is equally warm
for every method: a disk that a concurrent job is writing made one load take 137 s instead of 5.
Measured: seconds from the process start to ``/health`` answering 200 (``ready_s``) and to the first
completion of 16 tokens (``first_completion_s``), plus what vLLM's log says the time went to (weights loading,
torch.compile, CUDA-graph capture, engine init). Records are appended to ``--out`` as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_log import parse_file  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:  # noqa: BLE001
        return 0


def complete(port: int, model: str) -> float:
    body = json.dumps(
        {"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    t = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        json.load(r)
    return time.time() - t


def preread(path: str) -> tuple[int, float]:
    """Read every file under ``path`` once (into the OS page cache); returns (bytes, seconds)."""
    t = time.time()
    n = 0
    for root, _dirs, files in os.walk(path):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                while chunk := f.read(1 << 24):
                    n += len(chunk)
    return n, time.time() - t


def parse_envs(items: list[str], names: list[str]) -> dict[str, dict[str, str]]:
    """``--env NAME:KEY=VALUE`` items -> {NAME: {KEY: VALUE}}; NAME must be one of the checkpoints' names."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not key:
            raise ValueError(f"--env {item!r}: expected NAME:KEY=VALUE")
        if name not in names:
            raise ValueError(f"--env {item!r}: no checkpoint named {name!r} (have {', '.join(names)})")
        out.setdefault(name, {})[key] = value
    return out


def run_env(cache: str, own: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one run: every cache the engine fills inside ``cache``, then the checkpoint's own
    variables (which may not name a cache: a cold start must start from nothing)."""
    caches = dict(
        VLLM_CACHE_ROOT=os.path.join(cache, "vllm"),
        TRITON_CACHE_DIR=os.path.join(cache, "triton"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
        XDG_CACHE_HOME=os.path.join(cache, "xdg"),
        FLASHINFER_WORKSPACE_BASE=os.path.join(cache, "home"),
        SUPERWEIGHT_CACHE_DIR=os.path.join(cache, "superweight"),
        HUMMING_CACHE_DIR=os.path.join(cache, "humming"),
    )
    clash = sorted(set(own or {}) & set(caches))
    if clash:
        raise ValueError(f"--env may not set a cache directory: {', '.join(clash)}")
    return dict(os.environ, **caches, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", **(own or {}))


def serve_once(
    name: str,
    ckpt: str,
    mode: str,
    cache: str,
    timeout: float,
    extra: list[str],
    logdir: str,
    pre: bool = True,
    own_env: dict[str, str] | None = None,
) -> dict:
    if mode == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    env = run_env(cache, own_env)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        ckpt,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
    ] + extra
    lp = os.path.join(logdir, f"cold_start-{name}-{mode}.log")
    rec: dict = dict(name=name, ckpt=ckpt, mode=mode, cmd=" ".join(cmd[2:]), env=dict(own_env or {}))
    if pre:
        nbytes, secs = preread(ckpt)
        rec["preread"] = dict(gib=round(nbytes / 2**30, 2), s=round(secs, 1))
    t0 = time.time()
    with open(lp, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while time.time() - t0 < timeout:
                if p.poll() is not None:
                    rec["status"] = f"exited rc={p.returncode}"
                    break
                if get(f"http://127.0.0.1:{port}/health") == 200:
                    rec["ready_s"] = round(time.time() - t0, 1)
                    rec["first_request_s"] = round(complete(port, name), 2)
                    rec["first_completion_s"] = round(time.time() - t0, 1)
                    rec["status"] = "ok"
                    break
                time.sleep(0.5)
            else:
                rec["status"] = f"not ready after {timeout:.0f}s"
        finally:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except Exception:  # noqa: BLE001
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    rec.update(parse_file(lp))
    return rec


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cold_start.json"))
    ap.add_argument("--ckpt", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument(
        "--env", action="append", default=[], help="NAME:KEY=VALUE, an environment variable of one checkpoint's runs"
    )
    ap.add_argument("--modes", default="cold,warm")
    ap.add_argument("--workdir", default="/root/coldstart")
    ap.add_argument("--timeout", type=float, default=420.0)
    ap.add_argument("--budget-s", type=float, default=570.0)
    ap.add_argument(
        "--no-preread", dest="preread", action="store_false", help="do not read the checkpoint before each run"
    )
    args = ap.parse_args(argv)
    try:
        envs = parse_envs(args.env, [c.partition("=")[0] for c in args.ckpt])
    except ValueError as e:
        ap.error(str(e))
    logdir = os.path.dirname(os.path.abspath(args.out))
    recs = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            recs = json.load(f)
    # every checkpoint cold first, then every one warm: a run cut short by the budget still compares cold starts
    for mode in args.modes.split(","):
        for item in args.ckpt:
            name, _, path = item.partition("=")
            left = args.budget_s - (time.time() - T0)
            if left < 60:
                log(f"skip {name}/{mode}: {left:.0f}s left")
                continue
            log(f"{name} ({path}) {mode}")
            rec = serve_once(
                name,
                path,
                mode,
                os.path.join(args.workdir, name),
                min(args.timeout, left - 20),
                extra,
                logdir,
                args.preread,
                envs.get(name),
            )
            rec["gpu"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
                )
                .stdout.strip()
                .splitlines()[:1]
            )
            recs.append(rec)
            with open(args.out + ".tmp", "w") as f:
                json.dump(recs, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
            log(f"  -> {json.dumps(rec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
