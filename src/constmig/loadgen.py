"""A client that keeps calling an enclave while it migrates: what users of the enclave observe.

It puts and gets random keys in a loop through the agents (following redirects), remembers every
write the enclave acknowledged, and records when each call succeeded. The longest gap between two
successful calls is the client-observed unavailability (`client_gap_ms`); afterwards `verify` reads
back every acknowledged write, so a lost or wrong answer is counted, not assumed away.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from constmig.errors import ConstmigError
from constmig.host.client import EnclaveClient


@dataclass
class LoadReport:
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: int = 0  # a get that returned something other than the last acknowledged write
    max_gap_ms: float = 0.0
    gap_at: float = 0.0  # wall time the longest gap started
    ops_timeline: list[tuple[float, float]] = field(default_factory=list)  # (time, calls/s) per 100 ms

    def figures(self) -> dict[str, Any]:
        return {"client_calls": self.calls, "client_errors": len(self.errors), "client_wrong": self.wrong,
                "client_gap_ms": round(self.max_gap_ms, 2)}


class KVHammer:
    """Random put/get on a kvstore, one call at a time, in a background thread."""

    def __init__(self, addr: str, name: str, keys: int = 2000, write_ratio: float = 0.5, seed: int = 1,
                 value_size: int = 200) -> None:
        self.client = EnclaveClient(addr, name, timeout=60.0)
        self.keys = [f"hammer-{i}" for i in range(keys)]
        self.write_ratio = write_ratio
        self.rng = random.Random(seed)
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

    def start(self) -> KVHammer:
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        self._thread.join(timeout=120.0)
        return self.report

    def _one(self, seq: int) -> None:
        key = self.rng.choice(self.keys)
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

    def _run(self) -> None:
        last = time.time()
        bucket_start, bucket_calls = last, 0
        seq = 0
        while not self._stop.is_set():
            seq += 1
            try:
                self._one(seq)
            except ConstmigError as e:
                self.report.errors.append(str(e))
                if len(self.report.errors) > 100:
                    break
                time.sleep(0.01)
                continue
            now = time.time()
            self.report.calls += 1
            gap = (now - last) * 1e3
            if gap > self.report.max_gap_ms:
                self.report.max_gap_ms, self.report.gap_at = gap, last
            last = now
            bucket_calls += 1
            if now - bucket_start >= 0.1:
                self.report.ops_timeline.append((bucket_start, bucket_calls / (now - bucket_start)))
                bucket_start, bucket_calls = now, 0

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
