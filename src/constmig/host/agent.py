"""The per-host agent: untrusted, asyncio. Launches enclaves, proxies calls, brokers migrations.

It never holds a key that opens enclave data: a migration's bytes go over a TCP connection that the
two agents set up between themselves and then hand, as a file descriptor, to the two enclaves.
One port serves clients, other agents, and migration data connections (the first frame says which);
admin requests need the local socket or mutual TLS on that port (host/admin.py says who may ask what).
Every request is decoded once, at dispatch, into its wire/control.py struct: an unknown op or a bad field
is refused in one line there, and the handlers read typed fields with control's defaults.

This module is the dispatcher: it sets the agent up, serves its connections, and sends each request to
the part that owns its concern. The parts share one Roster (what runs here):

* host/roster.py    the state folder's lock, the enclaves hosted here, what moved away or died;
* host/upkeep.py    this agent's entries in the fleet directory (etcd);
* host/calls.py     client calls: admission, holding them while an enclave moves;
* host/incoming.py  migrations in: prepared instances, data connections, reconnects, tombstones;
* host/outgoing.py  migrations out: preparing, sending, cancelling, reconnecting; what a failure leads to
                    is host/recovery.py's pure rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

from constmig import __version__
from constmig.errors import (
    AgentError,
    ChannelClosed,
    ConfigError,
    ConstmigError,
    EnclaveError,
    NoSuchEnclave,
    PastCommitPoint,
    ProtocolError,
    Redirect,
    SessionUnknown,
)
from constmig.files import checkpoint_owner
from constmig.host import admin, pki
from constmig.host.address import parse_addr
from constmig.host.calls import Calls
from constmig.host.directory import LEASE_TTL_S, parse_etcd_url
from constmig.host.fleetwork import FleetWork
from constmig.host.incoming import Incoming
from constmig.host.launcher import EnclaveHandle, LaunchSpec
from constmig.host.logs import fields
from constmig.host.metrics import AgentMetrics, HostFigures, death_reason
from constmig.host.outgoing import Outgoing
from constmig.host.recovery import restore_command
from constmig.host.roster import Hosted, Roster
from constmig.host.status import HOLDS_UNDELIVERED, STOPPABLE, StatusCell
from constmig.host.status import Status as S
from constmig.host.upkeep import Upkeep
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.units import available_memory, format_size
from constmig.wire import control
from constmig.wire.framing import read_frame, write_frame

log = logging.getLogger("constmig.agent")
SESSIONS_WAIT_S = 1.0  # a scrape waits this long for each enclave's count of open sessions
TERM_WAIT_S = 60.0  # a stopping agent waits this long for migrations past their commit point, and per checkpoint
TYPED_REFUSALS = (SessionUnknown, NoSuchEnclave, PastCommitPoint)  # refusals whose type the requester acts on


class Agent:
    def __init__(self, listen: str, state_dir: Path, host_id: str, ca_dir: Path,
                 metrics_listen: str | None = None, etcd: str | None = None, etcd_ttl: int = LEASE_TTL_S,
                 metrics_public: bool = False) -> None:
        self.listen = listen
        if etcd is not None:
            parse_etcd_url(etcd)
        self.etcd = etcd
        self.host_id = host_id
        state_dir = Path(state_dir).absolute()  # paths it reports (checkpoints) work from any folder
        self.roster = Roster(state_dir, host_id, listen)  # first: it locks the state folder
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
        self.roster.recall()  # what died with the previous agent here
        self._server: asyncio.base_events.Server | None = None
        self._stopping = asyncio.Event()
        self._terminating: str | None = None  # why the agent is stopping (a signal): it takes no new work
        self._loop: asyncio.AbstractEventLoop | None = None  # set at start: a scrape asks enclaves through it
        self.metrics = AgentMetrics(self.roster.rows, self.roster.outgoing, self._figures,
                                    {"host_id": host_id, "version": __version__, "tee": "sim"}, self._sessions)
        if metrics_listen is not None:
            try:
                log.info("metrics at %s", self.metrics.serve(metrics_listen, metrics_public))
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {metrics_listen}: {e.strerror or e}") from None
        self.upkeep = Upkeep(etcd, etcd_ttl, listen, self.roster, self._directory_info)
        self.calls = Calls(self.roster, self.metrics, host_id)
        self.incoming = Incoming(self.roster, self.upkeep, self.metrics, host_id, self._launch)
        self.outgoing = Outgoing(self.roster, self.upkeep, self.metrics, listen, self.tls)
        # drain marks and migration records in the store, carried out here (host/fleetwork.py)
        self.fleetwork = FleetWork(etcd, host_id, listen, self.roster, self.outgoing, self.tls, state_dir,
                                   lambda: self._terminating is not None) if etcd is not None else None

    @property
    def enclaves(self) -> dict[str, Hosted]:
        return self.roster.enclaves

    def _directory_info(self) -> dict[str, Any]:
        # state_dir and ca_dir: how to start this agent again, should it die (`constmig ls` says so)
        return {"host_id": self.host_id, "metrics_url": self.metrics.url, "state_dir": str(self.state_dir),
                "ca_dir": str(self.root_pem.parent.absolute())}

    def _figures(self) -> HostFigures:
        """The roster's figures for a scrape, and the fleet directory's health."""
        figures = self.roster.figures()
        upkeep = getattr(self, "upkeep", None)  # made after the metrics (its entry names their URL)
        figures.directory = upkeep.health() if upkeep is not None else None
        return figures

    def _sessions(self) -> dict[str, int]:
        """Open client sessions per running enclave, for a scrape (from its thread): the table lives in each
        enclave, so the scrape asks each one, bounded; an enclave that does not answer in time has no sample."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return {}

        async def ask() -> dict[str, int]:
            running = [(n, h) for n, h in list(self.enclaves.items()) if h.cell.value is S.RUNNING]
            answers = await asyncio.gather(*(asyncio.wait_for(h.handle.call(control.EnclaveStatus()), SESSIONS_WAIT_S)
                                             for _, h in running), return_exceptions=True)
            return {n: a["sessions"] for (n, _), a in zip(running, answers, strict=True)
                    if isinstance(a, dict) and isinstance(a.get("sessions"), int)}

        try:
            return asyncio.run_coroutine_threadsafe(ask(), loop).result(SESSIONS_WAIT_S + 1)
        except Exception:  # noqa: BLE001 (a scrape shows what it has; the agent's own work goes on)
            return {}

    async def _launch(self, spec: LaunchSpec, mode: str, tracker: str = "none",
                      restore: Path | None = None, release: str = "") -> EnclaveHandle:
        handle = await EnclaveHandle.launch(spec, mode, self.run_dir, self.platform_dir, self.root_pem, tracker,
                                            restore, release)
        handle.watcher = asyncio.ensure_future(self._watch_exit(handle))  # kept: the loop holds tasks weakly
        return handle

    async def _watch_exit(self, handle: EnclaveHandle) -> None:
        """An enclave process that exits without being asked to is logged at once, with its signal and the
        command that restores it from its newest checkpoint here (a crash after COMMIT is where an operator
        looks first; status and the metrics say it later)."""
        code = await handle.proc.wait()
        if handle.stopping:
            return
        name, pid = handle.spec.name, handle.proc.pid
        if code == 0:  # it ended itself (an incoming instance that gave up, say): not a death
            log.info("enclave %s (pid %d) exited", name, pid, extra=fields("enclave-exited", name, pid=pid))
            return
        reason = death_reason(code)
        restore = self.roster.restore_command(name)
        log.warning("enclave %s (pid %d) died: %s; %s", name, pid,
                    f"killed by {reason}" if code < 0 else f"exit code {code}",
                    f"restore it with: {restore}" if restore else "it has no checkpoint here",
                    extra=fields("enclave-died", name, reason=reason, pid=pid, restore=restore))

    # ---- lifecycle ----
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host, port = parse_addr(self.listen)
        try:
            self._local_server = await asyncio.start_unix_server(self._on_local, sock=admin.bind_local(self.admin_sock),
                                                                 start_serving=False)
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
        # listed before it answers (on either socket): whoever sees it answer finds it in the directory
        await self.upkeep.join()
        await self._local_server.start_serving()
        await self._server.start_serving()
        if self.fleetwork is not None:
            await self.fleetwork.start()

    async def serve_forever(self) -> None:
        await self.start()
        log.info("agent %s listening on %s", self.host_id, self.listen,
                 extra=fields("listening", listen=self.listen, metrics_url=self.metrics.url))
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
                    await self.outgoing.cancel(hosted, f"the source agent is stopping ({why})")
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
                    folder=str(self.roster.checkpoints), name=name, final=True)), TERM_WAIT_S)
                log.warning("enclave %s checkpointed to %s; after a restart: %s", name, done["path"],
                            restore_command(done["path"], self.listen, name))
                await self.upkeep.sealed(name, str(done["path"]))
            except (ConstmigError, TimeoutError) as e:
                log.error("enclave %s could not be checkpointed (%s): it dies with the agent", name, e or "timed out")
        self._stopping.set()

    async def close(self) -> None:
        self.metrics.close()
        if self.fleetwork is not None:
            await self.fleetwork.stop()
        await self.upkeep.leave()  # this agent drops out of the fleet at once, not when its lease runs out
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
                    await self.incoming.on_data(req, writer)
                    return
                watcher = asyncio.create_task(self.outgoing.cancel_when_gone(reader, req.name)) \
                    if isinstance(req, control.Migrate) else None
                try:
                    reply = control.ok(await self._dispatch(req, writer))
                except Redirect as r:
                    reply = control.refused(str(r), redirect=r.location)
                except ConstmigError as e:  # a migration that began logged how it ended (outgoing._ended)
                    reply = control.refused(str(e), **({"kind": type(e).__name__}
                                                      if isinstance(e, TYPED_REFUSALS) else {}))
                finally:
                    if watcher is not None:  # gone before the next read: one reader at a time
                        watcher.cancel()
                        await asyncio.gather(watcher, return_exceptions=True)
                self.roster.save()
                await write_frame(writer, reply)
        except ProtocolError as e:
            log.warning("dropping connection: %s", e)
        except ChannelClosed:
            pass
        except asyncio.CancelledError:
            pass  # the agent is shutting down; ending quietly keeps asyncio from logging it as an error
        finally:
            writer.close()

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

    # ---- operations: the agent's own ----
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
            if hosted.status is S.EXITED:  # its process is gone: what brings it back here, if anything
                info["restore"] = self.roster.restore_command(name)
            if hosted.release and hosted.status in (S.PAUSED, S.RESUMING, S.FAILED):
                info["recovery"] = self.outgoing.restore_advice(name, hosted.moving_to, hosted.release)
            out[name] = info
        return control.AgentStatus(
            host_id=self.host_id, listen=self.listen, enclaves=out, moved=dict(self.roster.moved),
            migrations=self.roster.history[-20:], died=dict(self.roster.died), metrics_url=self.metrics.url,
            directory=self.etcd,
            admin={"socket": str(self.admin_sock), "certificate": str(self.tls.folder),
                   "expires": f"{self.tls.not_after:%Y-%m-%d %H:%M} UTC"},
            memory={"available": available_memory(), "promised": self.roster.promised()},
            outgoing=self.roster.outgoing())

    async def op_run(self, req: control.Run, writer: Any) -> Any:
        spec = req.spec()
        await self.roster.clear_tombstone(spec.name)
        self.roster.check_new(spec)
        await self.upkeep.check_free(spec.name)
        self.roster.moved.pop(spec.name, None)
        handle = await self._launch(spec, "fresh")
        self.enclaves[spec.name] = Hosted(handle, StatusCell(S.RUNNING))
        await self.upkeep.claim(spec.name)
        log.info("enclave %s started: app %s, heap %s, pid %d", spec.name, spec.app, format_size(spec.heap),
                 handle.proc.pid, extra=fields("enclave-started", spec.name, app=spec.app, heap_bytes=spec.heap))
        return await handle.call(control.EnclaveStatus())

    async def op_checkpoint(self, req: control.Checkpoint, writer: Any) -> Any:
        """Have the enclave seal its state into this agent's checkpoint folder (see enclave/persist.py)."""
        hosted = self.roster.get(req.name)
        if hosted.status is not S.RUNNING:
            raise AgentError(f"enclave {req.name!r} is {hosted.status.value}; cannot checkpoint it now")
        done = await hosted.handle.call(control.Seal(folder=str(self.roster.checkpoints), name=hosted.name))
        await self.upkeep.sealed(hosted.name, str(done["path"]))
        return done

    async def op_restore(self, req: control.Restore, writer: Any) -> Any:
        """Start an enclave from a sealed checkpoint; the enclave itself refuses a stale or foreign one.
        (A release code is 64 hex digits: control.Restore checked it as it was decoded.)"""
        from constmig.enclave.persist import read_header

        path = Path(req.path)
        header = read_header(path)
        spec = LaunchSpec(req.name or checkpoint_owner(path), header.app, header.heap,
                          header.chunk_size, dict(header.config), header.plain_calls)
        await self.roster.clear_tombstone(spec.name)
        self.roster.check_new(spec)
        await self.upkeep.check_free(spec.name)
        self.roster.moved.pop(spec.name, None)
        handle = await self._launch(spec, "restore", restore=path.resolve(), release=req.release)
        self.enclaves[spec.name] = Hosted(handle, StatusCell(S.RUNNING))
        await self.upkeep.claim(spec.name)
        return await handle.call(control.EnclaveStatus())

    async def op_stop(self, req: control.Stop, writer: Any) -> Any:
        name = req.name
        hosted = self.enclaves.get(name) if req.force else None
        hosted = hosted or self.roster.get(name)
        status = hosted.status
        if status in HOLDS_UNDELIVERED and not req.force:
            raise AgentError(f"enclave {name!r} is {status.value}: it holds heap data its migration has not "
                             "delivered; stopping it loses that data (use --force if that is what you want)")
        if status not in STOPPABLE:
            raise AgentError(f"enclave {name!r} is {status.value}; cannot stop it now")
        del self.enclaves[hosted.name]
        await hosted.handle.stop()
        await self.upkeep.release(hosted.name)
        log.info("enclave %s stopped", name, extra=fields("enclave-stopped", name))
        return "stopped"

    async def op_shutdown(self, req: control.Shutdown, writer: Any) -> Any:
        self._stopping.set()
        return "shutting down"

    # ---- operations: client calls (host/calls.py) ----
    async def op_call(self, req: control.Call, writer: Any) -> Any:
        """An unsealed ECALL (only enclaves launched with --plain-calls take it)."""
        return await self.calls.admit(req.name, control.Ecall(name=req.method, args=req.args, kwargs=req.kwargs))

    async def op_session_open(self, req: control.SessionOpen, writer: Any) -> Any:
        """A client opens an attested session with an enclave: its Hello in, the enclave's Accept out.
        The agent forwards bytes it can neither read nor forge (wire/session.py)."""
        return await self.calls.admit(req.name, control.EnclaveSessionOpen(hello=req.hello))

    async def op_session_call(self, req: control.SessionCall, writer: Any) -> Any:
        """One sealed request of a client's session, forwarded like a call (and redirected like one)."""
        return await self.calls.admit(req.name, control.EnclaveSessionCall(record=req.record))

    # ---- operations: migrations in (host/incoming.py) ----
    async def op_prepare_in(self, req: control.PrepareIn, writer: Any) -> control.PrepareInResult:
        return await self.incoming.prepare(req)

    async def op_drop_in(self, req: control.DropIn, writer: Any) -> Any:
        return await self.incoming.drop(req)

    # ---- operations: migrations out (host/outgoing.py) ----
    async def op_migrate(self, req: control.Migrate, writer: asyncio.StreamWriter) -> Any:
        return await self.outgoing.migrate(req, writer)

    async def op_cancel(self, req: control.Cancel, writer: Any) -> control.CancelResult:
        return await self.outgoing.cancel_request(req)

    async def op_resume(self, req: control.Resume, writer: asyncio.StreamWriter) -> Any:
        return await self.outgoing.resume(req, writer)


async def run_agent(listen: str, state_dir: Path, host_id: str, ca_dir: Path,
                    metrics_listen: str | None = None, etcd: str | None = None, etcd_ttl: int = LEASE_TTL_S,
                    metrics_public: bool = False) -> None:
    agent = Agent(listen, state_dir, host_id, ca_dir, metrics_listen, etcd, etcd_ttl, metrics_public)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(agent.terminate(s.name)))
    await agent.serve_forever()
