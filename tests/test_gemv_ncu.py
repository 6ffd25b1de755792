"""benchmarks/diag/gemv_ncu.py's case list (the launch order its ncu report follows) -- no GPU needed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from vllm_superweight.kernels import cuda_marlin_gemv as CG

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "diag", "gemv_ncu.py")


def _mod():
    spec = importlib.util.spec_from_file_location("gemv_ncu", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cases_name_the_served_forms_and_placements():
    N = _mod()
    got = N.cases("down:8:mma:2:held;o:1:one;qkv:4:mma")
    assert got == [
        ("down", 8, CG.config_with(CG.SERVE_MMA, spe=2), True),
        ("o", 1, tuple(CG.SERVE_ONE), False),
        ("qkv", 4, tuple(CG.SERVE_MMA), False),
    ]
    default = N.cases("default")
    assert [c for c in default if c[3]] and {c[2][10] for c in default if len(c[2]) > 10} == {1, 2, 3}
    for bad in ("lm_head:8:mma", "down:8", "down:8:tensor"):
        with pytest.raises(SystemExit):
            N.cases(bad)


def test_plan_prints_the_launch_order_without_a_gpu():
    out = subprocess.run(
        [sys.executable, PATH, "--plan", "--cases", "down:8:mma;down:8:mma:3:held"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "launch 0: down M=8 config=4:4:12:2:1:0:1:1:0:1 held=0",
        "launch 1: down M=8 config=4:4:12:2:1:0:1:1:0:1:3 held=1",
    ]
