"""bench/harness.py without agents: the order a client and a migration run in, what a failure leaves,
and which variants run where userfaultfd does not work (migrate and preflight replaced by fakes)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from constmig.bench import harness
from constmig.bench.harness import Move, calling, run_migration, usable_variants
from constmig.errors import AgentError, ConfigError


class FakeClient:
    """A client that logs when it starts and stops, on a clock of its own."""

    def __init__(self, log: list[str], offset: float = 0.0) -> None:
        self.log, self.offset = log, offset
        self.started = 0.0

    def now(self) -> float:
        return time.monotonic() - self.offset

    def start(self) -> None:
        self.started = self.now()
        self.log.append("start")

    def stop(self) -> str:
        self.log.append("stop")
        return "its report"


@pytest.fixture
def migrations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the fake migrate was asked; it fails for an enclave named "broken"."""
    asked: list[dict[str, Any]] = []

    def fake(name: str, src: str, dst: str, strategy: str, timeout: float, on_progress: Any = None,
             tracker: str = "auto", **options: Any) -> dict[str, Any]:
        asked.append({"name": name, "src": src, "dst": dst, "strategy": strategy, "tracker": tracker, **options})
        on_progress({"phase": "copy", "done": 3})
        on_progress({"phase": "handed_off"})
        if name == "broken":
            raise AgentError("the source went away")
        return {"downtime_ms": 1.5}

    monkeypatch.setattr(harness, "migrate", fake)
    return asked


def test_the_client_calls_before_and_after_the_migration(migrations):
    log: list[str] = []
    client = FakeClient(log, offset=100.0)
    t0 = time.monotonic()
    moved = run_migration(Move.of("constmig-fault", "kv", "a:1", "b:2", options={"max_bandwidth": 1e6}), client,
                          before_s=0.05, after_s=0.05)
    assert log == ["start", "stop"] and moved.report == "its report"
    assert time.monotonic() - t0 >= 0.1  # it called for before_s, then after_s
    assert migrations == [{"name": "kv", "src": "a:1", "dst": "b:2", "strategy": "constmig", "tracker": "fault",
                           "max_bandwidth": 1e6}]
    assert moved.figures == {"downtime_ms": 1.5} and moved.error is None
    assert moved.requested - client.started >= 0.05  # on the client's own clock
    assert [e[1:] for e in moved.events] == [["copy", 3], ["handed_off", None]]
    assert all(0 <= e[0] <= moved.took + 1e-4 for e in moved.events)  # times kept to 0.1 ms


def test_a_failed_migration_is_returned_and_the_client_still_stops(migrations):
    log: list[str] = []
    moved = run_migration(Move("broken", "a:1", "b:2", "stopcopy"), FakeClient(log), before_s=0.0, after_s=5.0)
    assert log == ["start", "stop"] and moved.took < 5.0  # no wait after a failure
    assert isinstance(moved.error, AgentError) and moved.figures == {}
    with pytest.raises(AgentError, match="went away"):
        moved.raise_error()


def test_without_a_client_it_is_one_migration(migrations):
    t0 = time.monotonic()
    moved = run_migration(Move("kv", "a:1", "b:2", "hybrid", "access"), before_s=5.0, after_s=5.0).raise_error()
    assert time.monotonic() - t0 < 5.0 and moved.report is None and moved.figures["downtime_ms"] == 1.5


def test_calling_stops_the_client_when_the_block_fails():
    log: list[str] = []
    with pytest.raises(RuntimeError), calling(FakeClient(log)):
        raise RuntimeError("boom")
    assert log == ["start", "stop"]


def test_move_of_a_variant():
    assert (Move.of("stopcopy", "n", "a", "b").strategy, Move.of("stopcopy", "n", "a", "b").tracker) == \
        ("stopcopy", "auto")
    assert Move.of("hybrid-access", "n", "a", "b", timeout=5.0).timeout == 5.0


def test_a_variant_suffix_carries_its_request_options(migrations):
    run_migration(Move.of("precopy+throttle", "kv", "a:1", "b:2", options={"max_downtime": 0.05})).raise_error()
    assert migrations == [{"name": "kv", "src": "a:1", "dst": "b:2", "strategy": "precopy", "tracker": "auto",
                           "max_throttle": 0.9, "max_downtime": 0.05}]
    assert Move.of("hybrid-fault+throttle", "n", "a", "b", options={"max_throttle": 0.5}).options == \
        {"max_throttle": 0.5}  # options given to the move win over the suffix's
    assert Move.of("hybrid-fault", "n", "a", "b").options == {}
    with pytest.raises(ConfigError, match=r"unknown variant option '\+fast' in 'precopy\+fast'; known: \+throttle"):
        Move.of("precopy+fast", "n", "a", "b")


@pytest.fixture
def no_uffd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("constmig.kernel.uffd.preflight", lambda: "no userfaultfd here")


def test_every_default_variant_runs_where_userfaultfd_works(monkeypatch):
    monkeypatch.setattr("constmig.kernel.uffd.preflight", lambda: None)
    assert usable_variants(None) == (["stopcopy", "constmig-fault", "constmig-access"], [])
    assert usable_variants(["precopy", "precopy", "stopcopy"]) == (["precopy", "stopcopy"], [])


def test_without_userfaultfd_the_default_drops_the_fault_tracker_and_says_why(no_uffd):
    chosen, skipped = usable_variants(None)
    assert chosen == ["stopcopy", "constmig-access"]
    assert skipped == [{"variant": "constmig-fault", "reason": "userfaultfd not usable: no userfaultfd here"}]


def test_without_userfaultfd_asking_for_the_fault_tracker(no_uffd):
    with pytest.raises(ConfigError, match="constmig-fault needs userfaultfd"):
        usable_variants(["stopcopy", "constmig-fault"])  # bench load: refused
    assert usable_variants(["stopcopy", "constmig-fault"], what="soak")[0] == ["stopcopy"]  # a soak goes on
    with pytest.raises(ConfigError, match="no variant left to soak"):
        usable_variants(["constmig-fault"], what="soak")
