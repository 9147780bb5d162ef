"""Shared fixtures of the app tests: an app as a post-copy destination sees it under the Access Tracker."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from constmig.enclave.app import EnclaveApp
from constmig.enclave.heap import Heap
from constmig.enclave.state import export_app_state, import_app_state
from constmig.enclave.tracker import AccessTracker, interpose, restore


class TrackedCopy:
    """A copy of `app` right after a post-copy resume: no heap chunk has arrived yet.

    Every missing chunk is PROT_NONE (so an access that escapes tracking kills the process instead of
    reading zeros), and a demanded chunk is copied in from a snapshot of the source heap at once.
    """

    def __init__(self, app: EnclaveApp) -> None:
        src = app.heap
        self.snapshot = src.buf.copy()
        self.chunk = src.chunk_size
        self.heap = Heap(src.size, chunk_size=src.chunk_size)
        self.tracker = AccessTracker(self.heap, src.export_chunks(), self._request, timeout=10.0)
        self.tracker.guard()
        self.module = sys.modules[type(app).__module__]
        interpose(self.module)
        self.app = import_app_state(type(app), self.heap, export_app_state(app), wrap=self.tracker.track)

    def _request(self, chunks: np.ndarray) -> None:
        for i in chunks.tolist():
            view = self.tracker.begin_install(i)
            view[:] = self.snapshot[i * self.chunk : (i + 1) * self.chunk]
            self.tracker.finish_install(i)

    def close(self) -> None:
        restore(self.module)
        self.tracker.fail("test over")
        self.tracker.unguard()
        self.heap.close()


@pytest.fixture
def tracked() -> Iterator[Callable[[EnclaveApp], TrackedCopy]]:
    """Factory of TrackedCopy objects, closed at the end of the test."""
    made: list[TrackedCopy] = []

    def make(app: EnclaveApp) -> TrackedCopy:
        made.append(TrackedCopy(app))
        return made[-1]

    yield make
    for m in made:
        m.close()
