"""The trackers an incoming instance may be launched with (base.py says what each one does), by name."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from constmig.errors import ConfigError
from constmig.migration.trackers.access import AccessTracking
from constmig.migration.trackers.base import Stream, Tracker
from constmig.migration.trackers.fault import FaultTracker

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap

__all__ = ["REGISTRY", "Stream", "Tracker", "get", "launch"]

REGISTRY: dict[str, type[Tracker]] = {t.name: t for t in (Tracker, FaultTracker, AccessTracking)}


def get(name: str) -> type[Tracker]:
    """The tracker called `name` (ConfigError naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown tracker {name!r}; known: {', '.join(REGISTRY)}") from None


def launch(name: str, heap: Heap, app_module: ModuleType | None, status: Path | None,
           incoming: bool) -> tuple[Tracker, dict[str, float]]:
    """The tracker of a new instance and its launch figures; an incoming instance's heap is prepared now
    (before any thread starts or the heap is touched), anything else runs on a plain heap."""
    tracker = get(name if incoming else "none")(heap, app_module)
    return tracker, (tracker.prepare(status) if incoming else {})
