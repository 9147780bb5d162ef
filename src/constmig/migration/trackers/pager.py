"""The Fault Tracker's pager: a trusted process that serves the resumed enclave's page faults.

Why a second process: the enclave process cannot serve its own faults (the faulting thread holds the
GIL, so no thread of that process could run the handler; docs/architecture.md). So an incoming enclave that will
receive a post-copy migration registers its untouched heap with userfaultfd (MISSING) at launch and
hands the userfaultfd to this pager, which it forks at launch (part of the same enclave: it holds the
migration's keys after the handoff, and dies with the enclave through PDEATHSIG; forked, it starts in
milliseconds, so preparing a destination costs no extra interpreter start).

After COMMIT the enclave process gives the pager both migration channels (their sockets over
SCM_RIGHTS, their keys and positions as tickets) and goes back to running the app. The pager then:
- receives every chunk, verifies and decrypts it into private scratch memory, and installs it with
  one UFFDIO_COPY (so no unverified byte is ever visible to the app);
- reads fault events, turns each into a demand request (chunks nobody migrates, because they were
  never written at the source, are filled with zero pages locally);
- sends DONE when the ledger is complete, unregisters the heap (from then on it is plain memory), and
  exits.
The enclave process keeps its own copy of the userfaultfd until then: if the pager dies, a missing
page makes the app wait instead of silently reading zeros.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from constmig.enclave.lifeline import die_with_parent
from constmig.errors import ConstmigError, EnclaveError, ProtocolError
from constmig.kernel.uffd import Userfaultfd, buffer_address
from constmig.migration.ledger import PIECE, ChunkLedger, chunks_from_wire
from constmig.migration.link import Link
from constmig.migration.priority import boost_this_thread, quick_gil_handoff
from constmig.migration.protocol import Machine, St
from constmig.migration.receiver import Receiver
from constmig.migration.resume import ResumeSecret
from constmig.migration.trackers.base import receive_stream
from constmig.wire import control
from constmig.wire.channel import Arrival, ChannelTicket, SecureChannel, verified
from constmig.wire.framing import FramedSocket

START_TIMEOUT = 30.0
FIRST_COPY = 64 << 10  # bytes around a fault installed before the rest of its chunk


class UffdInstaller:
    """Verify into scratch, then one UFFDIO_COPY: the app sees a chunk (or a demanded piece of one) whole
    and verified, or not at all."""

    pieces_visible = True  # a demanded chunk's first piece wakes the access waiting in it

    def __init__(self, uffd: Userfaultfd, base: int, chunk_size: int, status: Path | None) -> None:
        self.uffd, self.base, self.chunk_size, self.status = uffd, base, chunk_size, status
        # Scratch for verified plaintext, touched now: a first touch costs ~3 ms/MiB on these VMs, and the
        # first fault after the resume must not pay it. The two receive threads install at once (whole
        # chunks come on the demand channel too), so each has its own buffers.
        self._chunk_bufs = {lane: np.ones(chunk_size, dtype=np.uint8) for lane in (False, True)}
        self._piece_buf = np.ones(PIECE, dtype=np.uint8)  # only the demand thread installs pieces
        self.fault_at: dict[int, int] = {}  # chunk -> first faulting address: installed first
        self._pieces_in: dict[int, set[int]] = {}  # chunk -> pieces in place (the rest still missing)

    def note_faults(self, chunks: np.ndarray, addrs: np.ndarray) -> None:
        for c, a in zip(chunks.tolist(), addrs.tolist(), strict=True):
            self.fault_at.setdefault(c, a)

    def scratch(self, demand: bool) -> np.ndarray:
        return self._chunk_bufs[demand]

    def figures(self) -> dict[str, Any]:
        return {}  # the pager adds its own (zero_filled_chunks) when it finishes

    def install_piece(self, index: int, piece: int, sealed: Arrival, chan: SecureChannel) -> None:
        dst = self.base + index * self.chunk_size + piece * PIECE
        plain = verified(sealed, chan, self._piece_buf)  # None: a zero piece
        self.fault_at.pop(index, None)
        have = self._pieces_in.setdefault(index, set())
        if piece in have:  # in place since before a reconnect (same bytes, verified then)
            return
        if plain is None:
            self.uffd.zeropage(dst, PIECE)
        else:
            self.uffd.copy(dst, buffer_address(plain), PIECE)
        have.add(piece)

    def chunk_done(self, index: int) -> None:
        self._pieces_in.pop(index, None)

    def chunk_failed(self, index: int) -> None:
        pass  # pieces already in place were verified on their own (and remembered); the rest stays missing

    def install(self, index: int, sealed: Arrival, chan: SecureChannel, *, demand: bool) -> None:
        if sealed.length != self.chunk_size:
            raise ProtocolError(f"chunk {index} is {sealed.length} bytes, not the heap's {self.chunk_size}")
        dst = self.base + index * self.chunk_size
        plain = verified(sealed, chan, self._chunk_bufs[demand])  # verified in scratch (or already, natively)
        if plain is None:  # the kernel's zero page, no copy (pieces in place from before a reconnect stay)
            self._pieces_in.pop(index, None)
            self.fault_at.pop(index, None)
            self.uffd.zeropage(dst, self.chunk_size)
            return
        addr = buffer_address(plain)
        partial = self._pieces_in.pop(index, None)
        if partial:  # some pieces arrived before a reconnect: copy only the others (a copy may not overwrite)
            for p in range(self.chunk_size // PIECE):
                if p not in partial:
                    self.uffd.copy(dst + p * PIECE, addr + p * PIECE, PIECE)
            self.fault_at.pop(index, None)
            return
        hot = self.fault_at.pop(index, None)
        if hot is None:
            self.uffd.copy(dst, addr, self.chunk_size)
            return
        # Someone waits in this chunk: install the pages around the fault first and wake it, then the rest
        # (a cold 1 MiB copy costs milliseconds on a fresh VM; its first FIRST_COPY bytes a fraction).
        off = min(max(0, (hot - dst) // FIRST_COPY * FIRST_COPY), self.chunk_size - FIRST_COPY)
        self.uffd.copy(dst + off, addr + off, FIRST_COPY)
        if off:
            self.uffd.copy(dst, addr, off)
        if off + FIRST_COPY < self.chunk_size:
            self.uffd.copy(dst + off + FIRST_COPY, addr + off + FIRST_COPY, self.chunk_size - off - FIRST_COPY)

    def fail(self, reason: str) -> None:
        write_status(self.status, {"state": "paused", "reason": reason})

    def resumed(self) -> None:
        write_status(self.status, {"state": "streaming"})


def write_status(path: Path | None, info: dict[str, Any]) -> None:
    """The pager's state for the (untrusted) agent to read: it says only whether streaming is stuck."""
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps({**info, "time": time.time()}))
        os.replace(tmp, path)


class Pager:
    """The pager's state: the userfaultfd, the heap geometry, and (after COMMIT) the receiver."""

    def __init__(self, uffd: Userfaultfd, base: int, size: int, chunk_size: int, status: Path | None) -> None:
        self.uffd, self.base, self.size, self.chunk_size, self.status = uffd, base, size, chunk_size, status
        self.n_chunks = size // chunk_size
        self.receiver: Receiver | None = None
        self.ledger: ChunkLedger | None = None
        self.installer = UffdInstaller(uffd, base, chunk_size, status)  # buffers warm before any fault
        self._early: list[tuple[np.ndarray, np.ndarray, float]] = []  # faults before the stream started (should not happen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.zero_filled = 0
        self._faults = threading.Thread(target=self._serve_faults, name="faults", daemon=True)
        self._faults.start()

    def _serve_faults(self) -> None:
        boost_this_thread()
        try:
            while not self._stop.is_set():
                if not self.uffd.wait(0.2):
                    continue
                addrs = self.uffd.read_faults(128)
                if not addrs:
                    continue
                t = time.perf_counter()
                at = np.asarray(addrs, dtype=np.int64)
                chunks = (at - self.base) // self.chunk_size
                with self._lock:
                    if self.receiver is None:
                        self._early.append((chunks, at, t))
                        continue
                self._on_faults(chunks, at, t)
        except ConstmigError as e:
            if not self._stop.is_set():
                print(f"constmig pager: fault service stopped: {e}", file=sys.stderr, flush=True)
                if self.receiver is not None:
                    self.receiver.fail(f"pager fault service failed: {e}")

    def _on_faults(self, chunks: np.ndarray, addrs: np.ndarray, t: float) -> None:
        assert self.receiver is not None and self.ledger is not None
        ok = (chunks >= 0) & (chunks < self.n_chunks)
        chunks, addrs = chunks[ok], addrs[ok]
        self.installer.note_faults(chunks, addrs)
        ledger = self.ledger
        expected = ledger.expected_mask[chunks]
        for c in np.unique(chunks[~expected]).tolist():  # never written at the source: zero pages, no round trip
            self.uffd.zeropage(self.base + c * self.chunk_size, self.chunk_size)
            self.zero_filled += 1
        arrived = expected & ledger.received[chunks]
        for c in np.unique(chunks[arrived]).tolist():  # installed meanwhile: the copy woke it; be sure
            self.uffd.wake(self.base + c * self.chunk_size, self.chunk_size)
        wait = expected & ~arrived
        self.receiver.request(chunks[wait], t, addrs[wait] - self.base - chunks[wait] * self.chunk_size)

    def start_stream(self, req: control.PagerStream, fds: list[int]) -> None:
        if self.receiver is not None:
            raise EnclaveError("the pager is already streaming")
        if len(fds) != 2:
            raise EnclaveError(f"stream needs two connection descriptors, got {len(fds)}")
        main_t = ChannelTicket.from_wire(req.main)
        demand_t = ChannelTicket.from_wire(req.demand)
        ledger = ChunkLedger.from_wire(main_t.migration_id, self.n_chunks, req.expected)
        ledger.hold(chunks_from_wire(req.held, self.n_chunks), req.held_tags)
        timeout = req.timeout
        machine = Machine("destination", St.RUNNING)
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.setblocking(True)
            s.settimeout(timeout)
        main = Link(SecureChannel.resume(socks[0], main_t), machine, timeout)
        demand = Link(SecureChannel.resume(socks[1], demand_t), machine, timeout)
        write_status(self.status, {"state": "streaming"})
        receiver = receive_stream(main, demand, ledger, self.installer, chunk_size=self.chunk_size, tracker="fault",
                                  t_resume=req.t_resume, resume_path=Path(req.resume_path) if req.resume_path else None,
                                  secret=ResumeSecret.from_wire(req.resume), epoch=req.epoch,
                                  data_plane=req.data_plane)
        with self._lock:  # faults before this waited in _early
            self.ledger, self.receiver = ledger, receiver
            early, self._early = self._early, []
        for chunks, addrs, t in early:
            self._on_faults(chunks, addrs, t)

    def progress(self) -> control.HeapProgress:
        """How much of the heap is in, from the migration's ledger: the enclave asks before it exports
        the heap whole (migrate out, checkpoint), and refuses while chunks are missing."""
        ledger = self.ledger
        if ledger is None:
            return control.HeapProgress(received=0, expected=None, complete=False)
        return control.HeapProgress(received=int(ledger.count), expected=int(ledger.expected.size),
                                    complete=ledger.complete)

    def finish(self) -> dict[str, Any]:
        """Wait for the stream to complete (across reconnects); then unregister the heap."""
        assert self.receiver is not None
        self.receiver.done.wait()  # a paused stream waits here for a reconnect (the pager dies with the enclave)
        self.receiver.join()
        # The resume socket stays open: if DONE is lost on its way, the source reconnects to fetch it.
        if self.receiver.error is None or self.receiver.complete:
            self._stop.set()
            self._faults.join(timeout=5.0)
            # Every migrated chunk is in; what is still missing was never written: plain memory from now on.
            self.uffd.unregister(self.base, self.size)
            stats = {**self.receiver.stats, "zero_filled_chunks": self.zero_filled}
            write_status(self.status, {"state": "done", **stats})
            return {"ok": True, "stats": stats}
        return {"ok": False, "error": self.receiver.error}  # the installer wrote "paused" when it failed


def serve(sock: socket.socket, status: Path | None) -> int:
    """The pager's life: adopt the userfaultfd, serve faults, stream after COMMIT, report, exit."""
    die_with_parent()
    # The demand path (fault thread, demand receiver) must not wait the default 5 ms for the GIL
    # while the background receiver holds it.
    quick_gil_handoff()
    fs = FramedSocket(sock)
    try:
        frame, fds = fs.recv()
        init = control.decode(frame, control.PagerRequest)
        if not isinstance(init, control.PagerInit) or len(fds) != 1:
            raise EnclaveError("pager expected init with one userfaultfd")
        uffd = Userfaultfd.from_fd(fds[0])
        pager = Pager(uffd, init.address, init.size, init.chunk_size, status)
        fs.send(control.ok(control.PagerReady(pid=os.getpid())))
        frame, fds = fs.recv()  # blocks until COMMIT (or EOF: the migration never happened)
        stream = control.decode(frame, control.PagerRequest)
        if not isinstance(stream, control.PagerStream):
            raise EnclaveError(f"pager got {control.op(stream)!r}, expected stream")
        pager.start_stream(stream, fds)
        fs.send(control.ok())
        threading.Thread(target=pager.finish, name="finish", daemon=True).start()
        # Stay until the enclave goes away, answering how much of the heap is in; also to answer a
        # reconnect that fetches a lost DONE, and (were the stream ever to end unfinished) to keep
        # missing pages waiting rather than reading zeros.
        while True:
            try:
                frame, fds = fs.recv()
            except ConstmigError:
                return 0
            for fd in fds:
                os.close(fd)
            try:
                asked = control.decode(frame, control.PagerRequest)
            except control.BadRequest as e:
                fs.send(control.refused(str(e)))
                continue
            if isinstance(asked, control.PagerProgress):
                fs.send(control.ok(pager.progress()))
            else:
                fs.send(control.refused(f"the pager takes no {control.op(asked)!r} while streaming"))
    except ConstmigError as e:
        with contextlib.suppress(ConstmigError, OSError):
            fs.send(control.refused(str(e)))
        return 1


class PagerHandle:
    """The enclave process's side: register the heap, start the pager, hand it the stream."""

    def __init__(self, pid: int, fs: FramedSocket, uffd: Userfaultfd, status: Path | None) -> None:
        self.pid, self.fs, self.uffd, self.status = pid, fs, uffd, status
        self.ready = False
        self.expected: int | None = None  # chunks of the stream once it was handed over
        self._received = 0  # as last reported
        self._complete = False
        self._ask = threading.Lock()  # status requests from several connections ask over one socket

    @classmethod
    def start(cls, heap: Any, status: Path | None) -> PagerHandle:
        """Fork the pager (it starts in milliseconds with every module already loaded), then register the
        heap and hand it the userfaultfd. Call before the process starts threads or touches the heap."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the pager: never returns into the enclave's code
            code = 1
            try:
                mine.close()
                code = serve(theirs, status)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        fs = FramedSocket(mine)
        handle = None
        try:
            uffd = Userfaultfd.open()
            handle = cls(pid, fs, uffd, status)
            uffd.register_missing(heap.address, heap.size)
            fs.send(control.PagerInit(address=heap.address, size=heap.size, chunk_size=heap.chunk_size),
                    fds=[uffd.fileno()])
            handle.wait_ready()
        except BaseException:
            if handle is not None:
                handle.close()
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
        return handle

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Raise unless the pager is up (called before the commit point: a dead pager aborts, not strands)."""
        if self.ready:
            return
        self.fs.sock.settimeout(timeout)
        try:
            reply = control.reply(self.fs.recv()[0])
        except ConstmigError as e:
            raise EnclaveError(f"pager did not start: {e}") from None
        finally:
            self.fs.sock.settimeout(None)
        if not reply.ok:
            raise EnclaveError(f"pager did not start: {reply.error}")
        self.ready = True

    def stream(self, main: ChannelTicket, demand: ChannelTicket, fds: list[int], expected: bytes,
               t_resume: float, timeout: float, secret: ResumeSecret, resume_path: Path | None,
               epoch: int = 0, held: tuple[bytes, bytes] = (b"", b""), data_plane: str = "python") -> None:
        """Hand the stream over; `epoch` is the last reconnect epoch used (one that committed the migration);
        `held` the chunks in place from pre-copy rounds and their tags (`ChunkLedger.held_wire`)."""
        self.wait_ready()
        with self._ask:
            self.fs.send(control.PagerStream(
                main=main.to_wire(), demand=demand.to_wire(), expected=expected, held=held[0], held_tags=held[1],
                t_resume=t_resume, timeout=timeout, resume=secret.to_wire(),
                resume_path=str(resume_path) if resume_path else "", epoch=epoch, data_plane=data_plane), fds=fds)
            reply = control.reply(self.fs.recv()[0])
            if not reply.ok:
                raise EnclaveError(f"pager refused the stream: {reply.error}")
            self.expected = len(expected) // 8

    def progress(self) -> int | None:
        """Chunks in so far while the heap is still arriving; None once every chunk is in.

        Asked of the pager over the enclave's own socket (never read from the status file the host can
        write). A stream never handed over, or a pager that is gone, leaves the heap incomplete for good.
        """
        if self._complete:
            return None
        if self.expected is None:
            return 0
        try:
            with self._ask:
                reply = control.reply(self.fs.exchange(control.PagerProgress()))
                progress = control.result(reply.result, control.HeapProgress) if reply.ok else None
        except (ConstmigError, OSError):
            return self._received
        if progress is not None:
            self._received = progress.received
            self._complete = progress.complete
        return None if self._complete else self._received

    def close(self) -> None:
        self.fs.close()  # the pager sees EOF and exits (or is killed after a grace period)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.uffd.close()
