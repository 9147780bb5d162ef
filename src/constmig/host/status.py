"""What an agent says about each enclave it hosts: a status enum with a transition table.

The agent is untrusted and its status is only its view (the enclave's own lifecycle, enclave/lifecycle.py,
decides what the enclave does), but callers, operators and the agent's own request handling act on it, so
it moves like QEMU's migration state: only along the table's edges, as compare-and-set from an expected
old status, so a stale writer (a progress callback that arrives after the migration failed) is dropped
instead of overwriting a newer truth.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Status(enum.Enum):
    RUNNING = "running"
    PREPARING_OUT = "preparing-out"  # a destination is being prepared; calls still served
    MIGRATING_OUT = "migrating-out"  # migrating: calls go in until the enclave stops, then wait for the outcome
    HANDED_OFF = "handed-off"  # past the commit point: calls go to the destination
    PAUSED = "paused"  # a migration broke after its commit point and reconnects (source), or its stream
    #                    stopped (destination, its calls waited past the resume deadline)
    RESUMING = "resuming"  # a reconnect attempt is under way
    FAILED = "failed"  # handed off, reconnects gave up: holds every chunk, never runs here again
    INCOMING = "incoming"  # an empty instance waiting for (or receiving) a migration
    ABORTED = "aborted"  # gave an incoming migration up after READY: wiped, answers reconnects with ABORT
    EXITED = "exited"  # its process is gone


S = Status
TABLE: dict[Status, frozenset[Status]] = {
    S.RUNNING: frozenset({S.PREPARING_OUT, S.PAUSED, S.EXITED}),
    S.PREPARING_OUT: frozenset({S.MIGRATING_OUT, S.RUNNING, S.EXITED}),
    S.MIGRATING_OUT: frozenset({S.HANDED_OFF, S.RUNNING, S.PAUSED, S.FAILED, S.EXITED}),
    # back to RUNNING only as the enclave says: its destination proved (authenticated ABORT before it
    # resumed) that it never ran the enclave, and the enclave reclaimed it (lifecycle.reclaim)
    S.HANDED_OFF: frozenset({S.RUNNING, S.PAUSED, S.FAILED, S.EXITED}),
    S.PAUSED: frozenset({S.RESUMING, S.RUNNING, S.FAILED, S.EXITED}),
    S.RESUMING: frozenset({S.PAUSED, S.RUNNING, S.FAILED, S.EXITED}),
    S.FAILED: frozenset({S.PAUSED, S.EXITED}),
    S.INCOMING: frozenset({S.RUNNING, S.ABORTED, S.EXITED}),
    S.ABORTED: frozenset({S.EXITED}),
    S.EXITED: frozenset(),
}

# Grouped predicates (QEMU's migration_is_setup_or_active and friends).
CALLABLE = frozenset({S.RUNNING, S.PREPARING_OUT, S.MIGRATING_OUT})  # ECALLs go in now
TAKES_RECONNECT = frozenset({S.RUNNING, S.PAUSED, S.INCOMING, S.ABORTED})  # as the destination of a migration
STOPPABLE = frozenset({S.RUNNING, S.EXITED, S.FAILED, S.PAUSED, S.ABORTED})
HOLDS_UNDELIVERED = frozenset({S.FAILED, S.PAUSED})  # stopping loses heap data a migration has not delivered


class StatusCell:
    """One enclave's status: moved only along TABLE, and only from an expected old value."""

    def __init__(self, initial: Status) -> None:
        self._status = initial
        self.history: list[Status] = [initial]

    @property
    def value(self) -> Status:
        return self._status

    def move(self, expected: Status | Iterable[Status], new: Status) -> bool:
        """Set `new` if the status is `expected` (one or any of several); False, changing nothing, if it
        is not (a stale writer). A move the table does not allow is a bug: ValueError."""
        olds = {expected} if isinstance(expected, Status) else set(expected)
        if self._status not in olds:
            return False
        if new is not self._status and new not in TABLE[self._status]:
            raise ValueError(f"agent status cannot move from {self._status.value} to {new.value}")
        if new is not self._status:
            self._status = new
            self.history.append(new)
        return True

    def exited(self) -> None:
        """The process is gone: from any status (but it stays exited)."""
        self.move(set(Status) - {S.EXITED}, S.EXITED)

    def __str__(self) -> str:
        return self._status.value
