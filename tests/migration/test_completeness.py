"""The completeness checks at both ends of a migration, driven through the real `destination.run` and
`source.run` against a scripted peer.

A chunk that never travelled has a zero tag on both sides, so the digests of two ledgers that both lack
it agree: the chunk counts are what catch a missing chunk. Each test here is the one that fails if such
a count check is dropped:

* a stop-and-copy destination must refuse HEAP_END while a chunk is missing, even when HEAP_END's count
  equals what arrived, and wipe itself;
* a source must refuse a DONE that covers fewer chunks than the migration moves, even when count and
  digest match what it sent, and keep its (handed-off) state instead of wiping it;
* a post-copy destination must refuse a chunk before the handoff with a clear error and wipe itself
  (run as a real enclave process: with the Access Tracker's guarded heap a missing check crashes the
  process, which this test reports as a failure rather than taking pytest down with it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from scripted import CHUNK, HEAP, TIMEOUT, Enclaves, Runner, World, recv_msg, send_msg, small_state

from constmig.enclave.lifecycle import Life
from constmig.enclave.runtime import Enclave
from constmig.errors import ChannelClosed, MigrationError
from constmig.migration import destination, source
from constmig.migration import messages as m
from constmig.migration.constants import DEMAND_LABEL
from constmig.migration.ledger import ChunkLedger
from constmig.wire.channel import SecureChannel
from constmig.wire.framing import FramedSocket
from constmig.wire.handshake import run_initiator, run_responder


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """[real main, real demand, fake main, fake demand]; all shut down after the test (wakes any waiter)."""
    main, demand = socket.socketpair(), socket.socketpair()
    out = [main[0], demand[0], main[1], demand[1]]
    try:
        yield out
    finally:
        for s in out:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()




def source_params(enclave: Enclave, strategy: str) -> dict[str, Any]:
    heap = enclave.heap
    return {"app": enclave.app_name, "heap_size": heap.size, "chunk_size": heap.chunk_size, "strategy": strategy}


def state_msg(enclave: Enclave, strategy: str, ledger: ChunkLedger) -> m.StateMsg:
    assert enclave.app is not None
    heap = enclave.heap
    return m.StateMsg(strategy, small_state(enclave), heap.size, heap.chunk_size, ledger.to_wire(),
                      time.time())


# --- the destination: HEAP_END with a chunk missing ------------------------------------------------------


@pytest.mark.adversarial
@pytest.mark.timeout(60)
@pytest.mark.parametrize("missing", ["first", "middle", "last"])
def test_stopcopy_destination_refuses_heap_end_with_a_chunk_missing(enclaves: Enclaves, socks: list[socket.socket],
                                                                    missing: str) -> None:
    """The source skips one chunk and says HEAP_END(count of what it did send): the counts agree, the
    digests would too (the skipped chunk's tag is zero on both sides). The destination must still refuse,
    tell the source, and wipe what it received."""
    src, dst = enclaves.filled(), enclaves.build("host-b", incoming=True)
    runner = Runner(destination.run, dst, [socks[0]], {"timeout": TIMEOUT}, lambda info: None)
    mid = os.urandom(16)
    chan = SecureChannel(socks[2], mid)
    run_initiator(chan, src.backend, src.identity, src.policy, source_params(src, "stopcopy"), timeout=TIMEOUT)
    ledger = ChunkLedger(mid, src.heap.n_chunks, src.heap.export_chunks())
    chunks = ledger.expected.tolist()
    assert len(chunks) >= 4
    skip = {"first": chunks[0], "middle": chunks[len(chunks) // 2], "last": chunks[-1]}[missing]
    send_msg(chan, state_msg(src, "stopcopy", ledger))
    sent = [i for i in chunks if i != skip]
    for index in sent:
        ledger.record_sent(index, chan.send_chunk(index, src.heap.chunk_view(index)))
    send_msg(chan, m.HeapEnd(ledger.count))  # honest about what it sent, silent about what it skipped

    reply = recv_msg(chan)
    assert isinstance(reply, m.Abort), f"the destination answered {reply!r} to a heap with chunk {skip} missing"
    assert "truncated" in reply.reason
    err = runner.outcome()
    assert isinstance(err, MigrationError), err
    assert "before commit" in str(err) and "wiped" in str(err)
    assert dst.life.state is Life.DESTROYED and dst.app is None
    for index in sent:  # nothing of the migrated heap stays behind
        assert not np.frombuffer(dst.heap.chunk_view(index), dtype=np.uint8).any(), f"chunk {index} not wiped"


# --- the source: DONE that covers only what was delivered ------------------------------------------------


@pytest.mark.adversarial
@pytest.mark.timeout(60)
def test_source_refuses_done_before_every_chunk_was_delivered(enclaves: Enclaves, socks: list[socket.socket]) -> None:
    """Right after RESUMED, before any chunk went out, the destination says DONE(0) with the digest of its
    empty ledger: count and digest match the source's own ledger (nothing sent, every tag zero), but the
    migration has chunks. The source must refuse and keep every chunk (paused, handed off), not wipe.

    The background stream is capped so that its first chunk is due only seconds after the DONE check."""
    src = enclaves.filled()
    peer = enclaves.build("host-b", incoming=True)  # only its identity is used
    assert src.app is not None
    checksum = src.app.checksum()
    req = {"strategy": "constmig", "timeout": 2.0, "max_bandwidth": CHUNK / 6}
    runner = Runner(source.run, src, socks[:2], req, lambda info: None)
    main = SecureChannel(socks[2], None)
    keys = run_responder(main, peer.backend, peer.identity, peer.policy, timeout=TIMEOUT)
    demand = SecureChannel.resume(socks[3], main.ticket().derive(DEMAND_LABEL))
    state = recv_msg(main)
    assert isinstance(state, m.StateMsg)
    assert recv_msg(main) == m.HeapEnd(0)
    ledger = ChunkLedger.from_wire(keys.migration_id, state.heap_size // state.chunk_size, state.chunks)
    assert ledger.expected.size >= 4
    send_msg(main, m.Ready(ledger.digest()))
    assert recv_msg(main) == m.Commit()
    send_msg(main, m.Resumed(time.time()))
    send_msg(main, m.Done(ledger.count, ledger.digest(), {"tracker": "fake"}))

    err = runner.outcome()
    assert isinstance(err, MigrationError), f"the source accepted DONE(0) for {ledger.expected.size} chunks: {err!r}"
    assert "DONE" in str(err) and "handed off" in str(err)
    assert src.life.state is Life.HANDED_OFF, "the source wiped itself on an incomplete DONE"
    assert src.outgoing is not None, "the source dropped the migration it must keep for recovery"
    assert src.app.checksum() == checksum, "the source's heap changed"
    demand.close()
    main.close()


# --- a post-copy destination process: a chunk before the handoff ---------------------------------------


class EnclaveProcess:
    """A real incoming enclave process (Access Tracker), driven the way an agent drives it."""

    def __init__(self, world: World, host: str) -> None:
        self.sock_path = world.base / f"{host}-proc-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "constmig.enclave.runtime", "--app", "kvstore", "--heap", str(HEAP),
             "--chunk-size", str(CHUNK), "--mode", "incoming", "--tracker", "access", "--socket",
             str(self.sock_path), "--platform-dir", str(world.platforms[host]), "--root-pem", str(world.root_pem)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready"), f"enclave process did not start: {line!r}"
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.sock_path))
        self.fs = FramedSocket(s)

    def request(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The final reply (progress messages skipped)."""
        return self.fs.exchange(req, fds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.adversarial
@pytest.mark.timeout(90)
def test_postcopy_destination_process_refuses_a_chunk_before_heap_end(world: World, enclaves: Enclaves,
                                                                      socks: list[socket.socket]) -> None:
    pytest.importorskip("constmig.enclave.tracker")
    src = enclaves.filled()
    dst = EnclaveProcess(world, "host-b")
    replies: dict[str, Any] = {}

    def migrate_in() -> None:
        try:
            replies["dst"] = dst.request({"op": "migrate_in", "strategy": "constmig", "timeout": TIMEOUT},
                                         [socks[0].fileno(), socks[1].fileno()])
        except (ChannelClosed, OSError) as e:
            replies["dst"] = e

    thread = threading.Thread(target=migrate_in, daemon=True)
    thread.start()
    try:
        mid = os.urandom(16)
        main = SecureChannel(socks[2], mid)
        run_initiator(main, src.backend, src.identity, src.policy, source_params(src, "constmig"), timeout=TIMEOUT)
        ledger = ChunkLedger(mid, src.heap.n_chunks, src.heap.export_chunks())
        send_msg(main, state_msg(src, "constmig", ledger))
        first = int(ledger.expected[0])
        with contextlib.suppress(ChannelClosed, OSError):  # the destination may hang up mid-record
            main.send_chunk(first, src.heap.chunk_view(first))
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the destination neither refused nor finished"
        reply = replies["dst"]
        code = dst.proc.wait(10)
        assert isinstance(reply, dict), f"the enclave process died (exit status {code}) instead of refusing: {reply!r}"
        assert reply["ok"] is False and reply["kind"] == "MigrationError", reply
        assert "post-copy sends no chunk before the handoff" in reply["error"]
        assert "wiped" in reply["error"] and reply["state"] == "destroyed", reply
        assert code == 0, f"the enclave process ended with status {code}"
        with contextlib.suppress(ChannelClosed, OSError):  # its ABORT, if it is still readable
            abort = recv_msg(main)
            assert isinstance(abort, m.Abort) and "before the handoff" in abort.reason
    finally:
        dst.close()
        thread.join(5)
