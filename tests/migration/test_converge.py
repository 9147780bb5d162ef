"""When pre-copy rounds stop (migration/strategies/converge.py), as a table: each row is one round's
figures and the rule's answer. No sockets, no heap: the rounds' loop feeds the rule what it measured."""

from __future__ import annotations

import msgspec
import pytest

from constmig.migration.strategies.auto import Auto
from constmig.migration.strategies.converge import Convergence, Ending, Goal
from constmig.migration.strategies.hybrid import Hybrid
from constmig.migration.strategies.precopy import PreCopy
from constmig.wire import control

MiB = 1 << 20


def _rule(max_downtime: float = 0.05, max_rounds: int = 8, max_throttle: float = 0.0) -> Convergence:
    return Convergence(Goal(max_downtime, max_rounds, max_throttle), MiB)


# (round: sent chunks, sent bytes, seconds to the ack, chunks left, tracking lost) -> why the rounds stop
ROUNDS = [
    # 100 MiB in 1 s: 100 MiB/s; 5 chunks left take exactly 50 ms: the goal holds at its bound
    ((100, 100 * MiB, 1.0, 5, False), Ending.FITS),
    ((100, 100 * MiB, 1.0, 6, False), None),  # 60 ms: another round
    ((100, 100 * MiB, 1.0, 80, False), None),  # 80 of 100 left: still shrinking, at the bound
    ((100, 100 * MiB, 1.0, 81, False), Ending.NOT_SHRINKING),
    ((100, 100 * MiB, 1.0, 0, False), Ending.FITS),
    ((100, 100 * MiB, 1.0, 6, True), Ending.TRACKING_LOST),  # lost is named before the shrink it causes
    ((100, 100 * MiB, 1.0, 100, True), Ending.TRACKING_LOST),
    ((100, 100 * MiB, 1.0, 5, True), Ending.FITS),  # what is left fits anyway: that is the reason
    ((0, 0, 1.0, 0, False), Ending.FITS),  # nothing sent and nothing left
]


@pytest.mark.parametrize(("args", "ending"), ROUNDS)
def test_one_round(args: tuple, ending: Ending | None) -> None:
    rule = _rule()
    assert rule.after_round(*args) == ending
    assert rule.ended == ending and rule.round_chunks == [args[0]] and rule.left == args[3]


def test_the_rate_is_the_destinations_and_what_is_left_is_timed_at_it() -> None:
    rule = _rule()
    rule.after_round(100, 100 * MiB, 2.0, 40, False)
    assert rule.rate == 50 * MiB and rule.left_seconds() == pytest.approx(40 / 50)
    assert rule.elapsed == 2.0


def test_before_any_rate_nothing_left_fits_unless_nothing_is_left() -> None:
    rule = _rule()
    assert rule.left_seconds() == 0.0  # no round yet, nothing left: fits at any rate
    # an empty round (nothing allocated when it began) measured no rate: 3 chunks allocated since never fit
    assert rule.after_round(0, 0, 0.5, 3, False) == Ending.NOT_SHRINKING
    assert rule.rate == 0.0 and rule.left_seconds() == float("inf")


def test_an_empty_round_keeps_the_last_rate() -> None:
    rule = _rule(max_rounds=5)
    rule.after_round(100, 100 * MiB, 1.0, 10, False)
    assert rule.after_round(0, 0, 3.0, 6, False) == Ending.NOT_SHRINKING  # 60 ms at the last rate: too long
    assert rule.rate == 100 * MiB and rule.elapsed == 3.0


def test_a_round_timed_at_zero_still_gives_a_finite_rate() -> None:
    rule = _rule()
    rule.after_round(1, MiB, 0.0, 1, False)
    assert rule.elapsed == 1e-6 and rule.rate == MiB / 1e-6


def test_the_rounds_stop_at_their_bound() -> None:
    rule = _rule(max_downtime=0.0, max_rounds=3)
    assert rule.after_round(100, 100 * MiB, 1.0, 80, False) is None
    assert rule.after_round(80, 80 * MiB, 1.0, 64, False) is None
    assert rule.after_round(64, 64 * MiB, 1.0, 51, False) == Ending.MAX_ROUNDS
    assert rule.round_chunks == [100, 80, 64]


def test_a_zero_downtime_goal_is_met_only_by_nothing_left() -> None:
    rule = _rule(max_downtime=0.0)
    assert rule.after_round(10, 10 * MiB, 1.0, 1, False) is None
    assert rule.after_round(1, MiB, 1.0, 0, False) == Ending.FITS


@pytest.mark.parametrize(("strategy", "rounds"), [(PreCopy, 8), (Hybrid, 1)])
def test_the_strategies_defaults(strategy: type, rounds: int) -> None:
    """precopy: at most 8 rounds, hybrid: 1; both aim at a 50 ms stop (README, docs/architecture.md)."""
    goal = Goal.of(control.MigrateOut(), strategy.default_rounds, 1 << 30)
    assert goal == Goal(0.05, rounds, 0.0, 150.0)  # no throttle unless asked for; 150 s a GiB
    rule = Convergence(goal, MiB)
    for n in range(1, rounds + 1):  # always shrinking, never fitting: only the bound stops them
        ending = rule.after_round(1000, 1000 * MiB, 1.0, 500, False)
        assert ending == (Ending.MAX_ROUNDS if n == rounds else None)
    fits = Convergence(goal, MiB)
    assert fits.after_round(1000, 1000 * MiB, 1.0, 50, False) == Ending.FITS  # 50 ms at 1000 MiB/s
    assert Convergence(goal, MiB).after_round(1000, 1000 * MiB, 1.0, 51, False) != Ending.FITS


@pytest.mark.parametrize(("sent", "goal"), [
    ({}, Goal(0.05, 4, 0.0, 150.0)),
    ({"max_rounds": None, "max_downtime": None}, Goal(0.05, 4, 0.0, 150.0)),
    ({"max_rounds": 2}, Goal(0.05, 2, 0.0, 150.0)),
    ({"max_downtime": 0}, Goal(0.0, 4, 0.0, 150.0)),  # zero is a goal (stop only with nothing left), not "unset"
    ({"max_downtime": 1.5, "max_rounds": 100, "max_throttle": 0.9}, Goal(1.5, 100, 0.9, 150.0)),
    ({"completion_timeout": 10}, Goal(0.05, 4, 0.0, 10.0)),
])
def test_the_goal_of_a_request(sent: dict, goal: Goal) -> None:
    req = control.decode({"op": "migrate_out", **sent}, control.MigrateOut)
    assert Goal.of(req, 4, 256 << 20) == goal  # a heap under a GiB gets one GiB's budget


def test_the_figures() -> None:
    rule = _rule()
    rule.after_round(100, 100 * MiB, 1.0, 60, False)
    rule.after_round(60, 60 * MiB, 0.33, 5, False)
    assert rule.figures(1.23456) == {
        "rounds": 2, "round_chunks": [100, 60], "rounds_ended": "fits", "throttle": [0.0, 0.0], "precopy_s": 1.2346,
        "dirty_rate": 15.2,  # chunks left per second of the last round: 5 / 0.33
        "precopy_rate_gbps": 0.191,  # 60 MiB in 0.33 s
    }
    assert msgspec.json.decode(msgspec.json.encode(rule.figures(0.0)))["rounds_ended"] == "fits"
    assert _rule().figures(0.0)["rounds_ended"] is None


# --- the throttle ---------------------------------------------------------------------------------------


def test_without_a_cap_a_round_that_does_not_shrink_ends_the_rounds() -> None:
    rule = _rule(max_downtime=0.0)
    assert rule.after_round(100, 100 * MiB, 1.0, 90, False) == Ending.NOT_SHRINKING
    assert rule.throttle == 0.0 and rule.throttles == [0.0]


def test_the_throttle_starts_gently_steps_up_while_the_set_does_not_shrink_and_stops_at_its_cap() -> None:
    rule = _rule(max_downtime=0.0, max_rounds=20, max_throttle=0.45)
    steps = []
    for _ in range(4):  # the writer barely outruns the link (90 of 100 written again): never shrinking
        assert rule.after_round(100, 100 * MiB, 1.0, 90, False) is None
        steps.append(rule.throttle)
    assert steps == [0.2, 0.3, 0.4, 0.45]
    assert rule.own_rate == 90 and rule.write_limit() == pytest.approx(90 * 0.55)
    assert rule.after_round(100, 100 * MiB, 1.0, 90, False) == Ending.NOT_SHRINKING  # at the cap: stop
    assert rule.throttles == [0.0, 0.2, 0.3, 0.4, 0.45] and rule.throttle == 0.0, "lifted when the rounds end"
    assert rule.write_limit() is None


def test_the_apps_own_pace_is_measured_once_before_any_throttle() -> None:
    rule = _rule(max_downtime=0.0, max_throttle=0.9)
    assert rule.after_round(100, 100 * MiB, 2.0, 90, False) is None  # 45 new chunks a second, the link 50
    assert rule.own_rate == 45 and rule.throttle == 0.2  # what is enough (0.11) is less than the start
    assert rule.after_round(90, 90 * MiB, 1.0, 85, False) is None  # throttled: writes less, not its own pace
    assert rule.own_rate == 45 and rule.write_limit() == pytest.approx(45 * (1 - rule.throttle))
    assert rule.figures(0.0)["unthrottled_dirty_rate"] == 45.0
    third = _rule(max_downtime=0.0, max_throttle=0.9)
    third.after_round(100, 100 * MiB, 3.0, 100, False)
    assert third.figures(0.0)["unthrottled_dirty_rate"] == 33.3


def test_a_goal_is_a_value_and_lost_tracking_must_be_said() -> None:
    assert hash(Goal()) == hash(Goal()) and Goal() == Goal(0.05, 8, 0.0)
    assert _rule(max_downtime=0.0).after_round(10, 10 * MiB, 1.0, 5) is None  # not lost unless said


def test_a_writer_far_ahead_of_the_link_gets_enough_throttle_at_once() -> None:
    """It wrote 400 chunks a second while the link took 100: to shrink, the next round may see at most 80
    new chunks a second, a throttle of 0.8 (not 0.2, then 0.3...)."""
    rule = _rule(max_downtime=0.0, max_throttle=0.9)
    assert rule.after_round(100, 100 * MiB, 1.0, 400, False) is None  # (a heap of that many chunks)
    assert rule.throttle == pytest.approx(0.8) and rule.write_limit() == pytest.approx(80)
    assert rule.after_round(400, 400 * MiB, 4.0, 350, False) is None  # still not shrinking: one step more
    assert rule.throttle == pytest.approx(0.9)  # the cap


# (chunks sent so far, seconds, chunks the app newly wrote meanwhile, cap) -> the throttle from the probe
PROBES = [
    ((25, 0.25, 13, 0.9), 0.2),  # 52 a second against 100 carried: over half, so the start (enough: 0)
    ((25, 0.25, 12, 0.9), None),  # 48 a second: the round would shrink below half, left alone
    ((25, 0.25, 100, 0.9), 0.8),  # 400 a second: what is enough at once (1 - 0.8 * 100 / 400)
    ((25, 0.25, 1000, 0.9), 0.9),  # far ahead: the cap
    ((25, 0.25, 100, 0.1), 0.1),  # a cap below the start
    ((25, 0.25, 100, 0.0), None),  # no throttle allowed: nothing to start
    ((25, 0.25, 0, 0.9), None),  # a reader
    ((0, 0.25, 100, 0.9), None),  # nothing sent yet: no rate to compare with
]


@pytest.mark.parametrize(("args", "throttle"), PROBES)
def test_the_first_rounds_probe_throttles_a_writer_that_would_write_again_over_half_of_it(
        args: tuple, throttle: float | None) -> None:
    sent, seconds, written, cap = args
    rule = _rule(max_downtime=0.0, max_throttle=cap)
    assert rule.probe(sent, seconds, written) is (throttle is not None)
    assert rule.throttle == pytest.approx(throttle or 0.0)
    if throttle is not None:
        assert rule.own_rate == pytest.approx(written / seconds) and rule.figures(0.0)["throttle_from"] == "probe"
        assert rule.write_limit() == pytest.approx(written / seconds * (1 - throttle))
    else:
        assert rule.write_limit() is None and "throttle_from" not in rule.figures(0.0)


def test_the_probe_is_the_first_rounds_alone_and_its_throttle_steps_up_like_any_other() -> None:
    rule = _rule(max_downtime=0.0, max_throttle=0.9)
    assert rule.probe(25, 0.25, 13) and rule.throttle == 0.2
    assert not rule.probe(25, 0.25, 100), "once started, the rounds decide"
    assert rule.after_round(100, 100 * MiB, 1.0, 90, False) is None  # round 1 still did not shrink
    assert rule.throttles == [0.2] and rule.throttle == pytest.approx(0.3) and rule.own_rate == 52
    later = _rule(max_downtime=0.0, max_throttle=0.9)
    later.after_round(100, 100 * MiB, 1.0, 50, False)
    assert not later.probe(25, 0.25, 1000), "only the first round is probed"


def test_the_throttle_holds_while_the_rounds_shrink_and_is_lifted_when_they_end() -> None:
    rule = _rule(max_downtime=0.05, max_throttle=0.9)
    assert rule.after_round(100, 100 * MiB, 1.0, 95, False) is None and rule.throttle == 0.2  # enough: 0.16
    assert rule.after_round(95, 95 * MiB, 1.0, 60, False) is None and rule.throttle == 0.2  # shrinking: held
    assert rule.after_round(60, 60 * MiB, 1.0, 2, False) == Ending.FITS
    assert rule.throttle == 0.0 and rule.throttles == [0.0, 0.2, 0.2]
    assert rule.figures(0.0)["throttle"] == [0.0, 0.2, 0.2]


@pytest.mark.parametrize("ending", [Ending.MAX_ROUNDS, Ending.TRACKING_LOST])
def test_the_throttle_never_outlives_the_rounds(ending: Ending) -> None:
    rule = _rule(max_downtime=0.0, max_rounds=2, max_throttle=0.9)
    assert rule.after_round(100, 100 * MiB, 1.0, 90, False) is None and rule.throttle == 0.2
    assert rule.after_round(100, 100 * MiB, 1.0, 90, ending is Ending.TRACKING_LOST) == ending
    assert rule.throttle == 0.0


def test_a_cap_below_the_start_is_the_first_step() -> None:
    rule = _rule(max_downtime=0.0, max_throttle=0.1)
    assert rule.after_round(100, 100 * MiB, 1.0, 100, False) is None and rule.throttle == 0.1
    assert rule.after_round(100, 100 * MiB, 1.0, 100, False) == Ending.NOT_SHRINKING


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), 2])
def test_the_request_bounds_the_cap(bad: float) -> None:
    with pytest.raises(control.BadRequest, match="max_throttle must be a share from 0 to 0.99"):
        control.decode({"op": "migrate_out", "max_throttle": bad}, control.MigrateOut)


@pytest.mark.parametrize(("heap", "budget"), [(1 << 20, 30.0), (1 << 30, 30.0), (3 << 30, 90.0)])
def test_the_budget_is_per_gib_of_heap_and_at_least_one_gibs_worth(heap: int, budget: float) -> None:
    req = control.decode({"op": "migrate_out", "completion_timeout": 30}, control.MigrateOut)
    assert Goal.of(req, 8, heap).budget_s == budget


def test_the_rounds_end_when_the_budget_is_spent() -> None:
    rule = Convergence(Goal(0.0, 20, 0.9, budget_s=2.5), MiB)
    assert rule.after_round(100, 100 * MiB, 1.0, 100, False) is None and rule.budget_left() == 1.5
    assert rule.after_round(100, 100 * MiB, 1.0, 100, False) is None and rule.budget_left() == 0.5
    assert rule.after_round(100, 100 * MiB, 1.0, 10, False) == Ending.BUDGET and rule.budget_left() == 0.0
    assert rule.throttle == 0.0  # lifted
    fits = Convergence(Goal(0.05, 20, 0.0, budget_s=1.0), MiB)
    assert fits.after_round(100, 100 * MiB, 1.0, 0, False) == Ending.FITS  # fitting wins: nothing is left


@pytest.mark.parametrize("bad", [0, -1, float("inf")])
def test_the_request_bounds_the_budget(bad: float) -> None:
    with pytest.raises(control.BadRequest, match="completion_timeout"):
        control.decode({"op": "migrate_out", "completion_timeout": bad}, control.MigrateOut)


def test_a_round_that_measured_no_rate_starts_the_throttle_gently() -> None:
    """Nothing sent (nothing allocated when it began), chunks written since: no rate to judge what is
    enough by, so the throttle starts where it always does."""
    rule = _rule(max_downtime=0.0, max_throttle=0.9)
    assert rule.after_round(0, 0, 1.0, 5, False) is None and rule.throttle == 0.2


def test_the_budget_ends_the_rounds_when_spent_exactly() -> None:
    rule = Convergence(Goal(0.0, 20, 0.0, budget_s=2.0), MiB)
    assert rule.after_round(100, 100 * MiB, 1.0, 70, False) is None
    assert rule.after_round(70, 70 * MiB, 1.0, 40, False) == Ending.BUDGET


@pytest.mark.parametrize(("left", "hinted"), [(51, True), (50, False), (10, False)])
def test_auto_says_stop_and_copy_would_do_as_well_only_when_most_of_the_heap_is_left(left: int, hinted: bool) -> None:
    """Auto's decision after rounds that stopped shrinking at its cap: it switches, and names
    stop-and-copy only when more than half of the heap was written again (the rounds bought little)."""
    rule = _rule(max_throttle=0.05)
    rule.after_round(100, 100 * MiB, 1.0, 90, False)  # does not shrink: throttle to the cap
    assert rule.after_round(100, 100 * MiB, 1.0, 90, False) == Ending.NOT_SHRINKING
    rule.left = left  # what the last scan found, of a heap of 100 chunks
    out = Auto().decided(rule, 100)
    assert out["decision"] == "switched" and "stopped shrinking at throttle 0.05" in out["decision_why"]
    assert f"the {left} chunks left" in out["decision_why"]
    assert ("decision_hint" in out) == hinted
    if hinted:
        assert "stop-and-copy would have moved it" in out["decision_hint"] and "51%" in out["decision_hint"]


def test_auto_converged_names_the_throttle_it_took() -> None:
    rule = _rule(max_throttle=0.9)
    rule.after_round(100, 100 * MiB, 1.0, 90, False)
    assert rule.after_round(90, 90 * MiB, 1.0, 3, False) == Ending.FITS
    out = Auto().decided(rule, 100)
    assert out["decision"] == "converged" and "decision_hint" not in out
    assert "3 chunks were left" in out["decision_why"] and f"throttled up to {max(rule.throttles):.2f}" in out["decision_why"]


def test_auto_aims_at_10ms_and_still_finishes_up_to_50ms_unless_the_operator_named_a_downtime() -> None:
    unset = control.decode({"op": "migrate_out"}, control.MigrateOut)
    asked = control.decode({"op": "migrate_out", "max_downtime": 0.005}, control.MigrateOut)
    assert Goal.of(unset, 8, MiB, 0.9, 0.01, 0.05).finish_s == 0.05
    assert Goal.of(asked, 8, MiB, 0.9, 0.01, 0.05).finish_s == 0.005  # the operator's bound is both
    assert Goal.of(unset, 8, MiB).finish_s == 0.05 and Goal(0.02).finish_s == 0.02  # others: the goal itself
    assert Goal(0.02, finish_within=0.01).finish_s == 0.02  # never below the goal


@pytest.mark.parametrize(("left", "max_rounds", "ended", "decision"), [
    (9, 8, Ending.FITS, "converged"),  # 9 chunks at 1 GiB/s: 8.8 ms, within the 10 ms goal
    (40, 8, Ending.NOT_SHRINKING, "finished"),  # 39 ms: short of the goal, within the finish bound
    (60, 8, Ending.NOT_SHRINKING, "switched"),  # 59 ms: past it
    (40, 1, Ending.MAX_ROUNDS, "finished"),
])
def test_auto_finishes_a_small_set_the_throttle_could_not_shrink(left: int, max_rounds: int, ended: Ending,
                                                                 decision: str) -> None:
    """A hot set the rounds keep resending (a hash join's aggregates, rewritten by every call) goes with the
    small state when it is small: a switch would leave exactly the chunks the app touches first missing."""
    rule = Convergence(Goal(0.01, max_rounds, 0.0, finish_within=0.05), MiB)
    rule.after_round(1024, 1024 * MiB, 1.0, left, False)  # 1 GiB/s
    if rule.ended is None:  # the same set again: not shrinking
        rule.after_round(left, left * MiB, left / 1024, left, False)
    assert rule.ended is ended
    auto = Auto()
    assert auto.finishes(rule) == (decision != "switched")
    out = auto.decided(rule, 1024)
    assert out["decision"] == decision, out
    if decision == "finished":
        assert f"{left} chunks were left when the rounds ended ({ended})" in out["decision_why"]
        assert "at most 50 ms" in out["decision_why"]


def test_auto_switches_when_tracking_was_lost_however_little_seemed_left() -> None:
    rule = Convergence(Goal(0.0, 8, 0.0, finish_within=0.05), MiB)
    rule.after_round(100, 100 * MiB, 1.0, 1, True)
    assert rule.ended is Ending.TRACKING_LOST and not Auto().finishes(rule)
