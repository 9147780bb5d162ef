"""A dirty-rate limit on the app's calls while pre-copy rounds do not converge (QEMU's dirty-limit, from
inside the enclave, which knows which call wrote what): migration/strategies/converge.py decides the
rate, this holds the calls that write to it.

A call that wrote k chunks for the first time since the write tracker's last scan (the enclave's own
tracker counts them: enclave/dirty.py) is charged k chunks against the limit; once the charges run ahead
of the limit, the call's caller waits, after the call and outside the app lock, until the limit covers
them. So a writer runs at the limit, a reader (k = 0) at its own pace, and neither the migration nor
another client ever waits behind a held writer. Lifting the limit (the rounds ended: the stop, a cancel,
a failure) releases every held caller at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MAX_HOLD_S = 1.0  # one call is held at most this long, whatever the charges say


class WriteLimit:
    def __init__(self) -> None:
        self.rate: float | None = None  # chunks per second the app may newly write; None: no limit
        self._wrote: Callable[[], int] | None = None
        self._next = 0.0  # monotonic time the charges so far are covered until
        self._lifted = threading.Event()
        self._lifted.set()
        self._owed = threading.local()
        self._lock = threading.Lock()
        self.held_calls = 0
        self.held_s = 0.0

    def set(self, rate: float | None, wrote: Callable[[], int] | None = None) -> dict[str, Any]:
        """Limit the app to `rate` newly written chunks per second, counted by `wrote()` (cumulative);
        None lifts the limit. Returns what holding cost so far (calls held, seconds)."""
        with self._lock:
            if rate is None or wrote is None:
                self.rate, self._wrote = None, None
                self._lifted.set()
            else:
                if rate <= 0:
                    raise ValueError(f"a write limit is a positive rate, not {rate!r}")
                self.rate, self._wrote = float(rate), wrote
                self._next = max(self._next, time.monotonic())
                self._lifted.clear()
            return {"held_calls": self.held_calls, "held_s": round(self.held_s, 4)}

    @contextmanager
    def call(self) -> Iterator[None]:
        """Around one call, under the app lock: charge what it newly wrote."""
        rate, wrote = self.rate, self._wrote
        if rate is None or wrote is None:
            yield
            return
        before = wrote()
        try:
            yield
        finally:
            written = wrote() - before
            if written > 0:
                with self._lock:
                    self._next = max(self._next, time.monotonic()) + written / rate
                    self._owed.until = self._next

    def pay(self) -> None:
        """After the call, outside the app lock: wait until the limit covers what the call wrote."""
        until = getattr(self._owed, "until", 0.0)
        if not until:
            return
        self._owed.until = 0.0
        wait = min(until - time.monotonic(), MAX_HOLD_S)
        if wait > 0:
            t0 = time.monotonic()
            self._lifted.wait(wait)
            with self._lock:
                self.held_calls += 1
                self.held_s += time.monotonic() - t0
