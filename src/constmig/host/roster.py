"""What runs here: the state folder's lock, the enclaves this agent hosts, and the record that outlives it.

One agent per state folder (an exclusive lock for the process's life). The roster file says what runs
here, so that the next agent on the folder can say which enclaves died with this one (PDEATHSIG) and the
command that restores each from its newest checkpoint. Every other part of the agent looks enclaves up
here, so a name that moved away redirects and an unknown name is refused the same way everywhere.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from constmig.errors import AgentError, ConfigError, NoSuchEnclave, Redirect
from constmig.files import newest_checkpoint
from constmig.host.launcher import EnclaveHandle, LaunchSpec
from constmig.host.logs import fields
from constmig.host.metrics import CallRate, HostFigures
from constmig.host.recovery import restore_command
from constmig.host.status import Status, StatusCell
from constmig.host.status import Status as S
from constmig.units import available_memory, format_size, resident_bytes
from constmig.wire import control

log = logging.getLogger("constmig.agent")
MAX_NAME = 64  # enclave names become file names (sockets, checkpoints) and log fields


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
    resume_deadline: float = control.RESUME_DEADLINE_S  # how long a paused incoming migration's callers wait
    paused_since: float | None = None
    receiving: bool = False  # an incoming migration's data connections began to arrive
    # a migration out, until its commit point: its token (the enclave's name for it) and a cancel
    token: str = ""
    cancel: str | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # a migration out while it runs (through its pauses): its latest progress (host/outgoing.py, seen)
    outgoing: control.OutgoingProgress | None = None
    ending: str = ""  # a migration out that ended short of DONE: an outcome its status alone does not say

    @property
    def name(self) -> str:
        return self.handle.spec.name

    @property
    def status(self) -> Status:
        if self.handle.proc.returncode is not None:
            self.cell.exited()  # killed, or crashed: say so rather than list it as running
        return self.cell.value

    def move(self, expected: Status | Iterable[Status], new: Status) -> bool:
        return self.cell.move(expected, new)


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


class Roster:
    """The enclaves hosted here (by name), where those that left went, and those that died with the last
    agent on this state folder."""

    def __init__(self, state_dir: Path, host_id: str, listen: str) -> None:
        self.lock_fd = claim_state_dir(state_dir)  # first: nothing else touches a folder another agent uses
        self.state_dir, self.host_id, self.listen = state_dir, host_id, listen
        self.checkpoints = state_dir / "checkpoints"
        self.path = state_dir / "enclaves.json"  # what runs here, so a restart can say what died
        self.enclaves: dict[str, Hosted] = {}
        self.moved: dict[str, str] = {}  # name -> the agent it migrated to (callers are redirected there)
        self.died: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []  # migrations in and out, newest last (status shows the last 20)
        self._saved: dict[str, Any] = {}

    def newest_checkpoint(self, name: str) -> Path | None:
        return newest_checkpoint(self.checkpoints, name)

    # ---- across restarts ----
    def recall(self) -> None:
        """Enclaves the previous agent on this state folder ran: they died with it (PDEATHSIG). Each
        with its newest checkpoint here, if any, and the command that restores it."""
        try:
            roster = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): enclaves of an earlier run are not listed", self.path, e)
            return
        died = {}
        for name, entry in roster.items() if isinstance(roster, dict) else ():
            ckpt = self.newest_checkpoint(name)
            info = {**entry, "checkpoint": str(ckpt) if ckpt else None, "restore": self.restore_command(name)}
            died[name] = info
            log.warning("enclave %s died with the previous agent on %s; %s", name, self.state_dir,
                        f"restore it with: {info['restore']}" if ckpt else "it has no checkpoint here",
                        extra=fields("enclave-died", name, reason="with-agent", restore=info["restore"]))
        self.path.unlink(missing_ok=True)
        self.died = died

    def save(self) -> None:
        """Write what runs here when it changed (each request may start, stop or move one)."""
        roster = {name: {"app": h.handle.spec.app, "heap_bytes": h.handle.spec.heap, "status": h.status.value}
                  for name, h in self.enclaves.items() if h.status not in (S.EXITED, S.ABORTED)}
        if roster != self._saved:
            try:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(roster))
                os.replace(tmp, self.path)
                self._saved = roster
            except OSError as e:
                log.warning("cannot record the enclaves here in %s: %s", self.path, e)
        for name in roster:
            self.died.pop(name, None)  # a new enclave of that name runs here now

    # ---- lookups ----
    def get(self, name: Any) -> Hosted:
        """The enclave of that name here; Redirect if it moved away, NoSuchEnclave if it is unknown."""
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

    def rows(self) -> list[tuple[str, str, int]]:
        """(name, status, heap bytes) per enclave, for a scrape (another thread: read, never change)."""
        return [(name, h.cell.value.value, h.handle.spec.heap) for name, h in list(self.enclaves.items())]

    def outgoing(self, now: float | None = None) -> dict[str, control.OutgoingProgress]:
        """The migrations out running now, by enclave, timed to `now` (another thread may read: never change)."""
        now = time.time() if now is None else now
        return {name: msgspec.structs.replace(p, elapsed_s=round(max(now - p.started, 0.0), 3))
                for name, h in list(self.enclaves.items()) if (p := h.outgoing) is not None}

    def figures(self, now: float | None = None) -> HostFigures:
        """What a scrape shows beyond the rows (another thread: read, never change)."""
        now = time.time() if now is None else now
        hosted = list(self.enclaves.items())
        ages = {}
        for name, h in hosted:
            ckpt = self.newest_checkpoint(name) if h.cell.value is S.RUNNING else None
            try:
                if ckpt is not None:
                    ages[name] = round(max(now - ckpt.stat().st_mtime, 0.0), 3)
            except OSError:
                pass  # removed meanwhile
        return HostFigures(
            in_flight={"out": sum(h.outgoing is not None for _, h in hosted),
                       "in": sum(h.cell.value is S.INCOMING for _, h in hosted)},
            memory_available=available_memory(), memory_promised=self.promised(),
            checkpoint_age=ages, died_with_agent=len(self.died),
            exited={f"{name}:{h.handle.proc.pid}": code for name, h in hosted
                    if (code := h.handle.proc.returncode) is not None})

    # ---- admission of a new instance ----
    def check_new(self, spec: LaunchSpec) -> None:
        """A new instance of `spec` may start here: a free, well-formed name, and room for its heap."""
        if spec.name in self.enclaves:
            raise AgentError(f"an enclave named {spec.name!r} already exists on agent {self.host_id}")
        if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
            raise AgentError(f"bad enclave name {spec.name!r}: use letters, digits, '-' and '_'")
        if len(spec.name) > MAX_NAME:
            raise AgentError(f"enclave name of {len(spec.name)} characters is too long (at most {MAX_NAME})")
        avail, promised = available_memory(), self.promised()
        if spec.heap > avail - promised:
            held = f", {format_size(promised)} of it promised to enclaves already here" if promised else ""
            raise AgentError(f"heap {format_size(spec.heap)} exceeds this host's available memory "
                             f"({format_size(avail)}{held})")

    def promised(self) -> int:
        """Heap the enclaves here may still claim: each heap less what its process already holds (an
        untouched heap costs nothing until written, so free memory alone overcommits)."""
        total = 0
        for hosted in list(self.enclaves.values()):  # a scrape's thread reads it too
            if hosted.handle.proc.returncode is None:
                total += max(hosted.handle.spec.heap - resident_bytes(hosted.handle.proc.pid), 0)
        return total

    async def clear_tombstone(self, name: str) -> None:
        """A new enclave of this name (run, restore) replaces a tombstone of an old migration (see
        destination.py) or a dead copy: one whose process is gone (killed, or crashed after COMMIT) holds
        nothing any more, and the restore command printed for it must work as printed."""
        hosted = self.enclaves.get(name)
        if hosted is None or hosted.status not in (S.ABORTED, S.EXITED):
            return
        if hosted.status is S.EXITED:
            log.info("enclave %s: its dead copy (exit code %s) gives its name to the new one", name,
                     hosted.handle.proc.returncode, extra=fields("enclave-replaced", name))
        del self.enclaves[name]
        await hosted.handle.stop()

    def restore_command(self, name: str) -> str | None:
        """The command that restores `name` here from its newest checkpoint here (None without one)."""
        ckpt = self.newest_checkpoint(name)
        return restore_command(ckpt, self.listen, name) if ckpt else None
