"""Auto: pre-copy rounds with the writers throttled until they converge, then the ConstMig switch for
whatever is left; the figures say what it decided and on what.

The rounds are precopy's (up to 8, ending on the downtime goal, the completion budget, or a round that
does not shrink) with `--max-throttle` 0.9 unless the operator names another cap: a writer that outruns
the link is held to a dirty-rate limit inside the enclave until the rounds shrink (converge.py,
enclave/throttle.py). Then it switches as hybrid does: what the rounds left is missing at the
destination and arrives by demand and stream, which takes milliseconds when they converged. When they
did not (a writer that rewrites most of its heap faster than the link carries it even at the cap),
post-copy carries the rest, and the figures say that stop-and-copy would have moved it with a similar
gap and what would have made the rounds converge.
"""

from __future__ import annotations

from typing import Any

from constmig.migration.strategies.converge import MAX_ROUNDS, Convergence, Ending
from constmig.migration.strategies.hybrid import Hybrid

AUTO_MAX_THROTTLE = 0.9
MOSTLY = 0.5  # a switch that leaves more than this share of the heap missing: the rounds bought little


class Auto(Hybrid):
    name = "auto"
    summary = ("rounds with the writers throttled until they converge (at most 0.9), then switch as post-copy "
               "for what is left")
    default_rounds = MAX_ROUNDS
    default_throttle = AUTO_MAX_THROTTLE

    def decided(self, rule: Convergence, n_chunks: int) -> dict[str, Any]:
        throttle = max(rule.throttles, default=0.0)
        if rule.ended is Ending.FITS:
            return {"decision": "converged",
                    "decision_why": f"{rule.left} chunks were left, within the downtime goal at the measured rate"
                                    + (f" (writers throttled up to {throttle:.2f})" if throttle else "")
                                    + "; they go after the switch"}
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
