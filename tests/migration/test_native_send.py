"""The source's bulk sends through the native engine (`data_plane: "native"`, docs/native.md step 2a):
real `source.run` and `destination.run` in-process over a socketpair. Stop-and-copy and pre-copy with
rounds (the app writing meanwhile) move every byte and say which data plane moved them; a chunk record
tampered with in flight still fails closed; "native" where the engine is not built is refused before a
byte goes."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
import scripted
from scripted import TIMEOUT, Enclaves, Pairs, Runner

from constmig.enclave.dirty import enclave_problem, kernel_problem
from constmig.errors import MigrationError
from constmig.migration import destination, source
from constmig.migration.strategies import stopcopy
from constmig.native import engine
from constmig.wire.records import HEADER_SIZE, Kind, parse_header

NATIVE = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")
_TRACKING = enclave_problem() if kernel_problem() is not None else None


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 KiB chunks: the 8 MiB heap is 128 of them, several native batches."""
    monkeypatch.setattr(scripted, "CHUNK", 64 << 10)


def _migrate(enclaves: Enclaves, socks: tuple[socket.socket, socket.socket] | Pairs, writer: bool = False,
             tracker: str = "none", **req: Any) -> tuple[dict, np.ndarray, Any, dict[str, bytes]]:
    """Migrate a filled enclave over `socks` (destination's end, source's end; or two pairs for post-copy);
    returns the figures, the source heap as it was at the stop (what must arrive), the destination, and the
    writes acknowledged."""
    dst_socks, src_socks = (socks.real, socks.fake) if isinstance(socks, Pairs) else ([socks[0]], [socks[1]])
    src = enclaves.filled("host-a")
    dst = enclaves.build("host-b", incoming=True, tracker=tracker)
    receiving = Runner(destination.run, dst, dst_socks, {"timeout": TIMEOUT}, lambda info: None)
    acked: dict[str, bytes] = {}
    stop = threading.Event()

    def write() -> None:  # a client overwriting keys through the ECALL path while the rounds run
        i = 0
        while not stop.is_set():
            key, value = f"fill-{(i * 7919) % int(src.app.count)}", os.urandom(16)
            try:
                src.ecall("put", [key, value], {})
            except Exception:  # the enclave stopped
                return
            acked[key] = value
            i += 1
            time.sleep(0.001)

    at_stop: list[np.ndarray] = []
    real_stop = src.stop

    def stopping() -> Any:  # the heap as the stop leaves it: what the destination must hold
        snap = real_stop()
        at_stop.append(src.heap.buf[:src.heap.size].copy())
        return snap

    src.stop = stopping
    t = threading.Thread(target=write, daemon=True)
    if writer:
        t.start()
        time.sleep(0.1)
    try:
        figures = Runner(source.run, src, src_socks, {"timeout": TIMEOUT, **req}, lambda info: None).value()
    finally:
        stop.set()
        if writer:
            t.join(10)
    receiving.value()
    return figures, at_stop[0], dst, acked


def _same_heap(dst: Any, expected: np.ndarray) -> bool:
    return bool(np.array_equal(dst.heap.buf[:dst.heap.size], expected))


@NATIVE
def test_stopcopy_on_the_native_data_plane_moves_every_byte(enclaves: Enclaves, pair) -> None:
    figures, heap, dst, _ = _migrate(enclaves, pair, strategy="stopcopy", data_plane="native")
    assert figures["data_plane"] == "native" and figures["chunks"] > stopcopy.BATCH_CHUNKS, figures
    assert _same_heap(dst, heap)
    assert figures["wire_bytes"] > figures["state_bytes"] * 0.9  # the bytes the batches sent are counted


@NATIVE
@pytest.mark.skipif(_TRACKING is not None, reason=f"no write tracking: {_TRACKING}")
def test_precopy_rounds_on_the_native_data_plane_move_every_byte_and_write(enclaves: Enclaves, pair) -> None:
    figures, heap, dst, acked = _migrate(enclaves, pair, writer=True, strategy="precopy", data_plane="native",
                                         max_rounds=3, max_downtime=0.001, max_bandwidth=64 << 20)
    assert figures["data_plane"] == "native" and figures["rounds"] >= 1, figures
    assert _same_heap(dst, heap)
    assert acked and all(dst.app.get(k) == v for k, v in acked.items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("strategy", "plane"), [
    pytest.param("constmig", "python"), pytest.param("constmig", "native", marks=NATIVE),
    pytest.param("hybrid", "native", marks=[NATIVE, pytest.mark.skipif(_TRACKING is not None,
                                                                      reason=f"no write tracking: {_TRACKING}")])])
def test_a_postcopy_stream_moves_every_byte_on_either_data_plane(enclaves: Enclaves, pairs: Pairs, strategy: str,
                                                                 plane: str) -> None:
    """ConstMig (and hybrid's post-copy part, after its rounds) with the Access Tracker, the real source and
    destination: the stream (capped, so the app's reads at the destination demand chunks meanwhile) and the
    demands go on the plane asked for, at both ends, and every byte arrives."""
    src_app: list[Any] = []
    real_filled = enclaves.filled

    def filled(host: str = "host-a") -> Any:
        e = real_filled(host)
        src_app.append((e.app.checksum(), e.ecall("get", ["fill-3"], {})))
        return e

    enclaves.filled = filled  # type: ignore[method-assign]
    reads: list[Any] = []
    result: list[Any] = []

    def migrate() -> None:
        hybrid = strategy == "hybrid"  # a writer during its round leaves chunks for the post-copy part
        result.append(_migrate(enclaves, pairs, writer=hybrid, tracker="access", strategy=strategy, data_plane=plane,
                               max_bandwidth=4 << 20, **({"max_rounds": 1} if hybrid else {})))

    t = threading.Thread(target=migrate, daemon=True)
    t.start()
    dst = None
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:  # the destination runs: read from it while it streams
        dst = next((e for e in enclaves.made if getattr(e, "receiver", None) is not None), None)
        if dst is not None:
            reads.append(dst.ecall("get", ["fill-3"], {}))
            break
        time.sleep(0.01)
    t.join(60)
    figures, _, dst, acked = result[0]
    checksum, value = src_app[0]
    if strategy == "constmig":
        assert reads == [value], "a read while the heap streamed got the source's value"
        assert dst.ecall("checksum", [], {}) == checksum
    else:  # the writer changed values during the round: every acknowledged write is there
        assert len(reads) == 1 and acked and all(dst.ecall("get", [k], {}) == v for k, v in acked.items())
    assert figures["strategy"] == strategy and figures["tracker"] == "access"
    assert figures["data_plane"] == plane and figures["recv_data_plane"] == plane, figures
    if strategy == "constmig":
        assert figures["demand_chunks"] > 0 and figures["background_chunks"] > 0, figures
        assert figures["demand_chunks"] + figures["background_chunks"] == figures["chunks"]
    else:  # its round moved most chunks before the stop; what the writer dirtied streamed after
        assert figures["rounds"] >= 1 and figures["demand_chunks"] + figures["background_chunks"] > 0, figures


def test_the_python_data_plane_is_the_default_and_says_so(enclaves: Enclaves, pair) -> None:
    figures, heap, dst, _ = _migrate(enclaves, pair, strategy="stopcopy")
    assert figures["data_plane"] == "python"
    assert _same_heap(dst, heap)


def test_native_where_the_engine_is_not_built_is_refused_before_a_byte_goes(enclaves: Enclaves, pair,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(engine, "available", lambda: False)
    monkeypatch.setattr(engine, "why_unavailable", lambda: "the native engine was not built (test)")
    src = enclaves.filled("host-a")
    with pytest.raises(MigrationError, match=r"^data plane 'native' is not available in the source enclave: "
                                             r"the native engine was not built \(test\); use --data-plane python$"):
        source.run(src, [pair[1]], {"strategy": "stopcopy", "timeout": TIMEOUT, "data_plane": "native"},
                   lambda info: None)
    pair[0].setblocking(False)
    with pytest.raises(BlockingIOError):
        pair[0].recv(1)  # nothing was sent
    assert src.app.count > 0 and src.ecall("get", ["fill-1"], {}) is not None  # it runs on


class ChunkFlipper:
    """Relays a socketpair's records source -> destination, flipping a bit in CHUNK record `nth`; the
    destination's replies go back unchanged."""

    def __init__(self, src_end: socket.socket, dst_end: socket.socket, nth: int) -> None:
        self.src, self.dst, self.nth, self.flipped = src_end, dst_end, nth, False
        self.threads = [threading.Thread(target=self._relay, args=(a, b, edit), daemon=True)
                        for a, b, edit in ((src_end, dst_end, True), (dst_end, src_end, False))]
        for t in self.threads:
            t.start()

    def close(self, socks: list[socket.socket]) -> None:
        """Shut every socket (a blocked relay wakes only on a shutdown, not on a close), join, then close."""
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(10)
        for s in socks:
            s.close()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = sock.recv(n - len(buf))
            if not got:
                raise EOFError
            buf += got
        return buf

    def _relay(self, a: socket.socket, b: socket.socket, edit: bool) -> None:
        chunks = 0
        try:
            while True:
                head = self._read(a, HEADER_SIZE)
                body = bytearray(self._read(a, parse_header(head).length))
                if edit and parse_header(head).kind is Kind.CHUNK:
                    if chunks == self.nth:
                        body[len(body) // 2] ^= 0x04
                        self.flipped = True
                    chunks += 1
                b.sendall(head + bytes(body))
        except (OSError, EOFError, ValueError):
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _close_when_done(side: Runner, sock: socket.socket) -> None:
    side.thread.join()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@NATIVE
@pytest.mark.parametrize("nth", [0, 20])  # in the first batch, and in a later one
def test_a_tampered_chunk_from_a_native_batch_aborts_and_the_source_runs_on(enclaves: Enclaves, nth: int) -> None:
    (src_sock, relay_a), (relay_b, dst_sock) = socket.socketpair(), socket.socketpair()
    flipper = ChunkFlipper(relay_a, relay_b, nth)
    src = enclaves.filled("host-a")
    dst = enclaves.build("host-b", incoming=True)
    receiving = Runner(destination.run, dst, [dst_sock], {"timeout": TIMEOUT}, lambda info: None)
    # The failed destination's connection goes away, as its agent closes it: the source's batch, still
    # sending, learns at once rather than at its send timeout.
    threading.Thread(target=_close_when_done, args=(receiving, dst_sock), daemon=True).start()
    try:
        outcome = Runner(source.run, src, [src_sock], {"strategy": "stopcopy", "timeout": TIMEOUT,
                                                       "data_plane": "native"}, lambda info: None).outcome()
        assert isinstance(outcome, MigrationError), outcome
        assert "aborted before handoff" in str(outcome) and "keeps running here" in str(outcome)
        assert flipper.flipped
        assert "failed authentication" in str(receiving.outcome())
        assert src.ecall("get", ["fill-1"], {}) is not None  # the source runs on with its data
    finally:
        flipper.close([src_sock, relay_a, relay_b, dst_sock])
