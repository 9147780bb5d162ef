"""What a strategy asks of the tracker of an incoming instance, and the one way post-copy is received.

A tracker decides how an instance lives with a heap that is not all there: `none` (a plain heap; the app
runs only once every chunk is in), `fault` (userfaultfd: a missing page's first touch waits in the
kernel while the pager process fetches it; fault.py, pager.py) and `access` (the app's arrays check
every access first and guard missing chunks with PROT_NONE; access.py, enclave/tracker/). One tracker
object per instance, made at launch (`trackers.launch`): the strategies, the drivers and the runtime
call it and never name a tracker.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from constmig.migration.receiver import Installer, Receiver
from constmig.migration.resume_server import ResumeServer

if TYPE_CHECKING:
    from types import ModuleType

    from constmig.enclave.heap import Heap
    from constmig.migration.ledger import ChunkLedger
    from constmig.migration.link import Link
    from constmig.migration.resume import ResumeSecret
    from constmig.wire.channel import SealedChunk, SecureChannel

FirstWrite = Callable[["SealedChunk", "SecureChannel"], None]


@dataclass
class Stream:
    """What a destination hands its tracker at the commit point to receive the rest of the heap."""

    link: Link  # the main channel, keyed and positioned
    socks: list[socket.socket]  # main and demand connections
    ledger: ChunkLedger  # what is expected and what is in already (rounds' chunks held)
    secret: ResumeSecret  # keys reconnects
    epoch: int  # the last reconnect epoch used
    reconnected: bool  # a reconnect's sockets (ours to close once handed on)
    t_resume: float
    timeout: float
    resume_path: Path | None  # where reconnects are accepted
    data_plane: str = "python"  # "native": receive the stream through the engine, where this host has one


Started = Callable[[int, "Receiver | None"], None]  # the runtime learns: n chunks to come, received by ...


class Tracker:
    """A plain heap (`none`): every chunk must be in before the app runs. The other trackers override."""

    name: ClassVar[str] = "none"
    post_copy: ClassVar[bool] = False  # the app may run before its heap arrived
    write_tracking: ClassVar[str] = "auto"  # the rounds' write tracking that pairs with it (enclave/dirty.py)
    stale_in_place: ClassVar[bool] = True  # a version let go keeps its bytes (the stop sends the chunk again)

    def __init__(self, heap: Heap, app_module: ModuleType | None = None) -> None:
        self.heap, self.app_module = heap, app_module

    def prepare(self, status: Path | None) -> dict[str, Any]:
        """At launch, before any thread starts or the heap is touched: make the heap ready to receive;
        figures back."""
        return {"populate_s": self.heap.populate()}

    def import_wrapper(self, missing: np.ndarray, timeout: float) -> Any:
        """What wraps the app's heap arrays on import while `missing` chunks are still to come, or None."""
        return None

    def first_write(self) -> FirstWrite:
        """How a chunk's first version goes into the heap before the app runs (pre-copy rounds)."""
        heap = self.heap
        return lambda sealed, chan: chan.open_chunk(sealed, heap.chunk_view(sealed.index))

    def install(self, sealed: SealedChunk, chan: SecureChannel) -> None:
        """A chunk that arrives after the small state and before the commit point (a pre-copy finish under
        a post-copy tracker: auto): verified, then visible to the app, which does not run yet."""
        self.first_write()(sealed, chan)

    def make_missing(self, chunks: np.ndarray) -> None:
        """A version the rounds brought is stale: the chunk is missing again (a plain heap keeps the old
        bytes until the stop overwrites them: `stale_in_place`)."""

    def release(self, chunks: np.ndarray) -> None:
        """No longer part of the migration (freed at the source): zeros, readable, as in a fresh heap."""
        self.heap.zero_chunks(chunks)

    def receive(self, stream: Stream, started: Started) -> None:
        """After COMMIT, the app running: receive the rest of the heap (post-copy trackers only)."""
        raise NotImplementedError(f"the {self.name} tracker receives no heap after the commit point")

    def settle(self, app: Any) -> None:
        """Between two ECALLs: once the heap is whole, drop what tracking costs the app."""

    def arriving(self) -> int | None:
        """Chunks in so far while the heap is still arriving after COMMIT; None when it is whole."""
        return None

    def abandon(self, reason: str) -> None:
        """The incoming migration failed before COMMIT: stop tracking (the heap is wiped after)."""

    def close(self) -> None:
        """The process ends."""


def receive_stream(main: Link, demand: Link, ledger: ChunkLedger, installer: Installer, *, chunk_size: int,
                   tracker: str, t_resume: float, resume_path: Path | None, secret: ResumeSecret,
                   epoch: int, data_plane: str = "python") -> Receiver:
    """The one post-copy receive path (the pager process's and the Access Tracker's): a receiver on both
    channels, started, and the reconnect listener beside it. `data_plane` "native" receives through the
    engine where this host built it (else Python: the figures' recv_data_plane says which)."""
    from constmig.native import engine

    receiver = Receiver(main, demand, ledger, installer, chunk_size=chunk_size, tracker=tracker,
                        t_resume=t_resume, native=data_plane == "native" and engine.available())
    receiver.start()
    if resume_path is not None:
        ResumeServer(resume_path, secret, ledger, t_resume, receiver, chunk_size, epoch=epoch)
    return receiver
