"""Migration records and drain marks: what the fleet is asked to do, kept in etcd, and how a record's
phase moves. Pure: no store, no clock (callers pass `now`); host/record_store.py keeps them in etcd and
host/fleetwork.py carries them out. tests/host/test_migration_records.py checks the table.

A record, at `{prefix}/migrations/{id}`:

  spec        what to move (written once, signed: host/signing.py): id, enclave, source (host id), target
              (a host id or "anywhere"), strategy, options, asked_by (the signer), created, drain (the
              mark it came from, or "")
  signature   {"cert", "sig"} over the spec
  status      written only by the source agent carrying it out: phase, target chosen, one timestamp per
              phase, progress (bytes left, rate, throttle), outcome (metrics.OUTCOMES), reason, restore
  abort       {"at", "signature"}: a signed request to cancel; status.abort says what came of it

A drain mark, at `{prefix}/drains/{host_id}`: spec (id, host_id, parallel, strategy, options,
asked_by, created), signature, and a status the host's agent writes (state, moves, why it refused).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any

from constmig.host.metrics import OUTCOMES

ANYWHERE = "anywhere"
DEFAULT_PARALLEL = 2  # per-host outbound migrations at once, as KubeVirt's default
FRESH_S = 900.0  # a signed mark or record this old that its agent never saw is taken for a replay
KEEP_RECORDS_S = 86400.0  # an ended record is deleted this long after (settings keep_records_s)


@dataclass(frozen=True)
class Settings:
    """The fleet's settings (`{prefix}/settings`, a JSON object anyone holding the store may write, unsigned:
    they tune, never start, a move). A value that is not a number in range is left at its default and
    named in `problems`, so a garbled store slows nothing down and says why."""

    max_in_flight: int = 0  # migrations at once fleet-wide; 0: no cap
    outbound_per_host: int = DEFAULT_PARALLEL  # a source's moves at once outside a drain
    keep_records_s: float = KEEP_RECORDS_S
    problems: tuple[str, ...] = ()

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Settings:
        rules = {"max_in_flight": (int, 0), "outbound_per_host": (int, 1), "keep_records_s": (float, 0.0)}
        values: dict[str, Any] = {}
        problems = []
        for key, (kind, least) in rules.items():
            if key not in obj:
                continue
            raw = obj[key]
            ok = isinstance(raw, int | float) and not isinstance(raw, bool) and raw >= least \
                and (kind is float or float(raw).is_integer())
            if ok:
                values[key] = kind(raw)
            else:
                problems.append(f"settings {key}={raw!r} is not {'an integer' if kind is int else 'a number'} "
                                f">= {least}: {getattr(cls, key)!r} is used")
        return cls(**values, problems=tuple(problems))


class Phase(enum.Enum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


FINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})
FINAL_VALUES = frozenset(p.value for p in FINAL)


class Event(enum.Enum):
    SCHEDULE = "schedule"  # a target is chosen
    START = "start"  # the source agent asked itself to migrate
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"


# (phase, event) -> the next phase; anything else is refused. Phases only go forward.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.PENDING, Event.SCHEDULE): Phase.SCHEDULED,
    (Phase.PENDING, Event.FAIL): Phase.FAILED,
    (Phase.PENDING, Event.CANCEL): Phase.CANCELLED,
    (Phase.SCHEDULED, Event.START): Phase.RUNNING,
    (Phase.SCHEDULED, Event.FAIL): Phase.FAILED,
    (Phase.SCHEDULED, Event.CANCEL): Phase.CANCELLED,
    (Phase.RUNNING, Event.SUCCEED): Phase.SUCCEEDED,
    (Phase.RUNNING, Event.FAIL): Phase.FAILED,
    (Phase.RUNNING, Event.CANCEL): Phase.CANCELLED,
}

# The phase a migration's outcome word ends it in (the word itself goes into the record as it is).
OUTCOME_PHASE = {"done": Phase.SUCCEEDED, "cancelled": Phase.CANCELLED, "rolled-back": Phase.FAILED,
                 "failed": Phase.FAILED, "stranded": Phase.FAILED}
assert set(OUTCOME_PHASE) == set(OUTCOMES)


class PhaseError(Exception):
    """A step the table does not allow (a phase going back, or a record that ended already)."""


def phase_of(status: dict[str, Any]) -> Phase:
    try:
        return Phase(status.get("phase", Phase.PENDING.value))
    except ValueError:
        return Phase.FAILED  # a phase no agent writes: treat it as over


def step(status: dict[str, Any], event: Event, now: float, **changes: Any) -> dict[str, Any]:
    """The status after `event` at `now` (a new dict; `changes` are merged in): the phase from the table,
    its timestamp added. PhaseError if the table has no such step."""
    was = phase_of(status)
    to = TRANSITIONS.get((was, event))
    if to is None:
        raise PhaseError(f"a record in phase {was.value} cannot take {event.value!r}")
    outcome = changes.get("outcome")
    if outcome is not None and OUTCOME_PHASE.get(outcome) is not to:
        raise PhaseError(f"outcome {outcome!r} does not end a record in {to.value}")
    return {**status, **changes, "phase": to.value, "times": {**status.get("times", {}), to.value: now}}


def end_event(outcome: str) -> Event:
    """How a migration that ended with `outcome` (metrics.OUTCOMES) ends its record."""
    return {Phase.SUCCEEDED: Event.SUCCEED, Phase.CANCELLED: Event.CANCEL}.get(
        OUTCOME_PHASE.get(outcome, Phase.FAILED), Event.FAIL)


# ---- specs ----

_ID = re.compile(r"^[A-Za-z0-9_.:~-]{1,200}$")


def new_id(source: str, enclave: str) -> str:
    """`{source}.{enclave}.{random}`: an agent lists its own records by the key's prefix."""
    return f"{source}.{enclave}.{os.urandom(4).hex()}"


def check_id(text: str) -> str:
    if not _ID.match(text):
        raise ValueError(f"bad migration id {text!r}")
    return text


@dataclass(frozen=True)
class Spec:
    """What one migration is asked to do (signed as a whole, so no field can be changed alone)."""

    id: str
    enclave: str
    source: str  # host id
    target: str = ANYWHERE  # host id, or anywhere the placement allows
    strategy: str = "hybrid"
    options: dict[str, Any] = field(default_factory=dict)  # control.Migrate's: tracker, timeout, max_bandwidth...
    asked_by: str = ""
    created: float = 0.0
    drain: str = ""  # the drain mark's id it came from

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "enclave": self.enclave, "source": self.source, "target": self.target,
                "strategy": self.strategy, "options": dict(self.options), "asked_by": self.asked_by,
                "created": self.created, "drain": self.drain}

    @classmethod
    def parse(cls, obj: Any) -> Spec:
        """A spec from the store; ValueError (one line) for anything malformed."""
        if not isinstance(obj, dict):
            raise ValueError("no spec")
        try:
            spec = cls(id=str(obj["id"]), enclave=str(obj["enclave"]), source=str(obj["source"]),
                       target=str(obj.get("target", ANYWHERE)), strategy=str(obj.get("strategy", "hybrid")),
                       options=dict(obj.get("options") or {}), asked_by=str(obj.get("asked_by", "")),
                       created=float(obj.get("created", 0.0)), drain=str(obj.get("drain", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed spec ({type(e).__name__}: {e})") from None
        check_id(spec.id)
        return spec


@dataclass(frozen=True)
class MarkSpec:
    """A drain mark: empty host `host_id`, at most `parallel` moves out at once."""

    id: str
    host_id: str
    parallel: int = DEFAULT_PARALLEL
    strategy: str = "hybrid"
    options: dict[str, Any] = field(default_factory=dict)
    asked_by: str = ""
    created: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "host_id": self.host_id, "parallel": self.parallel, "strategy": self.strategy,
                "options": dict(self.options), "asked_by": self.asked_by, "created": self.created}

    @classmethod
    def parse(cls, obj: Any) -> MarkSpec:
        if not isinstance(obj, dict):
            raise ValueError("no spec")
        try:
            spec = cls(id=str(obj["id"]), host_id=str(obj["host_id"]), parallel=int(obj.get("parallel", 2)),
                       strategy=str(obj.get("strategy", "hybrid")), options=dict(obj.get("options") or {}),
                       asked_by=str(obj.get("asked_by", "")), created=float(obj.get("created", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed drain mark ({type(e).__name__}: {e})") from None
        if not 1 <= spec.parallel <= 64:
            raise ValueError(f"parallel must be 1-64, not {spec.parallel}")
        return spec


def stale(created: float, now: float, seen_before: bool) -> str | None:
    """Why a signed item written at `created` is taken for a replay, or None: older than FRESH_S (or
    from the future beyond it) and never seen by this agent."""
    if seen_before or abs(now - created) <= FRESH_S:
        return None
    return f"signed {now - created:.0f} s ago and never seen by this agent: taken for a replay (fresh for {FRESH_S:g} s)"


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """One row of `constmig migrations ls`: id, enclave, from, to, phase, outcome, left bytes, reason."""
    spec, st = record.get("spec") or {}, record.get("status") or {}
    prog = st.get("progress") or {}
    return {"id": spec.get("id"), "enclave": spec.get("enclave"), "from": spec.get("source"),
            "to": st.get("target") or spec.get("target"), "phase": phase_of(st).value,
            "outcome": st.get("outcome", ""), "left_bytes": prog.get("left_bytes"),
            "rate": prog.get("ack_bytes_per_s"),
            "reason": st.get("reason") or (f"not acted on: {st['refused']}" if st.get("refused") else "")}
