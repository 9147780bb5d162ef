"""A small, hard-to-misuse face for the C engine (_engine.c): the same record format, nonces and AAD as
wire/channel.py, so a record sealed here opens in a SecureChannel and the other way round.

Shaped like wire/aead.py: callers never choose a seq (a sealer or opener numbers its records from where
it was started); an opener takes only the next seq and any failure (bad tag, wrong seq, malformed
header, short read, a chunk outside the heap) poisons it for good. The position moves between the Python
and the native path the way a channel already moves between processes: `from_ticket` starts at a
ChannelTicket's seqs (e.g. from `SecureChannel.detach()`), `detach()` hands the next seq back and makes
the native object refuse everything after, so two sealers can never hold the same position. A
SecureChannel continues with `SecureChannel.resume(sock, dataclasses.replace(ticket, send_seq=...))`.

Only CHUNK records: the control plane (CONTROL records, the handshake) stays in Python.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np

from constmig.wire.records import FLAG_DEMAND, FLAG_ZERO, TAG_SIZE

try:
    from constmig.native import _engine
except ImportError as e:  # not built (no compiler or no OpenSSL headers at install): the Python path runs
    _engine = None
    _WHY: str | None = f"the native engine was not built or does not load ({e})"
else:
    _WHY = None

Buffer = bytes | bytearray | memoryview | np.ndarray
FdLike = int | socket.socket


def available() -> bool:
    """Is the native engine built and loadable here?"""
    return _engine is not None


def why_unavailable() -> str | None:
    """Why the native engine cannot be used (None when it can)."""
    return _WHY


def _module():  # noqa: ANN202 (the C module)
    if _engine is None:
        raise RuntimeError(_WHY)
    return _engine


def _fd(sock: FdLike) -> int:
    fd = sock if isinstance(sock, int) else sock.fileno()
    if fd < 0:
        raise ValueError("socket is closed")
    return fd


def _timeout_ms(timeout: float | None) -> int:
    """How long one wait for the peer may last (None: for ever); past it the stream is given up."""
    if timeout is None:
        return -1
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    return min(int(timeout * 1000), 2**31 - 1)


def _heap_view(heap: Buffer, chunk_size: int, *, writable: bool) -> memoryview:
    view = memoryview(heap)
    if not view.c_contiguous:
        raise ValueError("heap must be contiguous")
    if writable and view.readonly:
        raise TypeError("heap must be writable")
    view = view.cast("B")
    if not isinstance(chunk_size, int) or chunk_size < 1 or len(view) % chunk_size:
        raise ValueError(f"chunk size {chunk_size!r} must divide the heap's {len(view)} bytes")
    return view


@dataclass(frozen=True, slots=True)
class Sealed:
    """One sealed CHUNK record: the bytes to send and the tag for the sender's ledger."""

    record: bytes
    tag: bytes
    zero: bool  # went as a FLAG_ZERO record (the chunk was all zeros)


@dataclass(frozen=True, slots=True)
class Received:
    """Chunks a bulk receive opened into the heap, in arrival order."""

    indexes: np.ndarray  # int64
    tags: np.ndarray  # (n, 16) uint8: each record's GCM tag, for the ledger
    flags: np.ndarray  # uint8: FLAG_DEMAND / FLAG_ZERO per record
    next_seq: int

    @property
    def zero(self) -> np.ndarray:
        return (self.flags & FLAG_ZERO) != 0

    @property
    def demand(self) -> np.ndarray:
        return (self.flags & FLAG_DEMAND) != 0


@dataclass(frozen=True, slots=True)
class Opened:
    """One CHUNK record recv_one verified: its chunk is at the start of the caller's buffer (unless zero)."""

    index: int
    flags: int
    length: int  # the chunk's bytes (a zero record's verified claim)
    tag: bytes


class NativeSealer:
    """Seals one direction's CHUNK records natively, numbered from `start_seq`."""

    __slots__ = ("_c", "zero_chunks_sent")

    def __init__(self, key: bytes, direction: int, migration_id: bytes, start_seq: int = 0) -> None:
        self._c = _module().Sealer(key, direction, migration_id, start_seq)
        self.zero_chunks_sent = 0

    @classmethod
    def from_ticket(cls, ticket: object) -> NativeSealer:
        """The send side of a channel ticket (wire.channel.ChannelTicket), at its send seq."""
        return cls(ticket.send_key, ticket.send_dir, ticket.migration_id, ticket.send_seq)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"NativeSealer(direction={self._c.direction}, next_seq={self._c.next_seq})"

    @property
    def next_seq(self) -> int:
        return self._c.next_seq

    def seal_chunk(self, index: int, data: Buffer, *, demand: bool = False) -> Sealed:
        """Seal one chunk (1..MAX_CHUNK bytes) bound to `index`; a chunk of zeros goes as a FLAG_ZERO record."""
        record, tag, zero = self._c.seal(index, _flat(data), demand)
        self.zero_chunks_sent += zero
        return Sealed(record, tag, zero)

    def send_chunks(self, sock: FdLike, heap: Buffer, chunk_size: int, indexes: np.ndarray, *,
                    demand: bool = False, timeout: float | None = None) -> np.ndarray:
        """Seal the listed chunks straight from `heap` and send them on `sock`, GIL released for the
        whole batch; return their tags ((n, 16) uint8, in order). An index outside the heap is refused
        before anything is sent; a failed send leaves this sealer unusable (part of a record may be out)."""
        view = _heap_view(heap, chunk_size, writable=False)
        idx = np.ascontiguousarray(indexes, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError("indexes must be one-dimensional")
        tags = np.empty((idx.size, TAG_SIZE), dtype=np.uint8)
        self.zero_chunks_sent += self._c.send(_fd(sock), view, chunk_size, idx, tags, demand, _timeout_ms(timeout))
        return tags

    def detach(self) -> int:
        """Hand the position back (the seq the next record must use); this sealer refuses everything after."""
        return self._c.detach()


class NativeOpener:
    """Opens one direction's CHUNK records natively, strictly from `start_seq` on; poisoned by any failure."""

    __slots__ = ("_c",)

    def __init__(self, key: bytes, direction: int, migration_id: bytes, start_seq: int = 0) -> None:
        self._c = _module().Opener(key, direction, migration_id, start_seq)

    @classmethod
    def from_ticket(cls, ticket: object) -> NativeOpener:
        """The receive side of a channel ticket (wire.channel.ChannelTicket), at its receive seq."""
        return cls(ticket.recv_key, ticket.recv_dir, ticket.migration_id, ticket.recv_seq)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"NativeOpener(direction={self._c.direction}, expected_seq={self._c.next_seq})"

    @property
    def expected_seq(self) -> int:
        return self._c.next_seq

    @property
    def failed(self) -> bool:
        return self._c.failed is not None

    def open_chunk(self, record: Buffer, out: Buffer) -> tuple[int, int, bytes]:
        """Verify one whole record (header + payload) and put its chunk in `out` (exactly its length);
        return (index, flags, tag). `out` is written only after the tag checked."""
        return self._c.open(_flat(record), out)

    def recv_chunks(self, sock: FdLike, heap: Buffer, chunk_size: int, count: int, *,
                    timeout: float | None = None) -> Received:
        """Read `count` CHUNK records from `sock` and open each into its chunk of `heap` (verified in
        scratch first), GIL released for the whole batch. Raises IntegrityError, ProtocolError or
        ChannelClosed like SecureChannel.recv, and the opener is poisoned; chunks installed before the
        failure were verified, but the stream cannot continue."""
        view = _heap_view(heap, chunk_size, writable=True)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        idx = np.empty(count, dtype=np.int64)
        flags = np.empty(count, dtype=np.uint8)
        tags = np.empty((count, TAG_SIZE), dtype=np.uint8)
        self._c.recv(_fd(sock), view, chunk_size, idx, flags, tags, _timeout_ms(timeout))
        return Received(idx, tags, flags, self._c.next_seq)

    def recv_one(self, sock: FdLike, out: Buffer, *, idle: float | None = None,
                 timeout: float | None = None) -> Opened | bytes | None:
        """One record of the post-copy stream (GIL released): None if none began within `idle` seconds
        (nothing read, the position unchanged); a record that is not a CHUNK as its 28 header bytes, its
        body unread and the position unchanged (the caller's Python side reads and judges it); or a CHUNK
        record of at most len(out) bytes, verified in the opener's scratch and only then copied to the
        start of `out` (a zero chunk writes nothing). `timeout` bounds each wait once a record began; past
        it the stream is given up (ChannelClosed). Failures raise as recv_chunks does and poison."""
        got = self._c.recv_one(_fd(sock), _flat(out), _timeout_ms(idle), _timeout_ms(timeout))
        if got is None or isinstance(got, bytes):
            return got
        index, flags, length, tag = got
        return Opened(index, flags, length, tag)

    def detach(self) -> int:
        """Hand the position back (the seq expected next); this opener refuses everything after."""
        return self._c.detach()


def _flat(data: Buffer) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("buffer must be contiguous")
    return view.cast("B") if view.format not in ("B", "b", "c") or view.ndim != 1 else view
