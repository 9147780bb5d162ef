"""The destination enclave's side of a migration (runs inside the empty, incoming enclave process).

Attest the source, check that the migration's parameters match this instance, take the small state,
verify every chunk before it counts, answer READY with a digest of what arrived, and resume only on
COMMIT. Any failure before COMMIT wipes this instance: the source still runs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from constmig.enclave.lifecycle import Life
from constmig.enclave.persist import Lineage
from constmig.enclave.state import import_app_state
from constmig.errors import ConstmigError, MigrationError, ProtocolError
from constmig.migration import messages as m
from constmig.migration.ledger import PIECE, ChunkLedger
from constmig.migration.link import Link
from constmig.migration.priority import shallow_queue
from constmig.migration.protocol import Machine
from constmig.migration.receiver import Receiver
from constmig.migration.resume import ResumeSecret
from constmig.migration.resume_server import ResumeServer
from constmig.migration.source import CONNECTIONS, DEMAND_LABEL, STRATEGIES
from constmig.wire.channel import SealedChunk, SecureChannel
from constmig.wire.handshake import run_responder

if TYPE_CHECKING:
    from constmig.enclave.runtime import Enclave


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


def run(enclave: Enclave, socks: list[socket.socket], req: dict[str, Any],
        progress: Callable[[dict], None]) -> dict:
    enclave.life.require(Life.INCOMING)
    timeout = float(req.get("timeout", 120.0))
    heap = enclave.heap
    for sock in socks:
        sock.settimeout(timeout)  # bounds a send to a peer that stopped reading; receives poll
    chan = SecureChannel(socks[0], None)
    link: Link | None = None  # exists once the handshake is done; only then can we tell the source
    try:
        hs = run_responder(chan, enclave.backend, enclave.identity, enclave.policy,
                           check_params=lambda params: check_params(enclave, params), timeout=timeout)
        strategy = hs.params["strategy"]
        link = Link(chan, Machine("destination"), timeout)
        if len(socks) != CONNECTIONS[strategy]:
            raise ProtocolError(f"{strategy} needs {CONNECTIONS[strategy]} connections, got {len(socks)}")
        state = link.expect(m.StateMsg)
        if state.heap_size != heap.size or state.chunk_size != heap.chunk_size:
            raise ProtocolError("small state describes a different heap layout")
        if state.strategy != strategy:
            raise ProtocolError(f"small state says {state.strategy!r} but the handshake agreed on {strategy!r}")
        ledger = ChunkLedger.from_wire(hs.migration_id, heap.n_chunks, state.chunks)

        wrap = None
        if strategy == "constmig" and enclave.tracker == "access":
            wrap = enclave.start_access_tracking(ledger.expected, timeout)
        app = import_app_state(enclave.app_cls, heap, state.app_state, wrap=wrap)
        total = int(ledger.expected.size) * heap.chunk_size
        last = 0.0
        while True:
            msg = link.recv()
            if isinstance(msg, SealedChunk):
                if strategy != "stopcopy":
                    raise ProtocolError("post-copy sends no chunk before the handoff")
                ledger.check_acceptable(msg.index)
                # The app is not running and this instance is wiped on any failure, so decrypting
                # straight into place is safe here; the tag is checked before the chunk counts.
                chan.open_chunk(msg, heap.chunk_view(msg.index))
                ledger.accept(msg.index, msg.tag)
                now = time.monotonic()
                if now - last > 0.1:
                    last = now
                    progress({"phase": "copy", "done": ledger.count * heap.chunk_size, "total": total})
                continue
            if not isinstance(msg, m.HeapEnd):
                raise ProtocolError(f"unexpected {type(msg).__name__} while receiving the heap")
            break
        if msg.count != ledger.count or (state.strategy == "stopcopy" and not ledger.complete):
            raise ProtocolError(
                f"heap stream ended after {ledger.count} of {ledger.expected.size} chunks (truncated)"
            )
        link.send(m.Ready(ledger.digest()))
        # A COMMIT held up by a link outage still counts: once READY is out, wait as long as the source
        # would go on reconnecting, not one I/O timeout (else the source, committed, strands the enclave).
        link.timeout = max(timeout, float(req.get("commit_wait") or 0))
        link.expect(m.Commit)
        link.timeout = timeout
    except (ConstmigError, OSError) as e:
        if link is not None:
            link.abort(str(e))
        enclave.abandon_incoming()
        if enclave.persist is not None:
            enclave.persist.forget()
        heap.wipe()
        enclave.life.move(Life.INCOMING, Life.DESTROYED)
        raise MigrationError(f"incoming migration failed before commit ({e}); this instance was wiped") from None
    # --- COMMIT received: resume (downtime ends) ---
    if state.lineage and enclave.persist is not None:
        # Sealed checkpoints and their counter continue here; bound only now, so a destination killed
        # before COMMIT leaves no lineage behind that could restore while the source runs on.
        try:
            enclave.persist.adopt(Lineage(state.lineage, state.lineage_key, state.lineage_version))
        except (ConstmigError, OSError) as e:  # the app must run now; only its checkpoints are affected
            enclave.figures["lineage_error"] = str(e)
    enclave.app = app
    enclave.life.move(Life.INCOMING, Life.RUNNING)
    t_resume = time.time()
    secret = ResumeSecret.from_ticket(link.chan.ticket())  # lets the source reconnect if the link breaks
    if strategy == "stopcopy" and enclave.resume_path is not None:
        ResumeServer(enclave.resume_path, secret, ledger, t_resume, None, heap.chunk_size)
    try:
        link.send(m.Resumed(t_resume))
        if strategy == "stopcopy":
            link.send(m.Done(ledger.count, ledger.digest(), {"tracker": "none"}))
    except (ConstmigError, OSError):
        pass  # the app runs here now; the source reconnects to learn of completion
    out = {"resume_time": t_resume, "downtime_ms": (t_resume - state.stop_time) * 1e3,
           "populate_s": enclave.figures.get("populate_s"), "strategy": strategy, "tracker": enclave.tracker,
           "chunks": int(ledger.expected.size)}
    if strategy == "constmig":
        shallow_queue(socks[0], socket.SO_RCVBUF, heap.chunk_size)
        _start_stream(enclave, link, socks, ledger, t_resume, timeout, secret)
    return out


def _start_stream(enclave: Enclave, link: Link, socks: list[socket.socket], ledger: ChunkLedger,
                  t_resume: float, timeout: float, secret: ResumeSecret) -> None:
    """Hand the stream to the tracker: the pager process (fault) or receiver threads here (access)."""
    try:
        if enclave.tracker == "fault":
            assert enclave.pager is not None
            main = link.chan.detach()
            enclave.pager.stream(main, main.derive(DEMAND_LABEL), [s.fileno() for s in socks], ledger.to_wire(),
                                 t_resume, timeout, secret, enclave.resume_path)
            return
        assert enclave.access is not None
        demand = Link(SecureChannel.resume(socks[1], link.chan.ticket().derive(DEMAND_LABEL)), link.machine,
                      timeout)
        enclave.receiver = Receiver(link, demand, ledger, AccessInstaller(enclave.access),
                                    chunk_size=enclave.heap.chunk_size, tracker="access", t_resume=t_resume)
        enclave.receiver.start()
        enclave.receiver.request(enclave.access.outstanding())  # asked for before the receiver existed
        if enclave.resume_path is not None:
            ResumeServer(enclave.resume_path, secret, ledger, t_resume, enclave.receiver, enclave.heap.chunk_size)
    except (ConstmigError, OSError) as e:
        # Running already: the app waits on (access: fails on) missing chunks; the source keeps them.
        link.machine.fail()
        if enclave.access is not None:
            enclave.access.fail(f"could not start streaming: {e}")


class AccessInstaller:
    """Access Tracker installs: decrypt straight into the heap chunk, which the app cannot read until
    finish_install flips its bit (and which is PROT_NONE until begin_install)."""

    pieces_visible = False  # the tracker's bitmap is per chunk: a demanded chunk counts when whole

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self._open: dict[int, memoryview] = {}  # chunks arriving piece by piece

    def install_piece(self, index: int, piece: int, sealed: SealedChunk, chan: SecureChannel) -> None:
        view = self._open.get(index)
        if view is None:
            view = self._open[index] = self.tracker.begin_install(index)
        chan.open_chunk(sealed, view[piece * PIECE:(piece + 1) * PIECE])

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
            chan.open_chunk(sealed, view)
        except BaseException:
            self.tracker.abort_install(index)
            raise
        self.tracker.finish_install(index)

    def fail(self, reason: str) -> None:
        self.tracker.pause(reason)

    def resumed(self) -> None:
        self.tracker.unpause()
