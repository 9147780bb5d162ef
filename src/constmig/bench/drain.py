"""A maintenance drain, measured: host a of a three-host netns testbed (shaped links, etcd as the fleet
directory) holds N filled enclaves, some under a client that reads and writes throughout, and is emptied
onto b and c the way `constmig drain a --etcd ...` does it. Per repeat: wall time, bytes moved, each
enclave's downtime, the worst client gap, and whether any acknowledged write was lost or any answer
wrong. Needs root (namespaces) and the etcd-server package.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

from constmig.bench.results import machine_info
from constmig.bench.stats import spread
from constmig.errors import ConstmigError
from constmig.units import format_size


def _one(enclaves: int, heap: int, loaded: int, link: str, parallel: int, max_bandwidth: float, strategy: str,
         seed: int) -> dict[str, Any]:
    import time

    from constmig.bench.loadgen import KVHammer
    from constmig.client import Trust
    from constmig.host.directory import blocking
    from constmig.host.fleet import look_and_plan_drain, run_moves
    from constmig.host.orchestrate import launch_filled
    from constmig.testbed import LinkSpec, Testbed

    with tempfile.TemporaryDirectory(prefix="constmig-drain-") as tmp, \
            Testbed(f"dr{os.getpid() % 100000:05d}"[:8], 3, LinkSpec.parse(link), state_dir=tmp, etcd=True) as tb:
        url = tb.etcd_url
        assert url is not None
        a = tb.addrs[0]
        names = [f"kv{i}" for i in range(enclaves)]
        trust = Trust.in_memory()  # this run's own enclaves: pinned at launch, never in the user's file
        for i, n in enumerate(names):
            launch_filled(a, n, "kvstore", heap, 0.9, seed=seed + i, trust=trust)
        with contextlib.ExitStack() as stack:
            hammers = [stack.enter_context(KVHammer(a, n, keys=300, write_ratio=0.3, seed=seed + 100 + i,
                                                    trust=trust)) for i, n in enumerate(names[:loaded])]
            for h in hammers:
                h.preload()
                h.start()
            t0 = time.time()
            try:
                _, moves, _ = look_and_plan_drain("a", None, url)
                outcomes = run_moves(moves, parallel=parallel, max_bandwidth=max_bandwidth, strategy=strategy,
                                     tracker="auto", timeout=300.0)
            finally:
                reports = [h.stop() for h in hammers]
            wall = time.time() - t0
            lost = sum(h.verify() for h in hammers)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise ConstmigError(f"the drain left {len(failed)} enclaves behind: {failed[0].error}")
        listed = blocking(url, lambda d: d.enclaves())
        downs = spread((float(o.figures.get("downtime_ms") or 0.0) for o in outcomes), digits=2)
        return {"wall_s": round(wall, 3), "bytes": sum(int(o.figures.get("state_bytes") or 0) for o in outcomes),
                "downtime_ms_median": downs["median"], "downtime_ms_max": downs["max"],
                "client_gap_ms_max": round(max((r.max_gap_ms for r in reports), default=0.0), 2),
                "client_calls": sum(r.calls for r in reports), "client_errors": sum(len(r.errors) for r in reports),
                "client_wrong": sum(r.wrong for r in reports), "lost_writes": lost,
                "directory_ok": listed == {o.name: o.to for o in outcomes},
                "to": {o.name: o.to for o in outcomes}}


def run_drain_bench(enclaves: int, heap: int, loaded: int, link: str, parallel: int, max_bandwidth: float,
                    strategy: str, repeat: int, quiet: bool = False) -> dict[str, Any]:
    runs = []
    for r in range(repeat):
        one = _one(enclaves, heap, loaded, link, parallel, max_bandwidth, strategy, seed=r * 1000)
        runs.append(one)
        if not quiet:
            print(f"drain {r + 1}/{repeat}: {enclaves} enclaves, {format_size(one['bytes'])} in {one['wall_s']:.2f} s, "
                  f"downtime max {one['downtime_ms_max']:.1f} ms, worst client gap {one['client_gap_ms_max']:.1f} ms, "
                  f"lost {one['lost_writes']}, wrong {one['client_wrong']}")
    doc: dict[str, Any] = {"bench": "drain", "enclaves": enclaves, "heap_bytes": heap, "loaded": loaded,
                           "link": link, "parallel": parallel, "max_bandwidth": max_bandwidth, "strategy": strategy,
                           "repeat": repeat, "machine": machine_info(), "runs": runs}
    for key in ("wall_s", "bytes", "downtime_ms_max", "client_gap_ms_max"):
        doc[key] = spread(run[key] for run in runs)
    doc["gbps"] = round(doc["bytes"]["median"] / doc["wall_s"]["median"] / 1e9, 3)
    doc["all_ok"] = all(run["lost_writes"] == 0 and run["client_wrong"] == 0 and run["client_errors"] == 0
                        and run["directory_ok"] for run in runs)
    return doc
