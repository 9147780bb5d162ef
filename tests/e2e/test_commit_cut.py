"""The link breaks with COMMIT in flight (issue 19, sequence 3).

The source records HANDED_OFF and then sends COMMIT; a proxy between the agents cuts the connection at
exactly that record. Before the fix the destination saw the end of the stream, aborted and wiped at
once, while the source was handed off and its reconnects were refused: no copy could run. Now the
destination keeps waiting, and:
- a reconnect from the source (keyed with the migration's resume secret, which only a handed-off source
  uses) stands for the lost COMMIT: the destination runs the enclave and the move completes;
- if no reconnect comes before the destination's commit deadline, it gives up, wipes, and answers the
  source's later reconnect with an authenticated ABORT: the source runs the enclave again.
Either way exactly one copy runs, with every acknowledged write.
"""

from __future__ import annotations

import threading
import time

import pytest
from mitm import MitmProxy, RecordTamper
from test_live_postcopy import VARIANTS

from conftest import checksum, launch
from constmig.client import EnclaveClient
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import migrate, resume
from constmig.wire.records import Kind

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]

COMMIT = 3  # the third CONTROL record from the source on the main channel: STATE, HEAP_END, COMMIT


class CommitCutter:
    """Cut the main data connection at the COMMIT record (once); while `blocked`, cut every data
    connection at its first record (the link stays down for reconnects)."""

    def __init__(self) -> None:
        self.controls = 0
        self.cut = False
        self.blocked = False
        self._lock = threading.Lock()

    def __call__(self, channel: str, n: int, header, record: bytes) -> list[bytes] | None:
        with self._lock:
            if self.blocked and self.cut:
                return None
            if channel == "main" and header.kind == Kind.CONTROL and not self.cut:
                self.controls += 1
                if self.controls == COMMIT:
                    self.cut = True
                    return None
        return [record]


def status(addr: str, name: str = "kv") -> dict:
    return request(addr, {"op": "status"})["enclaves"].get(name, {})


def written_keys(addr: str) -> dict[str, bytes]:
    c = EnclaveClient(addr, "kv")
    try:
        return {f"client-{i}": c.call("get", f"client-{i}") for i in range(32)}
    finally:
        c.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_lost_commit_is_stood_for_by_the_reconnect(cluster, variant) -> None:
    strategy, tracker = variant
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    keys = written_keys(a)
    cutter = CommitCutter()
    proxy = MitmProxy(b, RecordTamper(cutter))
    try:
        figures = migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=20, resume_deadline=20)
        assert cutter.cut, "the proxy never saw COMMIT"
        assert figures["resumes"] >= 1
        assert status(b).get("state") == "running" and "kv" not in request(a, {"op": "status"})["enclaves"]
        assert checksum(b) == before
        assert written_keys(b) == keys
    finally:
        proxy.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_destination_that_gave_up_gives_the_enclave_back(cluster, variant) -> None:
    strategy, tracker = variant
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    keys = written_keys(a)
    cutter = CommitCutter()
    cutter.blocked = True  # after the cut at COMMIT, nothing gets through
    proxy = MitmProxy(b, RecordTamper(cutter))
    try:
        with pytest.raises(AgentError, match="could not be resumed"):
            migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=4, resume_deadline=2)
        assert cutter.cut
        assert status(a).get("status") == "failed"  # handed off: it may not run, and keeps everything
        deadline = time.monotonic() + 30
        while status(b).get("status") != "aborted":  # B's wait for COMMIT ends: it wipes, keeps answering
            assert time.monotonic() < deadline, status(b)
            time.sleep(0.1)
        assert status(b).get("state") is None  # not running
        cutter.blocked = False
        with pytest.raises(AgentError, match="gave the migration up before resuming"):
            resume("kv", a, timeout=10, resume_deadline=10)
        assert status(a).get("status") == "running" and status(a).get("state") == "running"
        assert checksum(a) == before
        assert written_keys(a) == keys
        assert status(b).get("status") == "aborted"
        request(b, {"op": "stop", "name": "kv"})
        assert "kv" not in request(b, {"op": "status"})["enclaves"]
    finally:
        proxy.close()
