"""NativeOpener.recv_one, the engine's step of the post-copy stream (docs/native.md step 2b): one record
at the opener's position; nothing arriving reads nothing and moves nothing; a record that is not a CHUNK
comes back as its header with its body unread and the position unchanged; records sealed by Python and
by the engine open alike, across a handover of the position."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from constmig.native import engine
from constmig.native.engine import NativeOpener, NativeSealer, Opened
from constmig.wire.channel import ChannelTicket, SecureChannel
from constmig.wire.records import FLAG_DEMAND, FLAG_ZERO, HEADER_SIZE, TAG_SIZE, Kind, parse_header

pytestmark = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")

MID = bytes(range(16))
K1, K2 = bytes([1]) * 32, bytes([2]) * 32
CS = 1 << 13


def test_nothing_arriving_reads_nothing_and_moves_nothing(sockets) -> None:
    _, b = sockets
    opener = NativeOpener(K1, 1, MID, 7)
    t0 = time.monotonic()
    assert opener.recv_one(b, bytearray(CS), idle=0.05, timeout=1) is None
    assert time.monotonic() - t0 >= 0.04
    assert opener.expected_seq == 7 and not opener.failed


def test_a_control_record_comes_back_as_its_header_with_its_body_unread(sockets) -> None:
    a, b = sockets
    tx = SecureChannel.resume(a, ChannelTicket(MID, K1, K2, 1, 2, 3, 0))
    tx.send_control(b"x" * 100)
    opener = NativeOpener(K1, 1, MID, 3)
    got = opener.recv_one(b, bytearray(CS), idle=1, timeout=1)
    assert isinstance(got, bytes) and len(got) == HEADER_SIZE
    header = parse_header(got)
    assert header.kind is Kind.CONTROL and header.seq == 3
    assert opener.expected_seq == 3 and not opener.failed
    b.setblocking(False)
    assert len(b.recv(1 << 16)) == 100 + TAG_SIZE, "the body was left for the Python side"


def test_python_and_native_records_open_alike_across_a_handover(sockets) -> None:
    a, b = sockets
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 256, CS, dtype=np.uint8).tobytes(), bytes(CS), rng.bytes(CS)]
    tx = SecureChannel.resume(a, ChannelTicket(MID, K1, K2, 1, 2, 10, 0))
    tags = [tx.send_chunk(0, chunks[0]), tx.send_chunk(1, chunks[1], demand=True)]
    ticket = tx.detach()
    sealer = NativeSealer.from_ticket(ticket)
    sealed = sealer.seal_chunk(2, chunks[2])
    a.sendall(sealed.record)
    assert sealer.detach() == 13
    opener = NativeOpener(K1, 1, MID, 10)
    out = bytearray(CS)
    first = opener.recv_one(b, out, idle=1, timeout=1)
    assert first == Opened(0, 0, CS, tags[0]) and bytes(out) == chunks[0]
    out[:] = b"\x55" * CS
    zero = opener.recv_one(b, out, idle=1, timeout=1)
    assert zero == Opened(1, FLAG_ZERO | FLAG_DEMAND, CS, tags[1])
    assert bytes(out) == b"\x55" * CS, "a zero chunk writes nothing: the caller zeroes it"
    last = opener.recv_one(b, out, idle=1, timeout=1)
    assert last == Opened(2, 0, CS, sealed.tag) and bytes(out) == chunks[2]
    assert opener.detach() == 13


@pytest.mark.parametrize(("attack", "error"), [
    ("tag-bit", "IntegrityError"), ("replayed", "IntegrityError"), ("longer-than-out", "ProtocolError"),
    ("truncated", "ChannelClosed"), ("zero-claim-forged", "IntegrityError")])
def test_a_tampered_record_fails_closed_leaving_out_untouched(sockets, attack: str, error: str) -> None:
    """The engine's own refusals (run under ASan/UBSan too: test_sanitized.py runs this folder)."""
    a, b = sockets
    sealer = NativeSealer(K1, 1, MID, 0)
    first, second = sealer.seal_chunk(0, b"\x01" * CS).record, sealer.seal_chunk(1, bytes(CS)).record
    wire = {"tag-bit": first[:-1] + bytes([first[-1] ^ 1]),
            "replayed": first + first,
            "longer-than-out": first,
            "truncated": first[:HEADER_SIZE + 100],
            "zero-claim-forged": second[:HEADER_SIZE] + bytes([second[HEADER_SIZE] ^ 1]) + second[HEADER_SIZE + 1:]}
    a.sendall(wire[attack])
    a.shutdown(socket.SHUT_WR)
    opener = NativeOpener(K1, 1, MID, 1 if attack == "zero-claim-forged" else 0)  # that one is seq 1
    out = bytearray(b"\x77" * (CS // 2 if attack == "longer-than-out" else CS))
    if attack == "replayed":  # the first copy is fine; the second is not
        assert isinstance(opener.recv_one(b, out, idle=1, timeout=1), Opened)
        out[:] = b"\x77" * CS
    with pytest.raises(Exception) as info:
        opener.recv_one(b, out, idle=1, timeout=1)
    assert type(info.value).__name__ == error, info.value
    assert bytes(out) == b"\x77" * len(out), "unverified bytes reached `out`"
    assert opener.failed
