"""The narrow port between the migration code and the enclave runtime it runs in.

The drivers (source.py, destination.py) and the strategies see an enclave only through this Protocol:
what it is and holds (read), and the lifecycle steps it takes itself (stop, hand off, reclaim, retire;
take an incoming state, run it, give it up). They never write the runtime's fields, so the runtime
keeps its own invariants (enclave/lifecycle.py, the whole-heap gate) in one place. enclave/runtime.py's
Enclave implements it.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from constmig.enclave.app import EnclaveApp
    from constmig.enclave.heap import Heap
    from constmig.enclave.persist import Lineage
    from constmig.migration.receiver import Receiver
    from constmig.migration.resume_server import CommitWaiter
    from constmig.migration.trackers.base import Tracker
    from constmig.tee.backend import Identity, TeeBackend
    from constmig.wire.handshake import Policy


class Snapshot(NamedTuple):
    """What a stopped source exports: the chunks that move, the small state, the sealed-state lineage."""

    chunks: np.ndarray
    state: bytes
    lineage: Lineage | None
    stopped_at: float  # wall clock when the app stopped (downtime starts)
    sessions: bytes = b""  # the clients' sessions (keys and positions): they continue at the destination


class MigratingEnclave(Protocol):
    app_name: str
    heap: Heap
    backend: TeeBackend
    identity: Identity
    policy: Policy
    tracking: Tracker  # how this instance lives with a heap that arrives after it runs (trackers/)
    resume_path: Path | None  # where an incoming migration listens for reconnects

    # --- as the source ---------------------------------------------------------------------------------

    def whole_heap(self, what: str) -> np.ndarray:
        """The chunk list of a whole-heap export; refuses a heap still arriving (HeapIncomplete)."""

    def stop(self) -> Snapshot:
        """RUNNING -> STOPPING at an ECALL boundary, and export; back to RUNNING if the export fails."""

    def unstop(self) -> None:
        """STOPPING -> RUNNING: the migration aborted before its commit point (no-op if not stopped)."""

    def limit_writes(self, rate: float | None, wrote: Any = None) -> dict[str, Any]:
        """Hold the calls that write to `rate` newly written chunks per second, as `wrote()` counts them;
        None lifts the limit. Returns what holding cost so far (enclave/throttle.py)."""

    def begin_out(self, socks: list[socket.socket], token: str = "") -> None:
        """A migration out starts on these connections: a cancel before the commit point shuts them."""

    def end_out(self) -> None:
        """The migration out no longer needs cancelling (ended, or past its commit point)."""

    @property
    def cancelled(self) -> str | None:
        """Why the operator cancelled the migration out, if they did."""

    def hand_off(self) -> None:
        """STOPPING -> HANDED_OFF: the commit point; this enclave never runs the app again."""

    def leave_lineage(self) -> None:
        """Before COMMIT: no checkpoint may restore here once the destination runs the enclave."""

    def park(self, out: Any) -> None:
        """Keep a migration that paused after its commit point (source.Outgoing, opaque to the enclave),
        for a reconnect."""

    def parked(self) -> Any:
        """The paused migration a reconnect continues (MigrationError if there is none)."""

    def reclaim(self) -> None:
        """HANDED_OFF -> RUNNING: the destination proved it never ran the enclave (authenticated ABORT)."""

    def retire(self) -> None:
        """DONE matched: wipe the heap, DESTROYED."""

    # --- as the destination ----------------------------------------------------------------------------

    def expect_incoming(self) -> None:
        """Refuse unless this is an empty instance waiting for a migration."""

    def import_state(self, blob: bytes, wrap: Any = None) -> EnclaveApp:
        """Rebuild the app from the small state, its heap arrays wrapped by `wrap` (the Access Tracker's)."""

    def hold_lineage(self, lineage: Lineage, release_hash: bytes) -> None:
        """Before READY: bind the lineage here, pending on the release code's hash (enclave/persist.py)."""

    def forget_lineage(self) -> None:
        """Before COMMIT, giving up: destroy the pending lineage (before the source may run again)."""

    def run_incoming(self, app: EnclaveApp, sessions: bytes = b"") -> None:
        """COMMIT (or its stand-in): INCOMING -> RUNNING."""

    def confirm_lineage(self) -> None:
        """After COMMIT, once the app runs (not downtime): the lineage held since READY is no longer pending."""

    def stream_incoming(self, chunks: int, receiver: Receiver | None) -> None:
        """After COMMIT: `chunks` more arrive behind the running app (received here by `receiver`, or by
        the pager when it is None); whole-heap exports wait for them."""

    def give_up_incoming(self, tombstone: CommitWaiter | None) -> None:
        """Before COMMIT: stop tracking, wipe, DESTROYED; `tombstone` stays to answer
        the source's reconnects with ABORT."""
