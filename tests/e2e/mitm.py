"""A man in the middle on loopback: forwards TCP connections to an agent and tampers with them.

It plays the untrusted network/host: it sees every byte between two agents (including the migration
data connection the agents hand to the enclaves) and can flip bits or cut the stream.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from constmig.errors import ProtocolError
from constmig.wire.records import HEADER_SIZE, Header, parse_header

# tamper(channel, offset_in_stream, data) -> bytes to forward, or None to cut the connection.
# `channel` is "" for agent-to-agent requests and the data connection's name ("main", "demand") otherwise.
Tamper = Callable[[str, int, bytes], bytes | None]
# record(conn, channel, direction, data): every chunk of bytes the proxy receives, in both directions, before
# any tampering. `conn` numbers the proxied connections from 0; `direction` is "c2s" (towards the target)
# or "s2c"; one connection's chunks in one direction arrive in stream order, from one thread.
Record = Callable[[int, str, str, bytes], None]


class MitmProxy:
    def __init__(self, target: str, tamper: Tamper | None = None, record: Record | None = None,
                 back: Tamper | None = None, listen: str = "127.0.0.1") -> None:
        """`tamper` sees each connection's bytes towards the target, `back` those coming back from it.

        `listen` is the address to accept on: loopback, or (testbed) the root namespace's address on the
        testbed, so agents in other namespaces reach the proxy and its traffic crosses their links."""
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.tamper = tamper
        self.back = back
        self.record = record
        self.connections = 0  # data connections seen (a reconnect adds more)
        self.listener = socket.create_server((listen, 0))
        self.addr = f"{listen}:{self.listener.getsockname()[1]}"
        self.data_bytes = 0
        self._conns = 0
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            state = {"data": None, "conn": self._conns}
            self._conns += 1
            # Connect upstream off the accept loop: a target behind a dead link must not stall other clients.
            threading.Thread(target=self._open, args=(client, state), daemon=True).start()

    def _open(self, client: socket.socket, state: dict) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:  # target down (refused, unreachable): the client sees its connection end
            client.close()
            return
        self._socks += [client, upstream]
        for src, dst, forward in ((client, upstream, True), (upstream, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, forward, state), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool, state: dict) -> None:
        offset = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if forward and state["data"] is None:
                    state["data"] = _channel_of(data)
                    if state["data"]:
                        self.connections += 1
                if self.record is not None:
                    self.record(state["conn"], state["data"] or "", "c2s" if forward else "s2c", data)
                tamper = self.tamper if forward else self.back
                if tamper is not None and (forward or state["data"] is not None):
                    out = tamper(state["data"], offset, data)
                    offset += len(data)
                    if state["data"] and forward:
                        self.data_bytes = offset
                    if out is None:
                        break
                    data = out
                dst.sendall(data)
        except (OSError, ProtocolError):  # a stream the record parser cannot follow ends like a cut
            pass
        finally:  # a cut is a cut: both ends see the connection end, nothing stalls
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def _channel_of(first: bytes) -> str:
    """Which connection this is, from its first frame (the data request names the channel)."""
    head = first[:96]
    if b"data" not in head:
        return ""
    return "demand" if b"demand" in head else "main"


def flip_bit_at(position: int, only: str = "main") -> Tamper:
    """Flip one bit of a data connection's client->server stream at byte `position`."""

    def tamper(channel: str, offset: int, data: bytes) -> bytes | None:
        if channel == only and offset <= position < offset + len(data):
            b = bytearray(data)
            b[position - offset] ^= 0x10
            return bytes(b)
        return data

    return tamper


def cut_after(position: int) -> Tamper:
    """Forward the data connection up to `position` bytes, then cut it (truncation)."""

    def tamper(channel: str, offset: int, data: bytes) -> bytes | None:
        if channel == "main" and offset + len(data) > position:
            return None
        return data

    return tamper


class RecordTamper:
    """Sees a data connection's forward stream as records and lets `on_record` rewrite it.

    on_record(channel, n, header, record_bytes) -> list of byte strings to forward in its place
    (return [record_bytes] to pass it on, [] to drop it, several to inject), or None to cut the
    connection there. `n` counts the records of that channel from 0 across reconnects (the first few of
    each connection are its handshake). A connection's opening frame (the agent's request, or its
    answer) passes through.
    """

    def __init__(self, on_record: Callable[[str, int, Header, bytes], list[bytes]]) -> None:
        self.on_record = on_record
        self._state: dict[str, dict] = {}
        self._lock = threading.Lock()

    def __call__(self, channel: str, offset: int, data: bytes) -> bytes | None:
        if not channel:
            return data
        with self._lock:
            st = self._state.setdefault(channel, {"buf": b"", "frame_done": False, "n": 0})
            if offset == 0:  # a new connection on this channel (a reconnect): parse it from its start
                st["buf"], st["frame_done"] = b"", False
            st["buf"] += data
            out: list[bytes] = []
            buf = st["buf"]
            if not st["frame_done"]:
                if len(buf) < 4:
                    st["buf"] = buf
                    return b""
                n = struct.unpack("!I", buf[:4])[0]
                if len(buf) < 4 + n:
                    return b""
                out.append(buf[:4 + n])
                buf = buf[4 + n:]
                st["frame_done"] = True
            while len(buf) >= HEADER_SIZE:
                header = parse_header(buf[:HEADER_SIZE])
                end = HEADER_SIZE + header.length
                if len(buf) < end:
                    break
                got = self.on_record(channel, st["n"], header, buf[:end])
                st["n"] += 1
                if got is None:
                    return None
                out.extend(got)
                buf = buf[end:]
            st["buf"] = buf
            return b"".join(out)
