"""ConstMig post-copy: only the small state moves at the stop; the heap streams behind the running app,
and a chunk the app needs first is fetched on demand (Fault Tracker or Access Tracker)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from constmig.errors import ConstmigError, ProtocolError
from constmig.migration.priority import shallow_queue
from constmig.migration.protocol import CHUNK, St
from constmig.migration.strategies.base import Progress, Strategy
from constmig.migration.strategies.stopcopy import data_plane, send_native_batch
from constmig.migration.streamer import Streamer
from constmig.migration.trackers.base import Stream

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link
    from constmig.migration.port import MigratingEnclave as Enclave
    from constmig.migration.strategies.base import Arrived
    from constmig.migration.trackers.base import Tracker


NO_CHUNK = "post-copy sends no chunk before the handoff"


class PostCopy(Strategy):
    name = "constmig"
    summary = "stop, move the small state, resume at once, stream the heap behind the running app"
    connections = 2  # the second carries demanded chunks, so they never queue behind the stream
    needs_tracker = True
    removed_edges = {"source": {St.CONNECTED: {("send", CHUNK): NO_CHUNK, ("send", "round_end"): NO_CHUNK},
                                St.STATE_SENT: {("send", CHUNK): NO_CHUNK}},
                     "destination": {St.CONNECTED: {("recv", CHUNK): NO_CHUNK, ("recv", "round_end"): NO_CHUNK},
                                     St.RECEIVING: {("recv", CHUNK): NO_CHUNK}}}

    def check_instance(self, tracker: Tracker) -> None:
        if not tracker.post_copy:
            raise ProtocolError("this instance was prepared without a tracker, so it cannot take a post-copy "
                                "migration")

    def import_wrapper(self, enclave: Enclave, ledger: ChunkLedger, timeout: float) -> Any:
        return enclave.tracking.import_wrapper(ledger.missing(), timeout)  # all, unless rounds came first

    def serve_after_commit(self, link: Link, demand: Link | None, ledger: ChunkLedger, heap: Heap,
                           progress: Progress, max_bandwidth: float, done: Any) -> Streamer:
        assert demand is not None
        native = data_plane(link) == "native"  # the stream goes through the engine too (docs/native.md step 2b)
        streamer = Streamer(link, demand, ledger, heap, progress, max_bandwidth, done=done,
                            send_batch=send_native_batch if native else None)
        streamer.start()
        return streamer

    def receive_after_commit(self, enclave: Enclave, arrived: Arrived, t_resume: float, timeout: float) -> None:
        """Hand the stream to the tracker (the pager process, or receiver threads here)."""
        socks = arrived.socks
        try:
            shallow_queue(socks[0], socket.SO_RCVBUF, enclave.heap.chunk_size)
            enclave.tracking.receive(Stream(arrived.link, socks, arrived.ledger, arrived.secret, arrived.epoch,
                                            arrived.reconnected, t_resume, timeout, enclave.resume_path,
                                            arrived.state.data_plane),
                                     enclave.stream_incoming)
        except (ConstmigError, OSError):
            # Running already: the app waits on (access: fails on) missing chunks; the source keeps them.
            arrived.link.machine.fail()
