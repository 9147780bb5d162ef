"""Registry of the enclave apps that ship with constmig.

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
    try:
        module, cls = APPS[name].split(":")
    except (KeyError, TypeError):
        raise ConfigError(f"unknown app {name!r}; known apps: {', '.join(sorted(APPS))}") from None
    return module, cls


def load_app(name: str) -> type[EnclaveApp]:
    """The app class registered as `name`."""
    module, cls = _target(name)
    app_cls = getattr(importlib.import_module(module), cls)
    if not (isinstance(app_cls, type) and issubclass(app_cls, EnclaveApp)):
        raise ConfigError(f"app {name!r} ({APPS[name]}) is not an EnclaveApp")
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
