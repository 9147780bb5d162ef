"""Throughput of SecureChannel: a stream of encrypted chunks between two threads over a socketpair.

Not a test (pytest does not collect it). Run:  PYTHONPATH=src python tests/wire/bench_channel.py [GiB] [chunk KiB]
The receiver decrypts into one pre-touched buffer (as `constmig bench raw`'s `plain` case does:
docs/architecture.md).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from constmig.wire.channel import SealedChunk, SecureChannel


def run(total: int, chunk: int, bufsize: int | None) -> float:
    a, b = socket.socketpair()
    if bufsize:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    mid = os.urandom(16)
    tx, rx = SecureChannel(a, mid), SecureChannel(b, mid)
    k1, k2 = os.urandom(32), os.urandom(32)
    tx.install_keys(k1, k2, 1, 2)
    rx.install_keys(k2, k1, 2, 1)
    src = bytearray(os.urandom(chunk))
    dst = bytearray(chunk)
    dst[:] = src  # touch it
    n = total // chunk

    def send() -> None:
        view = memoryview(src)
        for i in range(n):
            tx.send_chunk(i, view)

    t0 = time.perf_counter()
    th = threading.Thread(target=send)
    th.start()
    for i in range(n):
        rec = rx.recv()
        assert isinstance(rec, SealedChunk) and rec.index == i
        rx.open_chunk(rec, dst)
    th.join()
    dt = time.perf_counter() - t0
    assert dst == src
    tx.close()
    rx.close()
    return n * chunk / dt


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    chunk = int(sys.argv[2]) * 1024 if len(sys.argv) > 2 else 1 << 20
    total = int(gib * (1 << 30))
    for bufsize in (None, 4 << 20):
        rates = [run(total, chunk, bufsize) for _ in range(3)]
        label = "default socket buffers" if bufsize is None else f"SO_SNDBUF/RCVBUF {bufsize >> 20} MiB"
        print(f"{gib:g} GiB in {chunk >> 10} KiB chunks, {label}: "
              + ", ".join(f"{r / 1e9:.2f}" for r in rates) + " GB/s")


if __name__ == "__main__":
    main()
