"""The per-host agent: untrusted, asyncio. Launches enclaves, proxies calls, brokers migrations.

It never holds a key that opens enclave data: a migration's bytes go over a TCP connection that the
two agents set up between themselves and then hand, as a file descriptor, to the two enclaves.
One port serves clients, other agents, and migration data connections (the first frame says which);
admin requests need the local socket or mutual TLS on that port (host/admin.py says who may ask what).
Every request is decoded once, at dispatch, into its wire/control.py struct: an unknown op or a bad field
is refused in one line there, and the handlers read typed fields with control's defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constmig.enclave.lifecycle import Life
from constmig.errors import (
    AgentError,
    ChannelClosed,
    ConfigError,
    ConstmigError,
    DirectoryError,
    EnclaveError,
    EnclaveNotRunning,
    MigrationCancelled,
    NoReconnect,
    NoSuchEnclave,
    ProtocolError,
    Redirect,
    SessionUnknown,
)
from constmig.host import admin, client, pki
from constmig.host.address import parse_addr
from constmig.host.directory import LEASE_TTL_S, Directory, parse_etcd_url
from constmig.host.launcher import EnclaveHandle, LaunchSpec
from constmig.host.metrics import AgentMetrics, CallRate
from constmig.host.status import CALLABLE, HOLDS_UNDELIVERED, STOPPABLE, TAKES_RECONNECT, Status, StatusCell
from constmig.host.status import Status as S
from constmig.kernel.uffd import preflight
from constmig.migration import strategies
from constmig.migration.constants import DATA_CHANNELS
from constmig.migration.resume import HANDSHAKE_TIMEOUT
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.units import available_memory, format_size, resident_bytes
from constmig.wire import control
from constmig.wire.framing import FramedSocket, encode, read_frame, write_frame

log = logging.getLogger("constmig.agent")
TRACKERS = control.AGENT_TRACKERS
PAUSE_CHECK_S = 0.5  # how often a long call checks whether the enclave's stream is paused
RETRIES = 4  # a call refused by an enclave that just stopped for a migration is tried again this often
RESUME_DEADLINE_S = control.RESUME_DEADLINE_S  # default: how long a paused migration keeps trying to reconnect
STATUS_WAIT_S = 10.0  # a small request to another agent (drop a prepared instance)
CANCEL_WAIT_S = 10.0
GONE_ANSWERS = 3  # a paused migration stops reconnecting after the destination says this often it has no copy
TERM_WAIT_S = 60.0  # a stopping agent waits this long for migrations past their commit point, and per checkpoint  # a cancelled migration rolls back within this (its waits end when its connections shut)
TOMBSTONE_S = 3600.0  # how long a destination that gave up after READY keeps answering reconnects with ABORT


@dataclass
class Hosted:
    """An enclave as this agent sees it."""

    handle: EnclaveHandle
    cell: StatusCell  # moved only along host/status.py's table
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    since: float = field(default_factory=time.time)
    connections: int = 1  # data connections an incoming migration (or a reconnect of it) uses
    data_fds: dict[str, int] = field(default_factory=dict)
    resume_fds: dict[str, int] = field(default_factory=dict)
    moving_to: str = ""  # a migration out past its commit point: where, and how (for a resume)
    release: str = ""  # a migration out past its commit point: the code that completes its lineage there
    came_from: str = ""  # an incoming migration's source agent (the fleet directory's old entry)
    listed_at: str = ""  # a migration out: the directory already says it runs there
    calls: CallRate = field(default_factory=CallRate)  # client calls admitted, for load-aware placement
    strategy: str = ""
    resume_deadline: float = RESUME_DEADLINE_S  # how long a paused incoming migration's callers wait
    paused_since: float | None = None
    receiving: bool = False  # an incoming migration's data connections began to arrive
    # a migration out, until its commit point: its token (the enclave's name for it) and a cancel
    token: str = ""
    cancel: str | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> Status:
        if self.handle.proc.returncode is not None:
            self.cell.exited()  # killed, or crashed: say so rather than list it as running
        return self.cell.value

    def move(self, expected: Status | Iterable[Status], new: Status) -> bool:
        return self.cell.move(expected, new)


MAX_NAME = 64  # enclave names become file names (sockets, checkpoints) and log fields


def claim_state_dir(state_dir: Path) -> int:
    """Make sure `state_dir` is a folder this agent can write and no other agent uses: an exclusive lock
    held for the process's life (returned fd). One clear line otherwise, naming the path or the process."""
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"state folder {state_dir} is not a folder")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot use state folder {state_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"state folder {state_dir} is in use by another agent (pid {other}); give each agent "
                          "its own --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _ckpt_version(path: Path) -> int:
    """The version in NAME.vN.ckpt (-1 if the name has none)."""
    tail = path.name.rsplit(".v", 1)[-1].split(".")[0]
    return int(tail) if tail.isdigit() else -1


class Agent:
    def __init__(self, listen: str, state_dir: Path, host_id: str, ca_dir: Path,
                 metrics_listen: str | None = None, etcd: str | None = None, etcd_ttl: int = LEASE_TTL_S,
                 metrics_public: bool = False) -> None:
        self.listen = listen
        if etcd is not None:
            parse_etcd_url(etcd)
        self.etcd, self.etcd_ttl = etcd, etcd_ttl
        self.directory: Directory | None = None
        self._lease: int | None = None
        self._unsynced: set[str] = set()  # enclaves here whose directory entry may be wrong (the store was away)
        self._directory_task: asyncio.Task[None] | None = None
        self.host_id = host_id
        state_dir = Path(state_dir).absolute()  # paths it reports (checkpoints) work from any folder
        self._lock_fd = claim_state_dir(state_dir)
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.platform_dir = state_dir / "platform"
        self.root_pem = ca_dir / "root.pem"
        try:
            had_ca = (ca_dir / "root.pem").exists()
            create_root_ca(ca_dir)
            log.info("root CA %s %s", "loaded from" if had_ca else "created in", ca_dir)
        except OSError as e:
            raise ConfigError(f"cannot use CA folder {ca_dir}: {e.strerror or e}") from None
        try:
            SimPlatform.provision(self.platform_dir, ca_dir, host_id)
        except OSError as e:
            raise ConfigError(f"cannot set up this host's platform in {self.platform_dir}: {e.strerror or e}") from None
        # Who may administer it (host/admin.py): this host's certificate from the fleet's admin CA, which
        # it also shows other agents during a migration, and a local socket only its user can reach.
        if pki.create_admin_ca(ca_dir):
            log.info("admin CA created in %s", pki.admin_ca_dir(ca_dir))
        self.tls, issued = pki.ensure_host(ca_dir, pki.host_dir(state_dir), host_id)
        try:
            self._tls_server = admin.server_context(self.tls)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot use the host certificate in {self.tls.folder}: {e}") from None
        log.info("host certificate %s %s (expires %s UTC)", "issued in" if issued else "loaded from", self.tls.folder,
                 f"{self.tls.not_after:%Y-%m-%d}")
        self.admin_sock = admin.socket_path(state_dir)
        self._local_server: asyncio.base_events.Server | None = None
        self._indexed = False
        self.enclaves: dict[str, Hosted] = {}
        self.roster_path = state_dir / "enclaves.json"  # what runs here, so a restart can say what died
        self._roster: dict[str, Any] = {}
        self.died = self._load_died()
        self.moved: dict[str, str] = {}
        self.history: list[dict[str, Any]] = []
        self._server: asyncio.base_events.Server | None = None
        self._stopping = asyncio.Event()
        self._terminating: str | None = None  # why the agent is stopping (a signal): it takes no new work
        self.metrics = AgentMetrics(self._metric_rows)
        if metrics_listen is not None:
            try:
                log.info("metrics at %s", self.metrics.serve(metrics_listen, metrics_public))
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {metrics_listen}: {e.strerror or e}") from None

    def _metric_rows(self) -> list[tuple[str, str, int]]:
        """(name, status, heap bytes) per enclave, for a scrape (another thread: read, never change)."""
        return [(name, h.cell.value.value, h.handle.spec.heap) for name, h in list(self.enclaves.items())]

    # ---- what runs here, across restarts ----
    def _load_died(self) -> dict[str, dict[str, Any]]:
        """Enclaves the previous agent on this state folder ran: they died with it (PDEATHSIG). Each
        with its newest checkpoint here, if any, and the command that restores it."""
        try:
            roster = json.loads(self.roster_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): enclaves of an earlier run are not listed", self.roster_path, e)
            return {}
        died = {}
        for name, entry in roster.items() if isinstance(roster, dict) else ():
            ckpts = sorted((self.state_dir / "checkpoints").glob(f"{name}.v*.ckpt"), key=_ckpt_version)
            info = {**entry, "checkpoint": str(ckpts[-1]) if ckpts else None}
            info["restore"] = (f"constmig restore {ckpts[-1]} --agent {self.listen} --name {name}" if ckpts else None)
            died[name] = info
            log.warning("enclave %s died with the previous agent on %s; %s", name, self.state_dir,
                        f"restore it with: {info['restore']}" if ckpts else "it has no checkpoint here")
        self.roster_path.unlink(missing_ok=True)
        return died

    def _save_roster(self) -> None:
        """Write what runs here when it changed (each request may start, stop or move one)."""
        roster = {name: {"app": h.handle.spec.app, "heap_bytes": h.handle.spec.heap, "status": h.status.value}
                  for name, h in self.enclaves.items() if h.status not in (S.EXITED, S.ABORTED)}
        if roster != self._roster:
            try:
                tmp = self.roster_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(roster))
                os.replace(tmp, self.roster_path)
                self._roster = roster
            except OSError as e:
                log.warning("cannot record the enclaves here in %s: %s", self.roster_path, e)
        for name in roster:
            self.died.pop(name, None)  # a new enclave of that name runs here now

    # ---- lifecycle ----
    async def start(self) -> None:
        host, port = parse_addr(self.listen)
        try:
            self._local_server = await asyncio.start_unix_server(self._on_local, sock=admin.bind_local(self.admin_sock))
        except OSError as e:
            raise ConfigError(f"cannot serve the admin socket {self.admin_sock}: {e.strerror or e}") from None
        try:  # before the port answers: whoever sees it answer finds the socket too
            admin.register(self.listen, self.admin_sock)
            self._indexed = True
        except OSError as e:
            log.warning("cannot list the admin socket in %s (%s): the CLI here needs a certificate for this agent",
                        admin.index_dir(), e.strerror or e)
        log.info("admin socket %s", self.admin_sock)
        self._server = await asyncio.start_server(self._on_conn, host, port, reuse_address=True, start_serving=False)
        if self.etcd is not None:  # listed before it answers: whoever sees it answer finds it in the directory
            await self._join_directory()
        await self._server.start_serving()

    # ---- the fleet directory (host/directory.py): routing only; every failure here is logged, never fatal ----
    async def _join_directory(self) -> None:
        """Register under a lease (refused start if the store cannot be reached: a mistyped address must
        not leave an agent silently outside its fleet); then keep the lease and the entries fresh."""
        assert self.etcd is not None
        self.directory = Directory(self.etcd)
        try:
            self._lease = await self.directory.register(self.listen, self._directory_info(), self.etcd_ttl)
        except DirectoryError as e:
            await self.directory.close()
            self.directory = None
            raise ConfigError(f"cannot join the fleet directory: {e}") from None
        log.info("joined the fleet directory at %s (lease %x, %d s)", self.etcd, self._lease, self.etcd_ttl)
        self._directory_task = asyncio.create_task(self._keep_directory())

    def _directory_info(self) -> dict[str, Any]:
        return {"host_id": self.host_id, "metrics_url": self.metrics.url}

    async def _keep_directory(self) -> None:
        assert self.directory is not None
        away = False
        while True:
            await asyncio.sleep(max(self.etcd_ttl / 3, 0.2))
            try:
                if self._lease is None or not await self.directory.refresh(self._lease):
                    self._lease = await self.directory.register(self.listen, self._directory_info(), self.etcd_ttl)
                    log.warning("registered again in the fleet directory (the old lease had run out)")
                    self._unsynced.update(n for n, h in self.enclaves.items() if h.status is S.RUNNING)
                for name in list(self._unsynced):
                    await self._dir_claim(name)
                if away:
                    log.info("the fleet directory at %s answers again", self.etcd)
                away = False
            except DirectoryError as e:
                if not away:
                    log.warning("%s; retrying every %g s", e, max(self.etcd_ttl / 3, 0.2))
                away = True
            except Exception as e:  # noqa: BLE001 (routing must never stop for good: log it and go on)
                log.error("fleet directory upkeep failed unexpectedly (%s: %s); retrying", type(e).__name__, e)
                away = True

    async def _dir_check_free(self, name: str) -> None:
        """Names are fleet-wide with a directory: refuse one that a live agent elsewhere holds."""
        if self.directory is None:
            return
        try:
            at = await self.directory.where(name)
            if at and parse_addr(at) != parse_addr(self.listen) and await self.directory.alive(at):
                raise AgentError(f"the fleet directory says an enclave named {name!r} runs at {at}; names are "
                                 "fleet-wide: pick another name, or stop or move that one first")
        except (DirectoryError, ConfigError) as e:
            log.warning("cannot check the name %s in the fleet directory: %s", name, e)

    async def _dir_claim(self, name: str) -> None:
        """Make the directory say `name` runs here (it does): take the entry over if it names nobody, an
        agent that is gone, or the agent this enclave migrated from (its update was lost); leave it if it
        names another live agent. After a migration in, usually the source's update is there already
        (one read)."""
        if self.directory is None:
            return
        hosted = self.enclaves.get(name)
        if hosted is None or hosted.status is not S.RUNNING:
            self._unsynced.discard(name)
            return
        try:
            other = await self.directory.claim(name, self.listen)
            if other is not None and other == hosted.came_from and \
                    await self.directory.move(name, other, self.listen):
                other = None
            self._unsynced.discard(name)
            if other is not None:
                log.warning("the fleet directory says %s runs at %s, a live agent; it runs here: entry left as it "
                            "is (clients that follow it get an error there)", name, other)
        except DirectoryError as e:
            self._unsynced.add(name)
            log.warning("cannot record %s in the fleet directory (retrying): %s", name, e)

    async def _dir_moved(self, hosted: Hosted, to: str) -> None:
        """The handoff (source side): the entry goes from here to `to`, only if it still says here."""
        if self.directory is None or hosted.listed_at:
            return
        try:
            if await self.directory.move(hosted.handle.spec.name, self.listen, to):
                hosted.listed_at = to
        except DirectoryError as e:
            log.warning("cannot record the move of %s to %s in the fleet directory: %s", hosted.handle.spec.name,
                        to, e)

    async def _dir_release(self, name: str) -> None:
        self._unsynced.discard(name)
        if self.directory is None:
            return
        try:
            await self.directory.release(name, self.listen)
        except DirectoryError as e:
            log.warning("cannot drop %s from the fleet directory: %s", name, e)

    async def _leave_directory(self) -> None:
        if self._directory_task is not None:
            self._directory_task.cancel()
        if self.directory is not None:
            if self._lease is not None:
                with contextlib.suppress(DirectoryError):
                    await self.directory.deregister(self._lease)
            await self.directory.close()
            self.directory = None

    async def serve_forever(self) -> None:
        await self.start()
        log.info("agent %s listening on %s", self.host_id, self.listen)
        await self._stopping.wait()
        await self.close()

    async def terminate(self, why: str) -> None:
        """Stop the agent without losing what its enclaves acknowledged: no new work; migrations before
        their commit point are cancelled, those past it may finish (bounded); every running enclave seals
        a final checkpoint, which the next agent on this state folder lists with its restore command.
        A second signal stops at once."""
        if self._terminating is not None:
            log.warning("%s again: stopping now; enclaves not checkpointed yet die with the agent", why)
            self._stopping.set()
            return
        self._terminating = why
        log.warning("%s: the agent stops; it checkpoints its running enclaves first (send it again to stop now)",
                    why)
        for hosted in list(self.enclaves.values()):
            if hosted.status in (S.PREPARING_OUT, S.MIGRATING_OUT):
                with contextlib.suppress(ConstmigError):
                    await self._cancel(hosted, f"the source agent is stopping ({why})")
        moving = [h.settled.wait() for h in self.enclaves.values()
                  if h.status in (S.MIGRATING_OUT, S.HANDED_OFF, S.PAUSED, S.INCOMING)]
        if moving:
            log.warning("waiting up to %g s for %d migration(s) past their commit point", TERM_WAIT_S, len(moving))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*moving), TERM_WAIT_S)
        for name, hosted in list(self.enclaves.items()):
            if self._stopping.is_set():
                return
            if hosted.status is not S.RUNNING:
                log.warning("enclave %s is %s: it dies with the agent", name, hosted.status.value)
                continue
            try:
                done = await asyncio.wait_for(hosted.handle.call(control.Seal(
                    folder=str(self.state_dir / "checkpoints"), name=name, final=True)), TERM_WAIT_S)
                log.warning("enclave %s checkpointed to %s; after a restart: constmig restore %s --agent %s "
                            "--name %s", name, done["path"], done["path"], self.listen, name)
            except (ConstmigError, TimeoutError) as e:
                log.error("enclave %s could not be checkpointed (%s): it dies with the agent", name, e or "timed out")
        self._stopping.set()

    async def close(self) -> None:
        self.metrics.close()
        await self._leave_directory()  # this agent drops out of the fleet at once, not when its lease runs out
        if self._server is not None:
            self._server.close()
        if self._local_server is not None:
            self._local_server.close()
            if self._indexed:
                admin.unregister(self.listen, self.admin_sock)
            self.admin_sock.unlink(missing_ok=True)
        for hosted in list(self.enclaves.values()):
            await hosted.handle.stop()
        self.enclaves.clear()

    # ---- connections ----
    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A TCP connection: anyone's, until a `tls` request proves whose it is."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        await self._serve(reader, writer, admin.Caller("network", peer=where))

    async def _on_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection on the local socket: its folder lets only this user in; the peer's uid is checked
        too (root's is taken, as libvirt takes it)."""
        try:
            uid = admin.peer_uid(writer.get_extra_info("socket"))
        except (OSError, AttributeError):
            uid = -1
        if not admin.trusted_uid(uid):
            log.warning("refused a connection on the admin socket from uid %d", uid)
            writer.close()
            return
        await self._serve(reader, writer, admin.Caller("local", peer=f"uid {uid}"))

    async def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       caller: admin.Caller) -> admin.Caller | None:
        """The `tls` request: say yes, then mutual TLS on this connection; its certificate says who asks
        from now on. None: the handshake failed (a certificate from another CA, expired, none)."""
        if caller.via != "network":
            await write_frame(writer, control.refused("this connection is authenticated already"))
            return caller
        writer.transport.pause_reading()  # the handshake's first bytes are for TLS, not for this reader
        await write_frame(writer, control.ok())
        try:
            await writer.start_tls(self._tls_server, ssl_handshake_timeout=admin.TLS_HANDSHAKE_S)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            why = admin.alert_text(e) if isinstance(e, ssl.SSLError) else (str(e) or type(e).__name__)
            log.info("refused a certificate from %s: %s", caller.peer, why)
            return None
        role, name = admin.peer_identity(writer.get_extra_info("ssl_object"))
        return admin.Caller("tls", role, name, caller.peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: admin.Caller) -> None:
        """Requests on one connection, each checked against who `caller` is (host/admin.py)."""
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except ChannelClosed:
                    return
                op = control.op(frame)
                why = admin.refusal(op, caller)  # by the op alone: a stranger's fields are not even read
                if why is not None:
                    log.info("refused %r from %s", op, caller.describe())
                    await write_frame(writer, control.refused(why, kind="AdminRefused"))
                    continue
                try:
                    req = control.decode(frame, control.AgentRequest)
                except control.BadRequest as e:
                    log.info("refused a malformed request from %s: %s", caller.describe(), e)
                    await write_frame(writer, control.refused(str(e)))
                    if op == "data":
                        return  # a data connection gets one answer
                    continue
                if isinstance(req, control.Tls):
                    upgraded = await self._upgrade(reader, writer, caller)
                    if upgraded is None:
                        return
                    caller = upgraded
                    continue
                if isinstance(req, control.Data):
                    if caller.via != "network":  # its socket goes to the enclave as it is: plain TCP only
                        await write_frame(writer, control.refused("data connections are plain TCP"))
                        return
                    await self._on_data(req, writer)
                    return
                watcher = asyncio.create_task(self._cancel_when_gone(reader, req.name)) \
                    if isinstance(req, control.Migrate) else None
                try:
                    reply = control.ok(await self._dispatch(req, writer))
                except Redirect as r:
                    reply = control.refused(str(r), redirect=r.location)
                except ConstmigError as e:
                    if isinstance(req, control.Migrate):
                        log.warning("migration of %s failed: %s", req.name, e)
                    reply = control.refused(str(e), **({"kind": type(e).__name__}
                                                      if isinstance(e, SessionUnknown | NoSuchEnclave) else {}))
                finally:
                    if watcher is not None:  # gone before the next read: one reader at a time
                        watcher.cancel()
                        await asyncio.gather(watcher, return_exceptions=True)
                self._save_roster()
                await write_frame(writer, reply)
        except ProtocolError as e:
            log.warning("dropping connection: %s", e)
        except ChannelClosed:
            pass
        except asyncio.CancelledError:
            pass  # the agent is shutting down; ending quietly keeps asyncio from logging it as an error
        finally:
            writer.close()

    @staticmethod
    async def _unless_cancelled(hosted: Hosted, work: Awaitable[Any], undo: Callable[[Any], None]) -> Any:
        """`work`'s result, unless the migration is cancelled first: then `work` (a thread) runs on to its
        own timeout and `undo` gets what it made, if it made anything."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(hosted.cancelled.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task in done:
            return task.result()

        def later(t: asyncio.Future) -> None:
            if not t.cancelled() and t.exception() is None:
                undo(t.result())

        task.add_done_callback(later)
        raise MigrationCancelled(f"cancelled: {hosted.cancel}")

    async def _drop_remote(self, to: str, name: str) -> None:
        try:
            await asyncio.to_thread(client.request, to, control.DropIn(name=name), None, STATUS_WAIT_S, self.tls)
        except ConstmigError as e:
            log.info("the destination %s keeps its prepared instance of %s until it times out: %s", to, name, e)

    async def _cancel_when_gone(self, reader: asyncio.StreamReader, name: str) -> None:
        """The command that asked for a migration went away (killed, disconnected): a migration nobody
        watches is cancelled if it has not reached its commit point (past it, it goes on)."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await reader.read(4096):
                pass  # nothing more is expected on this connection until the answer
        hosted = self.enclaves.get(name)
        if hosted is not None and hosted.status in (S.PREPARING_OUT, S.MIGRATING_OUT):
            try:
                await self._cancel(hosted, "the command that started it went away")
            except ConstmigError as e:
                log.info("migration of %s goes on without the command that started it: %s", name, e)

    async def _dispatch(self, req: control.Request, writer: asyncio.StreamWriter) -> Any:
        op = control.op(req)
        if self._terminating is not None and op not in ("status", "ping"):
            raise AgentError(f"agent {self.host_id} is stopping ({self._terminating}); it takes no new requests")
        handler = {
            "ping": self.op_ping,
            "status": self.op_status,
            "run": self.op_run,
            "checkpoint": self.op_checkpoint,
            "restore": self.op_restore,
            "call": self.op_call,
            "session_open": self.op_session_open,
            "session_call": self.op_session_call,
            "stop": self.op_stop,
            "migrate": self.op_migrate,
            "cancel": self.op_cancel,
            "drop_in": self.op_drop_in,
            "resume": self.op_resume,
            "prepare_in": self.op_prepare_in,
            "shutdown": self.op_shutdown,
        }.get(op)
        if handler is None:  # a request of the protocol this agent does not serve here
            raise AgentError(f"unknown request {op!r}")
        return await handler(req, writer)  # type: ignore[operator]

    def _get(self, name: Any) -> Hosted:
        name = str(name)
        hosted = self.enclaves.get(name)
        # An enclave coming back here is ours to wait for, even while we still remember it left: else
        # callers bounce between the agent it is leaving and this one until the handoff.
        if name in self.moved and (hosted is None or hosted.status is not S.INCOMING):
            raise Redirect(f"enclave {name!r} moved to {self.moved[name]}", self.moved[name])
        if hosted is None:
            known = ", ".join(sorted(self.enclaves)) or "none"
            raise NoSuchEnclave(f"no enclave named {name!r} on agent {self.host_id} (known: {known})")
        return hosted

    # ---- operations ----
    async def op_ping(self, req: control.Ping, writer: Any) -> control.PingResult:
        """Open to anyone: the agent answers, and its name (no enclave is named)."""
        return control.PingResult(host_id=self.host_id, listen=self.listen)

    async def op_status(self, req: control.Status, writer: Any) -> control.AgentStatus:
        out = {}
        for name, hosted in list(self.enclaves.items()):  # a call below may let an entry go meanwhile
            info: dict[str, Any] = {"status": hosted.status.value, "app": hosted.handle.spec.app,
                                    "heap_bytes": hosted.handle.spec.heap, "calls_per_s": hosted.calls.per_second()}
            if hosted.status is S.RUNNING:
                with contextlib.suppress(EnclaveError):
                    info.update(await hosted.handle.call(control.EnclaveStatus()))
            if hosted.release and hosted.status in (S.PAUSED, S.RESUMING, S.FAILED):
                info["recovery"] = self._recovery(name, hosted.moving_to, hosted.release)
            out[name] = info
        return control.AgentStatus(
            host_id=self.host_id, listen=self.listen, enclaves=out, moved=dict(self.moved),
            migrations=self.history[-20:], died=dict(self.died), metrics_url=self.metrics.url, directory=self.etcd,
            admin={"socket": str(self.admin_sock), "certificate": str(self.tls.folder),
                   "expires": f"{self.tls.not_after:%Y-%m-%d %H:%M} UTC"},
            memory={"available": available_memory(), "promised": self._promised()})

    async def _clear_tombstone(self, name: str) -> None:
        """A new enclave of this name replaces a tombstone of an old migration (see destination.py)."""
        hosted = self.enclaves.get(name)
        if hosted is not None and hosted.status is S.ABORTED:
            del self.enclaves[name]
            await hosted.handle.stop()

    def _check_new(self, spec: LaunchSpec) -> None:
        if spec.name in self.enclaves:
            raise AgentError(f"an enclave named {spec.name!r} already exists on agent {self.host_id}")
        if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
            raise AgentError(f"bad enclave name {spec.name!r}: use letters, digits, '-' and '_'")
        if len(spec.name) > MAX_NAME:
            raise AgentError(f"enclave name of {len(spec.name)} characters is too long (at most {MAX_NAME})")
        avail, promised = available_memory(), self._promised()
        if spec.heap > avail - promised:
            held = f", {format_size(promised)} of it promised to enclaves already here" if promised else ""
            raise AgentError(f"heap {format_size(spec.heap)} exceeds this host's available memory "
                             f"({format_size(avail)}{held})")

    def _promised(self) -> int:
        """Heap the enclaves here may still claim: each heap less what its process already holds (an
        untouched heap costs nothing until written, so free memory alone overcommits)."""
        total = 0
        for hosted in self.enclaves.values():
            if hosted.handle.proc.returncode is None:
                total += max(hosted.handle.spec.heap - resident_bytes(hosted.handle.proc.pid), 0)
        return total

    async def _launch(self, spec: LaunchSpec, mode: str, tracker: str = "none",
                      restore: Path | None = None, release: str = "") -> EnclaveHandle:
        return await EnclaveHandle.launch(spec, mode, self.run_dir, self.platform_dir, self.root_pem, tracker,
                                          restore, release)

    async def op_run(self, req: control.Run, writer: Any) -> Any:
        spec = req.spec()
        await self._clear_tombstone(spec.name)
        self._check_new(spec)
        await self._dir_check_free(spec.name)
        self.moved.pop(spec.name, None)
        handle = await self._launch(spec, "fresh")
        self.enclaves[spec.name] = Hosted(handle, StatusCell(S.RUNNING))
        await self._dir_claim(spec.name)
        log.info("enclave %s started: app %s, heap %s, pid %d", spec.name, spec.app, format_size(spec.heap),
                 handle.proc.pid)
        return await handle.call(control.EnclaveStatus())

    async def op_checkpoint(self, req: control.Checkpoint, writer: Any) -> Any:
        """Have the enclave seal its state into this agent's checkpoint folder (see enclave/persist.py)."""
        hosted = self._get(req.name)
        if hosted.status is not S.RUNNING:
            raise AgentError(f"enclave {req.name!r} is {hosted.status.value}; cannot checkpoint it now")
        spec = hosted.handle.spec
        return await hosted.handle.call(control.Seal(folder=str(self.state_dir / "checkpoints"), name=spec.name))

    async def op_restore(self, req: control.Restore, writer: Any) -> Any:
        """Start an enclave from a sealed checkpoint; the enclave itself refuses a stale or foreign one.
        (A release code is 64 hex digits: control.Restore checked it as it was decoded.)"""
        from constmig.enclave.persist import read_header

        path = Path(req.path)
        release = req.release
        header = read_header(path)
        spec = LaunchSpec(req.name or path.name.split(".")[0], header.app, header.heap,
                          header.chunk_size, dict(header.config), header.plain_calls)
        await self._clear_tombstone(spec.name)
        self._check_new(spec)
        await self._dir_check_free(spec.name)
        self.moved.pop(spec.name, None)
        handle = await self._launch(spec, "restore", restore=path.resolve(), release=release)
        self.enclaves[spec.name] = Hosted(handle, StatusCell(S.RUNNING))
        await self._dir_claim(spec.name)
        return await handle.call(control.EnclaveStatus())

    async def op_call(self, req: control.Call, writer: Any) -> Any:
        """An unsealed ECALL (only enclaves launched with --plain-calls take it)."""
        return await self._admit(req.name, control.Ecall(name=req.method, args=req.args, kwargs=req.kwargs))

    async def op_session_open(self, req: control.SessionOpen, writer: Any) -> Any:
        """A client opens an attested session with an enclave: its Hello in, the enclave's Accept out.
        The agent forwards bytes it can neither read nor forge (wire/session.py)."""
        return await self._admit(req.name, control.EnclaveSessionOpen(hello=req.hello))

    async def op_session_call(self, req: control.SessionCall, writer: Any) -> Any:
        """One sealed request of a client's session, forwarded like a call (and redirected like one)."""
        return await self._admit(req.name, control.EnclaveSessionCall(record=req.record))

    async def _admit(self, name: str, inner: control.Request) -> Any:
        """Send `inner` to the named enclave once it runs here; redirect when it has moved. Each answered
        call's wait goes into the call-latency metric."""
        t0, moving = time.monotonic(), False
        for _ in range(RETRIES):
            hosted = self._get(name)
            status = hosted.status
            if status is S.PAUSED:
                raise AgentError(self._paused_error(hosted))
            if status is S.EXITED:
                raise AgentError(f"enclave {hosted.handle.spec.name!r} on agent {self.host_id} has exited "
                                 f"(code {hosted.handle.proc.returncode}); its state here is gone")
            if status not in CALLABLE:
                if hosted.settled.is_set():  # settled, yet not callable: never spin the event loop on it
                    raise AgentError(f"enclave {hosted.handle.spec.name!r} is {status.value}; it takes no calls")
                moving = True
                await hosted.settled.wait()  # a migration is deciding where this enclave lives
                continue
            moving = moving or status is not S.RUNNING
            try:
                result = await self._ecall(hosted, inner)
                self.metrics.call_wait.labels("yes" if moving or hosted.status is not S.RUNNING else "no").observe(
                    time.monotonic() - t0)
                return result
            except EnclaveNotRunning:
                # It stopped for a migration after the call was admitted; the call did not run. Once the
                # migration settles, the call goes wherever the enclave runs (here again, or a redirect).
                moving = True
                await hosted.settled.wait()
        raise AgentError(f"enclave {name!r} kept moving; the call did not run (try again)")

    async def _ecall(self, hosted: Hosted, inner: control.Request) -> Any:
        hosted.calls.record()
        call = asyncio.ensure_future(hosted.handle.call(inner))
        while True:
            done, _ = await asyncio.wait({call}, timeout=PAUSE_CHECK_S)
            if done:
                return call.result()
            # A call into a post-copy destination may wait for heap data; if its stream is paused, it
            # waits for the source to reconnect, but not past the migration's resume deadline.
            if hosted.handle.pager_status().get("state") == "paused":
                now = time.monotonic()
                hosted.paused_since = hosted.paused_since or now
                if now - hosted.paused_since > hosted.resume_deadline:
                    hosted.move(S.RUNNING, S.PAUSED)
                    raise AgentError(self._paused_error(hosted))
            else:
                hosted.paused_since = None

    def _paused_error(self, hosted: Hosted) -> str:
        reason = hosted.handle.pager_status().get("reason", "the stream stopped")
        return (f"enclave {hosted.handle.spec.name!r} is waiting for heap data its incoming migration could not "
                f"deliver ({reason}); the call is held inside the enclave until the migration recovers, so its outcome "
                "is unknown; the source agent holds the missing data while it runs (if it died, that data is lost: "
                "docs/reliability.md)")

    async def op_stop(self, req: control.Stop, writer: Any) -> Any:
        name = req.name
        hosted = self.enclaves.get(name) if req.force else None
        hosted = hosted or self._get(name)
        status = hosted.status
        if status in HOLDS_UNDELIVERED and not req.force:
            raise AgentError(f"enclave {name!r} is {status.value}: it holds heap data its migration has not "
                             "delivered; stopping it loses that data (use --force if that is what you want)")
        if status not in STOPPABLE:
            raise AgentError(f"enclave {name!r} is {status.value}; cannot stop it now")
        del self.enclaves[hosted.handle.spec.name]
        await hosted.handle.stop()
        await self._dir_release(hosted.handle.spec.name)
        log.info("enclave %s stopped", name)
        return "stopped"

    async def op_cancel(self, req: control.Cancel, writer: Any) -> control.CancelResult:
        """Cancel a migration out of here that has not reached its commit point; the enclave runs on here."""
        name = req.name
        hosted = self.enclaves.get(name)
        if hosted is None:
            if name in self.moved:
                raise AgentError(f"the migration of {name!r} is over: it runs on {self.moved[name]}; a finished "
                                 "migration cannot be undone (migrate it back)")
            raise AgentError(f"no enclave named {name!r} on this agent")
        return await self._cancel(hosted, req.reason or control.CANCEL_REASON)

    async def _cancel(self, hosted: Hosted, reason: str) -> control.CancelResult:
        name = hosted.handle.spec.name
        status = hosted.status
        if status in (S.HANDED_OFF, S.PAUSED):
            raise AgentError(f"the migration of {name!r} passed its commit point (the destination runs it); it "
                             "cannot be undone and goes on")
        if status not in (S.PREPARING_OUT, S.MIGRATING_OUT):
            raise AgentError(f"no migration of {name!r} is in progress on this agent (it is {status.value})")
        log.info("migration of %s cancelled: %s", name, reason)
        hosted.cancel = reason
        hosted.cancelled.set()
        if status is S.MIGRATING_OUT:
            try:
                await asyncio.wait_for(hosted.handle.call(control.CancelOut(reason=reason, token=hosted.token)),
                                       CANCEL_WAIT_S)
            except TimeoutError:
                raise AgentError(f"the enclave {name!r} did not answer the cancel in time") from None
            except ConstmigError as e:
                hosted.cancel = None  # refused (past its commit point): a later failure is not a cancel
                raise AgentError(f"cannot cancel the migration of {name!r}: {e}") from None
        try:  # the migration's own error path rolls it back; wait for that, boundedly
            await asyncio.wait_for(hosted.settled.wait(), CANCEL_WAIT_S)
        except TimeoutError:
            raise AgentError(f"the migration of {name!r} was told to stop but has not yet; it rolls back when "
                             "what it waits for ends (see status)") from None
        if hosted.status is not S.RUNNING:
            raise AgentError(f"the migration of {name!r} reached its commit point before the cancel; it goes on "
                             f"(it is {hosted.status.value})")
        return control.CancelResult(cancelled=True, name=name, state=Life.RUNNING, on=self.listen)

    async def op_drop_in(self, req: control.DropIn, writer: Any) -> Any:
        """The source gave up before sending any data (cancelled, failed): drop the empty instance prepared
        here, which holds nothing of the enclave."""
        name = req.name
        hosted = self.enclaves.get(name)
        if hosted is None or hosted.status is not S.INCOMING or hosted.receiving:
            raise AgentError(f"no prepared, unconnected incoming enclave named {name!r} here")
        await self._drop_unconnected(hosted, "its source gave up")
        return "dropped"

    async def _drop_unconnected(self, hosted: Hosted, why: str) -> None:
        name = hosted.handle.spec.name
        if self.enclaves.get(name) is not hosted or hosted.status is not S.INCOMING or hosted.receiving:
            return
        del self.enclaves[name]
        for fd in hosted.data_fds.values():
            os.close(fd)
        hosted.data_fds = {}
        await hosted.handle.stop()
        log.info("incoming enclave %s dropped before any data came: %s", name, why)

    async def op_shutdown(self, req: control.Shutdown, writer: Any) -> Any:
        self._stopping.set()
        return "shutting down"

    async def op_prepare_in(self, req: control.PrepareIn, writer: Any) -> control.PrepareInResult:
        """Another agent wants to migrate an enclave here: start an empty instance of it."""
        spec = req.spec
        strategy = strategies.get(req.strategy)
        tracker, reason = choose_tracker(req.tracker) if strategy.needs_tracker else \
            ("none", f"{strategy.name} needs no tracker")
        await self._clear_tombstone(spec.name)
        self._check_new(spec)
        handle = await self._launch(spec, "incoming", tracker)
        hosted = Hosted(handle, StatusCell(S.INCOMING), connections=strategy.connections,
                        resume_deadline=req.resume_deadline, came_from=req.source)
        self.enclaves[spec.name] = hosted
        wait = req.timeout  # a source that never connects frees the name
        asyncio.get_running_loop().call_later(wait, lambda: asyncio.ensure_future(self._drop_unconnected(
            hosted, f"no data connection came within {wait:g} s")))
        return control.PrepareInResult(host_id=self.host_id, tracker=tracker, tracker_reason=reason)

    async def _on_data(self, req: control.Data, writer: asyncio.StreamWriter) -> None:
        """Hand this connection to the incoming enclave: from now on only ciphertext flows on it."""
        name, channel = req.name, req.channel
        hosted = self.enclaves.get(name)
        if req.resume:
            await self._on_resume_data(req, writer)
            return
        if hosted is None or hosted.status is not S.INCOMING:
            await write_frame(writer, control.refused(f"no incoming enclave named {name!r} here"))
            return
        wanted = DATA_CHANNELS[:hosted.connections]
        if channel not in wanted or channel in hosted.data_fds:
            await write_frame(writer, control.refused(f"unexpected data connection {channel!r} for {name!r}"))
            return
        transport = writer.transport
        transport.pause_reading()  # the source sends nothing more until it has our answer
        sock = writer.get_extra_info("socket")
        hosted.data_fds[channel] = os.dup(sock.fileno())
        await write_frame(writer, control.ok())
        if len(hosted.data_fds) == len(wanted):
            hosted.receiving = True
            fds = [hosted.data_fds[c] for c in wanted]
            hosted.data_fds = {}
            asyncio.create_task(self._run_incoming(hosted, fds, req.timeout))

    async def _on_resume_data(self, req: control.Data, writer: asyncio.StreamWriter) -> None:
        """A reconnect of a paused migration into an enclave here: pass the connections to its resume socket."""
        name, channel = req.name, req.channel
        hosted = self.enclaves.get(name)
        n = req.resume
        if hosted is not None and hosted.status is S.EXITED:
            await write_frame(writer, control.refused(
                f"enclave {name!r} here has exited (its process is gone, code {hosted.handle.proc.returncode}); "
                "it takes no reconnect", gone=True))
            return
        # incoming: past READY a reconnect stands for a lost COMMIT; aborted: it is answered with ABORT
        if hosted is None or hosted.status not in TAKES_RECONNECT or n not in (1, 2):
            await write_frame(writer, control.refused(f"no enclave named {name!r} here takes a reconnect",
                                                      gone=True))
            return
        wanted = DATA_CHANNELS[:n]
        if channel not in wanted:
            await write_frame(writer, control.refused(f"unexpected reconnect channel {channel!r}"))
            return
        if channel in hosted.resume_fds:  # a stale half of an earlier attempt: this one replaces it
            os.close(hosted.resume_fds.pop(channel))
        writer.transport.pause_reading()
        hosted.resume_fds[channel] = os.dup(writer.get_extra_info("socket").fileno())
        await write_frame(writer, control.ok())
        if len(hosted.resume_fds) == n:
            fds = [hosted.resume_fds.pop(c) for c in wanted]
            asyncio.create_task(self._run_resume(hosted, fds, req.timeout))

    async def _run_resume(self, hosted: Hosted, fds: list[int], timeout: float) -> None:
        path = hosted.handle.sock_path.with_suffix(".resume.sock")
        try:
            await asyncio.to_thread(_resume_request, path, fds, timeout)  # the enclave checks the timeout
            if hosted.move(S.PAUSED, S.RUNNING):  # an incoming migration's own task settles its status
                hosted.paused_since = None
        except ConstmigError as e:
            log.warning("reconnect of %s failed: %s", hosted.handle.spec.name, e)
        finally:
            for fd in fds:
                os.close(fd)

    async def _run_incoming(self, hosted: Hosted, fds: list[int], timeout: float) -> None:
        name = hosted.handle.spec.name
        try:  # the enclave checks the timeout the source's agent asked for
            result = await hosted.handle.call(control.MigrateIn(timeout=timeout, commit_wait=hosted.resume_deadline),
                                              fds=fds)
            hosted.move(S.INCOMING, S.RUNNING)
            self.moved.pop(name, None)  # it came back: calls are ours again
            await self._dir_claim(name)
            self.history.append({"name": name, "direction": "in", **result})
            self.metrics.finished("in", result)
            log.info("migration of %s in done: %s, downtime %.1f ms", name, result.get("strategy"),
                     result.get("downtime_ms") or 0.0)
        except ConstmigError as e:
            log.warning("incoming migration of %s failed: %s", name, e)
            if isinstance(e, EnclaveError) and e.tombstone:
                # It gave up after READY: the source may be committed and reconnecting; the process
                # (its heap wiped) answers that with an authenticated ABORT, so the source runs again.
                hosted.move(S.INCOMING, S.ABORTED)
                asyncio.get_running_loop().call_later(TOMBSTONE_S, lambda: asyncio.ensure_future(
                    self._clear_tombstone_if(hosted)))
            else:
                self.enclaves.pop(name, None)
                await hosted.handle.stop()
        finally:
            for fd in fds:
                os.close(fd)
            hosted.settled.set()

    async def _clear_tombstone_if(self, hosted: Hosted) -> None:
        name = hosted.handle.spec.name
        if self.enclaves.get(name) is hosted and hosted.status is S.ABORTED:
            await self._clear_tombstone(name)

    async def op_migrate(self, req: control.Migrate, writer: asyncio.StreamWriter) -> Any:
        """(Its strategy, tracker, stream options and waits were checked as it was decoded.)"""
        hosted = self._get(req.name)
        if hosted.status is not S.RUNNING:
            raise AgentError(f"enclave {req.name!r} is {hosted.status.value}; cannot migrate it now")
        to = req.to
        if parse_addr(to) == parse_addr(self.listen):
            raise AgentError(f"enclave {req.name!r} already runs on this agent ({self.listen}); migrate it "
                             "--to another agent")
        strategy, timeout, deadline = req.strategy, req.timeout, req.resume_deadline
        spec = hosted.handle.spec
        log.info("migration of %s to %s started: %s", spec.name, to, strategy)
        hosted.move(S.RUNNING, S.PREPARING_OUT)  # still serving calls while the destination gets ready
        hosted.settled = asyncio.Event()
        hosted.cancel, hosted.cancelled, hosted.token = None, asyncio.Event(), os.urandom(8).hex()
        try:  # the enclave's own gate, asked before a destination is prepared (it asks itself again at the stop)
            await hosted.handle.call(control.CheckExport(what="migrate"))
        except ConstmigError as e:
            hosted.move(S.PREPARING_OUT, S.RUNNING)
            hosted.settled.set()
            raise AgentError(str(e)) from None
        loop = asyncio.get_running_loop()

        def handed_off() -> None:
            # Past the commit point the destination runs the app: send callers there right away.
            if hosted.move(S.MIGRATING_OUT, S.HANDED_OFF):
                self.moved[spec.name] = to
                hosted.settled.set()
                asyncio.ensure_future(self._dir_moved(hosted, to))

        def on_progress(info: dict) -> None:
            if info.get("phase") == "lineage_released":  # for the operator, should the destination die now
                hosted.release = str(info.get("release", ""))
                return
            if info.get("phase") == "handed_off":
                loop.call_soon_threadsafe(handed_off)
            loop.call_soon_threadsafe(lambda: writer.write(_progress_frame(info)))

        data_socks: list[socket.socket] = []
        t0 = time.time()
        t_prepared = t0
        prepared = False

        def drop_prepared(_: Any = None) -> None:  # the destination holds an empty instance nobody will use
            asyncio.ensure_future(self._drop_remote(to, spec.name))

        try:
            prep = control.result(await self._unless_cancelled(hosted, asyncio.to_thread(functools.partial(
                client.request, identity=self.tls), to, control.PrepareIn(
                    spec=spec, strategy=strategy, source=self.listen, tracker=req.tracker, resume_deadline=deadline,
                    timeout=timeout), None, timeout), undo=drop_prepared), control.PrepareInResult)
            prepared = True
            for channel in DATA_CHANNELS[:strategies.get(strategy).connections]:
                data_socks.append(await self._unless_cancelled(hosted, asyncio.to_thread(
                    _open_data, to, spec.name, timeout, channel), undo=lambda sock: sock.close()))
            t_prepared = time.time()
            if hosted.cancelled.is_set():
                raise MigrationCancelled(f"cancelled: {hosted.cancel}")
            # Calls go on until the enclave stops (after its handshake); then they wait for the outcome.
            hosted.move(S.PREPARING_OUT, S.MIGRATING_OUT)
            prepared = False  # from here the enclaves' own protocol ends the destination's instance
            result = await hosted.handle.call(control.MigrateOut(
                strategy=strategy, timeout=timeout, token=hosted.token, max_bandwidth=req.max_bandwidth,
                # the pre-copy rounds of precopy and hybrid, and their write tracking: by default the
                # destination tracker's
                tracker=prep.tracker, max_downtime=req.max_downtime, max_rounds=req.max_rounds,
                write_tracking=req.write_tracking, prefetch=req.prefetch),
                fds=[s.fileno() for s in data_socks], on_progress=on_progress)
        except ConstmigError as e:
            state = e.state if isinstance(e, EnclaveError) else None
            if state is Life.RUNNING or (state is None and hosted.status in (S.PREPARING_OUT, S.MIGRATING_OUT)):
                hosted.move((S.PREPARING_OUT, S.MIGRATING_OUT, S.HANDED_OFF), S.RUNNING)
                self.moved.pop(spec.name, None)
                hosted.settled.set()
                if prepared:
                    drop_prepared()
                self.metrics.ended("out", strategy, "cancelled" if hosted.cancel is not None else "rolled-back")
                if hosted.cancel is not None:
                    log.info("migration of %s cancelled before its commit point: it runs on here", spec.name)
                    raise AgentError(f"migration of {spec.name!r} cancelled before its commit point ({hosted.cancel});"
                                     f" it keeps running on {self.listen} with all its data") from None
                raise AgentError(str(e)) from None
            if state is not Life.HANDED_OFF or deadline <= 0:
                # handed off: it never runs here again, and keeps its state
                self.metrics.ended("out", strategy, "failed")
                hosted.move((S.MIGRATING_OUT, S.HANDED_OFF), S.FAILED)
                hosted.settled.set()
                raise AgentError(str(e)) from None
            # Past the commit point: the source keeps every chunk; reconnect until the deadline.
            hosted.move((S.MIGRATING_OUT, S.HANDED_OFF), S.PAUSED)
            hosted.moving_to, hosted.strategy = to, strategy
            hosted.settled.set()
            for s in data_socks:
                s.close()
            data_socks = []
            result = await self._resume_out(hosted, deadline, timeout, e, on_progress)
        finally:
            for s in data_socks:
                s.close()
        # The enclave timed attestation to DONE; the user waited for the whole thing, preparation included.
        result["migrate_s"] = result.pop("total_s")
        result["prepare_s"] = t_prepared - t0
        result["total_s"] = time.time() - t0
        result.update({"from": self.listen, "to": to, "name": spec.name, "tracker_reason": prep.tracker_reason})
        return await self._moved_out(hosted, result)

    async def _moved_out(self, hosted: Hosted, result: dict[str, Any]) -> dict[str, Any]:
        name = hosted.handle.spec.name
        log.info("migration of %s to %s done: %s, downtime %.1f ms, total %.2f s", name, result.get("to"),
                 result.get("strategy"), result.get("downtime_ms") or 0.0, result.get("total_s") or 0.0)
        self.history.append({"direction": "out", **result})
        self.metrics.finished("out", result)
        self.enclaves.pop(name, None)
        self.moved[name] = result["to"]
        hosted.settled.set()
        await hosted.handle.stop()
        await self._dir_moved(hosted, result["to"])  # if the handoff's update did not happen
        return result

    async def _resume_out(self, hosted: Hosted, deadline: float, timeout: float, first: Exception,
                          on_progress: Callable[[dict], None] | None) -> dict[str, Any]:
        """Reconnect a paused migration with backoff until it finishes or `deadline` seconds pass."""
        name, to = hosted.handle.spec.name, hosted.moving_to
        n = strategies.get(hosted.strategy).connections
        t_end = time.monotonic() + deadline
        delay, last, attempts, gone = 0.1, str(first), 0, 0
        while True:
            left = t_end - time.monotonic()
            if left <= 0:
                hosted.move((S.PAUSED, S.RESUMING), S.FAILED)
                raise AgentError(
                    f"migration of {name!r} to {to} paused after the handoff and could not be resumed within "
                    f"{deadline:g} s ({attempts} attempts; last: {last}); this source keeps every chunk the "
                    f"destination lacks: retry with `constmig migrate {name} --from {self.listen} --resume`; if the "
                    f"destination lost its copy, {self._recovery(name, to, hosted.release)}")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
            attempts += 1
            socks: list[socket.socket] = []
            try:
                for channel in DATA_CHANNELS[:n]:
                    socks.append(await asyncio.to_thread(_open_data, to, name, min(HANDSHAKE_TIMEOUT, left),
                                                         channel, n))
                hosted.move(S.PAUSED, S.RESUMING)
                result = await hosted.handle.call(control.ResumeOut(timeout=timeout),
                                                  fds=[s.fileno() for s in socks], on_progress=on_progress)
                result.update({"from": self.listen, "to": to, "name": name})
                return result
            except NoReconnect as e:
                gone += 1
                if gone >= GONE_ANSWERS:  # a live destination agent says so again and again: stop retrying
                    hosted.move((S.PAUSED, S.RESUMING), S.FAILED)
                    raise AgentError(self._stranded(name, to, str(e), hosted.release)) from None
                last = str(e)
            except ConstmigError as e:
                gone = 0
                last = str(e)
                state = e.state if isinstance(e, EnclaveError) else Life.HANDED_OFF  # a reconnect that failed
                if state is Life.RUNNING:  # the destination proved it never ran it (authenticated ABORT)
                    hosted.move((S.PAUSED, S.RESUMING), S.RUNNING)
                    hosted.moving_to = ""
                    self.moved.pop(name, None)
                    hosted.settled.set()
                    raise AgentError(str(e)) from None
                if state is not Life.HANDED_OFF:
                    hosted.move((S.PAUSED, S.RESUMING), S.FAILED)
                    raise AgentError(f"migration of {name!r} cannot be resumed: {e}") from None
                hosted.move(S.RESUMING, S.PAUSED)
            finally:
                for s in socks:
                    s.close()

    def _stranded(self, name: str, to: str, answer: str, release: str) -> str:
        """What to say when the destination has no copy to reconnect to: the enclave is stranded (the
        source may not run it: a dead copy and one its host hides look the same), and what restores it."""
        return (f"migration of {name!r} to {to} cannot be resumed: the destination answers \"{answer}\" (its copy "
                f"died, or its host hides it). The enclave is stranded: this source keeps every chunk but may not "
                f"run it, since it cannot tell a dead copy from a hidden one. To recover, "
                f"{self._recovery(name, to, release)}")

    def _recovery(self, name: str, to: str, release: str) -> str:
        """How the newest checkpoint restores on the destination host, where the lineage went at the commit
        point (with the release code, should the destination have died before it handled COMMIT)."""
        ckpts = sorted((self.state_dir / "checkpoints").glob(f"{name}.v*.ckpt"), key=_ckpt_version)
        if not ckpts:
            return "there is no checkpoint of it here, so its data is lost"
        return (f"its newest checkpoint here, {ckpts[-1]}, restores on the destination host (the lineage moved "
                f"there at the commit point): constmig restore {ckpts[-1]} --agent {to} --name {name}"
                + (f" --release {release}" if release else "") +
                " (copy the file there first if the hosts share no folder); writes since it are lost")

    async def op_resume(self, req: control.Resume, writer: asyncio.StreamWriter) -> Any:
        """Resume a migration out that paused after its handoff (after its automatic retries gave up)."""
        hosted = self.enclaves.get(req.name)
        if hosted is None:
            raise AgentError(f"no enclave named {req.name!r} on agent {self.host_id}")
        if hosted.status not in (S.FAILED, S.PAUSED, S.RESUMING) or not hosted.moving_to:
            raise AgentError(f"enclave {req.name!r} is {hosted.status.value}; it has no paused migration to resume")
        if hosted.status is not S.FAILED:
            raise AgentError(f"enclave {req.name!r} is reconnecting already")
        deadline, timeout = req.resume_deadline, req.timeout
        hosted.move(S.FAILED, S.PAUSED)
        t0 = time.time()
        result = await self._resume_out(hosted, max(deadline, 0.1), timeout,
                                        AgentError("resumed by request"),
                                        lambda info: writer.write(_progress_frame(info)))
        result["total_s"] = time.time() - t0
        return await self._moved_out(hosted, result)


def _progress_frame(info: dict) -> bytes:
    return encode(control.Progress(info))


def choose_tracker(wanted: str) -> tuple[str, str]:
    """The tracker this host will use for an incoming post-copy migration, and why."""
    if wanted not in TRACKERS:
        raise AgentError(f"unknown tracker {wanted!r}; known: {', '.join(TRACKERS)}")
    problem = preflight()
    if wanted == "fault":
        if problem:
            raise AgentError(f"the fault tracker cannot run on this host: {problem}")
        return "fault", "requested"
    if wanted == "access":
        return "access", "requested"
    if problem:
        return "access", f"auto: userfaultfd is not usable here ({problem})"
    return "fault", "auto: userfaultfd works here"


def _resume_request(path: Path, fds: list[int], timeout: float) -> None:
    """Hand a reconnect's connections to the enclave side that owns the stream (see resume_server.py)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(HANDSHAKE_TIMEOUT + 5)
    try:
        s.connect(str(path))
        reply = control.reply(FramedSocket(s).exchange(control.ResumeIn(timeout=timeout), fds))
    except (OSError, ConstmigError) as e:
        raise AgentError(f"the enclave takes no reconnect: {e}") from None
    finally:
        s.close()
    if not reply.ok:
        raise AgentError(reply.error)


def _open_data(addr: str, name: str, timeout: float, channel: str = "main", resume: int = 0) -> socket.socket:
    """Open one of the migration's data connections to the destination agent and wait for its go-ahead.

    `resume` (the number of connections) marks a reconnect of a paused migration."""
    sock = client.connect(addr, timeout)
    fs = FramedSocket(sock)
    try:
        fs.send(control.Data(name=name, timeout=timeout, channel=channel, resume=resume))
        reply = control.reply(fs.recv()[0])
    except ConstmigError:
        sock.close()
        raise
    if not reply.ok:
        sock.close()
        error = reply.error or "destination refused the data connection"
        raise NoReconnect(error) if resume and reply.gone else AgentError(error)
    sock.settimeout(None)
    return sock


async def run_agent(listen: str, state_dir: Path, host_id: str, ca_dir: Path,
                    metrics_listen: str | None = None, etcd: str | None = None, etcd_ttl: int = LEASE_TTL_S,
                    metrics_public: bool = False) -> None:
    agent = Agent(listen, state_dir, host_id, ca_dir, metrics_listen, etcd, etcd_ttl, metrics_public)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(agent.terminate(s.name)))
    await agent.serve_forever()
