"""Re-connecting a paused post-commit migration: a short keyed handshake, fresh keys, then HAVE.

Why not the full attested handshake again: both enclaves already proved themselves to each other and
share the migration's session keys; what a reconnect needs is (1) proof that the other end is that
same peer, (2) keys no earlier connection used, and (3) no way for the host to replay an old
reconnect. So both sides derive a resume secret from the session keys at COMMIT, and a reconnect is

    source -> destination   RESUME_HELLO  epoch, nonce_s, HMAC(secret, "hello" | mid | epoch | nonce_s)
    destination -> source   RESUME_REPLY  nonce_d, HMAC(secret, "reply" | mid | epoch | nonce_s | nonce_d)

after which both install keys = HKDF(secret, salt = nonce_s | nonce_d, info = mid | epoch). The
destination accepts each epoch once and only increasing, the source checks the reply against its own
fresh nonce, so a recorded reconnect replays into nothing. The first encrypted record is the
destination's HAVE: which of the migration's chunks it holds (verified and installed), so the source
resends exactly the rest; chunks in flight when the link broke are simply sent again. A destination that
never received COMMIT and gave the migration up answers with an authenticated ABORT instead of HAVE
(resume_server.CommitWaiter): the source may run again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Any

import msgspec
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from constmig.errors import IntegrityError, PeerAborted, ProtocolError
from constmig.migration import messages as m
from constmig.migration.ledger import ChunkLedger
from constmig.wire.channel import ChannelTicket, ControlRecord, HandshakeRecord, SecureChannel

NONCE = 32
HANDSHAKE_TIMEOUT = 10.0  # a reconnect's hello/reply/HAVE: a peer that is there answers in milliseconds
_DIRS = {"source": (1, 2), "destination": (2, 1)}  # (send, receive) record directions


class ResumeHello(msgspec.Struct, tag="resume_hello", forbid_unknown_fields=True, frozen=True):
    epoch: int
    nonce: bytes
    mac: bytes


class ResumeReply(msgspec.Struct, tag="resume_reply", forbid_unknown_fields=True, frozen=True):
    nonce: bytes
    mac: bytes


class Have(msgspec.Struct, tag="have", forbid_unknown_fields=True, frozen=True):
    """The destination's chunks, one bit per expected chunk in ledger order (np.packbits), and when it resumed."""

    received: bytes
    resume_time: float


_MSG = ResumeHello | ResumeReply | Have | m.Abort


def _decode(payload: bytes, kind: Any) -> object:
    try:
        msg = msgspec.msgpack.decode(payload, type=_MSG)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed resume message: {e}") from None
    if not isinstance(msg, kind):
        raise ProtocolError(f"unexpected {type(msg).__name__} while resuming")
    return msg


class ResumeSecret:
    """What both enclaves keep after COMMIT to re-key a broken migration (never leaves the enclave)."""

    def __init__(self, migration_id: bytes, secret: bytes) -> None:
        self.migration_id = migration_id
        self._secret = secret

    @classmethod
    def from_ticket(cls, ticket: ChannelTicket) -> ResumeSecret:
        """Same secret on both ends: the session's two keys, in a role-independent order."""
        a, b = sorted((ticket.send_key, ticket.recv_key))
        secret = HKDF(hashes.SHA256(), 32, salt=ticket.migration_id, info=b"constmig resume v1").derive(a + b)
        return cls(ticket.migration_id, secret)

    def to_wire(self) -> dict:
        return {"mid": self.migration_id, "secret": self._secret}

    @classmethod
    def from_wire(cls, d: dict) -> ResumeSecret:
        mid, secret = d.get("mid"), d.get("secret")
        if type(mid) is not bytes or type(secret) is not bytes or len(mid) != 16 or len(secret) != 32:
            raise ProtocolError("malformed resume secret")
        return cls(mid, secret)

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._secret, b"|".join(parts), hashlib.sha256).digest()

    def _keys(self, epoch: int, ns: bytes, nd: bytes) -> tuple[bytes, bytes]:
        okm = HKDF(hashes.SHA256(), 64, salt=ns + nd,
                   info=b"constmig resume keys v1" + self.migration_id + struct.pack("!Q", epoch)).derive(self._secret)
        return okm[:32], okm[32:]  # source->destination, destination->source

    def _install(self, chan: SecureChannel, role: str, epoch: int, ns: bytes, nd: bytes) -> None:
        s2d, d2s = self._keys(epoch, ns, nd)
        send, recv = (s2d, d2s) if role == "source" else (d2s, s2d)
        chan.install_keys(send, recv, *_DIRS[role])

    # --- source ------------------------------------------------------------------------------------

    def initiate(self, chan: SecureChannel, epoch: int, timeout: float) -> None:
        """Source: prove we are the migration's source and key `chan` (a fresh connection) for `epoch`."""
        ns = os.urandom(NONCE)
        ep = struct.pack("!Q", epoch)
        chan.send_handshake(msgspec.msgpack.encode(ResumeHello(epoch, ns, self._mac(b"hello", self.migration_id,
                                                                                    ep, ns))))
        rec = chan.recv(timeout=timeout)
        if not isinstance(rec, HandshakeRecord):
            raise ProtocolError("expected RESUME_REPLY")
        reply = _decode(rec.payload, ResumeReply)
        assert isinstance(reply, ResumeReply)
        if len(reply.nonce) != NONCE or not hmac.compare_digest(
                reply.mac, self._mac(b"reply", self.migration_id, ep, ns, reply.nonce)):
            raise IntegrityError("RESUME_REPLY does not prove the destination enclave (bad MAC)")
        self._install(chan, "source", epoch, ns, reply.nonce)

    # --- destination -------------------------------------------------------------------------------

    def accept(self, chan: SecureChannel, last_epoch: int, timeout: float) -> int:
        """Destination: check the source's hello (epoch above `last_epoch`), answer, key `chan`.

        Returns the epoch, which the caller must remember as its new `last_epoch`.
        """
        rec = chan.recv(timeout=timeout)
        if not isinstance(rec, HandshakeRecord):
            raise ProtocolError("expected RESUME_HELLO")
        hello = _decode(rec.payload, ResumeHello)
        assert isinstance(hello, ResumeHello)
        if type(hello.epoch) is not int or not 0 <= hello.epoch < 1 << 63 or len(hello.nonce) != NONCE:
            raise ProtocolError("malformed RESUME_HELLO")
        ep = struct.pack("!Q", hello.epoch)
        if not hmac.compare_digest(hello.mac, self._mac(b"hello", self.migration_id, ep, hello.nonce)):
            raise IntegrityError("RESUME_HELLO does not prove the source enclave (bad MAC)")
        if hello.epoch <= last_epoch:
            raise IntegrityError(f"stale RESUME_HELLO: epoch {hello.epoch}, but epoch {last_epoch} was used "
                                 "already (a replayed reconnect)")
        nd = os.urandom(NONCE)
        chan.send_handshake(msgspec.msgpack.encode(ResumeReply(nd, self._mac(b"reply", self.migration_id, ep,
                                                                             hello.nonce, nd))))
        self._install(chan, "destination", hello.epoch, hello.nonce, nd)
        return hello.epoch


def send_have(chan: SecureChannel, ledger: ChunkLedger, resume_time: float) -> None:
    chan.send_control(msgspec.msgpack.encode(Have(np.packbits(ledger.received[ledger.expected]).tobytes(),
                                                  resume_time)))


def recv_have(chan: SecureChannel, ledger: ChunkLedger, timeout: float) -> tuple[np.ndarray, float]:
    """The destination's HAVE as a bool mask over the heap's chunks (only expected chunks can be set),
    and the time it resumed the app."""
    rec = chan.recv(timeout=timeout)
    if not isinstance(rec, ControlRecord):
        raise ProtocolError("expected HAVE after resuming")
    have = _decode(rec.payload, Have | m.Abort)
    if isinstance(have, m.Abort):  # authenticated: only the destination enclave holds these keys
        raise PeerAborted(f"destination aborted the migration: {have.reason}")
    assert isinstance(have, Have)
    n = int(ledger.expected.size)
    if len(have.received) != (n + 7) // 8:
        raise ProtocolError(f"HAVE covers {len(have.received) * 8} chunks, not this migration's {n}")
    bits = np.unpackbits(np.frombuffer(have.received, dtype=np.uint8), count=n).astype(bool)
    mask = np.zeros(ledger.n_chunks, dtype=bool)
    mask[ledger.expected[bits]] = True
    return mask, float(have.resume_time)
