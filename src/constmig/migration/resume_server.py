"""The destination's end of a reconnect: a Unix socket the agent hands reconnect connections to.

Whoever owns the incoming stream listens: the pager process with the Fault Tracker, a thread of the
enclave process with the Access Tracker or after stop-and-copy. Not the enclave's request loop:
that may be blocked in an ECALL waiting for exactly the chunk the reconnect will bring.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from constmig.errors import ConstmigError, EnclaveError, ProtocolError
from constmig.migration import messages as m
from constmig.migration.ledger import ChunkLedger
from constmig.migration.link import Link
from constmig.migration.priority import shallow_queue
from constmig.migration.protocol import Machine, St
from constmig.migration.receiver import Receiver
from constmig.migration.resume import HANDSHAKE_TIMEOUT, ResumeSecret, send_have
from constmig.migration.source import DEMAND_LABEL
from constmig.wire.channel import SecureChannel
from constmig.wire.framing import FramedSocket


class ResumeServer:
    """Accepts reconnects for one incoming migration, one at a time, until the process ends."""

    def __init__(self, path: Path, secret: ResumeSecret, ledger: ChunkLedger, resume_time: float,
                 receiver: Receiver | None, chunk_size: int) -> None:
        self.path, self.secret, self.ledger = Path(path), secret, ledger
        self.resume_time, self.receiver, self.chunk_size = resume_time, receiver, chunk_size
        self.epoch = 0
        self.resumes = 0
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(4)
        threading.Thread(target=self._accept, name="resume-server", daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="resume", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fs = FramedSocket(conn)
        fds: list[int] = []
        try:
            req, fds = fs.recv()
            if req.get("op") != "resume_in":
                raise EnclaveError(f"unknown request {req.get('op')!r} on the resume socket")
            socks = [socket.socket(fileno=fd) for fd in fds]
            fds = []
            for s in socks:
                s.setblocking(True)
                s.settimeout(float(req.get("timeout", 120.0)))
            self.resume(socks, float(req.get("timeout", 120.0)))
            fs.send({"ok": True, "result": {"epoch": self.epoch}})
        except (ConstmigError, OSError) as e:
            with contextlib.suppress(ConstmigError, OSError):
                fs.send({"ok": False, "error": str(e)})
        finally:
            for fd in fds:
                os.close(fd)
            fs.close()

    def resume(self, socks: list[socket.socket], timeout: float) -> None:
        """Re-key on `socks`, send HAVE, and go on streaming (or, after stop-and-copy, send DONE again)."""
        want = 1 if self.receiver is None else 2
        if len(socks) != want:
            for s in socks:
                s.close()
            raise ProtocolError(f"a reconnect of this migration needs {want} connections, got {len(socks)}")
        with self._lock:
            chan = SecureChannel(socks[0], self.secret.migration_id)
            try:
                self.epoch = self.secret.accept(chan, self.epoch, min(timeout, HANDSHAKE_TIMEOUT))
            except BaseException:
                for s in socks:
                    s.close()
                raise
            main = Link(chan, Machine("destination", St.RUNNING), timeout)
            self.resumes += 1
            if self.receiver is None:  # stop-and-copy: everything is here; the source waits for DONE
                send_have(chan, self.ledger, self.resume_time)
                main.send(m.Done(self.ledger.count, self.ledger.digest(), {"tracker": "none",
                                                                          "resumes": self.resumes}))
                chan.close()
                return
            demand = Link(SecureChannel.resume(socks[1], chan.ticket().derive(DEMAND_LABEL)), main.machine, timeout)
            shallow_queue(socks[0], socket.SO_RCVBUF, self.chunk_size)
            self.receiver.pause_for_resume("superseded by a reconnect")
            send_have(chan, self.ledger, self.resume_time)
            self.receiver.resume(main, demand)
