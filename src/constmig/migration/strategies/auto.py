"""Auto: pre-copy rounds with the writers throttled until they converge, then a pre-copy finish or the
ConstMig switch for whatever is left; the figures say what it decided and on what.

The rounds are precopy's (up to 8, ending on the downtime goal, the completion budget, or a round that
does not shrink) with `--max-throttle` 0.9 unless the operator names another cap: a writer that outruns
the link is held to a dirty-rate limit inside the enclave until the rounds shrink (converge.py,
enclave/throttle.py). Then:

* converged (what is left fits the downtime goal, 10 ms unless the operator names one): it finishes as
  pre-copy, the rest going with the small state, so after COMMIT the destination needs nothing from the
  source (no demand fault, whose latency under load was the longest client gap of a post-copy switch);
* finished: the rounds ended short of the goal with at most 50 ms left (an operator's --max-downtime is
  this bound too): the same finish, for the hot set the throttle could not shrink;
* otherwise: it switches as hybrid does, what the rounds left arriving by demand and stream; for a
  writer that rewrites most of its heap faster than the link carries it even at the cap, the figures
  say that stop-and-copy would have moved it with a similar gap, and what would make the rounds converge.

The destination is prepared with a post-copy tracker either way; chunks that arrive with the small state
go in through it (trackers/: UFFDIO_COPY, or the Access Tracker's install).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from constmig.migration.strategies.converge import DEFAULT_MAX_DOWNTIME_S, MAX_ROUNDS, Convergence, Ending
from constmig.migration.strategies.hybrid import Hybrid
from constmig.migration.strategies.rounds import Rounds
from constmig.migration.strategies.stopcopy import send_chunks

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link
    from constmig.migration.strategies.base import Before, Progress

AUTO_MAX_THROTTLE = 0.9
AUTO_MAX_DOWNTIME_S = 0.01  # the goal the throttle works toward: an outage clients do not notice
AUTO_FINISH_S = DEFAULT_MAX_DOWNTIME_S  # short of the goal, what is left still goes with the small state up to this
MOSTLY = 0.5  # a switch that leaves more than this share of the heap missing: the rounds bought little


class Auto(Hybrid):
    name = "auto"
    summary = ("rounds with the writers throttled until they converge (at most 0.9), then finish as pre-copy, "
               "or switch as post-copy for what is left")
    default_rounds = MAX_ROUNDS
    default_throttle = AUTO_MAX_THROTTLE
    default_downtime = AUTO_MAX_DOWNTIME_S
    default_finish = AUTO_FINISH_S
    removed_edges = {}  # chunks with the small state (a pre-copy finish) and after the switch (post-copy)

    def finishes(self, rule: Convergence) -> bool:
        """Converged (what is left fits the downtime goal), or the rounds ended short of it with what would
        go within the goal's finish bound (50 ms unless the operator named a --max-downtime): it goes with
        the small state, and after COMMIT the destination needs nothing from the source. A small set the
        throttle could not shrink is the app's hottest memory, which a post-copy switch would fetch by
        demand at once, one fault after another."""
        return rule.ended is Ending.FITS or (rule.ended is not Ending.TRACKING_LOST
                                             and rule.left_seconds() <= rule.goal.finish_s)

    def send_before_handoff(self, link: Link, ledger: ChunkLedger, heap: Heap, progress: Progress,
                            before: Before) -> None:
        if isinstance(before, Rounds) and before.finish:
            send_chunks(link, ledger, heap, ledger.missing(), progress, "copy")

    def decided(self, rule: Convergence, n_chunks: int) -> dict[str, Any]:
        throttle = max(rule.throttles, default=0.0)
        if rule.ended is Ending.FITS:
            return {"decision": "converged",
                    "decision_why": f"{rule.left} chunks were left, within the downtime goal at the measured rate"
                                    + (f" (writers throttled up to {throttle:.2f})" if throttle else "")
                                    + "; they went with the small state, as pre-copy finishes"}
        if self.finishes(rule):
            return {"decision": "finished",
                    "decision_why": f"{rule.left} chunks were left when the rounds ended ({rule.ended}), more than the "
                                    f"downtime goal allows but at most {rule.goal.finish_s * 1000:.0f} ms at the measured rate: "
                                    "they went with the small state, as pre-copy finishes"}
        why = {Ending.NOT_SHRINKING: f"the rounds stopped shrinking at throttle {throttle:.2f}, the cap",
               Ending.MAX_ROUNDS: f"{len(rule.round_chunks)} rounds did not converge",
               Ending.BUDGET: "the completion budget ran out",
               Ending.TRACKING_LOST: "write tracking was lost"}.get(rule.ended, str(rule.ended))
        out = {"decision": "switched", "decision_why": f"{why}; post-copy carries the {rule.left} chunks left"}
        if rule.left > MOSTLY * n_chunks:
            out["decision_hint"] = (f"this app wrote {rule.left / n_chunks:.0%} of its heap again during a round "
                                    "even with its writers held: stop-and-copy would have moved it with a similar "
                                    "gap; a higher --max-throttle or a faster link lets the rounds converge")
        return out
