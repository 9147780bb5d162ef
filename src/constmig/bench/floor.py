"""This machine's floor for a demand fault: the Fault Tracker's hops with nothing else running.

Three processes, as in a migration: an app that touches a missing page of a userfaultfd heap, a pager
(forked from it, holding its userfaultfd) that reads the fault and asks a source over TCP loopback, and
the source, which answers with the sealed 64 KiB piece holding the page; the pager opens it into
scratch and installs it with UFFDIO_COPY, which wakes the app. The migration's own record layer and
userfaultfd code, no background stream, no other work: what the same hops cost at the least. Beside it,
a bare TCP ping-pong between two processes (16 bytes each way), the price of one crossing.

A migration's `fault_latency_us` is judged against this floor; the gap between them is contention (the
background stream, the app and the clients on the same cores), not the hops themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from typing import Any

import numpy as np

from constmig.bench.stats import percentiles
from constmig.enclave.heap import Heap
from constmig.migration.ledger import PIECE
from constmig.wire.channel import SecureChannel

_MID = b"constmig-floor-m"
_K1, _K2 = b"\x03" * 32, b"\x04" * 32
_REQ = struct.Struct("<Q")


def tcp_pingpong(n: int) -> list[float]:
    """Round trips of 16 bytes between this process and a forked one over TCP loopback (seconds)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        pid = os.fork()
        if pid == 0:  # the echo side
            code = 1
            try:
                c = socket.create_connection(("127.0.0.1", port))
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while d := c.recv(64):
                    c.sendall(d)
                code = 0
            finally:
                os._exit(code)
        c, _ = server.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            c.sendall(b"p" * 16)
            got = 0
            while got < 16:
                got += len(c.recv(64))
            out.append(time.perf_counter() - t0)
    finally:
        c.close()
        os.waitpid(pid, 0)
    return out


def _source(port: int, size: int) -> None:
    """Child: answer each requested piece index with that piece, sealed."""
    code = 0
    try:
        data = np.random.default_rng(1).integers(1, 255, size, dtype=np.uint8)
        sock = socket.create_connection(("127.0.0.1", port))
        chan = SecureChannel(sock, _MID)
        chan.install_keys(_K2, _K1, 2, 1)
        req = bytearray(_REQ.size)
        while True:
            sealed = chan.recv()
            piece = _REQ.unpack(chan.open_chunk(sealed, req))[0]
            chan.send_chunk(piece, memoryview(data[piece * PIECE:(piece + 1) * PIECE]), demand=True)
    except Exception:  # noqa: BLE001 (the pager closing the connection ends it)
        code = 0
    os._exit(code)


def _pager(server: socket.socket, uffd_fd: int, base: int) -> None:
    """Child: read each fault, fetch its piece from the source, install it (which wakes the app)."""
    from constmig.kernel.uffd import Userfaultfd

    code = 0
    try:
        uffd = Userfaultfd.from_fd(uffd_fd)
        sock, _ = server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chan = SecureChannel(sock, _MID)
        chan.install_keys(_K1, _K2, 1, 2)
        scratch = np.ones(PIECE, dtype=np.uint8)
        while True:
            if not uffd.wait(5.0):
                break  # the app is done
            for addr in uffd.read_faults(64):
                piece = (addr - base) // PIECE
                chan.send_chunk(piece, _REQ.pack(piece))
                sealed = chan.recv()
                chan.open_chunk(sealed, memoryview(scratch))
                uffd.copy(base + piece * PIECE, int(scratch.ctypes.data), PIECE)
    except Exception:  # noqa: BLE001 (the app reports what it saw)
        code = 1
    os._exit(code)


def demand_faults(n: int) -> list[float]:
    """`n` faults, each on a fresh piece: from the touch to the app going on (seconds)."""
    from constmig.kernel.uffd import Userfaultfd

    size = ((n + 1) * PIECE + (1 << 20) - 1) // (1 << 20) << 20
    heap = Heap(size, chunk_size=1 << 20)
    uffd = Userfaultfd.open()
    kids = []
    server = socket.create_server(("127.0.0.1", 0))  # the pager's, listening before the source connects
    port = server.getsockname()[1]
    try:
        uffd.register_missing(heap.address, heap.size)
        pid = os.fork()
        if pid == 0:
            try:
                _pager(server, uffd.fileno(), heap.address)
            finally:
                os._exit(1)  # a child never returns into the parent's code
        kids.append(pid)
        server.close()
        pid = os.fork()
        if pid == 0:
            try:
                uffd.close()  # only the pager may hold it
                _source(port, size)
            finally:
                os._exit(1)
        kids.append(pid)
        # From here only the pager holds the userfaultfd: if it dies, the heap's faults fall back to zero
        # pages instead of blocking this process for good (the answers are then checked as wrong).
        uffd.close()
        view = np.frombuffer(heap.buf, dtype=np.uint8)
        rng = np.random.default_rng(2)
        out = []
        for piece in rng.permutation(size // PIECE)[:n].tolist():
            at = piece * PIECE + int(rng.integers(0, PIECE // 4096)) * 4096
            t0 = time.perf_counter()
            got = int(view[at])  # blocks in the kernel until the pager installs the piece
            out.append(time.perf_counter() - t0)
            if got == 0:  # the source's bytes are never zero: the pager is gone
                raise RuntimeError("the floor's pager stopped serving faults")
        return out
    finally:
        server.close()
        uffd.close()
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        heap.close()


def _us(samples_s: list[float]) -> dict[str, Any]:
    return percentiles(samples_s, {"p50": 50, "p99": 99}, scale=1e6, digits=1, n=True)


def measure_floor(n: int = 400) -> dict[str, Any]:
    """Both floors; the fault one only where userfaultfd works (else the reason)."""
    from constmig.kernel.uffd import preflight

    doc: dict[str, Any] = {"tcp_pingpong_us": _us(tcp_pingpong(n))}
    problem = preflight()
    if problem is None:
        demand_faults(20)  # warm: imports, first touches
        doc["demand_fault_us"] = _us(demand_faults(n))
    else:
        doc["skipped"] = f"userfaultfd unusable here: {problem}"
    return doc
