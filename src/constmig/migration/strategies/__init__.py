"""The registry of migration strategies: the one list the CLI, the agent, the drivers and the bench read."""

from __future__ import annotations

from constmig.errors import ConfigError
from constmig.migration.strategies.base import Strategy
from constmig.migration.strategies.postcopy import PostCopy
from constmig.migration.strategies.stopcopy import StopAndCopy

__all__ = ["STRATEGIES", "TRACKERS", "Strategy", "get", "variants"]

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (StopAndCopy(), PostCopy())}
TRACKERS = ("fault", "access")  # how a destination that runs before its heap is complete finds missing chunks


def get(name: object) -> Strategy:
    """The strategy called `name`; ConfigError (one line, listing the known ones) for anything else."""
    strategy = STRATEGIES.get(name) if isinstance(name, str) else None
    if strategy is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return strategy


def variants() -> list[str]:
    """Bench variants: each strategy, and for those that need a tracker, the strategy with each tracker."""
    out = []
    for s in STRATEGIES.values():
        out.append(s.name)
        if s.needs_tracker:
            out += [f"{s.name}-{t}" for t in TRACKERS]
    return out
