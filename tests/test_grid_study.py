"""benchmarks/grid_study.py: the structured (slice-column) hold-out of the s45 experiment."""

from __future__ import annotations

import pytest
import torch
from bench_module import load


def test_slice_columns_holds_out_whole_columns_of_slices():
    """``slice_columns`` holds out ``round(count / rows)`` (slice, column) pairs, each as every row of its slice in
    that column, ranked by the slice's largest |w| (``max``) or sum of squares (``l2``), plus the super weights as
    single entries; a row count that is no multiple of the slice is refused."""
    gs = load("grid_study")
    w = torch.full((8, 6), 0.1)
    w[1, 2] = 5.0  # slice 0 (rows 0-3): column 2 has the largest single weight
    w[4:8, 4] = 2.0  # slice 1 (rows 4-7): column 4 has the largest sum of squares (16) but a smaller max
    w[5, 0] = 3.0  # slice 1: column 0 has the largest max there
    m = gs.slice_columns(w, count=8, rows=4, score="max")  # two pairs
    assert m.sum() == 8 and m[0:4, 2].all() and m[4:8, 0].all()
    m = gs.slice_columns(w, count=4, rows=4, score="l2")  # one pair: slice 0's column 2 (25.03) beats slice 1's
    assert m.sum() == 4 and m[0:4, 2].all()  # column 4 (16) and column 0 (9.03)
    w[4:8, 4] = 3.0  # now 36: slice 1's column 4 wins by sum of squares, though its max (3) ties column 0's
    m = gs.slice_columns(w, count=4, rows=4, score="l2")
    assert m.sum() == 4 and m[4:8, 4].all()
    m = gs.slice_columns(w, count=4, rows=4, score="l2", extra=[(7, 5)])
    assert m.sum() == 5 and m[7, 5]
    assert gs.parse_struct("cols32") == (32, "max") and gs.parse_struct("cols8l2") == (8, "l2")
    with pytest.raises(SystemExit):
        gs.parse_struct("rows32")
    with pytest.raises(SystemExit):
        gs.slice_columns(w, count=4, rows=3, score="max")
