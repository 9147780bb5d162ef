"""`constmig bench`: migrations at several heap sizes, strategies interleaved within one run.

The machines are shared and noisy, so strategies are compared side by side in the same run, every
point is repeated, and the summary reports median, min and max. Results are JSON; plots sit next to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from constmig.bench.harness import launched, migrate_under_load, two_agents
from constmig.bench.results import machine_info, split_variant, summarize
from constmig.bench.stats import show
from constmig.progress import console
from constmig.units import format_size


def one_migration(addrs: list[str], app: str, heap: int, variant: str, fill: float, seed: int,
                  name: str = "bench") -> dict[str, Any]:
    """Launch, fill, migrate a->b with a client calling throughout (see migrate_under_load), stop."""
    with launched(addrs, name, app, heap, fill, seed) as trust:
        figures = migrate_under_load(name, *addrs[:2], *split_variant(variant), app=app, seed=seed, trust=trust)
    figures["variant"] = variant
    return figures


def run_sizes(strategies: list[str], sizes: list[int], repeat: int, app: str, out: Path,
              fill: float = 0.9) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"machine": machine_info(), "app": app, "fill": fill, "repeat": repeat,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    with two_agents() as addrs:
        total = len(sizes) * repeat * len(strategies)
        done = 0
        for heap in sizes:
            for rep in range(repeat):
                for variant in strategies:
                    done += 1
                    console.print(f"[{done}/{total}] {variant} {format_size(heap)} repeat {rep + 1}")
                    fig = one_migration(addrs, app, heap, variant, fill, seed=rep)
                    fig["repeat"] = rep
                    results.append(fig)
                    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    doc["summary"] = summarize(results)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    from constmig.bench.plots import plot_sizes

    plot_sizes(results, out / "downtime_vs_heap.png")
    plot_sizes(results, out / "total_vs_heap.png", key="total_s", ylabel="total migration time (s)")
    plot_sizes(results, out / "client_gap_vs_heap.png", key="client_gap_ms",
               ylabel="longest gap between client calls (ms)")
    console.print(summary_table(doc["summary"], f"{app}: median [min-max] of {repeat}"))
    console.print(f"wrote {out / 'results.json'} and plots in {out}")
    return doc


def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=escape(title))
    for col in ("variant", "heap", "downtime ms", "vs stopcopy", "total s", "vs stopcopy", "client gap ms",
                "fault p50/p99 us", "verified"):
        table.add_column(col)
    for row in rows:
        p50, p99 = row.get("fault_latency_us_p50"), row.get("fault_latency_us_p99")
        table.add_row(
            row["variant"], format_size(row["heap_bytes"]), show(row.get("downtime_ms"), "{:.0f}"),
            f"{row['downtime_vs_stopcopy']:.1%}" if "downtime_vs_stopcopy" in row else "",
            show(row.get("total_s"), "{:.2f}"),
            f"{row['total_vs_stopcopy']:.2f}x" if "total_vs_stopcopy" in row else "",
            show(row.get("client_gap_ms"), "{:.0f}"),
            f"{p50['median']:.0f} / {p99['median']:.0f}" if p50 and p99 else "-",
            str(row["all_verified"]))
    return table
