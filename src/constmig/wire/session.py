"""Attested client sessions: a client and an enclave, with the untrusted host forwarding opaque bytes. Sans-IO.

The host (agent) carries every byte a client exchanges with its enclave, so the client checks a quote
for the enclave it expects before it sends a byte, and everything after is sealed end to end:

    open     client -> enclave   Hello{version, eph_pub, nonce, close?}
    accept   enclave -> client   Accept{body, quote(H("accept", Hello, body))}
                                 body = {session_id, eph_pub, nonce, about{instance, code, launch}, closed?}
    record   client -> enclave   session_id | seq | AES-GCM(c2e key, request)     request n has seq n
    record   enclave -> client   session_id | seq | AES-GCM(e2c key, answer)      answer n has seq n

The quote binds the enclave's ephemeral key to this client's Hello (a quote recorded from another
session binds other values), and binds `about`: which enclave *instance* answers (a random id it drew at
its first launch and carries through migrations, checkpoints and restores), the hash of its code and its
launch configuration, so a client can tell its own enclave from another copy of the same code and say
what differs. Keys come from X25519 with HKDF salted by the transcript. Only the enclave is
authenticated, as in server-side TLS: a client is whoever holds the session's keys.

Exactly once. Request n runs once: the enclave accepts only seq == next, and keeps the sealed answer
of the last request with that request's digest, so a client that never saw its answer (connection cut,
the enclave moved meanwhile) sends the *same record* again and gets the same sealed answer, without a
second run. Any other seq is refused and changes nothing: a replayed or reordered request never runs.
A refused record does not end the session (the host can always drop records; a tampered one must not
take the session down with it). The client's side is strict in the other direction: one answer per
request, in order, and after a bad answer the session is over.

Closing what the client gave up on. A client that must open a new session while a request of its old
one has no answer (the host says the session is unknown, or the client timed out) puts `close` in its
Hello: the old session's id and a MAC, under a key only that session's two ends hold, over this Hello's
key and nonce. The enclave drops that session before it answers, and its Accept says, under the quote,
how many of the old session's requests ran (`closed.ran`, with the last sealed answer): the client learns
whether its request ran, and a record of the old session that the host still holds is refused from then
on. A MAC the enclave cannot check (the session is not there) closes nothing; `closed.known` says so.

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
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from constmig.errors import AttestationError, IntegrityError, ProtocolError
from constmig.tee.backend import MAX_QUOTE_SIZE, Identity, VerifiedQuote
from constmig.units import short_hex
from constmig.wire.aead import NONCE, RecordOpener, RecordSealer
from constmig.wire.kdf import hkdf32, lp, transcript_hash, x25519_pub, x25519_shared
from constmig.wire.records import TAG_SIZE, U64_MAX

VERSION = 2  # 2: the Accept binds the instance, code and launch; a Hello can close an old session
SESSION_ID_SIZE = 16
INSTANCE_SIZE = 16
MAX_LAUNCH = 4096  # the launch configuration's JSON (heap, chunk size, app settings)
MAX_KEPT_ANSWER = 64 * 1024  # an old session's last answer rides in the Accept that closes it up to this size
DIR_C2E = 11  # nonce directions (the migration channel uses 1 and 2; other keys anyway)
DIR_E2C = 12
MAX_RECORD = (8 << 20) - 4096  # a sealed record rides in one agent frame (framing.MAX_FRAME)
HEADER = struct.Struct("!16sQ")  # session id, seq

_L_ACCEPT = b"constmig-session-v2 accept"
_L_TRANSCRIPT = b"constmig-session-v2 transcript"
_L_C2E = b"constmig-session-v2 key client->enclave"
_L_E2C = b"constmig-session-v2 key enclave->client"
_L_AAD = b"constmig-session-v2 record"
_L_QUOTE = b"constmig-session-v2 platform quote"
_L_CLOSE_KEY = b"constmig-session-v2 close key"
_L_CLOSE = b"constmig-session-v2 close"

_B32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_SID = Annotated[bytes, msgspec.Meta(min_length=SESSION_ID_SIZE, max_length=SESSION_ID_SIZE)]
_QUOTE = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_QUOTE_SIZE)]
_IID = Annotated[bytes, msgspec.Meta(min_length=INSTANCE_SIZE, max_length=INSTANCE_SIZE)]
_BODY = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_KEPT_ANSWER + 2 * MAX_LAUNCH)]


class Close(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Close session `session_id`: `mac` proves the sender holds that session's keys (see close_mac)."""

    session_id: _SID
    mac: _B32


class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True, frozen=True):
    version: int
    eph_pub: _B32
    nonce: _B32
    close: Close | None = None


class About(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Which enclave answers, as the enclave itself says under its quote: the instance (random, drawn at its
    first launch, kept across migrations and restores), sha256 of its code, and its launch configuration
    (JSON, as measured). The measurement decides; these tell the client *what* differs."""

    instance: _IID
    code: _B32
    launch: Annotated[str, msgspec.Meta(max_length=MAX_LAUNCH)]


class Closed(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The enclave's word on a session a Hello closed: whether it had it, how many of its requests ran
    (all that ever will), and the last one's sealed answer (when small enough to carry)."""

    session_id: _SID
    known: bool
    ran: int = 0
    last_answer: bytes = b""


class AcceptBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    session_id: _SID
    eph_pub: _B32
    nonce: _B32
    about: About
    closed: Closed | None = None


class Accept(msgspec.Struct, tag="accept", forbid_unknown_fields=True, frozen=True):
    body: _BODY  # an encoded AcceptBody: the quote covers exactly these bytes
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
_dec_body = msgspec.msgpack.Decoder(AcceptBody)
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
IdentityCheck = Callable[[VerifiedQuote, About], None]


def close_key(c2e: bytes, transcript: bytes) -> bytes:
    """The key that proves a close of one session: both its ends derive it, nobody else can."""
    return hkdf32(c2e, transcript, _L_CLOSE_KEY)


def close_mac(key: bytes, session_id: bytes, eph_pub: bytes, nonce: bytes) -> bytes:
    """The MAC over the new Hello's fresh values: it cannot be moved to another Hello."""
    return hmac.new(key, _L_CLOSE + lp(session_id, eph_pub, nonce), "sha256").digest()


@dataclass(frozen=True)
class Closing:
    """A session to close at the next open, and what the client needs to read the enclave's word on it.
    Plain data, so a client process can keep it in a file for the next one (the CLI does)."""

    session_id: bytes
    key: bytes  # close_key(): proves the close, and is all it can do
    instance: bytes  # the enclave instance the session was with
    pending: int | None = None  # seq of the request whose outcome the client does not know
    e2c: bytes = b""  # to open that request's answer if the enclave kept it (optional)
    what: str = ""  # the request, for the user ("put balance 100")


@dataclass(frozen=True)
class Settled:
    """What became of a closed session's outstanding request: ran True/False, or None (unknown)."""

    ran: bool | None
    answer: Answer | None
    why: str


def settle(closing: Closing, closed: Closed, about: About) -> Settled:
    """Read the enclave's Closed (authenticated by the Accept's quote) against what the client left open."""
    what = f" ({closing.what})" if closing.what else ""
    if not hmac.compare_digest(closing.instance, about.instance):
        return Settled(None, None, f"the earlier call{what} was with instance {short_hex(closing.instance)}, "
                                   f"not this one ({short_hex(about.instance)}): its outcome stays unknown")
    if not closed.known:
        return Settled(None, None, f"the enclave no longer knows the session of the earlier call{what} (it was "
                                   "restored from a checkpoint, or the session sat idle past the table's limit): "
                                   "whether it ran is unknown, and it can no longer run")
    if closing.pending is None:
        return Settled(False, None, "nothing was outstanding")
    if closed.ran < closing.pending:
        raise ProtocolError(f"the enclave says {closed.ran} requests of the closed session ran, but request "
                            f"{closing.pending} was sent after answers to all before it")
    if closed.ran == closing.pending:
        return Settled(False, None, f"the earlier call{what} did not run, and its session is closed: it never will")
    answer = None
    if closed.ran == closing.pending + 1 and closed.last_answer and closing.e2c:
        sid, seq, ct = split_record(closed.last_answer)
        try:
            if sid == closing.session_id and seq == closing.pending:
                plain = AESGCM(closing.e2c).decrypt(NONCE.pack(DIR_E2C, seq), ct, _aad(HEADER.pack(sid, seq)))
                answer = _decode(_dec_answer, plain, "kept answer")
        except InvalidTag:
            raise IntegrityError("the kept answer of the closed session failed authentication") from None
    return Settled(True, answer, f"the earlier call{what} ran (its session is closed now)")


class ClientOpen:
    """The client's half of an open: `hello` to send, then `finish(accept)` gives the session.

    With `closing`, the Hello also closes that old session (see the module docstring)."""

    def __init__(self, closing: Closing | None = None) -> None:
        self._eph = X25519PrivateKey.generate()
        self.closing = closing
        eph_pub, nonce = x25519_pub(self._eph), os.urandom(32)
        close = None if closing is None else Close(closing.session_id,
                                                   close_mac(closing.key, closing.session_id, eph_pub, nonce))
        self.hello = _enc.encode(Hello(VERSION, eph_pub, nonce, close))

    def finish(self, accept: bytes, verify: QuoteVerifier, check: IdentityCheck) -> ClientSession:
        """Check the enclave's quote (root, binding to this Hello and the body, the client's policy on the code
        and instance), and the close it was asked for; derive the keys."""
        acc: Accept = _decode(_dec_accept, accept, "session accept from the enclave")
        vq = verify(acc.quote)  # AttestationError propagates
        bound = transcript_hash(_L_ACCEPT, self.hello, acc.body)
        if not hmac.compare_digest(vq.report_data, bound):
            raise AttestationError("the enclave's quote is not bound to this session (replayed, or not "
                                   "from the enclave that answered)")
        body: AcceptBody = _decode(_dec_body, acc.body, "session accept from the enclave")
        check(vq, body.about)
        asked = self.closing.session_id if self.closing is not None else None
        if (body.closed.session_id if body.closed is not None else None) != asked:
            raise ProtocolError("the enclave's accept does not answer the close this client asked for")
        secret = x25519_shared(self._eph, body.eph_pub, "the enclave")
        th = transcript_hash(_L_TRANSCRIPT, self.hello, bytes(accept))
        return ClientSession(body.session_id, hkdf32(secret, th, _L_C2E), hkdf32(secret, th, _L_E2C), th, vq,
                             body.about, body.closed)


class ClientSession:
    """A client's open session: seal a request, open its answer; keep the record until it is answered.

    `pending` is the sealed request still waiting for its answer: resend exactly it (never a new seal)
    wherever the enclave runs now; the enclave runs it at most once.
    """

    def __init__(self, session_id: bytes, c2e: bytes, e2c: bytes, transcript: bytes, peer: VerifiedQuote,
                 about: About, closed: Closed | None = None) -> None:
        self.session_id = session_id
        self.transcript = transcript
        self.peer = peer  # the quote the session was opened on
        self.identity: Identity = peer.identity
        self.about = about  # instance, code, launch: bound to the quote
        self.closed = closed  # the enclave's word on the session this open closed
        self.platform = peer.platform_id  # where the enclave runs, as its last answer said
        self.moves: list[str] = []  # platforms it moved to during this session, in order
        self._sealer = RecordSealer(c2e, DIR_C2E)
        self._opener = RecordOpener(e2c, DIR_E2C)
        self._close_key = close_key(c2e, transcript)
        self._e2c = e2c
        self.pending: bytes | None = None
        self._quote_nonce: bytes | None = None

    def closing(self, what: str = "") -> Closing:
        """What a later open needs to close this session (and to learn whether `pending` ran)."""
        seq = HEADER.unpack_from(self.pending)[1] if self.pending is not None else None
        return Closing(self.session_id, self._close_key, self.about.instance, seq, self._e2c, what)

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

    def proves_close(self, hello: Hello) -> bool:
        """Whether `hello.close` was made with this session's keys, for this Hello."""
        assert hello.close is not None
        mac = close_mac(close_key(self.c2e, self.transcript), self.session_id, hello.eph_pub, hello.nonce)
        return hmac.compare_digest(mac, hello.close.mac)

    def closed(self) -> Closed:
        """This session's end, as an Accept reports it: every request that ran, and the last answer."""
        kept = self.last_answer if len(self.last_answer) <= MAX_KEPT_ANSWER else b""
        return Closed(self.session_id, True, self.next_seq, kept)


def parse_hello(hello: bytes) -> Hello:
    """A client's Hello, checked for this session version (ProtocolError otherwise)."""
    h: Hello = _decode(_dec_hello, hello, "session hello from the client")
    if h.version != VERSION:
        raise ProtocolError(f"client speaks session version {h.version}, this enclave {VERSION}")
    return h


def accept(hello: bytes, quote: Callable[[bytes], bytes], about: About,
           closed: Closed | None = None) -> tuple[EnclaveEnd, bytes]:
    """The enclave's half of an open: a fresh session and the Accept to send; `quote(report_data)` signs
    the body (this enclave's `about`, and `closed`: its word on the session the Hello closed)."""
    h = parse_hello(hello)
    eph = X25519PrivateKey.generate()
    secret = x25519_shared(eph, h.eph_pub, "the client")
    sid, eph_pub, nonce = os.urandom(SESSION_ID_SIZE), x25519_pub(eph), os.urandom(32)
    body = _enc.encode(AcceptBody(sid, eph_pub, nonce, about, closed))
    acc = _enc.encode(Accept(body, quote(transcript_hash(_L_ACCEPT, bytes(hello), body))))
    th = transcript_hash(_L_TRANSCRIPT, bytes(hello), acc)
    return EnclaveEnd(sid, hkdf32(secret, th, _L_C2E), hkdf32(secret, th, _L_E2C), th), acc


class Table(msgspec.Struct, forbid_unknown_fields=True):
    """A session table as it moves in the small state: open sessions, and the ones closed lately."""

    ends: list[EnclaveEnd] = []
    closed: list[Closed] = []


def encode_table(ends: list[EnclaveEnd], closed: list[Closed] | None = None) -> bytes:
    return _enc.encode(Table(ends, closed or []))


def decode_table(blob: bytes) -> Table:
    return _decode(msgspec.msgpack.Decoder(Table), blob, "session table")


def encode_ends(ends: list[EnclaveEnd]) -> bytes:
    return encode_table(ends)


def decode_ends(blob: bytes) -> list[EnclaveEnd]:
    return decode_table(blob).ends
