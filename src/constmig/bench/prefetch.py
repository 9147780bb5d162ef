"""`constmig bench prefetch`: does streaming what the app used last first pay, and where?

A kvstore under a client whose keys follow a zipf law (a few keys hot) migrates with ConstMig in heap
order and with `--prefetch used-last`, alternately; which order goes first alternates per repeat, so a
drift of the machine falls on both. Per migration: the chunks demanded (each one a wait of the app),
fault latency, the client's longest gap and its calls per second while the enclave moved, and for
used-last how many of the chunks it streamed first a demand still asked for before the background sent
them. On loopback the stream is short beside the app's working set; on a testbed with a slow link
(`constmig testbed up --link 1gbit`, then `--testbed NAME`) it is long. For this client the order paid in
neither (docs/architecture.md, "What the app used last, first"), and the segments the runs carry showed
where a demand's time goes on a real link.
"""

from __future__ import annotations

import os
import time
from typing import Any

from constmig.bench.load import stop_anywhere, two_agents
from constmig.bench.loadgen import KVHammer
from constmig.bench.results import machine_info, spread
from constmig.bench.suite import window_rate
from constmig.client import Trust
from constmig.errors import ConfigError
from constmig.host.orchestrate import launch_filled, migrate
from constmig.migration.constants import PREFETCH
from constmig.progress import console
from constmig.units import format_size

WARM_S = 1.0  # the client's calls before the migration: the watch needs an app that runs
FIGURES = ("demand_chunks", "background_chunks", "fault_latency_us_p50", "fault_latency_us_p99", "faults", "stream_s",
           "downtime_ms", "touched_chunks", "hot_chunks", "hot_demanded", "tracker")
KEYS = ("demand_chunks", "fault_latency_us_p50", "fault_latency_us_p99", "client_gap_ms", "ops_s_during",
        "stream_s", "downtime_ms")


def one_run(addrs: list[str], order: str, *, heap: int, tracker: str, keys: int, zipf: float, write_ratio: float,
            max_bandwidth: float, seed: int) -> dict[str, Any]:
    """Fill, start the client, migrate a->b in `order`, stop the client, read every acknowledged write back."""
    a, b = addrs[0], addrs[1]
    name = "prefetch-kv"
    stop_anywhere([a, b], name)  # a leftover from an interrupted run on a long-lived testbed
    hammer: KVHammer | None = None
    try:
        trust = Trust.in_memory()  # this run's own enclave: pinned at launch, never in the user's file
        launch_filled(a, name, "kvstore", heap, 0.9, seed, trust=trust)
        hammer = KVHammer(a, name, keys=keys, write_ratio=write_ratio, seed=seed + 1, zipf=zipf, trust=trust)
        hammer.preload()
        hammer.start()
        time.sleep(WARM_S)
        t0 = time.time()
        figures = migrate(name, a, b, "constmig", tracker=tracker, max_bandwidth=max_bandwidth,
                          **({} if order == "heap" else {"prefetch": order}))
        t1 = time.time()
        time.sleep(0.3)  # calls after DONE: the client's last gap closes
        report = hammer.stop()
        lost = hammer.verify()
    finally:
        if hammer is not None:  # stopped already unless the migration failed
            hammer.stop()
            hammer.close()
        stop_anywhere([b, a], name)
    timeline = [list(p) for p in report.ops_timeline]
    run = {"order": order, "lost_writes": lost,
           "client_calls": report.calls, "client_errors": len(report.errors), "client_wrong": report.wrong,
           "client_gap_ms": round(report.max_gap_ms, 2),
           "ops_s_before": window_rate(timeline, t0 - WARM_S + 0.2, t0),
           "ops_s_during": window_rate(timeline, t0, t1)}
    for k, v in figures.items():  # the counts, and where each demand's time went (p50/p99 per segment)
        segment = k.startswith(("demand_", "source_service_")) and k.endswith(("_p50", "_p99"))
        if v is not None and (k in FIGURES or segment):
            run[k] = v
    # The migration itself checked every chunk (DONE's digest) or it would have raised; the client's writes
    # are what a user would lose.
    run["ok"] = lost == 0 and report.wrong == 0 and not report.errors
    return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median [min, max] per order, and used-last's figures as ratios to heap order's in the same repeat."""
    by: dict[str, Any] = {}
    for order in PREFETCH:
        rs = [r for r in runs if r["order"] == order]
        by[order] = {k: spread(v) for k in KEYS if (v := [r[k] for r in rs if r.get(k) is not None])}
    hot = [r for r in runs if r["order"] == "used-last" and r.get("hot_chunks")]
    if hot:
        by["used-last"]["hot_demanded_share"] = spread(r["hot_demanded"] / r["hot_chunks"] for r in hot)
    ratios: dict[str, Any] = {}
    pairs = [(h, u) for h, u in zip([r for r in runs if r["order"] == "heap"],
                                    [r for r in runs if r["order"] == "used-last"], strict=False)]
    for k in KEYS:
        vals = [u[k] / h[k] for h, u in pairs if h.get(k) and u.get(k) is not None]
        if vals:
            ratios[k] = spread(vals)
    return {"orders": by, "used_last_vs_heap": ratios}


def run_prefetch(*, heap: int, repeat: int, tracker: str, keys: int, zipf: float, write_ratio: float,
                 testbed: str | None, max_bandwidth: float = 0.0, quiet: bool = False) -> dict[str, Any]:
    if heap < 64 << 20:
        raise ConfigError(f"--heap must be at least 64M (a kvstore that holds the keys and a stream to order), "
                          f"not {format_size(heap)}")
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"bench": "prefetch", "machine": machine_info(), "loadavg_start": list(os.getloadavg()),
                           "config": {"heap_bytes": heap, "repeat": repeat, "tracker": tracker, "keys": keys,
                                      "zipf": zipf, "write_ratio": write_ratio, "testbed": testbed,
                                      "max_bandwidth": max_bandwidth,
                                      "strategy": "constmig"},
                           "runs": runs}
    cm, addrs = two_agents(testbed)
    with cm as cluster:
        addrs = addrs or cluster.addrs
        for r in range(repeat):
            orders = PREFETCH if r % 2 == 0 else tuple(reversed(PREFETCH))
            for order in orders:
                run = one_run(addrs, order, heap=heap, tracker=tracker, keys=keys, zipf=zipf,
                              write_ratio=write_ratio, max_bandwidth=max_bandwidth, seed=r * 1000)
                run["repeat"] = r
                runs.append(run)
                if not quiet:
                    console.print(f"[{r + 1}/{repeat}] {order:9} demanded {run.get('demand_chunks', 0):4} chunks, "
                                  f"fault p50 {(run.get('fault_latency_us_p50') or 0) / 1e3:.2f} ms, client gap "
                                  f"{run['client_gap_ms']:.0f} ms, {run['ops_s_during'] or 0:.0f} calls/s moving"
                                  + (f", hot {run['hot_demanded']}/{run['hot_chunks']} demanded"
                                     if run.get("hot_chunks") else ""))
    doc["loadavg_end"] = list(os.getloadavg())
    doc["ok"] = all(r["ok"] for r in runs)
    doc.update(summarize(runs))
    return doc


def median_lines(doc: dict[str, Any]) -> list[str]:
    """One line per order: the medians people compare."""
    out = []
    for order, f in doc["orders"].items():
        def med(k: str, scale: float = 1.0, fmt: str = "{:.0f}", f: dict[str, Any] = f) -> str:
            return fmt.format(f[k]["median"] * scale) if k in f else "-"
        out.append(f"{order:9} demanded {med('demand_chunks')} chunks, fault p50 {med('fault_latency_us_p50', 1e-3, '{:.2f}')}"
                   f" ms p99 {med('fault_latency_us_p99', 1e-3, '{:.1f}')} ms, client gap {med('client_gap_ms')} ms, "
                   f"{med('ops_s_during')} calls/s while moving, stream {med('stream_s', 1, '{:.2f}')} s"
                   + (f", hot demanded {f['hot_demanded_share']['median']:.0%}" if "hot_demanded_share" in f else ""))
    return out
