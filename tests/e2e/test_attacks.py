"""The untrusted host attacks a live migration record by record, for every strategy and tracker.

A man in the middle sits on the agent-to-agent connections (which the agents hand to the enclaves,
so this is also the agent-to-enclave path) and flips, swaps, drops, duplicates or replays records,
including records recorded from an earlier migration of the same enclave. Each attack must be
refused with a clear error and leave exactly one copy of the enclave able to run, holding every
acknowledged write (the checksum covers the client keys written before the migration).

Outcomes by where the attack lands:
* before the commit point (handshake, small state, stop-and-copy chunks): the migration aborts, the
  source runs on, the half-built destination wipes itself;
* on COMMIT itself: the destination refuses it and says so over the authenticated channel, so the
  source knows the destination never ran and runs again (no fork, and no lost enclave);
* on a post-copy chunk after the commit point: the destination runs but never installs the bad
  chunk; the link is dropped and the source reconnects (fresh keys, resume.py) and sends what is
  missing, so a one-off attack costs a reconnect. An attack on every connection ends at the resume
  deadline with the source holding every chunk and refusing to run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from mitm import MitmProxy, RecordTamper
from test_live_postcopy import TRACKERS

from conftest import checksum, launch, running_at, wait_gone
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import app_checksum, migrate
from constmig.native import engine
from constmig.wire.records import Kind

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]

VARIANTS = [pytest.param(("stopcopy", "none"), id="stopcopy")] + [
    pytest.param(("constmig", t.values[0] if hasattr(t, "values") else t), marks=getattr(t, "marks", ()),
                 id=f"constmig-{t.values[0] if hasattr(t, 'values') else t}")
    for t in TRACKERS
]
POSTCOPY = VARIANTS[1:]

BEFORE_COMMIT = "aborted before handoff|attestation with the destination failed"
RECLAIMED = "gave the migration up before resuming"
PAUSED = "handed off but the destination did not confirm"

OnRecord = Callable[[str, int, object, bytes], list[bytes]]


class Counter:
    """Numbers the main channel's records of one kind (0 = the first of that kind)."""

    def __init__(self) -> None:
        self.seen: dict[Kind, int] = {}
        self.lock = threading.Lock()

    def __call__(self, channel: str, header) -> int | None:
        if channel != "main":
            return None
        with self.lock:
            k = self.seen.get(header.kind, 0)
            self.seen[header.kind] = k + 1
            return k


def flipped(record: bytes, at: int = -40) -> bytes:
    b = bytearray(record)
    b[at] ^= 0x04
    return bytes(b)


def attack(a: str, b: str, variant: tuple[str, str], on_record: OnRecord, match: str,
           max_bandwidth: float = 0.0, timeout: float = 20, resume_deadline: float = 30) -> AgentError:
    """Migrate kv from a to b through a tampering proxy; the migration must fail with `match`."""
    strategy, tracker = variant
    proxy = MitmProxy(b, RecordTamper(on_record))
    try:
        with pytest.raises(AgentError, match=match) as err:
            migrate("kv", a, proxy.addr, strategy, tracker=tracker if tracker != "none" else "auto",
                    max_bandwidth=max_bandwidth, timeout=timeout, resume_deadline=resume_deadline)
    finally:
        proxy.close()
    return err.value


def survive(a: str, b: str, variant: tuple[str, str], on_record: OnRecord, before: str,
            data_plane: str = "python") -> None:
    """A one-off attack after the commit point: detected, dropped, reconnected around; the enclave
    arrives whole (the tampered record was never installed, or the checksum could not match). On the
    native data plane the stream is sealed and opened by the engine at both ends (docs/native.md)."""
    strategy, tracker = variant
    proxy = MitmProxy(b, RecordTamper(on_record))
    try:
        figures = migrate("kv", a, proxy.addr, strategy, tracker=tracker, max_bandwidth=16 << 20, timeout=20,
                          data_plane=data_plane)
    finally:
        proxy.close()
    assert figures["resumes"] >= 1
    assert figures["data_plane"] == figures["recv_data_plane"] == data_plane, figures
    assert app_checksum(b, "kv") == before
    assert "kv" not in request(a, {"op": "status"})["enclaves"]


def source_runs_on(a: str, b: str, before: str) -> None:
    """The one live copy is the source, with every byte it had; the destination's copy is gone."""
    assert running_at(a) and checksum(a) == before
    wait_gone(b)
    assert not request(a, {"op": "status"})["moved"]


def destination_runs_source_holds(a: str, b: str) -> None:
    """Post-copy after the commit point: the destination runs (and refuses to use unverified data);
    the source never runs the app again but keeps it, chunks included, for a recovery."""
    st = request(a, {"op": "status"})
    assert st["enclaves"]["kv"]["status"] == "failed" and "kv" in st["moved"]
    with pytest.raises(AgentError, match="migration|heap data"):
        app_checksum(b, "kv")  # a call that needs the bad chunk fails clearly, never reads it
    with pytest.raises(AgentError, match="moved to"):
        request(a, {"op": "session_call", "name": "kv", "record": b""})  # no way back to the source


def record_migration(a: str, b: str, variant: tuple[str, str]) -> dict[tuple[Kind, int], bytes]:
    """Migrate kv a -> b through a recording proxy; returns main-channel records by (kind, number)."""
    kept: dict[tuple[Kind, int], bytes] = {}
    count = Counter()

    def on_record(channel, n, header, record):
        k = count(channel, header)
        if k is not None:
            kept[(header.kind, k)] = record
        return [record]

    strategy, tracker = variant
    proxy = MitmProxy(b, RecordTamper(on_record))
    try:
        migrate("kv", a, proxy.addr, strategy, tracker=tracker if tracker != "none" else "auto", timeout=20)
    finally:
        proxy.close()
    return kept


def recorded_and_back(a: str, b: str, variant: tuple[str, str]) -> tuple[dict[tuple[Kind, int], bytes], str]:
    """An earlier migration a -> b recorded by the host, then the enclave moved back: (records, checksum)."""
    launch(a, heap=32 << 20)
    old = record_migration(a, b, variant)
    migrate("kv", b, a, "stopcopy")
    return old, checksum(a)


# --- before the commit point: the source runs on ---------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", [0, 1], ids=["M1", "M3"])
def test_flipped_bit_in_handshake_message(cluster, variant, which):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    count = Counter()

    def on_record(channel, n, header, record):
        if count(channel, header) == which and header.kind == Kind.HANDSHAKE:
            return [flipped(record, at=-10)]
        return [record]

    attack(a, b, variant, on_record, BEFORE_COMMIT)
    source_runs_on(a, b, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flipped_bit_in_small_state(cluster, variant):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    count = Counter()

    def on_record(channel, n, header, record):
        if header.kind == Kind.CONTROL and count(channel, header) == 0:
            return [flipped(record)]
        count(channel, header)
        return [record]

    attack(a, b, variant, on_record, BEFORE_COMMIT)
    source_runs_on(a, b, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_small_state_dropped(cluster, variant):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    count = Counter()

    def on_record(channel, n, header, record):
        return [] if count(channel, header) == 0 and header.kind == Kind.CONTROL else [record]

    attack(a, b, variant, on_record, BEFORE_COMMIT)
    source_runs_on(a, b, before)


def _chunk_attack(kind: str) -> OnRecord:
    """flip / swap / drop / duplicate main-channel chunk records 3 and 4."""
    count = Counter()
    held: list[bytes] = []

    def on_record(channel, n, header, record):
        k = count(channel, header)
        if header.kind != Kind.CHUNK or k not in (3, 4):
            return [record]
        if kind == "flip":
            return [flipped(record)] if k == 3 else [record]
        if kind == "drop":
            return [] if k == 3 else [record]
        if kind == "duplicate":
            return [record, record] if k == 3 else [record]
        if k == 3:  # swap: hold chunk 3, send it after chunk 4
            held.append(record)
            return []
        return [record, held.pop()]

    return on_record


@pytest.mark.parametrize("kind", ["flip", "swap", "drop", "duplicate"])
def test_chunk_attack_before_commit(cluster, kind):
    """Stop-and-copy moves every chunk before the commit point: any chunk attack aborts it."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    attack(a, b, ("stopcopy", "none"), _chunk_attack(kind), BEFORE_COMMIT)
    source_runs_on(a, b, before)


# --- on COMMIT: the destination refuses it, and the source may run again ---------------------------


COMMIT = 2  # CONTROL records on the main channel, either strategy: STATE, HEAP_END, COMMIT


@pytest.mark.parametrize("variant", VARIANTS)
def test_flipped_bit_in_commit(cluster, variant):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    count = Counter()

    def on_record(channel, n, header, record):
        k = count(channel, header)
        if header.kind == Kind.CONTROL and k == COMMIT:
            return [flipped(record)]
        return [record]

    attack(a, b, variant, on_record, RECLAIMED)
    source_runs_on(a, b, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stale_commit_from_an_earlier_migration(cluster, variant):
    """COMMIT recorded from an earlier migration of the same enclave, replayed in place of the real one."""
    a, b = cluster.addrs
    old, before = recorded_and_back(a, b, variant)
    count = Counter()

    def on_record(channel, n, header, record):
        k = count(channel, header)
        if header.kind == Kind.CONTROL and k == COMMIT:
            return [old[(Kind.CONTROL, k)]]
        return [record]

    attack(a, b, variant, on_record, RECLAIMED)
    source_runs_on(a, b, before)


# --- chunks replayed from an earlier migration -----------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk_replayed_from_an_earlier_migration(cluster, variant):
    a, b = cluster.addrs
    old, before = recorded_and_back(a, b, variant)
    count = Counter()

    def on_record(channel, n, header, record):
        k = count(channel, header)
        if header.kind == Kind.CHUNK and k == 3:
            return [old[(Kind.CHUNK, 3)]]
        return [record]

    if variant[0] == "stopcopy":
        attack(a, b, variant, on_record, BEFORE_COMMIT)
        source_runs_on(a, b, before)
    else:
        survive(a, b, variant, on_record, before)


# --- post-copy chunks after the commit point: never installed; reconnect, or hold everything -------


@pytest.mark.parametrize("variant", POSTCOPY)
@pytest.mark.parametrize(("kind", "plane"), [(kind, "python") for kind in ("flip", "swap", "drop", "duplicate")] + [
    pytest.param(kind, "native", id=f"{kind}-native", marks=pytest.mark.skipif(
        not engine.available(), reason=f"{engine.why_unavailable()}")) for kind in ("flip", "drop")])
def test_chunk_attack_after_commit(cluster, variant, kind, plane):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    survive(a, b, variant, _chunk_attack(kind), before, plane)


@pytest.mark.parametrize("variant", POSTCOPY)
def test_chunk_attack_on_every_reconnect_ends_at_the_deadline(cluster, variant):
    """The host tampers with a chunk on every connection: each reconnect fails the same way, and at the
    resume deadline the migration fails with the source still holding every chunk."""
    a, b = cluster.addrs
    launch(a, heap=32 << 20)

    def on_record(channel, n, header, record):
        return [flipped(record)] if header.kind == Kind.CHUNK else [record]

    attack(a, b, variant, on_record, "could not be resumed within 2 s", max_bandwidth=16 << 20, timeout=4,
           resume_deadline=2)
    destination_runs_source_holds(a, b)


# --- one enclave, two destinations at once ---------------------------------------------------------


def test_one_enclave_migrated_to_two_destinations_at_once():
    """Two migrations of one enclave started together: exactly one runs it afterwards, with its data.

    The agent refuses the second while the first is under way; an agent that did not would still meet
    the enclave, which serves one request at a time and leaves RUNNING at the first stop (see
    test_host_attacks.py for the enclave refusing a second migration after the commit point)."""
    from constmig.host.cluster import LocalCluster

    with LocalCluster(3) as c:
        a, b, d = c.addrs
        before = launch(a, heap=32 << 20)
        results: dict[str, object] = {}

        def go(dst: str) -> None:
            try:
                results[dst] = migrate("kv", a, dst, "stopcopy", timeout=20)
            except AgentError as e:
                results[dst] = e

        threads = [threading.Thread(target=go, args=(x,)) for x in (b, d)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        won = [x for x, r in results.items() if isinstance(r, dict)]
        lost = [x for x, r in results.items() if isinstance(r, AgentError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert "cannot migrate it now" in str(results[lost[0]])
        assert running_at(won[0]) and checksum(won[0]) == before
        assert not running_at(lost[0]) and not running_at(a)
