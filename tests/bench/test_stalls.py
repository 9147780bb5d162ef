"""bench/stalls.py: the probe notes a stop of the machine under the runs, and the suite takes the
hypervisor's stops out of the client's gaps (and nothing else)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from constmig.bench.harness import Moved
from constmig.bench.loadgen import LONG_GAP_MS, LoadReport
from constmig.bench.stalls import Stall, StallWatch, frozen_overlap
from constmig.bench.suite import stalled


def test_the_probe_notes_a_stop_and_its_steal():
    """A stopped probe wakes late: the stop is noted when it began, with its length and the steal of that
    time (which cannot exceed it)."""
    with StallWatch() as watch:
        time.sleep(0.2)
        assert watch._proc is not None
        t0 = time.time()
        os.kill(watch._proc.pid, signal.SIGSTOP)
        time.sleep(0.15)
        os.kill(watch._proc.pid, signal.SIGCONT)
        seen = watch.within(t0 - 0.01, time.time())
    mine = [s for s in seen if s.seconds >= 0.14]
    assert mine, seen
    assert mine[0].at == pytest.approx(t0, abs=0.05)
    assert 0.14 <= mine[0].seconds < 1.0 and 0.0 <= mine[0].steal_s <= mine[0].seconds + 0.02


def test_frozen_overlap_counts_only_the_hypervisors_stops_inside_the_gap():
    stalls = [Stall(10.0, 0.1, 0.1), Stall(11.0, 0.1, 0.0), Stall(12.05, 0.1, 0.09)]
    assert frozen_overlap(stalls, 9.95, 0.2) == pytest.approx(0.1)  # the whole first stop
    assert frozen_overlap(stalls, 11.0, 0.2) == 0.0  # a wait for a core, not stolen
    assert frozen_overlap(stalls, 12.0, 0.1) == pytest.approx(0.05)  # half of the third
    assert frozen_overlap(stalls, 20.0, 1.0) == 0.0


class _Watch:
    def __init__(self, stalls: list[Stall]) -> None:
        self.stalls = stalls

    def within(self, t0: float, t1: float) -> list[Stall]:
        return [s for s in self.stalls if s.at < t1 and s.at + s.seconds > t0]


def _moved(gaps: list[tuple[float, float]]) -> Moved:
    longest = max(gaps, key=lambda g: g[1])
    report = LoadReport(max_gap_ms=longest[1], gap_at=longest[0],
                        long_gaps=[g for g in gaps if g[1] >= LONG_GAP_MS])
    moved = Moved({}, None, 100.0, 102.0, [])
    moved.report = report
    return moved


def test_a_gap_the_machine_stood_still_for_shrinks_and_the_next_longest_counts():
    moved = _moved([(100.5, 110.0), (101.2, 45.0), (101.5, 5.0)])
    out = stalled(_Watch([Stall(100.5, 0.1, 0.1)]), moved, 0.5)  # type: ignore[arg-type]
    assert out["machine_stalls"] == [[0.5, 100.0, 100.0]]
    assert out["client_gap_frozen_ms"] == pytest.approx(100.0)
    assert out["client_gap_unfrozen_ms"] == pytest.approx(45.0)  # the other gap is now the longest


def test_a_stop_the_hypervisor_did_not_take_stays_in_the_gap():
    moved = _moved([(100.5, 110.0), (101.2, 45.0)])
    out = stalled(_Watch([Stall(100.5, 0.1, 0.0)]), moved, 0.5)  # type: ignore[arg-type]
    assert out["client_gap_frozen_ms"] == 0.0
    assert out["client_gap_unfrozen_ms"] == pytest.approx(110.0)


def test_a_gap_that_shrinks_below_the_kept_ones_reads_as_their_bound():
    moved = _moved([(100.5, 105.0)])
    out = stalled(_Watch([Stall(100.5, 0.1, 0.1)]), moved, 0.5)  # type: ignore[arg-type]
    assert out["client_gap_unfrozen_ms"] == LONG_GAP_MS  # 5 ms left of it; shorter gaps were not kept
