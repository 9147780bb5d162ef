"""The host in the middle edits the byte stream the native receiver reads: every edit fails closed with
the Python side's exception types, nothing unverified reaches the heap, and the opener stays refused."""

from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constmig.errors import ChannelClosed, IntegrityError, ProtocolError
from constmig.native import engine
from constmig.wire.channel import ChannelTicket, SecureChannel
from constmig.wire.records import HEADER, HEADER_SIZE, MAX_CHUNK, TAG_SIZE, Kind

pytestmark = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")

MID = bytes(range(16))
K1, K2 = bytes([1]) * 32, bytes([2]) * 32
CS = 1 << 12
N_CHUNKS = 8
FILL = 0xAA  # the receiver's heap before: a chunk still FILL was never written


def records(chunks: list[tuple[int, bytes]], cs: int = CS) -> list[bytes]:
    """Python-sealed CHUNK records (index, data) as SecureChannel sends them, one bytes object each."""
    out = []
    a, b = socket.socketpair()
    with a, b:
        chan = SecureChannel.resume(a, ChannelTicket(MID, K1, K2, 1, 2))
        for index, data in chunks:
            chan.send_chunk(index, data)
            out.append(b.recv(HEADER_SIZE, socket.MSG_WAITALL))
            (length,) = struct.unpack_from("!I", out[-1], 8)
            out[-1] += b.recv(length, socket.MSG_WAITALL)
    return out


def data(i: int) -> bytes:
    return bytes([i + 1]) * (CS // 2) + os.urandom(CS // 2)


def stream(n: int = 3) -> tuple[list[bytes], list[bytes]]:
    """(records, their chunks' bytes) for chunks 0..n-1, chunk 1 all zeros."""
    chunks = [(i, bytes(CS) if i == 1 else data(i)) for i in range(n)]
    return records(chunks), [c for _, c in chunks]


def receive(wire: bytes, count: int, heap: np.ndarray | None = None,
            opener: engine.NativeOpener | None = None) -> tuple[engine.NativeOpener, np.ndarray, Exception | None]:
    """Feed `wire` (then EOF) to a native receiver expecting `count` records."""
    heap = np.full(N_CHUNKS * CS, FILL, dtype=np.uint8) if heap is None else heap
    opener = opener or engine.NativeOpener(K1, 1, MID)
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (a.sendall(wire), a.shutdown(socket.SHUT_WR)), daemon=True)
    writer.start()
    err = None
    try:
        opener.recv_chunks(b, heap, CS, count, timeout=10)
    except Exception as e:  # noqa: BLE001 (the test checks its type)
        err = e
    writer.join(10)
    a.close()
    b.close()
    return opener, heap, err


def untouched(heap: np.ndarray, *chunks: int) -> bool:
    return all((heap[i * CS:(i + 1) * CS] == FILL).all() for i in chunks)


def assert_refused_after(opener: engine.NativeOpener) -> None:
    """A failed opener refuses even a perfectly good record afterwards."""
    assert opener.failed
    good = records([(0, data(0))])[0]
    with pytest.raises(IntegrityError, match="unusable after an earlier failure"):
        opener.open_chunk(good, bytearray(CS))
    _, _, err = receive(good, 1, opener=opener)
    assert isinstance(err, IntegrityError) and "unusable after an earlier failure" in str(err)


def test_an_untampered_stream_arrives():
    recs, chunks = stream()
    opener, heap, err = receive(b"".join(recs), 3)
    assert err is None and not opener.failed
    assert all(heap[i * CS:(i + 1) * CS].tobytes() == chunks[i] for i in range(3))


@pytest.mark.parametrize("at", range(HEADER_SIZE))
def test_every_header_byte_is_guarded(at: int):
    """Any bit of the third record's header changed: it is refused (malformed, misplaced or forged)."""
    recs, _ = stream()
    bad = bytearray(recs[2])
    bad[at] ^= 0x01
    opener, heap, err = receive(b"".join(recs[:2]) + bytes(bad), 3)
    assert isinstance(err, ProtocolError), err  # IntegrityError is a ProtocolError
    assert untouched(heap, 2, 3)
    assert_refused_after(opener)


@pytest.mark.parametrize("where", ["first payload byte", "last payload byte", "first tag byte", "last tag byte"])
def test_a_payload_or_tag_byte_changed_fails_authentication(where: str):
    recs, _ = stream()
    bad = bytearray(recs[2])
    at = {"first payload byte": HEADER_SIZE, "last payload byte": -TAG_SIZE - 1,
          "first tag byte": -TAG_SIZE, "last tag byte": -1}[where]
    bad[at] ^= 0x80
    opener, heap, err = receive(b"".join(recs[:2]) + bytes(bad), 3)
    assert isinstance(err, IntegrityError) and "failed authentication" in str(err)
    assert untouched(heap, 2)  # decrypted into scratch only: not a byte reached the heap
    assert_refused_after(opener)


def test_a_tampered_zero_record_writes_no_zeros():
    recs, _ = stream()
    bad = bytearray(recs[1])  # chunk 1 is all zeros: a FLAG_ZERO record
    bad[HEADER_SIZE] ^= 0x01
    opener, heap, err = receive(recs[0] + bytes(bad), 2)
    assert isinstance(err, IntegrityError) and untouched(heap, 1)
    assert_refused_after(opener)


@pytest.mark.parametrize("order, why", [((0, 1, 1), "replayed"), ((0, 0), "replayed"), ((1, 0), "reordered"),
                                        ((0, 2), "dropped")])
def test_replayed_reordered_or_dropped_records_are_refused(order: tuple[int, ...], why: str):
    recs, _ = stream()
    opener, heap, err = receive(b"".join(recs[i] for i in order), len(order))
    assert isinstance(err, IntegrityError) and why in str(err), err
    assert_refused_after(opener)


def test_a_record_of_another_key_direction_or_migration_is_refused():
    recs, _ = stream(1)
    for opener in (engine.NativeOpener(K2, 1, MID), engine.NativeOpener(K1, 2, MID),
                   engine.NativeOpener(K1, 1, bytes(16))):
        opener, heap, err = receive(recs[0], 1, opener=opener)
        assert isinstance(err, IntegrityError) and "failed authentication" in str(err)
        assert untouched(heap, 0)


@pytest.mark.parametrize("cut", [0, 10, HEADER_SIZE, HEADER_SIZE + 100, -1])
def test_a_stream_cut_short_is_refused(cut: int):
    recs, _ = stream(3)
    opener, heap, err = receive(recs[0] + recs[1] + recs[2][:cut], 3)  # record 2 carries data
    assert isinstance(err, ChannelClosed), err
    assert ("mid-record" in str(err)) == (cut != 0)
    assert untouched(heap, 2)
    assert_refused_after(opener)


def test_a_chunk_index_outside_the_heap_is_refused():
    recs = records([(0, data(0)), (N_CHUNKS, data(1))])  # validly sealed, but for a chunk this heap lacks
    opener, heap, err = receive(b"".join(recs), 2)
    assert isinstance(err, ProtocolError) and "outside the heap" in str(err)
    assert_refused_after(opener)


def test_a_chunk_of_another_size_is_refused_before_it_is_opened():
    recs = records([(0, data(0)), (1, os.urandom(CS * 2))])
    opener, heap, err = receive(b"".join(recs), 2)
    assert isinstance(err, ProtocolError) and "where 4096 were expected" in str(err)
    assert untouched(heap, 1, 2)
    assert_refused_after(opener)


def test_a_zero_record_for_another_size_is_refused():
    recs = records([(3, bytes(CS // 2))])
    opener, heap, err = receive(recs[0], 1)
    assert isinstance(err, ProtocolError) and "2048 bytes where 4096" in str(err)
    assert untouched(heap, 3)


def test_an_oversized_length_claim_is_refused_before_waiting_for_the_body():
    """A header claiming more than any chunk: refused at once, not after reading (or awaiting) its body.
    No body follows and the writer keeps the connection open, so waiting would time out instead."""
    header = HEADER.pack(b"CMG1", Kind.CHUNK, 0, 0, MAX_CHUNK + TAG_SIZE + 257, 0, 0)
    opener = engine.NativeOpener(K1, 1, MID)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header)
        with pytest.raises(ProtocolError, match="outside"):
            opener.recv_chunks(b, np.zeros(N_CHUNKS * CS, dtype=np.uint8), CS, 1, timeout=5)
    assert opener.failed


def test_a_control_record_is_refused_by_the_chunk_receiver():
    a, b = socket.socketpair()
    with a, b:
        SecureChannel.resume(a, ChannelTicket(MID, K1, K2, 1, 2)).send_control(b"hello")
        opener = engine.NativeOpener(K1, 1, MID)
        with pytest.raises(ProtocolError, match="CONTROL record arrived"):
            opener.recv_chunks(b, np.zeros(N_CHUNKS * CS, dtype=np.uint8), CS, 1, timeout=5)
    assert opener.failed


def test_a_silent_peer_times_out_and_the_stream_is_given_up():
    recs, _ = stream(1)
    opener = engine.NativeOpener(K1, 1, MID)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(recs[0][:40])
        b.setblocking(False)
        with pytest.raises(ChannelClosed, match="peer silent"):
            opener.recv_chunks(b, np.zeros(N_CHUNKS * CS, dtype=np.uint8), CS, 1, timeout=0.2)
    assert opener.failed


@settings(max_examples=200, deadline=None)
@given(at=st.integers(0, HEADER_SIZE + CS + TAG_SIZE - 1), bit=st.integers(0, 7), seq=st.integers(0, 2**40))
def test_any_flipped_bit_fails_the_single_record_opener(at: int, bit: int, seq: int):
    a, b = socket.socketpair()
    with a, b:
        SecureChannel.resume(a, ChannelTicket(MID, K1, K2, 1, 2, seq)).send_chunk(5, data(5))
        rec = bytearray(b.recv(HEADER_SIZE + CS + TAG_SIZE, socket.MSG_WAITALL))
    rec[at] ^= 1 << bit
    out = bytearray([FILL]) * CS
    opener = engine.NativeOpener(K1, 1, MID, seq)
    with pytest.raises(ProtocolError):
        opener.open_chunk(rec, out)
    assert out == bytearray([FILL]) * CS and opener.failed
    with pytest.raises(IntegrityError, match="unusable"):
        opener.open_chunk(rec, out)
