"""The destination enclave's side of a migration (runs inside the empty, incoming enclave process).

Attest the source, check that the migration's parameters match this instance, take the small state and
what the strategy moves before the handoff (strategies/), verify every chunk before it counts, answer
READY with a digest of what arrived, and resume only on
COMMIT, or on a keyed reconnect from the source, which stands for a COMMIT lost with the link
(resume_server.CommitWaiter). Any failure before that wipes this instance, whatever raised it: the
source still runs (after READY, the source learns it from an authenticated ABORT, sent on the link or
as the answer to its reconnect).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from constmig.enclave.persist import Lineage
from constmig.errors import (
    ChannelClosed,
    ConstmigError,
    MigrationError,
    PeerAborted,
    ProtocolError,
    RecvTimeout,
)
from constmig.migration import messages as m
from constmig.migration import strategies
from constmig.migration.ledger import ChunkLedger, chunks_from_wire
from constmig.migration.link import Link
from constmig.migration.protocol import HAVE, RECONNECT, Machine, St
from constmig.migration.resume import ResumeSecret, send_have
from constmig.migration.resume_server import CommitWaiter
from constmig.migration.strategies.base import Arrived, Strategy
from constmig.migration.strategies.early import keep_held
from constmig.wire import control
from constmig.wire.channel import SealedChunk, SecureChannel
from constmig.wire.handshake import run_responder

if TYPE_CHECKING:
    from constmig.migration.port import MigratingEnclave as Enclave

POLL_S = 0.25  # how often the wait for COMMIT looks for a reconnect while the link is quiet


def check_params(enclave: Enclave, params: dict[str, Any]) -> None:
    """Refuse a migration this instance was not launched for (another app, heap or chunk size)."""
    want = {"app": enclave.app_name, "heap_size": enclave.heap.size, "chunk_size": enclave.heap.chunk_size}
    for key, value in want.items():
        if params.get(key) != value:
            raise ProtocolError(f"source wants {key}={params.get(key)!r} but this instance has {value!r}")
    strategies.get(params.get("strategy")).check_instance(enclave.tracking)


def refuse(enclave: Enclave, reason: str) -> NoReturn:
    """A migrate_in request that is malformed itself (the runtime could not decode it): refused as any
    failure before COMMIT is, by wiping this instance."""
    enclave.expect_incoming()
    _give_up(enclave, None, None, reason, told=False)
    raise MigrationError(f"incoming migration failed before commit ({reason}); this instance was wiped")


def run(enclave: Enclave, socks: list[socket.socket], req: control.MigrateIn | dict[str, Any],
        progress: Callable[[dict], None]) -> dict:
    """`req` as the runtime decoded it (an in-process driver may hand its map: decoded here, and a bad one
    wipes this instance as a bad request does)."""
    enclave.expect_incoming()
    link: Link | None = None  # exists once the handshake is done; only then can we tell the source
    waiter: CommitWaiter | None = None
    try:
        if not isinstance(req, control.MigrateIn):
            req = control.decode(req, control.MigrateIn)
        timeout, commit_wait = req.timeout, req.commit_wait
        for sock in socks:
            sock.settimeout(timeout)  # bounds a send to a peer that stopped reading; receives poll
        chan = SecureChannel(socks[0], None)
        hs = run_responder(chan, enclave.backend, enclave.identity, enclave.policy,
                           check_params=lambda params: check_params(enclave, params), timeout=timeout)
        strategy = strategies.get(hs.params["strategy"])
        link = Link(chan, Machine("destination", strategy=strategy), timeout)
        arrived = _receive(enclave, link, socks, strategy, hs.migration_id, timeout, progress)
        waiter = arrived.waiter
        state = arrived.state
        if state.lineage:  # held before READY: once the source commits, this host must be able to restore it
            if len(state.release_hash) != 32:
                raise ProtocolError("the small state carries a lineage without its release hash")
            enclave.hold_lineage(Lineage(state.lineage, state.lineage_key, state.lineage_version), state.release_hash)
        link.send(m.Ready(arrived.ledger.digest()))
        _await_commit(arrived, max(timeout, commit_wait))
    except Exception as e:  # noqa: BLE001 - whatever failed, before COMMIT this instance must not keep the data
        reason = str(e) if isinstance(e, ConstmigError | OSError) else f"internal error: {type(e).__name__}: {e}"
        _give_up(enclave, link, waiter, reason, told=isinstance(e, PeerAborted))
        raise MigrationError(f"incoming migration failed before commit ({reason}); this instance was wiped"
                             + ("; reconnects from the source are answered with ABORT" if waiter else "")) from None
    return _resume(enclave, arrived, timeout)


def _receive(enclave: Enclave, link: Link, socks: list[socket.socket], strategy: Strategy, migration_id: bytes,
             timeout: float, progress: Callable[[dict], None]) -> Arrived:
    """From the small state to just before READY: what the strategy moves before the handoff, if anything
    (chunks arrive here only where its protocol table allows them)."""
    heap = enclave.heap
    if len(socks) != strategy.connections:
        raise ProtocolError(f"{strategy.name} needs {strategy.connections} connections, got {len(socks)}")
    early, state = strategy.receive_before_state(link, enclave, migration_id)
    if not isinstance(state, m.StateMsg):
        link.machine.fail()
        raise ProtocolError(f"expected the small state, got {type(state).__name__}")
    if state.heap_size != heap.size or state.chunk_size != heap.chunk_size:
        raise ProtocolError("small state describes a different heap layout")
    if state.strategy != strategy.name:
        raise ProtocolError(f"small state says {state.strategy!r} but the handshake agreed on {strategy.name!r}")
    ledger = ChunkLedger.from_wire(migration_id, heap.n_chunks, state.chunks)
    held = chunks_from_wire(state.held, heap.n_chunks)
    stale = None  # chunks whose heap bytes are an old version (pre-copy rounds): a zero record must write
    if early is not None:  # what pre-copy rounds brought: the current versions stay, the rest is let go
        stale = keep_held(enclave, ledger, early, held)
    elif held.size:
        raise ProtocolError("the small state keeps chunks from pre-copy rounds, but no round was sent")
    wrap = strategy.import_wrapper(enclave, ledger, timeout)
    app = enclave.import_state(state.app_state, wrap)
    total = int(ledger.expected.size) * heap.chunk_size
    last = 0.0
    while True:
        msg = link.recv()
        if not isinstance(msg, SealedChunk):
            break
        ledger.check_acceptable(msg.index)
        # The app is not running and this instance is wiped on any failure, so decrypting straight into
        # place is safe here; the tag is checked before the chunk counts. A chunk not in the ledger yet is
        # zeros (fresh) unless a round left an old version there, so a zero chunk needs no write. Under a
        # post-copy tracker (auto finishing as pre-copy) the chunk is missing or guarded: the tracker installs it.
        if enclave.tracking.post_copy:
            enclave.tracking.install(msg, link.chan)
        elif msg.zero and msg.length == heap.chunk_size and not (stale is not None and stale[msg.index]):
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
    strategy.check_heap_end(ledger, msg.count)
    secret = ResumeSecret.from_ticket(link.chan.ticket())
    # Listening before READY goes out: from then on the source may be committed and reconnect.
    waiter = CommitWaiter(enclave.resume_path, secret, strategy.connections) if enclave.resume_path else None
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
    """Before COMMIT: drop the pending lineage, tell the source (on the link if it still works, and to
    every later reconnect), then wipe. The waiter stays as the process's tombstone. The lineage goes
    first: an ABORT lets the source run again, and its release code must be worthless by then."""
    try:
        enclave.forget_lineage()
    except (ConstmigError, OSError):  # it may still restore here: the source must not run again, so no ABORT
        if waiter is not None:
            waiter.close()
        link, waiter, told = None, None, True
    if link is not None and not told:
        link.abort(reason)
    if waiter is not None:
        waiter.decide("abort", reason)
    enclave.give_up_incoming(waiter)


def _resume(enclave: Enclave, arrived: Arrived, timeout: float) -> dict:
    """COMMIT (or its stand-in) received: run the app here (downtime ends), then finish the move."""
    state, ledger, link = arrived.state, arrived.ledger, arrived.link
    if arrived.waiter is not None:
        arrived.waiter.close()  # the running instance's ResumeServer takes this socket over
    enclave.run_incoming(arrived.app, state.sessions)
    t_resume = time.time()
    try:
        if arrived.reconnected:  # its first record says what arrived, and that we run (for RESUMED)
            link.machine.sent(HAVE)
            send_have(link.chan, ledger, t_resume)
        else:
            link.send(m.Resumed(t_resume))
    except (ConstmigError, OSError):
        pass  # the app runs here now; the source reconnects to learn of completion
    enclave.confirm_lineage()
    arrived.strategy.receive_after_commit(enclave, arrived, t_resume, timeout)
    return {"resume_time": t_resume, "downtime_ms": (t_resume - state.stop_time) * 1e3,
            "strategy": arrived.strategy.name,
            "tracker": enclave.tracking.name, "chunks": int(ledger.expected.size),
            **({"committed_by": "reconnect"} if arrived.reconnected else {})}
