"""SecureChannel.send_chunk_batch: a batch of chunks sealed and sent by the native engine at the channel's
own send position. The records open with the Python opener in order, between CONTROL records sent before
and after (the counter stays exact), carry the tags the batch returned, and a batch that fails leaves the
channel refusing to send."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from keyed import MID, install_source

from constmig.errors import ChannelClosed, ProtocolError
from constmig.native import engine
from constmig.wire.channel import ChannelState, ControlRecord, SealedChunk, SecureChannel
from constmig.wire.records import HEADER_SIZE, TAG_SIZE, ZERO_PAYLOAD

pytestmark = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")

CS = 64 << 10
N = 12


@pytest.fixture
def heap() -> np.ndarray:
    h = np.random.default_rng(3).integers(0, 256, N * CS, dtype=np.uint8)
    h[5 * CS:6 * CS] = 0  # a zero chunk goes as a FLAG_ZERO record
    return h


def _receive(dst: SecureChannel, count: int, out: list) -> None:
    """Every record in order: CONTROL payloads, and (index, tag, zero, bytes) per chunk."""
    try:
        for _ in range(count):
            rec = dst.recv(timeout=10)
            if isinstance(rec, ControlRecord):
                out.append(rec.payload)
                continue
            assert isinstance(rec, SealedChunk)
            buf = bytearray(rec.length)
            dst.open_chunk(rec, buf)
            out.append((rec.index, rec.tag, rec.zero, bytes(buf)))
    except Exception as e:  # noqa: BLE001 (checked by the test)
        out.append(e)


def _run(src: SecureChannel, dst: SecureChannel, count: int, send) -> list:  # noqa: ANN001
    got: list = []
    t = threading.Thread(target=_receive, args=(dst, count, got))
    t.start()
    try:
        send()
    finally:
        t.join(30)
    return got


def test_a_batch_opens_in_order_between_control_records(pair, heap):
    src, dst = pair
    order = np.array([7, 0, 5, 11, 3], dtype=np.int64)
    tags: list[np.ndarray] = []

    def send() -> None:
        src.send_control(b"before")
        tags.append(src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS, order))
        src.send_control(b"between")
        tags.append(src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS, order[:2]))
        src.send_chunk(9, memoryview(heap)[9 * CS:10 * CS])  # the Python path goes on at the next seq
        src.send_control(b"after")

    got = _run(src, dst, 2 + order.size + 2 + 1 + 1, send)
    assert not any(isinstance(g, Exception) for g in got), got
    assert got[0] == b"before" and got[1 + order.size] == b"between" and got[-1] == b"after"
    chunks = got[1:1 + order.size] + got[2 + order.size:4 + order.size]
    sent = [*order.tolist(), *order[:2].tolist()]
    assert [c[0] for c in chunks] == sent
    assert [c[1] for c in chunks] == [t.tobytes() for t in np.concatenate(tags)]
    assert all(c[3] == heap[i * CS:(i + 1) * CS].tobytes() for c, i in zip(chunks, sent, strict=True))
    assert [c[2] for c in chunks] == [i == 5 for i in sent]
    assert got[-2][0] == 9 and got[-2][3] == heap[9 * CS:10 * CS].tobytes()
    assert src.zero_chunks_sent == 1
    assert src.bytes_sent == dst.bytes_received
    assert src.ticket().send_seq == dst.ticket().recv_seq == 2 + len(sent) + 1 + 1


def test_the_byte_count_covers_data_and_zero_records(pair, heap):
    src, dst = pair
    got = _run(src, dst, 2, lambda: src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS,
                                                         np.array([5, 1])))
    assert len(got) == 2 and src.bytes_sent == 2 * HEADER_SIZE + ZERO_PAYLOAD + CS + 2 * TAG_SIZE


def test_a_batch_that_fails_midway_leaves_the_channel_refusing_to_send(pair, heap):
    src, dst = pair
    dst.close()  # the peer is gone: the first record's send fails
    with pytest.raises(ChannelClosed, match="connection lost while sending"):
        src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS, np.arange(N))
    assert src.state is ChannelState.BROKEN
    with pytest.raises(ProtocolError, match="broken by an earlier error"):
        src.send_control(b"more")
    with pytest.raises(ProtocolError, match="broken by an earlier error"):
        src.send_last_words(b"abort")  # part of a record may be out: not even last words


def test_a_stalled_peer_times_out_like_the_python_path(heap):
    a, b = socket.socketpair()
    src = SecureChannel(a, MID)
    install_source(src)
    a.settimeout(0.3)  # as source.py sets it: bounds a send to a peer that stopped reading
    try:
        with pytest.raises(ChannelClosed, match="peer stopped reading: send timed out"):
            src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS, np.arange(N))
        assert src.state is ChannelState.BROKEN
    finally:
        src.close()
        b.close()


def test_an_index_outside_the_heap_sends_nothing_and_still_fails_closed(pair, heap):
    src, _ = pair
    with pytest.raises(ValueError, match="outside the heap"):
        src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS, np.array([0, N]))
    assert src.state is ChannelState.BROKEN


def test_a_batch_before_keys_is_refused():
    a, b = socket.socketpair()
    with SecureChannel(a, MID) as src, pytest.raises(ProtocolError, match="before keys are installed"):
        src.send_chunk_batch(engine.NativeSealer, memoryview(bytearray(CS)), CS, np.array([0]))
    b.close()


def test_a_closed_channel_refuses_a_batch(pair, heap):
    src, _ = pair
    src.close()
    with pytest.raises(ChannelClosed, match="closed"):
        src.send_chunk_batch(engine.NativeSealer, memoryview(heap), CS, np.array([0]))
