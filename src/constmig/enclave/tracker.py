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

import ctypes
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from constmig.enclave.heap import Heap
from constmig.errors import MigrationError

PROT_NONE = 0
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE

_libc = ctypes.CDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int

# numpy >= 2.1 can be told to refuse copying in reshape, which is how a view-only reshape is recognised.
_RESHAPE_NOCOPY = np.lib.NumpyVersion(np.__version__) >= "2.1.0"

_nd_getitem = np.ndarray.__getitem__
_nd_setitem = np.ndarray.__setitem__
_nd_view = np.ndarray.view
_nd_reshape = np.ndarray.reshape
_nd_ravel = np.ndarray.ravel
_nd_iter = np.ndarray.__iter__


class AccessTracker:
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

    def _failed_error(self, waiting: int = 0) -> MigrationError:
        what = f" while the app waited for {waiting} heap chunk(s)" if waiting else ""
        return MigrationError(f"heap access refused: the incoming migration failed{what} ({self._failure})")

    # -- installer side ----------------------------------------------------------------------------

    def begin_install(self, index: int) -> memoryview:
        """Claim missing chunk `index` for writing; returns its heap memory (writable even if guarded)."""
        i = self._index(index)
        with self._cond:
            if not self.missing[i]:
                raise MigrationError(f"chunk {i} is not awaited (not expected, or restored already)")
            if self._installing[i]:
                raise MigrationError(f"chunk {i} is being installed already")
            if self._guarded:
                self._protect(i, i + 1, PROT_RW)
            self._installing[i] = True
        return self.heap.chunk_view(i)

    def finish_install(self, index: int) -> None:
        """The chunk's bytes are in place and verified: let the app see it and wake waiters."""
        i = self._index(index)
        with self._cond:
            if not self._installing[i]:
                raise MigrationError(f"chunk {i} was not being installed (call begin_install first)")
            self._installing[i] = False
            self._restored_at[i] = time.perf_counter()
            self.missing[i] = False
            self._n_missing -= 1
            if self._n_missing == 0:
                self.complete = True
            self._cond.notify_all()

    def abort_install(self, index: int) -> None:
        """The chunk could not be installed (bad tag, short data): it stays missing and guarded."""
        i = self._index(index)
        with self._cond:
            if not self._installing[i]:
                return  # called from error paths: never mask the original error
            self._installing[i] = False
            if self._guarded:
                self._protect(i, i + 1, PROT_NONE)

    def pause(self, reason: str) -> None:
        """The stream stopped: accesses to missing chunks keep waiting (up to their timeout) for a reconnect."""
        with self._cond:
            self._paused = str(reason)

    def unpause(self) -> None:
        with self._cond:
            self._paused = None

    @property
    def paused(self) -> str | None:
        return self._paused

    def fail(self, reason: str) -> None:
        """The migration cannot finish: waiting and every later access to an unfinished heap raise."""
        with self._cond:
            if self._failure is None:
                self._failure = str(reason)
            self._cond.notify_all()

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
        with self._cond:
            if not self._guarded:
                return 0
            self._guarded = False
            return self._protect_mask(self.missing & ~self._installing, PROT_RW)

    def _protect_mask(self, mask: np.ndarray, prot: int) -> int:
        idx = np.flatnonzero(mask)
        if not idx.size:
            return 0
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = idx[np.concatenate(([0], breaks))]
        stops = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):  # one call per run
            self._protect(a, b, prot)
        return len(starts)

    def _protect(self, a: int, b: int, prot: int) -> None:
        if self.heap.closed:
            raise MigrationError("cannot change the protection of a closed heap")
        rc = _mprotect(self._base + a * self._chunk, (b - a) * self._chunk, prot)
        if rc != 0:
            err = ctypes.get_errno()
            raise MigrationError(f"mprotect of heap chunks {a}..{b - 1} failed: {os.strerror(err)}")

    def _index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self._n:
            raise MigrationError(f"chunk index {i} out of range 0..{self._n - 1}")
        return i

    # -- arrays ------------------------------------------------------------------------------------

    def track(self, arr: np.ndarray) -> TrackedArray:
        """A TrackedArray view of heap array `arr` (what the unpickler hands the app instead of `arr`)."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"can only track numpy arrays, not {type(arr).__name__}")
        if arr.size:
            ptr = arr.__array_interface__["data"][0]
            if not self._base <= ptr < self._base + self._size:
                raise MigrationError("cannot track an array that does not live in this tracker's heap")
        out = _nd_view(arr, TrackedArray)
        out._tracker = self
        return out

    def untrack_app(self, app: Any) -> int:
        """`untrack_app(app)`, refused while chunks are missing (plain arrays would read holes)."""
        if not self.complete:
            raise MigrationError(f"cannot untrack the app: {self._n_missing} heap chunks are still missing")
        return untrack_app(app)

    def __repr__(self) -> str:
        state = "failed" if self._failure else ("complete" if self.complete else "streaming")
        return (
            f"<AccessTracker {state}: {self.expected_count - self._n_missing}/{self.expected_count} "
            f"chunks, {self.demanded} demanded>"
        )


class _Untracked:
    """Tracker of arrays that need no checks (not heap memory, or made by the TrackedArray constructor)."""

    complete = True
    _failure = None


_UNTRACKED = _Untracked()


# -- which bytes an access touches ---------------------------------------------------------------------


def _probe_data_offset() -> int | None:
    """Offset of the data pointer in numpy's array struct, if reading it directly gives the right answer.

    `__array_interface__` builds a dict per call (about 1 us); the struct field (`PyArrayObject_fields.data`,
    right after the object header, fixed by numpy's C ABI) reads in a tenth of that, and every fresh
    view on the streaming path needs its pointer once. Checked against the slow way before it is used.
    """
    off = object.__basicsize__
    probes = [np.zeros(7), np.zeros((5, 6), dtype=np.int16)[1:, 2:], np.zeros(3).view(TrackedArray)]
    for arr in probes:
        if ctypes.c_void_p.from_address(id(arr) + off).value != arr.__array_interface__["data"][0]:
            return None
    return off


def _data_ptr_slow(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _data_ptr_fast(a: np.ndarray) -> int:
    return ctypes.c_void_p.from_address(id(a) + _DATA_OFFSET).value or 0


def _addr(a: TrackedArray) -> int | None:
    """Data pointer of `a`, cached (it never changes); None (and untracked) if `a` is not heap memory."""
    try:
        return a._ptr
    except AttributeError:
        pass
    p = _data_ptr(a)
    t = a._tracker
    if not t._base <= p < t._base + t._size:
        a._tracker = _UNTRACKED  # e.g. `.imag` of a real array: fresh zeros, nothing to wait for
        return None
    a._ptr = p
    return p


def _extent(a: TrackedArray) -> tuple[int, int] | None:
    """Heap offsets [lo, hi) spanned by `a`, or None if it has no bytes in the heap."""
    if a.size == 0:
        return None
    p = _addr(a)
    if p is None:
        return None
    lo = hi = p - a._tracker._base
    for n, s in zip(a.shape, a.strides, strict=True):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + a.itemsize


def _ensure_whole(a: TrackedArray) -> None:
    t = a._tracker
    if t.complete:
        return
    ext = _extent(a)
    if ext is not None:
        t._ensure_offsets(ext[0], ext[1])


def _row_extent(a: TrackedArray) -> tuple[int, int] | None:
    """[lo, hi) of one axis-0 row relative to its first element, or None if rows are empty."""
    lo = hi = 0
    for n, s in zip(a.shape[1:], a.strides[1:], strict=True):
        if n == 0:
            return None
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + a.itemsize


def _is_int(k: Any) -> bool:
    tk = type(k)
    return tk is int or (tk is not bool and isinstance(k, int | np.integer))


_VIEW, _READ = 0, 1


def _classify(key: Any, ndim: int) -> int:
    """_VIEW if ndarray.__getitem__(key) only makes a view (reads nothing), else _READ."""
    if type(key) is not tuple:
        key = (key,)
    n_int = 0
    view = False  # None / Ellipsis: the result is an array even when every axis gets an integer
    for k in key:
        if k is None or k is Ellipsis:
            view = True
        elif type(k) is slice:
            pass
        elif _is_int(k):
            n_int += 1
        else:
            return _READ  # advanced indexing copies (or an invalid key, which numpy rejects)
    return _VIEW if view or n_int < ndim else _READ


Plan = tuple[int, int] | np.ndarray | None  # heap offsets [lo, hi), chunk indices, or nothing


def _rows_plan(a: TrackedArray, key: Any) -> Plan:
    """The chunks a reading or writing access `a[key]` can touch.

    Precise when axis 0 gets an integer or integer array (the rows it selects, whole), else the whole
    array: every element an access reaches lies in the row its axis-0 index picks.
    """
    if a.size == 0:
        return None
    first = key[0] if type(key) is tuple and key else key
    if a.ndim == 0 or not (_is_int(first) or (isinstance(first, np.ndarray) and first.dtype.kind in "iu")):
        return _extent(a)
    p = _addr(a)
    rel = _row_extent(a)
    if p is None or rel is None:
        return None
    t = a._tracker
    off = p - t._base
    n0, s0 = a.shape[0], a.strides[0]
    rlo, rhi = rel
    if _is_int(first):
        r = int(first)
        if r < 0:
            r += n0
        if not 0 <= r < n0:
            return None  # numpy raises IndexError before touching memory
        start = off + r * s0
        return start + rlo, start + rhi
    rows = first.astype(np.int64, copy=False).ravel()
    if not rows.size or not n0:
        return None
    # Valid indices map to themselves; invalid ones (numpy raises on them) map to some row, harmlessly.
    starts = (rows % n0) * s0 + off
    firsts = (starts + rlo) >> t._shift
    lasts = (starts + (rhi - 1)) >> t._shift
    if rhi - rlo <= t._chunk:  # a row spans at most two chunks
        return np.concatenate((firsts, lasts))
    return _expand(firsts, lasts, t._n)


def _expand(firsts: np.ndarray, lasts: np.ndarray, n: int) -> np.ndarray:
    """All chunks in the inclusive ranges [firsts[k], lasts[k]], vectorized."""
    counts = lasts - firsts + 1
    total = int(counts.sum())
    if total <= n:
        steps = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(firsts, counts) + steps
    edges = np.bincount(firsts, minlength=n + 1) - np.bincount(lasts + 1, minlength=n + 1)
    return np.flatnonzero(np.cumsum(edges[:n]) > 0).astype(np.int64)


def _read_plan(a: TrackedArray, key: Any) -> Plan:
    return None if _classify(key, a.ndim) == _VIEW else _rows_plan(a, key)


def _write_plan(a: TrackedArray, key: Any) -> Plan:
    if _classify(key, a.ndim) == _VIEW:
        view = _nd_getitem(a, key)  # a view: touches no memory; its extent is exactly what is written
        return _extent(view) if isinstance(view, TrackedArray) else _rows_plan(a, key)
    return _rows_plan(a, key)


def _ensure_plan(t: AccessTracker | _Untracked, plan: Plan) -> None:
    if plan is None or t.complete:
        return
    if type(plan) is tuple:
        t._ensure_offsets(plan[0], plan[1])  # type: ignore[union-attr]
    else:
        t._ensure_chunks(plan)  # type: ignore[union-attr]


def key_chunks(arr: TrackedArray, key: Any, write: bool = False) -> np.ndarray:
    """Sorted chunk indices that `arr[key]` (or `arr[key] = v` if `write`) makes sure of before it runs.

    A read that only makes a view needs none: the view is checked when it is used.
    """
    plan = _write_plan(arr, key) if write else _read_plan(arr, key)
    if plan is None:
        return np.zeros(0, dtype=np.int64)
    if type(plan) is tuple:
        t = arr._tracker
        lo, hi = max(plan[0], 0), min(plan[1], t._size)
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        return np.arange(lo >> t._shift, ((hi - 1) >> t._shift) + 1, dtype=np.int64)
    return np.unique(plan)


# -- unwrapping for numpy's own machinery -------------------------------------------------------------


def _plain(x: TrackedArray) -> np.ndarray:
    """Plain view of `x` after its whole extent is restored (numpy will read or write all of it)."""
    if not x._tracker.complete:
        _ensure_whole(x)
    return _nd_view(x, np.ndarray)


def _unwrap(x: Any, pairs: list[tuple[np.ndarray, TrackedArray]], depth: int = 0) -> Any:
    """`x` with every TrackedArray (also inside lists/tuples) ensured and replaced by a plain view."""
    if isinstance(x, TrackedArray):
        p = _plain(x)
        pairs.append((p, x))
        return p
    if depth < 4 and type(x) in (list, tuple):
        items = [_unwrap(y, pairs, depth + 1) for y in x]
        if any(a is not b for a, b in zip(items, x, strict=True)):
            return type(x)(items)
    return x


def _rewrap(res: Any, pairs: list[tuple[np.ndarray, TrackedArray]]) -> Any:
    """Give back the caller's own TrackedArray where numpy returns the plain view of it (out=...)."""
    for p, orig in pairs:
        if res is p:
            return orig
    if type(res) is tuple and pairs:
        return tuple(_rewrap(r, pairs) for r in res)
    return res


def _reader(name: str) -> Callable[..., Any]:
    """An ndarray method that reads or writes the whole array through C code no hook sees."""
    impl = getattr(np.ndarray, name)
    on_self = name in _ON_SELF

    def method(self: TrackedArray, *args: Any, **kwargs: Any) -> Any:
        if on_self and self._tracker.complete:
            return impl(self, *args, **kwargs)
        pairs: list[tuple[np.ndarray, TrackedArray]] = []
        if args:
            args = tuple(_unwrap(x, pairs) for x in args)
        if kwargs:
            kwargs = {k: _unwrap(v, pairs) for k, v in kwargs.items()}
        res = impl(_plain(self), *args, **kwargs)
        return _rewrap(res, pairs) if pairs else res

    method.__name__ = name
    method.__qualname__ = f"TrackedArray.{name}"
    method.__doc__ = impl.__doc__
    return method


# Results that are never arrays of the caller's type: with the tracker complete, call them on self as is.
_ON_SELF = frozenset({"tobytes", "tolist", "__int__", "__float__", "__complex__", "__index__", "__bool__"})
_READERS = (
    # whole-array reads and writes implemented in C, outside ufuncs and __array_function__
    "tobytes", "tolist", "tofile", "dump", "dumps", "copy", "__copy__", "__deepcopy__", "astype", "fill",
    "byteswap", "flatten", "getfield", "setfield", "__array__", "__dlpack__", "__reduce__", "__reduce_ex__",
    "__repr__", "__str__", "__format__", "__int__", "__float__", "__complex__", "__index__", "__bool__",
    "__contains__",
    "sort", "argsort", "partition", "argpartition", "searchsorted", "nonzero", "take", "put", "repeat",
    "compress", "choose", "trace", "dot", "argmax", "argmin",
    # these go through ufuncs anyway; wrapping them skips a second pass through __array_ufunc__
    "sum", "mean", "max", "min", "any", "all", "prod", "std", "var", "cumsum", "cumprod", "round", "clip",
    "conj", "conjugate",
)  # fmt: skip


def guard_heap(heap: Heap) -> None:
    """PROT_NONE over the whole heap of an incoming enclave, before any migration starts (see adopt_guard)."""
    if _mprotect(heap.address, heap.size, PROT_NONE) != 0:
        raise MigrationError(f"mprotect of the heap failed: {os.strerror(ctypes.get_errno())}")


class TrackedArray(np.ndarray):
    """A heap array whose every access first makes sure the heap chunks it touches were restored.

    Views (basic slicing, reshape without copy, transpose...) stay tracked and are checked when used;
    anything that reads or copies bytes (scalars, fancy indexing, ufuncs, numpy functions, methods)
    checks first and returns plain numpy results. With the tracker complete, each access costs one
    attribute check on top of numpy.
    """

    __slots__ = ("_tracker", "_ptr")

    _tracker: AccessTracker | _Untracked
    _ptr: int

    def __array_finalize__(self, obj: Any) -> None:
        self._tracker = getattr(obj, "_tracker", _UNTRACKED)

    # -- indexing ----------------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        t = self._tracker
        if not t.complete:
            key = _before_read(self, t, key)
        res = _nd_getitem(self, key)
        if type(res) is TrackedArray and type(res.base) is not TrackedArray:
            return _nd_view(res, np.ndarray)  # fancy indexing made a copy: not heap memory
        return res

    def __setitem__(self, key: Any, value: Any) -> None:
        t = self._tracker
        if not t.complete:
            key = _plain_key(key)
            if isinstance(value, TrackedArray):
                value = _plain(value)
            elif type(value) in (list, tuple):
                value = _unwrap(value, [])
            # A write must wait too: the chunk's later install would overwrite it.
            _ensure_plan(t, _write_plan(self, key))
        _nd_setitem(self, key, value)

    def __iter__(self) -> Any:
        if self.ndim > 1:
            return _nd_iter(self)  # yields row views, each checked when used
        return _nd_iter(_plain(self))

    def __bytes__(self) -> bytes:
        return bytes(_plain(self))

    def item(self, *args: Any) -> Any:
        if not self._tracker.complete:
            key: Any = None
            if len(args) == 1 and _is_int(args[0]) and self.size:
                flat = int(args[0])
                if -self.size <= flat < self.size:
                    key = np.unravel_index(flat % self.size, self.shape)
            elif len(args) == 1 and type(args[0]) is tuple:
                key = args[0]
            elif args and all(_is_int(x) for x in args):
                key = args
            if key is None or len(key) != self.ndim:
                _ensure_whole(self)
            else:
                _ensure_plan(self._tracker, _rows_plan(self, key))
        return np.ndarray.item(self, *args)

    # -- views that may copy -----------------------------------------------------------------------

    def view(self, *args: Any, **kwargs: Any) -> Any:
        if not self._tracker.complete and _view_escapes(args, kwargs):
            _ensure_whole(self)  # a plain view would be read without checks
        return _nd_view(self, *args, **kwargs)

    def reshape(self, *shape: Any, order: str = "C", copy: bool | None = None) -> Any:
        if _RESHAPE_NOCOPY and copy is not True:
            try:
                return _nd_reshape(self, *shape, order=order, copy=False)
            except ValueError:
                if copy is False:
                    raise
        if copy is None:
            return _nd_reshape(_plain(self), *shape, order=order)
        return _nd_reshape(_plain(self), *shape, order=order, copy=copy)

    def ravel(self, order: str = "C") -> Any:
        if order in ("C", "A", "K") and self.flags.c_contiguous:
            return _nd_ravel(self, order)
        return _nd_ravel(_plain(self), order)

    @property
    def flat(self) -> Any:  # type: ignore[override]
        return _plain(self).flat

    @flat.setter
    def flat(self, value: Any) -> None:
        _plain(self).flat = value

    @property
    def data(self) -> memoryview:  # type: ignore[override]
        return _plain(self).data

    @property
    def ctypes(self) -> Any:  # type: ignore[override]
        return _plain(self).ctypes

    # -- numpy protocols ---------------------------------------------------------------------------

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        pairs: list[tuple[np.ndarray, TrackedArray]] = []
        inputs = tuple(_plain(x) if isinstance(x, TrackedArray) else x for x in inputs)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _unwrap(out, pairs)
        where = kwargs.get("where")
        if isinstance(where, TrackedArray):
            kwargs["where"] = _plain(where)
        res = getattr(ufunc, method)(*inputs, **kwargs)
        return _rewrap(res, pairs) if pairs else res

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        pairs: list[tuple[np.ndarray, TrackedArray]] = []
        args = tuple(_unwrap(x, pairs) for x in args)
        kwargs = {k: _unwrap(v, pairs) for k, v in kwargs.items()}
        return _rewrap(func(*args, **kwargs), pairs)


for _name in _READERS:
    setattr(TrackedArray, _name, _reader(_name))
del _name

_DATA_OFFSET = _probe_data_offset()
_data_ptr: Callable[[np.ndarray], int] = _data_ptr_slow if _DATA_OFFSET is None else _data_ptr_fast


def _before_read(a: TrackedArray, t: AccessTracker, key: Any) -> Any:
    """Slow path of a[key]: wait for what it reads; returns the key with tracked index arrays unwrapped.

    The two commonest shapes of key (one integer; a tuple of integers and slices) are decided in one
    pass here, since this runs for every access while the heap streams.
    """
    tk = type(key)
    if tk is int or (tk is not bool and isinstance(key, np.integer)):
        if a.ndim != 1:
            return key  # a row view
        n0 = a.shape[0]
        r = int(key)
        if r < 0:
            r += n0
        if 0 <= r < n0:  # else numpy raises before reading
            p = _addr(a)
            if p is not None:
                off = p - t._base + r * a.strides[0]
                t._ensure_offsets(off, off + a.itemsize)
        return key
    if tk is tuple:
        n_int = 0
        basic = True
        view = False
        for k in key:
            tkk = type(k)
            if tkk is slice:
                continue
            if tkk is int:
                n_int += 1
            elif k is None or k is Ellipsis:
                view = True
            elif isinstance(k, TrackedArray):
                key = _plain_key(key)
                basic = False
                break
            elif _is_int(k):
                n_int += 1
            else:
                basic = False
        if basic and (view or n_int < a.ndim):
            return key
    elif tk is slice or key is Ellipsis or key is None:
        return key
    else:
        key = _plain_key(key)
    _ensure_plan(t, _read_plan(a, key))
    return key


def _plain_key(key: Any) -> Any:
    """Index arrays that are themselves tracked are read by numpy's C code: ensure and unwrap them."""
    if isinstance(key, TrackedArray):
        return _plain(key)
    if type(key) is tuple:
        for k in key:
            if isinstance(k, TrackedArray):
                return tuple(_plain(x) if isinstance(x, TrackedArray) else x for x in key)
    return key


def _view_escapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for x in (*args, kwargs.get("type"), kwargs.get("dtype")):
        if isinstance(x, type) and issubclass(x, np.ndarray) and not issubclass(x, TrackedArray):
            return True
    return False


# -- the app's side ----------------------------------------------------------------------------------


def untrack_app(app: Any) -> int:
    """Swap the app's TrackedArrays for plain views, so a finished migration leaves zero overhead.

    Walks the app's attributes and the lists, tuples and dicts in them (a few levels down). Refuses
    arrays whose tracker still misses chunks. Returns how many arrays were swapped.
    """
    count = 0
    seen: set[int] = set()

    def plain(x: Any, depth: int) -> Any:
        nonlocal count
        if isinstance(x, TrackedArray):
            if not x._tracker.complete:
                raise MigrationError("cannot give the app plain arrays while heap chunks are missing")
            count += 1
            return _nd_view(x, np.ndarray)
        if depth >= 3 or id(x) in seen:
            return x
        tx = type(x)
        if tx is list:
            seen.add(id(x))
            for i, y in enumerate(x):
                new = plain(y, depth + 1)
                if new is not y:
                    x[i] = new
        elif tx is dict:
            seen.add(id(x))
            for k, y in list(x.items()):
                new = plain(y, depth + 1)
                if new is not y:
                    x[k] = new
        elif tx is tuple:
            items = [plain(y, depth + 1) for y in x]
            if any(a is not b for a, b in zip(items, x, strict=True)):
                return tuple(items)
        return x

    for name, value in list(vars(app).items()):
        new = plain(value, 0)
        if new is not value:
            setattr(app, name, new)
    return count


class _BuiltinProxy(type):
    """Metaclass of stand-ins for memoryview/bytes/bytearray in an app module.

    Calling one ensures a TrackedArray argument first (the buffer protocol has no hook in 3.11); as a
    type it answers isinstance/issubclass like the builtin, so `isinstance(x, bytes | memoryview)` in
    app code keeps working. Instances are always the builtin's own.
    """

    _builtin: type

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], TrackedArray):
            _ensure_whole(args[0])
        return cls._builtin(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._builtin)

    def __subclasscheck__(cls, sub: type) -> bool:
        if isinstance(sub, _BuiltinProxy):
            sub = sub._builtin  # issubclass(bytearray, bytes | bytearray) with both names interposed
        return issubclass(sub, cls._builtin)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls._builtin, name)  # bytes.fromhex, bytes.maketrans, ...

    def __repr__(cls) -> str:
        return repr(cls._builtin)


def _proxy(b: type) -> type:
    return _BuiltinProxy(b.__name__, (), {"_builtin": b, "__doc__": b.__doc__, "__module__": "builtins"})


_PROXIES: dict[str, type] = {b.__name__: _proxy(b) for b in (memoryview, bytes, bytearray)}
_interposed: weakref.WeakKeyDictionary[ModuleType, list[str]] = weakref.WeakKeyDictionary()


def interpose(module: ModuleType) -> None:
    """Make `memoryview`, `bytes` and `bytearray` in `module` ensure a TrackedArray before reading it.

    Only names the module does not define itself are shadowed (in its globals, so only its code is
    affected). Idempotent; `restore` undoes it.
    """
    if module in _interposed:
        return
    g = vars(module)
    names = [name for name in _PROXIES if name not in g]  # a module's own binding is not ours to change
    for name in names:
        g[name] = _PROXIES[name]
    _interposed[module] = names


def restore(module: ModuleType) -> None:
    """Undo `interpose(module)`."""
    g = vars(module)
    for name in _interposed.pop(module, []):
        if g.get(name) is _PROXIES[name]:  # unless rebound by someone else since
            del g[name]
