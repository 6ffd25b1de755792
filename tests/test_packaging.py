"""Packaging: the presets are package data (a wheel install finds them), every package is listed in pyproject."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_tracked_package_is_listed():
    """pyproject lists its packages (quant_configs/ is mapped into the package, so they are not found): a package
    added under vllm_superweight/ must be added there too, or wheel installs miss it."""
    st = _pyproject()["tool"]["setuptools"]
    listed = set(st["packages"])
    assert st["package-dir"] == {"vllm_superweight.quant_configs": "quant_configs"}
    assert "vllm_superweight.quant_configs" in listed
    assert "*.json" in st["package-data"]["vllm_superweight.quant_configs"]
    try:
        files = subprocess.run(
            ["git", "ls-files", "vllm_superweight"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    tracked = {os.path.dirname(f).replace("/", ".") for f in files if f.endswith("/__init__.py")}
    missing = sorted(tracked - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    for pkg in listed - {"vllm_superweight.quant_configs"}:
        assert os.path.isfile(os.path.join(ROOT, *pkg.split("."), "__init__.py")), pkg


def test_presets_are_package_resources():
    import importlib.resources

    from vllm_superweight.convert import list_presets, load_preset

    names = {
        p.name[:-5]
        for p in importlib.resources.files("vllm_superweight.quant_configs").iterdir()
        if p.name.endswith(".json")
    }
    assert names == {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "quant_configs", "*.json"))}
    assert set(list_presets()) == names and "default" in names
    assert load_preset("default")["bits"] == 4


@pytest.mark.slow
def test_wheel_install_finds_presets(tmp_path):
    """pip wheel + pip install --target (not editable), then `convert --preset default` from outside the checkout."""
    from test_convert import make_tiny_llama

    whl_dir, target, work = tmp_path / "whl", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", ROOT, "-w", str(whl_dir)],
        check=True,
        cwd=str(tmp_path),
        capture_output=True,
        timeout=600,
    )
    (wheel,) = glob.glob(str(whl_dir / "vllm_superweight-*.whl"))
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(target), wheel], check=True, capture_output=True, timeout=600
    )
    assert os.path.isfile(target / "vllm_superweight" / "quant_configs" / "default.json")
    src = make_tiny_llama(str(tmp_path / "src"))
    sws = tmp_path / "sw.json"
    sws.write_text(json.dumps([[1, 5, 17]]))
    env = dict(os.environ, PYTHONPATH=str(target))
    code = (
        "import sys, vllm_superweight; assert vllm_superweight.__file__.startswith(sys.argv[1]), "
        "vllm_superweight.__file__; from vllm_superweight.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(target),
            "convert",
            src,
            "out",
            "--preset",
            "default",
            "--super-weights",
            str(sws),
            "-q",
        ],
        cwd=str(work),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.load(open(work / "out" / "config.json"))["quantization_config"]
    assert (cfg["bits"], cfg["block"], cfg["holdout"]) == (4, "64", 0.001)


def test_cpu_lock_pins_every_requirement_by_hash():
    """requirements/cpu-lock.txt is installed with --require-hashes: every requirement is an exact pin followed by
    at least one sha256 (scripts/hash-lock.py writes them), and setup-env.sh asks pip to enforce them."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "requirements", "cpu-lock.txt")).read()
    entries = [e for e in re.split(r"\n(?=\S)", text) if e.strip() and not e.startswith("#")]
    assert len(entries) > 150
    for e in entries:
        assert re.match(r"^[A-Za-z0-9_.\-]+==\S+ \\\n", e), e
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", e), e
    assert "--require-hashes" in open(os.path.join(root, "scripts", "setup-env.sh")).read()
