"""Migrations under a client: the one way every bench and `constmig.testing` moves an enclave while
something keeps calling it.

Why one: what a migration is judged by (the client's longest gap, its calls per second while the
enclave moved, when the stop and the resume fell) depends on when the client starts, how long it runs
before and after the migrate request, and on which clock each is read. Every bench does that the same
way here: `run_migration` starts the client, lets it call, migrates (`move`), lets it call again and
stops it; `move` alone serves a client that runs through many migrations (the soak, check_migrates).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from constmig.bench.loadgen import KVHammer
from constmig.bench.results import split_variant, variant_options
from constmig.client import Trust
from constmig.errors import ConfigError, ConstmigError
from constmig.host.client import request
from constmig.host.orchestrate import app_checksum, launch_filled, migrate
from constmig.progress import MigrationProgress
from constmig.wire import control

DEFAULT_VARIANTS = ("stopcopy", "constmig-fault", "constmig-access")  # bench load's and bench soak's


class Client(Protocol):
    """What calls the enclave meanwhile (loadgen's drivers, the Fleet): `now()` is the clock its records use,
    `started` that clock's reading when it started."""

    started: float

    def start(self) -> Any: ...

    def stop(self) -> Any: ...

    def now(self) -> float: ...


@dataclass
class Move:
    """One migration to request: `options` are the request's others (max_bandwidth, max_downtime...)."""

    name: str
    src: str
    dst: str
    strategy: str
    tracker: str = control.DEFAULT_TRACKER
    timeout: float = control.DEFAULT_TIMEOUT_S
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, variant: str, name: str, src: str, dst: str, **kw: Any) -> Move:
        """A bench variant ("constmig-fault", "stopcopy", "precopy+throttle") as a strategy, a tracker and
        the options its suffixes name (results.VARIANT_OPTIONS; `options` given here win)."""
        strategy, tracker = split_variant(variant)
        kw["options"] = {**variant_options(variant), **kw.get("options", {})}
        return cls(name, src, dst, strategy, tracker, **kw)


@dataclass
class Moved:
    """A migration as the client saw it: times are on the client's clock (time.time() without one)."""

    figures: dict[str, Any]  # the source's figures; empty if it failed
    error: ConstmigError | None
    requested: float  # when the migrate request went out
    returned: float  # when its answer came back
    events: list[list[Any]]  # a progress frame each: [seconds since the request, phase, done]
    report: Any = None  # what the client's stop() returned (run_migration)

    @property
    def took(self) -> float:
        return self.returned - self.requested

    def raise_error(self) -> Moved:
        if self.error is not None:
            raise self.error
        return self


def move(m: Move, clock: Callable[[], float] = time.time, quiet: bool = True,
         on_progress: Callable[[dict[str, Any]], None] | None = None) -> Moved:
    """One migration, timed on `clock`; a failure comes back in `error` rather than raised."""
    events: list[list[Any]] = []
    t0 = clock()

    def progress(info: dict[str, Any]) -> None:
        events.append([round(clock() - t0, 4), info.get("phase", ""), info.get("done")])
        bar.update(info)
        if on_progress is not None:
            on_progress(info)

    figures: dict[str, Any] = {}
    error: ConstmigError | None = None
    with MigrationProgress(f"migrating {m.name} ({m.strategy})", quiet=quiet) as bar:
        try:
            figures = migrate(m.name, m.src, m.dst, m.strategy, m.timeout, on_progress=progress, tracker=m.tracker,
                              **m.options)
        except ConstmigError as e:
            error = e
    return Moved(figures, error, t0, clock(), events)


def run_migration(m: Move, client: Client | None = None, *, before_s: float = 0.3, after_s: float = 0.3,
                  quiet: bool = True, on_progress: Callable[[dict[str, Any]], None] | None = None) -> Moved:
    """Start `client`, let it call for `before_s` (its own clock, from its start), migrate, let it call
    `after_s` more (after a migration that did not fail), stop it. Without a client: just the migration."""
    if client is None:
        return move(m, quiet=quiet, on_progress=on_progress)
    client.start()
    try:
        time.sleep(max(0.0, client.started + before_s - client.now()))
        moved = move(m, client.now, quiet, on_progress)
        if moved.error is None:
            time.sleep(after_s)
    finally:
        report = client.stop()
    moved.report = report
    return moved


def migrate_under_load(name: str, src: str, dst: str, strategy: str, tracker: str = "auto", *, app: str,
                       seed: int = 0, quiet: bool = True, trust: Trust | None = None) -> dict[str, Any]:
    """One migration with a client calling throughout (kvstore), checked end to end.

    The client reads keys it wrote before, so the state checksum must come out equal and every answer
    must be the value written: `verified` covers both. Adds the client's figures (`client_gap_ms`...).
    """
    with contextlib.ExitStack() as stack:
        hammer = None
        if app == "kvstore":
            hammer = stack.enter_context(KVHammer(src, name, keys=2000, write_ratio=0.0, seed=seed, trust=trust))
            hammer.preload()
        before = app_checksum(src, name, trust)
        moved = run_migration(Move(name, src, dst, strategy, tracker), hammer, quiet=quiet).raise_error()
        figures, ok = moved.figures, True
        if hammer is not None:
            figures.update(moved.report.figures())
            ok = moved.report.clean
        figures["verified"] = ok and app_checksum(dst, name, trust) == before
    return figures


@contextlib.contextmanager
def calling(client: Client) -> Iterator[Client]:
    """A client that calls throughout the block (and several migrations in it), stopped after."""
    client.start()
    try:
        yield client
    finally:
        client.stop()


def stop_anywhere(addrs: list[str], name: str) -> None:
    """Stop the enclave wherever it is (after a failed migration it may still be at the source)."""
    for addr in addrs:
        with contextlib.suppress(ConstmigError):
            request(addr, control.Stop(name=name), timeout=30)


@contextlib.contextmanager
def launched(addrs: list[str], name: str, app: str, heap: int, fill: float, seed: int,
             **kw: Any) -> Iterator[Trust]:
    """The app filled on addrs[0] and pinned in a trust of its own (never the user's file), stopped
    wherever it ends up; a leftover of that name (an interrupted run on a long-lived testbed) goes first."""
    stop_anywhere(addrs, name)
    try:
        trust = Trust.in_memory()
        launch_filled(addrs[0], name, app, heap, fill, seed, trust=trust, **kw)
        yield trust
    finally:
        stop_anywhere(addrs[::-1], name)


@contextlib.contextmanager
def two_agents(testbed: str | None = None) -> Iterator[list[str]]:
    """Two agents' addresses: a LocalCluster started for the block, or a running testbed's first two hosts."""
    if testbed is None:
        from constmig.host.cluster import LocalCluster

        with LocalCluster(2) as cluster:
            yield cluster.addrs
        return
    from constmig.testbed import Testbed

    bed = Testbed.attach(testbed)
    if len(bed.addrs) < 2:
        raise ConfigError(f"testbed {testbed!r} has {len(bed.addrs)} host(s); a migration needs two")
    yield bed.addrs[:2]


def usable_variants(wanted: list[str] | None, what: str = "run") -> tuple[list[str], list[dict[str, str]]]:
    """The variants to run (default: DEFAULT_VARIANTS) and the ones left out, with why: the Fault Tracker
    needs userfaultfd. A default list quietly drops constmig-fault where it does not work; so does a
    soak's list (what="soak") while another variant is left; bench load refuses it outright."""
    from constmig.kernel.uffd import preflight

    chosen = list(dict.fromkeys(wanted or DEFAULT_VARIANTS))
    problem = preflight()
    if not problem:
        return chosen, []
    faulty = [v for v in chosen if split_variant(v)[1] == "fault"]
    if wanted and faulty and what != "soak":
        raise ConfigError(f"constmig-fault needs userfaultfd, which does not work here: {problem}")
    kept = [v for v in chosen if v not in faulty]
    if not kept:
        raise ConfigError(f"no variant left to {what}: userfaultfd does not work here ({problem})")
    return kept, [{"variant": v, "reason": f"userfaultfd not usable: {problem}"} for v in faulty]
