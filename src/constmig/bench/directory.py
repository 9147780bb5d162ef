"""What the fleet directory asks of etcd, measured: the latency of each request agents and clients make
(a client's lookup, a migration's move, an agent's lease refresh and registration) and how many moves a
second one store takes from many writers at once. docs/fleet.md scales these figures to a large fleet.

Everything runs under a private key prefix, removed at the end, so a live fleet's store can be measured
too; without --etcd a fresh single-member etcd on loopback is started (and stopped) for the run.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from constmig.bench.results import machine_info
from constmig.bench.stats import percentiles, spread
from constmig.host.directory import Directory


async def _timed(n: int, one: Any) -> dict[str, Any]:
    """`n` requests one after another: their latency's p50 and p99 in ms."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await one(i)
        out.append(time.perf_counter() - t0)
    return percentiles(out, {"p50_ms": 50, "p99_ms": 99}, scale=1e3, digits=4, n=True)


async def _one_round(url: str, ops: int, concurrency: int) -> dict[str, Any]:
    prefix = f"/constmig-bench-{os.getpid()}-{time.monotonic_ns()}/"
    dirs = [Directory(url, prefix=prefix) for _ in range(max(1, min(concurrency, 8)))]
    d = dirs[0]
    try:
        hosts = [f"10.255.{i // 250}.{i % 250 + 1}:7001" for i in range(2)]
        leases = [await d.register(h, {"host_id": f"h{i}"}, ttl=30) for i, h in enumerate(hosts)]
        names = [f"e{i}" for i in range(max(concurrency, 1))]
        for n in names:
            await d.claim(n, hosts[0])
        out: dict[str, Any] = {}
        out["register"] = await _timed(max(ops // 10, 10), lambda i: d.register(
            f"10.254.{i // 250}.{i % 250 + 1}:7001", {"host_id": "x"}, ttl=30))
        out["refresh"] = await _timed(ops, lambda i: d.refresh(leases[0]))
        out["lookup"] = await _timed(ops, lambda i: d.locate(names[0]))

        async def move(i: int, name: str = names[0]) -> None:
            assert await d.move(name, hosts[i % 2], hosts[(i + 1) % 2])

        out["move"] = await _timed(ops, move)
        # Many writers at once, each moving its own enclave back and forth: the store's move rate.
        for n in names:
            at = await d.where(n)
            if at != hosts[0]:
                await d.move(n, str(at), hosts[0])

        async def writer(k: int) -> None:
            dd = dirs[k % len(dirs)]
            for i in range(ops // concurrency or 1):
                assert await dd.move(names[k], hosts[i % 2], hosts[(i + 1) % 2])

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
        out["moves_per_s"] = round(concurrency * (ops // concurrency or 1) / wall, 1)
        out["concurrency"] = concurrency
        for lease in leases:
            await d.deregister(lease)
        await d.clear()
        return out
    finally:
        for x in dirs:
            await x.close()


def run_directory_bench(url: str | None, ops: int, concurrency: int, repeat: int) -> dict[str, Any]:
    """Rounds of every measurement; each figure is the median over rounds with its spread."""
    from contextlib import nullcontext

    from constmig.host.etcd_server import LocalEtcd

    server = LocalEtcd() if url is None else nullcontext()
    with server as s:
        target = s.url if url is None else url
        rounds = [asyncio.run(_one_round(target, ops, concurrency)) for _ in range(repeat)]
    doc: dict[str, Any] = {"bench": "directory", "etcd": "local (started for this run)" if url is None else url,
                           "ops": ops, "repeat": repeat, "machine": machine_info()}
    for key in ("register", "refresh", "lookup", "move"):
        doc[key] = {stat: spread(r[key][stat] for r in rounds) for stat in ("p50_ms", "p99_ms")}
    doc["moves_per_s"] = {**spread(r["moves_per_s"] for r in rounds), "concurrency": concurrency}
    return doc
