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


class BoundsGuard:
    """Inside the interpreter: every address a Triton kernel loads or stores (masked-off lanes excluded) must lie
    inside one of the given tensors' storage; the ones that do not are collected in ``bad`` (a GPU reading past an
    allocation may or may not fault, depending on what lies next to it -- session 27's engine crash on the H200 was
    one such read). Use as ``with BoundsGuard([t, ...]) as g: ...; assert not g.bad``."""

    def __init__(self, tensors):
        self.ranges = []
        for t in tensors:
            if t is not None and t.numel():
                base = t.untyped_storage().data_ptr()
                self.ranges.append((base, base + t.untyped_storage().nbytes()))
        self.bad: list[tuple[str, int]] = []

    def _check(self, kind: str, ptrs, mask=None) -> None:
        import numpy as np

        addr = np.asarray(ptrs.data).reshape(-1).astype(np.uint64)
        if mask is not None:
            addr = addr[np.asarray(mask.data).reshape(-1).astype(bool)]
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi in self.ranges:  # an element's first byte decides (elements are aligned to their size)
            ok |= (addr >= lo) & (addr < hi)
        if not ok.all():
            self.bad.append((kind, int((~ok).sum())))

    def __enter__(self):
        from triton.runtime import interpreter as I

        self._cls = I.InterpreterBuilder
        self._orig = (self._cls.create_masked_load, self._cls.create_masked_store, self._cls.create_load)
        guard = self
        ml, ms, ld = self._orig

        def masked_load(b, ptrs, mask, *a, **kw):
            guard._check("load", ptrs, mask)
            return ml(b, ptrs, mask, *a, **kw)

        def masked_store(b, ptrs, value, mask, *a, **kw):
            guard._check("store", ptrs, mask)
            return ms(b, ptrs, value, mask, *a, **kw)

        def load(b, ptr, *a, **kw):
            guard._check("load", ptr)
            return ld(b, ptr, *a, **kw)

        self._cls.create_masked_load, self._cls.create_masked_store, self._cls.create_load = (
            masked_load,
            masked_store,
            load,
        )
        return self

    def __exit__(self, *exc):
        self._cls.create_masked_load, self._cls.create_masked_store, self._cls.create_load = self._orig
        return False
