"""Which heap chunks the app touches (reads or writes) while a post-copy migration is being set up.

The source learns what the app will want first at the destination by watching it for the moments before
the stop: the attestation handshake and the destination's preparation take some milliseconds to a few
hundred, while clients keep calling. Those chunks go first in the background stream, ahead of cold ones,
so the resumed app finds more of its working set in place instead of demanding it (issue 14, part 3).

The mechanism is the enclave's own write tracker (dirty.py, _wtrack.c) with its chunks made PROT_NONE
instead of read-only: the first read or write of a chunk faults into the enclave's handler, which marks
it and opens the chunk again, so each chunk costs one fault in the window and nothing after. At the stop
the marks are taken and the handler stops marking. Chunks still closed then are opened lazily by the
handler as the stream reads them (one fault each, spread over the stream) rather than by one mprotect
over the heap after the commit point, which would hold the demand path back by ~15 ms/GiB. A migration
that ends before its commit point opens the whole heap at once, as it was.

A kernel access to a closed chunk (a syscall handed heap memory) fails with EFAULT rather than faulting
into the handler: loud, never silent. Nothing in the runtime does that while a migration is going out,
and a source that gets its app back after the commit point (the destination's ABORT) reopens the heap.
"""

from __future__ import annotations

import numpy as np

from constmig.enclave.dirty import EnclaveWriteTracker, _wtrack
from constmig.enclave.heap import Heap
from constmig.enclave.tracker.state import PROT_NONE, PROT_RW, protect_chunks


class TouchRecorder(EnclaveWriteTracker):
    """Marks every chunk the app reads or writes from `arm()` until `take()`. `close()` (a migration that
    ended before its commit point) opens the whole heap again; after `let_go()` it does nothing."""

    mechanism = "touches"
    protection = PROT_NONE

    def take(self) -> np.ndarray:
        """The chunks touched since `arm`, sorted; marking ends (a later touch still opens its chunk)."""
        chunks = self.scan(rearm=False)
        assert _wtrack is not None  # armed
        _wtrack.opening(self.heap.address)
        return chunks

    def let_go(self) -> None:
        """Past the commit point: stop tracking without touching the mappings (the handler keeps opening
        chunks as they are read; the heap is wiped once the destination holds it all)."""
        if self._armed:
            self._armed = False
            assert _wtrack is not None
            _wtrack.opening(self.heap.address)


def reopen(heap: Heap) -> None:
    """The app runs here again after a hand-off that was given back (the destination's ABORT): chunks a
    let-go recorder left closed are opened now, so no syscall on heap memory meets one."""
    if not heap.closed:
        protect_chunks(heap, np.arange(heap.n_chunks), PROT_RW)
