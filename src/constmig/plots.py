"""Figures people would rather see than read, saved as PNG next to the JSON they come from."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_demo(figures: dict[str, Any], path: Path) -> None:
    """One migration: total time against the part of it the app was down."""
    fig, ax = plt.subplots(figsize=(7, 2.2))
    total_ms = figures["total_s"] * 1e3
    ax.barh(["migration"], [total_ms], color="#9ecae1", label="total migration time")
    ax.barh(["migration"], [figures["downtime_ms"]], left=[total_ms - figures["downtime_ms"]],
            color="#de2d26", label="downtime (app stopped)")
    ax.set_xlabel("ms")
    ax.set_title(f"{figures['strategy']}: {figures['heap_bytes'] / 2**20:.0f} MiB heap, "
                 f"downtime {figures['downtime_ms']:.0f} ms")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
        med = np.array([np.median(sizes[x]) for x in xs])
        lo = med - np.array([min(sizes[x]) for x in xs])
        hi = np.array([max(sizes[x]) for x in xs]) - med
        ax.errorbar(np.array(xs) / 2**30, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("heap (GiB)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
