"""Small files written atomically and read with one-line errors: keys, certificates, platform secrets;
and the one spelling of a checkpoint's file name.

One place for the pattern the sim platform and the admin PKI both need: a synced temp file of the
writer's own (O_EXCL, random name), then moved over the target or linked to it only if it is new, so a
crash or a concurrent writer never leaves half a file.

A checkpoint is `folder/NAME.vVERSION.ckpt`: the enclave seals it there (enclave/persist.py) and the agent
finds the newest one by it (to list a dead enclave's restore command, or a stranded one's). Both sides
read the name from here, trusted code included, so it lives at the top level."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from constmig.errors import ConfigError


def write_atomic(path: Path, data: bytes, mode: int, replace: bool = True) -> None:
    """Write `path` atomically. Not `replace`: keep a file that appeared meanwhile (two processes creating
    the same key agree on the first one's)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):  # another process won the race: keep its file
                os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


# ---- checkpoint file names ----

CHECKPOINT_SUFFIX = ".ckpt"


def checkpoint_path(folder: Path, name: str, version: int) -> Path:
    """Where checkpoint `version` of enclave `name` is sealed."""
    return folder / f"{name}.v{version}{CHECKPOINT_SUFFIX}"


def checkpoint_owner(path: Path) -> str:
    """The enclave a checkpoint file is of: its name up to the first dot (enclave names have none)."""
    return path.name.split(".")[0]


def checkpoint_version(path: Path) -> int:
    """The version in NAME.vN.ckpt (-1 if the name has none)."""
    tail = path.name.rsplit(".v", 1)[-1].split(".")[0]
    return int(tail) if tail.isdigit() else -1


def newest_checkpoint(folder: Path, name: str) -> Path | None:
    """Enclave `name`'s checkpoint of the highest version in `folder` (None if it has none there)."""
    found = sorted(folder.glob(f"{name}.v*{CHECKPOINT_SUFFIX}"), key=checkpoint_version)
    return found[-1] if found else None
