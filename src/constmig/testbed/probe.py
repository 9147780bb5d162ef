"""Measuring what a testbed's links really do: TCP throughput, UDP loss, request round trips.

Sinks and sources run as small processes inside host namespaces (`python -m constmig.testbed.probe`),
so traffic crosses the real veths, tbf queues and loss rules. The sink reports what it saw as one
JSON line; the helpers at the bottom drive both ends from the root namespace.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from constmig.host.address import parse_addr
from constmig.testbed.spec import TestbedError

if TYPE_CHECKING:
    from constmig.testbed.bed import Testbed

PROBE_PORT = 7100


def tcp_sink(listen: str, timeout: float) -> dict[str, Any]:
    """Accept one connection, read to EOF; time from the first byte to the last."""
    host, port = parse_addr(listen)
    with socket.create_server((host, port)) as srv:
        srv.settimeout(timeout)
        print("ready", flush=True)
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        buf = bytearray(1 << 20)
        total, first = 0, 0.0
        with conn:
            while n := conn.recv_into(buf):
                if not total:
                    first = time.monotonic()
                total += n
            last = time.monotonic()
    return {"bytes": total, "seconds": last - first if total else 0.0}


def tcp_source(connect: str, nbytes: int, timeout: float) -> dict[str, Any]:
    host, port = parse_addr(connect)
    block = b"\0" * (1 << 20)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        left = nbytes
        while left > 0:
            left -= s.send(block[: min(left, len(block))])
    return {"bytes": nbytes, "seconds": time.monotonic() - t0}


def udp_sink(listen: str, count: int, quiet_s: float) -> dict[str, Any]:
    """Count datagrams until `count` arrived or none came for quiet_s; a big buffer so none are lost here."""
    host, port = parse_addr(listen)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((host, port))
        print("ready", flush=True)
        seen: set[int] = set()
        s.settimeout(30.0)  # the first datagram may take a while: the source starts after us
        while len(seen) < count:
            try:
                data = s.recv(2048)
            except TimeoutError:
                break
            s.settimeout(quiet_s)
            seen.add(int.from_bytes(data[:4], "big"))
    return {"sent": count, "received": len(seen)}


def udp_source(connect: str, count: int, interval_s: float) -> dict[str, Any]:
    host, port = parse_addr(connect)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        start = time.monotonic()
        for i in range(count):
            s.sendto(i.to_bytes(4, "big") + b"x" * 96, (host, port))
            delay = start + (i + 1) * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return {"sent": count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m constmig.testbed.probe")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tcp-sink")
    p.add_argument("--listen", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("tcp-source")
    p.add_argument("--connect", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("udp-sink")
    p.add_argument("--listen", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--quiet", type=float, default=0.3)
    p = sub.add_parser("udp-source")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.0001)
    a = ap.parse_args(argv)
    try:
        if a.what == "tcp-sink":
            out = tcp_sink(a.listen, a.timeout)
        elif a.what == "tcp-source":
            out = tcp_source(a.connect, a.bytes, a.timeout)
        elif a.what == "udp-sink":
            out = udp_sink(a.listen, a.count, a.quiet)
        else:
            out = udp_source(a.connect, a.count, a.interval)
    except OSError as e:
        print(f"error: {a.what}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


# ----- drivers, from the root namespace -----

def _probe(*args: str) -> list[str]:
    return [sys.executable, "-m", "constmig.testbed.probe", *args]


def _pair(bed: Testbed, src: str, dst: str, sink_args: list[str], source_args: list[str],
          timeout: float) -> dict[str, Any]:
    sink = bed.popen_in(dst, _probe(*sink_args), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise TestbedError("probe sink did not start")
        src_run = bed.exec_in(src, _probe(*source_args), capture_output=True, text=True, timeout=timeout)
        if src_run.returncode != 0:
            raise TestbedError(f"probe source failed: {src_run.stderr.strip()}")
        out, _ = sink.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def tcp_throughput(bed: Testbed, src: str, dst: str, nbytes: int, timeout: float = 60.0) -> float:
    """Bits per second of one TCP stream from host src to host dst (measured at the receiver)."""
    listen = f"{bed.host(dst).ip}:{PROBE_PORT}"
    r = _pair(bed, src, dst, ["tcp-sink", "--listen", listen, "--timeout", str(timeout)],
              ["tcp-source", "--connect", listen, "--bytes", str(nbytes), "--timeout", str(timeout)], timeout)
    return r["bytes"] * 8 / r["seconds"] if r["seconds"] > 0 else float("inf")


def udp_loss(bed: Testbed, src: str, dst: str, count: int = 5000, interval_s: float = 0.0001,
             timeout: float = 60.0) -> float:
    """Share of datagrams from src that never reached dst (0.0 to 1.0): both links' loss compounded."""
    listen = f"{bed.host(dst).ip}:{PROBE_PORT}"
    r = _pair(bed, src, dst, ["udp-sink", "--listen", listen, "--count", str(count)],
              ["udp-source", "--connect", listen, "--count", str(count), "--interval", str(interval_s)], timeout)
    return 1 - r["received"] / r["sent"]


def request_rtt(addr: str, n: int = 5) -> float:
    """Smallest time of n pings to an agent over one connection (plain TCP, across the link), in seconds."""
    from constmig.host.client import AgentClient
    from constmig.wire import control

    best = float("inf")
    with AgentClient(addr, timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.request(control.Ping())
            best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    sys.exit(main())
