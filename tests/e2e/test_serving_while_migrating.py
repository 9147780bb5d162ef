"""The enclave keeps answering while it migrates, until it stops.

A proxy holds the source's first handshake record for HOLD seconds, so the migration sits in its
attestation that long. Before, the enclave runtime served one request at a time and the agent stopped
admitting calls once it asked for the migration: every call, and even a status request, waited out the
whole handshake. Now calls and status requests are answered throughout, and a call that arrives after
the stop waits for the outcome and goes where the enclave runs (here, a redirect to the destination).
"""

from __future__ import annotations

import threading
import time

import pytest
from mitm import MitmProxy, RecordTamper
from test_live_postcopy import VARIANTS

from conftest import checksum, launch
from constmig.client import EnclaveClient
from constmig.host.client import request
from constmig.host.orchestrate import migrate
from constmig.wire.records import Kind

pytestmark = [pytest.mark.e2e]

HOLD = 1.5  # seconds the first handshake record is held


class HoldFirstHandshake:
    def __init__(self) -> None:
        self.held_at: float | None = None
        self.released_at: float | None = None

    def __call__(self, channel: str, n: int, header, record: bytes) -> list[bytes]:
        if channel == "main" and header.kind == Kind.HANDSHAKE and self.held_at is None:
            self.held_at = time.monotonic()
            time.sleep(HOLD)
            self.released_at = time.monotonic()
        return [record]


@pytest.mark.parametrize("variant", VARIANTS)
def test_calls_and_status_are_answered_during_the_handshake(cluster, variant) -> None:
    strategy, tracker = variant
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    hold = HoldFirstHandshake()
    proxy = MitmProxy(b, RecordTamper(hold))
    answered: list[float] = []
    status_s: list[float] = []
    stop = threading.Event()

    def client() -> None:
        c = EnclaveClient(a, "kv")
        try:
            while not stop.is_set():
                assert c.call("get", "client-1") is not None
                answered.append(time.monotonic())
        finally:
            c.close()

    def status() -> None:
        while hold.held_at is None and not stop.is_set():
            time.sleep(0.01)
        t0 = time.monotonic()
        st = request(a, {"op": "status"})
        status_s.append(time.monotonic() - t0)
        assert st["enclaves"]["kv"]["status"] == "migrating-out"

    threads = [threading.Thread(target=client), threading.Thread(target=status)]
    for t in threads:
        t.start()
    try:
        figures = migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=30)
        time.sleep(0.3)  # calls go on at the destination
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        proxy.close()
    assert hold.held_at is not None and hold.released_at is not None
    during = [t for t in answered if hold.held_at <= t <= hold.released_at]
    assert len(during) >= 10, f"only {len(during)} calls answered during the {HOLD} s handshake"
    assert status_s and status_s[0] < HOLD / 2, f"status took {status_s} s during the migration"
    gaps = [y - x for x, y in zip(answered, answered[1:], strict=False)]
    assert max(gaps) < HOLD, f"a call waited {max(gaps):.2f} s: the handshake held the enclave"
    assert figures["attest_ms"] >= HOLD * 1e3 * 0.9  # the hold did land in the handshake
    assert answered[-1] > hold.released_at  # and calls went on after the move (redirected)
    assert checksum(b) == before
