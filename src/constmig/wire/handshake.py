"""Mutual attestation and key exchange between source and destination enclave. Sans-IO.

SIGMA-style: each side contributes a fresh X25519 key and a nonce, and each side's TEE quote carries,
as report data, a hash of the whole transcript so far. A quote thus says "an enclave with this identity,
on this attested platform, took part in *this* exchange": a quote recorded from any earlier handshake
binds other ephemerals and nonces and is refused. The session keys come from the X25519 secret with
HKDF salted by the transcript hash, so both sides derive the same keys only if they saw the same bytes.

    M1  source -> destination   Hello{version, migration_id, eph_pub, nonce, params}
    M2  destination -> source   HelloReply{eph_pub, nonce, quote(H("M2", M1, eph_pub, nonce))}
    M3  source -> destination   Finish{quote(H("M3", M1, M2))}
    M4  destination -> source   Confirm{HMAC(confirm key, transcript)}

M4 is key confirmation: the source learns that the destination accepted its quote and holds the same
keys *before* it sends anything encrypted; without it, a refusal at the destination would surface at
the source only as a confusing failure on the first encrypted record. Either side may send Abort{reason}
instead of its next message, so a refusal reaches the other side as one clear line (unauthenticated:
the host can always cut the connection anyway).

Hash inputs are length-prefixed so no two transcripts hash alike by moving bytes between fields.
Nothing here does I/O; `run_initiator` / `run_responder` drive it over a SecureChannel.
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from constmig.errors import AttestationError, ChannelClosed, ConstmigError, HandshakeAborted, ProtocolError
from constmig.tee.backend import MAX_QUOTE_SIZE, Identity, TeeBackend, VerifiedQuote
from constmig.units import one_line, short_hex
from constmig.wire.channel import HandshakeRecord, SecureChannel
from constmig.wire.kdf import hkdf32, transcript_hash, x25519_pub, x25519_shared

VERSION = 1
DIR_S2D = 1  # nonce direction of records from source to destination
DIR_D2S = 2
MIGRATION_ID_SIZE = 16
MAX_REASON = 300

_L_M2 = b"constmig-hs-v1 M2"
_L_M3 = b"constmig-hs-v1 M3"
_L_TRANSCRIPT = b"constmig-hs-v1 transcript"
_L_KEY_S2D = b"constmig-hs-v1 key source->destination"
_L_KEY_D2S = b"constmig-hs-v1 key destination->source"
_L_CONFIRM = b"constmig-hs-v1 confirm"

_B32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_MID = Annotated[bytes, msgspec.Meta(min_length=MIGRATION_ID_SIZE, max_length=MIGRATION_ID_SIZE)]
_QUOTE = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_QUOTE_SIZE)]


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    pass


class Hello(_Msg, tag="hello"):
    version: int
    migration_id: _MID
    eph_pub: _B32
    nonce: _B32
    params: dict[str, Any]


class HelloReply(_Msg, tag="reply"):
    eph_pub: _B32
    nonce: _B32
    quote: _QUOTE


class Finish(_Msg, tag="finish"):
    quote: _QUOTE


class Confirm(_Msg, tag="confirm"):
    mac: _B32


class Abort(_Msg, tag="abort"):
    reason: Annotated[str, msgspec.Meta(max_length=4 * MAX_REASON)]


_encoder = msgspec.msgpack.Encoder()
_decoders = {t: msgspec.msgpack.Decoder(t | Abort) for t in (Hello, HelloReply, Finish, Confirm)}


def _decode(kind: type[_Msg], data: bytes, peer: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{kind.__name__} message must be bytes, not {type(data).__name__}")
    try:
        msg = _decoders[kind].decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError, OverflowError) as e:
        raise ProtocolError(f"malformed {kind.__name__} message from the {peer}: "
                            f"{one_line(str(e), 200)}") from None
    if isinstance(msg, Abort):
        raise HandshakeAborted(f"{peer} aborted the handshake: {one_line(msg.reason, MAX_REASON) or 'no reason given'}")
    return msg


def abort_message(reason: str) -> bytes:
    """Encoded Abort{reason}: what to send instead of the next handshake message to refuse."""
    return _encoder.encode(Abort(one_line(reason, MAX_REASON) or "refused"))


# --- policy ------------------------------------------------------------------------------------------

ROLES = ("source", "destination")


@dataclass(frozen=True)
class Policy:
    """The enclave owner's rules for whom an enclave may migrate to or from.

    Defaults are the safe ones: same code (measurement), same signer and product, and no downgrade of
    the security version (a destination with a lower SVN would roll back a security fix).
    """

    min_svn: int = 0
    same_measurement: bool = True
    allowed_signers: frozenset[bytes] | None = None  # None: the peer's signer must equal our own
    allowed_platforms: frozenset[str] | None = None  # None: any platform the root CA attests
    allow_svn_downgrade: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.min_svn, int) or self.min_svn < 0:
            raise ValueError(f"min_svn must be a non-negative int, got {self.min_svn!r}")
        for name in ("allowed_signers", "allowed_platforms"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str | bytes):
                    raise TypeError(f"{name} must be a set, not a single {type(value).__name__}")
                object.__setattr__(self, name, frozenset(value))

    def check(self, own: Identity, peer: VerifiedQuote, role_of_peer: str) -> None:
        """Raise AttestationError (one line, says which rule) unless `peer` may be our migration peer."""
        if role_of_peer not in ROLES:
            raise ValueError(f"role_of_peer must be one of {ROLES}, got {role_of_peer!r}")
        p, who = peer.identity, f"{role_of_peer} enclave"
        if self.same_measurement and p.measurement != own.measurement:
            raise AttestationError(f"{who} measurement {short_hex(p.measurement)} differs from this enclave's "
                                   f"{short_hex(own.measurement)}; refusing to migrate")
        if self.allowed_signers is None:
            if p.signer != own.signer:
                raise AttestationError(f"{who} signer {short_hex(p.signer)} differs from this enclave's "
                                       f"{short_hex(own.signer)}; refusing to migrate")
        elif p.signer not in self.allowed_signers:
            raise AttestationError(f"{who} signer {short_hex(p.signer)} is not an allowed signer; refusing to migrate")
        if p.product_id != own.product_id:
            raise AttestationError(f"{who} product id {p.product_id} differs from this enclave's "
                                   f"{own.product_id}; refusing to migrate")
        if p.svn < self.min_svn:
            raise AttestationError(f"{who} security version {p.svn} is below the policy minimum "
                                   f"{self.min_svn}; refusing to migrate")
        if not self.allow_svn_downgrade:
            src, dst = (own.svn, p.svn) if role_of_peer == "destination" else (p.svn, own.svn)
            if dst < src:
                raise AttestationError(f"destination security version {dst} is lower than the source's {src}; "
                                       "refusing a downgrade")
        if self.allowed_platforms is not None and peer.platform_id not in self.allowed_platforms:
            raise AttestationError(f"{role_of_peer} platform {peer.platform_id[:64]!r} is not an allowed "
                                   "platform; refusing to migrate")


# --- result ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionKeys:
    """What a finished handshake gives one side; pass to SecureChannel.install_keys."""

    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    send_dir: int
    recv_dir: int
    peer: VerifiedQuote
    transcript_hash: bytes
    migration_id: bytes
    params: dict[str, Any]  # authenticated: both quotes cover M1


def _verify_peer(backend: TeeBackend, quote: bytes, expected: bytes, own: Identity, policy: Policy,
                 role_of_peer: str) -> VerifiedQuote:
    vq = backend.verify(quote)  # AttestationError propagates
    if not hmac.compare_digest(vq.report_data, expected):
        raise AttestationError(f"{role_of_peer} quote is not bound to this handshake "
                               "(report data mismatch: replayed or tampered)")
    policy.check(own, vq, role_of_peer)
    return vq


class _Phase(Enum):
    START = "start"
    SENT_HELLO = "sent M1"
    SENT_REPLY = "sent M2"
    SENT_FINISH = "sent M3"
    DONE = "done"
    FAILED = "failed"


class _Machine:
    """Shared bookkeeping: a phase that only moves forward, and FAILED after any exception."""

    _role = ""

    def __init__(self, backend: TeeBackend, identity: Identity, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, not {type(policy).__name__}")
        self._backend, self._identity, self._policy = backend, identity, policy
        self._phase = _Phase.START
        self._keys: SessionKeys | None = None

    def _enter(self, expected: _Phase, action: str) -> None:
        if self._phase is not expected:
            raise ProtocolError(f"{self._role} handshake: cannot {action} in phase '{self._phase.value}'")

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def keys(self) -> SessionKeys:
        if self._keys is None or self._phase is not _Phase.DONE:
            raise ProtocolError(f"{self._role} handshake has not completed (phase '{self._phase.value}')")
        return self._keys

    def abort(self, reason: str) -> bytes:
        """Give up: the machine is FAILED and the returned Abort message tells the peer why."""
        self._phase = _Phase.FAILED
        self._keys = None
        return abort_message(reason)


class Initiator(_Machine):
    """The source's side: start() -> M1; receive_reply(M2) -> M3; receive_confirm(M4) -> SessionKeys."""

    _role = "source"

    def __init__(self, backend: TeeBackend, identity: Identity, policy: Policy, params: dict[str, Any], *,
                 migration_id: bytes | None = None) -> None:
        super().__init__(backend, identity, policy)
        if migration_id is None:
            migration_id = os.urandom(MIGRATION_ID_SIZE)
        if not isinstance(migration_id, bytes) or len(migration_id) != MIGRATION_ID_SIZE:
            raise ValueError(f"migration id must be {MIGRATION_ID_SIZE} bytes")
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise TypeError("params must be a dict with str keys")
        self.migration_id = migration_id
        self.params = params
        self._eph: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._m1 = _encoder.encode(Hello(VERSION, migration_id, x25519_pub(self._eph), os.urandom(32), params))
        self._pending: SessionKeys | None = None
        self._confirm_key = b""
        self.peer: VerifiedQuote | None = None

    def start(self) -> bytes:
        """M1, to send to the destination."""
        self._enter(_Phase.START, "start")
        self._phase = _Phase.SENT_HELLO
        return self._m1

    def receive_reply(self, m2: bytes) -> bytes:
        """Check the destination's M2 (quote, binding, policy); return M3 to send."""
        self._enter(_Phase.SENT_HELLO, "receive M2")
        try:
            reply: HelloReply = _decode(HelloReply, m2, "destination")
            m2 = bytes(m2)
            vq = _verify_peer(self._backend, reply.quote, transcript_hash(_L_M2, self._m1, reply.eph_pub, reply.nonce),
                              self._identity, self._policy, "destination")
            assert self._eph is not None
            secret = x25519_shared(self._eph, reply.eph_pub, "destination")
            self._eph = None  # forward secrecy: the ephemeral key is not needed any more
            m3 = _encoder.encode(Finish(self._backend.quote(self._identity, transcript_hash(_L_M3, self._m1, m2))))
            th = transcript_hash(_L_TRANSCRIPT, self._m1, m2, m3)
            self._pending = SessionKeys(
                send_key=hkdf32(secret, th, _L_KEY_S2D), recv_key=hkdf32(secret, th, _L_KEY_D2S),
                send_dir=DIR_S2D, recv_dir=DIR_D2S, peer=vq, transcript_hash=th,
                migration_id=self.migration_id, params=self.params)
            self._confirm_key = hkdf32(secret, th, _L_CONFIRM)
            self.peer = vq
        except BaseException:
            self._phase = _Phase.FAILED
            raise
        self._phase = _Phase.SENT_FINISH
        return m3

    def receive_confirm(self, m4: bytes) -> SessionKeys:
        """Check the destination's key confirmation; the keys are usable only after this."""
        self._enter(_Phase.SENT_FINISH, "receive M4")
        try:
            confirm: Confirm = _decode(Confirm, m4, "destination")
            assert self._pending is not None
            mac = hmac.new(self._confirm_key, self._pending.transcript_hash, "sha256").digest()
            if not hmac.compare_digest(mac, confirm.mac):
                raise ProtocolError("destination's key confirmation does not match this handshake")
        except BaseException:
            self._phase = _Phase.FAILED
            raise
        self._keys, self._pending, self._confirm_key = self._pending, None, b""
        self._phase = _Phase.DONE
        return self._keys


class Responder(_Machine):
    """The destination's side: receive_hello(M1) -> M2; receive_finish(M3) -> M4, then .keys.

    `params` and `migration_id` are readable after receive_hello so the caller can refuse early (e.g.
    a heap too big for this host); they are authenticated only once receive_finish succeeded.
    """

    _role = "destination"

    def __init__(self, backend: TeeBackend, identity: Identity, policy: Policy) -> None:
        super().__init__(backend, identity, policy)
        self.params: dict[str, Any] | None = None
        self.migration_id: bytes | None = None
        self.peer: VerifiedQuote | None = None
        self._m1 = self._m2 = self._secret = b""

    def receive_hello(self, m1: bytes) -> bytes:
        """Parse the source's M1 and answer with M2 (our quote over M1 and our fresh values)."""
        self._enter(_Phase.START, "receive M1")
        try:
            hello: Hello = _decode(Hello, m1, "source")
            if hello.version != VERSION:
                raise ProtocolError(f"source speaks handshake version {hello.version}, this enclave {VERSION}")
            eph = X25519PrivateKey.generate()
            self._secret = x25519_shared(eph, hello.eph_pub, "source")
            self._m1 = bytes(m1)
            eph_pub, nonce = x25519_pub(eph), os.urandom(32)
            quote = self._backend.quote(self._identity, transcript_hash(_L_M2, self._m1, eph_pub, nonce))
            self._m2 = _encoder.encode(HelloReply(eph_pub, nonce, quote))
            self.params, self.migration_id = hello.params, hello.migration_id
        except BaseException:
            self._phase = _Phase.FAILED
            raise
        self._phase = _Phase.SENT_REPLY
        return self._m2

    def receive_finish(self, m3: bytes) -> bytes:
        """Check the source's M3 (quote, binding, policy), derive the keys; return M4 to send."""
        self._enter(_Phase.SENT_REPLY, "receive M3")
        try:
            finish: Finish = _decode(Finish, m3, "source")
            vq = _verify_peer(self._backend, finish.quote, transcript_hash(_L_M3, self._m1, self._m2),
                              self._identity, self._policy, "source")
            th = transcript_hash(_L_TRANSCRIPT, self._m1, self._m2, bytes(m3))
            secret, self._secret = self._secret, b""
            assert self.migration_id is not None and self.params is not None
            self._keys = SessionKeys(
                send_key=hkdf32(secret, th, _L_KEY_D2S), recv_key=hkdf32(secret, th, _L_KEY_S2D),
                send_dir=DIR_D2S, recv_dir=DIR_S2D, peer=vq, transcript_hash=th,
                migration_id=self.migration_id, params=self.params)
            mac = hmac.new(hkdf32(secret, th, _L_CONFIRM), th, "sha256").digest()
            self.peer = vq
        except BaseException:
            self._phase = _Phase.FAILED
            self._keys = None
            raise
        self._phase = _Phase.DONE
        return _encoder.encode(Confirm(mac))


# --- drivers over a SecureChannel ----------------------------------------------------------------------

def _recv_handshake(channel: SecureChannel, timeout: float | None, what: str) -> bytes:
    rec = channel.recv(timeout)
    if not isinstance(rec, HandshakeRecord):  # cannot happen before keys; kept for clarity
        raise ProtocolError(f"expected {what}, got a {type(rec).__name__}")
    return rec.payload


def _step(channel: SecureChannel, machine: _Machine, fn: Callable[[], bytes]) -> bytes:
    """Run one machine step; on a local refusal tell the peer why (best effort) before raising."""
    try:
        return fn()
    except (HandshakeAborted, ChannelClosed):
        raise
    except Exception as e:
        reason = str(e) if isinstance(e, ConstmigError) else f"internal error in the {machine._role}"
        with contextlib.suppress(ConstmigError):
            channel.send_handshake(machine.abort(reason))
        raise


def run_initiator(channel: SecureChannel, backend: TeeBackend, identity: Identity, policy: Policy,
                  params: dict[str, Any], *, migration_id: bytes | None = None,
                  timeout: float | None = None) -> SessionKeys:
    """Run the source's handshake over `channel` and install the session keys on it."""
    if migration_id is None:
        migration_id = channel.migration_id
    elif channel.migration_id is not None and channel.migration_id != migration_id:
        raise ValueError("migration_id differs from the channel's")
    ini = Initiator(backend, identity, policy, params, migration_id=migration_id)
    channel.send_handshake(ini.start())
    m2 = _recv_handshake(channel, timeout, "M2")
    channel.send_handshake(_step(channel, ini, lambda: ini.receive_reply(m2)))
    m4 = _recv_handshake(channel, timeout, "M4")
    keys = ini.receive_confirm(m4)  # a bad confirmation: nothing useful to tell the peer
    channel.install_keys(keys.send_key, keys.recv_key, keys.send_dir, keys.recv_dir,
                         migration_id=keys.migration_id)
    return keys


def run_responder(channel: SecureChannel, backend: TeeBackend, identity: Identity, policy: Policy, *,
                  check_params: Callable[[dict[str, Any]], None] | None = None,
                  timeout: float | None = None) -> SessionKeys:
    """Run the destination's handshake over `channel` and install the session keys on it.

    `check_params(params)` runs before we answer and may raise a ConstmigError to refuse; the refusal's
    message is sent to the source.
    """
    res = Responder(backend, identity, policy)
    m1 = _recv_handshake(channel, timeout, "M1")

    def hello() -> bytes:
        m2 = res.receive_hello(m1)
        assert res.migration_id is not None and res.params is not None
        if channel.migration_id is not None and res.migration_id != channel.migration_id:
            raise ProtocolError(f"handshake is for migration {res.migration_id.hex()}, this channel for "
                                f"{channel.migration_id.hex()}")
        if check_params is not None:
            check_params(res.params)
        return m2

    channel.send_handshake(_step(channel, res, hello))
    m3 = _recv_handshake(channel, timeout, "M3")
    m4 = _step(channel, res, lambda: res.receive_finish(m3))
    channel.send_handshake(m4)
    keys = res.keys
    channel.install_keys(keys.send_key, keys.recv_key, keys.send_dir, keys.recv_dir,
                         migration_id=keys.migration_id)
    return keys
