"""Where a testbed's record lives, and reading/writing it, so `down`, `status` and `run` work from any process.

The record is written before the first namespace is made and updated as each piece appears, so a
half-failed `up` still leaves enough behind for `down` (which also finds namespaces by name).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from constmig.testbed.spec import TestbedError

DEFAULT_ROOT = Path("/run/constmig-testbed")


def state_root(root: Path | str | None = None) -> Path:
    """--state-dir, else $CONSTMIG_TESTBED_DIR, else /run/constmig-testbed (tmpfs: gone after a reboot, as are namespaces)."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("CONSTMIG_TESTBED_DIR", DEFAULT_ROOT))


def state_file(name: str, root: Path) -> Path:
    return root / f"{name}.json"


def work_dir(name: str, root: Path) -> Path:
    """Logs, host state folders and (by default) the root CA of one testbed."""
    return root / name


def load(name: str, root: Path) -> dict[str, Any] | None:
    path = state_file(name, root)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TestbedError(f"cannot read testbed record {path}: {e}") from None


def save(name: str, root: Path, record: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a record."""
    root.mkdir(parents=True, exist_ok=True)
    path = state_file(name, root)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def remove(name: str, root: Path) -> None:
    state_file(name, root).unlink(missing_ok=True)


def used_subnets(root: Path) -> set[int]:
    """Subnet indexes claimed by other testbeds' records in the same folder."""
    out: set[int] = set()
    if not root.is_dir():
        return out
    for path in root.glob("*.json"):
        try:
            out.add(int(json.loads(path.read_text())["layout"]["subnet_index"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
