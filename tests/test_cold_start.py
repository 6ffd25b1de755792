"""benchmarks/cold_start.py: the per-checkpoint environment and the caches a cold start empties."""

import os

import pytest
from bench_module import load

cs = load("cold_start")


def test_parse_envs_per_checkpoint():
    got = cs.parse_envs(["hg:SUPERWEIGHT_W4_KERNEL=humming-gemv", "hg:A=x=y", "awq:B="], ["awq", "hg"])
    assert got == {"hg": {"SUPERWEIGHT_W4_KERNEL": "humming-gemv", "A": "x=y"}, "awq": {"B": ""}}


@pytest.mark.parametrize("bad", ["SUPERWEIGHT_W4_KERNEL=humming", "hg:noequals", "hg:=v", "other:K=V"])
def test_parse_envs_refuses_malformed_or_unknown(bad):
    with pytest.raises(ValueError):
        cs.parse_envs([bad], ["hg"])


def test_run_env_puts_every_cache_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HUMMING_CACHE_DIR", "/elsewhere")
    env = cs.run_env(str(tmp_path), {"SUPERWEIGHT_W4_KERNEL": "humming-gemv"})
    for key in ("SUPERWEIGHT_CACHE_DIR", "HUMMING_CACHE_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert os.path.dirname(env[key]) == str(tmp_path), key
    assert env["SUPERWEIGHT_W4_KERNEL"] == "humming-gemv"
    with pytest.raises(ValueError, match="HUMMING_CACHE_DIR"):
        cs.run_env(str(tmp_path), {"HUMMING_CACHE_DIR": "/keep"})
