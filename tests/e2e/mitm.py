"""A man in the middle on loopback: forwards TCP connections to an agent and tampers with them.

It plays the untrusted network/host: it sees every byte between two agents (including the migration
data connection the agents hand to the enclaves) and can flip bits or cut the stream.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

# tamper(is_data_conn, offset_of_data_in_stream, data) -> bytes to forward, or None to cut the connection
Tamper = Callable[[bool, int, bytes], bytes | None]


class MitmProxy:
    def __init__(self, target: str, tamper: Tamper | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.tamper = tamper
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.data_bytes = 0
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
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            state = {"data": None}
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
                    state["data"] = b'"data"' in data[:64] or b"\xa4data" in data[:64]
                if forward and self.tamper is not None:
                    out = self.tamper(bool(state["data"]), offset, data)
                    offset += len(data)
                    if state["data"]:
                        self.data_bytes = offset
                    if out is None:
                        break
                    data = out
                dst.sendall(data)
        except OSError:
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


def flip_bit_at(position: int) -> Tamper:
    """Flip one bit of the data connection's client->server stream at byte `position`."""

    def tamper(is_data: bool, offset: int, data: bytes) -> bytes | None:
        if is_data and offset <= position < offset + len(data):
            b = bytearray(data)
            b[position - offset] ^= 0x10
            return bytes(b)
        return data

    return tamper


def cut_after(position: int) -> Tamper:
    """Forward the data connection up to `position` bytes, then cut it (truncation)."""

    def tamper(is_data: bool, offset: int, data: bytes) -> bytes | None:
        if is_data and offset + len(data) > position:
            return None
        return data

    return tamper
