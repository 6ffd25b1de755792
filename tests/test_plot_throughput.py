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


def test_engines_table_lists_every_engine_and_the_means():
    """A merged lease (``lease_call`` on each record): one row per engine, then each method's mean and its ratio to
    SmoothQuant's mean -- latency as baseline / this, throughput as this / baseline; nothing without lease_call."""

    def rec(variant, call, kind, value, batch=64):
        r = {"method": variant, "variant": variant, "kind": kind, "gpu": "G", "vllm": "0.26.0", "lease_call": call}
        if kind == "latency":
            return dict(r, input_len=128, output_len=256, batch=batch, num_prompts=batch, latency_s=value)
        return dict(r, input_len=128, output_len=128, batch=400, num_prompts=400, tokens_per_s=value)

    recs = [rec("smoothquant", 1, "latency", 2.0), rec("smoothquant", 1, "throughput", 100.0)]
    recs += [rec("sw-w8a8", 1, "latency", 1.9), rec("sw-w8a8", 1, "throughput", 90.0)]
    recs += [rec("sw-w8a8", 2, "latency", 2.1), rec("sw-w8a8", 2, "throughput", 100.0)]
    md = PT.engines_table(recs)
    rows = [ln for ln in md.splitlines() if ln.startswith("| SW-RTN W8A8")]
    assert len(rows) == 3  # two engines, one mean
    assert "| SW-RTN W8A8 + outlier ch. (2) | 2.000 | 95 | 1.000 / 0.950 |" in md  # 2.0 / 2.0, 95 / 100
    assert "| SmoothQuant W8A8 (1) | 2.000 | 100 | 1.000 / 1.000 |" in md
    assert PT.engines_table([{k: v for k, v in r.items() if k != "lease_call"} for r in recs]) == ""


def test_throughput_median_of_repeats():
    """benchmarks/throughput.py's saturated repeats: the median of every timed run, all kept in order; at least one."""
    tb = load("throughput")
    times = iter([4.4, 4.2, 4.3])
    assert tb.median_of(lambda: next(times), 3) == (4.3, [4.4, 4.2, 4.3])
    calls = []
    assert tb.median_of(lambda: calls.append(1) or 2.0, 0) == (2.0, [2.0]) and len(calls) == 1


def test_throughput_parse_gpu_state():
    """benchmarks/throughput.py's GPU sample around a saturated run: nvidia-smi's csv (no units) as typed fields,
    the first GPU's line only; anything that does not parse gives {} (never a crash mid-lease)."""
    tb = load("throughput")
    line = "1980, 2619, 47, 312.55, 0x0000000000000000\n1755, 2619, 52, 500.00, 0x0000000000000004\n"
    assert tb.parse_gpu_state(line) == dict(
        sm_mhz=1980, mem_mhz=2619, temp_c=47, power_w=312.6, throttle="0x0000000000000000"
    )
    assert tb.parse_gpu_state("") == {}
    assert tb.parse_gpu_state("[N/A], 2619, 47, 312.55, 0x0") == {}  # a field nvidia-smi could not read
    assert tb.parse_gpu_state("1980, 2619, 47") == {}  # a field missing


def test_dmon_power_per_latency_repeat(tmp_path):
    """SW_DMON's log lined up with each latency repeat: the samples inside a repeat give its mean power and lowest
    SM clock, the date comes from the records' epoch (UTC), a wrap past midnight adds a day, '-' samples are
    skipped, and records of calls without a log are left out."""
    import datetime as dt

    day = dt.datetime(2026, 12, 7, 23, 59, 58, tzinfo=dt.timezone.utc).timestamp()
    log = tmp_path / "dmon.log"
    log.write_text(
        "#Time  gpu pwr gtemp mtemp mclk pclk\n#HH:MM:SS Idx W C C MHz MHz\n"
        " 23:59:58 0 400 40 40 2619 1980\n 23:59:59 0 300 40 40 2619 1500\n"
        " 00:00:00 0 - 40 40 2619 -\n 00:00:01 0 500 40 40 2619 1980\n 00:00:02 0 100 40 40 2619 345\n"
    )
    rows = PT.read_dmon(str(log), day)
    assert [(t - day, p, c) for t, p, c in rows] == [
        (0.0, 400.0, 1980.0),
        (1.0, 300.0, 1500.0),
        (3.0, 500.0, 1980.0),
        (4.0, 100.0, 345.0),
    ]
    rec = {"method": "smoothquant", "variant": "smoothquant", "kind": "latency", "batch": 8, "lease_call": 2,
           "latency_starts": [day - 0.2, day + 2.9], "latencies": [1.5, 0.5]}  # fmt: skip
    other = dict(rec, lease_call=3)
    md = PT.power_table([rec, other], {2: rows})
    assert "| 2 | 8 | 1.500 (350) · 0.500 (500) | 1500 |" in md
    assert md.count("| 8 |") == 1  # call 3 has no log
    assert PT.power_table([other], {2: rows}) == ""
