"""The agent's per-enclave status: a table, compare-and-set moves, grouped predicates."""

from __future__ import annotations

import pytest

from constmig.host.status import (
    CALLABLE,
    HOLDS_UNDELIVERED,
    STOPPABLE,
    TABLE,
    TAKES_RECONNECT,
    Status,
    StatusCell,
)

S = Status
EDGES = [(a, b) for a, nexts in TABLE.items() for b in nexts]
NON_EDGES = [(a, b) for a in Status for b in Status if a is not b and b not in TABLE[a]]


def test_table_covers_every_status() -> None:
    assert set(TABLE) == set(Status)
    assert all(nexts <= set(Status) for nexts in TABLE.values())


@pytest.mark.parametrize(("a", "b"), EDGES, ids=[f"{a.value}->{b.value}" for a, b in EDGES])
def test_every_edge_moves(a: Status, b: Status) -> None:
    cell = StatusCell(a)
    assert cell.move(a, b) and cell.value is b and cell.history == [a, b]


@pytest.mark.parametrize(("a", "b"), NON_EDGES, ids=[f"{a.value}->{b.value}" for a, b in NON_EDGES])
def test_no_other_move(a: Status, b: Status) -> None:
    cell = StatusCell(a)
    with pytest.raises(ValueError, match=f"from {a.value} to {b.value}"):
        cell.move(a, b)
    assert cell.value is a


def test_a_stale_writer_is_dropped() -> None:
    """A progress callback saying handed-off that arrives after the migration rolled back changes nothing."""
    cell = StatusCell(S.RUNNING)
    assert cell.move(S.RUNNING, S.PREPARING_OUT) and cell.move(S.PREPARING_OUT, S.MIGRATING_OUT)
    assert cell.move(S.MIGRATING_OUT, S.RUNNING)  # aborted before the handoff
    assert not cell.move(S.MIGRATING_OUT, S.HANDED_OFF)
    assert cell.value is S.RUNNING
    assert cell.move((S.PAUSED, S.RUNNING), S.RUNNING)  # one of several expected, and a no-op move


def test_exited_from_anywhere_and_for_good() -> None:
    for st in Status:
        cell = StatusCell(st)
        cell.exited()
        assert cell.value is S.EXITED
    assert not TABLE[S.EXITED]


def test_the_source_never_goes_back_to_running_once_failed() -> None:
    """FAILED (handed off, reconnects gave up) only goes on reconnecting (PAUSED) or exits; running again
    takes an authenticated ABORT, which the enclave reports while handed off, PAUSED or RESUMING."""
    assert TABLE[S.FAILED] == {S.PAUSED, S.EXITED}
    assert {st for st, nexts in TABLE.items() if S.RUNNING in nexts} == {
        S.PREPARING_OUT, S.MIGRATING_OUT, S.HANDED_OFF, S.PAUSED, S.RESUMING, S.INCOMING}


def test_predicates() -> None:
    assert {S.RUNNING, S.PREPARING_OUT, S.MIGRATING_OUT} == CALLABLE  # the enclave refuses once it stops
    assert S.INCOMING in TAKES_RECONNECT and S.ABORTED in TAKES_RECONNECT and S.HANDED_OFF not in TAKES_RECONNECT
    assert HOLDS_UNDELIVERED <= STOPPABLE
    assert S.MIGRATING_OUT not in STOPPABLE and S.INCOMING not in STOPPABLE
