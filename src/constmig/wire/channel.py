"""SecureChannel: records over a connected stream socket, encrypted once the handshake gave keys.

Why it looks like this:
- The hosts in between are adversaries, so every encrypted record's associated data is its full header
  plus the migration id: a record replayed from another migration, moved to another chunk index, or
  with any header bit changed fails its tag. Sequence numbers are strict per direction (the AEAD
  opener enforces it), so drops, duplicates and reorders fail too.
- Like trio's SSLStream the channel is OK, BROKEN or CLOSED and checks that on every call: after any
  failure the stream position can no longer be trusted, so nothing more is sent or accepted.
- Bulk data is the point of the exercise (`constmig bench raw` streams sealed 1 MiB chunks between two
  processes at 1.7-2.9 GB/s on these VMs: docs/architecture.md), so no per-byte Python work and no
  per-chunk allocation: the sender encrypts straight into a reused buffer behind the header and sends
  both with one sendall; the receiver reads into a reused buffer with recv_into and decrypts a chunk
  only when the caller says where (`open_chunk`), so a pager can verify into scratch memory and an
  already touched heap can be written in place.
- Sending and receiving are independent (one lock each), so a streaming thread can send while
  another thread receives demand requests.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np

from constmig.errors import ChannelClosed, ConstmigError, IntegrityError, ProtocolError, RecvTimeout
from constmig.wire.aead import RecordOpener, RecordSealer
from constmig.wire.records import (
    FLAG_DEMAND,
    FLAG_ZERO,
    HEADER_SIZE,
    MAX_CHUNK,
    MAX_CONTROL_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    TAG_SIZE,
    U64_MAX,
    ZERO_PAYLOAD,
    Header,
    Kind,
    is_encrypted,
    pack_header,
    parse_header,
)

MIGRATION_ID_SIZE = 16
_SUBCHANNEL_INFO = b"constmig subchannel v1 "
_ZERO_LEN = struct.Struct("!I")
_ZERO_PROBE = 4096  # bytes looked at first: a chunk with data almost always has some here


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Are all of `data`'s bytes zero? Cheap for data (one page looked at), one read pass for zeros."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size % 8 == 0:
        arr = arr.view(np.uint64)
    probe = _ZERO_PROBE // arr.itemsize
    return not arr[:probe].any() and not arr[probe:].any()


@dataclass(frozen=True, slots=True)
class ChannelTicket:
    """An encrypted channel's keys and positions, so another trusted process can continue it.

    Post-copy hands the destination's channel to its pager process after the handoff; `derive` gives
    a second channel (the demand path) keys of its own, so no record can move between the two.
    Only ever passed between processes of one enclave (a socketpair both ends of which are trusted).
    """

    migration_id: bytes
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    send_dir: int
    recv_dir: int
    send_seq: int = 0
    recv_seq: int = 0

    def derive(self, label: bytes) -> ChannelTicket:
        """Keys for a sibling channel: both ends derive the same pair, at seq 0, bound to `label`."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        def kdf(key: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=self.migration_id, info=_SUBCHANNEL_INFO + label).derive(key)

        return ChannelTicket(self.migration_id, kdf(self.send_key), kdf(self.recv_key), self.send_dir,
                             self.recv_dir)

    def to_wire(self) -> dict:
        return {"mid": self.migration_id, "sk": self.send_key, "rk": self.recv_key, "sd": self.send_dir,
                "rd": self.recv_dir, "ss": self.send_seq, "rs": self.recv_seq}

    @classmethod
    def from_wire(cls, d: dict) -> ChannelTicket:
        try:
            if not all(type(d[k]) is bytes for k in ("mid", "sk", "rk")) or \
                    not all(type(d[k]) is int for k in ("sd", "rd", "ss", "rs")):
                raise TypeError("fields have the wrong types")
            if len(d["mid"]) != MIGRATION_ID_SIZE or len(d["sk"]) != 32 or len(d["rk"]) != 32:
                raise ValueError("wrong migration id or key length")
            return cls(bytes(d["mid"]), bytes(d["sk"]), bytes(d["rk"]), int(d["sd"]), int(d["rd"]),
                       int(d["ss"]), int(d["rs"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed channel ticket: {e}") from None


class StreamSocket(Protocol):
    """What the channel needs from a socket (a connected, blocking stream socket)."""

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, flags: int = 0, /) -> int: ...

    def close(self) -> None: ...


class BatchSealer(Protocol):
    """A sealer that sends a batch of CHUNK records from a heap itself (constmig.native.engine.NativeSealer),
    built by `SecureChannel.send_chunk_batch` at the channel's send position."""

    zero_chunks_sent: int

    def send_chunks(self, sock: int, heap: memoryview, chunk_size: int, indexes: np.ndarray, *,
                    demand: bool = False, timeout: float | None = None) -> np.ndarray: ...

    def detach(self) -> int: ...


class ChannelState(Enum):
    OK = "ok"
    BROKEN = "broken"  # an error left the stream position untrustworthy; every call raises
    CLOSED = "closed"  # close() was called here


@dataclass(frozen=True, slots=True)
class HandshakeRecord:
    payload: bytes


class ChunkFlags:
    """What a chunk record's flags say, for a chunk received either way (sealed or opened already)."""

    __slots__ = ()
    flags: int

    @property
    def demand(self) -> bool:
        """The sender marked this chunk as an answer to a demand request."""
        return bool(self.flags & FLAG_DEMAND)

    @property
    def zero(self) -> bool:
        """The chunk is `length` zero bytes (verified already: its record carried only the length)."""
        return bool(self.flags & FLAG_ZERO)


@dataclass(frozen=True, slots=True)
class ControlRecord:
    payload: bytes


@dataclass(frozen=True, slots=True, eq=False)
class SealedChunk(ChunkFlags):
    """A received, not yet verified chunk: its ciphertext sits in the channel's receive buffer.

    Open it with `channel.open_chunk(sealed, out)` before the next recv; a chunk not opened by then is
    still verified (into scratch) by that recv, so skipping a chunk never skips authentication.
    """

    index: int
    length: int  # plaintext bytes
    seq: int
    flags: int
    _ct: memoryview = field(repr=False)
    _aad: bytes = field(repr=False)

    @property
    def tag(self) -> bytes:
        """The record's GCM tag, which the completeness digest is built from."""
        return bytes(self._ct[-TAG_SIZE:])


@dataclass(frozen=True, slots=True, eq=False)
class OpenedChunk(ChunkFlags):
    """A received chunk that is verified already: the native engine opened it into the caller's scratch
    (`SecureChannel.recv_opened`), so `plain` holds its bytes (None for a zero chunk: `length` zero bytes,
    its claim verified). Shaped like SealedChunk where installers look."""

    index: int
    length: int  # plaintext bytes
    seq: int
    flags: int
    tag: bytes
    plain: memoryview | None = field(repr=False)


Record = HandshakeRecord | ControlRecord | SealedChunk
Arrival = SealedChunk | OpenedChunk  # a chunk as the post-copy receive threads hand it to an installer


class ChunkReceiver(Protocol):
    """An opener that receives one record at a time itself (constmig.native.engine.NativeOpener), built by
    `SecureChannel.recv_opened` at the channel's receive position."""

    @property
    def expected_seq(self) -> int: ...

    def recv_one(self, sock: int, out: memoryview, *, idle: float | None = None,
                 timeout: float | None = None) -> object: ...


def verified(chunk: Arrival, chan: SecureChannel, scratch: memoryview | np.ndarray) -> memoryview | None:
    """The verified bytes of `chunk` (None for a zero chunk, whose length the caller checks and whose
    bytes it zeroes itself): a native arrival is verified already and its bytes are in the scratch it was
    received into; a Python one is verified and decrypted into `scratch` now (IntegrityError otherwise,
    and nothing is written but scratch)."""
    if isinstance(chunk, OpenedChunk):
        return chunk.plain
    if chunk.zero:
        chan.open_zero(chunk)
        return None
    return chan.open_chunk(chunk, memoryview(scratch)[:chunk.length])


def _nbytes(data: object) -> int:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be a bytes-like object, not {type(data).__name__}")
    return memoryview(data).nbytes


class SecureChannel:
    """One migration's record stream over `sock`; the channel owns the socket and closes it."""

    def __init__(self, sock: StreamSocket, migration_id: bytes | None = None) -> None:
        if migration_id is not None:
            migration_id = self._check_mid(migration_id)
        self._sock = sock
        self._mid = migration_id
        self._state = ChannelState.OK
        self._error: str | None = None
        self._send_broken = False  # a receive error leaves the send direction usable for last words
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._sealer: RecordSealer | None = None
        self._opener: RecordOpener | None = None
        self._keys: tuple[bytes, bytes, int, int] | None = None
        self._hs_send_seq = 0
        self._hs_recv_seq = 0
        self._sbuf = bytearray()
        self._sview = memoryview(self._sbuf)
        # receive side: a record is read in two parts (header, body); progress survives a timeout
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._rbuf = bytearray()
        self._cur: Header | None = None  # header of the record whose body is being read
        self._got = 0  # bytes of the current part (header or body) read so far
        self._pending: SealedChunk | None = None
        self._native_rx: ChunkReceiver | None = None  # recv_opened's opener, kept while it agrees with _opener
        self._scratch = bytearray()
        self._poller: select.poll | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.zero_chunks_sent = 0  # chunks that went as FLAG_ZERO records (see records.py)

    # --- state -------------------------------------------------------------------------------------

    @staticmethod
    def _check_mid(mid: object) -> bytes:
        if not isinstance(mid, bytes | bytearray) or len(mid) != MIGRATION_ID_SIZE:
            raise ValueError(f"migration id must be {MIGRATION_ID_SIZE} bytes")
        return bytes(mid)

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def migration_id(self) -> bytes | None:
        return self._mid

    @property
    def keys_installed(self) -> bool:
        return self._sealer is not None

    def _check_usable(self) -> None:
        if self._state is ChannelState.CLOSED:
            raise ChannelClosed("secure channel is closed")
        if self._state is ChannelState.BROKEN:
            raise ProtocolError(f"secure channel is broken by an earlier error: {self._error}")

    def _break(self, exc: ProtocolError, *, sending: bool = False) -> ProtocolError:
        """Mark the channel BROKEN (unless closed here) and hand back `exc` for raising."""
        self._send_broken = self._send_broken or sending
        if self._state is ChannelState.OK:
            self._state = ChannelState.BROKEN
            self._error = str(exc)
        return exc

    def close(self) -> None:
        """Close the socket; a recv blocked in another thread wakes up with ChannelClosed."""
        if self._state is ChannelState.CLOSED:
            return
        self._state = ChannelState.CLOSED
        with contextlib.suppress(OSError):
            if isinstance(self._sock, socket.socket):
                self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> SecureChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def install_keys(self, send_key: bytes, recv_key: bytes, send_dir: int, recv_dir: int, *,
                     migration_id: bytes | None = None) -> None:
        """Switch from plaintext HANDSHAKE records to encrypted CONTROL/CHUNK records.

        `migration_id` is needed here only if the channel was built without one (a destination learns
        it from the handshake); if both are given they must agree.
        """
        if migration_id is not None:
            migration_id = self._check_mid(migration_id)
            if self._mid is not None and migration_id != self._mid:
                raise ProtocolError("handshake migration id differs from the one this channel was opened for")
        elif self._mid is None:
            raise ValueError("install_keys needs a migration id: the channel was opened without one")
        if send_dir == recv_dir:
            raise ValueError("send and receive directions must differ")
        if bytes(send_key) == bytes(recv_key):
            raise ValueError("send and receive keys must differ")
        sealer, opener = RecordSealer(send_key, send_dir), RecordOpener(recv_key, recv_dir)
        with self._send_lock, self._recv_lock:
            self._check_usable()
            if self._sealer is not None:
                raise ProtocolError("keys are already installed on this channel")
            if self._cur is not None or self._got:
                raise ProtocolError("install_keys called in the middle of a received record")
            if migration_id is not None:
                self._mid = migration_id
            self._sealer, self._opener = sealer, opener
            self._keys = (bytes(send_key), bytes(recv_key), send_dir, recv_dir)

    @classmethod
    def resume(cls, sock: StreamSocket, ticket: ChannelTicket) -> SecureChannel:
        """Continue a channel from a ticket (see ChannelTicket) over `sock`."""
        chan = cls(sock, ticket.migration_id)
        chan.install_keys(ticket.send_key, ticket.recv_key, ticket.send_dir, ticket.recv_dir)
        assert chan._sealer is not None and chan._opener is not None
        chan._sealer = RecordSealer(ticket.send_key, ticket.send_dir, ticket.send_seq)
        chan._opener = RecordOpener(ticket.recv_key, ticket.recv_dir, ticket.recv_seq)
        return chan

    def ticket(self) -> ChannelTicket:
        """This channel's keys and current positions (the channel stays usable)."""
        with self._send_lock, self._recv_lock:
            self._check_usable()
            if self._keys is None or self._sealer is None or self._opener is None or self._mid is None:
                raise ProtocolError("channel has no keys yet")
            if self._cur is not None or self._got or self._pending is not None:
                raise ProtocolError("channel is in the middle of a received record")
            sk, rk, sd, rd = self._keys
            return ChannelTicket(self._mid, sk, rk, sd, rd, self._sealer.next_seq, self._opener.expected_seq)

    def detach(self) -> ChannelTicket:
        """Give this channel away: return its ticket and stop using it here (the socket stays open)."""
        t = self.ticket()
        with self._send_lock, self._recv_lock:
            self._state = ChannelState.CLOSED
            self._error = "detached"
            self._native_rx = None  # its key schedule goes with it (cleansed)
        return t

    # --- sending -----------------------------------------------------------------------------------

    def _sendall(self, data: bytes | memoryview) -> None:
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise self._break(ChannelClosed("peer stopped reading: send timed out"), sending=True) from None
        except OSError as e:
            if self._state is ChannelState.CLOSED:
                raise ChannelClosed("secure channel was closed while sending") from None
            raise self._break(ChannelClosed(f"connection lost while sending: {e.strerror or e}"),
                              sending=True) from None
        self.bytes_sent += len(data)

    def send_handshake(self, payload: bytes) -> None:
        """Send a plaintext HANDSHAKE record (only before install_keys)."""
        n = _nbytes(payload)
        if n > MAX_HANDSHAKE_PAYLOAD:
            raise ValueError(f"handshake payload of {n} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}")
        with self._send_lock:
            self._check_usable()
            if self._sealer is not None:
                raise ProtocolError("cannot send a HANDSHAKE record after keys were installed")
            header = pack_header(Kind.HANDSHAKE, n, self._hs_send_seq)
            self._hs_send_seq += 1
            self._sendall(header + bytes(payload))

    def send_control(self, payload: bytes) -> None:
        """Send an encrypted CONTROL record (up to MAX_CONTROL_PAYLOAD bytes)."""
        n = _nbytes(payload)
        if n > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control payload of {n} bytes exceeds {MAX_CONTROL_PAYLOAD}")
        self._send_encrypted(Kind.CONTROL, payload, n, 0, 0)

    def send_last_words(self, payload: bytes) -> None:
        """Send one CONTROL record even though receiving broke (a forged or garbled record arrived).

        Why: the send direction has its own key and counter, so an authenticated goodbye (an abort)
        is still trustworthy, and it is what lets the peer enclave know for sure that this side gave up.
        """
        n = _nbytes(payload)
        if n > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control payload of {n} bytes exceeds {MAX_CONTROL_PAYLOAD}")
        self._send_encrypted(Kind.CONTROL, payload, n, 0, 0, last_words=True)

    def send_chunk(self, index: int, data: bytes | bytearray | memoryview, *, demand: bool = False) -> bytes:
        """Send one heap chunk (1..MAX_CHUNK bytes) as an encrypted CHUNK record bound to `index`.

        A chunk of zeros goes as a FLAG_ZERO record carrying only its length. Returns the record's GCM
        tag (for the sender's completeness ledger).
        """
        n = _nbytes(data)
        if not 1 <= n <= MAX_CHUNK:
            raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes, got {n}")
        if not isinstance(index, int) or not 0 <= index <= U64_MAX:
            raise ValueError(f"chunk index must be an int in 0..2**64-1, got {index!r}")
        flags = FLAG_DEMAND if demand else 0
        if is_zero(data):
            tag = self._send_encrypted(Kind.CHUNK, _ZERO_LEN.pack(n), ZERO_PAYLOAD, index, flags | FLAG_ZERO)
            self.zero_chunks_sent += 1
            return tag
        return self._send_encrypted(Kind.CHUNK, data, n, index, flags)

    def send_chunk_batch(self, make: Callable[[bytes, int, bytes, int], BatchSealer], heap: memoryview,
                         chunk_size: int, indexes: np.ndarray, *, demand: bool = False) -> np.ndarray:
        """Send chunks `indexes` of `heap` as CHUNK records through another sealer, the native engine's
        (`make` is NativeSealer: key, direction, migration id, start seq), at this channel's send position;
        return their tags ((n, 16) uint8, in order).

        Why here: CONTROL records and chunks share one counter, so the position is lent only under the
        send lock, from the sealer's own next seq (no nonce is chosen anywhere else), and taken back
        from the batch sealer's `detach()`: it must be exactly one past the last record. Records are the
        ones send_chunk would make. Any failure leaves the channel BROKEN for sending (part of a record
        may be on the wire), raising what send_chunk raises (ChannelClosed for a lost or stalled peer).
        The batch sends on a duplicate of the socket's descriptor, so a close() here during the batch
        (a cancel: shutdown, then close) stops it with the stream shut, never on a reused descriptor.
        """
        idx = np.ascontiguousarray(indexes, dtype=np.int64)
        with self._send_lock:
            self._check_usable()
            if self._sealer is None or self._keys is None or self._mid is None:
                raise ProtocolError("cannot send a CHUNK record before keys are installed")
            start = self._sealer.next_seq
            if start + idx.size > U64_MAX + 1:
                raise self._break(ProtocolError("sequence numbers exhausted on this channel"))
            send_key, _, send_dir, _ = self._keys
            batch = make(send_key, send_dir, self._mid, start)
            timeout = self._sock.gettimeout() if isinstance(self._sock, socket.socket) else None
            fd = os.dup(self._sock.fileno())  # type: ignore[attr-defined]
            try:
                tags = batch.send_chunks(fd, heap, chunk_size, idx, demand=demand, timeout=timeout)
                end = batch.detach()
            except ConstmigError as e:
                if self._state is ChannelState.CLOSED:
                    raise ChannelClosed("secure channel was closed while sending") from None
                raise self._break(e, sending=True) from None  # type: ignore[arg-type]  # a TransportError too
            except BaseException as e:
                self._break(ProtocolError(f"native batch send failed: {e}"), sending=True)
                raise
            finally:
                os.close(fd)
            if end != start + idx.size:
                raise self._break(ProtocolError(f"native batch ended at seq {end}, not {start + idx.size}"),
                                  sending=True)
            self._sealer = RecordSealer(send_key, send_dir, end)
            zeros = batch.zero_chunks_sent
            self.zero_chunks_sent += zeros
            self.bytes_sent += (idx.size - zeros) * (HEADER_SIZE + chunk_size + TAG_SIZE) + \
                zeros * (HEADER_SIZE + ZERO_PAYLOAD + TAG_SIZE)
            return tags

    def _send_encrypted(self, kind: Kind, data: bytes | bytearray | memoryview, n: int, arg: int,
                        flags: int, *, last_words: bool = False) -> bytes:
        total = HEADER_SIZE + n + TAG_SIZE
        with self._send_lock:
            if not (last_words and self._state is ChannelState.BROKEN and not self._send_broken):
                self._check_usable()
            sealer = self._sealer
            if sealer is None or self._mid is None:
                raise ProtocolError(f"cannot send a {kind.name} record before keys are installed")
            if len(self._sbuf) < total:
                self._sbuf = bytearray(total)
                self._sview = memoryview(self._sbuf)
            if sealer.next_seq > U64_MAX:  # 2**64 records under one key: never reuse a nonce, stop instead
                raise self._break(ProtocolError("sequence numbers exhausted on this channel"))
            header = pack_header(kind, n + TAG_SIZE, sealer.next_seq, arg, flags)
            self._sview[:HEADER_SIZE] = header
            try:
                sealer.seal(header + self._mid, data, self._sview[HEADER_SIZE:total])
            except ProtocolError as e:  # the sealer's own guard (the same limit)
                raise self._break(e) from None
            self._sendall(self._sview[:total])
            return bytes(self._sview[total - TAG_SIZE : total])

    # --- receiving ---------------------------------------------------------------------------------

    def _wait_readable(self, deadline: float, timeout: float) -> None:
        if self._poller is None:
            fd = self._sock.fileno()
            if fd < 0:  # the socket object was closed on this side (a cancel, a test's cut): no peer left
                if self._state is ChannelState.CLOSED:
                    raise ChannelClosed("secure channel was closed while receiving")
                raise self._break(ChannelClosed("connection was closed on this side"))
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)  # type: ignore[attr-defined]
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._poller.poll(math.ceil(remaining * 1000)):
            if self._cur is None and self._got == 0:
                raise RecvTimeout(f"no record from the peer within {timeout:g} s")
            raise RecvTimeout(f"record from the peer still incomplete after {timeout:g} s "
                              "(kept; recv again to continue)")

    def _fill(self, view: memoryview, deadline: float | None, timeout: float) -> None:
        """Read until `view` is full, keeping progress in self._got across a timeout."""
        size = len(view)
        while self._got < size:
            try:
                if deadline is None:
                    n = self._sock.recv_into(view[self._got:])
                else:
                    # Poll first: on a socket with its own timeout CPython waits that long before even
                    # a MSG_DONTWAIT recv, which would override this call's timeout.
                    self._wait_readable(deadline, timeout)
                    try:
                        n = self._sock.recv_into(view[self._got:], 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
            except TimeoutError:  # the socket itself had a timeout set
                raise RecvTimeout(f"socket timed out waiting for the peer ({self._got} of {size} bytes)") from None
            except OSError as e:
                if self._state is ChannelState.CLOSED:
                    raise ChannelClosed("secure channel was closed while receiving") from None
                raise self._break(ChannelClosed(f"connection lost: {e.strerror or e}")) from None
            if n == 0:
                if self._state is ChannelState.CLOSED:
                    raise ChannelClosed("secure channel was closed while receiving")
                if self._cur is None and self._got == 0:
                    raise self._break(ChannelClosed("peer closed the connection"))
                where = "header" if self._cur is None else f"{self._cur.kind.name} record"
                raise self._break(ChannelClosed(
                    f"peer closed the connection mid-record ({self._got} of {size} {where} bytes)"))
            self._got += n
            self.bytes_received += n

    def recv(self, timeout: float | None = None) -> Record:
        """Read exactly one record and return it (CONTROL decrypted, CHUNK sealed).

        Raises ChannelClosed on EOF or reset, IntegrityError on any authentication or ordering
        failure, ProtocolError on malformed or out-of-phase records (the channel is BROKEN after any
        of these), and RecvTimeout if `timeout` seconds pass first (the channel stays OK).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._receiving():
            return self._recv_record(deadline, timeout or 0.0)

    @contextlib.contextmanager
    def _receiving(self) -> Iterator[None]:
        """One receive, however it reads: under the receive lock, on a usable channel, a chunk the caller
        left unopened verified first; a protocol failure leaves the channel BROKEN (a timeout does not)."""
        with self._recv_lock:
            self._check_usable()
            if self._pending is not None:
                self._verify_pending_into_scratch()
            try:
                yield
            except RecvTimeout:
                raise
            except ProtocolError as e:
                raise self._break(e) from None

    def recv_opened(self, make: Callable[[bytes, int, bytes, int], ChunkReceiver], out: memoryview | np.ndarray,
                    timeout: float | None = None) -> OpenedChunk | Record:
        """`recv` for the post-copy receive threads, through another opener, the native engine's (`make` is
        NativeOpener: key, direction, migration id, start seq), at this channel's receive position: a CHUNK
        record of at most len(out) bytes comes back verified, its bytes at the start of `out` (step 2b,
        docs/native.md), with the GIL released while it is read and opened.

        Why here: CONTROL records and chunks share one counter, so the position is lent only under the
        receive lock, from the Python opener's own expected seq, and taken back from the native opener's:
        one past the record, or unchanged when nothing came (RecvTimeout, the channel stays OK) or a
        record that is not a CHUNK began. The native opener is kept for the next call only while the
        Python opener agrees with it (both strict, both moved together here); once Python read a record
        itself, a new one starts at its position. Receiving needs no nonce of its own, so two openers at
        one position can only both refuse what the other would. That one is read and judged here as `recv` would (its
        header was read natively), so a CONTROL record (an ABORT) reaches the caller as from `recv`. A
        record half read by an earlier `recv` that timed out is finished in Python. Failures raise what
        `recv` raises and leave the channel BROKEN; the engine checked the tag before a byte reached
        `out`. Unlike `recv`, a record that stalls midway past the timeout ends the stream (ChannelClosed).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._receiving():
            if self._cur is not None or self._got:
                return self._recv_record(deadline, timeout or 0.0)
            return self._recv_native(make, out, timeout)

    def _recv_native(self, make: Callable[[bytes, int, bytes, int], ChunkReceiver], out: memoryview | np.ndarray,
                     timeout: float | None) -> OpenedChunk | Record:
        if self._opener is None or self._keys is None or self._mid is None:
            raise ProtocolError("cannot receive a CHUNK record natively before keys are installed")
        fileno = self._sock.fileno()  # type: ignore[attr-defined]
        if fileno < 0:  # the socket object was closed on this side (a cancel, a test's cut): no peer left
            if self._state is ChannelState.CLOSED:
                raise ChannelClosed("secure channel was closed while receiving")
            raise self._break(ChannelClosed("connection was closed on this side"))
        start = self._opener.expected_seq
        _, recv_key, _, recv_dir = self._keys
        opener = self._native_rx
        if opener is None or opener.expected_seq != start:
            opener = self._native_rx = make(recv_key, recv_dir, self._mid, start)
        stall = self._sock.gettimeout() if isinstance(self._sock, socket.socket) else None
        fd = os.dup(fileno)  # a close() here meanwhile shuts the stream (the receive wakes), never a reused number
        try:
            got = opener.recv_one(fd, memoryview(out).cast("B"), idle=timeout, timeout=stall or timeout)
            end = opener.expected_seq
        except ConstmigError as e:  # IntegrityError, ProtocolError, ChannelClosed: the opener is poisoned
            self._native_rx = None
            if self._state is ChannelState.CLOSED:
                raise ChannelClosed("secure channel was closed while receiving") from None
            raise self._break(e) from None  # type: ignore[arg-type]  # a TransportError too
        except BaseException as e:
            self._native_rx = None
            self._break(ProtocolError(f"native receive failed: {e}"))
            raise
        finally:
            os.close(fd)
        if got is None:
            if end != start:
                raise ProtocolError(f"native receive moved the position ({start} -> {end}) without a record")
            raise RecvTimeout(f"no record from the peer within {timeout:g} s")
        if isinstance(got, bytes):  # not a CHUNK: its header is read, its body is Python's to read and judge
            if end != start:
                raise ProtocolError(f"native receive moved the position ({start} -> {end}) on a foreign record")
            self._hdr[:] = got
            self.bytes_received += HEADER_SIZE
            self._begin_record()  # current now: _recv_record reads only its body
            return self._recv_record(None if timeout is None else time.monotonic() + timeout, timeout or 0.0)
        if end != start + 1:
            raise ProtocolError(f"native receive ended at seq {end}, not {start + 1}")
        self._opener = RecordOpener(recv_key, recv_dir, end)
        zero = bool(got.flags & FLAG_ZERO)  # type: ignore[attr-defined]
        self.bytes_received += HEADER_SIZE + TAG_SIZE + (ZERO_PAYLOAD if zero else got.length)  # type: ignore[attr-defined]
        plain = None if zero else memoryview(out).cast("B")[:got.length]  # type: ignore[attr-defined]
        return OpenedChunk(got.index, got.length, start, got.flags, got.tag, plain)  # type: ignore[attr-defined]

    def _recv_record(self, deadline: float | None, timeout: float) -> Record:
        if self._cur is None:
            self._fill(self._hdr_view, deadline, timeout)
            self._begin_record()
        header = self._cur
        assert header is not None
        body = memoryview(self._rbuf)[:header.length]
        self._fill(body, deadline, timeout)
        self._cur, self._got = None, 0
        return self._finish_record(header, body)

    def _begin_record(self) -> None:
        """The header in self._hdr was read: judge it, and make the record current (its body comes next)."""
        header = parse_header(self._hdr)
        if is_encrypted(header.kind) and self._opener is None:
            raise ProtocolError(f"{header.kind.name} record arrived before keys were installed")
        if header.kind is Kind.HANDSHAKE and self._opener is not None:
            raise ProtocolError("HANDSHAKE record arrived after keys were installed")
        if header.kind is Kind.HANDSHAKE and header.seq != self._hs_recv_seq:
            raise ProtocolError(f"handshake record seq {header.seq} arrived where {self._hs_recv_seq} "
                                "was expected")
        if self._opener is not None:
            self._opener.check_seq(header.seq)  # fail before reading a body we would reject anyway
        if len(self._rbuf) < header.length:
            self._rbuf = bytearray(header.length)  # new object: an old SealedChunk view stays valid
        self._cur, self._got = header, 0

    def _finish_record(self, header: Header, body: memoryview) -> Record:
        if header.kind is Kind.HANDSHAKE:
            self._hs_recv_seq += 1
            return HandshakeRecord(bytes(body))
        assert self._opener is not None and self._mid is not None
        aad = bytes(self._hdr) + self._mid
        if header.kind is Kind.CONTROL:
            return ControlRecord(bytes(self._opener.open(header.seq, aad, body)))
        length = header.plaintext_length
        if header.flags & FLAG_ZERO:  # four bytes: verify now, so the length it claims is authentic
            (length,) = _ZERO_LEN.unpack(self._opener.open(header.seq, aad, body))
            if not 1 <= length <= MAX_CHUNK:
                raise ProtocolError(f"zero chunk record claims {length} bytes, outside 1..{MAX_CHUNK}")
        self._pending = SealedChunk(header.arg, length, header.seq, header.flags, body, aad)
        return self._pending

    def open_chunk(self, sealed: SealedChunk, out: bytearray | memoryview) -> memoryview:
        """Verify and decrypt the chunk recv just returned into `out` (exactly sealed.length bytes).

        On a bad tag `out` is zeroed, IntegrityError is raised and the channel is BROKEN. Give scratch
        memory as `out` when unverified plaintext must never be seen at the final place.
        """
        with self._recv_lock:
            self._check_usable()
            if sealed is not self._pending:
                raise ValueError("this chunk is not the one pending on this channel (open it before the next recv)")
            if memoryview(out).nbytes != sealed.length:  # a forged length: refuse before a byte is written
                self._pending = None
                raise self._break(ProtocolError(
                    f"chunk record {sealed.index} carries {sealed.length} bytes where {memoryview(out).nbytes} "
                    "were expected"))
            if sealed.zero:
                self._pending = None
                np.frombuffer(out, dtype=np.uint8)[:] = 0
                return memoryview(out)
            opener = self._opener
            assert opener is not None
            try:
                plain = opener.open(sealed.seq, sealed._aad, sealed._ct, out)
            except IntegrityError as e:
                self._pending = None
                raise self._break(e) from None
            self._pending = None
            return plain

    def open_zero(self, sealed: SealedChunk) -> None:
        """Take the pending FLAG_ZERO chunk without writing it anywhere: the caller makes its
        `sealed.length` bytes zero itself (e.g. with UFFDIO_ZEROPAGE). Its claim was verified on arrival."""
        with self._recv_lock:
            self._check_usable()
            if sealed is not self._pending:
                raise ValueError("this chunk is not the one pending on this channel (open it before the next recv)")
            if not sealed.zero:
                raise ValueError("open_zero takes only a zero chunk; open a chunk with data with open_chunk")
            self._pending = None

    def discard_chunk(self, sealed: SealedChunk) -> None:
        """Drop the pending chunk (e.g. already restored), verifying it first so the stream stays whole."""
        with self._recv_lock:
            self._check_usable()
            if sealed is not self._pending:
                raise ValueError("this chunk is not the one pending on this channel")
            self._verify_pending_into_scratch()

    def _verify_pending_into_scratch(self) -> None:
        sealed, self._pending = self._pending, None
        assert sealed is not None and self._opener is not None
        if sealed.zero:
            return  # verified when it arrived
        if len(self._scratch) < sealed.length:
            self._scratch = bytearray(sealed.length)
        try:
            self._opener.open(sealed.seq, sealed._aad, sealed._ct, memoryview(self._scratch)[:sealed.length])
        except IntegrityError as e:
            raise self._break(e) from None
