"""Hybrid: pre-copy rounds while the app runs (one by default, rounds.py), then the ConstMig switch:
only the small state moves at the stop, and the chunks written since they were sent (or never sent)
are missing at the destination; they arrive by demand and background stream, as in post-copy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from constmig.migration.protocol import CHUNK, St
from constmig.migration.strategies.postcopy import NO_CHUNK, PostCopy
from constmig.migration.strategies.rounds import RoundsMixin

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link
    from constmig.migration.strategies.base import Progress
    from constmig.migration.streamer import Streamer


class Hybrid(RoundsMixin, PostCopy):
    name = "hybrid"
    summary = "send the heap in rounds while the app runs, then switch as post-copy: only what was written since moves after"
    default_rounds = 1
    left_figure = "missing_at_switch"
    removed_edges = {"source": {St.STATE_SENT: {("send", CHUNK): NO_CHUNK}},
                     "destination": {St.RECEIVING: {("recv", CHUNK): NO_CHUNK}}}

    def serve_after_commit(self, link: Link, demand: Link | None, ledger: ChunkLedger, heap: Heap,
                           progress: Progress, max_bandwidth: float, done: Any) -> Streamer:
        """The stream sends only what the destination does not hold from the rounds."""
        return super().serve_after_commit(link, demand, ledger, heap, progress, max_bandwidth,
                                          ledger.received.copy() if done is None else done)
