"""`constmig bench load`: a client fleet at a fixed rate through one migration, per strategy.

What a service owner asks of live migration: did any user call fail or get a wrong answer, was any
acknowledged write lost, and how much worse was tail latency while it moved? For each variant the
kvstore is filled, a `Fleet` sends at a fixed aggregate rate (open loop: latency from the scheduled
send time), the enclave migrates midway, and afterwards every acknowledged write is read back. The
calls are split by scheduled time into before / during / after the migration (during = from the
migrate request until it returns). Results go to load.json, a latency-over-time plot next to it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from constmig.bench.harness import Move, launched, run_migration, two_agents, usable_variants
from constmig.bench.loadgen import PHASES, CallRecord, Fleet
from constmig.bench.results import machine_info
from constmig.bench.stats import fmt
from constmig.errors import ConfigError
from constmig.progress import console
from constmig.units import format_size


def one_run(addrs: list[str], variant: str, *, clients: int, rate: float, duration: float, heap: int,
            fill: float, migrate_at: float, write_ratio: float, keys_per_client: int, seed: int
            ) -> tuple[dict[str, Any], list[CallRecord]]:
    """Fill, start the fleet, migrate a->b at `migrate_at` of the run, finish, read back, summarize."""
    a, b = addrs[0], addrs[1]
    name = f"load-{variant}"
    m = Move.of(variant, name, a, b)
    run: dict[str, Any] = {"variant": variant, "strategy": m.strategy, "name": name}
    with launched(addrs, name, "kvstore", heap, fill, seed) as trust, \
            Fleet(a, name, clients=clients, rate=rate, duration=duration, keys_per_client=keys_per_client,
                  write_ratio=write_ratio, seed=seed + 1, trust=trust) as fleet:
        fleet.preload()
        moved = run_migration(m, fleet, before_s=duration * migrate_at, after_s=0.0)
        report = fleet.verify(moved.report)
    run["migration"] = {"error": str(moved.error)} if moved.error else \
        {k: v for k, v in moved.figures.items() if not isinstance(v, dict | list)}
    run["tracker"] = run["migration"].get("tracker", "none" if m.strategy == "stopcopy" else m.tracker)
    run["window_s"] = [round(moved.requested, 4), round(moved.returned, 4)]
    run.update(report.summary((moved.requested, moved.returned)))
    t = run["totals"]
    run["ok"] = ("error" not in run["migration"] and t["lost"] == 0 and t["wrong"] == 0
                 and t["unverified"] == 0 and t["unsent"] == 0)
    return run, report.records


def run_load(out: Path, variants: list[str] | None = None, clients: int = 8, rate: float = 400.0,
             duration: float = 20.0, heap: int = 256 << 20, fill: float = 0.9, migrate_at: float = 0.5,
             write_ratio: float = 0.5, keys_per_client: int = 200, testbed: str | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Every variant in turn on the same two agents; writes load.json and load_latency.png in `out`."""
    if not 0 < migrate_at < 1:
        raise ConfigError(f"--migrate-at must be between 0 and 1 (a fraction of the run), not {migrate_at:g}")
    chosen, skipped = usable_variants(variants)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()),  # other work on the machine shows up as latency spikes
        "config": {"clients": clients, "rate": rate, "duration_s": duration, "heap_bytes": heap, "fill": fill,
                   "migrate_at": migrate_at, "write_ratio": write_ratio, "keys_per_client": keys_per_client,
                   "retries": 5, "testbed": testbed, "app": "kvstore"},
        "skipped": skipped, "runs": runs}
    all_records: dict[str, list[CallRecord]] = {}
    with two_agents(testbed) as addrs:
        doc["config"]["agents"] = addrs[:2]
        for k, variant in enumerate(chosen):
            console.print(f"[{k + 1}/{len(chosen)}] {variant}: {clients} clients, {rate:g} calls/s for "
                          f"{duration:g} s, {format_size(heap)} heap, migrating at {duration * migrate_at:g} s")
            run, records = one_run(addrs, variant, clients=clients, rate=rate, duration=duration, heap=heap,
                                   fill=fill, migrate_at=migrate_at, write_ratio=write_ratio,
                                   keys_per_client=keys_per_client, seed=seed + k)
            runs.append(run)
            all_records[variant] = records
            (out / "load.json").write_text(json.dumps(doc, indent=2) + "\n")
    doc["ok"] = bool(runs) and all(r["ok"] for r in runs)
    doc["loadavg_end"] = list(os.getloadavg())
    (out / "load.json").write_text(json.dumps(doc, indent=2) + "\n")
    from constmig.bench.plots import plot_load

    plot_load(doc, all_records, out / "load_latency.png")
    wide_console().print(load_table(doc))
    console.print(f"wrote {out / 'load.json'} and {out / 'load_latency.png'}")
    return doc


def wide_console() -> Console:
    """The progress console, or, when stderr is a file or pipe (CI logs), one wide enough for the table."""
    return console if console.is_terminal else Console(stderr=True, width=120)


def load_table(doc: dict[str, Any]) -> Table:
    c = doc["config"]
    table = Table(title=escape(f"kvstore {format_size(c['heap_bytes'])}: {c['clients']} clients, "
                               f"{c['rate']:g} calls/s, {c['duration_s']:g} s"))
    for col in ("variant", "phase", "calls", "retried", "failed", "p50 ms", "p99 ms", "max ms", "lost",
                "wrong", "downtime ms"):
        table.add_column(col, justify="left" if col in ("variant", "phase") else "right")
    for run in doc["runs"]:
        t, mig = run["totals"], run["migration"]
        down = "error" if "error" in mig else fmt(mig.get("downtime_ms"))
        for j, phase in enumerate(PHASES):
            p = run["phases"][phase]
            first = j == 0
            table.add_row(run["variant"] if first else "", phase, str(p["calls"]), str(p["retried"]),
                          str(p["failed"]), fmt(p["p50_ms"]), fmt(p["p99_ms"]), fmt(p["max_ms"]),
                          str(t["lost"]) if first else "", str(t["wrong"]) if first else "",
                          down if first else "", end_section=j == len(PHASES) - 1)
    return table
