"""benchmarks/plot_throughput.py: which latency axis the plot draws."""

from __future__ import annotations

import json

import pytest
from bench_module import load

PT = load("plot_throughput")


def _recs(batches: dict[int, tuple[float, float]]) -> list[dict]:
    """Latency records of AWQ and our W4 at each batch size (seconds per batch: AWQ's, ours)."""
    out = []
    for b, pair in batches.items():
        for variant, s in zip(("awq", "sw-w4-g128"), pair):
            out.append(
                {"method": variant, "variant": variant, "kind": "latency", "gpu": "G", "vllm": "0.26.0",
                 "input_len": 128, "output_len": 256, "batch": b, "num_prompts": b, "latency_s": s}
            )  # fmt: skip
    return out


def test_log_axis_only_where_latencies_span_batches():
    assert PT.log_axis([0.73, 1.01, 2.21])  # batch 1 .. 64
    assert not PT.log_axis([2.09, 2.197, 2.211])  # one batch size, a few % apart
    assert not PT.log_axis([])


@pytest.mark.parametrize(
    "batches, scale", [({64: (2.197, 2.09)}, "linear"), ({1: (1.01, 0.73), 64: (2.2, 2.1)}, "log")]
)
def test_plot_draws_one_batch_size_on_a_linear_axis(tmp_path, batches, scale):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_recs(batches)))
    fig = PT.plot(PT.load(str(path)), str(tmp_path / "t.png"))
    (ax,) = [a for a in fig.axes if a.get_ylabel() == "seconds per batch"]
    assert ax.get_yscale() == scale and (tmp_path / "t.png").stat().st_size > 0
