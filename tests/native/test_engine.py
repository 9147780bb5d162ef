"""The native engine against the Python record path: byte-identical records, and each side opens what
the other sealed, for normal, zero and demand chunks, at any seq, and across a handover of the position."""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constmig.errors import ChannelClosed, IntegrityError, ProtocolError
from constmig.native import engine
from constmig.wire.channel import ChannelTicket, ControlRecord, SecureChannel
from constmig.wire.records import FLAG_DEMAND, FLAG_ZERO, HEADER_SIZE, MAX_CHUNK, TAG_SIZE, U64_MAX

pytestmark = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")

MID = bytes(range(16))
K1, K2 = bytes([1]) * 32, bytes([2]) * 32
CS = 1 << 13  # chunk size for these tests: small, so a socketpair holds a whole test's stream


def ticket(send_seq: int = 0, recv_seq: int = 0) -> ChannelTicket:
    """The source's side: sends with K1 in direction 1, receives with K2 in direction 2."""
    return ChannelTicket(MID, K1, K2, 1, 2, send_seq, recv_seq)


def peer_ticket(send_seq: int = 0, recv_seq: int = 0) -> ChannelTicket:
    return ChannelTicket(MID, K2, K1, 2, 1, send_seq, recv_seq)


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        assert got, "peer closed"
        buf += got
    return bytes(buf)


def python_record(index: int, data: bytes, seq: int, demand: bool = False) -> tuple[bytes, bytes]:
    """One CHUNK record as SecureChannel puts it on the wire at `seq`, and the tag it returned."""
    a, b = socket.socketpair()
    with a, b:
        chan = SecureChannel.resume(a, ticket(send_seq=seq))
        tag = chan.send_chunk(index, data, demand=demand)
        b.setblocking(False)
        out = bytearray()
        while True:
            try:
                got = b.recv(1 << 20)
            except BlockingIOError:
                break
            out += got
        return bytes(out), tag


def heap_with_data(n_chunks: int, zero: tuple[int, ...] = ()) -> np.ndarray:
    heap = np.frombuffer(os.urandom(n_chunks * CS), dtype=np.uint8).copy()
    for i in zero:
        heap[i * CS:(i + 1) * CS] = 0
    return heap


chunk_data = st.one_of(
    st.binary(min_size=1, max_size=3000),
    st.integers(1, 3000).map(bytes),  # all zeros: a FLAG_ZERO record
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=chunk_data, seq=st.integers(0, U64_MAX), index=st.integers(0, U64_MAX), demand=st.booleans())
def test_native_records_are_byte_identical_to_python_ones(data: bytes, seq: int, index: int, demand: bool):
    want, want_tag = python_record(index, data, seq, demand)
    got = engine.NativeSealer(K1, 1, MID, seq).seal_chunk(index, data, demand=demand)
    assert got.record == want and got.tag == want_tag
    assert got.zero == (not any(data)) == bool(want[5] & FLAG_ZERO)
    assert bool(want[5] & FLAG_DEMAND) == demand


@settings(max_examples=100, deadline=None)
@given(data=chunk_data, seq=st.integers(0, U64_MAX - 1), index=st.integers(0, U64_MAX), demand=st.booleans())
def test_python_sealed_records_open_natively(data: bytes, seq: int, index: int, demand: bool):
    record, tag = python_record(index, data, seq, demand)
    opener = engine.NativeOpener(K1, 1, MID, seq)
    out = bytearray(b"\xaa" * len(data))
    got_index, flags, got_tag = opener.open_chunk(record, out)
    assert (got_index, got_tag, bytes(out)) == (index, tag, data)
    assert bool(flags & FLAG_DEMAND) == demand and bool(flags & FLAG_ZERO) == (not any(data))
    assert opener.expected_seq == seq + 1


@settings(max_examples=100, deadline=None)
@given(data=chunk_data, seq=st.integers(0, U64_MAX - 1), index=st.integers(0, U64_MAX), demand=st.booleans())
def test_natively_sealed_records_open_in_python(data: bytes, seq: int, index: int, demand: bool):
    sealed = engine.NativeSealer(K1, 1, MID, seq).seal_chunk(index, data, demand=demand)
    a, b = socket.socketpair()
    with SecureChannel.resume(b, peer_ticket(recv_seq=seq)) as chan, a:
        a.sendall(sealed.record)
        rec = chan.recv(timeout=5)
        out = bytearray(len(data))
        chan.open_chunk(rec, out)
        assert (rec.index, rec.tag, bytes(out), rec.demand, rec.zero) == (index, sealed.tag, data, demand,
                                                                          not any(data))


def test_bulk_send_opens_in_a_python_channel(sockets):
    a, b = sockets
    heap = heap_with_data(8, zero=(2, 5))
    order = np.array([7, 2, 0, 5, 3], dtype=np.int64)
    sealer = engine.NativeSealer(K1, 1, MID)
    tags = sealer.send_chunks(a, heap, CS, order, demand=True)
    assert sealer.next_seq == 5 and sealer.zero_chunks_sent == 2
    chan = SecureChannel.resume(b, peer_ticket())
    for k, i in enumerate(order):
        rec = chan.recv(timeout=5)
        out = bytearray(CS)
        chan.open_chunk(rec, out)
        assert rec.index == i and rec.demand and rec.zero == (i in (2, 5))
        assert rec.tag == bytes(tags[k]) and bytes(out) == heap[i * CS:(i + 1) * CS].tobytes()


def test_bulk_receive_opens_a_python_channels_chunks_into_the_heap(sockets):
    a, b = sockets
    src = heap_with_data(8, zero=(1,))
    chan = SecureChannel.resume(a, ticket())
    order = [6, 1, 0, 3]
    tags = [chan.send_chunk(i, src[i * CS:(i + 1) * CS].data, demand=i == 3) for i in order]
    dst = np.full(8 * CS, 0xAA, dtype=np.uint8)  # not zero, so a zero chunk must really be written
    got = engine.NativeOpener(K1, 1, MID).recv_chunks(b, dst, CS, 4, timeout=5)
    assert got.indexes.tolist() == order and [bytes(t) for t in got.tags] == tags and got.next_seq == 4
    assert got.zero.tolist() == [False, True, False, False] and got.demand.tolist() == [False, False, False, True]
    for i in range(8):
        want = src[i * CS:(i + 1) * CS] if i in order else np.full(CS, 0xAA, dtype=np.uint8)
        assert np.array_equal(dst[i * CS:(i + 1) * CS], want), i


def test_the_send_position_goes_to_native_and_back(sockets):
    """Python sends, hands the sealer's position to the engine (detach: the channel stops), the engine
    sends, hands the next seq back, and the resumed channel continues: the receiver sees one stream."""
    a, b = sockets
    heap = heap_with_data(16, zero=(4,))
    py = SecureChannel.resume(a, ticket())
    tags = [py.send_chunk(i, heap[i * CS:(i + 1) * CS].data) for i in (0, 1)]
    t = py.detach()
    native = engine.NativeSealer.from_ticket(t)
    tags += [bytes(x) for x in native.send_chunks(a, heap, CS, np.arange(2, 9))]
    py2 = SecureChannel.resume(a, dataclasses.replace(t, send_seq=native.detach()))
    with pytest.raises(ProtocolError, match="detached"):
        native.seal_chunk(0, b"x")  # the native sealer can never reuse a position handed back
    tags += [py2.send_chunk(i, heap[i * CS:(i + 1) * CS].data) for i in (9, 10)]
    py2.send_control(b"done")
    rx = SecureChannel.resume(b, peer_ticket())
    for k, i in enumerate(range(11)):
        rec = rx.recv(timeout=5)
        out = bytearray(CS)
        rx.open_chunk(rec, out)
        assert (rec.index, rec.seq, rec.tag) == (i, k, tags[k]) and bytes(out) == heap[i * CS:(i + 1) * CS].tobytes()
    assert rx.recv(timeout=5) == ControlRecord(b"done")


def test_the_receive_position_goes_to_native_and_back(sockets):
    a, b = sockets
    heap = heap_with_data(16)
    tx = SecureChannel.resume(a, ticket())
    for i in range(10):
        tx.send_chunk(i, heap[i * CS:(i + 1) * CS].data)
    tx.send_control(b"done")
    dst = np.zeros_like(heap)
    py = SecureChannel.resume(b, peer_ticket())
    for _ in range(3):
        rec = py.recv(timeout=5)
        py.open_chunk(rec, dst[rec.index * CS:(rec.index + 1) * CS].data)
    t = py.detach()
    native = engine.NativeOpener.from_ticket(t)
    got = native.recv_chunks(b, dst, CS, 5, timeout=5)
    assert got.indexes.tolist() == [3, 4, 5, 6, 7] and got.next_seq == 8
    py2 = SecureChannel.resume(b, dataclasses.replace(t, recv_seq=native.detach()))
    for _ in range(2):
        rec = py2.recv(timeout=5)
        py2.open_chunk(rec, dst[rec.index * CS:(rec.index + 1) * CS].data)
    assert py2.recv(timeout=5) == ControlRecord(b"done")
    assert np.array_equal(dst[:10 * CS], heap[:10 * CS])


def test_the_last_seq_of_a_key_is_used_once():
    sealer = engine.NativeSealer(K1, 1, MID, U64_MAX)
    record = sealer.seal_chunk(0, b"x").record
    assert sealer.next_seq == 2**64
    with pytest.raises(ProtocolError, match="exhausted"):
        sealer.seal_chunk(0, b"y")
    opener = engine.NativeOpener(K1, 1, MID, U64_MAX)
    opener.open_chunk(record, bytearray(1))
    with pytest.raises(IntegrityError, match="exhausted"):
        opener.open_chunk(record, bytearray(1))


def test_bad_arguments_are_refused_in_one_line(sockets):
    a, _ = sockets
    with pytest.raises(ValueError, match="32-byte key"):
        engine.NativeSealer(b"short", 1, MID)
    with pytest.raises(ValueError, match="migration id"):
        engine.NativeOpener(K1, 1, b"short")
    with pytest.raises(ValueError, match="32 bits"):
        engine.NativeSealer(K1, 2**32, MID)
    with pytest.raises(ValueError, match="start seq"):
        engine.NativeSealer(K1, 1, MID, -1)
    sealer = engine.NativeSealer(K1, 1, MID)
    with pytest.raises(ValueError, match="chunk must be"):
        sealer.seal_chunk(0, bytes(MAX_CHUNK + 1))
    with pytest.raises(ValueError, match="outside the heap"):  # refused before anything is sent
        sealer.send_chunks(a, heap_with_data(4), CS, np.array([0, 4]))
    assert sealer.next_seq == 0
    with pytest.raises(TypeError, match="writable"):
        engine.NativeOpener(K1, 1, MID).recv_chunks(a, bytes(4 * CS), CS, 1)


def test_a_send_to_a_peer_gone_leaves_the_sealer_unusable(sockets):
    a, b = sockets
    b.close()
    sealer = engine.NativeSealer(K1, 1, MID)
    with pytest.raises(ChannelClosed, match="connection lost while sending"):
        sealer.send_chunks(a, heap_with_data(4), CS, np.arange(4))
    with pytest.raises(ProtocolError, match="unusable after an earlier failure .connection lost"):
        sealer.send_chunks(a, heap_with_data(4), CS, np.arange(4))


def test_an_opener_cannot_be_reset_by_initialising_it_again():
    opener = engine.NativeOpener(K1, 1, MID)
    with pytest.raises(ProtocolError):
        opener.open_chunk(b"garbage" * 10, bytearray(1))
    with pytest.raises(RuntimeError, match="already initialised"):
        opener._c.__init__(K1, 1, MID, 0)
    assert opener.failed


def test_record_layout_is_the_documented_one():
    sealed = engine.NativeSealer(K1, 1, MID, 7).seal_chunk(9, b"abc")
    assert sealed.record[:4] == b"CMG1" and len(sealed.record) == HEADER_SIZE + 3 + TAG_SIZE
    assert sealed.record[-TAG_SIZE:] == sealed.tag


def test_a_blocked_receive_holds_neither_the_gil_nor_the_opener_for_others(sockets):
    """While the engine waits for records, Python threads run (the GIL is released for the batch), and a
    second call on the same opener is refused instead of racing the first."""
    import threading
    import time

    a, b = sockets
    heap = heap_with_data(4)
    opener = engine.NativeOpener(K1, 1, MID)
    dst = np.zeros_like(heap)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(opener.recv_chunks(b, dst, CS, 2, timeout=10)))
    t.start()
    time.sleep(0.1)
    spins, end = 0, time.monotonic() + 0.3
    while time.monotonic() < end:
        spins += 1
    assert spins > 10_000  # this thread ran while the other sat in the engine
    with pytest.raises(RuntimeError, match="in use by another thread"):
        opener.open_chunk(b"", bytearray(1))
    engine.NativeSealer(K1, 1, MID).send_chunks(a, heap, CS, np.array([2, 0]))
    t.join(10)
    assert result and result[0].indexes.tolist() == [2, 0] and not opener.failed


@settings(max_examples=15, deadline=None)
@given(pieces=st.lists(st.integers(1, 5000), min_size=1, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_records_split_anywhere_on_sockets_with_timeouts_arrive_whole(pieces: list[int], seed: int):
    """The stream arrives in pieces of any size (record boundaries nowhere in particular) on sockets that
    Python has put in timeout mode (non-blocking underneath): the engine waits and goes on."""
    import threading
    import time

    rng = np.random.default_rng(seed)
    n = 6
    heap = rng.integers(0, 256, n * CS, dtype=np.uint8)
    heap[2 * CS:3 * CS] = 0
    order = rng.permutation(n).astype(np.int64)
    a, b = socket.socketpair()
    mid_a, mid_b = socket.socketpair()  # the sender's stream is relayed piece by piece into b
    with a, b, mid_a, mid_b:
        for s in (a, b, mid_a, mid_b):
            s.settimeout(5)

        def relay() -> None:
            got = bytearray()
            want = sum(HEADER_SIZE + (4 if i == 2 else CS) + TAG_SIZE for i in order)
            while len(got) < want:
                got += mid_b.recv(1 << 16)
            at, k = 0, 0
            while at < len(got):
                size = pieces[k % len(pieces)]
                a.sendall(got[at:at + size])
                at, k = at + size, k + 1
                if k % 100 == 0:
                    time.sleep(0.001)

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        tags = engine.NativeSealer(K1, 1, MID).send_chunks(mid_a, heap, CS, order, timeout=5)
        dst = np.full_like(heap, 0xAA)
        got = engine.NativeOpener(K1, 1, MID).recv_chunks(b, dst, CS, n, timeout=5)
        t.join(5)
    assert got.indexes.tolist() == order.tolist() and np.array_equal(got.tags, tags)
    assert np.array_equal(dst, heap)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5])
def test_chunks_smaller_than_a_zero_record_go_both_ways(sockets, chunk_size: int):
    """A zero chunk of fewer than 4 bytes makes a record longer than the chunk (its length is 4 bytes):
    buffers sized by the chunk alone would overflow (found with ASan; see docs/native.md)."""
    a, b = sockets
    heap = np.zeros(6 * chunk_size, dtype=np.uint8)
    heap[chunk_size:2 * chunk_size] = 7  # one chunk with data, five zero chunks
    tags = engine.NativeSealer(K1, 1, MID).send_chunks(a, heap, chunk_size, np.arange(6))
    dst = np.full_like(heap, 0xAA)
    got = engine.NativeOpener(K1, 1, MID).recv_chunks(b, dst, chunk_size, 6, timeout=5)
    assert np.array_equal(dst, heap) and np.array_equal(got.tags, tags)
    assert got.zero.tolist() == [True, False, True, True, True, True]
