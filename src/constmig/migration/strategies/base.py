"""What makes one way of migrating different from another. The drivers (source.py, destination.py) do
everything the strategies share: attest, stop, send the small state, READY/COMMIT, reconnects, DONE.

A strategy declares its name, how many data connections it uses, whether the destination needs a
tracker (a heap that arrives after the app resumed), the edges it removes from the protocol table,
its ledger policy at the handoff, and what each side does before the handoff and after COMMIT.
Adding one (pre-copy rounds, hybrid) is a new module here and a line in the registry.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from constmig.errors import ProtocolError

if TYPE_CHECKING:
    from constmig.enclave.app import EnclaveApp
    from constmig.enclave.heap import Heap
    from constmig.migration import messages as m
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link
    from constmig.migration.port import MigratingEnclave as Enclave
    from constmig.migration.protocol import St
    from constmig.migration.resume import ResumeSecret
    from constmig.migration.resume_server import CommitWaiter
    from constmig.migration.strategies.early import Early
    from constmig.migration.streamer import Streamer
    from constmig.migration.trackers.base import Tracker
    from constmig.wire import control

Progress = Callable[[dict], None]


class Before:
    """What a source's `before_stop` leaves for the stop: nothing, unless the strategy moved chunks."""

    figures: dict[str, Any] = {}

    def settle(self, ledger: ChunkLedger) -> np.ndarray:
        """Stopped: which chunks the destination holds current already (taken into `ledger`); none."""
        return np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        """Release what the rounds held (the write tracker); idempotent."""


@dataclass
class Arrived:
    """What a destination holds once it sent READY: everything but the permission to run."""

    link: Link
    socks: list[socket.socket]
    strategy: Strategy
    state: m.StateMsg
    ledger: ChunkLedger
    app: EnclaveApp
    secret: ResumeSecret
    waiter: CommitWaiter | None
    reconnected: bool = False  # a keyed reconnect stood for the COMMIT

    @property
    def epoch(self) -> int:
        """The last reconnect epoch used (by the waiter): later reconnects must go higher."""
        return self.waiter.epoch if self.waiter is not None else 0


class Strategy:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for help texts
    connections: ClassVar[int]  # data connections: main, and (post-copy) demand
    needs_tracker: ClassVar[bool]  # the destination runs before its heap is complete
    # Protocol table edges this strategy does not allow, with why: {role: {state: {(direction, event): why}}}.
    removed_edges: ClassVar[dict[str, dict[St, dict[tuple[str, str], str]]]] = {}
    source_figures: ClassVar[dict[str, Any]] = {}  # added to the source's figures

    # --- destination, before anything arrives ----------------------------------------------------------

    def check_instance(self, tracker: Tracker) -> None:
        """Refuse an incoming instance prepared for another strategy (raise ProtocolError)."""

    def import_wrapper(self, enclave: Enclave, ledger: ChunkLedger, timeout: float) -> Any:
        """What wraps the app's heap arrays on import (the Access Tracker's), or None."""
        return None

    # --- before the stop (the app still runs) ----------------------------------------------------------

    def before_stop(self, link: Link, enclave: Enclave, progress: Progress, req: control.MigrateOut) -> Before:
        """Source, running: move what can move while the app runs (pre-copy rounds). What it returns goes
        to `send_before_handoff`; its `close()` is called once the source is past the stop or gave up."""
        return Before()

    def receive_before_state(self, link: Link, enclave: Enclave, migration_id: bytes) -> tuple[Early | None, Any]:
        """Destination: what arrives before the small state (pre-copy rounds: early.Early), and the first
        message that is not a chunk."""
        return None, link.recv()

    # --- before the handoff ------------------------------------------------------------------------

    def send_before_handoff(self, link: Link, ledger: ChunkLedger, heap: Heap, progress: Progress,
                            before: Before) -> None:
        """Source, stopped: send what must arrive before the destination may run (chunks), if anything."""

    def check_heap_end(self, ledger: ChunkLedger, count: int) -> None:
        """Destination, at HEAP_END: the ledger policy. The count must match what arrived."""
        if count != ledger.count:
            raise ProtocolError(f"heap stream ended after {ledger.count} of {ledger.expected.size} chunks "
                                f"(the source says {count})")

    # --- after COMMIT --------------------------------------------------------------------------------

    def serve_after_commit(self, link: Link, demand: Link | None, ledger: ChunkLedger, heap: Heap,
                           progress: Progress, max_bandwidth: float, done: Any) -> Streamer | None:
        """Source, handed off: start whatever still moves chunks (the post-copy stream), or None."""
        return None

    def receive_after_commit(self, enclave: Enclave, arrived: Arrived, t_resume: float, timeout: float) -> None:
        """Destination, running: finish the move (send DONE, or start receiving the stream)."""

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"
