"""Pre-copy rounds' own rules, against the real `destination.run` and `source.run` with a scripted peer
that holds the channel keys (so it can lie in sealed messages, which the host cannot forge):

* a round's end must name the round and the chunk records it carried;
* the small state may keep only chunks a round brought, and none without rounds;
* what the state does not keep is made missing again (zeros at the destination), and the version kept
  is the last one sent;
* a source refuses an acknowledgement of another round or another count;
* the ledger's `hold` and the packed chunk lists refuse what is not part of the migration;
* what a round must send again (`_left`) and what the stop may keep (`Rounds.settle`) count the heap's
  frees and allocations as writes, and keep a written chunk's mark when it is unallocated at the scan
  (end to end in tests/e2e/test_round_frees.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
from scripted import TIMEOUT, Enclaves, Runner, recv_msg, send_msg, small_state

from constmig.enclave.dirty import KernelWriteTracker, enclave_problem, kernel_problem, write_tracker
from constmig.enclave.heap import Heap
from constmig.enclave.lifecycle import Life
from constmig.enclave.tracker import PROT_NONE, PROT_RW, protect_chunks
from constmig.errors import MigrationError, ProtocolError
from constmig.kernel.uffd import preflight
from constmig.migration import destination, source
from constmig.migration import messages as m
from constmig.migration.ledger import TAG_SIZE, ChunkLedger, chunks_from_wire
from constmig.migration.strategies import rounds as rounds_mod
from constmig.migration.strategies.early import Early, keep_held
from constmig.migration.strategies.rounds import Rounds, _left
from constmig.wire.channel import SecureChannel
from constmig.wire.handshake import run_initiator, run_responder


def _connect(enclaves: Enclaves, pair, strategy: str = "precopy"):
    """A filled source enclave (scripted by the test) and a real destination being driven."""
    src, dst = enclaves.filled(), enclaves.build("host-b", incoming=True)
    runner = Runner(destination.run, dst, [pair[0]], {"timeout": TIMEOUT}, lambda info: None)
    mid = os.urandom(16)
    chan = SecureChannel(pair[1], mid)
    heap = src.heap
    run_initiator(chan, src.backend, src.identity, src.policy,
                  {"app": src.app_name, "heap_size": heap.size, "chunk_size": heap.chunk_size, "strategy": strategy},
                  timeout=TIMEOUT)
    return src, dst, runner, chan, mid


def _state(src, ledger: ChunkLedger, held: np.ndarray, strategy: str = "precopy") -> m.StateMsg:
    return m.StateMsg(strategy, small_state(src), src.heap.size, src.heap.chunk_size, ledger.to_wire(),
                      time.time(), held=np.asarray(held, dtype="<i8").tobytes())


def _refused(runner: Runner, dst, match: str) -> None:
    err = runner.outcome()
    assert isinstance(err, MigrationError) and match in str(err), err
    assert "wiped" in str(err) and dst.life.state is Life.DESTROYED


@pytest.mark.adversarial
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("number", "delta"), [(1, 1), (1, -1), (2, 0), (0, 0)])
def test_round_end_that_lies_about_its_round_or_count_is_refused(enclaves: Enclaves, pair, number, delta) -> None:
    src, dst, runner, chan, _ = _connect(enclaves, pair)
    chunks = src.heap.export_chunks()[:3].tolist()
    for index in chunks:
        chan.send_chunk(index, src.heap.chunk_view(index))
    send_msg(chan, m.RoundEnd(number, len(chunks) + delta))
    reply = recv_msg(chan)
    assert isinstance(reply, m.Abort) and "claims" in reply.reason, reply
    _refused(runner, dst, "claims")


@pytest.mark.adversarial
@pytest.mark.timeout(60)
def test_a_round_cannot_call_stale_a_chunk_no_round_brought(enclaves: Enclaves, pair) -> None:
    src, dst, runner, chan, _ = _connect(enclaves, pair)
    expected = src.heap.export_chunks()
    chan.send_chunk(int(expected[0]), src.heap.chunk_view(int(expected[0])))
    send_msg(chan, m.RoundEnd(1, 1, np.array([int(expected[1])], dtype="<i8").tobytes()))
    _refused(runner, dst, f"calls chunk {int(expected[1])} stale")


@pytest.mark.adversarial
@pytest.mark.timeout(60)
def test_state_cannot_keep_a_chunk_no_round_brought(enclaves: Enclaves, pair) -> None:
    src, dst, runner, chan, mid = _connect(enclaves, pair)
    expected = src.heap.export_chunks()
    for index in expected[:2].tolist():
        chan.send_chunk(index, src.heap.chunk_view(index))
    send_msg(chan, m.RoundEnd(1, 2))
    assert recv_msg(chan) == m.RoundAck(1, 2)
    send_msg(chan, _state(src, ChunkLedger(mid, src.heap.n_chunks, expected), expected[:3]))  # keeps a third
    _refused(runner, dst, f"keeps chunk {int(expected[2])}")


@pytest.mark.adversarial
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("strategy", "match"), [("stopcopy", "no round was sent"), ("precopy", "no round brought")])
def test_state_cannot_keep_chunks_without_rounds(enclaves: Enclaves, pair, strategy, match) -> None:
    src, dst, runner, chan, mid = _connect(enclaves, pair, strategy)
    expected = src.heap.export_chunks()
    send_msg(chan, _state(src, ChunkLedger(mid, src.heap.n_chunks, expected), expected[:1], strategy))
    _refused(runner, dst, match)


@pytest.mark.adversarial
@pytest.mark.timeout(60)
def test_chunks_of_a_round_with_no_end_are_refused(enclaves: Enclaves, pair) -> None:
    """Round chunks followed straight by the state: the count was never said."""
    src, dst, runner, chan, mid = _connect(enclaves, pair)
    expected = src.heap.export_chunks()
    chan.send_chunk(int(expected[0]), src.heap.chunk_view(int(expected[0])))
    send_msg(chan, _state(src, ChunkLedger(mid, src.heap.n_chunks, expected), expected[:1]))
    _refused(runner, dst, "without its count")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("let_go", ["at the state", "at a round's end"])
def test_versions_the_state_does_not_keep_are_missing_again_and_the_last_version_counts(enclaves: Enclaves,
                                                                                       pair, let_go) -> None:
    """Round 1 sends chunks A and B; round 2 sends A again with other bytes; B is called stale (in an
    empty round's end, or just left out of the state's `held`); the state keeps A (its round-2 version).
    The destination must run with A's round-2 bytes and B as sent at the stop, and its READY digest
    must cover exactly those versions."""
    src, dst, runner, chan, mid = _connect(enclaves, pair)
    heap = src.heap
    expected = heap.export_chunks()
    a_idx, b_idx = int(expected[0]), int(expected[1])
    # B's current bytes are zeros, so it travels at the stop as a zero record the destination does not
    # write: only making B missing again (zeros) at the state keeps its stale round-1 bytes out.
    np.frombuffer(heap.chunk_view(b_idx), dtype=np.uint8)[:] = 0
    rounds = ChunkLedger.everything(mid, heap.n_chunks)
    stale = np.full(heap.chunk_size, 0xAB, dtype=np.uint8)
    rounds.record_sent(a_idx, chan.send_chunk(a_idx, memoryview(stale)))  # round 1: a version of A that goes stale
    rounds.record_sent(b_idx, chan.send_chunk(b_idx, memoryview(stale)))  # ... and of B
    send_msg(chan, m.RoundEnd(1, 2))
    assert recv_msg(chan) == m.RoundAck(1, 2)
    rounds.record_sent(a_idx, chan.send_chunk(a_idx, heap.chunk_view(a_idx)))  # round 2: A's current bytes
    send_msg(chan, m.RoundEnd(2, 1))
    assert recv_msg(chan) == m.RoundAck(2, 1)
    if let_go == "at a round's end":
        send_msg(chan, m.RoundEnd(3, 0, np.array([b_idx], dtype="<i8").tobytes()))
        assert recv_msg(chan) == m.RoundAck(3, 0)
    ledger = ChunkLedger(mid, heap.n_chunks, expected)
    held = np.array([a_idx])
    ledger.hold(held, rounds.tags[held])
    send_msg(chan, _state(src, ledger, held))
    for index in ledger.missing().tolist():  # B (now current) and everything no round sent
        ledger.record_sent(index, chan.send_chunk(index, heap.chunk_view(index)))
    send_msg(chan, m.HeapEnd(ledger.count))
    ready = recv_msg(chan)
    assert isinstance(ready, m.Ready) and ready.digest == ledger.digest()
    send_msg(chan, m.Commit())
    assert isinstance(recv_msg(chan), m.Resumed)
    runner.value()
    assert dst.app is not None and dst.app.checksum() == src.app.checksum()
    for index in (a_idx, b_idx):
        assert bytes(dst.heap.chunk_view(index)) == bytes(heap.chunk_view(index))


def _source_at_round_end(enclaves: Enclaves, pair, req: dict):
    """A real source migrating a filled enclave to a scripted destination, read up to its first ROUND_END
    (the round's chunks taken and dropped); the destination's answer is the test's."""
    src = enclaves.filled()
    peer = enclaves.build("host-b", incoming=True)
    runner = Runner(source.run, src, [pair[0]], req, lambda info: None)
    chan = SecureChannel(pair[1], None)
    run_responder(chan, peer.backend, peer.identity, peer.policy, timeout=TIMEOUT)
    while True:
        rec = chan.recv(timeout=TIMEOUT)
        if not hasattr(rec, "index"):
            break
    assert isinstance(m.decode(rec.payload), m.RoundEnd)
    return src, runner, chan


@pytest.mark.adversarial
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ack", [m.RoundAck(2, 0), m.RoundAck(1, 0)])
def test_source_refuses_an_ack_of_another_round_or_count(enclaves: Enclaves, pair, ack) -> None:
    """A destination (or its keys in other hands) that acknowledges what was not sent: the source aborts
    before the stop and runs on."""
    src, runner, chan = _source_at_round_end(enclaves, pair, {"strategy": "precopy", "timeout": 5.0})
    checksum = src.app.checksum()
    send_msg(chan, ack)
    err = runner.outcome()
    assert isinstance(err, MigrationError) and "acknowledged round" in str(err), err
    assert "keeps running here" in str(err)
    assert src.life.state is Life.RUNNING and src.app.checksum() == checksum


@pytest.mark.adversarial
@pytest.mark.timeout(60)
def test_a_destination_that_withholds_round_acks_gets_the_budget_then_the_source_runs_on(enclaves: Enclaves, pair,
                                                                                       monkeypatch) -> None:
    """The host holds the destination's acknowledgements back (or the destination never sends them): the
    source waits what is left of the rounds' completion budget, then aborts before the stop, and the app
    runs on at full speed (no write limit left behind)."""
    monkeypatch.setattr(rounds_mod, "ACK_GRACE_S", 0.3)
    req = {"strategy": "precopy", "timeout": 30.0, "completion_timeout": 0.01, "max_throttle": 0.9}
    src, runner, _ = _source_at_round_end(enclaves, pair, req)
    checksum = src.app.checksum()
    t0 = time.monotonic()
    err = runner.outcome()  # no ack
    assert time.monotonic() - t0 < 5, "the source waited for the link's timeout, not the budget"
    assert isinstance(err, MigrationError) and "did not acknowledge round 1 within the rounds' completion budget" \
        in str(err) and "keeps running here" in str(err), err
    assert src.life.state is Life.RUNNING and src.app.checksum() == checksum
    assert src.write_limit.rate is None


def test_hold_refuses_what_is_not_part_of_the_migration() -> None:
    ledger = ChunkLedger(b"m" * 16, 8, np.array([1, 3, 5]))
    tags = np.ones((1, TAG_SIZE), dtype=np.uint8)
    with pytest.raises(ProtocolError, match="not part"):
        ledger.hold(np.array([2]), tags)
    with pytest.raises(ProtocolError, match="tags"):
        ledger.hold(np.array([1, 3]), tags)
    ledger.hold(np.array([3]), tags)
    assert ledger.count == 1 and ledger.missing().tolist() == [1, 5]
    idx, packed = ledger.held_wire()
    again = ChunkLedger(b"m" * 16, 8, np.array([1, 3, 5]))
    again.hold(chunks_from_wire(idx, 8), packed)
    assert again.digest() == ledger.digest()


@pytest.mark.parametrize(("packed", "match"), [(b"\x00" * 7, "multiple of 8"),
                                               (np.array([3, 1], dtype="<i8").tobytes(), "ascending"),
                                               (np.array([9], dtype="<i8").tobytes(), "outside"),
                                               (np.array([-1], dtype="<i8").tobytes(), "outside")])
def test_packed_chunk_lists_are_checked(packed, match) -> None:
    with pytest.raises(ProtocolError, match=match):
        chunks_from_wire(packed, 8)


# -- what counts as written: frees, allocations, and chunks unallocated at the scan ---------------------

MiB = 1 << 20


class _Marks:
    """A write tracker that reports the chunks a test says were written (and nothing of the heap's own)."""

    mechanism = "test"
    lost = None

    def __init__(self, heap: Heap, written: list[int] | None = None) -> None:
        self.heap, self.written = heap, list(written or [])
        self.rearms: list[bool] = []

    def scan(self, rearm: bool = True) -> np.ndarray:
        self.rearms.append(rearm)
        out, self.written = np.array(sorted(self.written), dtype=np.int64), []
        return out

    def close(self) -> None:
        pass


def _sent_all(heap: Heap) -> ChunkLedger:
    """The rounds' ledger after a round 1 that sent every allocated chunk (tags stand for the versions)."""
    sent = ChunkLedger.everything(b"m" * 16, heap.n_chunks)
    for index in heap.export_chunks().tolist():
        sent.record_sent(index, bytes([index + 1]) * TAG_SIZE)
    return sent


@pytest.fixture
def small_heap() -> Iterator[Heap]:
    h = Heap(8 * MiB, chunk_size=MiB)
    yield h
    h.close()


def test_left_keeps_a_written_chunk_that_is_unallocated_at_the_scan(small_heap) -> None:
    """Written after round 1 sent it, then freed before the scan: its mark stays (dropping it let the
    destination keep round 1's bytes once it was allocated again before the stop)."""
    small_heap.alloc("a", 2 * MiB)
    small_heap.alloc("b", 2 * MiB)  # chunks 2, 3
    sent = _sent_all(small_heap)
    small_heap.take_changed()  # as the rounds do right after arming
    small_heap.free("b")
    small_heap.take_changed()  # only the tracker's marks this time
    marks = _Marks(small_heap, [1, 3])
    assert _left(marks, sent, small_heap).tolist() == [1, 3]
    assert marks.rearms == [True]  # the app runs on: what it writes next is the next round's


def test_left_counts_the_allocators_changes_as_writes(small_heap) -> None:
    """A free (a madvise no tracker sees) and an allocation over sent chunks are writes; a chunk
    allocated since and never sent goes too."""
    small_heap.alloc("keep", 4096)
    small_heap.alloc("blob", 2 * MiB)  # chunks 0..2
    sent = _sent_all(small_heap)
    small_heap.take_changed()
    small_heap.free("blob")
    assert _left(_Marks(small_heap), sent, small_heap).tolist() == [0, 1, 2]
    small_heap.alloc("blob", 3 * MiB)  # again, nothing written: chunks 0..3, of which 3 was never sent
    assert _left(_Marks(small_heap), sent, small_heap).tolist() == [0, 1, 2, 3]
    assert _left(_Marks(small_heap), sent, small_heap).tolist() == [3]  # never sent: until a round sends it


def test_settle_holds_no_chunk_freed_or_allocated_after_the_last_scan(small_heap) -> None:
    """Between the rounds' last scan and the stop the app frees and allocates again: the stop's scan
    names those chunks, so they are missing (sent again), never held with the round's old bytes."""
    small_heap.alloc("keep", 4096)
    small_heap.alloc("blob", 3 * MiB)  # chunks 0..3
    small_heap.alloc("tail", MiB)  # chunk 4 (3 MiB + 4 KiB onwards): untouched, held
    sent = _sent_all(small_heap)
    small_heap.take_changed()
    small_heap.free("tail")
    small_heap.free("blob")
    small_heap.alloc("blob", MiB)  # chunks 0, 1
    rounds = Rounds(_Marks(small_heap), sent)  # type: ignore[arg-type]
    ledger = ChunkLedger(b"m" * 16, small_heap.n_chunks, small_heap.export_chunks())
    assert rounds.settle(ledger).tolist() == []  # chunks 0, 1 changed; nothing else is allocated
    assert ledger.missing().tolist() == [0, 1]


def test_settle_with_nothing_written_holds_every_chunk_sent(small_heap) -> None:
    small_heap.alloc("a", 2 * MiB)  # chunks 0, 1
    sent = _sent_all(small_heap)
    small_heap.take_changed()
    rounds = Rounds(_Marks(small_heap), sent)  # type: ignore[arg-type]
    ledger = ChunkLedger(b"m" * 16, small_heap.n_chunks, small_heap.export_chunks())
    assert rounds.settle(ledger).tolist() == [0, 1] and ledger.complete


def test_settle_holds_what_was_sent_is_expected_and_was_not_written_since(small_heap) -> None:
    """The stop: held = sent, expected, and written neither during the last round (`pending`) nor since
    (the stop's scan, which re-arms nothing: the app writes no more). The figure counts what the stop
    must still move."""
    small_heap.alloc("a", 6 * MiB)  # chunks 0..6 (the allocator's header pushes it into a seventh)
    sent = ChunkLedger.everything(b"m" * 16, small_heap.n_chunks)
    for index in range(5):  # 5 and 6 never sent
        sent.record_sent(index, bytes([index + 1]) * TAG_SIZE)
    small_heap.take_changed()
    marks = _Marks(small_heap, [2])  # written after the last round's scan
    rounds = Rounds(marks, sent, pending=np.array([1, 3], dtype=np.int64), left_figure="left")  # type: ignore[arg-type]
    ledger = ChunkLedger(b"m" * 16, small_heap.n_chunks, np.array([0, 1, 2, 3, 5]))  # 4: freed, not expected
    assert rounds.settle(ledger).tolist() == [0]
    assert marks.rearms == [False]
    assert rounds.figures == {"left": 4} and ledger.missing().tolist() == [1, 2, 3, 5]
    assert bytes(ledger.tags[0]) == b"\x01" * TAG_SIZE


@pytest.mark.parametrize("mechanism", [
    pytest.param("kernel", marks=pytest.mark.skipif(kernel_problem() is not None, reason=f"{kernel_problem()}")),
    pytest.param("enclave", marks=pytest.mark.skipif(enclave_problem() is not None, reason=f"{enclave_problem()}"))])
@pytest.mark.parametrize("realloc", ["before the scan", "after the scan"])
def test_a_chunk_freed_after_its_round_is_never_held_with_either_tracker(small_heap, mechanism, realloc) -> None:
    """The real trackers over a real heap: round 1 sends `blob` (0xab); the app frees it and allocates it
    again (nothing written) before or after the scan that ends round 1. Neither the scan nor the stop may
    count round 1's version as current."""
    heap = small_heap
    heap.alloc("keep", 4096)[:] = 0x11
    heap.alloc("blob", 3 * MiB)[:] = 0xAB  # chunks 0..3
    tracker = write_tracker(heap, mechanism)
    assert isinstance(tracker, KernelWriteTracker) == (mechanism == "kernel")
    tracker.arm()
    try:
        heap.take_changed()  # as before_stop does
        sent = _sent_all(heap)  # round 1 read them
        heap.free("blob")
        if realloc == "before the scan":
            heap.alloc("blob", 3 * MiB)
        dirty = _left(tracker, sent, heap)  # the scan that ends round 1
        assert {0, 1, 2, 3} <= set(dirty.tolist()), dirty
        if realloc == "after the scan":
            heap.alloc("blob", 3 * MiB)
        rounds = Rounds(tracker, sent, pending=dirty)
        ledger = ChunkLedger(b"m" * 16, heap.n_chunks, heap.export_chunks())
        held = rounds.settle(ledger)
        assert not {0, 1, 2, 3} & set(held.tolist()), held
        assert not heap.array("blob").any()
    finally:
        tracker.close()


# --- the destination under a tracker: a stale chunk is missing again, and its next version installs ------


def _protection(heap: Heap, index: int) -> str:
    """The permissions ("rw-p", "---p") of the mapping that holds chunk `index`'s first byte."""
    start = heap.address + index * heap.chunk_size
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= start < hi:
                return perms
    raise AssertionError(f"chunk {index} is not mapped")


def _missing(dst, index: int) -> bool:
    """Chunk `index` is missing at the destination: guarded (Access Tracker) or without pages (Fault)."""
    if dst.tracking.name == "access":
        return _protection(dst.heap, index).startswith("---")
    touched = dst.heap.touched_chunks()
    assert touched is not None
    return not touched[index]


@pytest.mark.adversarial
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tracker", ["access", "fault"])
def test_under_a_tracker_a_stale_chunk_is_missing_again_and_its_next_version_installs(enclaves: Enclaves, pairs,
                                                                                     tracker) -> None:
    """Hybrid rounds into a guarded or userfaultfd-registered heap: round 1 brings A (a version that goes
    stale) and B; round 2 calls A stale, so A must be missing again (its old bytes gone, and the app's
    first touch would wait for the current version); round 3 brings A's current bytes through the
    tracker's install path, not by a write into a missing page."""
    if tracker == "fault" and (reason := preflight()) is not None:
        pytest.skip(f"userfaultfd is not usable here: {reason}")
    src, dst = enclaves.filled(), enclaves.build("host-b", incoming=True, tracker=tracker)
    runner = Runner(destination.run, dst, pairs.real, {"timeout": TIMEOUT}, lambda info: None)
    chan = SecureChannel(pairs.fake[0], os.urandom(16))
    heap = src.heap
    run_initiator(chan, src.backend, src.identity, src.policy,
                  {"app": src.app_name, "heap_size": heap.size, "chunk_size": heap.chunk_size, "strategy": "hybrid"},
                  timeout=TIMEOUT)
    expected = heap.export_chunks()
    a_idx, b_idx = int(expected[0]), int(expected[1])
    old = np.full(heap.chunk_size, 0xAB, dtype=np.uint8)
    chan.send_chunk(a_idx, memoryview(old))
    chan.send_chunk(b_idx, heap.chunk_view(b_idx))
    send_msg(chan, m.RoundEnd(1, 2))
    assert recv_msg(chan) == m.RoundAck(1, 2)
    assert not _missing(dst, a_idx) and not _missing(dst, b_idx)
    assert bytes(dst.heap.chunk_view(a_idx)) == bytes(old)
    send_msg(chan, m.RoundEnd(2, 0, np.array([a_idx], dtype="<i8").tobytes()))
    assert recv_msg(chan) == m.RoundAck(2, 0)
    assert _missing(dst, a_idx) and not _missing(dst, b_idx)
    chan.send_chunk(a_idx, heap.chunk_view(a_idx))
    np.frombuffer(heap.chunk_view(b_idx), dtype=np.uint8)[:8] ^= 0xFF  # B written since round 1 ...
    chan.send_chunk(b_idx, heap.chunk_view(b_idx))  # ... goes again: over the version in place, no install
    send_msg(chan, m.RoundEnd(3, 2))
    assert recv_msg(chan) == m.RoundAck(3, 2)
    assert not _missing(dst, a_idx)
    for index in (a_idx, b_idx):
        assert bytes(dst.heap.chunk_view(index)) == bytes(heap.chunk_view(index))
    send_msg(chan, m.Abort("test over"))
    assert isinstance(runner.outcome(), MigrationError) and dst.life.state is Life.DESTROYED


# --- the destination's own bookkeeping (Early, keep_held), without a peer ---------------------------------


def _early(n: int, received: list[int]) -> Early:
    ledger = ChunkLedger.everything(b"m" * 16, n)
    for index in received:
        ledger.accept(index, bytes([index + 1]) * TAG_SIZE, again=True)
    return Early(ledger, np.zeros(n, dtype=bool))


@pytest.mark.adversarial
def test_let_go_names_the_first_chunk_no_round_brought(enclaves: Enclaves) -> None:
    dst = enclaves.build("host-b", incoming=True)
    early = _early(dst.heap.n_chunks, [0, 3])
    with pytest.raises(ProtocolError, match="calls chunk 1 stale, but no round brought it"):
        early.let_go(dst, np.array([0, 1, 2], dtype=np.int64))
    assert early.ledger.received[0] and early.ledger.count == 2  # refused whole: nothing let go


def test_let_go_forgets_the_versions_and_marks_them_stale(enclaves: Enclaves) -> None:
    dst = enclaves.build("host-b", incoming=True)
    early = _early(dst.heap.n_chunks, [0, 3, 5])
    early.let_go(dst, np.array([3, 5], dtype=np.int64))
    assert np.flatnonzero(early.ledger.received).tolist() == [0] and early.ledger.count == 1
    assert np.flatnonzero(early.stale).tolist() == [3, 5]


@pytest.mark.adversarial
def test_keep_held_names_the_first_chunk_it_cannot_keep(enclaves: Enclaves) -> None:
    dst = enclaves.build("host-b", incoming=True)
    n = dst.heap.n_chunks
    early = _early(n, [0])
    ledger = ChunkLedger(b"m" * 16, n, np.array([0, 1, 2], dtype=np.int64))
    with pytest.raises(ProtocolError, match="keeps chunk 1, which no round brought"):
        keep_held(dst, ledger, early, np.array([0, 1, 2], dtype=np.int64))


@pytest.mark.parametrize("tracker", ["none", "access"])
def test_keep_held_zeroes_what_the_migration_no_longer_expects_and_lets_go_of_the_rest(enclaves: Enclaves,
                                                                                      tracker) -> None:
    """Rounds brought 0, 1, 2, 3; the state keeps 0 and expects 0, 1 and 4 (2 and 3 were freed since, 4
    allocated since). 1 is let go (stale: sent again at the stop); 2 and 3 are not part of the migration
    any more: zeros, readable (as in a fresh heap), and not stale; 4 was never brought, so it is not stale
    (it arrives like any missing chunk)."""
    dst = enclaves.build("host-b", incoming=True, tracker=tracker)
    heap, n = dst.heap, dst.heap.n_chunks
    if tracker == "access":  # as the rounds' installs left them (the incoming heap starts guarded)
        protect_chunks(heap, np.arange(4), PROT_RW)
    for index in range(4):
        np.frombuffer(heap.chunk_view(index), dtype=np.uint8)[:] = 0xAB
    early = _early(n, [0, 1, 2, 3])
    early.stale[3] = True  # called stale at a round's end: under a tracker, guarded again
    if tracker == "access":
        protect_chunks(heap, np.array([3]), PROT_NONE)
    ledger = ChunkLedger(b"m" * 16, n, np.array([0, 1, 4], dtype=np.int64))
    stale = keep_held(dst, ledger, early, np.array([0], dtype=np.int64))
    assert ledger.received[0] and ledger.count == 1 and bytes(ledger.tags[0]) == bytes(early.ledger.tags[0])
    assert np.flatnonzero(stale).tolist() == [1]
    for index in (2, 3):
        assert not any(heap.chunk_view(index)), f"chunk {index} keeps a round's bytes"
        if tracker == "access":
            assert _protection(heap, index).startswith("rw")
    assert bytes(heap.chunk_view(0)) == b"\xab" * heap.chunk_size
    if tracker == "access":
        assert _missing(dst, 1)  # guarded again: its install overwrites every byte
    else:
        assert bytes(heap.chunk_view(1)) == b"\xab" * heap.chunk_size  # the stop overwrites it (stale)
