"""The delay relay on loopback (no root): bytes arrive intact and in order, each way `delay` later."""

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from constmig.host.cluster import free_port


def _echo_server() -> tuple[socket.socket, int]:
    """Echo every byte back; on EOF, finish sending and close (a clean half-close both ways)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


@pytest.fixture
def relay():
    """Start a relay process in front of an echo server; yields a function making one."""
    started: list[subprocess.Popen] = []
    servers: list[socket.socket] = []

    def make(delay: float, target_port: int | None = None) -> int:
        if target_port is None:
            srv, target_port = _echo_server()
            servers.append(srv)
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "constmig.testbed.relay", "--listen", f"127.0.0.1:{port}",
                              "--target", f"127.0.0.1:{target_port}", "--delay", str(delay)],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(p)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.02)
        raise AssertionError("relay did not start")

    yield make
    for p in started:
        p.kill()
        p.wait()
    for s in servers:
        s.close()


def _ping_rtt(port: int, n: int = 7) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(b"ping")
            got = b""
            while len(got) < 4:
                got += s.recv(4 - len(got))
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def test_round_trip_grows_by_twice_the_delay(relay):
    rtt = _ping_rtt(relay(0.010))
    assert 0.020 <= rtt < 0.030, f"median RTT {rtt * 1e3:.2f} ms through a 10 ms relay"


def test_sub_millisecond_delay_is_kept(relay):
    rtt = _ping_rtt(relay(0.0002))
    assert 0.0004 <= rtt < 0.003, f"median RTT {rtt * 1e3:.3f} ms through a 0.2 ms relay"


def test_stream_is_preserved_both_ways_and_not_throttled_to_one_buffer_per_delay(relay):
    port = relay(0.010)
    payload = os.urandom(16 << 20)
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as s:
        def reader() -> None:
            while data := s.recv(1 << 20):
                received.extend(data)

        t = threading.Thread(target=reader)
        t0 = time.monotonic()
        t.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close travels through: the echo server sees EOF and closes
        t.join(30)
        elapsed = time.monotonic() - t0
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert elapsed < 5.0, f"16 MiB echoed through a 10 ms relay took {elapsed:.2f}s"


def test_absent_target_resets_the_client(relay):
    port = relay(0.001, target_port=free_port())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            data = s.recv(10)
        except ConnectionResetError:
            data = b""
    assert data == b""


def test_bad_listen_address_is_one_line():
    p = subprocess.run([sys.executable, "-m", "constmig.testbed.relay", "--listen", "nocolon", "--target",
                        "127.0.0.1:1", "--delay", "0"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "bad address" in p.stderr
