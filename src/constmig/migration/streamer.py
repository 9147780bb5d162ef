"""The source's half of post-copy streaming: every remaining chunk goes out exactly once.

Two paths, as in QEMU's postcopy-preempt: a background stream on the main channel, and demanded chunks
on a channel of their own, so a chunk the resumed app is waiting for never queues behind megabytes of
background data in the socket buffers.

The background's order: heap order. After a demand it takes the few chunks after it first (an app that
touched chunk i will likely touch i+1 next; for a batch, the batch's second half), and then goes on in
heap order from the demand, wrapping around at the end to pick up whatever it skipped.

Runs after the commit point: a failure here never resumes the app at the source; the caller pauses
with every chunk still in the heap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from constmig.errors import ChannelClosed, ConstmigError, ProtocolError, RecvTimeout
from constmig.migration import messages as m
from constmig.migration.ledger import PIECE, pieces_tag
from constmig.migration.priority import DEMAND_QUIET_S, BackgroundCores, boost_this_thread, quick_gil_handoff

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link

MAX_DEMAND = 256  # chunks one Demand may name; more is a confused or hostile peer
FOLLOW = 4  # chunks after a demanded one the background sends next
NATIVE_BATCH = 4  # background chunks per native batch: a demand's follow-up waits at most ~4 MiB behind one
NATIVE_BATCH_S = 0.05  # under a bandwidth cap, a batch holds at most this long's worth (at least one chunk)


class SendBatch(Protocol):
    """Sends chunks `indexes` of `heap` on a link as one batch through the native engine; their tags for the
    ledger (strategies/stopcopy.py send_native_batch, passed in: the strategies import this module)."""

    def __call__(self, link: Link, heap: Heap, indexes: np.ndarray, *, demand: bool = False) -> np.ndarray: ...


class Streamer:
    """Sends the ledger's chunks over `main` in background order and over `demand` when asked."""

    def __init__(self, main: Link, demand: Link, ledger: ChunkLedger, heap: Heap,
                 progress: Callable[[dict], None], max_bandwidth: float = 0.0, done: np.ndarray | None = None,
                 send_batch: SendBatch | None = None) -> None:
        """`max_bandwidth` (bytes/s, 0 = unlimited) caps the background stream only, like QEMU's
        max-postcopy-bandwidth: demanded chunks always go at once. `done` (a bool mask) names chunks
        the destination holds already (after a reconnect): they are not sent again. `send_batch`: the
        native data plane (docs/native.md step 2b): background chunks go in small batches sealed from the
        heap with the GIL released, and so does each demanded whole chunk; pieces stay Python."""
        self.main, self.demand, self.ledger, self.heap, self.progress = main, demand, ledger, heap, progress
        self.max_bandwidth = max_bandwidth
        self.send_batch = send_batch
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)  # notified as sent chunks' tags are recorded
        self._claimed = ~ledger.expected_mask  # chunks not in the migration count as already sent
        if done is not None:
            self._claimed |= done
        self._order = ledger.expected.tolist()
        self._pos = 0  # next position in _order for the background stream
        self._where = {c: i for i, c in enumerate(self._order)}
        self._next: deque[int] = deque()  # after a demand: what the background sends before anything else
        self._left = int(np.count_nonzero(~self._claimed))
        self.demand_chunks = 0
        self.background_chunks = 0
        self.service: list[float] = []  # per demand: from its arrival to its first record sent (seconds)
        self.error: str | None = None
        self._stopping = False
        self._threads = [threading.Thread(target=self._guard, args=(self._background,), name="stream-bg",
                                          daemon=True),
                         threading.Thread(target=self._guard, args=(self._serve_demands,), name="stream-demand",
                                          daemon=True)]
        self.t_start = 0.0
        self._last_demand = 0.0  # monotonic time the demand path last got or served a demand
        self.last_progress = time.monotonic()  # when a chunk last went out (a long stream is not a stall)

    def start(self) -> None:
        # A demand must not wait the default 5 ms for the GIL behind the background sender.
        quick_gil_handoff()
        self.t_start = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self, abandon: bool = False) -> None:
        """Stop both paths (after DONE or on failure) and wait for them. `abandon`: the migration failed, so
        the main channel goes too: a background send blocked on a peer that stopped reading wakes at once
        (else the caller waits out the joins, with the app stopped, before it pauses or takes it back)."""
        self._stopping = True
        self.demand.chan.close()  # wakes the demand path's blocking recv
        if abandon:
            self.main.chan.close()
        for t in self._threads:
            t.join(timeout=10.0)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # any failure here must reach the waiting main thread, never hang it
            if self._stopping and isinstance(e, ConstmigError | OSError):
                return
            self.error = self.error or (str(e) if isinstance(e, ConstmigError | OSError)
                                        else f"internal error while streaming: {type(e).__name__}: {e}")
            self.main.machine.fail()
            self.main.chan.close()  # the main thread is waiting for DONE on it: wake it with the failure

    def _claim_next(self) -> int | None:
        with self._lock:
            if self._left == 0:
                return None
            while self._next:
                idx = self._next.popleft()
                if not self._claimed[idx]:
                    self._claim(idx)
                    return idx
            n = len(self._order)
            for _ in range(2):  # from the cursor to the end, then once more from the start
                while self._pos < n and self._claimed[self._order[self._pos]]:
                    self._pos += 1
                if self._pos < n:
                    idx = self._order[self._pos]
                    self._claim(idx)
                    return idx
                self._pos = 0
            return None

    def _claim(self, idx: int) -> None:
        self._claimed[idx] = True
        self._left -= 1

    def _batch(self) -> int:
        """Background chunks per send: one on the Python plane; on the native one NATIVE_BATCH, fewer under a
        cap so that a batch never holds the stream back long."""
        if self.send_batch is None:
            return 1
        if self.max_bandwidth <= 0:
            return NATIVE_BATCH
        return max(1, min(NATIVE_BATCH, int(self.max_bandwidth * NATIVE_BATCH_S // self.heap.chunk_size)))

    def _send_background(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Send `batch` on the main channel, on either plane (the Python one takes one chunk at a time:
        `_batch`); its indexes and tags, (n, 16), for the ledger."""
        idx = np.asarray(batch, dtype=np.int64)
        if self.send_batch is not None:
            return idx, self.send_batch(self.main, self.heap, idx)
        tag = self.main.send_chunk(batch[0], self.heap.chunk_view(batch[0]))
        return idx, np.frombuffer(tag, dtype=np.uint8).reshape(1, -1)

    def _background(self) -> None:
        cores = BackgroundCores()
        size = self.heap.chunk_size
        total = len(self._order) * size  # progress counts the ledger, resent chunks included
        last = 0.0
        paced = 0
        step = self._batch()
        while not self._stopping:
            if self.max_bandwidth > 0:  # pace: a batch goes once the allowed rate has paid for it
                ahead = self.t_start + (paced + step * size) / self.max_bandwidth - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            cores.update(time.monotonic() - self._last_demand < DEMAND_QUIET_S)
            batch = [i for i in (self._claim_next() for _ in range(step)) if i is not None]
            if not batch:
                break
            paced += len(batch) * size
            idx, tags = self._send_background(batch)
            self.last_progress = time.monotonic()
            with self._lock:
                self.ledger.record_sent_many(idx, tags)
                self.background_chunks += len(batch)
                self._recorded.notify_all()
            now = time.monotonic()
            if now - last > 0.1:
                last = now
                self._report(total)
        self._report(total)

    def _report(self, total: int) -> None:
        self.progress({"phase": "stream", "done": self.ledger.count * self.heap.chunk_size, "total": total,
                       "demand": self.demand_chunks, "background": self.background_chunks})

    def _serve_demands(self) -> None:
        boost_this_thread()
        n_chunks = self.heap.n_chunks
        while not self._stopping:
            try:
                msg = self.demand.recv()
            except RecvTimeout:
                continue  # no demand for a while: normal
            except ChannelClosed:
                if self._stopping or self._left == 0:
                    return  # the destination closes its demand channel once it holds every chunk
                raise
            t_in = time.perf_counter()
            self._last_demand = time.monotonic()
            if not isinstance(msg, m.Demand):
                raise ProtocolError(f"unexpected {type(msg).__name__} on the demand channel")
            if not (0 < msg.count <= MAX_DEMAND and msg.index >= 0 and msg.index + msg.count <= n_chunks
                    and 0 <= msg.offset < self.heap.chunk_size):
                raise ProtocolError(f"demand for chunks {msg.index}+{msg.count} (offset {msg.offset}) is outside "
                                    f"the heap's {n_chunks} chunks or over {MAX_DEMAND} at once")
            run = self._claim_demand(msg)
            for k, idx in enumerate(run):
                if msg.whole and self.send_batch is not None:
                    tag = self.send_batch(self.demand, self.heap, np.array([idx], dtype=np.int64),
                                          demand=True)[0].tobytes()
                elif msg.whole:
                    tag = self.demand.send_chunk(idx, self.heap.chunk_view(idx), demand=True)
                else:
                    tag = self._send_pieces(idx, msg.offset if idx == msg.index else 0,
                                            t_in if k == 0 else None)
                if k == 0 and msg.whole:
                    self.service.append(time.perf_counter() - t_in)
                with self._lock:
                    self.ledger.record_sent(idx, tag)
                    self.demand_chunks += 1
                    self._recorded.notify_all()
            self._last_demand = time.monotonic()

    def _claim_demand(self, msg: m.Demand) -> list[int]:
        """The chunks of a (checked) demand this path sends, claimed before the background can take them;
        points the background at what the app will likely want next."""
        with self._lock:
            run = [i for i in range(msg.index, msg.index + msg.count) if not self._claimed[i]]
            if msg.whole and len(run) > 1 and self.max_bandwidth <= 0:
                # A batch (the Access Tracker waits for all of it): the demand path sends its first half,
                # and the background, unpaced, continues with the second half at once, so both channels
                # (and both cores) carry the batch instead of one of them carrying cold chunks.
                run, rest = run[:(len(run) + 1) // 2], run[(len(run) + 1) // 2:]
            else:
                rest = []
            for idx in run:
                self._claim(idx)
            if rest:
                self._pos = self._where[rest[0]]
                self._next = deque(rest)
            elif run:
                self._pos = self._where[run[-1]] + 1  # in heap order, the background goes on after it
                self._next = deque(self._order[self._pos:self._pos + FOLLOW])
            return run

    def _send_pieces(self, idx: int, offset: int, t_in: float | None = None) -> bytes:
        """Send chunk `idx` as PIECE-sized records (arg = chunk * pieces + piece), the piece holding
        `offset` first and then on in address order: the waiting access can go on after one piece.
        `t_in`: when its demand arrived (the service time to the first piece is recorded)."""
        view = self.heap.chunk_view(idx)
        n = self.heap.chunk_size // PIECE
        if n == 1:  # a chunk no bigger than a piece goes whole (the receiver tells them apart by size)
            tag = self.demand.send_chunk(idx, view, demand=True)
            if t_in is not None:
                self.service.append(time.perf_counter() - t_in)
            return tag
        hot = min(max(offset, 0) // PIECE, n - 1)
        tags: list[bytes] = [b""] * n
        for k in range(n):
            p = (hot + k) % n
            tags[p] = self.demand.send_chunk(idx * n + p, view[p * PIECE:(p + 1) * PIECE], demand=True)
            if k == 0 and t_in is not None:
                self.service.append(time.perf_counter() - t_in)
        return pieces_tag(tags)

    def wait_recorded(self, timeout: float) -> None:
        """Until every sent chunk's tag is in the ledger: a DONE can arrive before the sending thread
        has recorded the tag of the last chunk it sent."""
        with self._recorded:
            self._recorded.wait_for(lambda: self.ledger.complete or self.error is not None, timeout)
