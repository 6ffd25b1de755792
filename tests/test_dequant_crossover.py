"""benchmarks/dequant_crossover.py: the crossover it recommends and the table it writes (the timing itself needs a
GPU with Humming: ``gpu_run.sh dqcross``)."""

from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location(
        "dequant_crossover", os.path.join(HERE, "..", "benchmarks", "dequant_crossover.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _us(pairs):
    return {m: {"gemm+sell": hs, "deq+cublas": dq} for m, (hs, dq) in pairs.items()}


def test_crossover_is_where_dequantize_wins_from_on(dc):
    # wins from 256 on: 256
    assert dc.crossover(_us({96: (40, 70), 128: (45, 70), 256: (80, 75), 512: (150, 90)})) == 256
    # a win at 128 that does not hold at 256 does not count: the switch is one threshold
    assert dc.crossover(_us({128: (45, 40), 256: (80, 85), 512: (150, 90)})) == 512
    # never a win, or not at the largest size measured: no crossover
    assert dc.crossover(_us({96: (40, 70), 512: (150, 160)})) is None
    assert dc.crossover(_us({96: (70, 40), 512: (150, 160)})) is None
    # every size a win: the smallest
    assert dc.crossover(_us({96: (70, 40), 512: (150, 90)})) == 96
    # sizes missing a path are skipped
    assert dc.crossover({96: {"gemm+sell": 70}, 512: {"gemm+sell": 150, "deq+cublas": 90}}) == 512


def test_table_rows_costs_and_pick(dc):
    rows = [{"m": 64, "path": "humming+sell", "check_rel": 0.003}]
    for m, h, hs, dq in ((128, 30.0, 45.0, 70.0), (512, 80.0, 150.0, 95.0)):
        rows += [
            {"m": m, "path": "humming", "us": h},
            {"m": m, "path": "humming+sell", "us": hs},
            {"m": m, "path": "deq+cublas", "us": dq},
        ]
    meta = {"device": "X", "shape": [12288, 4096], "nnz": 201327, "density": 0.004, "layers": 4, "default_min_m": 96}
    md = dc.table(rows, meta)
    lines = md.splitlines()
    assert "| 128 | 30.0 | 45.0 (+50 %) | 70.0 (+133 %) | Humming + SELL |" in lines
    assert "| 512 | 80.0 | 150.0 (+88 %) | 95.0 (+19 %) | dequantize |" in lines
    assert not any(line.startswith("| 64 |") for line in lines)  # check rows carry no timing
    assert lines[-1] == "Dequantize from: 512 tokens."


def test_table_names_the_kernel_and_reads_s40_records(dc):
    """--kernel marlin-deq1 labels its rows Marlin; s40's records (paths named humming / humming+sell) read the same
    as today's gemm / gemm+sell, so that lease's JSON still tables and picks alike."""
    old = [
        {"m": 256, "path": p, "us": u} for p, u in (("humming", 47.0), ("humming+sell", 87.6), ("deq+cublas", 102.7))
    ]
    old += [
        {"m": 384, "path": p, "us": u} for p, u in (("humming", 69.5), ("humming+sell", 131.2), ("deq+cublas", 120.1))
    ]
    new = [dict(r, path=dc.ALIASES.get(r["path"], r["path"])) for r in old]
    assert (
        dc.by_m(old)
        == dc.by_m(new)
        == {
            256: {"gemm": 47.0, "gemm+sell": 87.6, "deq+cublas": 102.7},
            384: {"gemm": 69.5, "gemm+sell": 131.2, "deq+cublas": 120.1},
        }
    )
    assert dc.crossover(dc.by_m(old)) == 384
    meta = {"device": "X", "shape": [12288, 4096], "nnz": 1, "density": 0.004, "layers": 4, "default_min_m": 96}
    md = dc.table(new, dict(meta, gemm="Marlin"))
    assert md.startswith("# Held-out layer on one Marlin copy: Marlin + SELL vs dequantize + cuBLAS")
    assert "| M | Marlin alone | Marlin + SELL | dequantize + cuBLAS | faster with the hold-out |" in md
    assert "| 256 | 47.0 | 87.6 (+86 %) | 102.7 (+119 %) | Marlin + SELL |" in md
    assert dc.table(old, meta) == dc.table(new, dict(meta, gemm="Humming"))  # Humming unless named
