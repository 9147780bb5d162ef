"""`constmig bench load`: a client fleet at a fixed rate through one migration, per strategy.

What a service owner asks of live migration: did any user call fail or get a wrong answer, was any
acknowledged write lost, and how much worse was tail latency while it moved? For each variant the
kvstore is filled, a `Fleet` sends at a fixed aggregate rate (open loop: latency from the scheduled
send time), the enclave migrates midway, and afterwards every acknowledged write is read back. The
calls are split by scheduled time into before / during / after the migration (during = from the
migrate request until it returns). Results go to load.json, a latency-over-time plot next to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from constmig.bench.loadgen import PHASES, CallRecord, Fleet
from constmig.bench.results import machine_info, split_variant
from constmig.client import Trust
from constmig.errors import ConfigError, ConstmigError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import launch_filled, migrate
from constmig.progress import console
from constmig.units import format_size
from constmig.wire import control

DEFAULT_VARIANTS = ("stopcopy", "constmig-fault", "constmig-access")


def usable_variants(wanted: list[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """The variants to run, and the ones left out with why: the Fault Tracker needs userfaultfd.

    A default list quietly drops constmig-fault where userfaultfd does not work; an explicit request
    for it there is an error, not a silent substitution."""
    from constmig.kernel.uffd import preflight

    problem = preflight()
    if wanted:
        if problem and any(split_variant(v)[1] == "fault" for v in wanted):
            raise ConfigError(f"constmig-fault needs userfaultfd, which does not work here: {problem}")
        return list(dict.fromkeys(wanted)), []
    if problem:
        return [v for v in DEFAULT_VARIANTS if split_variant(v)[1] != "fault"], \
            [{"variant": "constmig-fault", "reason": f"userfaultfd not usable: {problem}"}]
    return list(DEFAULT_VARIANTS), []


def two_agents(testbed: str | None) -> tuple[AbstractContextManager[Any], list[str] | None]:
    """A LocalCluster to start (addresses known once entered), or a running testbed's addresses."""
    if testbed is None:
        return LocalCluster(2), None
    from constmig.testbed import Testbed

    bed = Testbed.attach(testbed)
    if len(bed.addrs) < 2:
        raise ConfigError(f"testbed {testbed!r} has {len(bed.addrs)} host(s); a migration needs two")
    return nullcontext(), bed.addrs[:2]


def stop_anywhere(addrs: list[str], name: str) -> None:
    """Stop the enclave wherever it ended up (after a failed migration it may still be at the source)."""
    for addr in addrs:
        with contextlib.suppress(ConstmigError):
            request(addr, control.Stop(name=name), timeout=30)


def one_run(addrs: list[str], variant: str, *, clients: int, rate: float, duration: float, heap: int,
            fill: float, migrate_at: float, write_ratio: float, keys_per_client: int, seed: int
            ) -> tuple[dict[str, Any], list[CallRecord]]:
    """Fill, start the fleet, migrate a->b at `migrate_at` of the run, finish, read back, summarize."""
    a, b = addrs[0], addrs[1]
    strategy, tracker = split_variant(variant)
    name = f"load-{variant}"
    stop_anywhere([a, b], name)  # a leftover from an interrupted run on a long-lived testbed
    run: dict[str, Any] = {"variant": variant, "strategy": strategy, "name": name}
    fleet: Fleet | None = None
    try:
        trust = Trust.in_memory()  # this run's own enclave: pinned at launch, never in the user's file
        launch_filled(a, name, "kvstore", heap, fill, seed, trust=trust)
        fleet = Fleet(a, name, clients=clients, rate=rate, duration=duration, keys_per_client=keys_per_client,
                      write_ratio=write_ratio, seed=seed + 1, trust=trust)
        fleet.preload()
        fleet.start()
        time.sleep(max(0.0, duration * migrate_at - fleet.now()))
        start = fleet.now()
        try:
            figures = migrate(name, a, b, strategy, tracker=tracker)
            run["migration"] = {k: v for k, v in figures.items() if not isinstance(v, dict | list)}
        except ConstmigError as e:
            run["migration"] = {"error": str(e)}
        end = fleet.now()
        report = fleet.verify(fleet.join())
    finally:
        if fleet is not None:
            fleet.close()
        stop_anywhere([b, a], name)
    run["tracker"] = run["migration"].get("tracker", "none" if strategy == "stopcopy" else tracker)
    run["window_s"] = [round(start, 4), round(end, 4)]
    run.update(report.summary((start, end)))
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
    cm, addrs = two_agents(testbed)
    with cm as cluster:
        addrs = addrs or cluster.addrs
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
    plot_load(doc, all_records, out / "load_latency.png")
    wide_console().print(load_table(doc))
    console.print(f"wrote {out / 'load.json'} and {out / 'load_latency.png'}")
    return doc


def wide_console() -> Console:
    """The progress console, or, when stderr is a file or pipe (CI logs), one wide enough for the table."""
    return console if console.is_terminal else Console(stderr=True, width=120)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def load_table(doc: dict[str, Any]) -> Table:
    c = doc["config"]
    table = Table(title=escape(f"kvstore {format_size(c['heap_bytes'])}: {c['clients']} clients, "
                               f"{c['rate']:g} calls/s, {c['duration_s']:g} s"))
    for col in ("variant", "phase", "calls", "retried", "failed", "p50 ms", "p99 ms", "max ms", "lost",
                "wrong", "downtime ms"):
        table.add_column(col, justify="left" if col in ("variant", "phase") else "right")
    for run in doc["runs"]:
        t, mig = run["totals"], run["migration"]
        down = "error" if "error" in mig else _ms(mig.get("downtime_ms"))
        for j, phase in enumerate(PHASES):
            p = run["phases"][phase]
            first = j == 0
            table.add_row(run["variant"] if first else "", phase, str(p["calls"]), str(p["retried"]),
                          str(p["failed"]), _ms(p["p50_ms"]), _ms(p["p99_ms"]), _ms(p["max_ms"]),
                          str(t["lost"]) if first else "", str(t["wrong"]) if first else "",
                          down if first else "", end_section=j == len(PHASES) - 1)
    return table


def plot_load(doc: dict[str, Any], records: dict[str, list[CallRecord]], path: Path) -> None:
    """Latency of every call against its scheduled time, one panel per variant, migration shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_title(f"{run['variant']}: p99 {_ms(ph['before']['p99_ms'])} / {_ms(ph['during']['p99_ms'])} / "
                     f"{_ms(ph['after']['p99_ms'])} ms before / during / after; lost {run['totals']['lost']}, "
                     f"failed {run['totals']['failed']}", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=7, markerscale=3)
    axes[-1, 0].set_xlabel("scheduled send time (s since the fleet started)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
