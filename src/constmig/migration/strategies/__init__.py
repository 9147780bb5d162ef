"""The registry of migration strategies: the one list the CLI, the agent, the drivers and the bench read."""

from __future__ import annotations

from constmig.errors import ConfigError
from constmig.migration import constants
from constmig.migration.constants import TRACKERS
from constmig.migration.strategies.auto import Auto
from constmig.migration.strategies.base import Strategy
from constmig.migration.strategies.hybrid import Hybrid
from constmig.migration.strategies.postcopy import PostCopy
from constmig.migration.strategies.precopy import PreCopy
from constmig.migration.strategies.rounds import RoundsMixin
from constmig.migration.strategies.stopcopy import StopAndCopy

__all__ = ["ROUNDS", "STRATEGIES", "TRACKERS", "Strategy", "get", "variants"]

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (StopAndCopy(), PostCopy(), PreCopy(), Hybrid(), Auto())}
ROUNDS = tuple(s.name for s in STRATEGIES.values() if isinstance(s, RoundsMixin))  # send rounds before the stop
# The names requests are checked against (wire/control.py) are the registry's, in its order.
assert tuple(STRATEGIES) == constants.STRATEGIES, "constants.STRATEGIES must name the registry's strategies"


def get(name: object) -> Strategy:
    """The strategy called `name`; ConfigError (one line, listing the known ones) for anything else."""
    strategy = STRATEGIES.get(name) if isinstance(name, str) else None
    if strategy is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return strategy


def variants(auto: bool = True) -> list[str]:
    """Bench variants: each strategy, and for those that need a tracker, the strategy with each tracker
    (and, with `auto`, the strategy alone: the tracker the destination picks)."""
    out = []
    for s in STRATEGIES.values():
        if auto or not s.needs_tracker:
            out.append(s.name)
        if s.needs_tracker:
            out += [f"{s.name}-{t}" for t in TRACKERS]
    return out
