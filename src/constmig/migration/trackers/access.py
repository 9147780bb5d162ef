"""The Access Tracker: the app's heap arrays check every access first (enclave/tracker/), missing chunks
are guarded PROT_NONE, and the stream is received by threads of the enclave process. An access that
escapes the checks faults on the guard and waits in the enclave's fault handler for its chunk
(enclave/tracker/untracked.py); the figures count those (`untracked_accesses`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from constmig.enclave.tracker import (
    PROT_NONE,
    PROT_RW,
    AccessTracker,
    guard_heap,
    interpose,
    protect_chunks,
    untrack_app,
)
from constmig.enclave.tracker import restore as restore_module
from constmig.errors import ConstmigError, ProtocolError
from constmig.migration.constants import DEMAND_LABEL
from constmig.migration.ledger import PIECE
from constmig.migration.link import Link
from constmig.migration.receiver import Receiver
from constmig.migration.trackers.base import FirstWrite, Started, Stream, Tracker, receive_stream
from constmig.wire.channel import Arrival, SealedChunk, SecureChannel, verified


class AccessTracking(Tracker):
    name = "access"
    post_copy = True
    write_tracking = "enclave"  # the enclave's own write handler: the heap is under mprotect already
    stale_in_place = False

    access: AccessTracker | None = None
    receiver: Receiver | None = None
    _installer: AccessInstaller | None = None

    def prepare(self, status: Path | None) -> dict[str, Any]:
        figures = super().prepare(status)
        guard_heap(self.heap)  # missing chunks must fault loudly, never read as zeros; costly, so now
        return figures

    def import_wrapper(self, missing: np.ndarray, timeout: float) -> Any:
        """Track the app's arrays until `missing` arrived; the wrapper the import hands them through."""
        def request(chunks: Any, offsets: np.ndarray | None = None) -> None:
            if self.receiver is not None:
                self.receiver.request(chunks, offsets=offsets)

        self.access = AccessTracker(self.heap, missing, request, timeout)
        self.access.adopt_guard()  # the heap was guarded at launch (prepare)
        self.access.serve_untracked()  # escaped accesses wait for their chunk (the figures say if not)
        if self.app_module is not None:
            interpose(self.app_module)
        return self.access.track

    def first_write(self) -> FirstWrite:
        heap = self.heap

        def install(sealed: SealedChunk, chan: SecureChannel) -> None:
            protect_chunks(heap, np.array([sealed.index]), PROT_RW)
            chan.open_chunk(sealed, heap.chunk_view(sealed.index))

        return install

    def install(self, sealed: SealedChunk, chan: SecureChannel) -> None:
        """Through the tracker, which the small state's import made: the chunk counts as arrived."""
        if self.access is None:
            raise ProtocolError("a chunk arrived for the Access Tracker before the small state")
        if self._installer is None:
            self._installer = AccessInstaller(self.access, self.heap.chunk_size)
        self._installer.install(sealed.index, sealed, chan, demand=False)

    def make_missing(self, chunks: np.ndarray) -> None:
        """Guarded again: the install overwrites every byte."""
        protect_chunks(self.heap, chunks, PROT_NONE)

    def release(self, chunks: np.ndarray) -> None:
        super().release(chunks)
        protect_chunks(self.heap, chunks, PROT_RW)

    def receive(self, stream: Stream, started: Started) -> None:
        """Receiver threads here; an access to a missing chunk waits for them (or fails once paused)."""
        access = self.access
        if access is None:
            raise ProtocolError("the Access Tracker has no tracked app to receive for")
        link = stream.link
        try:
            demand = Link(SecureChannel.resume(stream.socks[1], link.chan.ticket().derive(DEMAND_LABEL)),
                          link.machine, stream.timeout)
            self.receiver = receive_stream(link, demand, stream.ledger, AccessInstaller(access, self.heap.chunk_size),
                                           chunk_size=self.heap.chunk_size, tracker=self.name,
                                           t_resume=stream.t_resume, resume_path=stream.resume_path,
                                           secret=stream.secret, epoch=stream.epoch, data_plane=stream.data_plane)
            started(int(stream.ledger.expected.size), self.receiver)
            self.receiver.request(access.outstanding())  # asked for before the receiver existed
        except (ConstmigError, OSError) as e:
            access.fail(f"could not start streaming: {e}")  # accesses to missing chunks fail, not wait
            raise

    def settle(self, app: Any) -> None:
        """Stream complete: the app gets plain arrays back (no tracking cost from now on)."""
        if self.access is not None and self.access.complete and app is not None:
            untrack_app(app)
            if self.app_module is not None:
                restore_module(self.app_module)
            self.access = None

    def arriving(self) -> int | None:
        access = self.access  # settled (set to None) by an ECALL, under the app lock
        if access is None or access.complete:
            return None
        return self.receiver.ledger.count if self.receiver is not None else 0

    def abandon(self, reason: str) -> None:
        if self.access is not None:
            self.access.fail(reason)
            if self.app_module is not None:
                restore_module(self.app_module)
            self.access = None

    def close(self) -> None:
        """Tests build instances in-process: leave the heap readable and the app module as it was."""
        if self.access is not None:
            self.access.fail("closed")
            self.access.unguard()
        if self.app_module is not None:
            restore_module(self.app_module)


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

    def scratch(self, demand: bool) -> np.ndarray:
        return self._chunk_bufs[demand]

    def figures(self) -> dict[str, Any]:
        """The accesses that escaped the checks and were served by the fault handler."""
        return self.tracker.untracked_figures()

    @staticmethod
    def _verify_then_place(sealed: Arrival, chan: SecureChannel, scratch: np.ndarray, dst: memoryview) -> None:
        target = np.frombuffer(dst, dtype=np.uint8)
        if sealed.zero:
            verified(sealed, chan, scratch)
            target[:] = 0
            return
        if sealed.length != target.size:
            raise ProtocolError(f"chunk record carries {sealed.length} bytes where {target.size} were expected")
        plain = verified(sealed, chan, scratch)  # in scratch: the heap chunk sees only verified bytes
        np.copyto(target, np.frombuffer(plain, dtype=np.uint8))  # type: ignore[arg-type]

    def install_piece(self, index: int, piece: int, sealed: Arrival, chan: SecureChannel) -> None:
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

    def install(self, index: int, sealed: Arrival, chan: SecureChannel, *, demand: bool) -> None:
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
