"""Figures people would rather see than read, saved as PNG next to the JSON they come from."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from constmig.bench.stats import Band, band, fmt, spread  # noqa: E402
from constmig.units import format_size  # noqa: E402


def plot_demo(figures: dict[str, Any], path: Path) -> None:
    """One migration as a timeline: preparing (app runs at the source), down, streaming (app runs at
    the destination while the heap arrives)."""
    fig, ax = plt.subplots(figsize=(7.5, 1.8))
    prepare = figures.get("prepare_s", 0.0) * 1e3
    down = figures["downtime_ms"]
    stream = (figures.get("stream_s") or 0.0) * 1e3
    total = figures["total_s"] * 1e3
    attest = max(0.0, total - prepare - down - stream)  # attestation, and for stop-and-copy the wrap-up
    left = 0.0
    for width, color, label in ((prepare, "#bdbdbd", "prepare destination (app runs at source)"),
                                (attest, "#9ecae1", "attest / finish"),
                                (down, "#de2d26", "downtime (app stopped)"),
                                (stream, "#31a354", "heap streams (app runs at destination)")):
        if width > 0:
            ax.barh(["migration"], [width], left=[left], color=color, label=label)
            left += width
    stop_at = prepare + attest
    ax.axvline(stop_at, color="#de2d26", lw=1.5)
    ax.annotate(f"stop: {down:.0f} ms down", (stop_at, 0.0), xytext=(6, 0), textcoords="offset points",
                color="white" if stream > 0 else "black", fontsize=9, fontweight="bold", va="center")
    ax.set_xlabel("ms since the migrate request")
    tracker = f", {figures['tracker']} tracker" if figures.get("tracker") not in (None, "none") else ""
    gap = f", client gap {figures['client_gap_ms']:.0f} ms" if figures.get("client_gap_ms") is not None else ""
    ax.set_title(f"{figures['strategy']}{tracker}: {figures['heap_bytes'] / 2**20:.0f} MiB heap, "
                 f"downtime {down:.0f} ms{gap}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2, fontsize=7, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_sizes(results: list[dict[str, Any]], path: Path, key: str = "downtime_ms", ylabel: str = "downtime (ms)"
               ) -> None:
    """A measure against heap size per strategy: median with min-max bars, log-log."""
    by = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get(key) is None:
            continue
        label = r.get("variant") or r["strategy"]
        by[label][r["heap_bytes"]].append(r[key])
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, sizes in sorted(by.items()):
        xs = sorted(sizes)
        _errorbars(ax, np.array(xs) / 2**30, [band(spread(sizes[x])) for x in xs], label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("heap (GiB)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


# -- bench suite (report.py aggregates; these only draw) ----------------------------------------------

VARIANT_COLORS = {"stopcopy": "#de2d26", "constmig-fault": "#3182bd", "constmig-access": "#31a354",
                  "constmig": "#756bb1", "precopy": "#fd8d3c", "hybrid-fault": "#08519c", "hybrid-access": "#006d2c",
                  "hybrid": "#54278f", "auto-fault": "#e7298a", "auto-access": "#c994c7", "auto": "#ae017e",
                  "precopy+throttle": "#a63603"}


def _color(variant: str) -> str:
    return VARIANT_COLORS.get(variant, "#636363")


def _size_axis(ax: Any, heaps: list[int]) -> None:
    """Log2 heap axis ticked at the sizes that ran, labelled 256M, 1G..."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(heaps))
    if ticks:
        ax.set_xticks([h / 2**30 for h in ticks])
        ax.set_xticklabels([f"{h >> 30}G" if h % 2**30 == 0 else f"{h >> 20}M" for h in ticks])
        ax.minorticks_off()
        ax.set_xlim(ticks[0] / 2**30 / 1.4, ticks[-1] / 2**30 * 1.4)


def _errorbars(ax: Any, xs: np.ndarray, bands: list[Band], **kw: Any) -> None:
    """Medians joined by a line, each with its min-max as error bars."""
    med = np.array([b[0] for b in bands])
    err = [med - np.array([b[1] for b in bands]), np.array([b[2] for b in bands]) - med]
    ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, **kw)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_suite_downtime(series: dict[str, list[tuple[int, Band]]], reductions: dict[str, dict[int, float]],
                        path: Path, title: str = "") -> None:
    """Downtime against heap size per variant (median, min-max bars, log y), each post-copy point
    labelled with its reduction against stop-and-copy at that size."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, pts in series.items():
        if not pts:
            continue
        _errorbars(ax, np.array([h for h, _ in pts]) / 2**30, [b for _, b in pts], label=variant,
                   color=_color(variant))
        for heap, b in pts:
            red = reductions.get(variant, {}).get(heap)
            if red is not None:
                ax.annotate(f"-{red:.1f}%", (heap / 2**30, b[0]), xytext=(4, -12), textcoords="offset points",
                            fontsize=7, color=_color(variant))
    _size_axis(ax, [h for pts in series.values() for h, _ in pts])
    ax.set_yscale("log")
    ax.set_xlabel("heap size")
    ax.set_ylabel("downtime (ms), median and min-max")
    ax.set_title(title or "downtime against heap size (labels: reduction vs stop-and-copy)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _grouped_bars(ax: Any, data: dict[str, dict[str, Band]], series: list[str], log: bool,
                  label: Callable[[str], str] = str, color: Callable[[str], str] = _color) -> None:
    """One group of bars per key of `data`, one bar per series in it (median, min-max whiskers)."""
    groups = list(data)
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        got = [(i, data[g][name]) for i, g in enumerate(groups) if data[g].get(name) is not None]
        if got:
            ax.bar([i + (j - (len(series) - 1) / 2) * width for i, _ in got], [b[0] for _, b in got], width,
                   yerr=[[max(0.0, b[0] - b[1]) for _, b in got], [max(0.0, b[2] - b[0]) for _, b in got]],
                   capsize=2, label=label(name), color=color(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)


def plot_workload_bars(data: dict[str, dict[str, Band]], variants: list[str], path: Path, ylabel: str,
                       title: str, log: bool = True) -> None:
    """One group of bars per workload, one bar per variant (median, min-max whiskers)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(data) + 2), 4.2))
    _grouped_bars(ax, data, variants, log)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_suite_total(series: dict[str, list[tuple[int, Band]]], by_workload: dict[str, dict[str, Band]],
                     variants: list[str], path: Path, sweep_label: str, workload_label: str) -> None:
    """Total migration time per variant: against heap size (left), per workload at one size (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    for variant, pts in series.items():
        if pts:
            _errorbars(left, np.array([h for h, _ in pts]) / 2**30, [b for _, b in pts], label=variant,
                       color=_color(variant))
    _size_axis(left, [h for pts in series.values() for h, _ in pts])
    left.set_xlabel("heap size")
    left.set_ylabel("total migration time (s)")
    left.set_title(sweep_label, fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    _grouped_bars(right, by_workload, variants, log=False)
    right.set_title(workload_label, fontsize=10)
    right.set_ylabel("total migration time (s)")
    _save(fig, path)


PHASE_STYLE = {"prepared": ("#969696", "destination ready"), "rounds": ("#fd8d3c", "pre-copy rounds"),
               "stop": ("#de2d26", "stop"),
               "resumed": ("#31a354", "resumed at destination"), "done": ("#3182bd", "last chunk (DONE)")}


def plot_timelines(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """The client driver's ops/s over time, one panel per variant, with the migration's phases marked:
    pre-copy rounds shaded orange, downtime red, streaming after the resume green."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.1 * len(runs) + 0.6), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        tl = run.get("timeline") or []
        ph = run.get("phases") or {}
        if tl:
            ts = np.array([t for t, _ in tl])
            rs = np.array([r for _, r in tl])
            ax.step(ts, rs, where="post", color="#252525", lw=1)
            ax.fill_between(ts, rs, step="post", color="#bdbdbd", alpha=0.5)
        if "rounds" in ph and "stop" in ph:
            ax.axvspan(ph["rounds"], ph["stop"], color="#fd8d3c", alpha=0.15, lw=0)
        if "stop" in ph and "resumed" in ph:
            ax.axvspan(ph["stop"], max(ph["resumed"], ph["stop"] + 0.004), color="#de2d26", alpha=0.35, lw=0)
            if ph.get("done", ph["resumed"]) > ph["resumed"] + 0.01 and run.get("strategy") in ("constmig", "hybrid"):
                ax.axvspan(ph["resumed"], ph["done"], color="#31a354", alpha=0.12, lw=0)
        for key, (color, label) in PHASE_STYLE.items():
            if key in ph:
                ax.axvline(ph[key], color=color, lw=1, ls="--", label=label)
        gap = run.get("client_gap_ms")
        ax.set_title(f"{run['variant']}: downtime {run['downtime_ms']:.1f} ms, total {run['total_s']:.2f} s"
                     + (f", longest client gap {gap:.0f} ms" if gap is not None else ""), fontsize=9)
        ax.set_ylabel("ops/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    seen: dict[str, Any] = {}  # every phase any panel marks, once (the first panel may lack the rounds)
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    axes[0, 0].legend(list(seen.values()), list(seen), fontsize=7, loc="lower left", ncol=5)
    axes[-1, 0].set_xlabel("seconds since the migrate request")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_fault_cdf(panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path, title: str,
                   xlabel: str = "fault latency (ms): access waits until its bytes are in place") -> None:
    """Demand-fault latency CDF per tracker (one panel each), one line per workload plus all merged.

    Each line is a histogram's cumulative count at its bins' upper edges (log-binned, 10 per decade)."""
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, (tracker, lines) in zip(axes[0], panels.items(), strict=False):
        for i, (label, (upper, counts)) in enumerate(lines.items()):
            if counts.sum() == 0:
                continue
            i0 = int(np.flatnonzero(counts)[0])  # start at the first bin that holds a fault
            cdf = np.cumsum(counts[i0:]) / counts.sum()
            lower = upper[i0] ** 2 / upper[i0 + 1] if i0 + 1 < len(upper) else upper[i0] / 10 ** 0.1
            xs = np.concatenate(([lower], upper[i0:]))
            ys = np.concatenate(([0.0], cdf))
            bold = label.startswith(("all", "whole"))
            ax.step(xs / 1e3, ys, where="post", lw=2.2 if bold else 1, color="black" if bold else cmap(i % 10),
                    label=f"{label} (n={int(counts.sum())})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{tracker} tracker", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0, 0].set_ylabel("fraction of samples")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_overhead(data: dict[str, dict[str, Band]], labels: dict[str, str], path: Path, title: str) -> None:
    """Throughput relative to plain arrays (1.0 = no cost), per workload, one bar per tracker mode."""
    colors = {"access": "#74c476", "access-stream": "#238b45", "fault": "#3182bd"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(data) + 2), 4.2))
    _grouped_bars(ax, data, [m for m in labels if m != "plain"], False, labels.__getitem__,
                  lambda m: colors.get(m, "#969696"))
    ax.axhline(1.0, color="black", lw=1)
    ax.set_ylabel("throughput / plain (median of rounds, min-max)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_growth(points: dict[str, dict[str, tuple[list[float], list[float]]]],
                fits: dict[str, dict[str, dict[str, float]]], ylabels: dict[str, str], path: Path,
                title: str) -> None:
    """Each measure against heap size on linear axes, every run a dot, with its least-squares line."""
    keys = list(points)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.6 * max(1, len(keys)), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        for variant, (xs, ys) in points[key].items():
            ax.scatter(xs, ys, s=12, color=_color(variant), alpha=0.7)
            fit = fits.get(key, {}).get(variant)
            if fit and xs:
                gx = np.linspace(min(xs), max(xs), 50)  # over the measured range only
                gy = fit["intercept"] + fit["slope"] * gx
                r2 = f"{fit['r2']:.2f}" if fit.get("r2") is not None else "-"
                ax.plot(gx[gy > 0], gy[gy > 0], color=_color(variant), lw=1,
                        label=f"{variant}: {fit['slope']:.3g}/GiB, R²={r2}")
        ax.set_xlabel("heap (GiB)")
        ax.set_ylabel(ylabels.get(key, key) + ", log scale")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_calls(lats: dict[str, np.ndarray], path: Path) -> None:
    """Latency CDF of the sealed and the plain calls (`bench calls`)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, color in (("plain", "#888888"), ("sealed", "#1f77b4")):
        lat = np.sort(lats[name]) * 1e6
        ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=name, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("kvstore get latency (µs)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("client call latency: sealed session vs plain through the agent")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_load(doc: dict[str, Any], records: dict[str, list[Any]], path: Path) -> None:
    """Latency of every call (loadgen.CallRecord) against its scheduled time, one panel per variant, the
    migration shaded (`bench load`)."""
    runs = doc["runs"]
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        rs = records.get(run["variant"], [])
        ok = [r for r in rs if r.ok]
        bad = [r for r in rs if not r.ok]
        ax.scatter([r.scheduled for r in ok], [max(r.latency * 1e3, 1e-2) for r in ok], s=2, alpha=0.35,
                   color="#3182bd", label="call", rasterized=True)
        if bad:
            ax.scatter([r.scheduled for r in bad], [max(r.latency * 1e3, 1e-2) for r in bad], s=14, marker="x",
                       color="#de2d26", label="failed")
        tl = [b for b in run["timeline"] if b["p99_ms"] is not None]
        ax.plot([b["t"] + 0.125 for b in tl], [b["p99_ms"] for b in tl], color="#08306b", lw=1,
                label="p99 per 250 ms")
        start, end = run["window_s"]
        ax.axvspan(start, max(end, start + 0.02), color="#fdae6b", alpha=0.45, label="migration")
        ph = run["phases"]
        ax.set_title(f"{run['variant']}: p99 {fmt(ph['before']['p99_ms'])} / {fmt(ph['during']['p99_ms'])} / "
                     f"{fmt(ph['after']['p99_ms'])} ms before / during / after; lost {run['totals']['lost']}, "
                     f"failed {run['totals']['failed']}", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=7, markerscale=3)
    axes[-1, 0].set_xlabel("scheduled send time (s since the fleet started)")
    _save(fig, path)


def plot_soak(doc: dict[str, Any], path: Path, enclave_files: Callable[[list[str]], list[str]]) -> None:
    """Times per migration by variant, and each agent's leak counters over the soak (`bench soak`);
    `enclave_files` picks the enclave's own files out of a run/ listing."""

    recs = [r for r in doc["migrations"] if "counters" in r]
    if not recs:
        return
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    for ax, key, label in ((axes[0, 0], "downtime_ms", "downtime (ms)"),
                           (axes[0, 1], "total_s", "total migration time (s)")):
        for variant in dict.fromkeys(r["variant"] for r in recs):
            rs = [r for r in recs if r["variant"] == variant]
            ax.plot([r["i"] for r in rs], [r[key] for r in rs], "o", ms=4, label=variant)
        ax.set_ylabel(label)
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    xs = [r["i"] for r in recs]
    for host, style in (("a", "-"), ("b", "--")):
        c = [r["counters"][host] for r in recs]
        axes[0, 2].plot(xs, [x["rss_kb"] / 1024 for x in c], style, label=f"agent {host}")
        axes[1, 1].plot(xs, [x["maps"] for x in c], style, label=f"agent {host}")
    left = [r["counters"][r["from"]] for r in recs]
    hosting = [r["counters"][r["to"]] for r in recs]
    axes[1, 0].plot(xs, [x["fds"] for x in hosting], "o-", ms=3, label="agent it runs on")
    axes[1, 0].plot(xs, [x["fds"] for x in left], "s-", ms=3, label="agent it left")
    axes[1, 0].axhline(max(doc["idle_before"][h]["fds"] for h in ("a", "b")), color="grey", ls=":",
                       label="idle, before")
    ax = axes[1, 2]
    ax.plot(xs, [x["procs"] + 0.04 for x in hosting], "o", ms=4, label="children, host it runs on (1 expected)")
    ax.plot(xs, [x["zombies"] + 0.02 for x in hosting], "x", ms=4, label="zombies, host it runs on")
    ax.plot(xs, [x["procs"] + x["zombies"] - 0.02 for x in left], "s", ms=3, label="children, host it left")
    ax.plot(xs, [len(enclave_files(x["run_files"])) - 0.04 for x in left], "^", ms=3, label="its files, host it left")
    ax.set_ylim(-0.3, max(2.0, ax.get_ylim()[1]))
    for ax, label in ((axes[0, 2], "agent RSS (MiB)"), (axes[1, 0], "agent open fds"),
                      (axes[1, 1], "agent memory mappings"), (axes[1, 2], "count")):
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("migration")
    n = len(doc["problems"])
    fig.suptitle(f"soak: {len(recs)} migrations of {format_size(doc['config']['heap_bytes'])} in "
                 f"{doc['duration_s']:.0f} s, {'no problem' if not n else f'{n} problem(s)'} "
                 "(the enclave's host has 1 live child, the other none)", fontsize=10)
    _save(fig, path)
