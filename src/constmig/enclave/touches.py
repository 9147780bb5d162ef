"""Which heap chunks the app touches (reads or writes) while a post-copy migration is being set up.

The source learns what the app will want first at the destination by watching it for the moments before
the stop: the attestation handshake takes some milliseconds to tens of them while clients keep calling.
With `--prefetch used-last` those chunks go first in the background stream, ahead of cold ones, so the
resumed app finds more of its working set in place instead of demanding it (issue 14, part 3).

The mechanism is the enclave's own write tracker (dirty.py, _wtrack.c) with its chunks made PROT_NONE
instead of read-only: the first read or write of a chunk faults into the enclave's handler, which marks
it and opens the chunk again, so each chunk costs one fault in the window and nothing after. The watch
ends just before the stop, while the app still runs: the marks are taken and the rest of the heap is
opened again (64 MiB per mprotect, ~15 ms/GiB in all, not downtime). Left closed past the stop, every
chunk the stream read would fault once into the handler, and the mprotects and TLB flushes of those
faults measurably slowed the demand path on both hosts.

A kernel access to a closed chunk (a syscall handed heap memory) fails with EFAULT rather than faulting
into the handler: loud, never silent. Nothing in the runtime does that while a migration is going out.
"""

from __future__ import annotations

import numpy as np

from constmig.enclave.dirty import EnclaveWriteTracker
from constmig.enclave.tracker.state import PROT_NONE


class TouchRecorder(EnclaveWriteTracker):
    """Marks every chunk the app reads or writes from `arm()` until `take()`."""

    mechanism = "touches"
    protection = PROT_NONE

    def take(self) -> np.ndarray:
        """The chunks touched since `arm`, sorted; the watch ends and the heap is plain memory again."""
        chunks = self.scan(rearm=False)
        self.close()
        return chunks
