"""The destination enclave's side of a migration (runs inside the empty, incoming enclave process).

Attest the source, check that the migration's parameters match this instance, take the small state,
verify every chunk before it counts, answer READY with a digest of what arrived, and resume only on
COMMIT. Any failure before COMMIT wipes this instance: the source still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from constmig.enclave.lifecycle import Life
from constmig.enclave.state import import_app_state
from constmig.errors import ConstmigError, MigrationError, ProtocolError
from constmig.migration import messages as m
from constmig.migration.ledger import ChunkLedger
from constmig.migration.link import Link
from constmig.migration.protocol import Machine
from constmig.migration.source import STRATEGIES
from constmig.wire.channel import SealedChunk, SecureChannel
from constmig.wire.handshake import run_responder

if TYPE_CHECKING:
    import socket

    from constmig.enclave.runtime import Enclave


def check_params(enclave: Enclave, params: dict[str, Any]) -> None:
    """Refuse a migration this instance was not launched for (another app, heap or chunk size)."""
    want = {"app": enclave.app_name, "heap_size": enclave.heap.size, "chunk_size": enclave.heap.chunk_size}
    for key, value in want.items():
        if params.get(key) != value:
            raise ProtocolError(f"source wants {key}={params.get(key)!r} but this instance has {value!r}")
    if params.get("strategy") not in STRATEGIES:
        raise ProtocolError(f"unknown strategy {params.get('strategy')!r}")


def run(enclave: Enclave, sock: socket.socket, req: dict[str, Any], progress: Callable[[dict], None]) -> dict:
    enclave.life.require(Life.INCOMING)
    timeout = float(req.get("timeout", 120.0))
    heap = enclave.heap
    sock.settimeout(timeout)  # bounds a send to a peer that stopped reading; receives poll
    chan = SecureChannel(sock, None)
    link: Link | None = None  # exists once the handshake is done; only then can we tell the source
    try:
        hs = run_responder(chan, enclave.backend, enclave.identity, enclave.policy,
                           check_params=lambda params: check_params(enclave, params), timeout=timeout)
        link = Link(chan, Machine("destination"), timeout)
        state = link.expect(m.StateMsg)
        if state.heap_size != heap.size or state.chunk_size != heap.chunk_size:
            raise ProtocolError("small state describes a different heap layout")
        ledger = ChunkLedger.from_wire(hs.migration_id, heap.n_chunks, state.chunks)
        app = import_app_state(enclave.app_cls, heap, state.app_state)
        total = int(ledger.expected.size) * heap.chunk_size
        last = 0.0
        while True:
            msg = link.recv()
            if isinstance(msg, SealedChunk):
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
        link.expect(m.Commit)
    except (ConstmigError, OSError) as e:
        if link is not None:
            link.abort(str(e))
        heap.wipe()
        enclave.life.move(Life.INCOMING, Life.DESTROYED)
        raise MigrationError(f"incoming migration failed before commit ({e}); this instance was wiped") from None
    # --- COMMIT received: resume (downtime ends) ---
    enclave.app = app
    enclave.life.move(Life.INCOMING, Life.RUNNING)
    t_resume = time.time()
    try:
        link.send(m.Resumed(t_resume))
        if ledger.complete:
            link.send(m.Done(ledger.count, ledger.digest()))
    except (ConstmigError, OSError):
        pass  # the app runs here now; the source learns of completion on recovery
    return {"resume_time": t_resume, "downtime_ms": (t_resume - state.stop_time) * 1e3,
            "populate_s": enclave.figures.get("populate_s"),
            "chunks": ledger.count, "wire_bytes": chan.bytes_sent + chan.bytes_received}
