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
