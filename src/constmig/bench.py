"""`constmig bench`: migrations at several heap sizes, strategies interleaved within one run.

The machines are shared and noisy, so strategies are compared side by side in the same run, every
point is repeated, and the summary reports median, min and max. Results are JSON; plots sit next to it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.migration.orchestrate import app_checksum, launch_filled, migrate
from constmig.progress import console
from constmig.units import format_size


def machine_info() -> dict[str, Any]:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "aes_ni": " aes " in f" {flags} ", "machine": platform.machine()}


def one_migration(cluster: LocalCluster, app: str, heap: int, strategy: str, fill: float, seed: int,
                  name: str = "bench") -> dict[str, Any]:
    """Launch, fill, checksum, migrate a->b, checksum, stop. Returns the figures."""
    a, b = cluster.addrs[0], cluster.addrs[1]
    launch_filled(a, name, app, heap, fill, seed)
    before = app_checksum(a, name)
    figures = migrate(name, a, b, strategy)
    figures["verified"] = app_checksum(b, name) == before
    request(b, {"op": "stop", "name": name})
    return figures


def summarize(results: list[dict[str, Any]], keys: tuple[str, ...] = ("downtime_ms", "total_s")
              ) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["strategy"], r.get("tracker", ""), r["heap_bytes"]), []).append(r)
    rows = []
    for (strategy, tracker, heap), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"strategy": strategy, "tracker": tracker, "heap_bytes": heap, "n": len(rs),
                               "all_verified": all(r.get("verified") for r in rs)}
        for k in keys:
            vals = [r[k] for r in rs]
            row[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        rows.append(row)
    return rows


def run_sizes(strategies: list[str], sizes: list[int], repeat: int, app: str, out: Path,
              fill: float = 0.9) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"machine": machine_info(), "app": app, "fill": fill, "repeat": repeat,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    with LocalCluster(2) as cluster:
        total = len(sizes) * repeat * len(strategies)
        done = 0
        for heap in sizes:
            for rep in range(repeat):
                for strategy in strategies:
                    done += 1
                    console.print(f"[{done}/{total}] {strategy} {format_size(heap)} repeat {rep + 1}")
                    fig = one_migration(cluster, app, heap, strategy, fill, seed=rep)
                    fig["repeat"] = rep
                    results.append(fig)
                    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    doc["summary"] = summarize(results)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    from constmig.plots import plot_sizes

    plot_sizes(results, out / "downtime_vs_heap.png")
    plot_sizes(results, out / "total_vs_heap.png", key="total_s", ylabel="total migration time (s)")
    table = Table(title=escape(f"{app}: downtime and total time against heap size (median [min-max] of {repeat})"))
    for col in ("strategy", "heap", "downtime ms", "total s", "verified"):
        table.add_column(col)
    for row in doc["summary"]:
        d, t = row["downtime_ms"], row["total_s"]
        table.add_row(row["strategy"], format_size(row["heap_bytes"]),
                      f"{d['median']:.0f} [{d['min']:.0f}-{d['max']:.0f}]",
                      f"{t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}]", str(row["all_verified"]))
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and plots in {out}")
    return doc
