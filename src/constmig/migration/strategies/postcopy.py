"""ConstMig post-copy: only the small state moves at the stop; the heap streams behind the running app,
and a chunk the app needs first is fetched on demand (Fault Tracker or Access Tracker)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import numpy as np

from constmig.enclave.touches import TouchRecorder
from constmig.errors import ConstmigError, ProtocolError
from constmig.migration.constants import DEMAND_LABEL
from constmig.migration.ledger import PIECE
from constmig.migration.link import Link
from constmig.migration.priority import shallow_queue
from constmig.migration.protocol import CHUNK, St
from constmig.migration.receiver import Receiver
from constmig.migration.resume_server import ResumeServer
from constmig.migration.strategies.base import Before, Progress, Strategy
from constmig.migration.streamer import Streamer
from constmig.wire.channel import SealedChunk, SecureChannel

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.destination import Arrived
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.port import MigratingEnclave as Enclave
    from constmig.wire import control


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

    def check_instance(self, tracker: str) -> None:
        if tracker not in ("fault", "access"):
            raise ProtocolError("this instance was prepared without a tracker, so it cannot take a post-copy "
                                "migration")

    def import_wrapper(self, enclave: Enclave, ledger: ChunkLedger, timeout: float) -> Any:
        if enclave.tracker == "access":
            return enclave.start_access_tracking(ledger.missing(), timeout)  # all, unless rounds came first
        return None

    def watch(self, enclave: Enclave) -> Before:
        return Touches(enclave.heap)

    def before_stop(self, link: Link, enclave: Enclave, progress: Progress, req: control.MigrateOut,
                    watching: Before) -> Before:
        if isinstance(watching, Touches):
            watching.end_watch()  # now, while the app runs: opening the heap at the stop would be downtime
        return watching

    def serve_after_commit(self, link: Link, demand: Link | None, ledger: ChunkLedger, heap: Heap,
                           progress: Progress, max_bandwidth: float, done: Any, hot: np.ndarray) -> Streamer:
        assert demand is not None
        streamer = Streamer(link, demand, ledger, heap, progress, max_bandwidth, done=done, hot=hot)
        streamer.start()
        return streamer

    def receive_after_commit(self, enclave: Enclave, arrived: Arrived, t_resume: float, timeout: float) -> None:
        """Hand the stream to the tracker: the pager process (fault) or receiver threads here (access)."""
        link, socks, ledger = arrived.link, arrived.socks, arrived.ledger
        try:
            shallow_queue(socks[0], socket.SO_RCVBUF, enclave.heap.chunk_size)
            if enclave.tracker == "fault":
                assert enclave.pager is not None
                enclave.stream_incoming(int(ledger.expected.size), None)  # the pager receives it
                main = link.chan.detach()
                try:
                    enclave.pager.stream(main, main.derive(DEMAND_LABEL), [s.fileno() for s in socks],
                                         ledger.to_wire(), t_resume, timeout, arrived.secret, enclave.resume_path,
                                         arrived.epoch, held=ledger.held_wire())
                finally:
                    if arrived.reconnected:  # the pager holds its own copies; a reconnect's are ours to close
                        for s in socks:
                            s.close()
                return
            assert enclave.access is not None
            demand = Link(SecureChannel.resume(socks[1], link.chan.ticket().derive(DEMAND_LABEL)), link.machine,
                          timeout)
            receiver = Receiver(link, demand, ledger, AccessInstaller(enclave.access, enclave.heap.chunk_size),
                                chunk_size=enclave.heap.chunk_size, tracker="access", t_resume=t_resume)
            enclave.stream_incoming(int(ledger.expected.size), receiver)
            receiver.start()
            receiver.request(enclave.access.outstanding())  # asked for before the receiver existed
            if enclave.resume_path is not None:
                ResumeServer(enclave.resume_path, arrived.secret, ledger, t_resume, receiver,
                             enclave.heap.chunk_size, epoch=arrived.epoch)
        except (ConstmigError, OSError) as e:
            # Running already: the app waits on (access: fails on) missing chunks; the source keeps them.
            link.machine.fail()
            if enclave.access is not None:
                enclave.access.fail(f"could not start streaming: {e}")


class Touches(Before):
    """Source, from before the handshake until just before the stop: the chunks the app read or wrote
    meanwhile (enclave/touches.py), streamed first. Where the enclave's fault handler is missing, nothing
    is watched and the stream goes in heap order."""

    def __init__(self, heap: Heap) -> None:
        self.figures: dict[str, Any] = {}
        self._touched = np.zeros(0, dtype=np.int64)
        self._hot = self._touched
        self._recorder: TouchRecorder | None = TouchRecorder(heap)
        try:
            self._recorder.arm()
        except ConstmigError as e:
            self._recorder = None
            self.figures = {"touches": f"not watched: {e}"}

    def end_watch(self) -> None:
        """Just before the stop (the app still runs): what it touched, and the heap plain again."""
        if self._recorder is not None:
            self._touched = self._recorder.take()
            self._recorder = None

    def settle(self, ledger: ChunkLedger) -> np.ndarray:
        self.end_watch()  # normally ended already
        self._hot = self._touched[ledger.expected_mask[self._touched]]
        if "touches" not in self.figures:
            self.figures = {"touched_chunks": int(self._hot.size)}
        return super().settle(ledger)

    def hot(self) -> np.ndarray:
        return self._hot

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None


class AccessInstaller:
    """Access Tracker installs: verify into scratch, copy into the heap chunk (PROT_NONE until
    begin_install), and let the app see it when finish_install flips its bit. Not decrypted in place:
    GCM writes plaintext before it knows the tag, and the chunk is writable heap memory meanwhile."""

    pieces_visible = False  # the tracker's bitmap is per chunk: a demanded chunk counts when whole

    def __init__(self, tracker: Any, chunk_size: int) -> None:
        self.tracker = tracker
        self._open: dict[int, memoryview] = {}  # chunks arriving piece by piece
        # Scratch per receive thread (both install whole chunks at once; only the demand thread installs
        # pieces). Touched now, so the first install does not pay for first touches.
        self._chunk_bufs = {lane: np.ones(chunk_size, dtype=np.uint8) for lane in (False, True)}
        self._piece_buf = np.ones(min(PIECE, chunk_size), dtype=np.uint8)

    @staticmethod
    def _verify_then_place(sealed: SealedChunk, chan: SecureChannel, scratch: np.ndarray, dst: memoryview) -> None:
        target = np.frombuffer(dst, dtype=np.uint8)
        if sealed.zero:
            chan.open_zero(sealed)
            target[:] = 0
            return
        if sealed.length != target.size:
            raise ProtocolError(f"chunk record carries {sealed.length} bytes where {target.size} were expected")
        chan.open_chunk(sealed, memoryview(scratch[:sealed.length]))
        np.copyto(target, scratch[:sealed.length])

    def install_piece(self, index: int, piece: int, sealed: SealedChunk, chan: SecureChannel) -> None:
        view = self._open.get(index)
        if view is None:
            view = self._open[index] = self.tracker.begin_install(index)
        self._verify_then_place(sealed, chan, self._piece_buf, view[piece * PIECE:(piece + 1) * PIECE])

    def chunk_done(self, index: int) -> None:
        del self._open[index]
        self.tracker.finish_install(index)

    def chunk_failed(self, index: int) -> None:
        if self._open.pop(index, None) is not None:
            self.tracker.abort_install(index)

    def install(self, index: int, sealed: SealedChunk, chan: SecureChannel, *, demand: bool) -> None:
        view = self.tracker.begin_install(index)
        if sealed.length != len(view):
            self.tracker.abort_install(index)
            raise ProtocolError(f"chunk {index} is {sealed.length} bytes, not {len(view)}")
        try:
            self._verify_then_place(sealed, chan, self._chunk_bufs[demand], view)
        except BaseException:
            self.tracker.abort_install(index)
            raise
        self.tracker.finish_install(index)

    def fail(self, reason: str) -> None:
        self.tracker.pause(reason)

    def resumed(self) -> None:
        self.tracker.unpause()
