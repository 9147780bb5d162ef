"""Export and import of an app's small state: what moves during the stop, while the heap moves later.

The small state is the app instance's attributes plus the heap's allocation metadata. Arrays that are
views into the heap are not copied: they are written as references (allocation name, or name plus
offset/shape/strides for a sub-view) and rebound to the destination heap, whose bytes arrive by chunks.
Everything else, including numpy arrays that live outside the heap, is pickled as is.

Why pickle is acceptable here: this blob is produced inside an attested enclave and only ever travels
encrypted and authenticated to another attested enclave running the same measured code. Nobody outside
the trust boundary can create or alter it, so unpickling it is exactly as trusted as the enclave code
itself. Never feed this function bytes that did not come through that channel.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from constmig.enclave.app import EnclaveApp
from constmig.enclave.heap import Heap
from constmig.errors import EnclaveError, HeapError

try:  # numpy >= 2.0
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy 1.x
    byte_bounds = np.byte_bounds  # type: ignore[attr-defined]

STATE_VERSION = 1


def _heap_ref(heap: Heap, arr: np.ndarray) -> tuple[Any, ...] | None:
    """A reference for `arr` if it is a view into `heap`, else None (pickle it normally)."""
    lo, hi = byte_bounds(arr)
    base, end = heap.address, heap.address + heap.size
    if arr.size == 0 or hi <= base or lo >= end:
        return None  # not heap memory (an empty view has no bytes to lose; pickling copies it)
    name = heap.find(lo - base, hi - lo)
    if name is None:
        raise EnclaveError(
            f"an app array covers heap bytes {lo - base}..{hi - base} outside every allocation; it would not migrate"
        )
    ptr = arr.__array_interface__["data"][0] - base
    whole = heap.array(name)
    if (
        ptr == heap.extent(name)[0]
        and arr.shape == whole.shape
        and arr.dtype == whole.dtype
        and arr.strides == whole.strides
    ):
        return ("array", name, arr.flags.writeable)
    return ("view", name, ptr, arr.shape, arr.strides, arr.dtype.str, arr.flags.writeable)


class _StatePickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, heap: Heap) -> None:
        super().__init__(file, protocol=5)
        self._heap = heap

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401 - pickle hook
        if obj is self._heap:
            return ("heap",)
        if isinstance(obj, np.ndarray):
            return _heap_ref(self._heap, obj)
        return None


class _StateUnpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, heap: Heap, wrap: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        super().__init__(file)
        self._heap = heap
        self._wrap = wrap

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "heap":
            return self._heap
        if kind == "array":
            arr = self._heap.array(pid[1])
        elif kind == "view":
            _, name, ptr_off, shape, strides, dtype, _w = pid
            whole = self._heap.array(name)
            arr = np.ndarray(
                shape, dtype=np.dtype(dtype), buffer=self._heap.buf, offset=ptr_off, strides=strides
            )
            lo, hi = byte_bounds(arr)
            w_lo, w_hi = byte_bounds(whole)
            if arr.size and not (w_lo <= lo and hi <= w_hi):
                raise EnclaveError(f"state blob has a view outside allocation {name!r}")
        else:
            raise EnclaveError(f"state blob has an unknown heap reference {kind!r}")
        if not pid[-1]:
            arr.flags.writeable = False
        if self._wrap is not None:
            arr = self._wrap(arr)  # a view of a read-only array stays read-only
        return arr


def export_app_state(app: EnclaveApp) -> bytes:
    """Serialize the app's small state: heap metadata plus attributes, heap arrays as references.

    The result is only ever sent encrypted and authenticated to an attested peer enclave running the
    same measured code (see the module docstring for why pickle is acceptable there).
    """
    heap = app.heap
    attrs = {k: v for k, v in vars(app).items() if k != "heap"}
    doc = {
        "version": STATE_VERSION,
        "app": type(app).name,
        "class": f"{type(app).__module__}:{type(app).__qualname__}",
        "heap": heap.metadata(),
    }
    buf = io.BytesIO()
    pickler = _StatePickler(buf, heap)
    try:
        pickler.dump(doc)  # header first: the importer restores the heap layout before any array reference
        pickler.dump(attrs)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise EnclaveError(f"cannot export state of app {type(app).name!r}: {_culprit(attrs, heap)}{e}") from None
    return buf.getvalue()


def _culprit(attrs: dict[str, Any], heap: Heap) -> str:
    """Which attribute cannot travel (tried one by one, only once the whole export failed)."""
    for name, value in attrs.items():
        try:
            _StatePickler(io.BytesIO(), heap).dump(value)
        except (pickle.PicklingError, TypeError, AttributeError):
            return f"attribute {name!r} ({type(value).__name__}) cannot travel: "
    return ""


def import_app_state(
    app_cls: type[EnclaveApp],
    heap: Heap,
    blob: bytes,
    *,
    wrap: Callable[[np.ndarray], np.ndarray] | None = None,
) -> EnclaveApp:
    """Rebuild an app instance on a fresh heap of the same geometry from `export_app_state` output.

    The heap's contents are not touched: its arrays are rebound by name and fill in as chunks arrive.
    `wrap` is applied to every rebuilt heap array, so a post-copy destination can hand the app arrays
    that check for missing chunks (the Access Tracker's `track`) without the app knowing.
    Only call this on a blob received over the attested, authenticated migration channel.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise EnclaveError(f"app state blob must be bytes, not {type(blob).__name__}")
    unpickler = _StateUnpickler(io.BytesIO(blob), heap, wrap)
    try:
        doc = unpickler.load()
        _check_doc(doc, app_cls, heap)
        attrs = unpickler.load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ) as e:
        raise EnclaveError(f"malformed app state blob: {e!r}") from None
    if not isinstance(attrs, dict):
        raise EnclaveError("malformed app state blob: attributes are not a dict")
    app = app_cls.__new__(app_cls)
    app.heap = heap
    for k, v in attrs.items():
        setattr(app, k, v)
    return app


def _check_doc(doc: Any, app_cls: type[EnclaveApp], heap: Heap) -> None:
    """Check the header names this app and restore the source's heap layout into `heap`."""
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise EnclaveError("malformed app state blob: bad header")
    if doc.get("app") != app_cls.name:
        raise EnclaveError(f"app state blob is for app {doc.get('app')!r}, not {app_cls.name!r}")
    try:
        heap.restore_metadata(doc["heap"])
    except HeapError as e:
        raise EnclaveError(f"cannot restore heap layout: {e}") from None
