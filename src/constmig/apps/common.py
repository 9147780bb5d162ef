"""What the shipped apps share: option and argument checks, and the 64-bit mixing hash.

Part of every app's measurement (apps/__init__.py:app_source), since the apps run this code too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from constmig.errors import ConfigError, EnclaveError

PAGE = 4096
M1 = 0xFF51AFD7ED558CCD  # MurmurHash3 fmix64 multipliers (odd, so the mix is invertible)
M2 = 0xC4CEB9FE1A85EC53
_M1, _M2, _S33 = np.uint64(M1), np.uint64(M2), np.uint64(33)


def check_options(app: str, config: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse a launch option the app does not have (a typo would otherwise be silently ignored)."""
    known = tuple(known)
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ConfigError(f"unknown {app} option {unknown[0]!r}; known options: {', '.join(known)}")


def int_arg(v: Any, what: str, lo: int, hi: int, err: type[Exception] = EnclaveError) -> int:
    """`v` as an int in lo..hi-1 (bools refused), else `err` with a one-line message."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or not lo <= v < hi:
        raise err(f"{what} must be an integer from {lo} to {hi - 1}, not {v!r}")
    return int(v)


def fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: a bijection on uint64 that spreads every input bit."""
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


def largest_fitting(size_of: Callable[[int], int], free: int, upper: int) -> int:
    """The largest n in 0..upper with size_of(n) <= free (size_of grows with n): a binary search, since
    the apps' layouts round up to pages and cannot be solved for n in closed form."""
    lo, hi = 0, upper + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size_of(mid) <= free else (lo, mid)
    return lo
