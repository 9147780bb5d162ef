"""When pre-copy rounds stop: a pure rule over what each round measured, apart from the sockets and the
heap so that it can be read as a table and tested as one (tests/migration/test_converge.py).

A round ends at the destination's acknowledgement, so its rate is the rate the destination takes chunks
in, not the rate the source writes them into a socket buffer. After each round the rule looks at what the
app wrote since its chunks were sent (`left`) and stops the rounds, saying why, when:

* `fits`: what is left would go within `max_downtime` at the last measured rate (the goal);
* `budget`: the rounds used their time budget (`completion_timeout` seconds per GiB of heap, at least one
  GiB's worth: KubeVirt's completionTimeoutPerGiB); a round the destination does not acknowledge within
  what is left of it ends the migration before the stop, the app at full speed;
* `tracking-lost`: the write tracker gave up (enclave/dirty.py): every chunk counts as written from then
  on, so no round could shrink;
* `max-rounds`: the rounds reached their bound (precopy 8, hybrid 1, `--rounds` to change it);
* `not-shrinking`: the round left more than `SHRINK` of the chunks it sent: the app writes as fast as the
  link carries, and another round would only send the same chunks again. With a throttle allowed
  (`max_throttle` > 0), such a round instead raises the throttle and another round follows, until the
  throttle is at its cap.

The throttle (QEMU's auto-converge and dirty-limit, applied inside the enclave to the calls that write:
enclave/throttle.py) takes a share of the app's own write pace away: the app may newly write chunks at
(1 - share) times the rate it wrote them in the round that first did not shrink (`write_limit`), so
writers slow down and readers keep their pace. On the first round that did not shrink it starts at
`THROTTLE_START`, or at once at what would let the next round shrink (the app newly writing at most
`TARGET_SHARE` of the chunks the link carries), whichever is more; each further round
that does not shrink adds `THROTTLE_STEP` (or again what is enough). It holds while the rounds shrink,
never passes the operator's cap, and is lifted the moment the rounds end (the stop, a cancel, any
failure).

A writer far ahead of the link need not cost a whole unthrottled round first (the round that would re-send
most of the heap, and the longest part of such a migration). Part way into the first round
(`PROBE_SHARE` of its chunks, at least `PROBE_MIN_S`) the rounds look once at how fast the app has newly
written chunks against how fast the round sends them (`probe`): an app that would write again more than
`THROTTLE_AT` of what the round sends (QEMU's auto-converge trigger: dirtied bytes over 50% of those sent)
gets the throttle from there on, as a round that did not shrink would. A hot set (hashjoin's 80 chunks)
stops adding new chunks long before the probe, so it reads slow and is left alone.

The reason is a figure (`rounds_ended`), so an operator sees why a migration stopped when it did, and so
is the throttle of each round (`throttle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from constmig.wire import control

MAX_ROUNDS = 8  # precopy's default bound: a workload that writes faster than the link still stops
DEFAULT_MAX_DOWNTIME_S = 0.05
SHRINK = 0.8  # a round must leave at most this share of the chunks it sent, or the rounds stop
GiB = 1 << 30
MIN_ELAPSED_S = 1e-6  # a round timed at zero (a coarse clock) still gives a finite rate
THROTTLE_START = 0.2  # QEMU's cpu-throttle-initial
THROTTLE_STEP = 0.1  # QEMU's cpu-throttle-increment
TARGET_SHARE = SHRINK  # a throttled app may newly write this share of the chunks the link carries
THROTTLE_AT = 0.5  # the first round's probe throttles an app that writes again more than this share of it
PROBE_SHARE = 0.25  # the probe comes after this share of the first round's chunks...
PROBE_MIN_S = 0.1  # ...and at least this long into it (a pace measured over less is mostly noise)


class Ending(StrEnum):
    """Why the rounds stopped (the first that holds, in this order)."""

    FITS = "fits"
    BUDGET = "budget"
    MAX_ROUNDS = "max-rounds"
    NOT_SHRINKING = "not-shrinking"
    TRACKING_LOST = "tracking-lost"


@dataclass(frozen=True)
class Goal:
    """What the operator asked of the rounds (the request was checked by wire/control.py)."""

    max_downtime: float = DEFAULT_MAX_DOWNTIME_S
    max_rounds: int = MAX_ROUNDS
    max_throttle: float = 0.0  # the share of the app's write pace the throttle may take away; 0: never
    budget_s: float = float("inf")  # the rounds' time, from the first round's start
    finish_within: float | None = None  # auto's: what may still go at the stop when the rounds end short of
    # max_downtime (None: max_downtime itself; an operator's --max-downtime is both)

    @classmethod
    def of(cls, req: control.MigrateOut, default_rounds: int, heap_bytes: int, default_throttle: float = 0.0,
           default_downtime: float = DEFAULT_MAX_DOWNTIME_S, default_finish: float | None = None) -> Goal:
        """The request's goal; an unset or None option takes the strategy's default."""
        asked = isinstance(req.max_downtime, (int, float))
        downtime = req.max_downtime if asked else default_downtime
        rounds = req.max_rounds if isinstance(req.max_rounds, int) else default_rounds
        throttle = req.max_throttle if isinstance(req.max_throttle, (int, float)) else default_throttle
        budget = req.completion_timeout * max(1.0, heap_bytes / GiB)
        return cls(float(downtime), rounds, float(throttle), budget, None if asked else default_finish)

    @property
    def finish_s(self) -> float:
        """The most that may go at the stop, whatever ended the rounds (auto's finish as pre-copy)."""
        return self.max_downtime if self.finish_within is None else max(self.max_downtime, self.finish_within)


@dataclass
class Convergence:
    """The rounds' figures so far, and the rule that stops them."""

    goal: Goal
    chunk_size: int
    round_chunks: list[int] = field(default_factory=list)  # chunks sent per round
    rate: float = 0.0  # bytes per second the destination took, in the last round that sent any
    left: int = 0  # chunks written since sent, at the last round's scan
    elapsed: float = MIN_ELAPSED_S  # the last round's time
    ended: Ending | None = None
    throttle: float = 0.0  # what the next round runs at
    throttles: list[float] = field(default_factory=list)  # what each round ran at
    own_rate: float = 0.0  # chunks per second the app newly wrote: at the probe, or in the round that first did not shrink
    spent: float = 0.0  # the rounds' time so far
    probed: bool = False  # the first round's probe started the throttle

    def after_round(self, sent_chunks: int, sent_bytes: int, elapsed: float, left: int,
                    lost: bool = False) -> Ending | None:
        """A round sent `sent_chunks` (`sent_bytes` of records) in `elapsed` seconds, to the destination's
        acknowledgement, and its scan found `left` chunks to send again. Why the rounds stop now, or None
        for another round."""
        self.round_chunks.append(sent_chunks)
        self.throttles.append(self.throttle)
        self.elapsed = max(elapsed, MIN_ELAPSED_S)
        self.spent += self.elapsed
        if sent_bytes:  # an empty round measures nothing: the last rate stands
            self.rate = sent_bytes / self.elapsed
        self.left = left
        self.ended = self._ending(sent_chunks, left, lost)
        if self.ended is Ending.NOT_SHRINKING and self.throttle < self.goal.max_throttle:
            self.ended = None  # slow the writers down and try again
            if self.throttle == 0:
                self.own_rate = left / self.elapsed  # its own pace, before any throttle
            step = THROTTLE_START if self.throttle == 0 else self.throttle + THROTTLE_STEP
            self.throttle = round(min(self.goal.max_throttle, max(step, self._enough())), 6)
        if self.ended is not None:
            self.throttle = 0.0  # lifted the moment the rounds end
        return self.ended

    def probe(self, sent_chunks: int, elapsed: float, written: int) -> bool:
        """Part way into the first round: `sent_chunks` sent in `elapsed` seconds while the app newly
        wrote `written` chunks. Whether the throttle starts now (`write_limit` then says how much)."""
        if self.round_chunks or self.throttle or not self.goal.max_throttle or not sent_chunks or not written:
            return False
        elapsed = max(elapsed, MIN_ELAPSED_S)
        pace, carried = written / elapsed, sent_chunks / elapsed
        if pace <= THROTTLE_AT * carried:
            return False
        self.own_rate, self.probed = pace, True
        self.throttle = round(min(self.goal.max_throttle, max(THROTTLE_START, self._enough(carried))), 6)
        return True

    def _enough(self, carried: float | None = None) -> float:
        """The throttle under which the next round would just shrink: it takes the chunks left in
        left * chunk / rate seconds, while the app may newly write only TARGET_SHARE of what the link
        carries meanwhile (`carried` chunks/s; the last round's rate unless given). Small for a writer
        that barely outruns the link, large for one far ahead."""
        carried = self.rate / self.chunk_size if carried is None else carried
        if not carried or not self.own_rate:
            return 0.0
        return 1 - TARGET_SHARE * carried / self.own_rate

    def write_limit(self) -> float | None:
        """Chunks per second the app may newly write in the next round (its own pace less the throttle's
        share), or None for no limit."""
        return self.own_rate * (1 - self.throttle) if self.throttle else None

    def budget_left(self) -> float:
        """Seconds of the rounds' budget not spent yet (never negative)."""
        return max(0.0, self.goal.budget_s - self.spent)

    def left_seconds(self) -> float:
        """How long what is left would take at the last measured rate (nothing takes no time; something,
        before any rate was measured, forever)."""
        if not self.left:
            return 0.0
        return self.left * self.chunk_size / self.rate if self.rate else float("inf")

    def _ending(self, sent_chunks: int, left: int, lost: bool) -> Ending | None:
        if self.left_seconds() <= self.goal.max_downtime:
            return Ending.FITS
        if lost:
            return Ending.TRACKING_LOST
        if self.spent >= self.goal.budget_s:
            return Ending.BUDGET
        if len(self.round_chunks) >= self.goal.max_rounds:
            return Ending.MAX_ROUNDS
        if left > SHRINK * sent_chunks:
            return Ending.NOT_SHRINKING
        return None

    def figures(self, precopy_s: float) -> dict[str, Any]:
        """What the rounds report (the migration's figures; `precopy_s` from the first scan's arming)."""
        return {"rounds": len(self.round_chunks), "round_chunks": list(self.round_chunks),
                "rounds_ended": None if self.ended is None else self.ended.value,
                "throttle": list(self.throttles),
                **({"unthrottled_dirty_rate": round(self.own_rate, 1)} if self.own_rate else {}),
                **({"throttle_from": "probe"} if self.probed else {}),
                "precopy_s": round(precopy_s, 4), "dirty_rate": round(self.left / self.elapsed, 1),
                "precopy_rate_gbps": round(self.rate / 1e9, 3)}
