"""Every figure a bench derives from samples is computed here, one way each.

Percentiles: nearest rank. The q-th percentile of n samples is the ceil(q/100 * n)-th smallest (q = 0:
the smallest). Why this one: it is always a value that was observed, p100 is the maximum, and with few
samples the tail is not blended towards the body (the p99 of 50 calls during a migration is the
slowest of them, not a point between the two slowest). A histogram gives the bin holding that same
rank, read at the bin's upper edge (`hist_quantile`), so a percentile from samples and one from the
enclaves' histograms agree within a bin.

Where two methods disagreed: `bench load` (and the Fleet) took the nearest rank; `bench calls`
(latency_us_p50/p99), `bench directory` (p50_ms/p99_ms) and `bench raw`'s floor (p50/p99) interpolated
between ranks (numpy's default). They all take the nearest rank now. The migration's own figures
(`fault_latency_us_p50`, the demand segments' p50/p99) are computed inside the enclave by
migration/receiver.py, which interpolates; the benches report them as the enclave gave them.

Spread: how every bench reports a figure it measured more than once, because the machines are shared
and noisy: the median (one bad run does not move it) with the min and max (which show that run). How
many values it covers is `n`, reported beside it where a document reports it (a summary row's "n").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from constmig.migration.receiver import parse_histogram

Band = tuple[float, float, float]  # a spread as (median, min, max), for plots


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None when there are no values."""
    s = sorted(values)
    if not s:
        return None
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))]  # ceil(q/100 * n) - 1


def percentiles(samples: Sequence[float], names: dict[str, float], scale: float = 1.0,
                digits: int | None = None, n: bool = False) -> dict[str, float | None]:
    """{name: percentile q of the samples, times `scale`, rounded to `digits`} for each name -> q, and
    with `n` how many samples there were."""
    s = sorted(samples)
    out: dict[str, float | None] = {}
    for name, q in names.items():
        v = percentile(s, q)
        out[name] = None if v is None else v * scale if digits is None else round(v * scale, digits)
    if n:
        out["n"] = len(s)
    return out


def spread(values: Iterable[float], digits: int | None = None) -> dict[str, float]:
    """Median, min and max of repeated measurements (rounded to `digits` if given)."""
    xs = list(values)
    out = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return out if digits is None else {k: round(v, digits) for k, v in out.items()}


def band(s: dict[str, float]) -> Band:
    """A spread as the (median, min, max) a plot draws."""
    return s["median"], s["min"], s["max"]


def fmt(v: float | None, spec: str = "{:.1f}") -> str:
    """A figure, or "-" where it was not measured."""
    return "-" if v is None else spec.format(v)


def show(s: dict[str, float] | None, fmt: str | Callable[[float], str] = "{:.1f}", low: bool = True) -> str:
    """"median [min-max]" (or "median [max]" without `low`); "-" for a figure that was not measured."""
    if not s:
        return "-"
    f = fmt.format if isinstance(fmt, str) else fmt
    return f"{f(s['median'])} [{f(s['min']) + '-' if low else ''}{f(s['max'])}]"


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float | None]:
    """Least squares y = intercept + slope * x, with R² and the slope's standard error.

    R² is None when y does not vary at all, and the standard error None with fewer than 3 points.
    A flat measure (ConstMig's downtime) has a slope near 0 and a low R²: read the slope and its error,
    not R², there.
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError("a line needs at least two distinct x values")
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    se = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 else None
    return {"slope": slope, "intercept": intercept, "r2": r2, "slope_se": se, "n": n}


def merge_hists(texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """Sum of histograms of one resolution -> (upper bin edges in µs, counts); None if there are none."""
    parsed = [p for p in (parse_histogram(t) for t in texts) if p is not None]
    if not parsed:
        return None
    b = parsed[0][0]
    parsed = [p for p in parsed if p[0] == b]
    total = np.zeros(max(len(c) for _, c in parsed), dtype=np.int64)
    for _, c in parsed:
        total[: len(c)] += c
    return 10 ** ((np.arange(total.size) + 1) / b), total


def hist_quantile(upper: np.ndarray, counts: np.ndarray, q: float) -> float | None:
    """Upper edge of the bin holding the nearest-rank quantile q (0..1): an upper bound, within one bin."""
    n = counts.sum()
    if n == 0:
        return None
    i = int(np.searchsorted(np.cumsum(counts), q * n))
    return float(upper[min(i, len(upper) - 1)])


def window_rate(timeline: Sequence[Sequence[float]], lo: float, hi: float, bucket: float = 0.1) -> float | None:
    """Mean ops/s over [lo, hi) from (start, ops/s) buckets, each lasting until the next starts.

    A bucket's ops are spread evenly over its span, so a window that cuts a bucket takes its share.
    """
    if hi <= lo or not timeline:
        return None
    ops = covered = 0.0
    for i, (t, rate) in enumerate(timeline):
        end = timeline[i + 1][0] if i + 1 < len(timeline) else t + bucket
        a, b = max(t, lo), min(end, hi)
        if b > a:
            ops += rate * (b - a)
            covered += b - a
    return ops / covered if covered > 0 else None
