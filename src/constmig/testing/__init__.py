"""For app authors' own tests: migrate an app back and forth under a client and check nothing changed.

    from constmig.testing import check_migrates

    def test_my_app_migrates():
        report = check_migrates("myapp", heap="64M", call=("balance", ["alice"]))
        assert report.ok, report.problems

Two agents on this machine (real processes), the app launched on the first and filled (its `fill`
ECALL), then, for each strategy, a migration to the other agent and back while a client keeps calling
one ECALL over an attested session; the app's checksum must be the same after every move and every
call must be answered.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from constmig.client import EnclaveClient, Trust, pin_now
from constmig.errors import ConstmigError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import migrate
from constmig.migration.strategies import variants
from constmig.units import parse_size
from constmig.wire import control


@dataclass
class MigrationReport:
    app: str
    migrations: list[dict[str, Any]] = field(default_factory=list)  # each migration's figures
    calls: int = 0  # client calls answered during the migrations
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.migrations)


def check_migrates(app: str, *, heap: int | str = "64M", fill: float = 0.5, seed: int = 1,
                   strategies: list[str] | None = None, config: dict[str, Any] | None = None,
                   call: tuple[str, list[Any]] = ("stats", []),
                   timeout: float = control.DEFAULT_TIMEOUT_S) -> MigrationReport:
    """Migrate `app` there and back with each strategy (default: every variant: stopcopy, constmig,
    precopy and hybrid with each tracker) and report what differed."""
    heap = parse_size(heap) if isinstance(heap, str) else heap
    report = MigrationReport(app)
    with LocalCluster(2) as cluster:
        a, b = cluster.addrs
        request(a, control.Run(name="under-test", app=app, heap=heap, config=config or {}))
        trust = Trust.in_memory()  # pinned at launch: every later client must meet this very instance
        pin_now(a, "under-test", trust)
        with EnclaveClient(a, "under-test", timeout=timeout, trust=trust) as c:
            c.call("fill", fill, seed)
            expected = c.call("checksum")
        stop, errors = threading.Event(), []

        def client() -> None:
            with EnclaveClient(a, "under-test", timeout=timeout, trust=trust) as c:
                while not stop.is_set():
                    try:
                        c.call(call[0], *call[1])
                        report.calls += 1
                    except ConstmigError as e:
                        errors.append(f"{call[0]}: {e}")
                        return

        t = threading.Thread(target=client, daemon=True)
        t.start()
        here, there = a, b
        try:
            for variant in strategies or variants(auto=False):
                strategy, _, tracker = variant.partition("-")
                for _ in range(2):  # there and back
                    try:
                        figures = migrate("under-test", here, there, strategy, timeout=timeout,
                                          tracker=tracker or "auto")
                    except ConstmigError as e:
                        report.problems.append(f"{variant} {here} -> {there}: {e}")
                        return report
                    report.migrations.append({"variant": variant, **figures})
                    here, there = there, here
                    with EnclaveClient(here, "under-test", timeout=timeout, trust=trust) as c:
                        got = c.call("checksum")
                    if got != expected:
                        report.problems.append(f"{variant}: checksum {got} after the move, {expected} before")
        finally:
            stop.set()
            t.join(timeout)
        report.problems += errors
    return report
