"""The agent's share of the fleet's work in etcd: its drain mark, and the migration records naming it
as their source (host/records.py, host/record_store.py).

Each tick it reads its own two keys' worth (the mark at `drains/{host_id}`, the records under
`migrations/{host_id}.`), acts only on what a certificate that may ask signed (host/signing.py), and
carries each move out the way a `migrate` request runs inside the agent (host/outgoing.py), at most
`parallel` at once, writing every phase by compare-and-set. While its mark stands, each running enclave
here without a live record gets one (placed with host/fleet.py's plan_drain on the other agents' room
and load, which each agent publishes under `room/{host_id}`). The drain goes on without whoever wrote
the mark; an agent restarted mid-drain finds the records it owned and says what became of each (the
migration protocol decided that: an enclave past its handoff runs at the destination, one before it
died with the agent), then goes on with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from constmig.errors import ConfigError, ConstmigError, DirectoryError, PastCommitPoint
from constmig.host import pki, records
from constmig.host.directory import Directory
from constmig.host.fleet import HostView, plan_drain
from constmig.host.logs import fields
from constmig.host.outgoing import Outgoing
from constmig.host.record_store import RecordStore, Stored
from constmig.host.records import Event, Phase
from constmig.host.roster import Roster
from constmig.host.signing import Unsigned, canonical, may_ask, sign, verify
from constmig.host.status import Status as S
from constmig.units import available_memory
from constmig.wire import control

log = logging.getLogger("constmig.agent")
TICK_S = 1.0  # how often the agent reads its mark and its records
ROOM_EVERY_S = 3.0  # how often it keeps its room entry's lease, and rewrites the entry if its figures moved
ROOM_TTL = 15
ROOM_STEP = 64 << 20  # free memory moving less than this (and calls by less than a tenth) is not rewritten
PROGRESS_EVERY_S = 1.0  # a running record's progress is written at most this often
MAX_TRIES = 3  # moves of one enclave under one mark before the drain leaves it (stuck, and says so)
RETRY_AFTER_S = 5.0  # a failed move's enclave is tried again this long after, on another host if there is one
SETTINGS_EVERY_S = 30.0
FORGET_PER_LOOK = 20
SEEN_KEEP = 5000  # record ids remembered as finished (a replayed old record is refused)


def abort_payload(rid: str, at: Any) -> dict[str, Any]:
    """What a cancel's signature is over: the record's id and when it was asked."""
    return {"abort": rid, "at": at}


class _Discard:
    """Where outgoing.migrate writes a requester's progress frames: a record has no connection; its
    progress is read from the agent's own view (Hosted.outgoing)."""

    def write(self, data: bytes) -> None:
        pass


class FleetWork:
    def __init__(self, etcd: str, host_id: str, listen: str, roster: Roster, outgoing: Outgoing,
                 tls: pki.Identity, state_dir: Path, stopping: Callable[[], bool]) -> None:
        self.etcd, self.host_id, self.listen = etcd, host_id, listen
        self.roster, self.outgoing, self.ca = roster, outgoing, tls.ca
        self.stopping = stopping
        self.seen_path = Path(state_dir) / "fleetwork.json"
        self.seen: dict[str, dict[str, str]] = {"marks": {}, "records": {}}
        self.directory: Directory | None = None
        self.store: RecordStore | None = None
        self.mark: records.MarkSpec | None = None
        self.mark_signer = ""
        self.tasks: dict[str, asyncio.Task[None]] = {}  # record id -> its move
        self.inflight: dict[str, int] = {}  # destination address -> heap bytes of moves running there
        self._verdicts: dict[bytes, str | None] = {}  # a spec+signature's bytes -> why refused (None: fine)
        self._aborting: set[str] = set()
        self.avoid: dict[str, set[str]] = {}  # enclave -> hosts a move of this drain failed to
        self.slots: dict[str, int] = {}  # record id -> the fleet slot its move holds (settings max_in_flight)
        self._pool: list[int] = []  # slots claimed in this look, not yet given to a move
        self._stale_slots: set[int] = set()  # slots whose release did not reach the store
        self._cancelling: asyncio.Task[None] | None = None  # kept: the loop holds tasks weakly
        self._task: asyncio.Task[None] | None = None
        self._room_lease: int | None = None
        self._room_last: dict[str, Any] | None = None  # the figures the entry holds
        self._room_at = 0.0
        self._settings_at = 0.0
        self._keep_s = records.KEEP_RECORDS_S
        self._settings_said: tuple[str, ...] = ()
        self._bad_rooms: set[str] = set()  # hosts whose room entry did not parse (said once)
        self._away = False

    # ---- lifecycle ----
    async def start(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.seen = {**self.seen, **json.loads(self.seen_path.read_text())}
        self.directory = Directory(self.etcd)
        self.store = RecordStore(self.directory)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.directory is not None:
            with contextlib.suppress(DirectoryError):
                if self._room_lease is not None:
                    await self.directory.deregister(self._room_lease)
            await self.directory.close()

    def _save_seen(self) -> None:
        done = self.seen["records"]
        if len(done) > SEEN_KEEP:
            self.seen["records"] = dict(list(done.items())[-SEEN_KEEP:])
        try:
            tmp = self.seen_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.seen))
            os.replace(tmp, self.seen_path)
        except OSError as e:
            log.warning("cannot write %s (%s): a restart may refuse its own drain as a replay", self.seen_path, e)

    async def _run(self) -> None:
        while True:
            try:
                if not self.stopping():
                    await self.tick()
                if self._away:
                    log.info("the fleet directory answers again: drain marks and migration records are read")
                self._away = False
            except DirectoryError as e:
                if not self._away:
                    log.warning("%s: drain marks and migration records wait for it", e)
                self._away = True
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 (the fleet's work must never stop for good: log it, go on)
                log.error("fleet work failed unexpectedly (%s: %s); retrying", type(e).__name__, e)
            await asyncio.sleep(TICK_S)

    # ---- one look at the store ----
    async def tick(self) -> None:
        assert self.store is not None
        now = time.time()
        if now - self._room_at >= ROOM_EVERY_S:
            await self._publish_room()
            self._room_at = now
        for slot in list(self._stale_slots):
            self._stale_slots.discard(slot)
            await self._release_slot(slot)
        self.mark = await self._check_mark(await self.store.get(RecordStore.mark_key(self.host_id)), now)
        mine = await self.store.records(f"{self.host_id}.")
        pending = []
        for stored in mine:
            spec = await self._accepted(stored, now)
            if spec is not None and await self._tend(stored, spec, now):
                pending.append((stored, spec))
        if self.mark is not None:
            pending += await self._plan_new(mine, now)
        await self._start(pending, now)
        if now - self._settings_at >= SETTINGS_EVERY_S:
            self._keep_s = (await self._settings()).keep_records_s
            self._settings_at = now
        await self._forget_old(mine, now)
        if self.mark is not None:
            await self._mark_status(mine)

    async def _settings(self) -> records.Settings:
        """The fleet's settings; a garbled value is said once (until it changes), its default used."""
        assert self.store is not None
        settings = await self.store.settings()
        if settings.problems != self._settings_said:
            for problem in settings.problems:
                log.warning("%s", problem)
            self._settings_said = settings.problems
        return settings

    async def _forget_old(self, mine: list[Stored], now: float) -> None:
        """Delete this host's records that ended more than keep_records_s ago (not those of its standing
        mark): each look reads every record its host kept. Their ids stay in fleetwork.json, so a replay
        of one is still refused."""
        assert self.directory is not None
        dropped = 0
        for stored in mine:
            st, spec = stored.value.get("status") or {}, stored.value.get("spec") or {}
            if records.phase_of(st) not in records.FINAL or (self.mark and spec.get("drain") == self.mark.id):
                continue
            times = [float(t) for t in (st.get("times") or {}).values() if isinstance(t, int | float)]
            if times and now - max(times) > self._keep_s and dropped < FORGET_PER_LOOK \
                    and await self.directory.delete_if(stored.key, stored.mod):
                dropped += 1

    async def _publish_room(self) -> None:
        assert self.directory is not None
        running = [h for h in self.roster.enclaves.values() if h.status is S.RUNNING]
        room = {"listen": self.listen, "free": max(available_memory() - self.roster.promised(), 0),
                "calls_per_s": round(sum(h.calls.per_second() for h in running), 3), "at": time.time()}
        try:
            fresh = self._room_lease is None or not await self.directory.refresh(self._room_lease)
            if fresh:
                self._room_lease = await self.directory.lease(ROOM_TTL)
            last = self._room_last
            if fresh or last is None or abs(room["free"] - last["free"]) >= ROOM_STEP or \
                    abs(room["calls_per_s"] - last["calls_per_s"]) > 0.1 * max(last["calls_per_s"], 1.0):
                await self.directory.write(f"room/{self.host_id}", canonical(room), lease=self._room_lease)
                self._room_last = room
        except DirectoryError:
            self._room_lease = None
            raise

    # ---- the mark ----
    async def _check_mark(self, stored: Stored | None, now: float) -> records.MarkSpec | None:
        """The drain mark on this host if it may act, else None (its status says why it may not)."""
        assert self.store is not None
        marks = self.seen["marks"]
        if stored is None:
            if self.mark is not None:
                marks[self.mark.id] = "cleared"
                self._save_seen()
                log.info("drain %s of this host cleared", self.mark.id, extra=fields("drain-cleared", drain=self.mark.id))
            return None
        value = stored.value
        why = self._verdict(value, lambda spec: self._mark_problem(spec, now), records.MarkSpec.parse)
        if why is not None:
            if (value.get("status") or {}).get("reason") != why:
                log.warning("drain mark on this host not acted on: %s", why, extra=fields("drain-refused", reason=why))
                await self.store.update(stored.key, lambda v: {**v, "status": {"state": "refused", "reason": why,
                                                                               "agent": self.host_id}})
            return None
        spec = records.MarkSpec.parse(value["spec"])
        if marks.get(spec.id) != "active":
            marks[spec.id] = "active"
            self._save_seen()
            log.info("drain %s of this host asked by %s", spec.id, spec.asked_by,
                     extra=fields("drain-started", drain=spec.id, asked_by=spec.asked_by))
        return spec

    def _mark_problem(self, spec: records.MarkSpec, now: float) -> str | None:
        if spec.host_id != self.host_id:
            return f"a mark for host {spec.host_id!r} put on host {self.host_id!r}'s key (a replay)"
        state = self.seen["marks"].get(spec.id)
        if state == "cleared":
            return f"drain {spec.id} was cleared before: a replay"
        return records.stale(spec.created, now, state is not None)

    def _verdict(self, value: dict[str, Any], problem: Callable[[Any], str | None],
                 parse: Callable[[Any], Any]) -> str | None:
        """Why a signed spec may not act here, or None: it parses, its signature is good and by someone who
        may ask this of this host, and `problem` finds nothing. Cached by its bytes."""
        blob = canonical([value.get("spec"), value.get("signature")])
        if blob in self._verdicts:
            cached = self._verdicts[blob]
            return cached if cached is not None else problem(parse(value["spec"]))
        try:
            spec = parse(value.get("spec"))
            signer = verify(self.ca, value.get("spec"), value.get("signature"))
            why = may_ask(signer, self.host_id)
        except ValueError as e:
            why = str(e)
        except Unsigned as e:
            why = str(e)
        else:
            if why is None and signer.role == "host" and isinstance(spec, records.Spec) and not spec.drain:
                why = "a host's own certificate signs only the moves of its drain"
        self._verdicts[blob] = why
        return why if why is not None else problem(spec)

    # ---- records ----
    def _record_problem(self, spec: records.Spec, stored: Stored, now: float) -> str | None:
        if spec.source != self.host_id or not stored.key.endswith(f"/{spec.id}"):
            return f"a record of host {spec.source!r} ({spec.id}) at key {stored.key} (a replay)"
        phase = records.phase_of(stored.value.get("status") or {})
        if self.seen["records"].get(spec.id) == "done" and phase not in records.FINAL:
            return f"migration {spec.id} finished before: a replay"
        if phase is Phase.PENDING:
            return records.stale(spec.created, now, spec.id in self.seen["records"])
        return None

    async def _accepted(self, stored: Stored, now: float) -> records.Spec | None:
        """The record's spec if it may act here; else None, and its status says why (once)."""
        assert self.store is not None
        why = self._verdict(stored.value, lambda spec: self._record_problem(spec, stored, now), records.Spec.parse)
        if why is None:
            return records.Spec.parse(stored.value["spec"])
        status = stored.value.get("status") or {}
        if status.get("refused") != why:
            log.warning("migration record %s not acted on: %s", stored.key, why,
                        extra=fields("record-refused", reason=why))
            await self.store.update(stored.key, lambda v: {**v, "status": {**(v.get("status") or {}), "refused": why}})
        return None

    async def _write(self, spec: records.Spec, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Change a record's status by compare-and-set (a step the table refuses changes nothing)."""
        assert self.store is not None

        def apply(value: dict[str, Any]) -> dict[str, Any] | None:
            try:
                new = change(value.get("status") or {})
            except records.PhaseError:
                return None
            return None if new is None else {**value, "status": {**new, "agent": self.host_id}}

        await self.store.update(RecordStore.record_key(spec.id), apply)

    async def _step(self, spec: records.Spec, event: Event, **changes: Any) -> None:
        """One step of a record's phase (host/records.py's table), logged with the record's id."""
        await self._write(spec, lambda st: records.step(st, event, time.time(), **changes))
        said = {k: v for k, v in changes.items() if k in ("outcome", "target", "reason")}
        log.info("migration %s of %s: %s%s", spec.id, spec.enclave, event.value,
                 "".join(f", {k} {v}" for k, v in said.items() if v),
                 extra=fields("record-" + event.value, spec.enclave, migration=spec.id, **said))
        if event in (Event.SUCCEED, Event.FAIL, Event.CANCEL):
            self.seen["records"][spec.id] = "done"
            self._save_seen()

    async def _tend(self, stored: Stored, spec: records.Spec, now: float) -> bool:
        """Act on one accepted record's state here; True if it waits to be started."""
        status = stored.value.get("status") or {}
        phase = records.phase_of(status)
        if phase in records.FINAL:
            if self.seen["records"].get(spec.id) != "done":
                self.seen["records"][spec.id] = "done"
                self._save_seen()
            return False
        if spec.id not in self.seen["records"]:
            self.seen["records"][spec.id] = "accepted"
            self._save_seen()
        abort = stored.value.get("abort")
        if isinstance(abort, dict) and status.get("abort_at") != abort.get("at") and \
                await self._abort(stored, spec, phase, abort):
            return False
        if phase in (Phase.PENDING, Phase.SCHEDULED) and spec.drain and \
                (self.mark is None or self.mark.id != spec.drain) and spec.id not in self.tasks:
            await self._step(spec, Event.CANCEL, outcome="cancelled",
                             reason="its drain was cleared (undrain) before it started")
            return False
        if spec.id in self.tasks:
            return False
        if phase is Phase.PENDING:
            return True
        await self._orphan(spec, status, phase)
        return False

    async def _abort(self, stored: Stored, spec: records.Spec, phase: Phase, abort: dict[str, Any]) -> bool:
        """A cancel asked of a record: True if the record is over now."""
        payload = abort_payload(spec.id, abort.get("at"))
        try:
            signer = verify(self.ca, payload, abort.get("signature"))
            if why := may_ask(signer, self.host_id):
                raise Unsigned(why)
        except Unsigned as e:
            said = f"refused: {e}"
            await self._write(spec, lambda st: {**st, "abort": said, "abort_at": abort.get("at")})
            return False
        who = f"cancelled by {signer.describe()}"
        if phase in (Phase.PENDING, Phase.SCHEDULED) and spec.id not in self.tasks:
            await self._step(spec, Event.CANCEL, outcome="cancelled", reason=who, abort="cancelled before it started",
                             abort_at=abort.get("at"))
            return True
        if spec.id in self.tasks and spec.id not in self._aborting:
            self._aborting.add(spec.id)
            await self._write(spec, lambda st: {**st, "abort": "asked", "abort_at": abort.get("at")})
            self._cancelling = asyncio.create_task(self._cancel_running(spec, who))
        return False

    async def _cancel_running(self, spec: records.Spec, who: str) -> None:
        hosted = self.roster.enclaves.get(spec.enclave)
        try:
            if hosted is None:
                raise PastCommitPoint("the enclave no longer runs here")
            await self.outgoing.cancel(hosted, who)
            said = "rolled back: the enclave runs on at its source"
        except PastCommitPoint as e:
            said = f"refused: past its commit point, the migration goes on ({e})"
        except ConstmigError as e:
            said = f"not done: {e}"
        with contextlib.suppress(DirectoryError):
            await self._write(spec, lambda st: {**st, "abort": said})

    async def _orphan(self, spec: records.Spec, status: dict[str, Any], phase: Phase) -> None:
        """A record this host carried out that no move here runs now (this agent restarted): what became of
        it, from where the enclave is."""
        assert self.directory is not None
        hosted = self.roster.enclaves.get(spec.enclave)
        to = str(status.get("target_addr") or "")
        if hosted is not None and hosted.status is S.RUNNING:
            if phase is Phase.SCHEDULED:
                await self._launch(spec, to, int(hosted.handle.spec.heap))
                return
            await self._step(spec, Event.FAIL, outcome="rolled-back",
                             reason="the agent carrying it out restarted before its commit point; the enclave runs "
                                    "on here")
            return
        at = await self.directory.where(spec.enclave)
        if to and at == to and phase is Phase.RUNNING:
            await self._step(spec, Event.SUCCEED, outcome="done",
                             reason="it reached its handoff before this agent restarted; it runs at the target")
            return
        died = self.roster.died.get(spec.enclave) or {}
        await self._step(spec, Event.FAIL, outcome="failed", restore=died.get("restore") or "",
                         reason="the source agent restarted before its handoff; the enclave died with it"
                                + ("" if died.get("restore") else " and has no checkpoint here"))

    # ---- a drain's moves ----
    async def _plan_new(self, mine: list[Stored], now: float) -> list[tuple[Stored, records.Spec]]:
        """A Pending record for each running enclave here that has no live one (at most MAX_TRIES under
        this mark), signed by this host for its drain."""
        assert self.mark is not None and self.store is not None
        live, tries, ended = set(), {}, {}
        self.avoid = {}
        for stored in mine:
            spec_d, st = stored.value.get("spec") or {}, stored.value.get("status") or {}
            phase = records.phase_of(st)
            if spec_d.get("drain") != self.mark.id and phase in records.FINAL:
                continue
            name = str(spec_d.get("enclave", ""))
            if phase not in records.FINAL:
                live.add(name)
                continue
            tries[name] = tries.get(name, 0) + 1
            ended[name] = max(ended.get(name, 0.0), *(float(t) for t in (st.get("times") or {0: 0.0}).values()))
            if phase is not Phase.SUCCEEDED and st.get("target_addr"):
                self.avoid.setdefault(name, set()).add(str(st["target_addr"]))  # try another host next
        out = []
        for name, hosted in sorted(self.roster.enclaves.items()):
            if hosted.status is not S.RUNNING or name in live or tries.get(name, 0) >= MAX_TRIES \
                    or now - ended.get(name, 0.0) < RETRY_AFTER_S:
                continue
            spec = records.Spec(records.new_id(self.host_id, name), name, self.host_id, records.ANYWHERE,
                                self.mark.strategy, dict(self.mark.options), self.mark.asked_by, now, self.mark.id)
            value = {"spec": spec.as_dict(), "signature": sign(self.outgoing.tls, spec.as_dict()),
                     "status": {"phase": Phase.PENDING.value, "times": {Phase.PENDING.value: now}}}
            if await self.store.create(RecordStore.record_key(spec.id), value):
                self.seen["records"][spec.id] = "accepted"
                out.append((Stored(RecordStore.record_key(spec.id), value, 0), spec))
        if out:
            self._save_seen()
        return out

    async def _others(self) -> list[HostView]:
        """The other live agents as the placement sees them: room and load from their `room/` entries, less
        what this agent's moves running there will take; hosts being drained are left out."""
        assert self.directory is not None and self.store is not None
        hosts = await self.directory.hosts()
        rooms, marks = await self.store.rooms(), await self.store.marks()
        views = []
        for listen, entry in sorted(hosts.items()):
            hid = str(entry.get("host_id", ""))
            room = rooms.get(hid)
            if hid == self.host_id or hid in marks or room is None or room.get("listen") != listen:
                continue
            try:  # each agent writes its own entry, unsigned: one that does not parse places nothing there
                free, load = int(room.get("free", 0)), float(room.get("calls_per_s", 0.0))
            except (TypeError, ValueError):
                if hid not in self._bad_rooms:
                    log.warning("host %s's room entry does not parse (%s): nothing is placed there", hid,
                                json.dumps(room)[:200])
                self._bad_rooms.add(hid)
                continue
            self._bad_rooms.discard(hid)
            views.append(HostView(listen, hid, free=free - self.inflight.get(listen, 0), load=load))
        return views

    async def _start(self, pending: list[tuple[Stored, records.Spec]], now: float) -> None:
        """Schedule and start Pending records, oldest first, while fewer than the cap run."""
        assert self.store is not None
        if not pending:
            return
        settings = await self._settings()
        cap = self.mark.parallel if self.mark is not None else settings.outbound_per_host
        free = cap - len(self.tasks)
        if free <= 0:
            return
        pending = sorted(pending, key=lambda p: (p[1].created, p[1].id))[:free]
        fleet_cap = settings.max_in_flight
        if fleet_cap > 0:
            self._pool = await self._claim_slots(fleet_cap, len(pending))
            if len(self._pool) < len(pending):
                pending = pending[:len(self._pool)]
                if self.mark is not None:
                    await self._waiting(f"the fleet runs its most migrations at once ({fleet_cap}, settings "
                                        "max_in_flight); the rest wait")
        try:
            await self._schedule_all(pending)
        finally:
            for slot in self._pool:  # claimed for a record that did not start after all
                await self._release_slot(slot)
            self._pool = []

    async def _schedule_all(self, pending: list[tuple[Stored, records.Spec]]) -> None:
        hosts = {str(e.get("host_id")): a for a, e in (await self.directory.hosts()).items()} \
            if self.directory is not None else {}
        anywhere: dict[str, records.Spec] = {}
        for _, spec in pending:
            hosted = self.roster.enclaves.get(spec.enclave)
            died = self.roster.died.get(spec.enclave) if hosted is None else None
            if died is not None:  # it died with the agent before this one: say what brings it back
                await self._step(spec, Event.FAIL, outcome="failed", restore=died.get("restore") or "",
                                 reason="the enclave died with the source agent before it moved"
                                        + ("" if died.get("restore") else "; it has no checkpoint here"))
            elif hosted is None or hosted.status is not S.RUNNING:
                state = "not here" if hosted is None else hosted.status.value
                await self._step(spec, Event.FAIL, reason=f"enclave {spec.enclave!r} is {state} on host "
                                                          f"{self.host_id}: only a running enclave moves")
            elif spec.target != records.ANYWHERE:
                if spec.target not in hosts:
                    await self._step(spec, Event.FAIL, reason=f"target host {spec.target!r} is not in the fleet "
                                                              "directory")
                    continue
                await self._schedule(spec, spec.target, hosts[spec.target], int(hosted.handle.spec.heap))
            else:
                anywhere[spec.enclave] = spec
        if not anywhere:
            return
        others = await self._others()
        for name, spec in sorted(anywhere.items(), key=lambda kv: (-self.roster.enclaves[kv[0]].handle.spec.heap,
                                                                    kv[0])):
            hosted = self.roster.enclaves[name]
            source = HostView(self.listen, self.host_id, {name: {
                "status": "running", "heap_bytes": hosted.handle.spec.heap, "calls_per_s": hosted.calls.per_second()}})
            avoid = self.avoid.get(name, set())
            fits = [v for v in others if v.addr not in avoid] or others  # a host where it failed, only as a last resort
            try:
                (mv,), _ = plan_drain(source, fits)
            except ConfigError as e:
                await self._waiting(str(e))
                continue
            for v in others:  # what this move takes there, for the next one placed now
                if v.addr == mv.to:
                    v.free -= mv.heap
                    v.load = (v.load or 0.0) + hosted.calls.per_second()
            hid = next((h for h, a in hosts.items() if a == mv.to), mv.to)
            await self._schedule(spec, hid, mv.to, mv.heap)

    async def _schedule(self, spec: records.Spec, host_id: str, addr: str, heap: int) -> None:
        await self._step(spec, Event.SCHEDULE, target=host_id, target_addr=addr)
        await self._launch(spec, addr, heap)

    async def _claim_slots(self, cap: int, want: int) -> list[int]:
        """Up to `want` of the fleet's `cap` slots (`slots/<n>`, each created only if absent, under this
        agent's room lease: an agent that dies frees its slots when the lease runs out)."""
        assert self.directory is not None
        if self._room_lease is None:
            self._room_lease = await self.directory.lease(ROOM_TTL)
        got: list[int] = []
        for n in random.sample(range(cap), cap):
            if len(got) >= want:
                break
            value = canonical({"host": self.host_id, "at": time.time()})
            if await self.directory.write_if(f"slots/{n}", value, 0, lease=self._room_lease):
                got.append(n)
        return got

    async def _release_slot(self, slot: int) -> None:
        assert self.store is not None
        try:
            held = await self.store.get(f"slots/{slot}")
            if held is not None and held.value.get("host") == self.host_id:  # not one another agent took since
                await self.directory.delete_if(held.key, held.mod)  # type: ignore[union-attr]
        except DirectoryError:
            self._stale_slots.add(slot)  # freed on a later look, or with this agent's lease

    async def _launch(self, spec: records.Spec, addr: str, heap: int) -> None:
        if self._pool:
            self.slots[spec.id] = self._pool.pop()
        self.inflight[addr] = self.inflight.get(addr, 0) + heap
        self.tasks[spec.id] = asyncio.create_task(self._carry_out(spec, addr, heap))

    async def _carry_out(self, spec: records.Spec, addr: str, heap: int) -> None:
        """One move, as a `migrate` request runs in the agent; its phases and progress into the record."""
        progress: asyncio.Task[None] | None = None
        try:
            hosted = self.roster.enclaves.get(spec.enclave)
            try:
                options = {k: v for k, v in spec.options.items() if k != "op"}
                req = control.decode({**options, "name": spec.enclave, "to": addr, "strategy": spec.strategy},
                                     control.Migrate)
            except control.BadRequest as e:
                await self._step(spec, Event.FAIL, reason=f"bad options: {e}")
                return
            await self._step(spec, Event.START)
            seen_before = len(self.roster.history)
            progress = asyncio.create_task(self._progress(spec))
            try:
                result = await self.outgoing.migrate(req, _Discard())  # type: ignore[arg-type]
            except ConstmigError as e:
                outcome = next((h.get("outcome") for h in reversed(self.roster.history[seen_before:])
                                if h.get("name") == spec.enclave and h.get("direction") == "out"), None)
                if outcome not in records.OUTCOME_PHASE:
                    outcome = "rolled-back" if hosted is not None and hosted.status is S.RUNNING else "failed"
                restore = ""
                if hosted is not None and hosted.release and hosted.status in (S.FAILED, S.PAUSED, S.RESUMING):
                    restore = self.outgoing.restore_advice(spec.enclave, hosted.moving_to, hosted.release)
                await self._step(spec, records.end_event(outcome), outcome=outcome, reason=str(e), restore=restore)
                return
            figures = {k: result.get(k) for k in ("downtime_ms", "total_s", "state_bytes", "strategy")}
            await self._step(spec, Event.SUCCEED, outcome="done", figures=figures)
        except DirectoryError as e:
            log.warning("migration %s of %s: its record could not be written (%s); this agent says what became "
                        "of it when the store answers", spec.id, spec.enclave, e)
        finally:
            if progress is not None:
                progress.cancel()
            self.roster.save()
            self.inflight[addr] = max(self.inflight.get(addr, 0) - heap, 0)
            if spec.id in self.slots:
                await self._release_slot(self.slots.pop(spec.id))
            self.tasks.pop(spec.id, None)
            self._aborting.discard(spec.id)

    async def _progress(self, spec: records.Spec) -> None:
        """A running move's bytes left, rate and throttle, into its record while they change."""
        last: dict[str, Any] = {}
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            hosted = self.roster.enclaves.get(spec.enclave)
            p = hosted.outgoing if hosted is not None else None
            if p is None:
                continue
            now = {"phase": p.phase, "left_bytes": p.left_bytes, "ack_bytes_per_s": p.ack_bytes_per_s,
                   "throttle": p.throttle, "round": p.round}
            if now != last:
                last = now
                with contextlib.suppress(DirectoryError):
                    await self._write(spec, lambda st, now=now: {**st, "progress": now}
                                      if records.phase_of(st) is Phase.RUNNING else None)

    async def _waiting(self, why: str) -> None:
        assert self.store is not None
        await self.store.update(RecordStore.mark_key(self.host_id), lambda v: None
                                if (v.get("status") or {}).get("reason") == why
                                else {**v, "status": {**(v.get("status") or {}), "reason": why}})

    async def _mark_status(self, mine: list[Stored]) -> None:
        """draining (with what is left), drained (nothing running here, no move live), or stuck."""
        assert self.store is not None and self.mark is not None
        mark_id = self.mark.id
        ours = [s for s in mine if (s.value.get("spec") or {}).get("drain") == mark_id]
        live = [s for s in ours if records.phase_of(s.value.get("status") or {}) not in records.FINAL]
        left = sorted(n for n, h in self.roster.enclaves.items() if h.status is S.RUNNING)
        if left and not live and not self.tasks:
            tries: dict[str, int] = {}
            for s in ours:
                name = str((s.value.get("spec") or {}).get("enclave", ""))
                tries[name] = tries.get(name, 0) + 1
            state = "stuck" if all(tries.get(n, 0) >= MAX_TRIES for n in left) else "draining"
        else:
            state = "draining" if left or live or self.tasks else "drained"
        status = {"state": state, "left": left, "moves": len(ours), "agent": self.host_id}

        def change(v: dict[str, Any]) -> dict[str, Any] | None:
            old = v.get("status") or {}
            if (v.get("spec") or {}).get("id") != mark_id or all(old.get(k) == status[k] for k in status):
                return None
            reason = old.get("reason", "") if state == "draining" else ""
            return {**v, "status": {**status, "reason": reason, "updated": time.time()}}

        await self.store.update(RecordStore.mark_key(self.host_id), change)
