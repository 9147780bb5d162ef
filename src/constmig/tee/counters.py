"""Monotonic counters kept by the platform: what makes a sealed checkpoint impossible to roll back.

An enclave binds each checkpoint it seals to the next value of one of its counters, and on restore
accepts only a checkpoint whose version equals the counter's current value. Counters move with an
enclave on migration (Alder et al., DSN'18): the destination platform creates one at the value the
source had, and the source platform's counter is destroyed before COMMIT, so a checkpoint can never
be restored on the host the enclave left.

The sim platform keeps its counters in one file authenticated with a key derived from the platform
secret: the host cannot edit a value unnoticed. It can put back an older copy of the whole file; a
hardware platform keeps counters in replay-protected storage, and the sim accepts that limit the way
it accepts keeping its keys in root-readable files (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from pathlib import Path

from constmig.errors import ConfigError, EnclaveError

MAX_COUNTERS = 4096  # per platform; a hardware platform bounds these too


class CounterStore:
    """The platform's counters: create, read, increment, destroy. Values only ever go up."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self._key = key
        self._lock = threading.Lock()

    def _load(self) -> dict[str, int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            body = doc["counters"].encode()
            mac = bytes.fromhex(doc["mac"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{self.path} is not a counter file") from None
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            raise ConfigError(f"{self.path} was changed outside the platform (bad MAC)")
        counters = json.loads(body)
        if not isinstance(counters, dict) or not all(isinstance(v, int) for v in counters.values()):
            raise ConfigError(f"{self.path} has malformed counters")
        return counters

    def _save(self, counters: dict[str, int]) -> None:
        body = json.dumps(counters, sort_keys=True)
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"counters": body, "mac": mac}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def create(self, value: int = 0) -> str:
        """A new counter starting at `value` (a migrated enclave's counter continues where it was)."""
        if not isinstance(value, int) or value < 0:
            raise EnclaveError(f"counter value must be a non-negative int, not {value!r}")
        with self._lock:
            counters = self._load()
            if len(counters) >= MAX_COUNTERS:
                raise EnclaveError(f"this platform already holds {MAX_COUNTERS} counters")
            cid = os.urandom(16).hex()
            counters[cid] = value
            self._save(counters)
            return cid

    def read(self, cid: str) -> int:
        with self._lock:
            counters = self._load()
        if cid not in counters:
            raise EnclaveError("this enclave's monotonic counter does not exist on this platform "
                               "(the enclave migrated away, or never ran here)")
        return counters[cid]

    def increment(self, cid: str) -> int:
        with self._lock:
            counters = self._load()
            if cid not in counters:
                raise EnclaveError("this enclave's monotonic counter does not exist on this platform")
            counters[cid] += 1
            self._save(counters)
            return counters[cid]

    def destroy(self, cid: str) -> None:
        with self._lock:
            counters = self._load()
            counters.pop(cid, None)
            self._save(counters)
