"""Migrations out of this host: the destination prepared, the data connections opened and handed to the
enclave, a cancel before the commit point, and what follows a failure.

What to do after a failure is host/recovery.py's pure rule (roll back, pause and reconnect, fail, or
stranded); this module gathers what it needs to know and carries the answer out: the agent's status,
where callers are sent, the fleet directory, the metrics, and the one-line error the requester sees, with
the command that retries or restores where there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from constmig.enclave.lifecycle import Life
from constmig.errors import (
    AgentError,
    ConstmigError,
    EnclaveError,
    MigrationCancelled,
    NoReconnect,
    PastCommitPoint,
)
from constmig.host import client, pki, recovery
from constmig.host.address import parse_addr
from constmig.host.logs import fields
from constmig.host.metrics import AgentMetrics
from constmig.host.recovery import Action, Cause, Failure
from constmig.host.roster import Hosted, Roster
from constmig.host.status import Status as S
from constmig.host.upkeep import Upkeep
from constmig.migration import strategies
from constmig.migration.constants import DATA_CHANNELS
from constmig.migration.resume import HANDSHAKE_TIMEOUT
from constmig.wire import control
from constmig.wire.framing import FramedSocket, encode

log = logging.getLogger("constmig.agent")
STATUS_WAIT_S = 10.0  # a small request to another agent (drop a prepared instance)
CANCEL_WAIT_S = 10.0  # a cancelled migration rolls back within this (its waits end when its connections shut)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 2.0  # between reconnects of a paused migration (doubling)

# What a rollback or a failure moves the agent's status from, whichever step it came in.
ROLL_BACK_FROM = (S.PREPARING_OUT, S.MIGRATING_OUT, S.HANDED_OFF, S.PAUSED, S.RESUMING)
FAIL_FROM = (S.MIGRATING_OUT, S.HANDED_OFF, S.PAUSED, S.RESUMING)

OnProgress = Callable[[dict], None]


def progress_frame(info: dict) -> bytes:
    return encode(control.Progress(info))


# what a migration that ended short of DONE had reached, kept in its history entry (its figures never came)
LAST_SEEN = ("phase", "round", "left_bytes", "throttle", "held_calls", "held_s")


def seen(was: control.OutgoingProgress, info: dict) -> control.OutgoingProgress:
    """A migration out's progress after one more of its enclave's frames (`info`): what is left to send
    (of the round or phase running, or, at a round's end, what that round left), the last round's write
    and acknowledged rates and throttle, and the time what is left takes at that rate. A frame's figure
    that is missing or not a number changes nothing."""
    def number(key: str) -> float | None:
        value = info.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    phase = str(info.get("phase", ""))[:32]
    changes: dict[str, Any] = {"phase": phase}
    if (n := number("round")) is not None:
        changes["round"] = int(n)
    if (t := number("throttle")) is not None:
        changes["throttle"] = t
    if phase == "round_end":
        if (left := number("left")) is not None:
            changes["left_bytes"] = int(left)
        if (dirty := number("dirty_rate")) is not None:
            changes["dirty_bytes_per_s"] = dirty
        if (rate := number("rate")) is not None:
            changes["ack_bytes_per_s"] = rate
        if (calls := number("held_calls")) is not None:
            changes["held_calls"] = int(calls)
        if (held := number("held_s")) is not None:
            changes["held_s"] = held
    elif (done := number("done")) is not None and (total := number("total")) is not None:
        changes["left_bytes"] = int(max(total - done, 0))
    now = msgspec.structs.replace(was, **changes)
    eta = now.left_bytes / now.ack_bytes_per_s if now.left_bytes is not None and now.ack_bytes_per_s else None
    return msgspec.structs.replace(now, eta_s=None if eta is None else round(eta, 3))


@dataclass
class Departure:
    """One migration out while it runs: what its steps share."""

    hosted: Hosted
    to: str
    strategy: str
    timeout: float
    deadline: float  # how long it may reconnect if it pauses past its commit point (0: it may not)
    t0: float = 0.0  # when preparing began (the requester's wait; the enclave times its own part)
    t_prepared: float = 0.0
    prep: control.PrepareInResult | None = None
    prepared: bool = False  # the destination holds an instance no data connection has reached: drop it if we stop
    socks: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


class Outgoing:
    """The source side of migrations of the enclaves in `roster`."""

    def __init__(self, roster: Roster, upkeep: Upkeep, metrics: AgentMetrics, listen: str,
                 tls: pki.Identity) -> None:
        self.roster, self.upkeep, self.metrics, self.listen, self.tls = roster, upkeep, metrics, listen, tls

    # ---- a migration out ----
    async def migrate(self, req: control.Migrate, writer: asyncio.StreamWriter) -> dict[str, Any]:
        """Move the enclave to `req.to`: its figures, or the one-line error of a rollback or a failure
        (recovery.decide says which). Its strategy, tracker, stream options and waits were checked as it
        was decoded."""
        hosted = self.roster.get(req.name)
        if hosted.status is not S.RUNNING:
            raise AgentError(f"enclave {req.name!r} is {hosted.status.value}; cannot migrate it now")
        if parse_addr(req.to) == parse_addr(self.listen):
            raise AgentError(f"enclave {req.name!r} already runs on this agent ({self.listen}); migrate it "
                             "--to another agent")
        hosted.move(S.RUNNING, S.PREPARING_OUT)  # still serving calls while the destination gets ready
        hosted.settled = asyncio.Event()
        hosted.cancel, hosted.cancelled, hosted.token = None, asyncio.Event(), os.urandom(8).hex()
        log.info("migration of %s to %s started: %s", hosted.name, req.to, req.strategy,
                 extra=fields("migration-started", hosted.name, migration=hosted.token, direction="out", to=req.to,
                              strategy=req.strategy))
        try:  # the enclave's own gate, asked before a destination is prepared (it asks itself again at the stop)
            await hosted.handle.call(control.CheckExport(what="migrate"))
        except ConstmigError as e:
            hosted.move(S.PREPARING_OUT, S.RUNNING)
            hosted.settled.set()
            raise AgentError(str(e)) from None
        out = Departure(hosted, req.to, req.strategy, req.timeout, req.resume_deadline)
        hosted.outgoing = control.OutgoingProgress(to=req.to, strategy=req.strategy, started=time.time(),
                                                   data_plane=req.data_plane)
        on_progress = self._progress(out, writer)
        try:
            try:
                result = await self._send(out, req, on_progress)
            except ConstmigError as e:
                result = await self._after_failure(out, e, on_progress)
        except BaseException as e:
            self._ended(hosted, e)
            raise
        finally:
            out.close()
        # The enclave timed attestation to DONE; the user waited for the whole thing, preparation included.
        assert out.prep is not None  # a migration that got this far had its destination prepared
        result["migrate_s"] = result.pop("total_s")
        result["prepare_s"] = out.t_prepared - out.t0
        result["total_s"] = time.time() - out.t0
        result.update({"from": self.listen, "to": out.to, "name": hosted.name,
                       "tracker_reason": out.prep.tracker_reason})
        return await self._moved_out(hosted, result)

    def _progress(self, out: Departure, writer: asyncio.StreamWriter) -> OnProgress:
        """The callback for the enclave's progress frames (from the worker thread that waits for its answer)."""
        return functools.partial(self._on_progress, out, writer, asyncio.get_running_loop())

    def _on_progress(self, out: Departure, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop,
                     info: dict) -> None:
        """Passed on to the requester and kept for `status` and the metrics; two frames are the agent's own
        business."""
        if info.get("phase") == "lineage_released":  # for the operator, should the destination die now
            out.hosted.release = str(info.get("release", ""))
            return
        if info.get("phase") == "handed_off":
            loop.call_soon_threadsafe(self._handed_off, out)
        loop.call_soon_threadsafe(self._seen, out.hosted, info)
        loop.call_soon_threadsafe(writer.write, progress_frame(info))

    @staticmethod
    def _seen(hosted: Hosted, info: dict) -> None:
        """The latest progress of a migration out (a frame after its end, which cannot come, changes nothing)."""
        if hosted.outgoing is not None:
            hosted.outgoing = seen(hosted.outgoing, info)

    def _ended(self, hosted: Hosted, error: BaseException) -> None:
        """A migration out ended short of DONE: its progress goes, and its one outcome word (metrics.OUTCOMES:
        the enclave runs here again after a rollback or a cancel, or it failed or is stranded) goes alike into
        the history, the metrics and the log."""
        progress, hosted.outgoing = hosted.outgoing, None
        ending, hosted.ending = hosted.ending, ""
        if progress is None:
            return
        outcome = ("cancelled" if hosted.cancel is not None else "rolled-back") if hosted.status is S.RUNNING \
            else ending or "failed"
        self.metrics.ended("out", progress.strategy, outcome)
        log.warning("migration of %s to %s ended %s: %s", hosted.name, progress.to, outcome,
                    str(error) or type(error).__name__,
                    extra=fields("migration-ended", hosted.name, migration=hosted.token, direction="out",
                                 to=progress.to, strategy=progress.strategy, outcome=outcome))
        now = time.time()
        self.roster.history.append({"direction": "out", "name": hosted.name, "to": progress.to,
                                    "strategy": progress.strategy, "outcome": outcome,
                                    "total_s": round(now - progress.started, 3), "ended": now,
                                    "error": str(error) or type(error).__name__,
                                    **{k: v for k in LAST_SEEN if (v := getattr(progress, k)) is not None}})

    def _handed_off(self, out: Departure) -> None:
        """Past the commit point the destination runs the app: send callers there right away."""
        if out.hosted.move(S.MIGRATING_OUT, S.HANDED_OFF):
            self.roster.moved[out.hosted.name] = out.to
            out.hosted.settled.set()
            asyncio.ensure_future(self.upkeep.moved(out.hosted, out.to))

    async def _send(self, out: Departure, req: control.Migrate, on_progress: OnProgress) -> dict[str, Any]:
        """Prepare the destination, open the data connections, and have the enclave migrate over them."""
        hosted, spec = out.hosted, out.hosted.handle.spec
        out.t0 = out.t_prepared = time.time()
        out.prep = control.result(await self._unless_cancelled(hosted, asyncio.to_thread(functools.partial(
            client.request, identity=self.tls), out.to, control.PrepareIn(
                spec=spec, strategy=out.strategy, source=self.listen, tracker=req.tracker,
                resume_deadline=out.deadline, timeout=out.timeout), None, out.timeout),
            undo=lambda _: self._drop_prepared(out)), control.PrepareInResult)
        out.prepared = True
        for channel in DATA_CHANNELS[:strategies.get(out.strategy).connections]:
            out.socks.append(await self._unless_cancelled(hosted, asyncio.to_thread(
                open_data, out.to, spec.name, out.timeout, channel), undo=lambda sock: sock.close()))
        out.t_prepared = time.time()
        if hosted.cancelled.is_set():
            raise MigrationCancelled(f"cancelled: {hosted.cancel}")
        # Calls go on until the enclave stops (after its handshake); then they wait for the outcome.
        hosted.move(S.PREPARING_OUT, S.MIGRATING_OUT)
        out.prepared = False  # from here the enclaves' own protocol ends the destination's instance
        return await hosted.handle.call(control.MigrateOut(
            strategy=out.strategy, timeout=out.timeout, token=hosted.token, max_bandwidth=req.max_bandwidth,
            # the pre-copy rounds of precopy and hybrid, and their write tracking: by default the
            # destination tracker's
            tracker=out.prep.tracker, max_downtime=req.max_downtime, max_rounds=req.max_rounds,
            write_tracking=req.write_tracking, max_throttle=req.max_throttle,
            completion_timeout=req.completion_timeout, data_plane=req.data_plane),
            fds=[s.fileno() for s in out.socks], on_progress=on_progress)

    async def _after_failure(self, out: Departure, e: ConstmigError, on_progress: OnProgress) -> dict[str, Any]:
        """The migration failed: roll back or fail (raising what the requester sees), or, past its commit
        point, pause and reconnect (the result, if a reconnect finishes it)."""
        hosted = out.hosted
        action = recovery.decide(replace(_failure(e, hosted), resume_deadline=out.deadline, time_left=out.deadline))
        if action is not Action.PAUSE:
            raise self._settle(hosted, action, e, departure=out) from None
        # Past the commit point: the source keeps every chunk; reconnect until the deadline.
        hosted.move((S.MIGRATING_OUT, S.HANDED_OFF), S.PAUSED)
        hosted.moving_to, hosted.strategy = out.to, out.strategy
        hosted.settled.set()
        out.close()
        return await self._reconnect(hosted, out.deadline, out.timeout, str(e), on_progress)

    async def _reconnect(self, hosted: Hosted, deadline: float, timeout: float, first: str,
                         on_progress: OnProgress | None) -> dict[str, Any]:
        """Reconnect a paused migration with backoff until it finishes or `deadline` seconds pass."""
        name, to = hosted.name, hosted.moving_to
        n = strategies.get(hosted.strategy).connections
        t_end = time.monotonic() + deadline
        delay, attempts, no_copy = FIRST_BACKOFF_S, 0, 0
        failure = Failure(Cause.AGENT, hosted.status, reconnecting=True, resume_deadline=deadline)  # none tried yet
        last: ConstmigError = AgentError(first)
        while True:
            left = t_end - time.monotonic()
            action = recovery.decide(replace(failure, time_left=left))
            if action is not Action.PAUSE:
                raise self._settle(hosted, action, last, tries=(deadline, attempts)) from None
            hosted.move(S.RESUMING, S.PAUSED)  # after a failed attempt
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, MAX_BACKOFF_S)
            attempts += 1
            socks: list[socket.socket] = []
            try:
                for channel in DATA_CHANNELS[:n]:
                    socks.append(await asyncio.to_thread(open_data, to, name, min(HANDSHAKE_TIMEOUT, left),
                                                         channel, n))
                hosted.move(S.PAUSED, S.RESUMING)
                result = await hosted.handle.call(control.ResumeOut(timeout=timeout),
                                                  fds=[s.fileno() for s in socks], on_progress=on_progress)
                result.update({"from": self.listen, "to": to, "name": name})
                return result
            except NoReconnect as e:
                no_copy += 1
                failure, last = Failure(Cause.NO_COPY, hosted.status, reconnecting=True, resume_deadline=deadline,
                                        no_copy_answers=no_copy), e
            except ConstmigError as e:
                no_copy = 0
                failure, last = replace(_failure(e, hosted), reconnecting=True, resume_deadline=deadline), e
            finally:
                for s in socks:
                    s.close()

    def _settle(self, hosted: Hosted, action: Action, error: ConstmigError, departure: Departure | None = None,
                tries: tuple[float, int] = (0.0, 0)) -> AgentError:
        """Carry out every action but PAUSE; the error the requester then sees. `departure`: the failure is
        the migration's own (before any reconnect), with metrics and perhaps a prepared destination to see
        to; `tries`: a reconnect's deadline and attempts."""
        name = hosted.name
        if action is Action.ROLL_BACK:
            hosted.move(ROLL_BACK_FROM, S.RUNNING)
            hosted.moving_to = ""
            self.roster.moved.pop(name, None)
            hosted.settled.set()
            if departure is None:  # the destination proved it never ran it (authenticated ABORT)
                return AgentError(str(error))
            if departure.prepared:
                self._drop_prepared(departure)
            if hosted.cancel is not None:
                log.info("migration of %s cancelled before its commit point: it runs on here", name)
                return AgentError(f"migration of {name!r} cancelled before its commit point ({hosted.cancel}); it "
                                  f"keeps running on {self.listen} with all its data")
            return AgentError(str(error))
        # handed off (or unknown): it never runs here again, and keeps its state
        hosted.move(FAIL_FROM, S.FAILED)
        hosted.settled.set()
        if departure is not None:
            return AgentError(str(error))
        to = hosted.moving_to
        if action is Action.STRANDED:
            hosted.ending = "stranded"
            advice = self.restore_advice(name, to, hosted.release)
            return AgentError(recovery.stranded_message(name, to, str(error), advice))
        if action is Action.OUT_OF_TIME:
            deadline, attempts = tries
            advice = self.restore_advice(name, to, hosted.release)
            return AgentError(recovery.out_of_time_message(name, to, self.listen, deadline, attempts, str(error),
                                                           advice))
        return AgentError(f"migration of {name!r} cannot be resumed: {error}")

    def restore_advice(self, name: str, to: str, release: str) -> str:
        """How the newest checkpoint here restores the enclave on `to` (recovery.restore_advice)."""
        return recovery.restore_advice(name, to, release, self.roster.newest_checkpoint(name))

    async def _moved_out(self, hosted: Hosted, result: dict[str, Any]) -> dict[str, Any]:
        name = hosted.name
        log.info("migration of %s to %s done: %s, downtime %.1f ms, total %.2f s", name, result.get("to"),
                 result.get("strategy"), result.get("downtime_ms") or 0.0, result.get("total_s") or 0.0,
                 extra=fields("migration-ended", name, migration=hosted.token, direction="out", to=result.get("to"),
                              strategy=result.get("strategy"), outcome="done",
                              downtime_ms=result.get("downtime_ms")))
        hosted.outgoing = None
        self.roster.history.append({"direction": "out", **result, "outcome": "done", "ended": time.time()})
        self.metrics.finished("out", result)
        self.roster.enclaves.pop(name, None)
        self.roster.moved[name] = result["to"]
        hosted.settled.set()
        await hosted.handle.stop()
        await self.upkeep.moved(hosted, result["to"])  # if the handoff's update did not happen
        return result

    async def resume(self, req: control.Resume, writer: asyncio.StreamWriter) -> dict[str, Any]:
        """Resume a migration out that paused after its handoff (after its automatic retries gave up)."""
        hosted = self.roster.enclaves.get(req.name)
        if hosted is None:
            raise AgentError(f"no enclave named {req.name!r} on agent {self.roster.host_id}")
        if hosted.status not in (S.FAILED, S.PAUSED, S.RESUMING) or not hosted.moving_to:
            raise AgentError(f"enclave {req.name!r} is {hosted.status.value}; it has no paused migration to resume")
        if hosted.status is not S.FAILED:
            raise AgentError(f"enclave {req.name!r} is reconnecting already")
        hosted.move(S.FAILED, S.PAUSED)
        t0 = time.time()
        hosted.outgoing = control.OutgoingProgress(to=hosted.moving_to, strategy=hosted.strategy, started=t0,
                                                   phase="resuming")

        loop = asyncio.get_running_loop()

        def on_progress(info: dict) -> None:  # from the thread that waits for the enclave's answer
            loop.call_soon_threadsafe(self._seen, hosted, info)
            writer.write(progress_frame(info))

        try:
            result = await self._reconnect(hosted, max(req.resume_deadline, 0.1), req.timeout, "resumed by request",
                                           on_progress)
        except BaseException as e:
            self._ended(hosted, e)
            raise
        result["total_s"] = time.time() - t0
        return await self._moved_out(hosted, result)

    # ---- cancelling before the commit point ----
    async def cancel_request(self, req: control.Cancel) -> control.CancelResult:
        """Cancel a migration out of here that has not reached its commit point; the enclave runs on here."""
        hosted = self.roster.enclaves.get(req.name)
        if hosted is None:
            if req.name in self.roster.moved:
                raise PastCommitPoint(f"the migration of {req.name!r} is over: it runs on "
                                      f"{self.roster.moved[req.name]}; a finished migration cannot be undone "
                                      "(migrate it back)")
            raise AgentError(f"no enclave named {req.name!r} on this agent")
        return await self.cancel(hosted, req.reason or control.CANCEL_REASON)

    async def cancel(self, hosted: Hosted, reason: str) -> control.CancelResult:
        name = hosted.name
        status = hosted.status
        if status in (S.HANDED_OFF, S.PAUSED):
            raise PastCommitPoint(f"the migration of {name!r} passed its commit point (the destination runs it); "
                                  "it cannot be undone and goes on")
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
                late = isinstance(e, EnclaveError) and e.state is Life.HANDED_OFF
                raise (PastCommitPoint if late else AgentError)(
                    f"cannot cancel the migration of {name!r}: {e}") from None
        try:  # the migration's own error path rolls it back; wait for that, boundedly
            await asyncio.wait_for(hosted.settled.wait(), CANCEL_WAIT_S)
        except TimeoutError:
            raise AgentError(f"the migration of {name!r} was told to stop but has not yet; it rolls back when "
                             "what it waits for ends (see status)") from None
        if hosted.status is not S.RUNNING:
            raise PastCommitPoint(f"the migration of {name!r} reached its commit point before the cancel; it goes "
                                  f"on (it is {hosted.status.value})")
        return control.CancelResult(cancelled=True, name=name, state=Life.RUNNING, on=self.listen)

    async def cancel_when_gone(self, reader: asyncio.StreamReader, name: str) -> None:
        """The command that asked for a migration went away (killed, disconnected): a migration nobody
        watches is cancelled if it has not reached its commit point (past it, it goes on)."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await reader.read(4096):
                pass  # nothing more is expected on this connection until the answer
        hosted = self.roster.enclaves.get(name)
        if hosted is not None and hosted.status in (S.PREPARING_OUT, S.MIGRATING_OUT):
            try:
                await self.cancel(hosted, "the command that started it went away")
            except ConstmigError as e:
                log.info("migration of %s goes on without the command that started it: %s", name, e)

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

    def _drop_prepared(self, out: Departure) -> None:
        """The destination holds an empty instance nobody will use: ask it to drop that now."""
        asyncio.ensure_future(self._drop_remote(out.to, out.hosted.name))

    async def _drop_remote(self, to: str, name: str) -> None:
        try:
            await asyncio.to_thread(client.request, to, control.DropIn(name=name), None, STATUS_WAIT_S, self.tls)
        except ConstmigError as e:
            log.info("the destination %s keeps its prepared instance of %s until it times out: %s", to, name, e)


def _failure(e: ConstmigError, hosted: Hosted) -> Failure:
    """What an error says about where the enclave is: its own answer, or nothing (the agent's step)."""
    if isinstance(e, EnclaveError):
        return Failure(Cause.ENCLAVE, hosted.status, e.state)
    return Failure(Cause.AGENT, hosted.status)


def open_data(addr: str, name: str, timeout: float, channel: str = "main", resume: int = 0) -> socket.socket:
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
