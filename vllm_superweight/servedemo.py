"""Start ``vllm serve`` on loopback for a checkpoint, talk to it over the OpenAI API, stop it.

``python -m vllm_superweight.servedemo CKPT [--prompt ...]`` is the second half of the README's main command; the
``VLLMServer`` context manager is what the server tests use. Only the standard library talks HTTP here.
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
import urllib.error
import urllib.request

from . import envs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cmd() -> list[str]:
    exe = shutil.which("vllm", path=os.path.dirname(sys.executable)) or shutil.which("vllm")
    return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class VLLMServer:
    """``with VLLMServer(ckpt) as srv: srv.chat(...)`` - a real ``vllm serve`` process on 127.0.0.1."""

    def __init__(
        self,
        model: str,
        port: int | None = None,
        extra_args: list[str] | None = None,
        log_path: str | None = None,
        startup_timeout: float = 600.0,
        env: dict | None = None,
    ):
        self.model = model
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = None

    def __enter__(self) -> VLLMServer:
        env = envs.setdefault_vllm_env(dict(os.environ))
        env.update(self.env)
        cmd = (
            vllm_cmd()
            + [
                "serve",
                self.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--max-model-len",
                "2048",
                "--served-model-name",
                "superweight-demo",
            ]
            + self.extra_args
        )
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"vllm serve exited with code {self.proc.returncode} during start-up"
                    + (f" (log: {self.log_path})" if self.log_path else "")
                )
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve did not become healthy within {self.startup_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def post(self, path: str, body: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def chat(self, content: str, max_tokens: int = 64, temperature: float = 0.0) -> dict:
        return self.post(
            "/v1/chat/completions",
            {
                "model": "superweight-demo",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": temperature,
            },
        )

    def complete(self, prompt: str, max_tokens: int = 32, temperature: float = 0.0, **kw) -> dict:
        return self.post(
            "/v1/completions",
            {"model": "superweight-demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **kw},
        )


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"servedemo: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(
        prog="python -m vllm_superweight.servedemo",
        description="Serve a checkpoint with vLLM on 127.0.0.1, send one chat completion, print it, stop the server.",
    )
    ap.add_argument("ckpt")
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--log", default=None, help="server log file (default: CKPT/../serve.log)")
    args, extra = ap.parse_known_args(argv)
    if not os.path.isdir(args.ckpt):
        print(f"servedemo: error: {args.ckpt}: not a checkpoint directory", file=sys.stderr)
        return 2
    log = args.log or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "serve.log")
    print(f"[demo] starting vllm serve {args.ckpt} on 127.0.0.1 (CPU); log: {log}", flush=True)
    t0 = time.time()
    try:
        with VLLMServer(args.ckpt, port=args.port, extra_args=extra, log_path=log) as srv:
            print(f"[demo] server healthy after {time.time() - t0:.0f} s at {srv.base}", flush=True)
            t1 = time.time()
            r = srv.chat(args.prompt, max_tokens=args.max_tokens)
            msg = r["choices"][0]["message"]["content"]
            print(f"[demo] user: {args.prompt}")
            print(
                f"[demo] assistant ({r['usage']['completion_tokens']} tokens, {time.time() - t1:.1f} s): {msg}",
                flush=True,
            )
    except KeyboardInterrupt:
        print("servedemo: error: interrupted (server stopped)", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, TimeoutError, KeyError, ValueError) as e:  # URLError is an OSError
        print(f"servedemo: error: {' '.join(str(e).split())} (server log: {log})", file=sys.stderr)
        return 1
    print("[demo] server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
