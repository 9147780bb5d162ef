"""The app's side: its module's builtins that read buffers (interposed while the heap streams), and
plain arrays back once the heap is whole."""

from __future__ import annotations

import weakref
from types import ModuleType
from typing import Any

import numpy as np

from constmig.enclave.tracker.array import TrackedArray
from constmig.enclave.tracker.plans import _ensure_whole
from constmig.errors import MigrationError

_nd_view = np.ndarray.view


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
