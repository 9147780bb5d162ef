"""Frees during pre-copy rounds: every byte a round leaves at the destination is current.

`Heap.free` zeroes an allocation's pages with MADV_DONTNEED. The enclave's own write tracker never sees
it (a madvise does not fault), and with either tracker a chunk wholly unallocated at a round's scan must
keep its dirty mark. An app that frees an array a round already sent and allocates it again (a fresh
allocation must read zeros) must not find the round's old bytes at the destination, whatever the
strategy (precopy, hybrid) and tracker (fault: the kernel's write tracking; access: the enclave's own).
The app is tests/e2e/recycle_app.py, the only one that frees (the shipped apps never do).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from constmig.client import EnclaveClient
from constmig.enclave.dirty import enclave_problem, kernel_problem
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import migrate
from constmig.kernel.uffd import preflight as uffd_problem

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]

APP = "recycle_app:Recycler"  # tests/e2e/recycle_app.py, on the agents' PYTHONPATH
MiB = 1 << 20
PACE = 16 * MiB  # rounds paced so a round of a few dozen 1 MiB chunks takes seconds: the frees land inside
WRITE_TRACKING = {"fault": "kernel", "access": "enclave"}  # one mechanism per post-copy tracker


def _problem(tracker: str) -> str | None:
    if tracker == "fault":
        return uffd_problem() or kernel_problem()
    return enclave_problem()


TRACKERS = [pytest.param(t, marks=pytest.mark.skipif(_problem(t) is not None, reason=str(_problem(t))))
            for t in ("fault", "access")]


@pytest.fixture
def recycler_cluster(monkeypatch: pytest.MonkeyPatch):
    """Two agents whose enclaves can import the test app (module:Class from this folder)."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    with LocalCluster(2) as c:
        yield c


def _call(addr: str, method: str, *args: Any) -> Any:
    c = EnclaveClient(addr, "rc", timeout=60)
    try:
        return c.call(method, *args)
    finally:
        c.close()


class Background:
    """One migration in a thread, its progress events kept, so the test acts while the rounds run."""

    def __init__(self, src: str, dst: str, strategy: str, tracker: str, **options: Any) -> None:
        # hybrid: the post-copy tracker and the write tracking that goes with it; precopy's destination
        # has no tracker, so the mechanism is named
        how = {"tracker": tracker} if strategy == "hybrid" else {"write_tracking": WRITE_TRACKING[tracker]}
        self.events: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.figures: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(src, dst, strategy, {**how, **options}), daemon=True)
        self.thread.start()

    def _run(self, src: str, dst: str, strategy: str, options: dict[str, Any]) -> None:
        try:
            self.figures = migrate("rc", src, dst, strategy, timeout=60, on_progress=self._progress,
                                   **{"max_bandwidth": PACE, "max_downtime": 0.005, **options})
        except BaseException as e:  # noqa: BLE001 (reported by result())
            self.error = e
        finally:
            with self.changed:
                self.changed.notify_all()

    def _progress(self, info: dict[str, Any]) -> None:
        with self.changed:
            self.events.append(info)
            self.changed.notify_all()

    def until(self, what: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any] | None:
        """The first event that satisfies `what`; None if the migration ended first."""
        with self.changed:
            assert self.changed.wait_for(lambda: any(map(what, self.events)) or not self.thread.is_alive(),
                                         timeout), f"no such progress within {timeout:g} s: {self.events[-3:]}"
            return next(filter(what, self.events), None)

    def last(self) -> dict[str, Any]:
        with self.changed:
            return self.events[-1]

    def result(self) -> dict[str, Any]:
        self.thread.join(120)
        assert not self.thread.is_alive() and self.error is None and self.figures is not None, self.error
        return self.figures


def _in_round(n: int, sent: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("phase") == "round" and e.get("round") == n and e.get("done", 0) >= sent


def _stale_check(b: str, want: str, figures: dict[str, Any], strategy: str, tracker: str) -> None:
    """At the destination: the re-allocated blob reads zeros, the rest as at the source."""
    assert figures["strategy"] == strategy and figures["write_tracking"] == WRITE_TRACKING[tracker], figures
    stale = _call(b, "nonzero", "blob")
    assert stale == 0, (f"{stale} bytes of the re-allocated blob read a round's old 0xab at the destination "
                        f"(the source reads zeros); figures: {figures}")
    assert _call(b, "checksum") == want


@pytest.mark.parametrize("strategy", ["precopy", "hybrid"])
@pytest.mark.parametrize("tracker", TRACKERS)
def test_freed_and_allocated_again_within_a_round(recycler_cluster, strategy, tracker) -> None:
    """Round 1 sends part of `blob` (0xab); the app frees it and allocates it again at once (same offset,
    nothing written): the round's scan finds it allocated, and the destination must read zeros there.
    Chunk 0 is shared with `keep` (allocated throughout): a chunk partly zeroed counts too."""
    a, b = recycler_cluster.addrs
    request(a, {"op": "run", "name": "rc", "app": APP, "heap": 64 * MiB, "chunk_size": MiB, "config": {}})
    assert _call(a, "make", "keep", 4096, 0x11) == 0
    offset = _call(a, "make", "blob", 48 * MiB, 0xAB)  # 49 chunks: round 1 takes ~3 s, 2.6 s of it after the six
    mig = Background(a, b, strategy, tracker)
    mig.until(_in_round(1, 6 * MiB))  # six chunks of 0xab are at the destination
    assert _call(a, "recycle", "blob") == offset  # the space is reused: same offset, fresh
    assert _call(a, "nonzero", "blob") == 0  # the source reads zeros
    want = _call(a, "checksum")
    last = mig.last()
    assert last.get("round") == 1 and last["done"] < last["total"], f"the free missed round 1 (timing): {last}"
    # while round 1 runs, the source agent's status says what is left of it (a frame reaches the agent first)
    now = request(a, {"op": "status"})["outgoing"]["rc"]
    assert (now["to"], now["strategy"], now["round"]) == (b, strategy, 1) and now["elapsed_s"] > 0, now
    assert 0 < now["left_bytes"] <= last["total"] - last["done"], (now, last)
    _stale_check(b, want, mig.result(), strategy, tracker)


@pytest.mark.parametrize("strategy", ["precopy", "hybrid"])
@pytest.mark.parametrize("tracker", TRACKERS)
def test_freed_at_the_scan_and_allocated_again_before_the_stop(recycler_cluster, strategy, tracker) -> None:
    """Round 1 sends part of `blob` (0xab); the app frees it and writes `hot`, so the scan that ends round 1
    finds the blob's chunks unallocated (their marks must not be dropped) and a round 2 follows; the app
    allocates the blob again (nothing written) before the stop. The destination must read zeros there."""
    a, b = recycler_cluster.addrs
    request(a, {"op": "run", "name": "rc", "app": APP, "heap": 64 * MiB, "chunk_size": MiB, "config": {}})
    _call(a, "make", "keep", 4096, 0x11)
    _call(a, "make", "bulk", 16 * MiB, 0x22)
    _call(a, "make", "hot", 4 * MiB, 0x33)
    offset = _call(a, "make", "blob", 24 * MiB, 0xAB)  # chunks 20..44, sent last in round 1
    mig = Background(a, b, strategy, tracker, max_rounds=4, max_bandwidth=PACE // 2)  # 2.4 s after the six
    mig.until(_in_round(1, offset + 6 * MiB))  # six chunks of the blob are at the destination
    _call(a, "free", "blob")
    _call(a, "paint", "hot", 0x44)  # written since sent: the rounds go on
    last = mig.last()
    assert last.get("round") == 1 and last["done"] < last["total"], f"the free missed round 1 (timing): {last}"
    # once round 2 runs (or, if the rounds ended at that scan, whenever: then it may land after the stop)
    mig.until(lambda e: e.get("phase") != "round" or e.get("round", 1) >= 2)
    assert _call(a, "alloc", "blob", 24 * MiB) == offset  # redirected to the destination if it moved already
    assert _call(a, "nonzero", "blob") == 0
    want = _call(a, "checksum")
    _stale_check(b, want, mig.result(), strategy, tracker)
