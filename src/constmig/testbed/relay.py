"""A TCP relay that adds a fixed one-way delay to both directions: delay without netem.

This kernel has no netem (docs/testbed.md, "Why a relay for delay"), so the testbed puts this relay
on each host's advertised address, in front of the agent on the namespace's loopback. Every byte read
from one side is stamped with its arrival time and written to the other side `delay` seconds later, in
order, so the byte stream is preserved and a round trip through the relay grows by 2 x delay. Reading
goes on while earlier bytes wait, so throughput is not cut to one buffer per delay (up to MAX_BUFFERED
bytes in flight per direction). Blocking threads rather than asyncio: time.sleep has ~0.1 ms
precision, while asyncio's epoll timeouts round up to whole milliseconds.

Run as `python -m constmig.testbed.relay --listen IP:PORT --target IP:PORT --delay SECONDS`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import struct
import sys
import threading
import time

from constmig.errors import ConstmigError
from constmig.host.address import parse_addr

READ_SIZE = 256 * 1024
MAX_BUFFERED = 32 * 1024 * 1024


class Direction:
    """One direction of one connection: a reader thread stamps data, a writer thread releases it when due."""

    def __init__(self, conn: Connection, src: socket.socket, dst: socket.socket) -> None:
        self.conn, self.src, self.dst = conn, src, dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.cv = threading.Condition()

    def start(self) -> None:
        for target in (self._read, self._write):
            threading.Thread(target=target, daemon=True).start()

    def _read(self) -> None:
        while not self.conn.dead:
            try:
                data = self.src.recv(READ_SIZE)
            except OSError:
                self.conn.kill()  # a reset or error on one side resets the other at once
                data = b""
            due = time.monotonic() + self.conn.delay
            with self.cv:
                while self.buffered > MAX_BUFFERED and not self.conn.dead:
                    self.cv.wait(0.5)
                self.queue.append((due, data))
                self.buffered += len(data)
                self.cv.notify_all()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.conn.dead:
                    self.cv.wait(0.5)
                if self.conn.dead:
                    return
                due, _ = self.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.cv:  # send everything that is due by now in one go
                now, parts, eof = time.monotonic(), [], False
                while self.queue and self.queue[0][0] <= now:
                    _, data = self.queue.popleft()
                    self.buffered -= len(data)
                    if not data:
                        eof = True
                        break
                    parts.append(data)
                self.cv.notify_all()
            try:
                if parts:
                    self.dst.sendall(b"".join(parts))
                if eof:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.conn.half_closed()
                    return
            except OSError:
                self.conn.kill()
                return


class Connection:
    """A client socket and its upstream socket, relayed both ways with the same delay."""

    def __init__(self, down: socket.socket, up: socket.socket, delay: float) -> None:
        self.down, self.up, self.delay = down, up, delay
        self.dead = False
        self._open_dirs = 2
        self._lock = threading.Lock()
        self.dirs = [Direction(self, down, up), Direction(self, up, down)]

    def start(self) -> None:
        for d in self.dirs:
            d.start()

    def half_closed(self) -> None:
        with self._lock:
            self._open_dirs -= 1
            done = self._open_dirs == 0
        if done:
            self._close()

    def kill(self) -> None:
        """Abort both sides with a reset, so neither end mistakes an error for a clean end of stream."""
        with self._lock:
            if self.dead:
                return
            self.dead = True
        for s in (self.down, self.up):
            try:  # linger 0: close sends RST; SHUT_RD wakes a thread blocked in recv without sending FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for s in (self.down, self.up):
            s.close()
        for d in self.dirs:
            with d.cv:
                d.cv.notify_all()

    def _close(self) -> None:
        for s in (self.down, self.up):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def serve(listen: str, target: str, delay: float, ready: threading.Event | None = None) -> None:
    """Accept forever; each client gets its own upstream connection to target."""
    host, port = parse_addr(listen)
    thost, tport = parse_addr(target)
    srv = socket.create_server((host, port), backlog=128, reuse_port=False)
    if ready is not None:
        ready.set()
    while True:
        down, _ = srv.accept()
        try:
            up = socket.create_connection((thost, tport), timeout=10)
        except OSError:  # the agent is not there (killed or restarting): reset, much like a refusal
            down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            down.close()
            continue
        up.settimeout(None)
        for s in (down, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Connection(down, up, delay).start()


def _tight_timers() -> None:
    """Ask for 1 ns timer slack (default 50 us) so sub-millisecond delays are not stretched by sleep()."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m constmig.testbed.relay", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--delay", type=float, required=True, help="one-way delay in seconds")
    args = ap.parse_args(argv)
    _tight_timers()
    try:
        serve(args.listen, args.target, args.delay)
    except (ConstmigError, OSError) as e:
        print(f"error: relay on {args.listen}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
