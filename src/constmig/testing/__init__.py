"""For app authors' own tests: migrate an app back and forth under a client and check nothing changed.

    from constmig.testing import check_migrates

    def test_my_app_migrates():
        report = check_migrates("myapp", heap="64M", call=("balance", ["alice"]))
        assert report.ok, report.problems

Two agents on this machine (real processes), the app launched on the first and filled (its `fill`
ECALL), then, for each strategy, a migration to the other agent and back while a client keeps calling
one ECALL over an attested session; the app's checksum must be the same after every move and every
call must be answered.

The post-copy variants (constmig, hybrid, auto) stream the heap slowly by default (`max_bandwidth`,
the whole heap in about SLOW_STREAM_S seconds), so chunks are still missing while the client calls:
an app whose calls read the heap by a path the Access Tracker does not check are then exercised where
they would fail, and the report counts those reads (`untracked_accesses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from constmig.bench.harness import Move, calling, move
from constmig.bench.loadgen import Caller
from constmig.bench.results import split_variant
from constmig.client import EnclaveClient, Trust, pin_now
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.migration.strategies import get as get_strategy
from constmig.migration.strategies import variants
from constmig.units import parse_size
from constmig.wire import control

NAME = "under-test"
SLOW_STREAM_S = 2.0  # the default cap streams the whole heap in about this long: chunks stay missing


@dataclass
class MigrationReport:
    app: str
    migrations: list[dict[str, Any]] = field(default_factory=list)  # each migration's figures
    calls: int = 0  # client calls answered during the migrations
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.migrations)

    @property
    def untracked_accesses(self) -> int:
        """Heap reads the Access Tracker's checks missed, served by the enclave's fault handler (all moves)."""
        return sum(int(m.get("untracked_accesses") or 0) for m in self.migrations)


def check_migrates(app: str, *, heap: int | str = "64M", fill: float = 0.5, seed: int = 1,
                   strategies: list[str] | None = None, config: dict[str, Any] | None = None,
                   call: tuple[str, list[Any]] = ("stats", []),
                   timeout: float = control.DEFAULT_TIMEOUT_S,
                   max_bandwidth: int | str | None = "slow") -> MigrationReport:
    """Migrate `app` there and back with each strategy (default: every variant the registry names,
    `strategies.variants(auto=False)`: each strategy, with each tracker where it takes one) and report
    what differed. `max_bandwidth` caps the post-copy variants' stream (bytes/s, or "64M"): "slow" (the
    default) streams the whole heap in about SLOW_STREAM_S seconds, None leaves it uncapped."""
    heap = parse_size(heap) if isinstance(heap, str) else heap
    if max_bandwidth == "slow":
        max_bandwidth = max(1, int(heap / SLOW_STREAM_S))
    elif isinstance(max_bandwidth, str):
        max_bandwidth = parse_size(max_bandwidth)
    report = MigrationReport(app)
    with LocalCluster(2) as cluster:
        a, b = cluster.addrs
        request(a, control.Run(name=NAME, app=app, heap=heap, config=config or {}))
        trust = Trust.in_memory()  # pinned at launch: every later client must meet this very instance
        pin_now(a, NAME, trust)
        with EnclaveClient(a, NAME, timeout=timeout, trust=trust) as c:
            c.call("fill", fill, seed)
            expected = c.call("checksum")
        with Caller(a, NAME, call[0], call[1], trust, timeout) as caller:
            with calling(caller):
                _there_and_back(report, strategies or variants(auto=False), (a, b), expected, trust, timeout,
                                max_bandwidth or 0)
            report.calls = caller.report.calls
            report.problems += [f"{call[0]}: {e}" for e in caller.report.errors]
    return report


def _there_and_back(report: MigrationReport, chosen: list[str], hosts: tuple[str, str], expected: str,
                    trust: Trust, timeout: float, max_bandwidth: int) -> None:
    """Each variant to the other agent and back, the checksum read after every move; stops at a failure."""
    here, there = hosts
    for variant in chosen:
        post_copy = get_strategy(split_variant(variant)[0]).needs_tracker  # the heap arrives behind the app
        options = {"max_bandwidth": max_bandwidth} if post_copy and max_bandwidth else {}
        for _ in range(2):
            moved = move(Move.of(variant, NAME, here, there, timeout=timeout, options=options))
            if moved.error is not None:
                report.problems.append(f"{variant} {here} -> {there}: {moved.error}")
                return
            report.migrations.append({"variant": variant, **moved.figures})
            here, there = there, here
            with EnclaveClient(here, NAME, timeout=timeout, trust=trust) as c:
                got = c.call("checksum")
            if got != expected:
                report.problems.append(f"{variant}: checksum {got} after the move, {expected} before")
