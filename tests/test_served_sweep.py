"""benchmarks/served_sweep.py (issue 12's kernel table, M = 1..256): the arithmetic of its table (x AWQ, the
hold-out's cost, the HBM share), and the whole flow on the CPU (``--dry-run-cpu``: build through the kernel classes,
float64 check, timing, JSON / table / plot, ``--plot`` from a saved JSON). The timing itself needs a GPU
(``gpu_run.sh served``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


@pytest.fixture(scope="module")
def ss():
    spec = importlib.util.spec_from_file_location("served_sweep", os.path.join(ROOT, "benchmarks", "served_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layer_bytes_is_w4_codes_scales_zeros_and_activations(ss):
    shapes = {"a": (256, 512)}
    # 256 x 512 codes at 4 bits, 256 x 4 bf16 scales, 256 x 4 zero points at 4 bits; M = 2: x 2 x 512, y 2 x 256 bf16
    assert ss.weight_bytes(shapes, 128) == 256 * 512 // 2 + 256 * 4 * 2 + 256 * 4 // 2
    assert ss.layer_bytes(shapes, 128, 2) == ss.weight_bytes(shapes, 128) + 2 * (256 + 512) * 2
    # the 7B layer: 202.4 M weights -> 101.2 MB of codes, 1.58 M groups x 2.5 B -> 3.95 MB of scales + zero points
    assert ss.weight_bytes(ss.SHAPES, 128) == 202_375_168 // 2 + 1_581_056 * 2 + 1_581_056 // 2


def test_peak_from_the_device_name(ss):
    assert ss.peak_tbs("NVIDIA H100 80GB HBM3") == 3.35
    assert ss.peak_tbs("NVIDIA H200") == 4.8
    assert ss.peak_tbs("NVIDIA H100", override=3.0) == 3.0
    assert ss.peak_tbs("cpu (dry run)") != ss.peak_tbs("cpu (dry run)")  # NaN: unknown


def test_table_ratios_costs_and_hbm_share(ss):
    meta = {"device": "NVIDIA H100", "peak_tbs": 3.35, "shapes": ss.SHAPES, "group": 128, "layers": 4, "nnz": 202375}
    meta.update(density=0.004, kernels={"awq": "Machete", "ours": "HummingGemv"})
    rows = [
        {"engine": "awq", "m": 1, "us": 80.0},
        {"engine": "ours", "m": 1, "us": 55.0},
        {"engine": "ours+holdout", "m": 1, "us": 57.2},
        {"engine": "awq", "m": 64, "us": 120.0},
        {"engine": "ours", "m": 64, "us": 100.0},
        {"engine": "ours+holdout", "m": 64, "note": "failed: X"},  # a failed engine leaves its cells empty
        {"engine": "ours", "shape": "qkv", "m": 1, "check_rel": 3e-3},  # check rows carry no timing
    ]
    md = ss.table(rows, meta)
    share = 100 * ss.layer_bytes(ss.SHAPES, 128, 1) / 55e-6 / 1e12 / 3.35
    assert f"| 1 | 80.0 | 55.0 | 1.455 | {share:.1f} % | 57.2 | 1.399 | +4.0 % |" in md
    assert "| 64 | 120.0 | 100.0 | 1.200 |" in md and "| – | – | – |" in md
    assert round(share, 1) == 57.1  # s36's H100 number: 55.0 us a layer = 57.1 %, from cuda_gemv_bench's own bytes
    assert "worst relative error 3.00e-03 (ours, qkv, M = 1)" in md
    assert "Marlin" not in md.splitlines()[4]  # the Marlin column only where Marlin was timed
    md = ss.table(rows + [{"engine": "marlin", "m": 1, "us": 70.0}], meta)
    assert md.splitlines()[4].endswith("| Marlin (µs) |") and "| +4.0 % | 70.0 |" in md and "| – | – |\n" in md


def test_dry_run_end_to_end_and_replot(tmp_path):
    out = tmp_path / "ss.json"
    p = subprocess.run(
        [sys.executable, "benchmarks/served_sweep.py", "--dry-run-cpu", "--out", str(out), "--ms", "1,5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.load(open(out))
    timed = {(r["engine"], r["m"]) for r in rec["results"] if r.get("us")}
    assert timed == {(e, m) for e in ("awq", "ours", "ours+holdout") for m in (1, 5)}
    checks = [r for r in rec["results"] if "check_rel" in r]
    # every engine's four GEMMs checked against float64 (the held-out qkv with its values restored) at M = 1 and 3
    assert len(checks) == 3 * 4 * 2 and max(r["check_rel"] for r in checks) < 2e-2
    assert rec["meta"]["nnz"] > 0 and set(rec["meta"]["kernels_by_shape"]) == {"awq", "ours", "ours+holdout"}
    md = (tmp_path / "ss.md").read_text()
    assert md.count("\n| 1 |") == 1 and md.count("\n| 5 |") == 1
    assert (tmp_path / "ss.png").stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))  # nothing half-written left beside the results
    os.remove(tmp_path / "ss.md")
    os.remove(tmp_path / "ss.png")
    p = subprocess.run(
        [sys.executable, "benchmarks/served_sweep.py", "--plot", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "ss.md").read_text() == md and (tmp_path / "ss.png").exists()


def test_refuses_unknown_engines_and_a_missing_out():
    for args in (["--out", "/tmp/x.json", "--engines", "ours,gptq"], []):
        p = subprocess.run(
            [sys.executable, "benchmarks/served_sweep.py", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert p.returncode == 2 and ("gptq" in p.stderr or "--out" in p.stderr), p.stderr


def test_check_catches_a_correction_that_is_not_applied(ss):
    """The float64 check is what makes the timings mean something: a held-out layer whose reference values differ
    from what its kernel restores must stop the run."""
    import torch

    sys.path.insert(0, HERE)
    shapes = {"qkv": (256, 128)}
    built = ss.build(["ours+holdout"], 1, shapes, 64, 40, 1e-3, torch.device("cpu"), True)
    rows: list[dict] = []
    ss.check(built, (2,), torch.device("cpu"), rows)  # as built: within tolerance
    assert rows and rows[0]["check_rel"] < ss.CHECK_TOL
    layer, kobj, w, (r, c, v) = built["ours+holdout"][0]["qkv"]
    built["ours+holdout"][0]["qkv"] = (layer, kobj, w, (r, c, v + 1.0))  # the reference now expects other values
    with pytest.raises(SystemExit, match="off float64"):
        ss.check(built, (2,), torch.device("cpu"), [])
