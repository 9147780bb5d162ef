"""AES-256-GCM for records, shaped so that the easy mistakes cannot be made.

Why this wrapper instead of AESGCM directly: GCM breaks completely if a (key, nonce) pair is ever
reused, and a stream of records is only fresh and complete if every record is opened exactly once and
in order. So callers never choose a nonce: a sealer numbers its records 0, 1, 2, ... and builds the
12-byte nonce as direction (u32) || seq (u64); an opener accepts only the next number it expects
(anything else is a replay, a reorder or a drop), and after any failure it refuses to open anything
again. Neither counter wraps: at 2**64 records the key is spent.

Not thread-safe: one sealer per sending direction, used under the sender's lock (as SecureChannel does).
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from constmig.errors import IntegrityError, ProtocolError
from constmig.wire.records import TAG_SIZE, U64_MAX

KEY_SIZE = 32
NONCE = struct.Struct("!IQ")  # direction, seq
U32_MAX = (1 << 32) - 1

Buffer = bytes | bytearray | memoryview


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise ValueError(f"AES-256-GCM needs a {KEY_SIZE}-byte key, got {len(key)} bytes")
    return key


def _check_direction(direction: object) -> int:
    if not isinstance(direction, int) or isinstance(direction, bool):
        raise TypeError(f"direction must be an int, not {type(direction).__name__}")
    if not 0 <= direction <= U32_MAX:
        raise ValueError(f"direction must fit in 32 bits, got {direction}")
    return direction


def _check_start(seq: object) -> int:
    """A sealer/opener handed to another trusted process continues at the seq where it stopped."""
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= U64_MAX:
        raise ValueError(f"start seq must be an int in 0..2**64-1, not {seq!r}")
    return seq


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be a bytes-like object, not {type(value).__name__}")


def _flat(name: str, value: object) -> Buffer:
    """`value` as flat bytes without copying (a view of a numpy array of floats becomes bytes)."""
    _check_bytes(name, value)
    if isinstance(value, memoryview) and (value.ndim != 1 or value.format not in ("B", "b", "c")):
        if not value.c_contiguous:
            raise ValueError(f"{name} must be contiguous")
        return value.cast("B")
    return value  # type: ignore[return-value]


def _writable(name: str, out: object, size: int) -> memoryview:
    """A flat, writable byte view of `out` of exactly `size` bytes, or TypeError/ValueError."""
    try:
        view = memoryview(out)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a writable buffer, not {type(out).__name__}") from None
    if view.readonly:
        raise TypeError(f"{name} must be writable")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
    view = view.cast("B")
    if len(view) != size:
        raise ValueError(f"{name} must be exactly {size} bytes, got {len(view)}")
    return view


class RecordSealer:
    """Encrypts one direction's records; seq numbers come from an internal counter, starting at 0."""

    __slots__ = ("_aead", "_direction", "_next_seq", "_buf")

    def __init__(self, key: bytes, direction: int, start_seq: int = 0) -> None:
        self._aead = AESGCM(_check_key(key))
        self._direction = _check_direction(direction)
        self._next_seq = _check_start(start_seq)
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"RecordSealer(direction={self._direction}, next_seq={self._next_seq})"

    @property
    def direction(self) -> int:
        return self._direction

    @property
    def next_seq(self) -> int:
        """The seq the next seal() will use (a record header carries it, and the header is AAD)."""
        return self._next_seq

    def seal(self, aad: Buffer, data: Buffer, out: bytearray | memoryview | None = None) -> tuple[int, memoryview]:
        """Encrypt `data` as record next_seq; return (seq, ciphertext || tag).

        The ciphertext is written into `out` (exactly len(data) + 16 bytes) or, without it, into a
        buffer this sealer reuses: the returned view is then valid only until the next seal().
        """
        aad = _flat("aad", aad)
        data = _flat("data", data)
        size = len(data) + TAG_SIZE
        if out is None:
            if len(self._buf) < size:
                self._buf = bytearray(size)  # a new object: views handed out earlier stay valid memory
            view = memoryview(self._buf)[:size]
        else:
            view = _writable("out", out, size)
        seq = self._next_seq
        if seq > U64_MAX:
            raise ProtocolError("record sequence numbers of this key are exhausted; a new handshake is needed")
        self._aead.encrypt_into(NONCE.pack(self._direction, seq), data, aad, view)
        self._next_seq = seq + 1
        return seq, view


class RecordOpener:
    """Decrypts one direction's records, strictly in order; unusable after the first failure."""

    __slots__ = ("_aead", "_direction", "_next_seq", "_failed")

    def __init__(self, key: bytes, direction: int, start_seq: int = 0) -> None:
        self._aead = AESGCM(_check_key(key))
        self._direction = _check_direction(direction)
        self._next_seq = _check_start(start_seq)
        self._failed: str | None = None

    def __repr__(self) -> str:
        return f"RecordOpener(direction={self._direction}, expected_seq={self._next_seq})"

    @property
    def direction(self) -> int:
        return self._direction

    @property
    def expected_seq(self) -> int:
        return self._next_seq

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _fail(self, message: str) -> IntegrityError:
        self._failed = message
        return IntegrityError(message)

    def check_seq(self, seq: int) -> None:
        """Raise IntegrityError (and fail for good) unless `seq` is the next expected one.

        open() does this too; a receiver calls it as soon as a header arrives, before reading the body.
        """
        if self._failed is not None:
            raise IntegrityError(f"record opener is unusable after an earlier failure ({self._failed})")
        if self._next_seq > U64_MAX:
            raise self._fail("record sequence numbers of this key are exhausted")
        if seq != self._next_seq:
            what = "replayed or duplicated" if seq < self._next_seq else "reordered, or records were dropped"
            raise self._fail(f"record seq {seq} arrived where {self._next_seq} was expected ({what})")

    def open(self, seq: int, aad: Buffer, ct: Buffer, out: bytearray | memoryview | None = None) -> memoryview:
        """Verify and decrypt record `seq`; return a view of the plaintext (in `out` if given).

        `out` must be exactly len(ct) - 16 bytes. If verification fails, `out` is zeroed (GCM writes
        plaintext before it knows the tag is wrong) and IntegrityError is raised; pass a scratch
        buffer when even transient unverified plaintext must not reach the real target.
        """
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise TypeError(f"seq must be an int, not {type(seq).__name__}")
        aad = _flat("aad", aad)
        ct = _flat("ct", ct)
        ct_len = len(ct)
        size = ct_len - TAG_SIZE
        view = _writable("out", out, size) if out is not None and size >= 0 else None
        self.check_seq(seq)
        if size < 0:
            raise self._fail(f"record seq {seq} is {ct_len} bytes, shorter than its {TAG_SIZE}-byte tag")
        if view is None:
            view = memoryview(bytearray(size))
        try:
            self._aead.decrypt_into(NONCE.pack(self._direction, seq), ct, aad, view)
        except InvalidTag:
            view[:] = bytes(size)
            raise self._fail(f"record seq {seq} failed authentication (tampered, forged, or sealed with "
                             "another key or for another position)") from None
        self._next_seq = seq + 1
        return view
