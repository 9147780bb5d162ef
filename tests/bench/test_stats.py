"""bench/stats.py: the one way each figure is computed (nearest-rank percentiles, spreads, line fits,
histogram quantiles, rates over a window). Pure functions, no processes."""

from __future__ import annotations

import numpy as np
import pytest

from constmig.bench.stats import (
    band,
    fit_line,
    fmt,
    hist_quantile,
    merge_hists,
    percentile,
    percentiles,
    show,
    spread,
    window_rate,
)
from constmig.migration.receiver import latency_histogram, parse_histogram


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) is None
    assert percentile([1.0, 2.0], 99) == 2.0  # a tail of few calls is the worst of them, not an interpolation
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # an observed value, where numpy would say 2.5
    assert percentile(iter([3.0, 1.0]), 50) == 1.0  # any iterable


def test_percentiles_names_scales_rounds_and_counts():
    s = [0.001, 0.002, 0.003, 0.0105]
    assert percentiles(s, {"p50_ms": 50, "max_ms": 100}, scale=1e3, digits=1) == {"p50_ms": 2.0, "max_ms": 10.5}
    assert percentiles(s, {"p99": 99}, scale=1e6, n=True) == {"p99": pytest.approx(10500.0), "n": 4}
    assert percentiles([], {"p50": 50}, digits=3, n=True) == {"p50": None, "n": 0}


def test_spread_is_median_min_max():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert spread(x for x in (1.23456, 2.0)) == {"median": 1.61728, "min": 1.23456, "max": 2.0}
    assert spread([1.23456, 2.0], digits=3) == {"median": 1.617, "min": 1.235, "max": 2.0}
    assert band(spread([1.0, 5.0, 2.0])) == (2.0, 1.0, 5.0)
    with pytest.raises(ValueError):
        spread([])


def test_show_and_fmt():
    s = {"median": 2.5, "min": 1.0, "max": 10.0}
    assert show(s) == "2.5 [1.0-10.0]"
    assert show(s, "{:.0f}", low=False) == "2 [10]"
    assert show(s, lambda v: f"<{v:g}>") == "<2.5> [<1>-<10>]"
    assert show(None) == "-" and show({}) == "-"
    assert fmt(None) == "-" and fmt(1.25) == "1.2" and fmt(3, "{:.0f}") == "3"


def test_fit_line_exact_and_noisy():
    f = fit_line([0.25, 1, 4], [100 + 300 * x for x in (0.25, 1, 4)])
    assert f["slope"] == pytest.approx(300) and f["intercept"] == pytest.approx(100)
    assert f["r2"] == pytest.approx(1.0) and f["slope_se"] == pytest.approx(0.0, abs=1e-9) and f["n"] == 3
    rng = np.random.default_rng(1)
    xs = [0.25, 1, 4] * 3
    flat = fit_line(xs, list(3 + rng.normal(0, 0.3, len(xs))))
    assert abs(flat["slope"]) < 0.3 and flat["r2"] < 0.5  # flat: slope near 0, R² says little
    assert fit_line([1, 2], [5, 5])["r2"] is None  # y does not vary
    assert fit_line([1, 2], [5, 7])["slope_se"] is None  # two points: no error estimate
    with pytest.raises(ValueError):
        fit_line([1, 1], [2, 3])


def test_window_rate_weights_buckets_by_overlap():
    tl = [[0.0, 100.0], [0.1, 300.0], [0.2, 0.0]]
    assert window_rate(tl, 0.0, 0.2) == pytest.approx(200.0)
    assert window_rate(tl, 0.05, 0.15) == pytest.approx(200.0)
    assert window_rate(tl, 0.2, 0.3) == pytest.approx(0.0)
    assert window_rate(tl, 1.0, 2.0) is None and window_rate([], 0, 1) is None


def test_histograms_merge_and_give_the_bin_of_the_nearest_rank():
    rng = np.random.default_rng(3)
    samples = list(np.exp(rng.uniform(np.log(1e-7), np.log(100.0), 100_000)))  # 0.1 µs .. 100 s
    text = latency_histogram(samples)
    assert text is not None and len(text) < 2048
    per_decade, counts = parse_histogram(text)
    assert per_decade == 10 and counts.sum() == len(samples)
    assert latency_histogram([]) is None
    ms = [0.001] * 90 + [0.010] * 10  # 1 ms and 10 ms
    upper, total = merge_hists([latency_histogram(ms), latency_histogram(ms), None, "garbage"])
    assert total.sum() == 200
    p50, p99 = hist_quantile(upper, total, 0.5), hist_quantile(upper, total, 0.99)
    assert 1000 <= p50 <= 1000 * 10**0.1 + 1 and 10_000 <= p99 <= 10_000 * 10**0.1 + 1
    assert merge_hists([None, "x"]) is None
    assert hist_quantile(upper, np.zeros_like(total), 0.5) is None


@pytest.mark.parametrize("q", [0.01, 0.5, 0.9, 0.99, 1.0])
def test_a_histogram_quantile_bounds_the_samples_nearest_rank(q):
    """The same method on both kinds of input: the bin read holds the nearest-rank sample, so its upper
    edge is at most one bin (10**0.1) above it and never below it."""
    rng = np.random.default_rng(7)
    samples = list(np.exp(rng.uniform(np.log(1e-5), np.log(1e-1), 999)))  # 10 µs .. 100 ms
    upper, counts = merge_hists([latency_histogram(samples)])
    exact_us = percentile(samples, q * 100) * 1e6
    got = hist_quantile(upper, counts, q)
    assert exact_us <= got <= exact_us * 10**0.1 * 1.000001
