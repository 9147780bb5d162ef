"""The reconnect handshake's rules one by one (resume.py), found wanting by mutation testing
(tools/mutation.py): the secret handed to the pager, the RESUME_HELLO bounds, HAVE's size, both directions
of a re-keyed channel, and strict message decoding. tests/migration/test_resume_handshake.py has the
attacks; these pin the checks they rely on."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import msgspec
import numpy as np
import pytest
from scripted import run_pair

from constmig.errors import IntegrityError, ProtocolError
from constmig.migration.ledger import ChunkLedger
from constmig.migration.resume import (
    NONCE,
    Have,
    ResumeHello,
    ResumeReply,
    ResumeSecret,
    recv_have,
    send_have,
)
from constmig.wire.channel import ChannelTicket, SecureChannel

MID = bytes(range(16))
K1, K2 = b"\x01" * 32, b"\x02" * 32


def secrets_pair() -> tuple[ResumeSecret, ResumeSecret]:
    return (ResumeSecret.from_ticket(ChannelTicket(MID, K1, K2, 1, 2)),
            ResumeSecret.from_ticket(ChannelTicket(MID, K2, K1, 2, 1)))


# --- the secret ----------------------------------------------------------------------------------------


def test_secret_survives_the_trip_to_the_pager() -> None:
    """The destination hands its secret to the pager process as to_wire(); from_wire() must take it back."""
    src, dst = secrets_pair()
    again = ResumeSecret.from_wire(dst.to_wire())
    assert isinstance(again, ResumeSecret) and again.migration_id == MID
    out, _, _ = run_pair(lambda c: src.initiate(c, 1, 5), lambda c: again.accept(c, 0, 5), MID)
    assert out == {"src": None, "dst": 1}


@pytest.mark.adversarial
@pytest.mark.parametrize("change", [
    {"mid": "x" * 16}, {"secret": "s" * 32}, {"mid": bytes(15)}, {"mid": bytes(17)}, {"secret": bytes(31)},
    {"secret": bytes(33)}, {"mid": None}, {"secret": bytearray(32)},
], ids=lambda c: f"{next(iter(c))}={type(c[next(iter(c))]).__name__}{len(c[next(iter(c))] or '')}")
def test_malformed_secret_is_refused(change: dict[str, Any]) -> None:
    _, dst = secrets_pair()
    with pytest.raises(ProtocolError, match="malformed resume secret"):
        ResumeSecret.from_wire({**dst.to_wire(), **change})


# --- the re-keyed channel --------------------------------------------------------------------------------


def test_reconnected_channel_works_both_ways() -> None:
    src, dst = secrets_pair()
    out, ca, cb = run_pair(lambda c: src.initiate(c, 3, 5), lambda c: dst.accept(c, 2, 5), MID)
    assert out == {"src": None, "dst": 3}
    ca.send_control(b"to the destination")
    assert cb.recv(timeout=5).payload == b"to the destination"
    cb.send_control(b"to the source")
    assert ca.recv(timeout=5).payload == b"to the source"


def forged_hello(secret: ResumeSecret, epoch: int, nonce: bytes) -> bytes:
    """A hello with a valid MAC (as only the source could make) but any epoch and nonce length."""
    ep = struct.pack("!Q", epoch % (1 << 64))
    return msgspec.msgpack.encode(ResumeHello(epoch, nonce, secret._mac(b"hello", MID, ep, nonce)))


@pytest.mark.adversarial
@pytest.mark.parametrize(("epoch", "nonce", "last", "ok"), [
    (0, NONCE, -1, True),
    ((1 << 63) - 1, NONCE, 0, True),
    (1 << 63, NONCE, 0, False),
    ((1 << 64) - 1, NONCE, 0, False),
    (-1, NONCE, -2, False),
    (1, NONCE - 1, 0, False),
    (1, NONCE + 1, 0, False),
])
def test_hello_epoch_and_nonce_bounds(epoch: int, nonce: int, last: int, ok: bool) -> None:
    src, dst = secrets_pair()
    hello = forged_hello(src, epoch, os.urandom(nonce))

    def send(c: SecureChannel) -> None:
        c.send_handshake(hello)

    out, _, _ = run_pair(send, lambda c: dst.accept(c, last, 5), MID)
    if ok:
        assert out["dst"] == epoch
    else:
        assert isinstance(out["dst"], ProtocolError) and "malformed RESUME_HELLO" in str(out["dst"]), out


@pytest.mark.adversarial
@pytest.mark.parametrize("kind", ["hello", "reply"])
def test_messages_with_unknown_fields_are_malformed(kind: str) -> None:
    src, dst = secrets_pair()
    if kind == "hello":
        nonce = os.urandom(NONCE)
        extra = {**msgspec.structs.asdict(msgspec.msgpack.decode(forged_hello(src, 1, nonce), type=ResumeHello)),
                 "type": "resume_hello", "extra": 1}

        def send(c: SecureChannel) -> None:
            c.send_handshake(msgspec.msgpack.encode(extra))

        out, _, _ = run_pair(send, lambda c: dst.accept(c, 0, 5), MID)
        assert isinstance(out["dst"], ProtocolError) and "malformed resume message" in str(out["dst"]), out
        return

    def reply(c: SecureChannel) -> None:
        c.recv(timeout=5)
        c.send_handshake(msgspec.msgpack.encode({"type": "resume_reply", "nonce": bytes(NONCE), "mac": bytes(32),
                                                 "extra": 1}))

    out, _, _ = run_pair(lambda c: src.initiate(c, 1, 5), reply, MID)
    assert isinstance(out["src"], ProtocolError) and "malformed resume message" in str(out["src"]), out


def test_messages_are_immutable() -> None:
    for msg, field in ((ResumeHello(1, b"n", b"m"), "epoch"), (ResumeReply(b"n", b"m"), "mac"),
                       (Have(b"\x00", 1.0), "received")):
        with pytest.raises(AttributeError):
            setattr(msg, field, None)


# --- HAVE ----------------------------------------------------------------------------------------------


def keyed_pair() -> tuple[SecureChannel, SecureChannel]:
    a, b = socket.socketpair()
    ca, cb = SecureChannel(a, MID), SecureChannel(b, MID)
    ca.install_keys(K1, K2, 1, 2)
    cb.install_keys(K2, K1, 2, 1)
    return ca, cb


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17])
def test_have_round_trip_for_every_bit_count(n: int) -> None:
    ledger = ChunkLedger(MID, 40, np.arange(2, 2 + 2 * n, 2))
    ledger.accept(int(ledger.expected[-1]), b"t" * 16)
    ca, cb = keyed_pair()
    send_have(cb, ledger, 7.25)
    mask, t = recv_have(ca, ledger, 5)
    assert t == 7.25 and np.flatnonzero(mask).tolist() == [int(ledger.expected[-1])]


@pytest.mark.adversarial
def test_have_of_the_wrong_size_names_both_counts() -> None:
    ledger = ChunkLedger(MID, 40, np.array([1, 2, 3]))
    ca, cb = keyed_pair()
    cb.send_control(msgspec.msgpack.encode(Have(b"\xff" * 2, 1.0)))
    with pytest.raises(ProtocolError, match="^HAVE covers 16 chunks, not this migration's 3$"):
        recv_have(ca, ledger, 5)


@pytest.mark.adversarial
def test_have_with_an_unknown_field_is_malformed() -> None:
    ledger = ChunkLedger(MID, 40, np.array([1, 2, 3]))
    ca, cb = keyed_pair()
    cb.send_control(msgspec.msgpack.encode({"type": "have", "received": b"\x00", "resume_time": 1.0, "x": 1}))
    with pytest.raises(ProtocolError, match="malformed resume message"):
        recv_have(ca, ledger, 5)


def test_stale_epoch_message() -> None:
    src, dst = secrets_pair()
    out, _, _ = run_pair(lambda c: src.initiate(c, 4, 5), lambda c: dst.accept(c, 4, 5), MID)
    assert isinstance(out["dst"], IntegrityError)
    assert str(out["dst"]) == ("stale RESUME_HELLO: epoch 4, but epoch 4 was used already (a replayed reconnect)")
