"""The reconnect handshake (resume.py) over socketpairs: it re-keys, and the host cannot replay or forge it."""

from __future__ import annotations

import os
import socket

import msgspec
import numpy as np
import pytest
from scripted import run_pair

from constmig.errors import IntegrityError, ProtocolError
from constmig.migration.ledger import ChunkLedger
from constmig.migration.resume import Have, ResumeSecret, recv_have, send_have
from constmig.wire.channel import ChannelTicket, SecureChannel

MID = os.urandom(16)
K1, K2 = os.urandom(32), os.urandom(32)


def secrets_pair() -> tuple[ResumeSecret, ResumeSecret]:
    src = ResumeSecret.from_ticket(ChannelTicket(MID, K1, K2, 1, 2))
    dst = ResumeSecret.from_ticket(ChannelTicket(MID, K2, K1, 2, 1))  # the peer's view: keys swapped
    return src, dst


def test_both_ends_derive_one_secret_and_reconnect_with_fresh_keys():
    src, dst = secrets_pair()
    out, ca, cb = run_pair(lambda c: src.initiate(c, 1, 5), lambda c: dst.accept(c, 0, 5), MID)
    assert out == {"src": None, "dst": 1}
    ca.send_control(b"after the reconnect")
    assert cb.recv(timeout=5).payload == b"after the reconnect"
    keys1 = ca.ticket().send_key
    out, ca2, _ = run_pair(lambda c: src.initiate(c, 2, 5), lambda c: dst.accept(c, 1, 5), MID)
    assert out == {"src": None, "dst": 2}
    assert ca2.ticket().send_key != keys1  # every reconnect has keys of its own


@pytest.mark.adversarial
@pytest.mark.parametrize("last", [1, 5])
def test_stale_epoch_is_refused(last):
    """A recorded RESUME_HELLO replayed later carries an epoch the destination has used already."""
    src, dst = secrets_pair()
    out, _, _ = run_pair(lambda c: src.initiate(c, 1, 5), lambda c: dst.accept(c, last, 5), MID)
    assert isinstance(out["dst"], IntegrityError) and "stale RESUME_HELLO" in str(out["dst"])


@pytest.mark.adversarial
def test_hello_from_another_migration_is_refused():
    """A host that knows no session key (or has another migration's) cannot start a reconnect."""
    _, dst = secrets_pair()
    other = ResumeSecret.from_ticket(ChannelTicket(MID, os.urandom(32), os.urandom(32), 1, 2))
    out, _, _ = run_pair(lambda c: other.initiate(c, 1, 5), lambda c: dst.accept(c, 0, 5), MID)
    assert isinstance(out["dst"], IntegrityError) and "does not prove the source" in str(out["dst"])


@pytest.mark.adversarial
def test_reply_from_a_fake_destination_is_refused():
    src, _ = secrets_pair()
    other = ResumeSecret.from_ticket(ChannelTicket(MID, os.urandom(32), os.urandom(32), 2, 1))
    out, _, _ = run_pair(lambda c: src.initiate(c, 1, 5), lambda c: other.accept(c, 0, 5), MID)
    assert isinstance(out["dst"], IntegrityError)  # the fake cannot even check the hello
    assert isinstance(out["src"], Exception)


@pytest.mark.adversarial
def test_replayed_reply_does_not_fit_a_new_hello(monkeypatch):
    """The reply binds the source's fresh nonce: one recorded from an earlier reconnect fails its MAC."""
    src, dst = secrets_pair()
    sent: list[bytes] = []
    real = SecureChannel.send_handshake

    def recording(self, payload):
        sent.append(bytes(payload))
        return real(self, payload)

    monkeypatch.setattr(SecureChannel, "send_handshake", recording)
    out, _, _ = run_pair(lambda c: src.initiate(c, 1, 5), lambda c: dst.accept(c, 0, 5), MID)
    assert out == {"src": None, "dst": 1} and len(sent) == 2  # hello, reply
    old_reply = sent[1]

    def replay(c):
        c.recv(timeout=5)  # the source's new hello
        c.send_handshake(old_reply)

    out, _, _ = run_pair(lambda c: src.initiate(c, 2, 5), replay, MID)
    assert isinstance(out["src"], IntegrityError) and "does not prove the destination" in str(out["src"])


@pytest.mark.adversarial
@pytest.mark.parametrize("payload", [b"", b"\x00" * 40, msgspec.msgpack.encode({"epoch": 1})])
def test_garbage_hello_is_a_clean_protocol_error(payload):
    _, dst = secrets_pair()

    def send(c):
        c.send_handshake(payload)

    out, _, _ = run_pair(send, lambda c: dst.accept(c, 0, 5), MID)
    assert isinstance(out["dst"], ProtocolError)


def test_have_round_trip_and_bounds():
    ledger = ChunkLedger(MID, 64, np.arange(3, 40, 2))
    ledger.accept(5, b"t" * 16)
    ledger.accept(39, b"u" * 16)
    a, b = socket.socketpair()
    ca, cb = SecureChannel(a, MID), SecureChannel(b, MID)
    ca.install_keys(K1, K2, 1, 2)
    cb.install_keys(K2, K1, 2, 1)
    send_have(cb, ledger, 123.5)
    mask, t = recv_have(ca, ledger, 5)
    assert t == 123.5 and np.flatnonzero(mask).tolist() == [5, 39]
    cb.send_control(msgspec.msgpack.encode(Have(b"\xff" * 100, 1.0)))
    with pytest.raises(ProtocolError, match="HAVE covers"):
        recv_have(ca, ledger, 5)


def test_source_ledger_forgets_what_the_destination_lacks():
    ledger = ChunkLedger(MID, 8, np.arange(8))
    for i in range(6):
        ledger.record_sent(i, bytes([i]) * 16)
    have = np.zeros(8, dtype=bool)
    have[[0, 2]] = True
    ledger.keep_only(have)
    assert ledger.count == 2 and ledger.received.tolist() == [True, False, True] + [False] * 5
