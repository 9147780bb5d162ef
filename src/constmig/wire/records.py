"""The binary record format that every byte between two enclaves travels in. Pure: no I/O.

A record is a fixed 28-byte header followed by `length` payload bytes:

    magic "CMG1" | kind u8 | flags u8 | reserved u16 (0) | length u32 | seq u64 | arg u64

HANDSHAKE payloads are plaintext (the handshake authenticates itself through its transcript);
CONTROL and CHUNK payloads are AES-256-GCM ciphertext with the 16-byte tag appended, and the whole
header is part of their associated data, so no header field can be changed unnoticed.
`arg` is the chunk index for CHUNK records and 0 otherwise.

A CHUNK record with FLAG_ZERO stands for a chunk of zeros: its payload is the 4-byte big-endian
plaintext length it stands for, encrypted like any chunk (so the claim is authenticated and bound to
its index), instead of that many zero bytes. QEMU sends zero pages the same way; an enclave's heap
is mostly allocated-but-unwritten memory until the app fills it.

Lengths are bounded per kind before a single payload byte is read, so a forged header cannot make a
receiver allocate or wait for gigabytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from constmig.errors import ProtocolError

MAGIC = b"CMG1"
HEADER = struct.Struct("!4sBBHIQQ")
HEADER_SIZE = HEADER.size  # 28
TAG_SIZE = 16  # AES-GCM tag, appended to every encrypted payload

MAX_CHUNK = 4 << 20  # largest heap chunk (plaintext) one CHUNK record may carry
MAX_HANDSHAKE_PAYLOAD = 1 << 20  # quotes with certificates are a few KiB; 1 MiB is generous
MAX_CONTROL_PAYLOAD = 1 << 20  # plaintext bytes of one CONTROL message
_CHUNK_MARGIN = 256  # room for a future per-chunk prefix without a format change

U64_MAX = (1 << 64) - 1

FLAG_DEMAND = 0x01  # CHUNK only: sent in answer to a demand request (for metrics; authenticated)
FLAG_ZERO = 0x02  # CHUNK only: the chunk is all zeros; the payload is its length (see the module doc)
ZERO_PAYLOAD = 4  # plaintext bytes of a FLAG_ZERO record: u32 length


class Kind(IntEnum):
    HANDSHAKE = 1
    CONTROL = 2
    CHUNK = 3


_ALLOWED_FLAGS = {Kind.HANDSHAKE: 0, Kind.CONTROL: 0, Kind.CHUNK: FLAG_DEMAND | FLAG_ZERO}
_MAX_LENGTH = {
    Kind.HANDSHAKE: MAX_HANDSHAKE_PAYLOAD,
    Kind.CONTROL: MAX_CONTROL_PAYLOAD + TAG_SIZE,
    Kind.CHUNK: MAX_CHUNK + TAG_SIZE + _CHUNK_MARGIN,
}
# An encrypted payload is at least its tag; a chunk also carries at least one byte.
_MIN_LENGTH = {Kind.HANDSHAKE: 0, Kind.CONTROL: TAG_SIZE, Kind.CHUNK: TAG_SIZE + 1}
MAX_RECORD_PAYLOAD = max(_MAX_LENGTH.values())


def max_length(kind: Kind) -> int:
    """Largest `length` (wire payload bytes, tag included) a record of this kind may announce."""
    return _MAX_LENGTH[Kind(kind)]


def is_encrypted(kind: Kind) -> bool:
    return kind != Kind.HANDSHAKE


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed, validated record header."""

    kind: Kind
    flags: int
    length: int  # payload bytes on the wire (ciphertext + tag for encrypted kinds)
    seq: int
    arg: int

    @property
    def plaintext_length(self) -> int:
        return self.length - TAG_SIZE if is_encrypted(self.kind) else self.length

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.kind, self.flags, 0, self.length, self.seq, self.arg)


def _check(kind: Kind, flags: int, length: int, seq: int, arg: int) -> str | None:
    """Why these header fields are invalid, or None. Shared by the packer and the parser."""
    if flags & ~_ALLOWED_FLAGS[kind]:
        return f"{kind.name} record has unknown flags 0x{flags:02x}"
    if not _MIN_LENGTH[kind] <= length <= _MAX_LENGTH[kind]:
        return (f"{kind.name} record length {length} is outside "
                f"{_MIN_LENGTH[kind]}..{_MAX_LENGTH[kind]}")
    if flags & FLAG_ZERO and length != ZERO_PAYLOAD + TAG_SIZE:
        return f"zero CHUNK record length {length} is not {ZERO_PAYLOAD + TAG_SIZE}"
    if kind != Kind.CHUNK and arg != 0:
        return f"{kind.name} record has nonzero arg {arg}"
    if not 0 <= seq <= U64_MAX or not 0 <= arg <= U64_MAX:
        return "seq and arg must fit in 64 bits"
    return None


def pack_header(kind: Kind, length: int, seq: int, arg: int = 0, flags: int = 0) -> bytes:
    """Build a header; ValueError for fields a peer would reject (a bug on this side)."""
    try:
        kind = Kind(kind)
    except ValueError:
        raise ValueError(f"unknown record kind {kind!r}") from None
    why = _check(kind, flags, length, seq, arg)
    if why:
        raise ValueError(why)
    return HEADER.pack(MAGIC, kind, flags, 0, length, seq, arg)


def pack_header_into(buf: bytearray | memoryview, kind: Kind, length: int, seq: int, arg: int = 0,
                     flags: int = 0) -> None:
    """Like pack_header, but writes into buf[0:28] so a sender can place ciphertext right after it."""
    buf[:HEADER_SIZE] = pack_header(kind, length, seq, arg, flags)


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Validate and parse exactly HEADER_SIZE bytes; ProtocolError says what is wrong."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"record header must be {HEADER_SIZE} bytes, got {len(data)}")
    magic, kind, flags, reserved, length, seq, arg = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad record magic {bytes(magic)!r} (expected {MAGIC!r}): not a constmig stream")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown record kind {kind}") from None
    if reserved != 0:
        raise ProtocolError(f"record header reserved field is 0x{reserved:04x}, must be 0")
    why = _check(kind, flags, length, seq, arg)
    if why:
        raise ProtocolError(why)
    return Header(kind, flags, length, seq, arg)
