"""Import a script of ``benchmarks/`` (not a package) as a module, for the tests of its pure functions."""

import importlib.util
import os
from types import ModuleType


def load(name: str) -> ModuleType:
    """``name`` relative to ``benchmarks/`` without ``.py`` (e.g. ``vllm_log``, ``diag/humming_startup``)."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(os.path.basename(name), path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
