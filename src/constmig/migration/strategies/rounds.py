"""Pre-copy rounds, shared by `precopy` and `hybrid`: the heap streams while the app keeps running; each
round sends only the chunks written since they were last sent (write tracking inside the enclave,
enclave/dirty.py). When the rounds end is converge.py's rule: what is left fits `max_downtime` at the
measured rate, the rounds stop shrinking, the write tracker gave up, or `max_rounds`.

Freshness across rounds. A chunk sent in round k and again in round k+1 travels as two records of the
same channel, whose strict sequence numbers refuse a replayed, dropped or reordered one; the destination
writes each version over the last (the app does not run there yet). At the stop the source scans once
more and names, in the authenticated small state (`StateMsg.held`), exactly the chunks whose last sent
version is current. The destination keeps those (their tags enter its ledger, so READY's digest covers
exactly the versions it keeps) and makes every other chunk a round brought missing again: zero pages
for a plain heap, missing pages under the Fault Tracker, guarded under the Access Tracker. What is
missing then arrives once: before the handoff (precopy) or by demand and background stream (hybrid).

What counts as written since a chunk was sent: what the write tracker found, plus what the heap's
allocator changed behind it (`Heap.take_changed`: a free's zeroing, which no tracker sees, and chunks
handed out again). And a chunk stays written when it is wholly unallocated at the scan: it goes again
(as the zeros a freed chunk holds), or, if the rounds end there, it is named stale and never held, so
the destination ends with zeros there (keep_held) or the chunk's current bytes, never a round's old ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from constmig.enclave.dirty import (
    EnclaveWriteTracker,
    WriteTracker,
    enclave_problem,
    kernel_problem,
    write_tracker,
)
from constmig.errors import MigrationError, ProtocolError, RecvTimeout
from constmig.migration import messages as m
from constmig.migration import trackers
from constmig.migration.ledger import ChunkLedger, chunks_from_wire, chunks_to_wire
from constmig.migration.strategies.base import Before, Progress
from constmig.migration.strategies.converge import (
    DEFAULT_MAX_DOWNTIME_S,
    MAX_ROUNDS,
    PROBE_MIN_S,
    PROBE_SHARE,
    Convergence,
    Goal,
)
from constmig.migration.strategies.early import Early
from constmig.migration.strategies.stopcopy import send_chunks
from constmig.wire import control
from constmig.wire.channel import SealedChunk

ACK_GRACE_S = 10.0  # a round's ack may take this long after the budget ran out during the round

if TYPE_CHECKING:
    from collections.abc import Callable

    from constmig.enclave.heap import Heap
    from constmig.migration.link import Link
    from constmig.migration.port import MigratingEnclave as Enclave

@dataclass
class Rounds(Before):
    """What the rounds leave for the stop: the tracker (still armed), the newest version sent of each
    chunk, what the last scan found written since, and the figures."""

    tracker: WriteTracker
    sent: ChunkLedger
    figures: dict[str, Any] = field(default_factory=dict)
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    left_figure: str = "final_chunks"  # the figure that counts what is left at the stop
    finish: bool = False  # the stop sends what is left (pre-copy's finish), even under a post-copy strategy

    def settle(self, ledger: ChunkLedger) -> np.ndarray:
        """Stopped: the chunks whose last sent version is current (the app writes no more), taken into
        `ledger` with their tags; the rest of the ledger is missing."""
        # the app writes no more: nothing to re-arm; tracking ends after COMMIT (see source.run)
        last = _written(self.tracker, rearm=False)
        stale = np.union1d(self.pending, last)
        keep = self.sent.received & ledger.expected_mask
        keep[stale] = False
        held = np.flatnonzero(keep).astype(np.int64)
        ledger.hold(held, self.sent.tags[held])
        self.figures["final_chunks" if self.finish else self.left_figure] = int(ledger.expected.size - held.size)
        return held

    def close(self) -> None:
        self.tracker.close()


class RoundsMixin:
    """`before_stop` and `receive_before_state` for a strategy that sends rounds before the stop."""

    default_rounds: ClassVar[int] = MAX_ROUNDS
    default_throttle: ClassVar[float] = 0.0  # --max-throttle unless the request names one
    default_downtime: ClassVar[float] = DEFAULT_MAX_DOWNTIME_S  # --max-downtime unless the request names one
    default_finish: ClassVar[float | None] = None  # auto's Goal.finish_within unless the request names a downtime
    left_figure: ClassVar[str] = "final_chunks"

    def before_stop(self, link: Link, enclave: Enclave, progress: Progress, req: control.MigrateOut) -> Rounds:
        heap = enclave.heap
        goal = Goal.of(req, self.default_rounds, heap.size, self.default_throttle, self.default_downtime,
                       self.default_finish)
        # one mechanism per destination tracker (enclave/dirty.py), unless the user picked one; a throttle
        # needs the enclave's own, which counts what each call writes
        paired = trackers.get(req.tracker).write_tracking
        tracker = write_tracker(heap, req.write_tracking, "enclave" if goal.max_throttle else paired)
        unthrottled = None
        if goal.max_throttle and req.write_tracking == "auto" and isinstance(tracker, EnclaveWriteTracker) \
                and (problem := enclave_problem() or tracker.budget_problem()) is not None:
            # picked for the throttle alone: where it cannot work here, the tracker's own, unthrottled
            tracker = write_tracker(heap, "kernel" if paired == "auto" and kernel_problem() is None else paired)
            unthrottled = problem
        if goal.max_throttle and not isinstance(tracker, EnclaveWriteTracker):
            unthrottled = unthrottled or f"the {tracker.mechanism} write tracking cannot tell which call wrote"
            goal = replace(goal, max_throttle=0.0)
        t0 = time.monotonic()
        tracker.arm()  # before the first read: a write after this is seen by the next scan
        heap.take_changed()  # the allocator's changes before now: round 1 reads them all
        assert link.chan.migration_id is not None
        rounds = Rounds(tracker, ChunkLedger.everything(link.chan.migration_id, heap.n_chunks),
                        left_figure=self.left_figure)
        try:
            todo = enclave.whole_heap("migrate")  # what is allocated now (the app may allocate more)
            rule = Convergence(goal, heap.chunk_size)
            counter = (lambda: tracker.faults) if isinstance(tracker, EnclaveWriteTracker) else None
            try:
                while True:
                    t_round = time.monotonic()
                    number = len(rule.round_chunks) + 1
                    sent = send_chunks(link, rounds.sent, heap, todo, progress, "round", req.max_bandwidth,
                                       _probe(rule, enclave, counter, len(todo), t_round) if number == 1 else None,
                                       round=number, throttle=rule.throttle)
                    # its time runs to the ack (the destination's rate), which must come within the budget
                    _round_trip(link, number, len(todo), within=rule.budget_left() - (time.monotonic() - t_round))
                    dirty = _left(tracker, rounds.sent, heap)
                    if rule.after_round(int(len(todo)), sent, time.monotonic() - t_round, int(dirty.size),
                                        bool(tracker.lost)):
                        break
                    cost = enclave.limit_writes(rule.write_limit(), counter)  # what holding cost so far
                    progress({"phase": "round_end", "round": number, "left": int(dirty.size) * heap.chunk_size,
                              "dirty_rate": round(rule.left / rule.elapsed * heap.chunk_size),
                              "rate": round(rule.rate), "throttle": rule.throttle, **cost})
                    todo = dirty
            finally:
                held = enclave.limit_writes(None)  # lifted the moment the rounds end, however they end
            stale = dirty[rounds.sent.received[dirty]]
            if stale.size:  # the destination lets go of them now, while the app runs, not at the stop
                _round_trip(link, len(rule.round_chunks) + 1, 0, stale)
            rounds.figures = {**rule.figures(time.monotonic() - t0), "write_tracking": tracker.mechanism}
            if rule.own_rate:  # what holding the writers cost them
                rounds.figures.update(held_calls=held["held_calls"], held_s=held["held_s"])
            if unthrottled:
                rounds.figures["throttle_unavailable"] = unthrottled
            if tracker.lost:  # what the tracker could not do
                rounds.figures["tracking_lost"] = tracker.lost
            rounds.pending = dirty  # written since sent (the scan that found them re-armed them)
            rounds.figures.update(self.decided(rule, heap.n_chunks))
            rounds.finish = self.finishes(rule)
            return rounds
        except BaseException:
            rounds.close()
            raise

    def finishes(self, rule: Convergence) -> bool:
        """Whether the stop sends what the rounds left (precopy: always, by its own send_before_handoff)
        rather than leaving it missing for after the switch (hybrid); auto decides by the rounds."""
        return False

    def decided(self, rule: Convergence, n_chunks: int) -> dict[str, Any]:
        """Figures that say what the strategy made of the rounds (auto's decision); none by default."""
        return {}

    def receive_before_state(self, link: Link, enclave: Enclave, migration_id: bytes) -> tuple[Early | None, Any]:
        """The rounds: each version over the last, in the heap the app does not run on yet."""
        heap = enclave.heap
        early = Early(ChunkLedger.everything(migration_id, heap.n_chunks), np.zeros(heap.n_chunks, dtype=bool))
        first = enclave.tracking.first_write()
        number, count = 1, 0
        while True:
            msg = link.recv()
            if isinstance(msg, m.RoundEnd):
                if msg.round != number or msg.count != count:
                    raise ProtocolError(f"round {msg.round} claims {msg.count} chunks; round {number} brought {count}")
                early.let_go(enclave, chunks_from_wire(msg.stale, heap.n_chunks))
                link.send(m.RoundAck(number, count))
                number, count = number + 1, 0
                continue
            if not isinstance(msg, SealedChunk):
                if count:
                    raise ProtocolError(f"round {number} ended without its count ({count} chunks unaccounted for)")
                return early, msg
            count += 1
            got = early.ledger
            got.check_acceptable(msg.index, again=True)
            if msg.length != heap.chunk_size:
                raise ProtocolError(f"chunk {msg.index} is {msg.length} bytes, not the heap's {heap.chunk_size}")
            # In place already (plain memory now): verified before it counts. A stale chunk was made missing
            # again (unless the tracker keeps it in place), so it takes the first-write path.
            if got.received[msg.index] or (early.stale[msg.index] and enclave.tracking.stale_in_place):
                link.chan.open_chunk(msg, heap.chunk_view(msg.index))
            else:
                first(msg, link.chan)
            early.stale[msg.index] = False
            got.accept(msg.index, msg.tag, again=True)


def _probe(rule: Convergence, enclave: Enclave, counter: Callable[[], int] | None, chunks: int,
           t0: float) -> Callable[[int], bool] | None:
    """The first round's look at the app's write pace (converge.py, `probe`), from the enclave tracker's
    count of chunks written since it was armed; None where nothing could throttle."""
    if counter is None or not rule.goal.max_throttle:
        return None
    start, due = counter(), max(1, int(PROBE_SHARE * chunks))

    def watch(sent: int) -> bool:
        elapsed = time.monotonic() - t0
        if sent < due or elapsed < PROBE_MIN_S:
            return False
        if rule.probe(sent, elapsed, counter() - start):
            enclave.limit_writes(rule.write_limit(), counter)
        return True
    return watch


def _round_trip(link: Link, number: int, count: int, stale: np.ndarray | None = None,
                within: float | None = None) -> None:
    """End a round and wait until the destination holds it (and says how many chunks it took): at most
    what is left of the rounds' budget (`within`; but `ACK_GRACE_S` even when the round itself used it up)
    or the link's timeout, whichever is shorter."""
    link.send(m.RoundEnd(number, count, b"" if stale is None else chunks_to_wire(stale)))
    wait = link.timeout if within is None else min(max(within, ACK_GRACE_S), link.timeout)
    try:
        ack = link.expect(m.RoundAck, timeout=wait)
    except RecvTimeout:
        if wait < link.timeout:
            raise MigrationError(f"the destination did not acknowledge round {number} within the rounds' "
                                 "completion budget") from None
        raise
    if ack.round != number or ack.count != count:
        raise ProtocolError(f"destination acknowledged round {ack.round} with {ack.count} chunks; round {number} "
                            f"sent {count}")


def _written(tracker: WriteTracker, rearm: bool = True) -> np.ndarray:
    """Chunks changed since the last scan: the tracker's marks and the allocator's own changes (frees
    zero with a madvise that no tracker sees; see Heap.take_changed)."""
    return np.union1d(tracker.scan(rearm=rearm), tracker.heap.take_changed()).astype(np.int64)


def _left(tracker: WriteTracker, sent: ChunkLedger, heap: Heap) -> np.ndarray:
    """Chunks to send again: written since sent (allocated now or not: a freed chunk's zeros are its
    current bytes, and dropping its mark would let the destination keep the old ones if it is allocated
    again before the stop), or allocated since and never sent."""
    never = np.flatnonzero(heap.allocated_chunks() & ~sent.received)
    return np.union1d(_written(tracker), never).astype(np.int64)
