"""The destination enclave's side of a migration (runs inside the empty, incoming enclave process).

Attest the source, check that the migration's parameters match this instance, take the small state,
verify every chunk before it counts, answer READY with a digest of what arrived, and resume only on
COMMIT, or on a keyed reconnect from the source, which stands for a COMMIT lost with the link
(resume_server.CommitWaiter). Any failure before that wipes this instance, whatever raised it: the
source still runs (after READY, the source learns it from an authenticated ABORT, sent on the link or
as the answer to its reconnect).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from constmig.enclave.lifecycle import Life
from constmig.enclave.persist import Lineage
from constmig.enclave.state import import_app_state
from constmig.errors import ChannelClosed, ConstmigError, MigrationError, PeerAborted, ProtocolError
from constmig.migration import messages as m
from constmig.migration.ledger import PIECE, ChunkLedger
from constmig.migration.link import Link
from constmig.migration.priority import shallow_queue
from constmig.migration.protocol import HAVE, RECONNECT, Machine, St
from constmig.migration.receiver import Receiver
from constmig.migration.resume import ResumeSecret, send_have
from constmig.migration.resume_server import CommitWaiter, ResumeServer
from constmig.migration.source import CONNECTIONS, DEMAND_LABEL, STRATEGIES
from constmig.units import wait_seconds
from constmig.wire.channel import RecvTimeout, SealedChunk, SecureChannel
from constmig.wire.handshake import run_responder

if TYPE_CHECKING:
    from constmig.enclave.app import EnclaveApp
    from constmig.enclave.runtime import Enclave

POLL_S = 0.25  # how often the wait for COMMIT looks for a reconnect while the link is quiet


def check_params(enclave: Enclave, params: dict[str, Any]) -> None:
    """Refuse a migration this instance was not launched for (another app, heap or chunk size)."""
    want = {"app": enclave.app_name, "heap_size": enclave.heap.size, "chunk_size": enclave.heap.chunk_size}
    for key, value in want.items():
        if params.get(key) != value:
            raise ProtocolError(f"source wants {key}={params.get(key)!r} but this instance has {value!r}")
    strategy = params.get("strategy")
    if strategy not in STRATEGIES:
        raise ProtocolError(f"unknown strategy {strategy!r}")
    if strategy == "constmig" and enclave.tracker not in ("fault", "access"):
        raise ProtocolError("this instance was prepared without a tracker, so it cannot take a post-copy migration")
    if strategy == "stopcopy" and enclave.tracker != "none":
        raise ProtocolError(f"this instance was prepared for post-copy (its heap is guarded by the {enclave.tracker} "
                            "tracker), so it cannot take a stop-and-copy migration")


@dataclass
class Arrived:
    """What a destination holds once it sent READY: everything but the permission to run."""

    link: Link
    socks: list[socket.socket]
    strategy: str
    state: m.StateMsg
    ledger: ChunkLedger
    app: EnclaveApp
    secret: ResumeSecret
    waiter: CommitWaiter | None
    reconnected: bool = False  # a keyed reconnect stood for the COMMIT

    @property
    def epoch(self) -> int:
        """The last reconnect epoch used (by the waiter): later reconnects must go higher."""
        return self.waiter.epoch if self.waiter is not None else 0


def run(enclave: Enclave, socks: list[socket.socket], req: dict[str, Any],
        progress: Callable[[dict], None]) -> dict:
    enclave.life.require(Life.INCOMING)
    link: Link | None = None  # exists once the handshake is done; only then can we tell the source
    waiter: CommitWaiter | None = None
    try:
        timeout = wait_seconds(req.get("timeout", 120.0), "timeout")
        commit_wait = wait_seconds(req.get("commit_wait") or 0.0, "commit_wait", zero=True)
        for sock in socks:
            sock.settimeout(timeout)  # bounds a send to a peer that stopped reading; receives poll
        chan = SecureChannel(socks[0], None)
        hs = run_responder(chan, enclave.backend, enclave.identity, enclave.policy,
                           check_params=lambda params: check_params(enclave, params), timeout=timeout)
        link = Link(chan, Machine("destination"), timeout)
        arrived = _receive(enclave, link, socks, hs.params["strategy"], hs.migration_id, timeout, progress)
        waiter = arrived.waiter
        link.send(m.Ready(arrived.ledger.digest()))
        _await_commit(arrived, max(timeout, commit_wait))
    except Exception as e:  # noqa: BLE001 - whatever failed, before COMMIT this instance must not keep the data
        reason = str(e) if isinstance(e, ConstmigError | OSError) else f"internal error: {type(e).__name__}: {e}"
        _give_up(enclave, link, waiter, reason, told=isinstance(e, PeerAborted))
        raise MigrationError(f"incoming migration failed before commit ({reason}); this instance was wiped"
                             + ("; reconnects from the source are answered with ABORT" if waiter else "")) from None
    return _resume(enclave, arrived, req, timeout)


def _receive(enclave: Enclave, link: Link, socks: list[socket.socket], strategy: str, migration_id: bytes,
             timeout: float, progress: Callable[[dict], None]) -> Arrived:
    """From the small state to just before READY: the heap (stop-and-copy) or its list (post-copy)."""
    heap = enclave.heap
    if len(socks) != CONNECTIONS[strategy]:
        raise ProtocolError(f"{strategy} needs {CONNECTIONS[strategy]} connections, got {len(socks)}")
    state = link.expect(m.StateMsg)
    if state.heap_size != heap.size or state.chunk_size != heap.chunk_size:
        raise ProtocolError("small state describes a different heap layout")
    if state.strategy != strategy:
        raise ProtocolError(f"small state says {state.strategy!r} but the handshake agreed on {strategy!r}")
    ledger = ChunkLedger.from_wire(migration_id, heap.n_chunks, state.chunks)

    wrap = None
    if strategy == "constmig" and enclave.tracker == "access":
        wrap = enclave.start_access_tracking(ledger.expected, timeout)
    app = import_app_state(enclave.app_cls, heap, state.app_state, wrap=wrap)
    total = int(ledger.expected.size) * heap.chunk_size
    last = 0.0
    while True:
        msg = link.recv()
        if not isinstance(msg, SealedChunk):
            break
        if strategy != "stopcopy":
            raise ProtocolError("post-copy sends no chunk before the handoff")
        ledger.check_acceptable(msg.index)
        # The app is not running and this instance is wiped on any failure, so decrypting straight into
        # place is safe here; the tag is checked before the chunk counts. The heap is fresh (zeros), so a
        # zero chunk needs no write.
        if msg.zero and msg.length == heap.chunk_size:
            link.chan.open_zero(msg)
        else:
            link.chan.open_chunk(msg, heap.chunk_view(msg.index))
        ledger.accept(msg.index, msg.tag)
        now = time.monotonic()
        if now - last > 0.1:
            last = now
            progress({"phase": "copy", "done": ledger.count * heap.chunk_size, "total": total})
    if not isinstance(msg, m.HeapEnd):
        raise ProtocolError(f"unexpected {type(msg).__name__} while receiving the heap")
    if msg.count != ledger.count or (strategy == "stopcopy" and not ledger.complete):
        raise ProtocolError(f"heap stream ended after {ledger.count} of {ledger.expected.size} chunks (truncated)")
    secret = ResumeSecret.from_ticket(link.chan.ticket())
    # Listening before READY goes out: from then on the source may be committed and reconnect.
    waiter = CommitWaiter(enclave.resume_path, secret, CONNECTIONS[strategy]) if enclave.resume_path else None
    return Arrived(link, socks, strategy, state, ledger, app, secret, waiter)


def _await_commit(arrived: Arrived, wait: float) -> None:
    """Until COMMIT on the link, or a keyed reconnect (the source committed and lost the link): either
    commits. A link that is cut is waited out, not given up on; the source aborting, a forged record,
    or `wait` seconds with neither, gives up."""
    link, waiter = arrived.link, arrived.waiter
    io_timeout = link.timeout
    try:
        _wait_for_commit(arrived, link, waiter, time.monotonic() + wait, wait)
    finally:
        arrived.link.timeout = io_timeout


def _wait_for_commit(arrived: Arrived, link: Link, waiter: CommitWaiter | None, end: float, wait: float) -> None:
    link_error: str | None = None
    while True:
        if waiter is not None and waiter.arrived.is_set():
            if link.machine.state is not St.READY_SENT:  # the source broke the rules: the waiter answers ABORT
                raise ProtocolError(f"a reconnect arrived in state {link.machine.state.value}")
            taken = waiter.take()
            if taken is not None:
                link.machine.received(RECONNECT)
                waiter.decide("commit")
                _switch_to(arrived, *taken)
                return
        left = end - time.monotonic()
        if left <= 0:
            raise MigrationError(f"no COMMIT within {wait:g} s after READY" +
                                 (f" (the link broke: {link_error})" if link_error else ""))
        if link_error is not None:
            if waiter is None:
                raise MigrationError(f"the link broke after READY: {link_error}")
            waiter.arrived.wait(min(left, POLL_S))
            continue
        link.timeout = min(left, POLL_S)
        try:
            link.expect(m.Commit)
        except RecvTimeout:
            continue
        except (ChannelClosed, OSError) as e:  # cut: the source may be committed and will reconnect
            link_error = str(e)
            continue
        # Anything else (a forged or garbled record, the source's ABORT) gives up now: ABORT goes back on
        # the link, which still carries our records, and to any reconnect.
        if waiter is not None:
            waiter.decide("commit")
        return


def _switch_to(arrived: Arrived, chan: SecureChannel, socks: list[socket.socket]) -> None:
    """Carry on over the reconnect's connections; the old ones are dead to the source."""
    for s in arrived.socks:
        s.close()
    assert arrived.waiter is not None
    arrived.link = Link(chan, arrived.link.machine, arrived.link.timeout)
    arrived.socks = socks
    arrived.reconnected = True


def _give_up(enclave: Enclave, link: Link | None, waiter: CommitWaiter | None, reason: str, told: bool) -> None:
    """Before COMMIT: tell the source (on the link if it still works, and to every later reconnect),
    then wipe. The waiter stays as the process's tombstone."""
    if link is not None and not told:
        link.abort(reason)
    if waiter is not None:
        waiter.decide("abort", reason)
        enclave.tombstone = waiter
    enclave.abandon_incoming()
    if enclave.persist is not None:
        enclave.persist.forget()
    enclave.heap.wipe()
    enclave.app = None
    enclave.life.move(Life.INCOMING, Life.DESTROYED)


def _resume(enclave: Enclave, arrived: Arrived, req: dict[str, Any], timeout: float) -> dict:
    """COMMIT (or its stand-in) received: run the app here (downtime ends), then finish the move."""
    state, ledger, link = arrived.state, arrived.ledger, arrived.link
    if arrived.waiter is not None:
        arrived.waiter.close()  # the running instance's ResumeServer takes this socket over
    if state.lineage and enclave.persist is not None:
        # Sealed checkpoints and their counter continue here; bound only now, so a destination killed
        # before COMMIT leaves no lineage behind that could restore while the source runs on.
        try:
            enclave.persist.adopt(Lineage(state.lineage, state.lineage_key, state.lineage_version))
        except (ConstmigError, OSError) as e:  # the app must run now; only its checkpoints are affected
            enclave.figures["lineage_error"] = str(e)
    enclave.app = arrived.app
    enclave.life.move(Life.INCOMING, Life.RUNNING)
    t_resume = time.time()
    if arrived.strategy == "stopcopy" and enclave.resume_path is not None:
        ResumeServer(enclave.resume_path, arrived.secret, ledger, t_resume, None, enclave.heap.chunk_size,
                     epoch=arrived.epoch)
    try:
        if arrived.reconnected:  # its first record says what arrived, and that we run (for RESUMED)
            link.machine.sent(HAVE)
            send_have(link.chan, ledger, t_resume)
        else:
            link.send(m.Resumed(t_resume))
        if arrived.strategy == "stopcopy":
            link.send(m.Done(ledger.count, ledger.digest(), {"tracker": "none"}))
    except (ConstmigError, OSError):
        pass  # the app runs here now; the source reconnects to learn of completion
    out = {"resume_time": t_resume, "downtime_ms": (t_resume - state.stop_time) * 1e3,
           "populate_s": enclave.figures.get("populate_s"), "strategy": arrived.strategy,
           "tracker": enclave.tracker, "chunks": int(ledger.expected.size),
           **({"committed_by": "reconnect"} if arrived.reconnected else {})}
    if arrived.strategy == "constmig":
        enclave.incoming_chunks = int(ledger.expected.size)
        shallow_queue(arrived.socks[0], socket.SO_RCVBUF, enclave.heap.chunk_size)
        _start_stream(enclave, arrived, t_resume, timeout)
    return out


def _start_stream(enclave: Enclave, arrived: Arrived, t_resume: float, timeout: float) -> None:
    """Hand the stream to the tracker: the pager process (fault) or receiver threads here (access)."""
    link, socks, ledger = arrived.link, arrived.socks, arrived.ledger
    try:
        if enclave.tracker == "fault":
            assert enclave.pager is not None
            main = link.chan.detach()
            try:
                enclave.pager.stream(main, main.derive(DEMAND_LABEL), [s.fileno() for s in socks],
                                     ledger.to_wire(), t_resume, timeout, arrived.secret, enclave.resume_path,
                                     arrived.epoch)
            finally:
                if arrived.reconnected:  # the pager holds its own copies; a reconnect's are ours to close
                    for s in socks:
                        s.close()
            return
        assert enclave.access is not None
        demand = Link(SecureChannel.resume(socks[1], link.chan.ticket().derive(DEMAND_LABEL)), link.machine,
                      timeout)
        enclave.receiver = Receiver(link, demand, ledger, AccessInstaller(enclave.access, enclave.heap.chunk_size),
                                    chunk_size=enclave.heap.chunk_size, tracker="access", t_resume=t_resume)
        enclave.receiver.start()
        enclave.receiver.request(enclave.access.outstanding())  # asked for before the receiver existed
        if enclave.resume_path is not None:
            ResumeServer(enclave.resume_path, arrived.secret, ledger, t_resume, enclave.receiver,
                         enclave.heap.chunk_size, epoch=arrived.epoch)
    except (ConstmigError, OSError) as e:
        # Running already: the app waits on (access: fails on) missing chunks; the source keeps them.
        link.machine.fail()
        if enclave.access is not None:
            enclave.access.fail(f"could not start streaming: {e}")


class AccessInstaller:
    """Access Tracker installs: verify into scratch, copy into the heap chunk (PROT_NONE until
    begin_install), and let the app see it when finish_install flips its bit. Not decrypted in place:
    GCM writes plaintext before it knows the tag, and the chunk is writable heap memory meanwhile."""

    pieces_visible = False  # the tracker's bitmap is per chunk: a demanded chunk counts when whole

    def __init__(self, tracker: Any, chunk_size: int) -> None:
        self.tracker = tracker
        self._open: dict[int, memoryview] = {}  # chunks arriving piece by piece
        # One scratch per receive thread: only the background thread calls install(), only the demand
        # thread install_piece(). Touched now, so the first install does not pay for first touches.
        self._chunk_buf = np.ones(chunk_size, dtype=np.uint8)
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

    def install(self, index: int, sealed: SealedChunk, chan: SecureChannel) -> None:
        view = self.tracker.begin_install(index)
        if sealed.length != len(view):
            self.tracker.abort_install(index)
            raise ProtocolError(f"chunk {index} is {sealed.length} bytes, not {len(view)}")
        try:
            self._verify_then_place(sealed, chan, self._chunk_buf, view)
        except BaseException:
            self.tracker.abort_install(index)
            raise
        self.tracker.finish_install(index)

    def fail(self, reason: str) -> None:
        self.tracker.pause(reason)

    def resumed(self) -> None:
        self.tracker.unpause()
