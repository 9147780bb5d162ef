"""SecureChannel details that mutation testing (tools/mutation.py) found untested: zero detection at every
size, the ticket handed to the pager, a sealed chunk's view, control payloads at the limit, zero records
at the edges of the chunk range, and which side of a broken channel may still say goodbye."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator

import pytest

from constmig.errors import ConstmigError, ProtocolError
from constmig.wire.channel import ChannelTicket, SealedChunk, SecureChannel, is_zero
from constmig.wire.records import MAX_CHUNK, MAX_CONTROL_PAYLOAD, TAG_SIZE

MID = bytes(range(16))
KA, KB = b"\x0a" * 32, b"\x0b" * 32


@pytest.fixture
def chans() -> Iterator[tuple[SecureChannel, SecureChannel]]:
    a, b = socket.socketpair()
    ca, cb = SecureChannel(a, MID), SecureChannel(b, MID)
    ca.install_keys(KA, KB, 1, 2)
    cb.install_keys(KB, KA, 2, 1)
    try:
        yield ca, cb
    finally:
        ca.close()
        cb.close()


@pytest.mark.parametrize("size", [1, 6, 7, 8, 9, 14, 16, 21, 4095, 4096, 4097, 8200])
def test_is_zero_at_every_size(size: int) -> None:
    assert is_zero(bytes(size))
    for at in {0, size // 2, size - 1}:
        data = bytearray(size)
        data[at] = 1
        assert not is_zero(data), f"a 1 at {at} of {size} bytes went unnoticed"


def test_ticket_round_trip() -> None:
    t = ChannelTicket(MID, KA, KB, 1, 2, 5, 7)
    assert ChannelTicket.from_wire(t.to_wire()) == t
    assert "send_key" not in repr(t) and "recv_key" not in repr(t) and repr(KA) not in repr(t)


@pytest.mark.adversarial
@pytest.mark.parametrize("change", [
    {"mid": bytes(15)}, {"sk": bytes(31)}, {"rk": bytes(31)}, {"rk": bytes(33)}, {"sk": "k" * 32},
    {"sd": "1"}, {"rs": 1.0}, {"ss": None},
], ids=str)
def test_malformed_ticket_is_refused(change: dict) -> None:
    with pytest.raises(ProtocolError, match="malformed channel ticket"):
        ChannelTicket.from_wire({**ChannelTicket(MID, KA, KB, 1, 2).to_wire(), **change})


@pytest.mark.parametrize("missing", ["mid", "sk", "rk", "sd", "rd", "ss", "rs"])
def test_ticket_missing_a_field_is_refused(missing: str) -> None:
    d = ChannelTicket(MID, KA, KB, 1, 2).to_wire()
    del d[missing]
    with pytest.raises(ProtocolError, match="malformed channel ticket"):
        ChannelTicket.from_wire(d)


def test_sealed_chunk_view(chans: tuple[SecureChannel, SecureChannel]) -> None:
    ca, cb = chans
    tag = ca.send_chunk(3, b"\x07" * 1000)
    rec = cb.recv(timeout=5)
    assert isinstance(rec, SealedChunk)
    assert isinstance(rec.tag, bytes) and rec.tag == tag and len(rec.tag) == TAG_SIZE
    assert "_ct" not in repr(rec) and "_aad" not in repr(rec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.index = 4  # type: ignore[misc]
    assert not hasattr(rec, "__dict__")
    assert bytes(cb.open_chunk(rec, bytearray(1000))) == b"\x07" * 1000


def test_control_payload_of_exactly_the_limit(chans: tuple[SecureChannel, SecureChannel]) -> None:
    ca, cb = chans
    got: list = []
    t = threading.Thread(target=lambda: got.append(cb.recv(timeout=10)))
    t.start()
    ca.send_control(b"c" * MAX_CONTROL_PAYLOAD)
    t.join(10)
    assert got[0].payload == b"c" * MAX_CONTROL_PAYLOAD
    with pytest.raises(ValueError, match="exceeds"):
        ca.send_control(b"c" * (MAX_CONTROL_PAYLOAD + 1))


@pytest.mark.parametrize("size", [1, MAX_CHUNK])
def test_zero_records_at_the_edges_of_the_chunk_range(chans: tuple[SecureChannel, SecureChannel],
                                                      size: int) -> None:
    ca, cb = chans
    ca.send_chunk(9, bytes(size))
    rec = cb.recv(timeout=5)
    assert isinstance(rec, SealedChunk) and rec.length == size and rec.index == 9
    out = bytearray(b"\xff" * size)
    cb.open_chunk(rec, out)
    assert not any(out)


def test_last_words_need_a_working_send_side() -> None:
    """After a failed send the stream position of the send side is unknown: no goodbye either."""
    a, b = socket.socketpair()
    ca = SecureChannel(a, MID)
    ca.install_keys(KA, KB, 1, 2)
    b.close()
    with pytest.raises(ConstmigError, match=r"^connection lost while sending: Broken pipe$"):
        ca.send_control(b"x" * 300_000)
    with pytest.raises(ConstmigError, match="broken by an earlier error"):
        ca.send_last_words(b"abort")
    ca.close()


def test_records_and_tickets_are_immutable_and_slotted() -> None:
    from constmig.wire.channel import ControlRecord, HandshakeRecord

    t = ChannelTicket(MID, KA, KB, 1, 2)
    for rec, field in ((HandshakeRecord(b"h"), "payload"), (ControlRecord(b"c"), "payload"), (t, "send_seq")):
        assert not hasattr(rec, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(rec, field, 9)


def test_options_are_keyword_only(chans: tuple[SecureChannel, SecureChannel]) -> None:
    ca, _ = chans
    with pytest.raises(TypeError):
        ca.send_chunk(1, b"x", True)  # type: ignore[misc]
    a, b = socket.socketpair()
    try:
        with pytest.raises(TypeError):
            SecureChannel(a).install_keys(KA, KB, 1, 2, MID)  # type: ignore[misc]
    finally:
        a.close()
        b.close()


def test_no_ticket_while_a_record_is_half_received() -> None:
    """A header arrived, its body not yet: the stream position is mid-record, so no ticket."""
    from constmig.wire.channel import RecvTimeout
    from constmig.wire.records import Kind, pack_header

    a, b = socket.socketpair()
    ch = SecureChannel(b, MID)
    ch.install_keys(KB, KA, 2, 1)
    try:
        a.sendall(pack_header(Kind.CONTROL, 100, 0))
        with pytest.raises(RecvTimeout, match="still incomplete"):
            ch.recv(timeout=0.2)
        with pytest.raises(ProtocolError, match="in the middle of a received record"):
            ch.ticket()
    finally:
        a.close()
        ch.close()


def test_after_a_send_timeout_no_last_words() -> None:
    a, b = socket.socketpair()
    a.settimeout(0.2)
    ca = SecureChannel(a, MID)
    ca.install_keys(KA, KB, 1, 2)
    try:
        with pytest.raises(ConstmigError, match="peer stopped reading"):
            for _ in range(100):  # the peer never reads: the socket buffer fills up
                ca.send_control(b"x" * 500_000)
        with pytest.raises(ConstmigError, match="broken by an earlier error"):
            ca.send_last_words(b"abort")
    finally:
        ca.close()
        b.close()


class SpuriousWakeup:
    """A socket whose first non-blocking read finds nothing although poll said readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.spurious = sock, 1

    def recv_into(self, buf: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        if flags and self.spurious:
            self.spurious -= 1
            raise BlockingIOError
        return self.sock.recv_into(buf, nbytes, flags)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def test_a_spurious_wakeup_is_waited_out() -> None:
    a, b = socket.socketpair()
    ca = SecureChannel(a, MID)
    cb = SecureChannel(SpuriousWakeup(b), MID)  # type: ignore[arg-type]
    ca.install_keys(KA, KB, 1, 2)
    cb.install_keys(KB, KA, 2, 1)
    try:
        ca.send_control(b"hello")
        rec = cb.recv(timeout=5)
        assert rec.payload == b"hello"  # type: ignore[union-attr]
    finally:
        ca.close()
        cb.close()


@pytest.mark.adversarial
def test_zero_record_claiming_no_bytes_is_refused(chans: tuple[SecureChannel, SecureChannel]) -> None:
    """Only a peer holding the keys can make one (a buggy enclave): still refused, a chunk is 1.. bytes."""
    import struct

    from constmig.wire.records import FLAG_ZERO, ZERO_PAYLOAD, Kind

    ca, cb = chans
    ca._send_encrypted(Kind.CHUNK, struct.pack("!I", 0), ZERO_PAYLOAD, 5, FLAG_ZERO)
    with pytest.raises(ProtocolError, match="zero chunk record claims 0 bytes, outside 1.."):
        cb.recv(timeout=5)


def test_no_keys_while_a_handshake_record_is_half_received() -> None:
    from constmig.wire.channel import RecvTimeout
    from constmig.wire.records import Kind, pack_header

    a, b = socket.socketpair()
    ch = SecureChannel(b, MID)
    try:
        a.sendall(pack_header(Kind.HANDSHAKE, 100, 0))
        with pytest.raises(RecvTimeout):
            ch.recv(timeout=0.2)
        with pytest.raises(ProtocolError, match="install_keys called in the middle of a received record"):
            ch.install_keys(KB, KA, 2, 1)
    finally:
        a.close()
        ch.close()


def test_payloads_of_exactly_the_limits() -> None:
    from constmig.wire.records import MAX_HANDSHAKE_PAYLOAD

    a, b = socket.socketpair()
    ca, cb = SecureChannel(a, MID), SecureChannel(b, MID)
    got: list = []
    try:
        t = threading.Thread(target=lambda: got.append(cb.recv(timeout=10)))
        t.start()
        ca.send_handshake(b"h" * MAX_HANDSHAKE_PAYLOAD)
        t.join(10)
        assert len(got[0].payload) == MAX_HANDSHAKE_PAYLOAD
        with pytest.raises(ValueError, match="exceeds"):
            ca.send_handshake(b"h" * (MAX_HANDSHAKE_PAYLOAD + 1))
        ca.install_keys(KA, KB, 1, 2)
        cb.install_keys(KB, KA, 2, 1)
        t = threading.Thread(target=lambda: got.append(cb.recv(timeout=10)))
        t.start()
        ca.send_last_words(b"w" * MAX_CONTROL_PAYLOAD)
        t.join(10)
        assert len(got[1].payload) == MAX_CONTROL_PAYLOAD
        with pytest.raises(ValueError, match="exceeds"):
            ca.send_last_words(b"w" * (MAX_CONTROL_PAYLOAD + 1))
    finally:
        ca.close()
        cb.close()


def test_chunk_index_up_to_u64_max(chans: tuple[SecureChannel, SecureChannel]) -> None:
    ca, cb = chans
    ca.send_chunk(2**64 - 1, b"last")
    rec = cb.recv(timeout=5)
    assert isinstance(rec, SealedChunk) and rec.index == 2**64 - 1
    with pytest.raises(ValueError, match="chunk index"):
        ca.send_chunk(2**64, b"past")


def test_a_deadline_already_past_times_out_at_once(chans: tuple[SecureChannel, SecureChannel]) -> None:
    from constmig.wire.channel import RecvTimeout

    _, cb = chans
    out: list = []

    def receive() -> None:
        try:
            cb.recv(timeout=-0.5)
        except RecvTimeout as e:
            out.append(e)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    t.join(5)
    assert out and "no record from the peer" in str(out[0]), "recv with a past deadline waited"


def test_no_ticket_while_a_chunk_waits_to_be_opened(chans: tuple[SecureChannel, SecureChannel]) -> None:
    ca, cb = chans
    ca.send_chunk(1, b"p" * 100)
    rec = cb.recv(timeout=5)
    with pytest.raises(ProtocolError, match="in the middle of a received record"):
        cb.ticket()
    cb.open_chunk(rec, bytearray(100))  # type: ignore[arg-type]
    assert cb.ticket().recv_seq == 1


def test_negative_chunk_index_is_refused_as_such(chans: tuple[SecureChannel, SecureChannel]) -> None:
    ca, _ = chans
    with pytest.raises(ValueError, match="chunk index must be an int in 0..2"):
        ca.send_chunk(-1, b"x")


def test_receive_timeouts_are_kept_and_reported(chans: tuple[SecureChannel, SecureChannel]) -> None:
    import time

    from constmig.wire.channel import RecvTimeout

    _, cb = chans
    t0 = time.monotonic()
    with pytest.raises(RecvTimeout, match=r"no record from the peer within 0.2 s$"):
        cb.recv(timeout=0.2)
    assert time.monotonic() - t0 < 0.9
    with pytest.raises(RecvTimeout, match=r"no record from the peer within 0 s$"):
        cb.recv(timeout=0)
