"""Attested client sessions: a client and an enclave, with the untrusted host forwarding opaque bytes. Sans-IO.

The host (agent) carries every byte a client exchanges with its enclave, so the client checks a quote
for the code it expects before it sends a byte, and everything after is sealed end to end:

    open     client -> enclave   Hello{version, eph_pub, nonce}
    accept   enclave -> client   Accept{session_id, eph_pub, nonce, quote(H("accept", Hello, id, eph_pub, nonce))}
    record   client -> enclave   session_id | seq | AES-GCM(c2e key, request)     request n has seq n
    record   enclave -> client   session_id | seq | AES-GCM(e2c key, answer)      answer n has seq n

The quote binds the enclave's ephemeral key to this client's Hello (a quote recorded from another
session binds other values); keys come from X25519 with HKDF salted by the transcript. Only the enclave
is authenticated, as in server-side TLS: a client is whoever holds the session's keys.

Exactly once. Request n runs once: the enclave accepts only seq == next, and keeps the sealed answer
of the last request with that request's digest, so a client that never saw its answer (connection cut,
the enclave moved meanwhile) sends the *same record* again and gets the same sealed answer, without a
second run. Any other seq is refused and changes nothing: a replayed or reordered request never runs.
A refused record does not end the session (the host can always drop records; a tampered one must not
take the session down with it). The client's side is strict in the other direction: one answer per
request, in order, and after a bad answer the session is over.

The session's keys and positions are plain data (`EnclaveEnd`), so they travel in the enclave's sealed
small state when it migrates: the client continues with the same keys on the destination. Each answer
names the platform it was produced on, so the client learns, authenticated, where its enclave runs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from constmig.errors import AttestationError, IntegrityError, ProtocolError
from constmig.tee.backend import MAX_QUOTE_SIZE, Identity, VerifiedQuote
from constmig.wire.aead import NONCE, RecordOpener, RecordSealer
from constmig.wire.kdf import hkdf32, transcript_hash, x25519_pub, x25519_shared
from constmig.wire.records import TAG_SIZE, U64_MAX

VERSION = 1
SESSION_ID_SIZE = 16
DIR_C2E = 11  # nonce directions (the migration channel uses 1 and 2; other keys anyway)
DIR_E2C = 12
MAX_RECORD = (8 << 20) - 4096  # a sealed record rides in one agent frame (framing.MAX_FRAME)
HEADER = struct.Struct("!16sQ")  # session id, seq

_L_ACCEPT = b"constmig-session-v1 accept"
_L_TRANSCRIPT = b"constmig-session-v1 transcript"
_L_C2E = b"constmig-session-v1 key client->enclave"
_L_E2C = b"constmig-session-v1 key enclave->client"
_L_AAD = b"constmig-session-v1 record"
_L_QUOTE = b"constmig-session-v1 platform quote"

_B32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_SID = Annotated[bytes, msgspec.Meta(min_length=SESSION_ID_SIZE, max_length=SESSION_ID_SIZE)]
_QUOTE = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_QUOTE_SIZE)]


class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True, frozen=True):
    version: int
    eph_pub: _B32
    nonce: _B32


class Accept(msgspec.Struct, tag="accept", forbid_unknown_fields=True, frozen=True):
    session_id: _SID
    eph_pub: _B32
    nonce: _B32
    quote: _QUOTE


class Call(msgspec.Struct, tag="call", forbid_unknown_fields=True, frozen=True):
    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class QuoteRequest(msgspec.Struct, tag="quote", forbid_unknown_fields=True, frozen=True):
    nonce: _B32


Request = Call | QuoteRequest


class Answer(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What the enclave says back, sealed: a result or an error, and where it runs now."""

    ok: bool
    platform: str
    result: Any = None
    error: str = ""
    kind: str = ""


_enc = msgspec.msgpack.Encoder()
_dec_hello = msgspec.msgpack.Decoder(Hello)
_dec_accept = msgspec.msgpack.Decoder(Accept)
_dec_request = msgspec.msgpack.Decoder(Request)
_dec_answer = msgspec.msgpack.Decoder(Answer)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes, what: str) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError, OverflowError) as e:
        raise ProtocolError(f"malformed {what}: {str(e)[:200]}") from None


def _aad(header: bytes) -> bytes:
    return _L_AAD + header


def split_record(record: bytes) -> tuple[bytes, int, bytes]:
    """(session id, seq, ciphertext) of a sealed record; ProtocolError if it cannot be one."""
    if not isinstance(record, bytes | bytearray | memoryview) or not HEADER.size + TAG_SIZE <= len(record) <= MAX_RECORD:
        raise ProtocolError("malformed session record")
    sid, seq = HEADER.unpack_from(record)
    return sid, seq, bytes(record[HEADER.size:])


# --- the client's side -----------------------------------------------------------------------------------

QuoteVerifier = Callable[[bytes], VerifiedQuote]
IdentityCheck = Callable[[VerifiedQuote], None]


class ClientOpen:
    """The client's half of an open: `hello` to send, then `finish(accept)` gives the session."""

    def __init__(self) -> None:
        self._eph = X25519PrivateKey.generate()
        self.hello = _enc.encode(Hello(VERSION, x25519_pub(self._eph), os.urandom(32)))

    def finish(self, accept: bytes, verify: QuoteVerifier, check: IdentityCheck) -> ClientSession:
        """Check the enclave's quote (root, binding to this Hello, the client's policy); derive the keys."""
        acc: Accept = _decode(_dec_accept, accept, "session accept from the enclave")
        vq = verify(acc.quote)  # AttestationError propagates
        bound = transcript_hash(_L_ACCEPT, self.hello, acc.session_id, acc.eph_pub, acc.nonce)
        if not hmac.compare_digest(vq.report_data, bound):
            raise AttestationError("the enclave's quote is not bound to this session (replayed, or not "
                                   "from the enclave that answered)")
        check(vq)
        secret = x25519_shared(self._eph, acc.eph_pub, "the enclave")
        th = transcript_hash(_L_TRANSCRIPT, self.hello, bytes(accept))
        return ClientSession(acc.session_id, hkdf32(secret, th, _L_C2E), hkdf32(secret, th, _L_E2C), th, vq)


class ClientSession:
    """A client's open session: seal a request, open its answer; keep the record until it is answered.

    `pending` is the sealed request still waiting for its answer: resend exactly it (never a new seal)
    wherever the enclave runs now; the enclave runs it at most once.
    """

    def __init__(self, session_id: bytes, c2e: bytes, e2c: bytes, transcript: bytes, peer: VerifiedQuote) -> None:
        self.session_id = session_id
        self.transcript = transcript
        self.peer = peer  # the quote the session was opened on
        self.identity: Identity = peer.identity
        self.platform = peer.platform_id  # where the enclave runs, as its last answer said
        self.moves: list[str] = []  # platforms it moved to during this session, in order
        self._sealer = RecordSealer(c2e, DIR_C2E)
        self._opener = RecordOpener(e2c, DIR_E2C)
        self.pending: bytes | None = None
        self._quote_nonce: bytes | None = None

    def _seal(self, req: Request) -> bytes:
        if self.pending is not None:
            raise ProtocolError("the previous request has no answer yet; resend `pending` first")
        body = _enc.encode(req)
        seq = self._sealer.next_seq
        header = HEADER.pack(self.session_id, seq)
        _, ct = self._sealer.seal(_aad(header), body)
        self.pending = header + bytes(ct)
        return self.pending

    def seal_call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> bytes:
        return self._seal(Call(method, list(args), dict(kwargs)))

    def seal_quote_request(self) -> bytes:
        """Ask the enclave for a quote from the platform it runs on now, bound to this session."""
        self._quote_nonce = os.urandom(32)
        return self._seal(QuoteRequest(self._quote_nonce))

    def open_answer(self, record: bytes) -> Answer:
        """The answer to `pending`; IntegrityError (and the session is over) if it is not exactly that."""
        if self.pending is None:
            raise ProtocolError("an answer arrived with no request outstanding")
        sid, seq, ct = split_record(record)
        if not hmac.compare_digest(sid, self.session_id):
            raise IntegrityError("an answer for another session arrived (refused)")
        header = HEADER.pack(sid, seq)
        plain = self._opener.open(seq, _aad(header), ct)  # replayed, reordered, forged: IntegrityError
        answer: Answer = _decode(_dec_answer, bytes(plain), "sealed answer")
        self.pending = None
        if answer.platform != self.platform:
            self.moves.append(answer.platform)
            self.platform = answer.platform
        return answer

    def check_platform_quote(self, quote: bytes, verify: QuoteVerifier) -> VerifiedQuote:
        """Verify the quote a QuoteRequest's answer carried: this session's enclave, on the platform it claims."""
        if self._quote_nonce is None:
            raise ProtocolError("no platform quote was asked for")
        vq = verify(quote)
        nonce, self._quote_nonce = self._quote_nonce, None
        if not hmac.compare_digest(vq.report_data, transcript_hash(_L_QUOTE, self.transcript, nonce)):
            raise AttestationError("the platform quote is not bound to this session and request")
        if vq.identity != self.identity:
            raise AttestationError("the platform quote is from other code than this session's enclave")
        if vq.platform_id != self.platform:
            raise AttestationError(f"the platform quote is from host {vq.platform_id!r}, the enclave said "
                                   f"{self.platform!r}")
        return vq


# --- the enclave's side ----------------------------------------------------------------------------------

class EnclaveEnd(msgspec.Struct, forbid_unknown_fields=True):
    """One session as the enclave holds it: plain data, so it moves in the sealed small state."""

    session_id: bytes
    c2e: bytes
    e2c: bytes
    transcript: bytes
    next_seq: int = 0
    last_digest: bytes = b""  # sha256 of the last request record that ran
    last_answer: bytes = b""  # its sealed answer, sent again if that same record comes again

    def receive(self, record: bytes) -> Request | bytes:
        """The request to run, or (a resent last request) its sealed answer as bytes. Refusals change nothing."""
        sid, seq, ct = split_record(record)
        if seq + 1 == self.next_seq and hmac.compare_digest(hashlib.sha256(record).digest(), self.last_digest):
            return self.last_answer
        if seq != self.next_seq:
            what = "replayed or duplicated" if seq < self.next_seq else "reordered, or requests were dropped"
            raise IntegrityError(f"session request seq {seq} where {self.next_seq} was expected ({what}); refused")
        if seq > U64_MAX - 1:
            raise IntegrityError("session sequence numbers are exhausted; open a new session")
        try:
            plain = AESGCM(self.c2e).decrypt(NONCE.pack(DIR_C2E, seq), ct, _aad(HEADER.pack(sid, seq)))
        except InvalidTag:
            raise IntegrityError(f"session request seq {seq} failed authentication (tampered or forged); "
                                 "refused") from None
        return _decode(_dec_request, plain, "sealed request")

    def answer(self, record: bytes, answer: Answer) -> bytes:
        """Seal the answer to `record` (which receive() accepted) and remember both: the request ran."""
        seq = self.next_seq
        header = HEADER.pack(self.session_id, seq)
        ct = AESGCM(self.e2c).encrypt(NONCE.pack(DIR_E2C, seq), _enc.encode(answer), _aad(header))
        self.next_seq = seq + 1
        self.last_digest = hashlib.sha256(record).digest()
        self.last_answer = header + ct
        return self.last_answer

    def quote_report_data(self, req: QuoteRequest) -> bytes:
        return transcript_hash(_L_QUOTE, self.transcript, req.nonce)


def accept(hello: bytes, quote: Callable[[bytes], bytes]) -> tuple[EnclaveEnd, bytes]:
    """The enclave's half of an open: a fresh session and the Accept to send; `quote(report_data)` signs."""
    h: Hello = _decode(_dec_hello, hello, "session hello from the client")
    if h.version != VERSION:
        raise ProtocolError(f"client speaks session version {h.version}, this enclave {VERSION}")
    eph = X25519PrivateKey.generate()
    secret = x25519_shared(eph, h.eph_pub, "the client")
    sid, eph_pub, nonce = os.urandom(SESSION_ID_SIZE), x25519_pub(eph), os.urandom(32)
    acc = _enc.encode(Accept(sid, eph_pub, nonce, quote(transcript_hash(_L_ACCEPT, bytes(hello), sid, eph_pub, nonce))))
    th = transcript_hash(_L_TRANSCRIPT, bytes(hello), acc)
    return EnclaveEnd(sid, hkdf32(secret, th, _L_C2E), hkdf32(secret, th, _L_E2C), th), acc


def encode_ends(ends: list[EnclaveEnd]) -> bytes:
    return _enc.encode(ends)


def decode_ends(blob: bytes) -> list[EnclaveEnd]:
    return _decode(msgspec.msgpack.Decoder(list[EnclaveEnd]), blob, "session table")
