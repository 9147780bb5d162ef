"""Clients that keep calling an enclave while it migrates: what users of the enclave observe.

`KVHammer` puts and gets random keys (uniform or zipfian) in a loop through the agents (following
redirects), remembers every write the enclave acknowledged, and records when each call succeeded. The
longest gap between two successful calls is the client-observed unavailability (`client_gap_ms`);
afterwards `verify` reads back every acknowledged write, so a lost or wrong answer is counted, not
assumed away. `StepDriver` does the same for the other workloads: it calls their `step` ECALL (one
bounded unit of work, deterministic given its seed) and counts the operations each step reports.
"""

from __future__ import annotations

import bisect
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

from constmig.errors import ConstmigError
from constmig.host.client import EnclaveClient


@dataclass
class LoadReport:
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: int = 0  # a get that returned something other than the last acknowledged write
    max_gap_ms: float = 0.0
    gap_at: float = 0.0  # wall time the longest gap started
    ops_timeline: list[tuple[float, float]] = field(default_factory=list)  # (time, ops/s) per 100 ms
    ops: int = 0  # application operations done by the answered calls (a kvstore call is one)

    def figures(self) -> dict[str, Any]:
        return {"client_calls": self.calls, "client_errors": len(self.errors), "client_wrong": self.wrong,
                "client_gap_ms": round(self.max_gap_ms, 2), "client_ops": self.ops}


class _Loop:
    """The timing loop shared by the drivers: one call at a time in a thread, gaps and ops/s recorded."""

    report: LoadReport
    _stop: threading.Event
    _thread: threading.Thread

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        self._thread.join(timeout=120.0)
        return self.report

    def _one(self, seq: int) -> int:
        """One call; returns the operations it did. Raises ConstmigError if the call failed."""
        raise NotImplementedError

    def _run(self) -> None:
        last = time.time()
        bucket_start, bucket_ops = last, 0
        seq = 0
        while not self._stop.is_set():
            seq += 1
            try:
                ops = self._one(seq)
            except ConstmigError as e:
                self.report.errors.append(str(e))
                if len(self.report.errors) > 100:
                    break
                time.sleep(0.01)
                continue
            now = time.time()
            self.report.calls += 1
            self.report.ops += ops
            gap = (now - last) * 1e3
            if gap > self.report.max_gap_ms:
                self.report.max_gap_ms, self.report.gap_at = gap, last
            last = now
            bucket_ops += ops
            if now - bucket_start >= 0.1:
                self.report.ops_timeline.append((bucket_start, bucket_ops / (now - bucket_start)))
                bucket_start, bucket_ops = now, 0


class KVHammer(_Loop):
    """Random put/get on a kvstore, one call at a time, in a background thread.

    `write_ratio` 0.1 or 0.5 gives the usual 90/10 and 50/50 read/write mixes; `zipf` (e.g. 0.99)
    picks keys by a zipfian law over their order instead of uniformly, so a few keys are hot.
    """

    def __init__(self, addr: str, name: str, keys: int = 2000, write_ratio: float = 0.5, seed: int = 1,
                 value_size: int = 200, zipf: float | None = None) -> None:
        if zipf is not None and not zipf > 0:
            raise ValueError(f"zipf exponent must be positive, not {zipf!r}")
        self.client = EnclaveClient(addr, name, timeout=60.0)
        self.keys = [f"hammer-{i}" for i in range(keys)]
        self.write_ratio = write_ratio
        self.rng = random.Random(seed)
        # Cumulative zipf weights of key ranks 1..keys: one bisect per draw.
        self._cdf = list(itertools.accumulate((i + 1) ** -zipf for i in range(keys))) if zipf else None
        self.value_size = value_size
        self.acked: dict[str, bytes] = {}
        self.uncertain: set[str] = set()  # a put failed: it may or may not have been applied
        self.report = LoadReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-hammer", daemon=True)

    def preload(self) -> None:
        """Write every key once (so a read-only hammer has known answers), in a few batched calls."""
        for i in range(0, len(self.keys), 256):
            items = [[k, f"{k}:preload".encode()] for k in self.keys[i:i + 256]]
            self.client.call("put_many", items)
            for k, v in items:
                self.acked[k] = v

    def _key(self) -> str:
        if self._cdf is None:
            return self.rng.choice(self.keys)
        i = bisect.bisect_right(self._cdf, self.rng.random() * self._cdf[-1])
        return self.keys[min(i, len(self.keys) - 1)]

    def _one(self, seq: int) -> int:
        key = self._key()
        if self.rng.random() < self.write_ratio:
            value = f"{key}:{seq}:".encode().ljust(self.rng.randint(1, self.value_size), b"v")
            try:
                self.client.call("put", key, value)
            except ConstmigError:
                self.acked.pop(key, None)
                self.uncertain.add(key)
                raise
            self.acked[key] = value  # only once the enclave answered
            self.uncertain.discard(key)
        else:
            got = self.client.call("get", key)
            if key not in self.uncertain and got != self.acked.get(key):
                self.report.wrong += 1
        return 1

    def verify(self) -> int:
        """Read back every acknowledged write; returns how many are missing or wrong."""
        keys = list(self.acked)
        bad = 0
        for i in range(0, len(keys), 256):
            part = keys[i:i + 256]
            got = self.client.call("get_many", part)
            bad += sum(1 for k, v in zip(part, got, strict=True) if v != self.acked[k])
        return bad

    def close(self) -> None:
        self.client.close()


class StepDriver(_Loop):
    """Calls a workload's `step` ECALL in a loop, in a background thread, and counts the ops it reports.

    Step i gets seed `seed * 2**32 + i`, so a run is reproducible. With `record`, every answered step's
    (seed, result) is kept in `log`: replaying those seeds on a twin that never migrated must give the
    same results and the same final state, which is how a test checks that nothing was lost or misread.
    """

    def __init__(self, addr: str, name: str, n: int | None = None, seed: int = 1, record: bool = False,
                 method: str = "step") -> None:
        self.client = EnclaveClient(addr, name, timeout=60.0)
        self.n = n
        self.seed = seed
        self.method = method
        self.record = record
        self.log: list[tuple[int, Any]] = []
        self.report = LoadReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-driver", daemon=True)

    def seed_of(self, seq: int) -> int:
        return (self.seed << 32) + seq

    def _one(self, seq: int) -> int:
        seed = self.seed_of(seq)
        kwargs: dict[str, Any] = {"seed": seed} if self.n is None else {"n": self.n, "seed": seed}
        result = self.client.call(self.method, **kwargs)
        if self.record:
            self.log.append((seed, result))
        ops = result.get("ops", 1) if isinstance(result, dict) else 1
        return int(ops) if isinstance(ops, int) and not isinstance(ops, bool) else 1

    def close(self) -> None:
        self.client.close()


def driver_for(app: str, addr: str, name: str, **kw: Any) -> KVHammer | StepDriver:
    """The client load for `app`: KVHammer for kvstore, StepDriver (its `step` ECALL) for the others."""
    if app == "kvstore":
        return KVHammer(addr, name, **kw)
    return StepDriver(addr, name, **kw)
