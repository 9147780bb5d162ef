"""The test as the untrusted host: it launches enclave processes itself and talks to them directly.

An agent is untrusted code, so anything an agent could send an enclave is fair game for an attack:
this harness starts enclave runtimes the way an agent does, hands them connections it controls (a
relay that records, drops or cuts each direction), and sends them any request in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from constmig.client.trust import SimVerifier
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.framing import FramedSocket
from constmig.wire.session import ClientOpen, ClientSession


class Enclave:
    """One enclave process this host started; `request` is the agent's door into it."""

    def __init__(self, base: Path, host: str, name: str, mode: str, *, app: str = "kvstore", heap: int = 32 << 20,
                 tracker: str = "none", path: Path | None = None) -> None:
        """`path`: a folder put first on the enclave's PYTHONPATH (for apps named as module:Class)."""
        ca = base / "ca"
        create_root_ca(ca)
        platform = base / f"host-{host}" / "platform"
        SimPlatform.provision(platform, ca, host)
        sock = base / f"host-{host}" / f"{name}.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "constmig.enclave.runtime", "--app", app, "--heap", str(heap), "--mode", mode,
             "--socket", str(sock), "--platform-dir", str(platform),
             "--root-pem", str(ca / "root.pem"), "--tracker", tracker],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            env=None if path is None else {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(path), *filter(None, [os.environ.get("PYTHONPATH")])])})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready"), line
        self.sock_path = sock
        self.fs = self.connect()
        self.lock = threading.Lock()
        self.verify = SimVerifier(ca)
        self.session: ClientSession | None = None

    def connect(self) -> FramedSocket:
        """Another connection to the enclave (it serves each in a thread, as for an agent's pool)."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.sock_path))
        return FramedSocket(s)

    def request(self, req: dict[str, Any], fds: list[int] = ()) -> dict[str, Any]:
        """The raw reply ({"ok": ..., "result"|"error": ...}); never raises on a refusal."""
        with self.lock:
            return self.fs.exchange(req, fds)

    def ecall(self, name: str, *args: Any, conn: FramedSocket | None = None) -> dict[str, Any]:
        """A client's call over an attested session (this test is the client as well as the host), as
        {"ok", "result"|"error"}; a refusal by the enclave's door (not running) ends that session.
        With `conn`, a one-call session on that connection (beside a request that holds the main one)."""
        if conn is not None:
            return self._sealed_call(conn, None, name, list(args))[0]
        with self.lock:
            reply, self.session = self._sealed_call(self.fs, self.session, name, list(args))
            return reply

    def _sealed_call(self, fs: FramedSocket, session: ClientSession | None, name: str,
                     args: list[Any]) -> tuple[dict[str, Any], ClientSession | None]:
        if session is None:
            hs = ClientOpen()
            reply = fs.exchange({"op": "session_open", "hello": hs.hello})
            if not reply["ok"]:
                return reply, None
            session = hs.finish(reply["result"], self.verify, lambda vq, about: None)
        reply = fs.exchange({"op": "session_call", "record": session.seal_call(name, args, {})})
        if not reply["ok"]:
            return reply, None
        answer = session.open_answer(reply["result"])
        return ({"ok": answer.ok, "result": answer.result} if answer.ok else {"ok": False, "error": answer.error},
                session)

    def state(self) -> str:
        return self.request({"op": "status"})["result"]["state"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.close()
        self.proc.kill()
        self.proc.wait()


# pump(direction, data) -> bytes to forward (b"" drops), or None to cut both directions.
Pump = Callable[[str, bytes], bytes | None]


class Relay:
    """Two socket pairs and a thread per direction: the host's position between two enclaves."""

    def __init__(self, pump: Pump | None = None) -> None:
        self.src_end, a = socket.socketpair()
        self.dst_end, b = socket.socketpair()
        self.recorded: dict[str, bytearray] = {"s2d": bytearray(), "d2s": bytearray()}
        self.pump = pump
        self._socks = [a, b]
        for direction, frm, to in (("s2d", a, b), ("d2s", b, a)):
            threading.Thread(target=self._run, args=(direction, frm, to), daemon=True).start()

    def _run(self, direction: str, frm: socket.socket, to: socket.socket) -> None:
        try:
            while data := frm.recv(1 << 16):
                self.recorded[direction] += data
                out = data if self.pump is None else self.pump(direction, data)
                if out is None:
                    break
                if out:
                    to.sendall(out)
        except OSError:
            pass
        self.cut()

    def cut(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def migrate(src: Enclave, dst: Enclave, relay: Relay, strategy: str = "stopcopy",
            timeout: float = 10.0, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one migration the way the agents do, over `relay`; returns (source reply, destination reply).
    `extra` goes into both requests (pre-copy's max_rounds, max_downtime, max_bandwidth)."""
    from constmig.migration.strategies import get

    replies: dict[str, dict[str, Any]] = {}
    req = {"strategy": strategy, "timeout": timeout, **extra}
    # post-copy's demand channel (and any other data connection past the first) goes through untouched
    relays = [relay, *(Relay() for _ in range(get(strategy).connections - 1))]

    def side(name: str, enclave: Enclave, op: str, socks: list[socket.socket]) -> None:
        replies[name] = enclave.request({"op": op, **req}, [s.fileno() for s in socks])
        for s in socks:
            s.close()

    threads = [threading.Thread(target=side, args=("dst", dst, "migrate_in", [r.dst_end for r in relays])),
               threading.Thread(target=side, args=("src", src, "migrate_out", [r.src_end for r in relays]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    return replies["src"], replies["dst"]


def feed(dst: Enclave, data: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """Play a recorded source stream into an incoming enclave; returns its reply."""
    mine, theirs = socket.socketpair()
    threading.Thread(target=lambda: _send_quietly(mine, data), daemon=True).start()
    try:
        return dst.request({"op": "migrate_in", "strategy": "stopcopy", "timeout": timeout}, [theirs.fileno()])
    finally:
        theirs.close()
        mine.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def json_reply(reply: dict[str, Any]) -> str:
    return json.dumps(reply, default=str)[:300]


class RecordFilter:
    """A Pump that sees one direction as whole records: on_record(direction, header, bytes) -> bytes."""

    def __init__(self, on_record: Callable[[str, Any, bytes], bytes | None]) -> None:
        self.on_record = on_record
        self._buf: dict[str, bytes] = {"s2d": b"", "d2s": b""}

    def __call__(self, direction: str, data: bytes) -> bytes | None:
        from constmig.wire.records import HEADER_SIZE, parse_header

        buf = self._buf[direction] + data
        out = []
        while len(buf) >= HEADER_SIZE:
            header = parse_header(buf[:HEADER_SIZE])
            end = HEADER_SIZE + header.length
            if len(buf) < end:
                break
            got = self.on_record(direction, header, buf[:end])
            if got is None:
                return None
            out.append(got)
            buf = buf[end:]
        self._buf[direction] = buf
        return b"".join(out)
