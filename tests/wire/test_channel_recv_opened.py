"""SecureChannel.recv_opened: the post-copy receive threads' records received and opened by the native
engine at the channel's own receive position (docs/native.md step 2b). Records from the Python sealer and
from a native batch open natively, mixed with Python receives and CONTROL records, and the position
handed back is exact; nothing arriving is a timeout that leaves the channel as it was; every tampering
fails closed (the channel BROKEN, the caller's scratch untouched)."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from keyed import MID, OTHER_MID, install_destination, install_source

from constmig.errors import ChannelClosed, IntegrityError, ProtocolError, RecvTimeout
from constmig.native import engine
from constmig.native.engine import NativeOpener, NativeSealer
from constmig.wire.channel import (
    ChannelState,
    ControlRecord,
    OpenedChunk,
    SealedChunk,
    SecureChannel,
    verified,
)
from constmig.wire.records import HEADER_SIZE, TAG_SIZE

pytestmark = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")

CS = 64 << 10
N = 8
PATTERN = 0xAB


@pytest.fixture
def heap() -> np.ndarray:
    h = np.random.default_rng(5).integers(0, 256, N * CS, dtype=np.uint8)
    h[5 * CS:6 * CS] = 0  # a zero chunk goes as a FLAG_ZERO record
    return h


def _scratch() -> np.ndarray:
    return np.full(CS, PATTERN, dtype=np.uint8)


def _send_in_thread(fn) -> threading.Thread:  # noqa: ANN001
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_python_and_native_records_open_natively_in_order_between_control_records(pair, heap) -> None:
    src, dst = pair
    tags: dict[int, bytes] = {}

    def send() -> None:
        src.send_control(b"before")
        for i in range(3):
            tags[i] = src.send_chunk(i, memoryview(heap[i * CS:(i + 1) * CS]))
        batch = np.arange(3, 7)
        for i, t in zip(batch.tolist(), src.send_chunk_batch(NativeSealer, memoryview(heap), CS, batch), strict=True):
            tags[i] = t.tobytes()
        src.send_control(b"after")
        tags[7] = src.send_chunk(7, memoryview(heap[7 * CS:]))

    t = _send_in_thread(send)
    got: list = []
    scratch = _scratch()
    for k in range(N + 2):
        if k == 2:  # one record through the Python path in the middle: the position moves both ways
            rec = dst.recv(timeout=10)
            assert isinstance(rec, SealedChunk)
            plain = verified(rec, dst, scratch)
            got.append((rec.index, rec.tag, plain is None, None if plain is None else bytes(plain)))
            continue
        rec = dst.recv_opened(NativeOpener, scratch, timeout=10)
        if isinstance(rec, ControlRecord):
            got.append(rec.payload)
            continue
        assert isinstance(rec, OpenedChunk)
        got.append((rec.index, rec.tag, rec.zero, None if rec.plain is None else bytes(rec.plain)))
    t.join(10)
    assert got[0] == b"before" and got[8] == b"after"
    chunks = [g for g in got if isinstance(g, tuple)]
    assert [c[0] for c in chunks] == list(range(N))
    for index, tag, zero, data in chunks:
        assert tag == tags[index]
        assert zero == (index == 5)
        if not zero:
            assert data == heap[index * CS:(index + 1) * CS].tobytes()
    assert dst.state is ChannelState.OK
    assert dst.ticket().recv_seq == N + 2, "the position handed back is exactly one past each record"


def test_nothing_arriving_is_a_timeout_and_the_channel_stays_as_it_was(pair, heap) -> None:
    src, dst = pair
    scratch = _scratch()
    with pytest.raises(RecvTimeout, match="no record"):
        dst.recv_opened(NativeOpener, scratch, timeout=0.05)
    assert dst.state is ChannelState.OK and dst.ticket().recv_seq == 0
    assert (scratch == PATTERN).all()
    src.send_chunk(4, memoryview(heap[4 * CS:5 * CS]))
    rec = dst.recv_opened(NativeOpener, scratch, timeout=5)
    assert isinstance(rec, OpenedChunk) and rec.index == 4 and rec.seq == 0
    assert bytes(scratch) == heap[4 * CS:5 * CS].tobytes()
    assert dst.ticket().recv_seq == 1


# --- records captured as bytes, then replayed (altered) into a receiving channel ------------------------


def _records(heap: np.ndarray, n: int = 3, mid: bytes = MID) -> list[bytes]:
    """The bytes of n CHUNK records (chunks 0.., seq 0..) as the source's channel puts them on the wire."""
    a, b = socket.socketpair()
    tx = SecureChannel(a, mid)
    install_source(tx)
    out: list[bytes] = []
    try:
        for i in range(n):
            tx.send_chunk(i, memoryview(heap[i * CS:(i + 1) * CS]))
            size = HEADER_SIZE + CS + TAG_SIZE
            buf = bytearray()
            while len(buf) < size:
                buf += b.recv(size - len(buf))
            out.append(bytes(buf))
    finally:
        tx.close()
        b.close()
    return out


@pytest.fixture
def feed() -> Iterator[tuple[socket.socket, SecureChannel]]:
    """(the host's end, the destination's channel): whatever the host writes, the channel receives."""
    host, mine = socket.socketpair()
    dst = SecureChannel(mine, MID)
    install_destination(dst)
    try:
        yield host, dst
    finally:
        dst.close()
        host.close()


def _flip(rec: bytes, at: int) -> bytes:
    b = bytearray(rec)
    b[at] ^= 0x01
    return bytes(b)


def _write(host: socket.socket, data: bytes) -> threading.Thread:
    return _send_in_thread(lambda: host.sendall(data))


@pytest.mark.parametrize(("attack", "error", "match"), [
    ("ciphertext-bit", IntegrityError, "authentication"),
    ("tag-bit", IntegrityError, "authentication"),
    ("index-changed", IntegrityError, "authentication"),  # the header is associated data
    ("replayed", IntegrityError, "replayed"),
    ("reordered", IntegrityError, "reordered"),
    ("dropped", IntegrityError, "dropped"),
    ("other-migration", IntegrityError, "authentication"),
    ("bad-magic", ProtocolError, "magic"),
    ("unknown-kind", ProtocolError, "unknown record kind"),
    ("truncated", ChannelClosed, "mid-record"),
])
def test_every_tampering_fails_closed_and_leaves_the_scratch_untouched(feed, heap, attack: str, error: type,
                                                                         match: str) -> None:
    host, dst = feed
    recs = _records(heap)
    first, second, third = recs
    stream = {
        "ciphertext-bit": _flip(second, HEADER_SIZE + 1000),
        "tag-bit": _flip(second, len(second) - 1),
        "index-changed": _flip(second, HEADER_SIZE - 1),
        "replayed": first,
        "reordered": third,
        "dropped": third,
        "other-migration": _records(heap, 2, OTHER_MID)[1],
        "bad-magic": _flip(second, 0),
        "unknown-kind": bytes(second[:4]) + b"\x09" + bytes(second[5:]),
        "truncated": second[:HEADER_SIZE + 5000],
    }[attack]
    scratch = _scratch()
    writer = _write(host, first + stream)
    ok = dst.recv_opened(NativeOpener, scratch, timeout=5)
    assert isinstance(ok, OpenedChunk) and ok.index == 0
    writer.join(5)
    if attack == "truncated":
        host.shutdown(socket.SHUT_WR)
    scratch[:] = PATTERN
    with pytest.raises(error, match=match):
        dst.recv_opened(NativeOpener, scratch, timeout=5)
    assert (scratch == PATTERN).all(), "unverified bytes reached the caller's scratch"
    assert dst.state is ChannelState.BROKEN
    with pytest.raises(ProtocolError, match="broken"):  # and it stays closed: nothing more is accepted
        dst.recv_opened(NativeOpener, scratch, timeout=1)


def test_a_chunk_longer_than_the_scratch_is_refused_before_its_body_is_read(feed, heap) -> None:
    host, dst = feed
    writer = _write(host, _records(heap, 1)[0])
    small = np.full(CS // 2, PATTERN, dtype=np.uint8)
    with pytest.raises(ProtocolError, match="more than a chunk"):
        dst.recv_opened(NativeOpener, small, timeout=5)
    writer.join(5)
    assert (small == PATTERN).all() and dst.state is ChannelState.BROKEN


def test_a_control_record_is_read_and_judged_by_the_python_side(pair) -> None:
    src, dst = pair
    src.send_control(b"abort, say")
    rec = dst.recv_opened(NativeOpener, _scratch(), timeout=5)
    assert rec == ControlRecord(b"abort, say")
    assert dst.ticket().recv_seq == 1


def test_a_record_half_read_by_recv_is_finished_by_the_python_path(feed, heap) -> None:
    host, dst = feed
    rec = _records(heap, 1)[0]
    host.sendall(rec[:HEADER_SIZE + 100])
    with pytest.raises(RecvTimeout, match="incomplete"):
        dst.recv(timeout=0.05)
    writer = _write(host, rec[HEADER_SIZE + 100:])
    scratch = _scratch()
    got = dst.recv_opened(NativeOpener, scratch, timeout=5)
    writer.join(5)
    assert isinstance(got, SealedChunk) and got.index == 0
    assert bytes(verified(got, dst, scratch) or b"") == heap[:CS].tobytes()
    assert dst.ticket().recv_seq == 1


def test_a_close_here_wakes_a_native_receive_with_channel_closed(pair) -> None:
    _, dst = pair
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            dst.recv_opened(NativeOpener, _scratch(), timeout=30)
        except BaseException as e:  # noqa: BLE001 (checked below)
            errors.append(e)

    t = _send_in_thread(receive)
    t.join(0.2)
    dst.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    assert isinstance(errors[0], ChannelClosed) and "closed while receiving" in str(errors[0])


def test_a_ticket_resumed_channel_continues_after_native_receives(pair, heap) -> None:
    """A reconnect's handover: the ticket taken after native receives gives the exact position."""
    src, dst = pair
    for i in range(2):
        src.send_chunk(i, memoryview(heap[i * CS:(i + 1) * CS]))
        assert isinstance(dst.recv_opened(NativeOpener, _scratch(), timeout=5), OpenedChunk)
    ticket = dst.ticket()
    assert ticket.recv_seq == 2
    a, b = socket.socketpair()
    moved = SecureChannel.resume(b, ticket)
    tx = SecureChannel.resume(a, dataclasses.replace(src.ticket(), recv_seq=0))
    try:
        tx.send_chunk(2, memoryview(heap[2 * CS:3 * CS]))
        rec = moved.recv(timeout=5)
        assert isinstance(rec, SealedChunk) and rec.seq == 2
        buf = bytearray(CS)
        moved.open_chunk(rec, buf)
        assert bytes(buf) == heap[2 * CS:3 * CS].tobytes()
    finally:
        tx.close()
        moved.close()
