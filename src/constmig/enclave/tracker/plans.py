"""Which heap bytes an access to a tracked array touches, decided with numpy from its index, and making
sure of them (the access-plan math of the Access Tracker)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from constmig.enclave.tracker.state import _UNTRACKED, TrackerState, _Untracked

TrackedArray = np.ndarray  # array.py's TrackedArray (a subclass; named so here to keep the import one-way)

_nd_getitem = np.ndarray.__getitem__


class _Probe(np.ndarray):
    """An ndarray subclass with slots, laid out like TrackedArray, for the data-pointer probe."""

    __slots__ = ("_tracker", "_ptr")


def _probe_data_offset() -> int | None:
    """Offset of the data pointer in numpy's array struct, if reading it directly gives the right answer.

    `__array_interface__` builds a dict per call (about 1 us); the struct field (`PyArrayObject_fields.data`,
    right after the object header, fixed by numpy's C ABI) reads in a tenth of that, and every fresh
    view on the streaming path needs its pointer once. Checked against the slow way before it is used.
    """
    off = object.__basicsize__
    probes = [np.zeros(7), np.zeros((5, 6), dtype=np.int16)[1:, 2:], np.zeros(3).view(_Probe)]
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
        return _extent(view) if hasattr(view, "_tracker") else _rows_plan(a, key)  # still a tracked view
    return _rows_plan(a, key)


def _ensure_plan(t: TrackerState | _Untracked, plan: Plan) -> None:
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


_DATA_OFFSET = _probe_data_offset()
_data_ptr: Callable[[np.ndarray], int] = _data_ptr_slow if _DATA_OFFSET is None else _data_ptr_fast
