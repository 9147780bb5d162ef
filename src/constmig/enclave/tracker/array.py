"""TrackedArray: the numpy view the app gets instead of a heap array while the heap streams in. Every
access first makes sure of the chunks it touches (plans.py); results are plain numpy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from constmig.enclave.tracker.plans import (
    _addr,
    _ensure_plan,
    _ensure_whole,
    _is_int,
    _read_plan,
    _rows_plan,
    _write_plan,
)
from constmig.enclave.tracker.state import _UNTRACKED, TrackerState, _Untracked
from constmig.errors import MigrationError

# numpy >= 2.1 can be told to refuse copying in reshape, which is how a view-only reshape is recognised.
_RESHAPE_NOCOPY = np.lib.NumpyVersion(np.__version__) >= "2.1.0"

_nd_getitem = np.ndarray.__getitem__
_nd_setitem = np.ndarray.__setitem__
_nd_view = np.ndarray.view
_nd_reshape = np.ndarray.reshape
_nd_ravel = np.ndarray.ravel
_nd_iter = np.ndarray.__iter__


def track(tracker: TrackerState, arr: np.ndarray) -> TrackedArray:
    """A TrackedArray view of heap array `arr` (what the unpickler hands the app instead of `arr`)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"can only track numpy arrays, not {type(arr).__name__}")
    if arr.size:
        ptr = arr.__array_interface__["data"][0]
        if not tracker._base <= ptr < tracker._base + tracker._size:
            raise MigrationError("cannot track an array that does not live in this tracker's heap")
    out = _nd_view(arr, TrackedArray)
    out._tracker = tracker
    return out


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


class TrackedArray(np.ndarray):
    """A heap array whose every access first makes sure the heap chunks it touches were restored.

    Views (basic slicing, reshape without copy, transpose...) stay tracked and are checked when used;
    anything that reads or copies bytes (scalars, fancy indexing, ufuncs, numpy functions, methods)
    checks first and returns plain numpy results. With the tracker complete, each access costs one
    attribute check on top of numpy.
    """

    __slots__ = ("_tracker", "_ptr")

    _tracker: TrackerState | _Untracked
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


def _before_read(a: TrackedArray, t: TrackerState, key: Any) -> Any:
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
