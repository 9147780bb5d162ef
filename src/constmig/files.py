"""Small files written atomically and read with one-line errors: keys, certificates, platform secrets.

One place for the pattern the sim platform and the admin PKI both need: a synced temp file of the
writer's own (O_EXCL, random name), then moved over the target or linked to it only if it is new, so a
crash or a concurrent writer never leaves half a file."""

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
