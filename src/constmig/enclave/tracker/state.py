"""The Access Tracker's state: which chunks of an incoming heap are restored, the wait for missing ones,
the installer's side, and the PROT_NONE guard over the chunks still missing (an access that escapes the
instrumentation faults on it, and untracked.py serves that fault)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from constmig.enclave.heap import Heap, chunk_runs
from constmig.errors import MigrationError

if TYPE_CHECKING:
    from constmig.enclave.tracker.untracked import UntrackedAccesses

PROT_NONE = 0
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE

_libc = ctypes.CDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int


class TrackerState:
    """Restored-chunk bitmap of one incoming post-copy migration, and the wait for missing chunks.

    App threads call `ensure_*` (through TrackedArray); receiver threads call the `*_install` methods.
    `missing` and `complete` are read without the lock on the fast path: they only ever go from
    missing to restored, and a chunk is marked restored only after its bytes are in place.
    """

    def __init__(
        self,
        heap: Heap,
        expected: np.ndarray,
        request: Callable[[np.ndarray], None],
        timeout: float = 60.0,
    ) -> None:
        n = heap.n_chunks
        exp = np.asarray(expected, dtype=np.int64).ravel()
        if exp.size and (int(exp.min()) < 0 or int(exp.max()) >= n):
            raise MigrationError(f"expected chunk list names chunks outside the heap's {n} chunks")
        if not timeout > 0:
            raise MigrationError(f"access tracker timeout must be positive, not {timeout!r}")
        self.heap = heap
        self.timeout = float(timeout)
        self._request = request
        self.missing = np.zeros(n, dtype=bool)  # read-only for callers
        self.missing[exp] = True
        self._missing_b = memoryview(self.missing).cast("B")  # scalar lookups without numpy overhead
        self.expected_count = int(np.count_nonzero(self.missing))
        self._n_missing = self.expected_count
        self.complete: bool = self._n_missing == 0  # plain attribute: the one check on the fast path
        self._requested = np.zeros(n, dtype=bool)
        self._installing = np.zeros(n, dtype=bool)
        self._requested_at = np.full(n, np.nan)
        self._restored_at = np.full(n, np.nan)
        self._cond = threading.Condition()
        self._failure: str | None = None
        self._paused: str | None = None  # the stream stopped; waiters wait on (a reconnect may come)
        self._guarded = False
        # guarded installs write a private buffer, then the chunk through /proc/self/mem (begin_install)
        self._staging: dict[int, np.ndarray] = {}
        self._staging_free: list[np.ndarray] = []
        self._mem_fd: int | None = None
        self.staging_unavailable: str | None = None  # why guarded chunks are opened while installed
        self.untracked: UntrackedAccesses | None = None  # serves faults on guarded chunks (serve_untracked)
        self._untracked_why: str | None = None  # why they are not served here (they crash the enclave)
        # geometry, copied out of the heap so the hot path does plain attribute reads
        self._base = heap.address
        self._size = heap.size
        self._chunk = heap.chunk_size
        self._shift = heap.chunk_size.bit_length() - 1
        self._n = n
        # figures
        self.demanded = 0  # chunks passed to request()
        self.latencies: list[float] = []  # seconds from first request to restored, per waited chunk
        self.stalls = 0  # ensure calls that had to block
        self.stall_seconds = 0.0

    # -- app side ----------------------------------------------------------------------------------

    def ensure_chunks(self, chunks: np.ndarray) -> None:
        """Return once every chunk in `chunks` is restored, demanding the missing ones."""
        if self.complete:
            return
        c = np.asarray(chunks, dtype=np.int64).ravel()
        if c.size and (int(c.min()) < 0 or int(c.max()) >= self._n):
            raise MigrationError(f"chunk indices outside the heap's {self._n} chunks")
        self._ensure_chunks(c)

    def ensure_range(self, lo: int, hi: int) -> None:
        """Return once the chunks under heap bytes [lo, hi) are restored."""
        if self.complete:
            return
        self._ensure_offsets(int(lo), int(hi))

    def outstanding(self) -> np.ndarray:
        """Chunks demanded but not restored yet: what a receiver that starts late must still ask for."""
        with self._cond:
            return np.flatnonzero(self._requested & self.missing).astype(np.int64)

    @property
    def failed(self) -> str | None:
        """The reason given to `fail`, if the migration failed."""
        return self._failure

    @property
    def remaining(self) -> int:
        """Expected chunks not restored yet."""
        return self._n_missing

    def _ensure_chunks(self, c: np.ndarray) -> None:
        if self._failure is not None:
            raise self._failed_error()
        if c.size and np.count_nonzero(self.missing[c]):
            self._wait(np.unique(c))

    def _ensure_offsets(self, lo: int, hi: int) -> None:
        if self._failure is not None:
            raise self._failed_error()
        lo = max(lo, 0)
        hi = min(hi, self._size)
        if hi <= lo:
            return
        a = lo >> self._shift
        b = ((hi - 1) >> self._shift) + 1
        if b - a == 1:
            if not self._missing_b[a]:
                return
        elif not np.count_nonzero(self.missing[a:b]):
            return
        self._wait(np.arange(a, b, dtype=np.int64))

    def _wait(self, cands: np.ndarray) -> None:
        """Demand the not-yet-requested ones among `cands` (sorted, unique) and block until all arrive."""
        t0 = time.perf_counter()
        with self._cond:
            if self._failure is not None:
                raise self._failed_error()
            waited = cands[self.missing[cands]]
            if not waited.size:
                return
            new = waited[~self._requested[waited]]
            if new.size:
                self._requested[new] = True
                self._requested_at[new] = t0
                self.demanded += int(new.size)
        if new.size:
            try:
                self._request(new)  # outside the lock: it may send on the network, installers go on
            except Exception as e:
                reason = f"cannot demand heap chunks from the source: {e}"
                self.fail(reason)
                raise MigrationError(reason) from e
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self.stalls += 1
            try:
                pending = waited
                while True:
                    if self._failure is not None:
                        raise self._failed_error(pending.size)
                    pending = pending[self.missing[pending]]
                    if not pending.size:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        paused = f"; the migration is paused ({self._paused})" if self._paused else ""
                        raise MigrationError(
                            f"heap access timed out after {self.timeout:g} s waiting for {pending.size} "
                            f"chunk(s) from chunk {int(pending[0])}; {self.expected_count - self._n_missing} "
                            f"of {self.expected_count} chunks restored{paused}"
                        )
                    self._cond.wait(left)
                self.latencies.extend((self._restored_at[waited] - self._requested_at[waited]).tolist())
            finally:
                self.stall_seconds += time.perf_counter() - t0

    def demand(self, chunks: np.ndarray, offsets: np.ndarray | None = None) -> None:
        """Demand the missing, not yet requested ones among `chunks` without waiting: an access the
        instrumentation missed waits in the fault handler instead (`offsets`: where in each chunk it
        touched, so that piece comes first)."""
        c = np.asarray(chunks, dtype=np.int64).ravel()
        c = c[(c >= 0) & (c < self._n)]
        t0 = time.perf_counter()
        with self._cond:
            if self._failure is not None:
                return
            keep = self.missing[c] & ~self._requested[c]
            new = c[keep]
            if not new.size:
                return
            self._requested[new] = True
            self._requested_at[new] = t0
            self.demanded += int(new.size)
        where = None if offsets is None else np.asarray(offsets, dtype=np.int64).ravel()[keep]
        try:
            if where is None:
                self._request(new)
            else:
                self._request(new, offsets=where)
        except Exception as e:
            self.fail(f"cannot demand heap chunks from the source: {e}")

    def serve_untracked(self) -> str | None:
        """Serve the accesses that fault on guarded chunks from now on (untracked.py); None when served,
        else why not (the guard then stays a tripwire: such an access crashes the enclave)."""
        from constmig.enclave.tracker.untracked import UntrackedAccesses, available

        why = self._untracked_why = available()
        if why is None and self.untracked is None and not self.complete:
            self.untracked = UntrackedAccesses(self)
        return why

    def untracked_figures(self) -> dict[str, float | int]:
        """What the untracked accesses cost (figures): how many were served, and their summed wait."""
        if self.untracked is not None:
            return self.untracked.figures()
        return {"untracked_accesses": 0, **({"untracked_unserved": self._untracked_why} if self._untracked_why else {})}

    def _failed_error(self, waiting: int = 0) -> MigrationError:
        what = f" while the app waited for {waiting} heap chunk(s)" if waiting else ""
        return MigrationError(f"heap access refused: the incoming migration failed{what} ({self._failure})")

    # -- installer side ----------------------------------------------------------------------------

    def begin_install(self, index: int) -> memoryview:
        """Claim missing chunk `index` for writing; returns the memory its bytes go into.

        Guarded, that is a private buffer (`_staging`): the chunk stays PROT_NONE until finish_install has
        written all of it, so no access, however it reads, ever sees it half installed (a piece at a time,
        or mid-copy). Unguarded, it is the chunk's heap memory itself."""
        i = self._index(index)
        with self._cond:
            if not self.missing[i]:
                raise MigrationError(f"chunk {i} is not awaited (not expected, or restored already)")
            if self._installing[i]:
                raise MigrationError(f"chunk {i} is being installed already")
            staged = self._guarded and self._mem() is not None
            if self._guarded and not staged:
                self._protect(i, i + 1, PROT_RW)  # no way to write a guarded chunk: open it meanwhile
            self._installing[i] = True
            if staged:
                buf = self._staging_free.pop() if self._staging_free else np.empty(self._chunk, dtype=np.uint8)
                self._staging[i] = buf
        return memoryview(buf) if staged else self.heap.chunk_view(i)

    def finish_install(self, index: int) -> None:
        """The chunk's bytes are in place and verified: let the app see it and wake waiters."""
        i = self._index(index)
        with self._cond:
            if not self._installing[i]:
                raise MigrationError(f"chunk {i} was not being installed (call begin_install first)")
            buf = self._staging.get(i)
        if buf is not None:  # still PROT_NONE: written whole through the kernel, then opened
            fd = self._mem()
            assert fd is not None
            write_guarded(fd, self._base + i * self._chunk, buf)
        with self._cond:
            if buf is not None:
                del self._staging[i]
                self._staging_free.append(buf)
                self._protect(i, i + 1, PROT_RW)
            self._installing[i] = False
            self._restored_at[i] = time.perf_counter()
            self.missing[i] = False
            self._n_missing -= 1
            if self._n_missing == 0:
                self.complete = True
                self._staging_free.clear()
                if self._mem_fd is not None and self._mem_fd >= 0:
                    os.close(self._mem_fd)  # nothing more is installed
                    self._mem_fd = -1
            self._cond.notify_all()
        if self.untracked is not None:
            self.untracked.installed()
            if self.complete:
                self.untracked.whole()  # nothing is missing any more: the watcher ends

    def abort_install(self, index: int) -> None:
        """The chunk could not be installed (bad tag, short data): it stays missing and guarded."""
        i = self._index(index)
        with self._cond:
            if not self._installing[i]:
                return  # called from error paths: never mask the original error
            self._installing[i] = False
            buf = self._staging.pop(i, None)
            if buf is not None:
                self._staging_free.append(buf)  # never written to the heap: the chunk stayed guarded
            elif self._guarded:
                self._protect(i, i + 1, PROT_NONE)

    def _mem(self) -> int | None:
        """/proc/self/mem, which writes a PROT_NONE chunk (as a debugger pokes a read-only page); None
        where it cannot be opened (the chunk is then opened for its install)."""
        if self._mem_fd is None:
            try:
                self._mem_fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                self._mem_fd, self.staging_unavailable = -1, f"cannot open /proc/self/mem: {e.strerror or e}"
        return self._mem_fd if self._mem_fd >= 0 else None

    def pause(self, reason: str) -> None:
        """The stream stopped: accesses to missing chunks keep waiting (up to their timeout) for a reconnect."""
        with self._cond:
            self._paused = str(reason)
        if self.untracked is not None:
            self.untracked.note(f"the migration is paused: {reason}")

    def unpause(self) -> None:
        with self._cond:
            self._paused = None
        if self.untracked is not None:
            self.untracked.note("")

    @property
    def paused(self) -> str | None:
        return self._paused

    def fail(self, reason: str) -> None:
        """The migration cannot finish: waiting and every later access to an unfinished heap raise."""
        with self._cond:
            if self._failure is None:
                self._failure = str(reason)
            self._cond.notify_all()
        if self.untracked is not None:
            self.untracked.fail(self._failure)

    # -- tripwire ----------------------------------------------------------------------------------

    def guard(self) -> int:
        """Make every missing chunk PROT_NONE, so an access that escapes tracking faults, not reads zeros.

        Returns the number of mprotect calls (one per run of consecutive chunks).
        """
        with self._cond:
            self._guarded = True
            return self._protect_mask(self.missing & ~self._installing, PROT_NONE)

    def adopt_guard(self) -> int:
        """Take over a guard `guard_heap` put on the whole heap while preparing, and open the chunks that
        will never arrive. Why: mprotect of a populated heap costs tens of ms per GiB, which would be
        downtime at the stop; opening the few unmigrated chunks is cheap."""
        with self._cond:
            self._guarded = True
            return self._protect_mask(~self.missing & ~self._installing, PROT_RW)

    def unguard(self) -> int:
        """Make the missing chunks accessible again (before handing the heap to other code)."""
        if self.untracked is not None:
            self.untracked.close()  # an access waiting now gives up: opened, its chunk holds no verified bytes
        with self._cond:
            if not self._guarded:
                return 0
            self._guarded = False
            return self._protect_mask(self.missing & ~self._installing, PROT_RW)

    def _protect_mask(self, mask: np.ndarray, prot: int) -> int:
        if self.heap.closed:
            raise MigrationError("cannot change the protection of a closed heap")
        return protect_chunks(self.heap, np.flatnonzero(mask), prot)

    def _protect(self, a: int, b: int, prot: int) -> None:
        if self.heap.closed:
            raise MigrationError("cannot change the protection of a closed heap")
        protect_chunks(self.heap, np.arange(a, b), prot)

    def _index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self._n:
            raise MigrationError(f"chunk index {i} out of range 0..{self._n - 1}")
        return i


class _Untracked:
    """Tracker of arrays that need no checks (not heap memory, or made by the TrackedArray constructor)."""

    complete = True
    _failure = None


_UNTRACKED = _Untracked()


def guard_heap(heap: Heap) -> None:
    """PROT_NONE over the whole heap of an incoming enclave, before any migration starts (see adopt_guard)."""
    if _mprotect(heap.address, heap.size, PROT_NONE) != 0:
        raise MigrationError(f"mprotect of the heap failed: {os.strerror(ctypes.get_errno())}")


def write_guarded(mem_fd: int, address: int, data: np.ndarray) -> None:
    """Write `data` at `address` through /proc/self/mem, which the kernel lets write a PROT_NONE page of
    a private mapping (as ptrace does): the page stays inaccessible to the app throughout."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(mem_fd, view[done:], address + done)
        if n <= 0:
            raise MigrationError(f"short write of a guarded heap chunk ({done} of {len(view)} bytes)")
        done += n


def protect_chunks(heap: Heap, chunks: np.ndarray, prot: int) -> int:
    """Set the protection of heap chunks (sorted, unique), one mprotect per run of consecutive ones;
    returns the number of calls."""
    runs = chunk_runs(chunks)
    for a, b in runs:
        if _mprotect(heap.address + a * heap.chunk_size, (b - a) * heap.chunk_size, prot) != 0:
            err = ctypes.get_errno()
            raise MigrationError(f"mprotect of heap chunks {a}..{b - 1} failed: {os.strerror(err)}")
    return len(runs)
