"""Stop-and-copy (the MigSGX baseline): the whole heap moves while the app is stopped."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from constmig.errors import ConstmigError, ProtocolError
from constmig.migration import messages as m
from constmig.migration.link import Link
from constmig.migration.protocol import CHUNK, St
from constmig.migration.resume_server import ResumeServer
from constmig.migration.strategies.base import Before, Progress, Strategy

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.port import MigratingEnclave as Enclave
    from constmig.migration.strategies.base import Arrived
    from constmig.migration.trackers.base import Tracker


NO_ROUNDS = "stop-and-copy sends no chunk before the stop"
NOTHING_AFTER = "every chunk arrives before the handoff"
# After COMMIT the destination depends on nothing from the source (stop-and-copy, pre-copy).
NO_CHUNK_AFTER_COMMIT = {
    "source": {St.HANDED_OFF: {("send", CHUNK): NOTHING_AFTER}, St.PEER_RUNNING: {("send", CHUNK): NOTHING_AFTER}},
    "destination": {St.RUNNING: {("recv", CHUNK): NOTHING_AFTER}},
}


class StopAndCopy(Strategy):
    name = "stopcopy"
    summary = "stop, copy every allocated chunk, resume (the MigSGX baseline)"
    connections = 1
    needs_tracker = False
    source_figures: dict[str, Any] = {"tracker": "none"}
    removed_edges = {
        "source": {St.CONNECTED: {("send", CHUNK): NO_ROUNDS, ("send", "round_end"): NO_ROUNDS},
                   **NO_CHUNK_AFTER_COMMIT["source"]},
        "destination": {St.CONNECTED: {("recv", CHUNK): NO_ROUNDS, ("recv", "round_end"): NO_ROUNDS},
                        **NO_CHUNK_AFTER_COMMIT["destination"]},
    }

    def check_instance(self, tracker: Tracker) -> None:
        if tracker.post_copy:
            raise ProtocolError(f"this instance was prepared for post-copy (its heap is guarded by the "
                                f"{tracker.name} tracker), so it cannot take a stop-and-copy migration")

    def send_before_handoff(self, link: Link, ledger: ChunkLedger, heap: Heap, progress: Progress,
                            before: Before) -> None:
        """Every chunk of the ledger the destination does not hold yet (all of them without rounds), in order."""
        send_chunks(link, ledger, heap, ledger.missing(), progress, "copy")

    def check_heap_end(self, ledger: ChunkLedger, count: int) -> None:
        super().check_heap_end(ledger, count)
        if not ledger.complete:  # a missing chunk has a zero tag on both sides: the count alone proves nothing
            raise ProtocolError(f"heap stream ended after {ledger.count} of {ledger.expected.size} chunks "
                                "(truncated)")

    def receive_after_commit(self, enclave: Enclave, arrived: Arrived, t_resume: float, timeout: float) -> None:
        """Everything is here: DONE right away; a reconnect (a lost DONE) gets it again."""
        if enclave.resume_path is not None:
            ResumeServer(enclave.resume_path, arrived.secret, arrived.ledger, t_resume, None,
                         enclave.heap.chunk_size, epoch=arrived.epoch)
        with contextlib.suppress(ConstmigError, OSError):  # the app runs here; a reconnect learns of completion
            arrived.link.send(m.Done(arrived.ledger.count, arrived.ledger.digest(), {"tracker": "none"}))


BATCH_CHUNKS = 16  # chunks per native batch: 16 MiB, ~15-30 ms here, so the probe and progress stay on time
BATCH_S = 0.05  # under a bandwidth cap, a batch holds at most this long's worth of chunks (at least one)


class NativeLink(Link):
    """The link of a migration whose request chose `data_plane: "native"`: send_chunks moves its chunks
    through the native engine in batches (docs/native.md); control messages go as on any link."""

    def send_chunk_batch(self, heap: Heap, indexes: np.ndarray, *, demand: bool = False) -> np.ndarray:
        """Send chunks `indexes` of `heap` as one native batch; their tags ((n, 16) uint8) for the ledger."""
        return send_native_batch(self, heap, indexes, demand=demand)


def send_native_batch(link: Link, heap: Heap, indexes: np.ndarray, *, demand: bool = False) -> np.ndarray:
    """Send chunks `indexes` of `heap` on `link` as one native batch (any link of a native migration: the
    post-copy demand link too); their tags ((n, 16) uint8) for the ledger."""
    from constmig.native.engine import NativeSealer

    link.machine.sent(CHUNK)  # one check for the batch: a CHUNK leaves every state it is allowed in as it was
    return link.chan.send_chunk_batch(NativeSealer, memoryview(heap.buf[:heap.size]), heap.chunk_size, indexes,
                                      demand=demand)


def data_plane(link: Link) -> str:
    """Which path moves this link's bulk chunks: "native" or "python"."""
    return "native" if isinstance(link, NativeLink) else "python"


def send_chunks(link: Link, ledger: ChunkLedger, heap: Heap, chunks: Any, progress: Progress, phase: str,
                pace: float = 0.0, watch: Callable[[int], bool] | None = None, **info: Any) -> int:
    """Send `chunks` in order, recording each one's tag (the newest version counts), reporting progress
    at most ~10 times a second; `pace` (bytes/s, 0 = unlimited) caps the rate; `watch` is told how many
    chunks went after each one (after each batch on the native data plane), until it says it has seen
    enough (the rounds' probe). Returns bytes sent."""
    indices = np.asarray(chunks, dtype=np.int64)
    size = heap.chunk_size
    step = _batch(size, pace) if isinstance(link, NativeLink) else 1
    total = len(indices) * size
    sent = 0
    last = 0.0
    t0 = time.monotonic()
    for first in range(0, len(indices), step):
        part = indices[first:first + step]
        if pace > 0:
            ahead = t0 + (sent + part.size * size) / pace - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if isinstance(link, NativeLink):
            ledger.record_sent_many(part, link.send_chunk_batch(heap, part))
        else:
            index = int(part[0])
            ledger.record_sent(index, link.send_chunk(index, heap.chunk_view(index)))
        sent += part.size * size
        if watch is not None and watch(sent // size):
            watch = None
        now = time.monotonic()
        if now - last > 0.1:
            last = now
            progress({"phase": phase, "done": sent, "total": total, **info})
    progress({"phase": phase, "done": sent, "total": total, **info})
    return sent


def _batch(chunk_size: int, pace: float) -> int:
    """Chunks per native batch: BATCH_CHUNKS, fewer under a cap so that a batch never waits long."""
    if pace <= 0:
        return BATCH_CHUNKS
    return max(1, min(BATCH_CHUNKS, int(pace * BATCH_S // chunk_size)))
