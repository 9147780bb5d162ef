"""The enclave's lifecycle, as a checked table: what may follow what, and nothing else.

Changes are compare-and-set (QEMU's migrate_set_state): a caller says which state it expects to
leave, so a stale or confused caller cannot, say, resume a source that has already handed off.
DESTROYED is terminal. HANDED_OFF leads back to RUNNING only through `reclaim`, which the source takes
when the destination enclave said (authenticated, before it resumed) that it gave the migration up.
"""

from __future__ import annotations

import enum
import threading

from constmig.errors import EnclaveError


class Life(enum.Enum):
    CREATED = "created"  # fresh process, app not set up yet
    INCOMING = "incoming"  # empty destination instance, waiting for migrated state
    RUNNING = "running"  # serving ECALLs
    STOPPING = "stopping"  # migration source quiesced; may still abort back to RUNNING
    HANDED_OFF = "handed-off"  # committed to a destination; never runs the app again (serve-only)
    DESTROYED = "destroyed"  # state wiped


TRANSITIONS: dict[Life, frozenset[Life]] = {
    Life.CREATED: frozenset({Life.RUNNING, Life.DESTROYED}),
    Life.INCOMING: frozenset({Life.RUNNING, Life.DESTROYED}),
    Life.RUNNING: frozenset({Life.STOPPING, Life.DESTROYED}),
    Life.STOPPING: frozenset({Life.RUNNING, Life.HANDED_OFF, Life.DESTROYED}),
    Life.HANDED_OFF: frozenset({Life.DESTROYED}),
    Life.DESTROYED: frozenset(),
}


class Lifecycle:
    """Thread-safe holder of one enclave's lifecycle state."""

    def __init__(self, initial: Life) -> None:
        self._state = initial
        self._lock = threading.Lock()

    @property
    def state(self) -> Life:
        return self._state

    def move(self, expected: Life, new: Life) -> None:
        """Go from `expected` to `new`, or raise without changing anything."""
        with self._lock:
            if self._state is not expected:
                raise EnclaveError(
                    f"enclave is {self._state.value}, not {expected.value}: cannot become {new.value}"
                )
            if new not in TRANSITIONS[expected]:
                raise EnclaveError(f"enclave cannot go from {expected.value} to {new.value}")
            self._state = new

    def reclaim(self) -> None:
        """HANDED_OFF -> RUNNING: only for a source whose destination proved it never resumed.

        Kept out of TRANSITIONS so that no ordinary `move` can take this edge by mistake.
        """
        with self._lock:
            if self._state is not Life.HANDED_OFF:
                raise EnclaveError(f"enclave is {self._state.value}, not handed-off: nothing to reclaim")
            self._state = Life.RUNNING

    def require(self, *allowed: Life) -> None:
        if self._state not in allowed:
            names = " or ".join(s.value for s in allowed)
            raise EnclaveError(f"enclave is {self._state.value}; this needs it {names}")
