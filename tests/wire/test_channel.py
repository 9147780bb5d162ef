"""SecureChannel over socketpairs: round trips, and an adversary in the middle that edits the bytes."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keyed import K_D2S, K_S2D, MID, OTHER_MID, install_destination, install_source

from constmig.errors import ChannelClosed, IntegrityError, ProtocolError, RecvTimeout
from constmig.wire.channel import ChannelState, ControlRecord, HandshakeRecord, SealedChunk, SecureChannel
from constmig.wire.records import (
    FLAG_ZERO,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK,
    TAG_SIZE,
    Kind,
    pack_header,
    parse_header,
)


def capture(actions: Callable[[SecureChannel], None], mid: bytes = MID, keys: bool = True) -> list[bytes]:
    """The records a source channel puts on the wire, one bytes object per record."""
    a, b = socket.socketpair()
    src = SecureChannel(a, mid)
    if keys:
        install_source(src)
    actions(src)
    src.close()
    data = bytearray()
    while chunk := b.recv(1 << 20):
        data += chunk
    b.close()
    records, i = [], 0
    while i < len(data):
        h = parse_header(data[i:i + HEADER_SIZE])
        records.append(bytes(data[i:i + HEADER_SIZE + h.length]))
        i += HEADER_SIZE + h.length
    return records


def receiver(keys: bool = True, mid: bytes | None = MID) -> tuple[socket.socket, SecureChannel]:
    """(raw socket the adversary writes into, destination channel reading from it)."""
    a, b = socket.socketpair()
    dst = SecureChannel(b, mid)
    if keys:
        install_destination(dst, None if mid else MID)
    return a, dst


def deliver(records: list[bytes], keys: bool = True, mid: bytes = MID) -> tuple[socket.socket, SecureChannel]:
    raw, dst = receiver(keys, mid)
    raw.sendall(b"".join(records))
    raw.shutdown(socket.SHUT_WR)
    return raw, dst


def chunks(n: int = 3, size: int = 4096) -> Callable[[SecureChannel], None]:
    def act(ch: SecureChannel) -> None:
        for i in range(n):
            ch.send_chunk(10 + i, bytes([i + 1]) * size)
    return act


def drain(dst: SecureChannel) -> None:
    """Receive and open records until the channel raises (the tests expect it to)."""
    while True:
        rec = dst.recv(timeout=5)
        if isinstance(rec, SealedChunk):
            dst.open_chunk(rec, bytearray(rec.length))


# --- round trips ---------------------------------------------------------------------------------------

def test_handshake_then_encrypted_records() -> None:
    a, b = socket.socketpair()
    src, dst = SecureChannel(a, MID), SecureChannel(b)  # the destination learns the id in the handshake
    src.send_handshake(b"hello")
    src.send_handshake(b"")
    assert dst.recv() == HandshakeRecord(b"hello")
    assert dst.recv() == HandshakeRecord(b"")
    dst.send_handshake(b"reply")
    assert src.recv() == HandshakeRecord(b"reply")
    install_source(src)
    with pytest.raises(ValueError, match="needs a migration id"):
        install_destination(dst)
    install_destination(dst, MID)
    assert dst.migration_id == MID and dst.keys_installed
    src.send_control(b"ctl")
    src.send_chunk(5, b"x" * 1000)
    dst.send_control(b"")
    assert dst.recv() == ControlRecord(b"ctl")
    rec = dst.recv()
    assert isinstance(rec, SealedChunk)
    assert (rec.index, rec.length, rec.seq, rec.demand) == (5, 1000, 1, False)
    out = bytearray(1000)
    assert bytes(dst.open_chunk(rec, out)) == b"x" * 1000
    assert src.recv() == ControlRecord(b"")
    assert src.bytes_sent == dst.bytes_received and dst.bytes_sent == src.bytes_received
    assert src.bytes_sent == 4 * HEADER_SIZE + len(b"hello") + (3 + TAG_SIZE) + (1000 + TAG_SIZE)


def test_demand_flag_and_numpy_target(pair: tuple[SecureChannel, SecureChannel]) -> None:
    src, dst = pair
    heap = np.random.default_rng(1).integers(0, 1 << 60, size=8192, dtype=np.int64)
    src.send_chunk(3, memoryview(heap), demand=True)
    rec = dst.recv()
    assert isinstance(rec, SealedChunk) and rec.demand and rec.length == heap.nbytes
    target = np.zeros_like(heap)
    dst.open_chunk(rec, memoryview(target).cast("B"))
    assert np.array_equal(target, heap)


def test_stream_between_threads(pair: tuple[SecureChannel, SecureChannel]) -> None:
    src, dst = pair
    n, size = 48, 1 << 20
    data = np.random.default_rng(2).integers(0, 256, size=n * size, dtype=np.uint8)

    def send() -> None:
        for i in range(n):
            src.send_chunk(i, memoryview(data[i * size:(i + 1) * size]))
            if i % 8 == 0:
                src.send_control(f"progress {i}".encode())

    th = threading.Thread(target=send)
    th.start()
    target = np.zeros_like(data)
    got, controls = 0, []
    while got < n:
        rec = dst.recv(timeout=30)
        if isinstance(rec, ControlRecord):
            controls.append(rec.payload)
            continue
        assert isinstance(rec, SealedChunk) and rec.index == got
        dst.open_chunk(rec, memoryview(target[got * size:(got + 1) * size]))
        got += 1
    th.join()
    assert np.array_equal(target, data)
    assert controls == [f"progress {i}".encode() for i in range(0, n, 8)]


def test_full_duplex_and_concurrent_senders(pair: tuple[SecureChannel, SecureChannel]) -> None:
    """Both sides send megabytes at once from two threads each; nothing deadlocks or interleaves."""
    src, dst = pair
    per_thread, size = 12, 256 * 1024
    received: dict[str, list[int]] = {"src": [], "dst": []}

    def sender(ch: SecureChannel, base: int) -> None:
        for i in range(per_thread):
            ch.send_chunk(base + i, bytes([base % 251]) * size)

    def reader(ch: SecureChannel, name: str) -> None:
        out = bytearray(size)
        for _ in range(2 * per_thread):
            rec = ch.recv(timeout=30)
            assert isinstance(rec, SealedChunk)
            ch.open_chunk(rec, out)
            base = rec.index - rec.index % 1000
            assert out == bytes([base % 251]) * size
            received[name].append(rec.index)

    threads = [threading.Thread(target=sender, args=(src, 1000)), threading.Thread(target=sender, args=(src, 2000)),
               threading.Thread(target=sender, args=(dst, 3000)), threading.Thread(target=sender, args=(dst, 4000)),
               threading.Thread(target=reader, args=(src, "src")), threading.Thread(target=reader, args=(dst, "dst"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(received["dst"]) == [*range(1000, 1012), *range(2000, 2012)]
    assert sorted(received["src"]) == [*range(3000, 3012), *range(4000, 4012)]


# --- the adversary in the middle ----------------------------------------------------------------------

def test_capture_and_deliver_unchanged() -> None:
    """The harness itself: captured records, delivered as they are, all arrive; then a clean EOF."""
    recs = capture(chunks(3))
    assert len(recs) == 3
    _, dst = deliver(recs)
    for i in range(3):
        rec = dst.recv()
        assert isinstance(rec, SealedChunk) and rec.index == 10 + i
        out = bytearray(rec.length)
        dst.open_chunk(rec, out)
        assert out == bytes([i + 1]) * 4096
    with pytest.raises(ChannelClosed, match="peer closed the connection$"):
        dst.recv()


def flipped(record: bytes, bit: int) -> bytes:
    b = bytearray(record)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


@pytest.mark.adversarial
@pytest.mark.parametrize("bit", range(HEADER_SIZE * 8))
def test_any_header_bit_flip_is_rejected(bit: int) -> None:
    recs = capture(chunks(2, size=1000))
    _, dst = deliver([flipped(recs[0], bit), recs[1]])
    with pytest.raises((ProtocolError, ChannelClosed)):  # a longer length runs into the end of the stream
        rec = dst.recv(timeout=5)
        assert isinstance(rec, SealedChunk)
        dst.open_chunk(rec, bytearray(rec.length))
    assert dst.state is ChannelState.BROKEN


@pytest.mark.parametrize(("field_bit", "name"), [
    (5 * 8 + 0, "demand flag"),
    (12 * 8 + 0, "seq"),
    (20 * 8 + 0, "chunk index"),
    (27 * 8 + 7, "chunk index"),
])
@pytest.mark.adversarial
def test_authenticated_header_fields_fail_as_integrity_errors(field_bit: int, name: str) -> None:
    recs = capture(chunks(1, size=1000))
    _, dst = deliver([flipped(recs[0], field_bit)])
    with pytest.raises(IntegrityError):
        rec = dst.recv()
        dst.open_chunk(rec, bytearray(rec.length))


@pytest.mark.adversarial
@pytest.mark.parametrize("where", ["first payload byte", "last payload byte", "tag"])
def test_payload_and_tag_flips_fail(where: str) -> None:
    rec = capture(chunks(1, size=1000))[0]
    pos = {"first payload byte": HEADER_SIZE, "last payload byte": len(rec) - TAG_SIZE - 1,
           "tag": len(rec) - 3}[where]
    _, dst = deliver([flipped(rec, pos * 8)])
    sealed = dst.recv()
    assert isinstance(sealed, SealedChunk)
    out = bytearray(b"\x55" * sealed.length)
    with pytest.raises(IntegrityError, match="failed authentication"):
        dst.open_chunk(sealed, out)
    assert out == bytes(len(out))  # unverified plaintext wiped
    assert dst.state is ChannelState.BROKEN


@pytest.mark.adversarial
def test_tampered_control_record_fails_in_recv() -> None:
    rec = capture(lambda ch: ch.send_control(b"COMMIT"))[0]
    _, dst = deliver([flipped(rec, (HEADER_SIZE + 2) * 8)])
    with pytest.raises(IntegrityError):
        dst.recv()


@pytest.mark.adversarial
def test_last_words_after_a_forged_record() -> None:
    """A receive error breaks the channel, but the send direction may still say an authenticated goodbye."""
    a, b = socket.socketpair()
    src, dst = SecureChannel(a, MID), SecureChannel(b, MID)
    install_source(src)
    install_destination(dst)
    rec = capture(lambda ch: ch.send_control(b"COMMIT"))[0]
    a.sendall(flipped(rec, (HEADER_SIZE + 2) * 8))
    with pytest.raises(IntegrityError):
        dst.recv()
    with pytest.raises(ProtocolError, match="broken"):
        dst.send_control(b"not allowed")
    dst.send_last_words(b"ABORT")
    assert dst.state is ChannelState.BROKEN
    got = src.recv(timeout=5)
    assert isinstance(got, ControlRecord) and got.payload == b"ABORT"
    src.close()
    dst.close()


@pytest.mark.parametrize(("order", "match"), [
    ((1, 0, 2), "seq 1 arrived where 0 was expected"),
    ((0, 0, 1), "replayed or duplicated"),
    ((0, 2), "dropped"),
    ((0, 1, 2, 1), "replayed"),
])
@pytest.mark.adversarial
def test_reordered_duplicated_dropped(order: tuple[int, ...], match: str) -> None:
    recs = capture(chunks(3))
    _, dst = deliver([recs[i] for i in order])
    with pytest.raises(IntegrityError, match=match):
        drain(dst)
    assert dst.state is ChannelState.BROKEN


@pytest.mark.adversarial
def test_record_from_another_migration_fails() -> None:
    """Same keys (worst case), same position, but sealed for another migration id."""
    recs = capture(chunks(1), mid=OTHER_MID)
    _, dst = deliver(recs)
    with pytest.raises(IntegrityError, match="failed authentication"):
        drain(dst)


@pytest.mark.adversarial
def test_chunk_moved_to_another_index_fails() -> None:
    rec = bytearray(capture(chunks(1))[0])
    magic, kind, flags, res, length, seq, arg = HEADER.unpack(rec[:HEADER_SIZE])
    rec[:HEADER_SIZE] = HEADER.pack(magic, kind, flags, res, length, seq, arg + 1)
    _, dst = deliver([bytes(rec)])
    with pytest.raises(IntegrityError):
        drain(dst)


@pytest.mark.adversarial
def test_reflected_record_fails() -> None:
    """A destination's own record sent back to it is under the other direction's key."""
    a, b = socket.socketpair()
    dst = SecureChannel(a, MID)
    install_destination(dst)
    dst.send_control(b"READY")
    reflected = b.recv(4096)
    b.sendall(reflected)
    with pytest.raises(IntegrityError):
        dst.recv()


@pytest.mark.adversarial
def test_control_record_relabelled_as_chunk_fails() -> None:
    rec = bytearray(capture(lambda ch: ch.send_control(b"x" * 100))[0])
    rec[4] = Kind.CHUNK
    _, dst = deliver([bytes(rec)])
    with pytest.raises(IntegrityError):
        drain(dst)


@pytest.mark.adversarial
@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 100, -1])
def test_truncated_record_is_eof_mid_record(cut: int) -> None:
    rec = capture(chunks(1))[0]
    _, dst = deliver([rec[:cut]])
    with pytest.raises(ChannelClosed, match="mid-record"):
        dst.recv()
    assert dst.state is ChannelState.BROKEN


def test_eof_before_a_record() -> None:
    _, dst = deliver([])
    with pytest.raises(ChannelClosed, match="peer closed the connection"):
        dst.recv()


def test_broken_channel_refuses_everything() -> None:
    recs = capture(chunks(2))
    raw, dst = deliver([recs[1]])
    with pytest.raises(IntegrityError):
        dst.recv()
    assert dst.state is ChannelState.BROKEN
    with pytest.raises(ProtocolError, match="broken by an earlier error: record seq 1"):
        dst.recv()
    with pytest.raises(ProtocolError, match="broken"):
        dst.send_control(b"x")
    with pytest.raises(ProtocolError, match="broken"):
        dst.send_chunk(0, b"x")
    dst.close()
    assert dst.state is ChannelState.CLOSED
    with pytest.raises(ChannelClosed, match="closed"):
        dst.recv()
    raw.close()


# --- phases --------------------------------------------------------------------------------------------

def test_encrypted_record_before_keys_is_a_protocol_error() -> None:
    recs = capture(lambda ch: ch.send_control(b"x"))
    _, dst = deliver(recs, keys=False)
    with pytest.raises(ProtocolError, match="CONTROL record arrived before keys"):
        dst.recv()


def test_handshake_record_after_keys_is_a_protocol_error() -> None:
    recs = capture(lambda ch: ch.send_handshake(b"late hello"), keys=False)
    _, dst = deliver(recs)
    with pytest.raises(ProtocolError, match="HANDSHAKE record arrived after keys"):
        dst.recv()


def test_handshake_records_are_in_order() -> None:
    rec = pack_header(Kind.HANDSHAKE, 2, seq=1) + b"hi"
    _, dst = deliver([rec], keys=False)
    with pytest.raises(ProtocolError, match="handshake record seq 1 arrived where 0"):
        dst.recv()


def test_wrong_phase_sends() -> None:
    a, b = socket.socketpair()
    ch = SecureChannel(a, MID)
    with pytest.raises(ProtocolError, match="before keys"):
        ch.send_control(b"x")
    with pytest.raises(ProtocolError, match="before keys"):
        ch.send_chunk(0, b"x")
    install_source(ch)
    with pytest.raises(ProtocolError, match="after keys"):
        ch.send_handshake(b"x")
    with pytest.raises(ProtocolError, match="already installed"):
        install_source(ch)
    assert ch.state is ChannelState.OK  # local misuse does not break the stream
    ch.close()
    b.close()


@pytest.mark.parametrize(("call", "exc"), [
    (lambda ch: ch.send_chunk(0, b""), ValueError),
    (lambda ch: ch.send_chunk(0, bytes(MAX_CHUNK + 1)), ValueError),
    (lambda ch: ch.send_chunk(-1, b"x"), ValueError),
    (lambda ch: ch.send_chunk(1 << 64, b"x"), ValueError),
    (lambda ch: ch.send_chunk("0", b"x"), ValueError),
    (lambda ch: ch.send_chunk(0, "text"), TypeError),
    (lambda ch: ch.send_control(bytes((1 << 20) + 1)), ValueError),
    (lambda ch: ch.send_control(None), TypeError),
])
def test_bad_send_arguments(pair: tuple[SecureChannel, SecureChannel], call: Callable, exc: type) -> None:
    src, _ = pair
    with pytest.raises(exc):
        call(src)
    assert src.state is ChannelState.OK


@pytest.mark.parametrize(("args", "kwargs", "exc"), [
    ((K_S2D, K_D2S, 1, 1), {}, ValueError),
    ((K_S2D, K_S2D, 1, 2), {}, ValueError),
    ((bytes(31), K_D2S, 1, 2), {}, ValueError),
    ((K_S2D, K_D2S, 1, 2), {"migration_id": b"short"}, ValueError),
    ((K_S2D, K_D2S, 1, 2), {"migration_id": OTHER_MID}, ProtocolError),
])
def test_bad_install_keys(args: tuple, kwargs: dict, exc: type) -> None:
    a, b = socket.socketpair()
    ch = SecureChannel(a, MID)
    with pytest.raises(exc):
        ch.install_keys(*args, **kwargs)
    assert not ch.keys_installed
    ch.close()
    b.close()


def test_bad_migration_id() -> None:
    a, b = socket.socketpair()
    for bad in (b"", bytes(15), bytes(17), "x" * 16):
        with pytest.raises(ValueError):
            SecureChannel(a, bad)  # type: ignore[arg-type]
    a.close()
    b.close()


# --- chunks: opening discipline -------------------------------------------------------------------------

def test_open_chunk_checks_its_arguments(pair: tuple[SecureChannel, SecureChannel]) -> None:
    src, dst = pair
    src.send_chunk(1, b"a" * 100)
    src.send_chunk(2, b"b" * 100)
    first = dst.recv()
    assert isinstance(first, SealedChunk)
    with pytest.raises(TypeError):
        dst.open_chunk(first, bytes(100))
    assert dst.state is ChannelState.OK
    out = bytearray(100)
    dst.open_chunk(first, out)
    with pytest.raises(ValueError, match="not the one pending"):
        dst.open_chunk(first, out)  # opened already
    second = dst.recv()
    assert isinstance(second, SealedChunk)
    dst.open_chunk(second, out)
    assert out == b"b" * 100


@pytest.mark.adversarial
def test_a_chunk_of_another_length_than_expected_is_a_protocol_error(pair: tuple[SecureChannel, SecureChannel]) -> None:
    """A record whose (authentic) length is not what the receiver expects at that place: a protocol error
    that breaks the channel before a byte is written, never a ValueError that escapes the receive path."""
    src, dst = pair
    src.send_chunk(1, b"a" * 100)
    rec = dst.recv()
    assert isinstance(rec, SealedChunk)
    out = bytearray(b"u" * 99)
    with pytest.raises(ProtocolError, match="carries 100 bytes where 99 were expected"):
        dst.open_chunk(rec, out)
    assert out == b"u" * 99 and dst.state is ChannelState.BROKEN


# --- zero chunks -----------------------------------------------------------------------------------------

def test_zero_chunk_travels_as_its_length(pair: tuple[SecureChannel, SecureChannel]) -> None:
    src, dst = pair
    before = src.bytes_sent
    src.send_chunk(7, bytes(1 << 20), demand=True)
    assert src.bytes_sent - before == HEADER_SIZE + 4 + TAG_SIZE and src.zero_chunks_sent == 1
    src.send_chunk(8, bytes(4095) + b"\x01")  # one byte of data at the very end: not a zero chunk
    assert src.zero_chunks_sent == 1
    rec = dst.recv()
    assert isinstance(rec, SealedChunk)
    assert (rec.index, rec.length, rec.zero, rec.demand) == (7, 1 << 20, True, True)
    out = bytearray(b"x" * (1 << 20))
    dst.open_chunk(rec, out)
    assert not any(out)
    rec = dst.recv()
    assert isinstance(rec, SealedChunk) and not rec.zero
    with pytest.raises(ValueError, match="takes only a zero chunk"):
        dst.open_zero(rec)
    assert bytes(dst.open_chunk(rec, bytearray(4096)))[-1] == 1


def test_open_zero_writes_nothing(pair: tuple[SecureChannel, SecureChannel]) -> None:
    src, dst = pair
    src.send_chunk(3, bytes(4096))
    src.send_control(b"after")
    rec = dst.recv()
    assert isinstance(rec, SealedChunk) and rec.zero
    dst.open_zero(rec)
    with pytest.raises(ValueError, match="not the one pending"):
        dst.open_zero(rec)
    assert dst.recv() == ControlRecord(b"after")


@pytest.mark.adversarial
@pytest.mark.parametrize("edit", ["flag-on-data", "flag-off-zero", "claim"])
def test_forged_zero_chunks_are_rejected(edit: str) -> None:
    """The host sets FLAG_ZERO on a data chunk, clears it on a zero chunk, or edits the claimed length."""
    recs = capture(lambda ch: ch.send_chunk(1, bytes(4096) if edit != "flag-on-data" else b"d" * 4096))
    rec = bytearray(recs[0])
    if edit == "claim":
        rec[HEADER_SIZE] ^= 0x01  # first ciphertext byte of the 4-byte length
    else:
        rec[5] ^= FLAG_ZERO  # the flags byte (records.HEADER: magic, kind, flags, ...)
    _, dst = deliver([bytes(rec)])
    with pytest.raises(ProtocolError):
        drain(dst)


def test_unopened_chunk_is_still_verified(pair: tuple[SecureChannel, SecureChannel]) -> None:
    src, dst = pair
    src.send_chunk(1, b"a" * 100)
    src.send_control(b"next")
    stale = dst.recv()
    assert dst.recv() == ControlRecord(b"next")  # the skipped chunk was verified into scratch
    with pytest.raises(ValueError, match="not the one pending"):
        dst.open_chunk(stale, bytearray(100))


@pytest.mark.adversarial
def test_unopened_tampered_chunk_breaks_the_next_recv() -> None:
    recs = capture(chunks(2))
    _, dst = deliver([flipped(recs[0], (HEADER_SIZE + 5) * 8), recs[1]])
    dst.recv()
    with pytest.raises(IntegrityError):
        dst.recv()


def test_discard_chunk_verifies(pair: tuple[SecureChannel, SecureChannel]) -> None:
    recs = capture(chunks(1))
    _, dst = deliver([flipped(recs[0], (HEADER_SIZE + 5) * 8)])
    rec = dst.recv()
    assert isinstance(rec, SealedChunk)
    with pytest.raises(IntegrityError):
        dst.discard_chunk(rec)


# --- timeouts, close, socket errors -----------------------------------------------------------------------

def test_timeout_keeps_the_channel_and_a_partial_record() -> None:
    rec = capture(lambda ch: ch.send_control(b"slow message"))[0]
    raw, dst = receiver()
    with pytest.raises(RecvTimeout, match="no record from the peer within 0.05 s"):
        dst.recv(timeout=0.05)
    raw.sendall(rec[:10])
    with pytest.raises(RecvTimeout, match="incomplete"):
        dst.recv(timeout=0.05)
    raw.sendall(rec[10:40])
    with pytest.raises(RecvTimeout, match="incomplete"):
        dst.recv(timeout=0.05)
    assert dst.state is ChannelState.OK
    raw.sendall(rec[40:])
    assert dst.recv(timeout=1) == ControlRecord(b"slow message")


def test_timeout_on_a_slow_trickle() -> None:
    rec = capture(chunks(1, size=1000))[0]
    raw, dst = receiver()

    def trickle() -> None:
        for i in range(0, len(rec), 300):
            raw.sendall(rec[i:i + 300])
            time.sleep(0.01)

    th = threading.Thread(target=trickle)
    th.start()
    got = None
    while got is None:
        with contextlib.suppress(RecvTimeout):
            got = dst.recv(timeout=0.003)
    th.join()
    assert isinstance(got, SealedChunk) and got.index == 10
    dst.open_chunk(got, bytearray(1000))


def test_close_wakes_a_blocked_receiver(pair: tuple[SecureChannel, SecureChannel]) -> None:
    _, dst = pair
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            dst.recv()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    th = threading.Thread(target=blocked)
    th.start()
    time.sleep(0.05)
    dst.close()
    th.join(5)
    assert not th.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosed)
    dst.close()  # idempotent


def test_peer_close_during_send_is_channel_closed() -> None:
    a, b = socket.socketpair()
    src = SecureChannel(a, MID)
    install_source(src)
    b.close()
    with pytest.raises(ChannelClosed, match="connection lost while sending"):
        for i in range(100):
            src.send_chunk(i, bytes(64 * 1024))
    assert src.state is ChannelState.BROKEN


def test_a_socket_closed_on_this_side_is_channel_closed() -> None:
    """Another thread (a cancel, a test's cut) closes the socket object before a timed receive polls it:
    ChannelClosed, never a ValueError from polling fd -1 (seen as a flaky post-copy test)."""
    a, b = socket.socketpair()
    ch = SecureChannel(a, MID)
    a.close()
    with pytest.raises(ChannelClosed, match="closed on this side"):
        ch.recv(timeout=1)
    assert ch.state is ChannelState.BROKEN
    b.close()


class FakeSocket:
    """A stream that fails the way a reset TCP connection does."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def sendall(self, data: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def recv_into(self, buf: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        if self.data:
            n = min(len(buf), len(self.data))
            buf[:n] = self.data[:n]
            self.data = self.data[n:]
            return n
        raise ConnectionResetError(104, "Connection reset by peer")

    def close(self) -> None:
        pass


def test_reset_is_channel_closed() -> None:
    ch = SecureChannel(FakeSocket(MAGIC), MID)
    with pytest.raises(ChannelClosed, match="connection lost: Connection reset by peer"):
        ch.recv()
    assert ch.state is ChannelState.BROKEN
    ch2 = SecureChannel(FakeSocket(), MID)
    with pytest.raises(ChannelClosed, match="Broken pipe"):
        ch2.send_handshake(b"x")


# --- anything an adversary can send ------------------------------------------------------------------------

def _header_like(kind: int, length: int, seq: int, arg: int, flags: int) -> bytes:
    return HEADER.pack(MAGIC, kind, flags, 0, length, seq, arg)


stream_parts = st.one_of(
    st.binary(max_size=64),
    st.builds(_header_like, st.integers(0, 4), st.integers(0, 300), st.integers(0, 3), st.integers(0, 3),
              st.integers(0, 1)),
    st.sampled_from(capture(chunks(2, size=100)) + capture(lambda ch: ch.send_control(b"ok"))
                    + capture(lambda ch: ch.send_handshake(b"hs"), keys=False)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(stream_parts, max_size=6), st.booleans())
def test_arbitrary_streams_raise_only_protocol_errors(parts: list[bytes], keys: bool) -> None:
    raw, dst = deliver(list(parts), keys=keys)
    try:
        with pytest.raises((ProtocolError, ChannelClosed)) as e:
            for _ in range(20):
                rec = dst.recv(timeout=5)
                if isinstance(rec, SealedChunk):
                    dst.open_chunk(rec, bytearray(rec.length))
        assert not isinstance(e.value, RecvTimeout)  # the stream ended: every path must end in an error
        assert dst.state is ChannelState.BROKEN
    finally:
        raw.close()
        dst.close()


def test_exhausted_sequence_numbers_break_the_channel(pair: tuple[SecureChannel, SecureChannel]) -> None:
    """After 2**64 records under one key the channel stops (a ProtocolError, the channel BROKEN), never
    reusing a nonce and never raising a stray ValueError out of a send path."""
    src, _ = pair
    src._sealer._next_seq = 2**64  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="exhausted"):
        src.send_control(b"x")
    assert src.state is ChannelState.BROKEN
