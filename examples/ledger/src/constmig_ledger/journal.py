"""The journal: every transfer the ledger accepted, in a ring of heap rows (src, dst, amount, seq).

A module of its own on purpose: the app's measurement covers every module the app declares
(`Ledger.measured_modules`), so a destination with a changed journal.py is refused like one with a
changed app.py.
"""

from __future__ import annotations

import numpy as np

ROW = 4  # int64 fields per journal row: source account, destination account, amount, sequence number


def append(journal: np.ndarray, seq: int, rows: np.ndarray) -> int:
    """Write `rows` (k x 3: src, dst, amount) after entry `seq`, wrapping; returns the new sequence number."""
    k = rows.shape[0]
    at = (seq + np.arange(k)) % journal.shape[0]
    journal[at, :3] = rows
    journal[at, 3] = seq + np.arange(1, k + 1)
    return seq + k


def last(journal: np.ndarray, seq: int, n: int) -> np.ndarray:
    """The newest `n` entries (oldest first)."""
    n = min(n, seq, journal.shape[0])
    at = (seq - n + np.arange(n)) % journal.shape[0]
    return journal[at]
