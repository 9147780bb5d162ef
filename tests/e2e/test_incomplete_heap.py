"""An enclave whose heap is still arriving exports nothing whole (docs/reliability.md, hostile-host
sequences 1 and 2).

Three real agents. A post-copy migration A->B is throttled so B runs while most of its heap is still at
A; then B is asked to migrate on to C, and to checkpoint. Both are refused with one clear line, nothing
changes, and once the heap is complete both work and every write reads back. Carrying the missing chunks
as zeros instead (C running on a zero heap, the checkpoint sealing zeros and burning the counter) would
read an acknowledged write back as None.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from constmig.client import EnclaveClient
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import app_checksum, launch_filled, migrate
from constmig.kernel.uffd import preflight

pytestmark = [pytest.mark.e2e]

HEAP = 16 << 20
SLOW = 2 << 20  # background stream cap, bytes/s: the heap takes ~8 s to arrive, the checks below ~1-2 s
TRACKERS = [pytest.param("fault", marks=[pytest.mark.root, pytest.mark.skipif(
    preflight() is not None, reason=f"Fault Tracker unavailable: {preflight()}")]), "access"]


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3) as c:
        yield c


def status(addr: str, name: str) -> dict[str, Any]:
    return request(addr, {"op": "status"})["enclaves"].get(name, {})


class Background:
    """A migration running in a thread (the next step of the test runs while it streams)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.result: dict[str, Any] | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.result = migrate(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported by join()
            self.error = e

    def join(self, timeout: float = 120.0) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the migration did not finish"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


def wait_running(addr: str, name: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until `name` runs at `addr` (with post-copy: as soon as it resumed); return its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(addr, name)
        if st.get("state") == "running":
            return st
        time.sleep(0.05)
    raise AssertionError(f"{name} never ran at {addr}: {status(addr, name)}")


def read_back(addr: str, name: str, written: dict[str, bytes]) -> None:
    c = EnclaveClient(addr, name)
    try:
        for key, value in written.items():
            assert c.call("get", key) == value, f"acknowledged write {key} lost"
    finally:
        c.close()


@pytest.mark.parametrize("tracker", TRACKERS)
def test_migrate_on_and_checkpoint_wait_for_the_heap(cluster: LocalCluster, tracker: str) -> None:
    a, b, c = cluster.addrs
    name = f"kv-{tracker}"
    written = launch_filled(a, name, "kvstore", HEAP, 0.9, seed=5, client_keys=8)
    before = app_checksum(a, name)
    first = Background(name, a, b, "constmig", tracker=tracker, max_bandwidth=SLOW, timeout=60)
    st = wait_running(b, name)

    # Sequence 1: migrate on while the heap arrives (stop-and-copy and post-copy): refused, nothing moves.
    for strategy in ("stopcopy", "constmig"):
        with pytest.raises(AgentError, match=r"cannot migrate: heap still arriving: \d+ of \d+ chunks; retry "
                                             r"after DONE"):
            migrate(name, b, c, strategy, timeout=30)
        assert name not in request(c, {"op": "status"})["enclaves"], "a destination was prepared anyway"
        assert status(b, name).get("state") == "running"
    # Sequence 2: checkpoint while the heap arrives: refused, and the counter is not burnt.
    with pytest.raises(AgentError, match=r"cannot checkpoint: heap still arriving: \d+ of \d+ chunks"):
        request(b, {"op": "checkpoint", "name": name})
    got, expected = st["heap_arriving"]  # the status says how much is in, from the migration's ledger
    assert 0 <= got < expected
    read_back(b, name, written)  # a call that needs missing chunks waits for them, then answers right

    figures = first.join()
    assert figures["chunks"] == expected
    assert "heap_arriving" not in status(b, name)
    ckpt = request(b, {"op": "checkpoint", "name": name})
    assert ckpt["version"] == 1 and ckpt["chunks"] > 0  # the first checkpoint: nothing burnt the counter
    migrate(name, b, c, "stopcopy", timeout=60)
    assert app_checksum(c, name) == before
    read_back(c, name, written)
    request(c, {"op": "stop", "name": name})
