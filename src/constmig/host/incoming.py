"""Migrations into this host: an empty instance prepared for another agent, the data connections handed to
it, the reconnects of a paused migration passed to its resume socket, and the tombstone of an instance that
gave a migration up after READY.

The agent never reads what flows on a data connection: it pauses reading, duplicates the socket's file
descriptor and passes it to the enclave (or, for a reconnect, to whoever owns the stream behind
`<enclave>.resume.sock`), so no byte of the enclave protocol is ever buffered here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from constmig.errors import AgentError, ConstmigError, EnclaveError
from constmig.host.launcher import EnclaveHandle, LaunchSpec
from constmig.host.logs import fields
from constmig.host.metrics import AgentMetrics
from constmig.host.roster import Hosted, Roster
from constmig.host.status import TAKES_RECONNECT, StatusCell
from constmig.host.status import Status as S
from constmig.host.upkeep import Upkeep
from constmig.kernel.uffd import preflight
from constmig.migration import strategies
from constmig.migration.constants import DATA_CHANNELS
from constmig.migration.resume import HANDSHAKE_TIMEOUT
from constmig.wire import control
from constmig.wire.framing import FramedSocket, write_frame

log = logging.getLogger("constmig.agent")
TRACKERS = control.AGENT_TRACKERS
TOMBSTONE_S = 3600.0  # how long a destination that gave up after READY keeps answering reconnects with ABORT

Launch = Callable[..., Awaitable[EnclaveHandle]]  # (spec, mode, tracker=...) -> a started enclave


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


class Incoming:
    """The destination side of migrations into the enclaves in `roster`."""

    def __init__(self, roster: Roster, upkeep: Upkeep, metrics: AgentMetrics, host_id: str, launch: Launch) -> None:
        self.roster, self.upkeep, self.metrics, self.host_id, self.launch = roster, upkeep, metrics, host_id, launch

    async def prepare(self, req: control.PrepareIn) -> control.PrepareInResult:
        """Another agent wants to migrate an enclave here: start an empty instance of it."""
        spec: LaunchSpec = req.spec
        strategy = strategies.get(req.strategy)
        tracker, reason = choose_tracker(req.tracker) if strategy.needs_tracker else \
            ("none", f"{strategy.name} needs no tracker")
        await self.roster.clear_tombstone(spec.name)
        self.roster.check_new(spec)
        handle = await self.launch(spec, "incoming", tracker)
        hosted = Hosted(handle, StatusCell(S.INCOMING), connections=strategy.connections,
                        resume_deadline=req.resume_deadline, came_from=req.source, strategy=strategy.name)
        self.roster.enclaves[spec.name] = hosted
        wait = req.timeout  # a source that never connects frees the name
        asyncio.get_running_loop().call_later(wait, lambda: asyncio.ensure_future(self.drop_unconnected(
            hosted, f"no data connection came within {wait:g} s")))
        return control.PrepareInResult(host_id=self.host_id, tracker=tracker, tracker_reason=reason)

    async def drop(self, req: control.DropIn) -> str:
        """The source gave up before sending any data (cancelled, failed): drop the empty instance prepared
        here, which holds nothing of the enclave."""
        name = req.name
        hosted = self.roster.enclaves.get(name)
        if hosted is None or hosted.status is not S.INCOMING or hosted.receiving:
            raise AgentError(f"no prepared, unconnected incoming enclave named {name!r} here")
        await self.drop_unconnected(hosted, "its source gave up")
        return "dropped"

    async def drop_unconnected(self, hosted: Hosted, why: str) -> None:
        name = hosted.name
        if self.roster.enclaves.get(name) is not hosted or hosted.status is not S.INCOMING or hosted.receiving:
            return
        del self.roster.enclaves[name]
        for fd in hosted.data_fds.values():
            os.close(fd)
        hosted.data_fds = {}
        await hosted.handle.stop()
        log.info("incoming enclave %s dropped before any data came: %s", name, why)

    # ---- data connections ----
    async def on_data(self, req: control.Data, writer: asyncio.StreamWriter) -> None:
        """Hand this connection to the incoming enclave: from now on only ciphertext flows on it."""
        if req.resume:
            await self._on_resume_data(req, writer)
            return
        name, channel = req.name, req.channel
        hosted = self.roster.enclaves.get(name)
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
            asyncio.create_task(self._run(hosted, fds, req.timeout))

    async def _on_resume_data(self, req: control.Data, writer: asyncio.StreamWriter) -> None:
        """A reconnect of a paused migration into an enclave here: pass the connections to its resume socket."""
        name, channel = req.name, req.channel
        hosted = self.roster.enclaves.get(name)
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
            log.warning("reconnect of %s failed: %s", hosted.name, e)
        finally:
            for fd in fds:
                os.close(fd)

    async def _run(self, hosted: Hosted, fds: list[int], timeout: float) -> None:
        name = hosted.name
        try:  # the enclave checks the timeout the source's agent asked for
            result = await hosted.handle.call(control.MigrateIn(timeout=timeout, commit_wait=hosted.resume_deadline),
                                              fds=fds)
            hosted.move(S.INCOMING, S.RUNNING)
            self.roster.moved.pop(name, None)  # it came back: calls are ours again
            await self.upkeep.claim(name)
            self.roster.history.append({"name": name, "direction": "in", **result, "outcome": "done"})
            self.metrics.finished("in", result)
            log.info("migration of %s in done: %s, downtime %.1f ms", name, result.get("strategy"),
                     result.get("downtime_ms") or 0.0,
                     extra=fields("migration-ended", name, direction="in", came_from=hosted.came_from,
                                  strategy=result.get("strategy"), outcome="done",
                                  downtime_ms=result.get("downtime_ms")))
        except ConstmigError as e:
            # given up here: the source rolls back or resumes; this copy never runs (one word: failed)
            self.roster.history.append({"name": name, "direction": "in", "strategy": hosted.strategy,
                                        "outcome": "failed", "error": str(e), "ended": time.time()})
            self.metrics.ended("in", hosted.strategy, "failed")
            log.warning("migration of %s in ended failed: %s", name, e,
                        extra=fields("migration-ended", name, direction="in", came_from=hosted.came_from,
                                     strategy=hosted.strategy, outcome="failed"))
            if isinstance(e, EnclaveError) and e.tombstone:
                # It gave up after READY: the source may be committed and reconnecting; the process
                # (its heap wiped) answers that with an authenticated ABORT, so the source runs again.
                hosted.move(S.INCOMING, S.ABORTED)
                asyncio.get_running_loop().call_later(TOMBSTONE_S, lambda: asyncio.ensure_future(
                    self._clear_tombstone_if(hosted)))
            else:
                self.roster.enclaves.pop(name, None)
                await hosted.handle.stop()
        finally:
            for fd in fds:
                os.close(fd)
            hosted.settled.set()

    async def _clear_tombstone_if(self, hosted: Hosted) -> None:
        if self.roster.enclaves.get(hosted.name) is hosted and hosted.status is S.ABORTED:
            await self.roster.clear_tombstone(hosted.name)


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

