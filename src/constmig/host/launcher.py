"""Starting an enclave process and talking to it: the agent's only door into an enclave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from constmig.errors import (
    AgentError,
    ChannelClosed,
    EnclaveError,
    EnclaveNotRunning,
    ProtocolError,
    SessionUnknown,
)
from constmig.wire import control
from constmig.wire.control import LaunchSpec
from constmig.wire.framing import FramedSocket

__all__ = ["EnclaveHandle", "LaunchSpec"]

START_TIMEOUT = 60.0
POOL = 4  # idle connections kept per enclave
RUN_FILE_SUFFIXES = (".pager.json", ".resume.sock")  # beside <name>.sock: the pager's status, reconnects


_KINDS = {k.__name__: k for k in (EnclaveNotRunning, SessionUnknown)}  # what the agent acts on


class EnclaveHandle:
    """One running enclave process and the Unix sockets to it.

    Each request gets a connection of its own (kept in a small pool afterwards), so a long request — a
    migration, a call waiting for heap data — never holds up a status request or another call: the
    enclave serves each connection in a thread (its ECALLs stay serialized among themselves there).
    """

    def __init__(self, spec: LaunchSpec, proc: asyncio.subprocess.Process, sock_path: Path) -> None:
        self.spec = spec
        self.proc = proc
        self.sock_path = sock_path
        self._pool: list[FramedSocket] = [self._connect()]
        self._lock = threading.Lock()
        self.stopping = False  # asked to exit (stop): its exit is expected, not a death
        self.watcher: asyncio.Future[None] | None = None  # the agent's wait for its exit (agent._watch_exit)

    def _connect(self) -> FramedSocket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.sock_path))
        except OSError:
            s.close()
            raise EnclaveError(f"enclave {self.spec.name!r} process exited") from None
        return FramedSocket(s)

    @classmethod
    async def launch(cls, spec: LaunchSpec, mode: str, run_dir: Path, platform_dir: Path,
                     root_pem: Path, tracker: str = "none", restore: Path | None = None,
                     release: str = "") -> EnclaveHandle:
        run_dir.mkdir(parents=True, exist_ok=True)
        sock_path = run_dir / f"{spec.name}.sock"
        for suffix in RUN_FILE_SUFFIXES:  # left by an earlier enclave of this name that was killed
            sock_path.with_suffix(suffix).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "constmig.enclave.runtime", "--app", spec.app, "--heap", str(spec.heap),
               "--chunk-size", str(spec.chunk_size), "--mode", mode, "--config", json.dumps(spec.config),
               "--socket", str(sock_path), "--platform-dir", str(platform_dir),
               "--root-pem", str(root_pem), "--tracker", tracker,
               *(["--plain-calls"] if spec.plain_calls else []),
               *(["--restore", str(restore)] if restore is not None else []),
               *(["--release", release] if release else [])]
        # Spawned from the event-loop thread: the child's PDEATHSIG follows this thread's lifetime.
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode().strip()
        except TimeoutError:
            proc.kill()
            raise AgentError(f"enclave {spec.name!r} did not start within {START_TIMEOUT:g}s") from None
        if not line.startswith("ready"):
            await proc.wait()
            msg = line.removeprefix("error: ") or f"exited with code {proc.returncode}"
            raise AgentError(f"enclave {spec.name!r} failed to start: {msg}")
        return cls(spec, proc, sock_path)

    def request(self, req: control.Request | dict[str, Any], fds: list[int] | tuple[int, ...] = (),
                on_progress: Callable[[dict], None] | None = None) -> Any:
        """Send one request (a control struct; a test playing a hostile host may send a raw map) and wait
        for its Reply, passing progress frames to `on_progress`; its result, or the enclave's error as an
        EnclaveError carrying the enclave's lifecycle state (a Life) and whether it stays as a tombstone."""
        with self._lock:
            fs = self._pool.pop() if self._pool else None
        fs = fs or self._connect()
        try:
            reply = control.reply(fs.exchange(req, fds, on_progress))
        except ProtocolError as e:
            fs.close()
            raise EnclaveError(f"enclave {self.spec.name!r} answered out of protocol: {e}") from None
        except ChannelClosed:
            fs.close()
            raise EnclaveError(f"enclave {self.spec.name!r} process exited") from None
        except BaseException:
            fs.close()  # a broken exchange: its late reply must not answer the next request
            raise
        with self._lock:
            if len(self._pool) < POOL:
                self._pool.append(fs)
                fs = None
        if fs is not None:
            fs.close()
        if not reply.ok:
            raise _KINDS.get(reply.kind, EnclaveError)(reply.error or "ECALL failed", reply.state, reply.tombstone)
        return reply.result

    def pager_status(self) -> dict[str, Any]:
        """What this enclave's pager (Fault Tracker) last reported, if it has one: {} otherwise."""
        try:
            info = json.loads(self.sock_path.with_suffix(".pager.json").read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    async def call(self, req: control.Request | dict[str, Any], fds: list[int] | tuple[int, ...] = (),
                   on_progress: Callable[[dict], None] | None = None) -> Any:
        return await asyncio.to_thread(self.request, req, fds, on_progress)

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the enclave to exit; kill it if it does not."""
        self.stopping = True
        if self.proc.returncode is None:
            with contextlib.suppress(EnclaveError, TimeoutError):
                await asyncio.wait_for(self.call(control.Shutdown()), timeout)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with self._lock:
            pool, self._pool = self._pool, []
        for fs in pool:
            fs.close()
        self.remove_files()

    def remove_files(self) -> None:
        """The enclave's files in the run folder (it removes them itself unless it was killed)."""
        for path in (self.sock_path, *(self.sock_path.with_suffix(s) for s in RUN_FILE_SUFFIXES)):
            path.unlink(missing_ok=True)

    def kill(self) -> None:
        self.stopping = True
        if self.proc.returncode is None:
            self.proc.kill()
