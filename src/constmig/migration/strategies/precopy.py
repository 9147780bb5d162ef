"""Pre-copy: rounds while the app runs (rounds.py), then the stop sends every chunk the destination does
not hold current, with the small state. After COMMIT the destination depends on nothing from the
source, as with stop-and-copy."""

from __future__ import annotations

from constmig.migration.strategies.rounds import RoundsMixin
from constmig.migration.strategies.stopcopy import NO_CHUNK_AFTER_COMMIT, StopAndCopy


class PreCopy(RoundsMixin, StopAndCopy):
    name = "precopy"
    summary = "send the heap in rounds while the app runs, each round what was written since; stop for the rest"
    removed_edges = NO_CHUNK_AFTER_COMMIT  # chunks go before the stop and with the small state, never after
