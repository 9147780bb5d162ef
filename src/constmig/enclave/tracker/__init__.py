"""The Access Tracker: post-copy migration without kernel help, by checking every heap access first.

In post-copy the destination resumes the app before its heap has arrived. The Fault Tracker lets the
kernel catch first touches (userfaultfd); where that is unavailable, the runtime instead hands the app
its heap arrays as `TrackedArray` views. Every numpy operation on one first asks the tracker whether
the chunks it touches were restored; missing ones are demanded from the source (once each) and the
access waits until they are installed. App code does not change: the arrays are swapped in when the
small state is unpickled (`import_app_state(..., wrap=tracker.track)`), and back to plain arrays
(`untrack_app`) once the whole heap is there, so the steady state pays nothing.

What cannot be hooked in Python 3.11 is the buffer protocol (memoryview(a), hashlib's update(a),
ctypes, np.asarray(a), np.frombuffer(a)) and C code handed an array as `out` outside the ufunc
machinery (Generator.random(out=a)). `interpose` covers the builtins an app module calls by name, and
`guard` makes every missing chunk PROT_NONE, so any access that still escapes crashes the enclave
loudly (SIGSEGV) instead of computing on zeros that were never the app's data.

Hot paths stay vectorized: which chunks an access needs comes from its index array with numpy, and the
restored check is one gather over a bool bitmap; nothing loops per chunk or per page in Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from constmig.enclave.tracker.array import TrackedArray, track
from constmig.enclave.tracker.interpose import interpose, restore, untrack_app
from constmig.enclave.tracker.plans import key_chunks
from constmig.enclave.tracker.state import PROT_NONE, PROT_RW, TrackerState, guard_heap, protect_chunks
from constmig.errors import MigrationError

__all__ = ["PROT_NONE", "PROT_RW", "AccessTracker", "TrackedArray", "guard_heap", "interpose", "key_chunks",
           "protect_chunks", "restore", "untrack_app"]


class AccessTracker(TrackerState):
    """One incoming post-copy migration's tracker (state.py), and the arrays it hands the app."""

    def track(self, arr: np.ndarray) -> TrackedArray:
        """A TrackedArray view of heap array `arr` (what the unpickler hands the app instead of `arr`)."""
        return track(self, arr)

    def untrack_app(self, app: Any) -> int:
        """`untrack_app(app)`, refused while chunks are missing (plain arrays would read holes)."""
        if not self.complete:
            raise MigrationError(f"cannot untrack the app: {self._n_missing} heap chunks are still missing")
        return untrack_app(app)
