"""The destination's end of a reconnect: a Unix socket the agent hands reconnect connections to.

Whoever owns the incoming stream listens: the pager process with the Fault Tracker, a thread of the
enclave process with the Access Tracker or after stop-and-copy. Not the enclave's request loop:
that may be blocked in an ECALL waiting for exactly the chunk the reconnect will bring.

Before COMMIT the same socket is a CommitWaiter's: from READY on, the source may be committed (it
records HANDED_OFF before it sends COMMIT), and a COMMIT lost with the link must not leave no copy that
can run. A keyed reconnect proves the source handed off (only a handed-off source holds the resume
secret's use), so it stands for the COMMIT. A destination that gave up waiting keeps answering
reconnects with an authenticated ABORT, which gives the enclave back to its source.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from constmig.errors import ConstmigError, EnclaveError, MigrationError, ProtocolError
from constmig.migration import messages as m
from constmig.migration.constants import DEMAND_LABEL
from constmig.migration.ledger import ChunkLedger
from constmig.migration.link import Link
from constmig.migration.priority import shallow_queue
from constmig.migration.protocol import Machine, St
from constmig.migration.receiver import Receiver
from constmig.migration.resume import HANDSHAKE_TIMEOUT, ResumeSecret, send_have
from constmig.wire import control
from constmig.wire.channel import SecureChannel
from constmig.wire.framing import FramedSocket


class _Listener:
    """A Unix socket that hands each reconnect (its keyed channel and sockets) to `_reconnect`."""

    def __init__(self, path: Path, secret: ResumeSecret, epoch: int) -> None:
        self.path, self.secret, self.epoch = Path(path), secret, epoch
        self._keying = threading.Lock()  # one reconnect at a time: epochs only ever increase
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
            frame, fds = fs.recv()
            timeout = control.decode(frame, control.ResumeIn).timeout  # BadRequest: one line back
            socks = [socket.socket(fileno=fd) for fd in fds]
            fds = []
            for s in socks:
                s.setblocking(True)
                s.settimeout(timeout)
            self.resume(socks, timeout)
            fs.send(control.ok(control.ResumeInResult(epoch=self.epoch)))
        except (ConstmigError, OSError) as e:
            with contextlib.suppress(ConstmigError, OSError):
                fs.send(control.refused(str(e)))
        finally:
            for fd in fds:
                os.close(fd)
            fs.close()

    def resume(self, socks: list[socket.socket], timeout: float) -> None:
        """Check the reconnect's connection count, key the main one for a new epoch, then `_reconnect`."""
        want = self._connections()
        if len(socks) != want:
            for s in socks:
                s.close()
            raise ProtocolError(f"a reconnect of this migration needs {want} connections, got {len(socks)}")
        with self._keying:
            chan = SecureChannel(socks[0], self.secret.migration_id)
            try:
                self.epoch = self.secret.accept(chan, self.epoch, min(timeout, HANDSHAKE_TIMEOUT))
                self._reconnect(chan, socks, timeout)
            except BaseException:
                for s in socks:
                    s.close()
                raise

    def _connections(self) -> int:
        raise NotImplementedError

    def _reconnect(self, chan: SecureChannel, socks: list[socket.socket], timeout: float) -> None:
        raise NotImplementedError


class ResumeServer(_Listener):
    """Accepts reconnects for one incoming migration past its commit point, until the process ends."""

    def __init__(self, path: Path, secret: ResumeSecret, ledger: ChunkLedger, resume_time: float,
                 receiver: Receiver | None, chunk_size: int, epoch: int = 0) -> None:
        """`epoch`: the last reconnect epoch already used (by one that stood for the COMMIT)."""
        self.ledger, self.resume_time, self.receiver, self.chunk_size = ledger, resume_time, receiver, chunk_size
        self.resumes = 0
        super().__init__(path, secret, epoch)

    def _connections(self) -> int:
        return 1 if self.receiver is None else 2

    def _reconnect(self, chan: SecureChannel, socks: list[socket.socket], timeout: float) -> None:
        """Send HAVE and go on streaming (or, after stop-and-copy, send DONE again)."""
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


class CommitWaiter(_Listener):
    """A destination between READY and COMMIT (see the module doc).

    The enclave's migration thread decides, once, between "commit" (COMMIT on the link, or a reconnect
    it took) and "abort" (the source aborted, or no COMMIT and no reconnect by the deadline). Keyed
    reconnects that come first wait in `arrived` for that thread to take them; after "abort" this
    listener answers each one itself with an authenticated ABORT, for as long as the process lives.
    """

    def __init__(self, path: Path, secret: ResumeSecret, connections: int) -> None:
        self.connections = connections
        self.decision: str | None = None  # None | "commit" | "abort"
        self.reason = ""
        self.arrived = threading.Event()
        self._pending: tuple[SecureChannel, list[socket.socket]] | None = None
        self._lock = threading.Lock()
        super().__init__(path, secret, 0)

    def _connections(self) -> int:
        return self.connections

    def decide(self, decision: str, reason: str = "") -> None:
        with self._lock:
            assert self.decision is None, f"decided {self.decision} already"
            self.decision, self.reason = decision, reason
            pending, self._pending = self._pending, None
            self.arrived.clear()
        if pending is not None and decision == "abort":
            self._answer_abort(*pending)
        elif pending is not None:  # committed on the link meanwhile: the source tries again, and finds the
            for s in pending[1]:   # running instance's ResumeServer
                s.close()

    def take(self) -> tuple[SecureChannel, list[socket.socket]] | None:
        """The keyed reconnect that arrived, to stand for the COMMIT (the caller then decides "commit")."""
        with self._lock:
            pending, self._pending = self._pending, None
            self.arrived.clear()
            return pending

    def _reconnect(self, chan: SecureChannel, socks: list[socket.socket], timeout: float) -> None:
        with self._lock:
            decision = self.decision
            if decision is None:
                older, self._pending = self._pending, (chan, socks)
                self.arrived.set()
        if decision is None:
            if older is not None:  # the source gave that attempt up; only its newest one counts
                for s in older[1]:
                    s.close()
            return
        if decision == "abort":
            self._answer_abort(chan, socks)
            raise MigrationError(f"this destination gave the migration up before COMMIT ({self.reason}); "
                                 "the source was told (authenticated ABORT) and runs the enclave again")
        for s in socks:
            s.close()
        raise EnclaveError("the destination is resuming after COMMIT; reconnect again")

    def _answer_abort(self, chan: SecureChannel, socks: list[socket.socket]) -> None:
        with contextlib.suppress(ConstmigError, OSError):
            chan.send_control(m.encode(m.Abort(self.reason[:500] or "destination gave up before COMMIT")))
        for s in socks:
            s.close()
