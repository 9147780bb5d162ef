"""The Fault Tracker: the heap registered with userfaultfd at launch, so a missing page's first touch waits
in the kernel until the pager process (pager.py) has it fetched, verified and installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from constmig.migration.constants import DEMAND_LABEL
from constmig.migration.trackers.base import FirstWrite, Started, Stream, Tracker
from constmig.migration.trackers.pager import PagerHandle, UffdInstaller


class FaultTracker(Tracker):
    name = "fault"
    post_copy = True
    write_tracking = "kernel"  # the kernel's write-protect tracking works on the same registration
    stale_in_place = False

    pager: PagerHandle | None = None
    _installer: UffdInstaller | None = None

    def prepare(self, status: Path | None) -> dict[str, Any]:
        """The heap stays untouched: every page arrives through the pager's UFFDIO_COPY."""
        self.pager = PagerHandle.start(self.heap, status)
        return {}

    def _handle(self) -> PagerHandle:
        if self.pager is None:
            raise RuntimeError("the Fault Tracker was not prepared (no pager)")
        return self.pager

    def first_write(self) -> FirstWrite:
        """Through the pager's userfaultfd: the page is missing and must stay so until installed whole."""
        if self._installer is None:
            heap = self.heap
            self._installer = UffdInstaller(self._handle().uffd, heap.address, heap.chunk_size, None)
        installer = self._installer
        return lambda sealed, chan: installer.install(sealed.index, sealed, chan, demand=False)

    def make_missing(self, chunks: np.ndarray) -> None:
        """Its pages dropped: the next touch faults, and the pager fetches the current version."""
        self.heap.zero_chunks(chunks)

    def receive(self, stream: Stream, started: Started) -> None:
        """The pager process receives the stream: it gets both connections and the channels' keys."""
        pager = self._handle()
        started(int(stream.ledger.expected.size), None)
        main = stream.link.chan.detach()
        try:
            pager.stream(main, main.derive(DEMAND_LABEL), [s.fileno() for s in stream.socks],
                         stream.ledger.to_wire(), stream.t_resume, stream.timeout, stream.secret,
                         stream.resume_path, stream.epoch, held=stream.ledger.held_wire(),
                         data_plane=stream.data_plane)
        finally:
            if stream.reconnected:  # the pager holds its own copies; a reconnect's are ours to close
                for s in stream.socks:
                    s.close()

    def arriving(self) -> int | None:
        """Asked of the pager over the enclave's own socket (never read from a file the host can write)."""
        return None if self.pager is None else self.pager.progress()

    def abandon(self, reason: str) -> None:
        self.close()

    def close(self) -> None:
        if self.pager is not None:
            self.pager.close()
            self.pager = None
