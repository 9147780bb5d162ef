"""Length-prefixed msgpack frames for control traffic (client, agents, enclave runtime).

One frame = u32 big-endian length + msgpack map (wire/control.py's structs encode to one). The same format
runs over asyncio streams (agents) and blocking sockets (the enclave runtime, which also receives file
descriptors with a frame).
Everything read is untrusted: size-capped and decoded into plain maps only.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgspec

from constmig.errors import ChannelClosed, ProtocolError

MAX_FRAME = 8 << 20
_LEN = struct.Struct("!I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)


Message = dict[str, Any] | msgspec.Struct  # a map, or a struct that encodes to one (wire/control.py)


def encode(obj: Message) -> bytes:
    """Frame one message (ProtocolError if msgpack cannot carry it, e.g. an int beyond 64 bits)."""
    try:
        body = _encoder.encode(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"message cannot be encoded: {e}") from None
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"control message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a frame body into a map, turning every decoding failure into ProtocolError."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"malformed control message: {e}") from None


def _check_len(n: int) -> int:
    if n > MAX_FRAME:
        raise ProtocolError(f"peer announced a {n}-byte control message (limit {MAX_FRAME})")
    return n


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one frame from an asyncio stream; ChannelClosed on EOF."""
    try:
        head = await reader.readexactly(_LEN.size)
        body = await reader.readexactly(_check_len(_LEN.unpack(head)[0]))
    except asyncio.IncompleteReadError as e:
        raise ChannelClosed("connection closed by peer") from e
    except ConnectionError as e:
        raise ChannelClosed(f"connection lost: {e}") from e
    return decode_body(body)


async def write_frame(writer: asyncio.StreamWriter, obj: Message) -> None:
    """Write one frame and wait until it is flushed to the kernel."""
    try:
        writer.write(encode(obj))
        await writer.drain()
    except ConnectionError as e:
        raise ChannelClosed(f"connection lost: {e}") from e


class FramedSocket:
    """Frames over a blocking stream socket, with optional file descriptors riding along (AF_UNIX).

    Not thread-safe by itself: callers serialize sends and receives.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []

    def send(self, obj: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        data = encode(obj)
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([data], anc)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise ChannelClosed(f"connection lost: {e}") from e

    def _fill(self, need: int) -> None:
        while len(self._buf) < need:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
            except OSError as e:
                raise ChannelClosed(f"connection lost: {e}") from e
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise ChannelClosed("connection closed by peer")
            self._buf += data

    def unread(self, n: int) -> bytes:
        """Up to `n` bytes received and not consumed yet (what a peer that speaks no frames sent)."""
        return bytes(self._buf[:n])

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        """One frame and the file descriptors that arrived with it (the caller owns them)."""
        self._fill(_LEN.size)
        n = _check_len(_LEN.unpack_from(self._buf)[0])
        self._fill(_LEN.size + n)
        body = bytes(self._buf[_LEN.size : _LEN.size + n])
        del self._buf[: _LEN.size + n]
        fds, self._fds = self._fds, []
        return decode_body(body), fds

    def exchange(self, req: Message, fds: list[int] | tuple[int, ...] = (),
                 on_progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
        """Send a request and return its final reply; `{"progress": ...}` frames before it go to on_progress.

        Descriptors that arrive with replies are closed: no reply is meant to carry any.
        """
        self.send(req, fds)
        while True:
            reply, extra = self.recv()
            for fd in extra:
                os.close(fd)
            if "progress" not in reply:
                return reply
            if on_progress is not None:
                on_progress(reply["progress"])

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self.sock.close()
