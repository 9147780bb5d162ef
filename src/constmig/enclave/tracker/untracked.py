"""Accesses the Access Tracker's instrumentation missed, served instead of crashing the enclave.

A TrackedArray checks before each access, but some paths read a heap array's buffer without asking it
(`np.asarray(arr)`, ctypes, a C function's `out=`). Missing chunks are PROT_NONE (state.py's guard), so
such an access faults. The enclave's own SIGSEGV handler (_wtrack.c, `guard`) then notes the chunk in a
lock-free slot, wakes the watcher thread here through an eventfd, and waits (the GIL released) until the
chunk is restored; the access runs again and reads the verified bytes. The watcher demands the chunk
like a tracked access would (the piece the access touched first); every install wakes the waiters.
A fault outside the heap, or on a chunk that is not missing, goes to the previous handler: a real crash
stays a crash. Where the handler was not built the guard stays a tripwire (the enclave dies of SIGSEGV,
loudly, never reading zeros), and `available()` says why.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap

try:
    from constmig.enclave import _wtrack
except ImportError as e:  # built by `pip install` (setup.py); absent where no C compiler was at hand
    _wtrack = None
    _NOT_BUILT = f"the enclave's fault handler was not built at install ({e})"


# The buffers a guard's handler reads, kept for the process's life: a fault that began while its guard
# served may still read them after the tracker is gone (one small set per incoming migration).
_KEEP: list[tuple[np.ndarray, ...]] = []


def available() -> str | None:
    """None when untracked accesses can be served here; else why not (they then crash the enclave)."""
    return None if _wtrack is not None else _NOT_BUILT


class Served(Protocol):
    """What is served: the tracker's state (state.py's TrackerState, which makes this object)."""

    heap: Heap
    missing: np.ndarray  # one bool per chunk, true until restored: the handler reads it
    timeout: float

    def demand(self, chunks: np.ndarray, offsets: np.ndarray | None = None) -> None: ...


class UntrackedAccesses:
    """Serves the faults on one tracker's guarded chunks until the heap is whole or the tracker fails."""

    def __init__(self, state: Served) -> None:
        if _wtrack is None:
            raise RuntimeError(_NOT_BUILT)
        self.state = state
        n = state.heap.n_chunks
        self._base = state.heap.address
        self._wanted = np.zeros(n, dtype=np.uint8)  # the handler's slots (C writes them)
        self._where = np.zeros(n, dtype=np.uint32)
        self._taken = np.zeros(n, dtype=np.uint8)
        self._efd = os.eventfd(0, os.EFD_CLOEXEC)
        self._closed = False
        _KEEP.append((state.missing, self._wanted, self._where))
        _wtrack.guard(self._base, state.heap.size, state.heap.chunk_size, state.missing.ctypes.data,
                      self._wanted.ctypes.data, self._where.ctypes.data, n, self._efd, state.timeout)
        self._thread = threading.Thread(target=self._watch, name="untracked", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        """Demand what faulting accesses wait for (os.read releases the GIL while nothing faults)."""
        while True:
            try:
                os.read(self._efd, 8)
            except OSError:
                return  # closed under us
            if self._closed:
                return
            if not _wtrack.guard_take(self._base, self._taken.ctypes.data):
                continue
            chunks = np.flatnonzero(self._taken).astype(np.int64)
            try:
                self.state.demand(chunks, self._where[chunks].astype(np.int64))
            except Exception:  # noqa: BLE001 - demand() failed the tracker, which ends the waits
                continue

    def installed(self) -> None:
        """A chunk was restored: waiting accesses look again (called after the bitmap changed)."""
        _wtrack.guard_wake(self._base)

    def note(self, text: str) -> None:
        """Why the stream stopped ("" when it runs again): the line an access that gives up writes."""
        _wtrack.guard_note(self._base, text)

    def fail(self, reason: str) -> None:
        """The migration cannot finish: waiting accesses give up (the enclave dies with the reason)."""
        self.note(f"the incoming migration failed: {reason}")
        _wtrack.guard_fail(self._base)

    def figures(self) -> dict[str, float | int]:
        """Untracked accesses so far (each faulted on a missing chunk) and their summed wait (a wait still
        under way when the heap became whole counts once it ends)."""
        served, waited = _wtrack.guard_figures(self._base)
        return {"untracked_accesses": int(served), "untracked_wait_s": round(waited, 4)}

    def whole(self) -> None:
        """The heap is whole: nothing is missing, so no fault is ours any more (a write tracker's, later,
        goes straight to it); the guard is dropped and the watcher ends. Waiting accesses find their
        chunk restored; the figures stay readable."""
        self.close()

    def close(self) -> None:
        """Stop serving (the heap is whole, or goes away): an access still waiting for a missing chunk
        gives up, and a fault from now on is not ours."""
        if self._closed:
            return
        self._closed = True
        _wtrack.forget_guard(self._base)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._efd, 1)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)
        # The eventfd stays open (one per incoming migration): a handler that saw the guard serving just
        # before the close may still write to it, and must never write to a reused descriptor.
