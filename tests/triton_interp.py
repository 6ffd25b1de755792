"""Running a test module's Triton-interpreter tests (``-k interp_``) in a subprocess with ``TRITON_INTERPRET=1``:
the real Triton kernels on tiny shapes on a CPU. Triton reads the variable at import, hence the subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not INTERP, reason="runs inside the TRITON_INTERPRET=1 subprocess")
not_interp = pytest.mark.skipif(INTERP, reason="not in the interpreter run")


def run_interp_tests(path: str, timeout: float = 900.0) -> None:
    """Run ``path``'s ``interp_`` tests under the interpreter; skip if none was collected, fail on any failure."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path, "-k", "interp_"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = p.stdout + p.stderr
    if p.returncode == 5 or "no tests ran" in out:
        pytest.skip("interpreter tests were not collected")
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
