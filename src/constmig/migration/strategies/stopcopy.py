"""Stop-and-copy (the MigSGX baseline): the whole heap moves while the app is stopped."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from constmig.errors import ConstmigError, ProtocolError
from constmig.migration import messages as m
from constmig.migration.resume_server import ResumeServer
from constmig.migration.strategies.base import Progress, Strategy

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.destination import Arrived
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link
    from constmig.migration.port import MigratingEnclave as Enclave


class StopAndCopy(Strategy):
    name = "stopcopy"
    summary = "stop, copy every allocated chunk, resume (the MigSGX baseline)"
    connections = 1
    needs_tracker = False
    source_figures: dict[str, Any] = {"tracker": "none"}

    def check_instance(self, tracker: str) -> None:
        if tracker != "none":
            raise ProtocolError(f"this instance was prepared for post-copy (its heap is guarded by the {tracker} "
                                "tracker), so it cannot take a stop-and-copy migration")

    def send_before_handoff(self, link: Link, ledger: ChunkLedger, heap: Heap, progress: Progress) -> None:
        """Every chunk of the ledger, in order, reporting progress at most ~10 times a second."""
        total = int(ledger.expected.size) * heap.chunk_size
        sent_bytes = 0
        last = 0.0
        for index in ledger.expected.tolist():
            tag = link.send_chunk(index, heap.chunk_view(index))
            ledger.record_sent(index, tag)
            sent_bytes += heap.chunk_size
            now = time.monotonic()
            if now - last > 0.1:
                last = now
                progress({"phase": "copy", "done": sent_bytes, "total": total})
        progress({"phase": "copy", "done": sent_bytes, "total": total})

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
