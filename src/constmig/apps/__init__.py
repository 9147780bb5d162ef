"""Which enclave apps are installed, and loading one by name (or as `module:Class`).

An app is found the way pytest finds plugins: packages register `name = "module:Class"` under the
`constmig.apps` entry-point group (constmig registers its shipped apps the same way). Listing apps
imports none of them; measuring one reads the source of its module and of the modules it declares.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, entry_points, version

from constmig.enclave.app import EnclaveApp
from constmig.errors import ConfigError

GROUP = "constmig.apps"  # the entry-point group apps register under (the shipped ones too)

# The shipped apps, as their entry points in constmig's pyproject.toml name them: the registry when the
# package metadata is not installed (running from a source tree), and the suite's workload list.
APPS: dict[str, str] = {
    "kvstore": "constmig.apps.kvstore:KVStore",
    "matrix": "constmig.apps.matrix:MatrixApp",
    "btree": "constmig.apps.btree:BTree",
    "hashjoin": "constmig.apps.hashjoin:HashJoin",
    "graph": "constmig.apps.graph:Graph",
    "kmeans": "constmig.apps.kmeans:KMeans",
    "xsbench": "constmig.apps.xsbench:XSBench",
}


@dataclass(frozen=True)
class AppEntry:
    """One installed app: its name, `module:Class`, and the distribution that registered it."""

    name: str
    target: str
    package: str
    version: str


def installed() -> dict[str, AppEntry]:
    """Every app registered under the `constmig.apps` entry-point group, plus the shipped ones."""
    out = {name: AppEntry(name, target, "constmig", _version("constmig")) for name, target in APPS.items()}
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        out[ep.name] = AppEntry(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
    return out


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "source"


def _target(name: str) -> tuple[str, str]:
    """(module, class) of an app: an installed app's name, or `module:Class` naming any importable one."""
    entry = installed().get(name) if isinstance(name, str) else None
    ref = entry.target if entry is not None else None
    if ref is None and isinstance(name, str) and name.count(":") == 1:
        ref = name
    module, _, cls = (ref or "").partition(":")
    if not (all(part.isidentifier() for part in module.split(".")) and cls.isidentifier()):
        if entry is not None:
            raise ConfigError(f"app {name!r} of package {entry.package}: its entry point {ref!r} is not module:Class")
        raise ConfigError(f"unknown app {name!r}; installed apps: {', '.join(sorted(installed()))} (install a package "
                          f"that registers it under the {GROUP!r} entry points, or name it module:Class)")
    return module, cls


def load_app(name: str) -> type[EnclaveApp]:
    """The app class registered as `name` (or named by `module:Class`)."""
    module, cls = _target(name)
    try:
        app_cls = getattr(importlib.import_module(module), cls, None)
    except ImportError as e:
        raise ConfigError(f"app {name!r}: cannot import {module}: {e}") from None
    except Exception as e:  # the app's own module failed while loading: its bug, reported in one line
        raise ConfigError(f"app {name!r}: importing {module} failed: {type(e).__name__}: {e}") from None
    if not (isinstance(app_cls, type) and issubclass(app_cls, EnclaveApp)):
        raise ConfigError(f"app {name!r} ({module}:{cls}) is not an EnclaveApp")
    if isinstance(app_cls.svn, bool) or not isinstance(app_cls.svn, int) or not 0 <= app_cls.svn < 1 << 16:
        raise ConfigError(f"app {name!r} declares security version {app_cls.svn!r}; it must be an int in 0..65535")
    return app_cls


SHARED = ("constmig.apps.common",)  # helper modules the apps run: measured with each of them


def app_source(name: str) -> bytes:
    """Source bytes of what app `name` runs: its module, the modules it declares (`measured_modules`),
    and the shared app helpers. This is what the enclave measures."""
    module, _ = _target(name)
    declared = getattr(load_app(name), "measured_modules", ())
    if isinstance(declared, str) or not all(isinstance(m, str) for m in declared):
        raise ConfigError(f"app {name!r}: measured_modules must be a tuple of module names")
    out = []
    for mod in (module, *declared, *SHARED):
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            raise ConfigError(f"cannot find the source of app {name!r} ({mod})")
        with open(spec.origin, "rb") as f:
            out.append(f.read())
    return b"".join(len(part).to_bytes(8, "big") + part for part in out)
