"""What an attested, sealed session costs a client: kvstore `get` over a session against the same call
unsealed through the agent (today's plain path), on one enclave, in one run.

The enclave is launched with --plain-calls so both paths reach the same app; rounds alternate the two
paths (sealed, plain, sealed, ...) so the machine's noise falls on both alike. Each round is one client
making `calls` sequential gets of existing keys; per path the figures are calls/s and per-call latency
(p50 and p99 over every call, bench/stats.py's nearest rank), per round and overall, and the ratio
sealed/plain.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from constmig.bench.results import dumps, machine_info
from constmig.bench.stats import percentiles, spread
from constmig.client import EnclaveClient, Trust, pin_now
from constmig.host.client import PlainEnclaveClient, request
from constmig.host.cluster import LocalCluster
from constmig.wire import control

NAME = "kvcost"
KEYS = 1000


def _round(client: Any, calls: int) -> tuple[float, np.ndarray]:
    lat = np.empty(calls)
    t0 = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        value = client.call("get", f"k{i % KEYS}")
        lat[i] = time.perf_counter() - t
        if value != f"v{i % KEYS}".encode():
            raise AssertionError(f"wrong answer for k{i % KEYS}: {value!r}")
    return calls / (time.perf_counter() - t0), lat


def run_calls(rounds: int, calls: int, out: Path, quiet: bool = False) -> dict[str, Any]:
    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    with LocalCluster(1) as cluster:
        a = cluster.addrs[0]
        request(a, control.Run(name=NAME, app="kvstore", heap=64 << 20, plain_calls=True))
        trust = Trust.in_memory()  # the bench's own enclave: pinned at launch, never in the user's file
        pin_now(a, NAME, trust)
        sealed, plain = EnclaveClient(a, NAME, timeout=60, trust=trust), PlainEnclaveClient(a, NAME, timeout=60)
        try:
            t_open = time.perf_counter()
            sealed.open()
            open_ms = (time.perf_counter() - t_open) * 1e3
            sealed.call("put_many", [[f"k{i}", f"v{i}"] for i in range(KEYS)])
            _round(sealed, 200)  # warm both paths (connections, caches) before anything counts
            _round(plain, 200)
            per: dict[str, list[float]] = {"sealed": [], "plain": []}
            lats: dict[str, list[np.ndarray]] = {"sealed": [], "plain": []}
            with Progress(disable=quiet, transient=True) as bar:
                task = bar.add_task("sealed vs plain calls", total=rounds * 2)
                for _ in range(rounds):
                    for path, client in (("sealed", sealed), ("plain", plain)):
                        rate, lat = _round(client, calls)
                        per[path].append(rate)
                        lats[path].append(lat)
                        bar.advance(task)
        finally:
            sealed.close()
            plain.close()
    every = {path: np.concatenate(lat) for path, lat in lats.items()}
    summary: dict[str, Any] = {}
    for path in ("sealed", "plain"):
        rate = spread(per[path])
        summary[path] = {"calls_per_s_median": rate["median"], "calls_per_s_min": rate["min"],
                         "calls_per_s_max": rate["max"], "calls_per_s": per[path],
                         **percentiles(every[path].tolist(), {"latency_us_p50": 50, "latency_us_p99": 99}, scale=1e6)}
    ratios = [s / p for s, p in zip(per["sealed"], per["plain"], strict=True)]
    doc = {"bench": "calls", "machine": machine_info(), "rounds": rounds, "calls_per_round": calls,
           "session_open_ms": open_ms, **summary,
           "sealed_over_plain_calls_per_s": {**spread(ratios), "per_round": ratios},
           "sealed_over_plain_p99": summary["sealed"]["latency_us_p99"] / summary["plain"]["latency_us_p99"]}
    (out / "calls.json").write_text(dumps(doc))
    from constmig.bench.plots import plot_calls

    plot_calls(every, out / "calls.png")
    return doc
