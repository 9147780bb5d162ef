"""A destination giving up before COMMIT, as the order of its steps (no sockets): the pending lineage is
destroyed before anything can tell the source to run again, and if it cannot be destroyed nothing does."""

from __future__ import annotations

from typing import Any

from constmig.migration.destination import _give_up


class FakeEnclave:
    def __init__(self, steps: list, fail: bool = False) -> None:
        self.steps, self.fail = steps, fail

    def forget_lineage(self) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.steps.append("forget")

    def give_up_incoming(self, tombstone: Any) -> None:
        self.steps.append(("wipe", "tombstone" if tombstone is not None else None))


class FakeLink:
    def __init__(self, steps: list) -> None:
        self.steps = steps

    def abort(self, reason: str) -> None:
        self.steps.append("abort")


class FakeWaiter:
    def __init__(self, steps: list) -> None:
        self.steps = steps

    def decide(self, what: str, reason: str = "") -> None:
        self.steps.append(f"decide {what}")

    def close(self) -> None:
        self.steps.append("close waiter")


def run(fail: bool = False, told: bool = False) -> list:
    steps: list = []  # every fake's steps, in order
    _give_up(FakeEnclave(steps, fail), FakeLink(steps), FakeWaiter(steps), "no COMMIT", told)  # type: ignore[arg-type]
    return steps


def test_the_lineage_goes_before_the_abort() -> None:
    assert run() == ["forget", "abort", "decide abort", ("wipe", "tombstone")]


def test_a_source_that_aborted_is_not_told_again() -> None:
    assert run(told=True) == ["forget", "decide abort", ("wipe", "tombstone")]


def test_a_lineage_that_cannot_be_destroyed_keeps_the_source_from_running() -> None:
    """No ABORT on the link, no tombstone to answer reconnects with one: the source stays stranded (safe),
    and the release code it was given may still complete the lineage here."""
    assert run(fail=True) == ["close waiter", ("wipe", None)]
