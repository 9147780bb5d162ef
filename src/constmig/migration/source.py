"""The source enclave's side of a migration (runs inside the enclave process).

Attest the destination while still running, stop at an ECALL boundary, send the small state and
whatever the strategy moves before the handoff (strategies/), wait for READY, record HANDED_OFF, send
COMMIT, then serve whatever the strategy still has to move and wait for a DONE whose digest matches
what was sent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from constmig.enclave.persist import release_hash
from constmig.errors import (
    ConstmigError,
    IntegrityError,
    MigrationCancelled,
    MigrationError,
    PeerAborted,
    RecvTimeout,
)
from constmig.migration import messages as m
from constmig.migration import strategies
from constmig.migration.constants import DEMAND_LABEL
from constmig.migration.ledger import ChunkLedger, chunks_to_wire
from constmig.migration.link import Link
from constmig.migration.priority import shallow_queue, unpaced
from constmig.migration.protocol import HAVE, Machine, St
from constmig.migration.receiver import segment_figures
from constmig.migration.resume import HANDSHAKE_TIMEOUT, ResumeSecret, recv_have
from constmig.migration.strategies.base import Strategy
from constmig.migration.strategies.stopcopy import NativeLink, data_plane
from constmig.native import engine
from constmig.wire import control
from constmig.wire.channel import SecureChannel
from constmig.wire.handshake import run_initiator

if TYPE_CHECKING:
    from constmig.migration.port import MigratingEnclave as Enclave
    from constmig.migration.streamer import Streamer


def _strategy(name: object, socks: list[socket.socket]) -> Strategy:
    try:
        strategy = strategies.get(name)
    except ConstmigError as e:
        raise MigrationError(str(e)) from None
    if len(socks) != strategy.connections:
        raise MigrationError(f"{strategy.name} needs {strategy.connections} connections, got {len(socks)}")
    return strategy


def _demand_link(strategy: Strategy, socks: list[socket.socket], chan: SecureChannel, machine: Machine,
                 timeout: float, chunk_size: int) -> Link | None:
    """The demand connection, keyed from the main channel, if the strategy has one."""
    if strategy.connections < 2:
        return None
    shallow_queue(socks[0], socket.SO_SNDBUF, chunk_size)
    unpaced(socks[1])
    return Link(SecureChannel.resume(socks[1], chan.ticket().derive(DEMAND_LABEL)), machine, timeout)


def _request(req: Any, kind: type[control.T]) -> control.T:
    """The request as the runtime decoded it; an in-process driver's map is decoded here, the same way."""
    if isinstance(req, kind):
        return req
    try:
        return control.decode(req, kind)
    except control.BadRequest as e:
        raise MigrationError(str(e)) from None


def run(enclave: Enclave, socks: list[socket.socket], req: control.MigrateOut | dict[str, Any],
        progress: Callable[[dict], None]) -> dict:
    req = _request(req, control.MigrateOut)  # its strategy, rounds and waits are checked
    strategy = _strategy(req.strategy, socks)
    _check_data_plane(req.data_plane)
    enclave.whole_heap("migrate")  # refused before the destination hears of it (the same gate, at the stop)
    enclave.begin_out(socks, req.token)
    if enclave.cancelled is not None:
        enclave.end_out()
        raise MigrationCancelled(f"migration cancelled before it began ({enclave.cancelled}); the enclave keeps "
                                 "running here with all its data")

    def reporting(info: dict) -> None:  # a cancel before the commit point lands at the next report
        if enclave.cancelled is not None:
            raise MigrationCancelled(f"cancelled: {enclave.cancelled}")
        progress(info)

    try:
        return _run(enclave, socks, req, reporting, strategy, req.timeout)
    finally:
        enclave.end_out()


def _check_data_plane(name: str) -> None:
    """The native data plane is refused here, before a byte goes, where its engine was not built."""
    if name == "native" and not engine.available():
        raise MigrationError(f"data plane 'native' is not available in the source enclave: "
                             f"{engine.why_unavailable()}; use --data-plane python")


def _why(enclave: Enclave, e: BaseException) -> str:
    """The reason a migration ended before its commit point: the operator's cancel, if there was one (its
    shut connections are what the error itself is about)."""
    return f"cancelled: {enclave.cancelled}" if enclave.cancelled is not None else str(e)


def _run(enclave: Enclave, socks: list[socket.socket], req: control.MigrateOut, progress: Callable[[dict], None],
         strategy: Strategy, timeout: float) -> dict:
    heap = enclave.heap
    migration_id = os.urandom(16)
    for sock in socks:
        sock.settimeout(timeout)  # bounds a send to a peer that stopped reading; receives poll
    chan = SecureChannel(socks[0], migration_id)
    params = {"app": enclave.app_name, "heap_size": heap.size, "chunk_size": heap.chunk_size,
              "strategy": strategy.name}
    t_start = time.time()
    try:
        run_initiator(chan, enclave.backend, enclave.identity, enclave.policy, params, timeout=timeout)
    except ConstmigError as e:
        raise MigrationError(f"attestation with the destination failed: {_why(enclave, e)}; the enclave "
                             "keeps running here") from None
    except OSError as e:
        raise MigrationError(f"destination unreachable during attestation: {_why(enclave, e)}; the enclave "
                             "keeps running here") from None
    link = (NativeLink if req.data_plane == "native" else Link)(chan, Machine("source", strategy=strategy), timeout)
    demand = _demand_link(strategy, socks, chan, link.machine, timeout, heap.chunk_size)
    try:
        before = strategy.before_stop(link, enclave, progress, req)  # pre-copy rounds, while the app runs
    except (ConstmigError, OSError) as e:
        link.abort(str(e))
        raise MigrationError(f"migration aborted before the stop ({_why(enclave, e)}); the enclave keeps "
                             "running here with all its data") from None
    ledger: ChunkLedger | None = None
    try:
        # --- stop: downtime starts ---
        snap = enclave.stop()  # the chunk list is the allocator's (the same gate as above)
        ledger = ChunkLedger(migration_id, heap.n_chunks, snap.chunks)
        held = before.settle(ledger)  # the rounds' versions still current (the app writes no more)
        lineage = snap.lineage
        release = os.urandom(32) if lineage else b""  # given to the host only once this side let go
        link.send(m.StateMsg(strategy.name, snap.state, heap.size, heap.chunk_size, ledger.to_wire(),
                             snap.stopped_at, *((lineage.lineage, lineage.key, lineage.version) if lineage else
                                                (b"", b"", 0)), chunks_to_wire(held), snap.sessions,
                             release_hash(release) if release else b"", data_plane=data_plane(link)))
        strategy.send_before_handoff(link, ledger, heap, progress, before)
        link.send(m.HeapEnd(ledger.count))
        ready = link.expect(m.Ready)
        if ready.digest != ledger.digest():
            raise IntegrityError("destination's READY digest does not match the chunks sent")
        # --- commit point: from here on this enclave never runs the app again (unless cancelled first) ---
        enclave.hand_off()
    except (ConstmigError, OSError) as e:
        before.close()
        link.abort(str(e))
        enclave.unstop()
        raise MigrationError(
            f"migration aborted before handoff ({_why(enclave, e)}); the enclave keeps running here with all its data"
        ) from None
    except BaseException:
        before.close()
        raise
    enclave.end_out()
    out = Outgoing(strategy, ledger, ResumeSecret.from_ticket(chan.ticket()), t_start, snap.stopped_at,
                   len(snap.state), req.max_bandwidth, figures={**before.figures, "data_plane": data_plane(link)})
    progress({"phase": "handed_off"})  # the agent sends clients to the destination from now on
    try:
        enclave.leave_lineage()  # no checkpoint may restore here once the destination runs it
        if release:  # only now: with it, the destination's pending lineage restores there
            progress({"phase": "lineage_released", "release": release.hex()})
        link.send(m.Commit())
    except (ConstmigError, OSError) as e:
        link.machine.fail()
        _pause(enclave, out, link, e, None)
    finally:
        before.close()  # only now: ending write tracking costs ~20 ms/GiB, which must not be downtime
    return _finish(enclave, out, link, demand, progress, timeout)


@dataclass
class Outgoing:
    """A migration past its commit point, kept by the source until DONE: what a reconnect needs."""

    strategy: Strategy
    ledger: ChunkLedger
    secret: ResumeSecret
    t_start: float
    t_stop: float
    small_state_bytes: int
    max_bandwidth: float
    resume_time: float | None = None  # the destination's, once it said so
    epoch: int = 0
    resumes: int = 0
    wire_bytes: int = 0
    zero_chunks: int = 0  # chunks that went as FLAG_ZERO records: a length, no page data
    done: np.ndarray | None = None  # after a reconnect: chunks the destination already holds
    figures: dict[str, Any] = field(default_factory=dict)  # the strategy's, from before the stop


def resume(enclave: Enclave, socks: list[socket.socket], req: control.ResumeOut | dict[str, Any],
           progress: Callable[[dict], None]) -> dict:
    """Reconnect a paused migration (see resume.py): re-key, learn what arrived, send the rest, await DONE."""
    timeout = _request(req, control.ResumeOut).timeout
    out: Outgoing = enclave.parked()
    _strategy(out.strategy.name, socks)
    for sock in socks:
        sock.settimeout(timeout)
    out.epoch += 1
    chan = SecureChannel(socks[0], out.ledger.migration_id)
    # Until the destination said it runs, an authenticated ABORT may still give the enclave back to us.
    link = (NativeLink if out.figures.get("data_plane") == "native" else Link)(  # the stream's plane, again
        chan, Machine("source", St.HANDED_OFF if out.resume_time is None else St.PEER_RUNNING, strategy=out.strategy),
        timeout)
    demand = None
    try:
        quick = min(timeout, HANDSHAKE_TIMEOUT)
        out.secret.initiate(chan, out.epoch, quick)
        have, resume_time = recv_have(chan, out.ledger, quick)
        link.machine.received(HAVE)
        demand = _demand_link(out.strategy, socks, chan, link.machine, timeout, enclave.heap.chunk_size)
    except PeerAborted as e:  # the destination never received COMMIT and gave up (it is wiped)
        link.machine.received(m.Abort(str(e)))
        _pause(enclave, out, link, e, None)
    except (ConstmigError, OSError) as e:
        raise MigrationError(f"reconnect to the destination failed ({e}); the migration stays paused and this "
                             "source keeps its state") from None
    out.resumes += 1
    out.resume_time = out.resume_time or resume_time
    out.ledger.keep_only(have)
    out.done = have
    progress({"phase": "resumed", "epoch": out.epoch, "missing": int(out.ledger.expected.size - out.ledger.count)})
    return _finish(enclave, out, link, demand, progress, timeout)


def _finish(enclave: Enclave, out: Outgoing, link: Link, demand: Link | None, progress: Callable[[dict], None],
            timeout: float) -> dict:
    """After COMMIT (or a reconnect): stream what is left, wait for a DONE that matches, then wipe."""
    heap, ledger = enclave.heap, out.ledger
    streamer: Streamer | None = None
    try:
        streamer = out.strategy.serve_after_commit(link, demand, ledger, heap, progress, out.max_bandwidth,
                                                   out.done)
        if out.resume_time is None:
            out.resume_time = link.expect(m.Resumed).resume_time
        while True:  # the stream may take longer than one receive timeout; a stall may not
            try:
                done = link.expect(m.Done)
                break
            except RecvTimeout:
                if streamer is None or time.monotonic() - streamer.last_progress > timeout:
                    raise
        if streamer is not None:
            streamer.wait_recorded(timeout)
        if done.count != ledger.expected.size or done.count != ledger.count or done.digest != ledger.digest():
            raise IntegrityError(
                f"destination's DONE ({done.count} chunks) does not match the {ledger.expected.size} chunks of "
                "this migration or their digest")
    except (ConstmigError, OSError) as e:
        link.machine.fail()
        if streamer is not None:
            streamer.stop(abandon=True)
        _pause(enclave, out, link, e, streamer)
    finally:
        if streamer is not None:
            streamer.stop()
            out.figures.update(segment_figures("source", {"service": streamer.service}))
        out.wire_bytes += link.chan.bytes_sent + link.chan.bytes_received + (
            demand.chan.bytes_sent + demand.chan.bytes_received if demand is not None else 0)
        out.zero_chunks += link.chan.zero_chunks_sent + (demand.chan.zero_chunks_sent if demand is not None else 0)
    t_end = time.time()
    enclave.retire()
    return _with_stream_rate({
        "strategy": out.strategy.name,
        "workload": enclave.app_name,
        "heap_bytes": heap.size,
        "state_bytes": int(ledger.expected.size) * heap.chunk_size,
        "chunks": int(ledger.expected.size),
        "small_state_bytes": out.small_state_bytes,
        "downtime_ms": (out.resume_time - out.t_stop) * 1e3,
        "attest_ms": (out.t_stop - out.t_start) * 1e3,  # handshake (and pre-copy rounds) to the stop
        "total_s": t_end - out.t_start,
        "wire_bytes": out.wire_bytes,
        "zero_chunks": out.zero_chunks,
        "migration_id": ledger.migration_id.hex(),
        "resumes": out.resumes,
        **out.strategy.source_figures,
        **out.figures,
        **done.stats,
    }, heap.chunk_size)


def _with_stream_rate(figures: dict[str, Any], chunk_size: int) -> dict[str, Any]:
    """`stream_gbps`: what the post-copy stream moved (demanded and background chunks) over its time
    from the resume to the last chunk (bench raw gives the machine's bound to compare it with)."""
    streamed = int(figures.get("demand_chunks") or 0) + int(figures.get("background_chunks") or 0)
    if streamed and figures.get("stream_s"):
        figures["stream_gbps"] = round(streamed * chunk_size / figures["stream_s"] / 1e9, 3)
    return figures


def _pause(enclave: Enclave, out: Outgoing, link: Link, e: BaseException, streamer: Streamer | None) -> NoReturn:
    """Past the commit point a failure pauses; only the destination's authenticated ABORT before it
    resumed gives the enclave back to this source (see protocol.py)."""
    if link.machine.state is St.ABORTED:
        enclave.reclaim()
        raise MigrationError(
            f"destination gave the migration up before resuming ({e}); it never ran the enclave, so the "
            "enclave runs here again with all its data") from None
    enclave.park(out)
    # the streamer's error is the real cause when it closed the main channel to wake us
    cause = streamer.error if streamer is not None and streamer.error else str(e)
    raise MigrationError(
        f"enclave handed off but the destination did not confirm ({cause}); this source will not run it "
        "again and keeps its state for recovery"
    ) from None
