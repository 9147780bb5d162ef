"""Registry of the enclave apps that ship with constmig, and lookup of any app as `module:Class`.

Names map to "module:Class" strings, so listing apps imports nothing and an app's source can be read
for measurement without running it.
"""

from __future__ import annotations

import importlib
import importlib.util

from constmig.enclave.app import EnclaveApp
from constmig.errors import ConfigError

APPS: dict[str, str] = {
    "kvstore": "constmig.apps.kvstore:KVStore",
    "matrix": "constmig.apps.matrix:MatrixApp",
    "btree": "constmig.apps.btree:BTree",
    "hashjoin": "constmig.apps.hashjoin:HashJoin",
    "graph": "constmig.apps.graph:Graph",
    "kmeans": "constmig.apps.kmeans:KMeans",
    "xsbench": "constmig.apps.xsbench:XSBench",
}


def _target(name: str) -> tuple[str, str]:
    """(module, class) of an app: a shipped app's name, or `module:Class` naming any importable one."""
    ref = APPS.get(name) if isinstance(name, str) else None
    if ref is None and isinstance(name, str) and name.count(":") == 1:
        ref = name
    module, _, cls = (ref or "").partition(":")
    if not (all(part.isidentifier() for part in module.split(".")) and cls.isidentifier()):
        raise ConfigError(f"unknown app {name!r}; known apps: {', '.join(sorted(APPS))} (or module:Class)")
    return module, cls


def load_app(name: str) -> type[EnclaveApp]:
    """The app class registered as `name` (or named by `module:Class`)."""
    module, cls = _target(name)
    try:
        app_cls = getattr(importlib.import_module(module), cls, None)
    except ImportError as e:
        raise ConfigError(f"app {name!r}: cannot import {module}: {e}") from None
    if not (isinstance(app_cls, type) and issubclass(app_cls, EnclaveApp)):
        raise ConfigError(f"app {name!r} ({module}:{cls}) is not an EnclaveApp")
    if isinstance(app_cls.svn, bool) or not isinstance(app_cls.svn, int) or not 0 <= app_cls.svn < 1 << 16:
        raise ConfigError(f"app {name!r} declares security version {app_cls.svn!r}; it must be an int in 0..65535")
    return app_cls


SHARED = ("constmig.apps.common",)  # helper modules the apps run: measured with each of them


def app_source(name: str) -> bytes:
    """Source bytes of app `name`'s module and of the shared app helpers (what the enclave measures)."""
    module, _ = _target(name)
    out = []
    for mod in (module, *SHARED):
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            raise ConfigError(f"cannot find the source of app {name!r} ({mod})")
        with open(spec.origin, "rb") as f:
            out.append(f.read())
    return b"".join(len(part).to_bytes(8, "big") + part for part in out)
