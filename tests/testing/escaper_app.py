"""A test-only enclave app that reads its heap the way a new app author might: `np.asarray(self.entries)`,
a path the Access Tracker's instrumentation does not see (docs/apps.md). Its `scan` ECALL checks every
entry against the pattern `fill` wrote, so a read of bytes that were never the app's (zeros, a stale or
unverified chunk) is an error the client sees, not a silent wrong answer.

Launched as `escaper_app:Escaper`, with this folder on the agents' PYTHONPATH (tests/testing/).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from constmig.apps.common import check_options
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import EnclaveError

MIX = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64: entries differ everywhere, none is 0


def pattern(lo: int, hi: int, seed: int) -> np.ndarray:
    """What entries [lo, hi) hold after fill(.., seed)."""
    with np.errstate(over="ignore"):
        return (np.arange(lo + 1, hi + 1, dtype=np.int64) * MIX) ^ np.int64(seed)


class Escaper(EnclaveApp):
    """One int64 array over the whole heap, read through np.asarray."""

    name = "escaper"

    def setup(self, **config: Any) -> None:
        check_options("escaper", config, ())
        rows = (self.heap.free_bytes - 4096) // 8
        self.entries = self.heap.alloc("escaper.entries", rows, np.int64)
        self.filled = 0
        self.seed = 0

    @ecall
    def fill(self, fraction: float, seed: int) -> int:
        n = int(len(self.entries) * float(fraction))
        self.entries[:n] = pattern(0, n, int(seed))
        self.filled, self.seed = n, int(seed)
        return n

    @ecall
    def scan(self) -> int:
        """Every filled entry, read through np.asarray (untracked), checked; returns how many."""
        plain = np.asarray(self.entries)  # a plain ndarray over the heap: no check before it is read
        step = 1 << 17
        for lo in range(0, self.filled, step):
            hi = min(lo + step, self.filled)
            bad = np.flatnonzero(plain[lo:hi] != pattern(lo, hi, self.seed))
            if bad.size:
                raise EnclaveError(f"entry {lo + int(bad[0])} holds {int(plain[lo + int(bad[0])])}, not what "
                                   "fill wrote")
        return self.filled

    @ecall
    def checksum(self) -> str:
        h = hashlib.sha256(self.entries.tobytes())
        h.update(f"{self.filled}:{self.seed}".encode())
        return h.hexdigest()

    @ecall
    def stats(self) -> dict[str, int]:
        return {"filled": self.filled}
