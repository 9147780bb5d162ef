"""Human sizes (512M, 1G, 64K) to bytes and back, bounded waits, and the short forms one-line messages
use (a digest's first bytes, any text on one line)."""

import errno
import math
import os
import re
from pathlib import Path

from constmig.errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse '512M', '1G', '1.5GiB', '65536' into bytes; raise ConfigError on anything else."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"malformed size {text!r}: use a number with an optional K, M, G or T suffix (e.g. 512M)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int | float) -> str:
    """Format bytes compactly: 536870912 -> '512.0 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def short_hex(b: bytes) -> str:
    """A digest, key or id as a message names it: its first 8 bytes in hex, then an ellipsis."""
    return b.hex()[:16] + "…"


def one_line(text: str, limit: int = 240) -> str:
    """`text` on one line of at most `limit` characters: unprintable characters and runs of white space
    become one space (a peer's text cannot break a log line or a terminal), and a longer text ends in …."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (what a new heap can really get)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("cannot read MemAvailable from /proc/meminfo")


def check_writable(path: str | Path | None, flag: str, folder: bool = False) -> None:
    """Fail at once, in one line, if an output (`folder`, or a file's folder) cannot be written: before
    the work that makes it, not after. A file's folder must exist (a typo must not make folders, as
    root at / perhaps); an output `folder` is made. `-` (stdout) and None pass."""
    if path is None or str(path) == "-":
        return
    target = Path(path)
    where = target if folder else target.parent
    try:
        if not folder and target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        if not folder and not where.is_dir():
            raise (NotADirectoryError(errno.ENOTDIR, f"{os.strerror(errno.ENOTDIR)} ({where} is a file)")
                   if where.exists() else
                   FileNotFoundError(errno.ENOENT, f"{os.strerror(errno.ENOENT)} (the folder {where} does not exist)"))
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {flag} {path}: {e.strerror or e}") from None


def resident_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


MAX_WAIT_S = 86400.0  # no wait a peer or agent asks for may exceed a day


def wait_seconds(value: object, what: str, *, zero: bool = False) -> float:
    """A wait someone else chose (an agent's timeout, a resume deadline): a finite number of seconds in
    (0, a day], or [0, a day] with `zero`. inf, nan, bools and strings are refused, never passed on to
    socket.settimeout (which raises OverflowError) or to a wait that never ends."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) \
        and (value >= 0 if zero else value > 0) and value <= MAX_WAIT_S
    if not ok:
        raise ConfigError(f"{what} must be a number of seconds in {'[' if zero else '('}0, {MAX_WAIT_S:g}], "
                          f"not {value!r}")
    return float(value)  # type: ignore[arg-type]


_DURATION_RE = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*(ms|s|us)?\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'50ms', '0.2s', '500us' (or a bare number of milliseconds) into seconds; ConfigError otherwise."""
    m = _DURATION_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ConfigError(f"malformed duration {text!r}: use a number with ms, s or us (e.g. 50ms)")
    unit = (m.group(2) or "ms").lower()
    return float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
