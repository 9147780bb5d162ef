"""A memcached-like key-value store whose whole table lives in the enclave heap.

Open addressing with linear probing over fixed-size slots: keys up to 32 bytes, values up to
`value_size` bytes. Every table field is its own heap array, so the table migrates as plain heap
chunks and comes back by name. Probing and hashing are vectorized with numpy: a lookup scans a window
of slots per step, and `fill` places hundreds of thousands of keys per batch, so filling a multi-GB
heap takes seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from constmig.apps.common import PAGE, check_options, fmix
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError

KEY_MAX = 32
EMPTY, USED, TOMB = 0, 1, 2
MAX_VALUE_SIZE = 1 << 20
_OPTIONS = ("value_size", "capacity", "hash_seed")
_ARRAYS = ("keys", "values", "klen", "vlen", "state")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_POW10 = np.array([10**k for k in range(19)], dtype=np.int64)
_FILL_PREFIX = np.frombuffer(b"fill-", dtype=np.uint8)




def hash_keys(keys: np.ndarray, lens: np.ndarray, seed: int = 0) -> np.ndarray:
    """Stable 64-bit hashes of zero-padded keys (m, 32) uint8 with lengths (m,), vectorized.

    One code path for one key and for a million keys, so `fill` and `get` always agree; stable across
    processes and hosts (unlike Python's hash()), so a migrated table needs no rehash.
    """
    words = np.ascontiguousarray(keys, dtype=np.uint8).view("<u8")  # (m, 4)
    h = fmix(np.asarray(lens, dtype=np.uint64) * _GOLDEN ^ np.uint64(seed))
    for j in range(KEY_MAX // 8):
        h = fmix(h ^ words[:, j])
    return h


def _fill_keys(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys b"fill-<id>" as zero-padded (m, 32) uint8 rows and lengths, built without a per-key loop."""
    x = ids.astype(np.int64)
    m = len(x)
    nd = np.ones(m, dtype=np.int64)  # decimal digits of each id
    for p in _POW10[1:]:
        more = x >= p
        if not more.any():
            break
        nd += more
    keys = np.zeros((m, KEY_MAX), dtype=np.uint8)
    keys[:, :5] = _FILL_PREFIX
    flat = keys.reshape(-1)
    last = np.arange(m, dtype=np.int64) * KEY_MAX + 4 + nd  # flat position of each key's last digit
    for j in range(int(nd.max()) if m else 0):  # one pass per digit position, right to left
        sel = nd > j
        flat[last[sel] - j] = 48 + x[sel] % 10
        x //= 10
    return keys, (nd + 5).astype(np.uint8)


def _as_bytes(x: Any, what: str) -> bytes:
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, bytes | bytearray | memoryview):
        return bytes(x)
    raise EnclaveError(f"{what} must be str or bytes, not {type(x).__name__}")


class KVStore(EnclaveApp):
    """Hash table with fixed-size slots: keys (cap, 32), values (cap, value_size), klen, vlen, state."""

    name = "kvstore"

    def setup(self, **config: Any) -> None:
        """Size the table to fill the free heap (or `capacity` slots) and allocate its arrays."""
        check_options("kvstore", config, _OPTIONS)
        vs = config.get("value_size", 1024)
        if isinstance(vs, bool) or not isinstance(vs, int) or not 1 <= vs <= MAX_VALUE_SIZE:
            raise ConfigError(f"kvstore value_size must be an integer from 1 to {MAX_VALUE_SIZE}, not {vs!r}")
        seed = config.get("hash_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ConfigError(f"kvstore hash_seed must be an integer from 0 to 2**64-1, not {seed!r}")
        slot = KEY_MAX + vs + 1 + 4 + 1
        fit = (self.heap.free_bytes - len(_ARRAYS) * PAGE) // slot
        cap = config.get("capacity")
        if cap is None:
            cap = fit
        elif isinstance(cap, bool) or not isinstance(cap, int) or cap < 2:
            raise ConfigError(f"kvstore capacity must be an integer of at least 2, not {cap!r}")
        elif cap > fit:
            raise ConfigError(
                f"kvstore capacity {cap} with value_size {vs} needs more heap; at most {fit} slots fit"
            )
        if cap < 2:
            raise ConfigError(
                f"heap of {self.heap.size} bytes is too small for a kvstore with value_size {vs}"
            )
        self.value_size = vs
        self.capacity = cap
        self.hash_seed = seed
        self.count = 0
        self.tombstones = 0
        self.value_bytes = 0
        self.fill_next = 0
        self.fill_keys_put = False  # a client stored a "fill-..." key: fill must check for collisions
        self.keys = self.heap.alloc("kv.keys", (cap, KEY_MAX), np.uint8)
        self.values = self.heap.alloc("kv.values", (cap, vs), np.uint8)
        self.klen = self.heap.alloc("kv.klen", cap, np.uint8)
        self.vlen = self.heap.alloc("kv.vlen", cap, np.uint32)
        self.state = self.heap.alloc("kv.state", cap, np.uint8)

    # -- ECALLs ------------------------------------------------------------------------------------

    @ecall
    def put(self, key: str | bytes, value: str | bytes) -> bool:
        """Store or overwrite one value; True on success."""
        self.put_many([[key, value]])
        return True

    @ecall
    def get(self, key: str | bytes) -> bytes | None:
        """The value stored under `key`, or None."""
        return self.get_many([key])[0]

    @ecall
    def delete(self, key: str | bytes) -> bool:
        """Remove `key`; True if it was there."""
        k, n = self._key_rows([key])
        i = int(self._lookup(k, n, hash_keys(k, n, self.hash_seed))[0])
        if i < 0:
            return False
        self.value_bytes -= int(self.vlen[i])
        self.keys[i] = 0
        self.values[i] = 0
        self.klen[i] = 0
        self.vlen[i] = 0
        self.state[i] = TOMB
        self.count -= 1
        self.tombstones += 1
        if self.state[(i + 1) % self.capacity] == EMPTY:
            self._clear_tombstones_before(i)
        return True

    @ecall
    def put_many(self, items: list[list[Any]]) -> int:
        """Store many (key, value) pairs in one vectorized pass (the last of duplicate keys wins)."""
        if not isinstance(items, list | tuple):
            raise EnclaveError(f"put_many takes a list of [key, value] pairs, not {type(items).__name__}")
        latest: dict[bytes, bytes] = {}
        for item in items:
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise EnclaveError("put_many takes a list of [key, value] pairs")
            v = _as_bytes(item[1], "value")
            if len(v) > self.value_size:
                raise EnclaveError(
                    f"value of {len(v)} bytes is longer than this kvstore's value_size of {self.value_size} bytes"
                )
            latest[self._check_key(item[0])] = v
        if not self.fill_keys_put and any(kb.startswith(b"fill-") for kb in latest):
            self.fill_keys_put = True
        if not latest:
            return 0
        k, n = self._key_rows(list(latest))
        vals = np.zeros((len(latest), self.value_size), dtype=np.uint8)
        vl = np.empty(len(latest), dtype=np.uint32)
        for r, v in enumerate(latest.values()):
            vals[r, : len(v)] = np.frombuffer(v, dtype=np.uint8)
            vl[r] = len(v)
        h = hash_keys(k, n, self.hash_seed)
        slots = self._lookup(k, n, h)
        old = slots >= 0
        new = ~old
        n_new = int(new.sum())
        # Keep at least one empty slot so probes end (a lone key may also reuse a deleted-key marker).
        room = self.capacity - 1 - self.count - (self.tombstones if n_new > 1 else 0)
        if n_new > room:
            raise EnclaveError(
                f"kvstore table is full: {self.count} of {self.capacity} slots used"
                + (f", {self.tombstones} held by deleted keys" if self.tombstones else "")
            )
        self._write_values(slots[old], vals[old], vl[old])  # only after the check: all or nothing
        if n_new:
            self.values[self._insert_new(k[new], n[new], h[new], vl[new])] = vals[new]
        return len(items)

    @ecall
    def get_many(self, keys: list[str | bytes]) -> list[bytes | None]:
        """Values for many keys (None where missing), looked up in one vectorized pass."""
        if not isinstance(keys, list | tuple):
            raise EnclaveError(f"get_many takes a list of keys, not {type(keys).__name__}")
        if not keys:
            return []
        k, n = self._key_rows(keys)
        slots = self._lookup(k, n, hash_keys(k, n, self.hash_seed))
        return [None if i < 0 else self.values[i, : self.vlen[i]].tobytes() for i in slots.tolist()]

    @ecall
    def stats(self) -> dict[str, Any]:
        """Counts and sizes, from small state only (reads no heap chunk)."""
        return {
            "count": self.count,
            "capacity": self.capacity,
            "tombstones": self.tombstones,
            "value_size": self.value_size,
            "value_bytes": self.value_bytes,
            "load": self.count / self.capacity,
            "used_bytes": self.heap.used_bytes,
        }

    @ecall
    def checksum(self) -> str:
        """sha256 over every table array's bytes and the counters (hashlib over buffers, no slot loop)."""
        h = hashlib.sha256()
        h.update(f"kvstore:{self.capacity}:{self.value_size}:{self.count}:{self.tombstones}:".encode())
        for name in _ARRAYS:
            h.update(memoryview(getattr(self, name)).cast("B"))
        return h.hexdigest()

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Insert keys "fill-<i>" with random incompressible values until `fraction` of slots are used.

        Works in batches: keys, hashes, probe positions and values are numpy arrays; `seed` (with the
        running key counter) makes the contents reproducible.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise EnclaveError(f"fill seed must be a non-negative integer, not {seed!r}")
        t0 = time.perf_counter()
        target = min(int(fraction * self.capacity), self.capacity - 1)
        inserted = 0
        written: list[np.ndarray] = []  # slots whose value rows get random data in phase 2
        # Phase 1: place the keys (small rows), batch by batch.
        while self.count < target:
            n = min(1 << 16, target - self.count, self.capacity - 1 - self.count - self.tombstones)
            if n <= 0:
                break  # only deleted-key markers left to reuse; a fill never probes for them
            ids = np.arange(self.fill_next, self.fill_next + n, dtype=np.uint64)
            self.fill_next += n
            k, kl = _fill_keys(ids)
            h = hash_keys(k, kl, self.hash_seed)
            vl = np.full(n, self.value_size, dtype=np.uint32)
            # Keys fill-<i> for i >= fill_next were never stored unless a client put one: skip the lookup.
            slots = self._lookup(k, kl, h) if self.fill_keys_put else np.full(n, -1, dtype=np.int64)
            old = slots >= 0
            if old.any():
                self.value_bytes += int(vl[old].sum(dtype=np.int64)) - int(
                    self.vlen[slots[old]].sum(dtype=np.int64)
                )
                self.vlen[slots[old]] = vl[old]
                written.append(slots[old])
                new = ~old
                k, kl, h, vl = k[new], kl[new], h[new], vl[new]
            written.append(self._insert_new(k, kl, h, vl))
            inserted += len(kl)
        # Phase 2: random values, written in slot order so the big array is swept once, sequentially
        # (first touches of fresh memory are the slow part; scattered 1 KiB writes would hit every page
        # several times and miss the TLB each time).
        all_slots = np.sort(np.concatenate(written)) if written else np.zeros(0, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64([seed, self.fill_next]))
        words = -(-self.value_size // 8)
        batch = max(64, (4 << 20) // self.value_size)
        for i in range(0, len(all_slots), batch):
            part = all_slots[i : i + batch]
            raw = rng.bit_generator.random_raw((len(part), words))
            self.values[part] = raw.view(np.uint8).reshape(len(part), words * 8)[:, : self.value_size]
        return {
            "inserted": inserted,
            "count": self.count,
            "capacity": self.capacity,
            "value_bytes": self.value_bytes,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    # -- table internals ---------------------------------------------------------------------------

    def _check_key(self, key: Any) -> bytes:
        kb = _as_bytes(key, "key")
        if not 1 <= len(kb) <= KEY_MAX:
            raise EnclaveError(f"key must be 1 to {KEY_MAX} bytes, not {len(kb)}")
        return kb

    def _key_rows(self, keys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Zero-padded (m, 32) key rows and lengths for a list of keys."""
        kbs = [self._check_key(k) for k in keys]
        joined = np.frombuffer(b"".join(kb.ljust(KEY_MAX, b"\0") for kb in kbs), dtype=np.uint8)
        return joined.reshape(len(kbs), KEY_MAX).copy(), np.array([len(kb) for kb in kbs], dtype=np.uint8)

    def _lookup(self, keys: np.ndarray, lens: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Slot of each key, or -1: probe windows of slots per key until a match or an empty slot."""
        cap = self.capacity
        m = len(lens)
        out = np.full(m, -1, dtype=np.int64)
        start = (hashes % np.uint64(cap)).astype(np.int64)
        off = np.zeros(m, dtype=np.int64)
        pend = np.arange(m)
        w = 8
        while pend.size:
            cols = np.arange(w)
            idx = (start[pend, None] + off[pend, None] + cols) % cap
            st = self.state[idx]
            empty = st == EMPTY
            has_empty = empty.any(axis=1)
            first_empty = np.where(has_empty, empty.argmax(axis=1), w)
            cand = (st == USED) & (cols < first_empty[:, None]) & (self.klen[idx] == lens[pend, None])
            r, c = np.nonzero(cand)
            done = has_empty.copy()
            if r.size:
                eq = (self.keys[idx[r, c]] == keys[pend[r]]).all(axis=1)
                r, c = r[eq], c[eq]
                out[pend[r]] = idx[r, c]
                done[r] = True
            off[pend] += w
            done |= off[pend] >= cap  # scanned the whole table
            pend = pend[~done]
            w = min(w * 2, 256)
        return out

    def _place(self, hashes: np.ndarray) -> tuple[np.ndarray, int]:
        """Claim a slot for each new (absent, distinct) key: its first non-used slot, linear probing.

        Keys that race for one slot: the first in the batch wins, the rest probe on from there. Returns
        the slots and how many were deleted-key markers reused.
        """
        cap = self.capacity
        m = len(hashes)
        out = np.full(m, -1, dtype=np.int64)
        start = (hashes % np.uint64(cap)).astype(np.int64)
        off = np.zeros(m, dtype=np.int64)
        pend = np.arange(m)
        reused = 0
        w = 8
        while pend.size:
            idx = (start[pend, None] + off[pend, None] + np.arange(w)) % cap
            free = self.state[idx] != USED
            has = free.any(axis=1)
            first = free.argmax(axis=1)
            rows = np.flatnonzero(has)
            slots, win = np.unique(idx[rows, first[rows]], return_index=True)
            won = rows[win]
            out[pend[won]] = slots
            reused += int(np.count_nonzero(self.state[slots] == TOMB))
            self.state[slots] = USED
            step = np.where(has, first, w)  # losers resume at the slot they lost (now used)
            step[won] = 0
            off[pend] += step
            keep = np.ones(len(pend), dtype=bool)
            keep[won] = False
            pend = pend[keep]
            if pend.size and (off[pend] >= cap).any():
                raise EnclaveError(f"kvstore table is full: {self.capacity} slots")
            w = min(w * 2, 256)
        return out, reused

    def _insert_new(
        self, keys: np.ndarray, lens: np.ndarray, hashes: np.ndarray, vl: np.ndarray
    ) -> np.ndarray:
        """Place keys known to be absent and distinct, writing all but their values; returns their slots.

        The caller checked that empty slots remain, and writes the value rows itself.
        """
        if not len(lens):
            return np.zeros(0, dtype=np.int64)
        slots, reused = self._place(hashes)
        self.keys[slots] = keys
        self.klen[slots] = lens
        self.vlen[slots] = vl
        self.count += len(slots)
        self.tombstones -= reused
        self.value_bytes += int(vl.sum(dtype=np.int64))
        return slots

    def _write_values(self, slots: np.ndarray, vals: np.ndarray, vl: np.ndarray) -> None:
        if not len(slots):
            return
        self.value_bytes += int(vl.sum(dtype=np.int64)) - int(self.vlen[slots].sum(dtype=np.int64))
        self.values[slots] = vals
        self.vlen[slots] = vl

    def _clear_tombstones_before(self, i: int) -> None:
        """Turn the run of deleted-key markers ending at slot i back into empty slots.

        Safe because slot i+1 is empty: no probe sequence that passes over i can continue past it.
        """
        cap = self.capacity
        cleared = 0
        while cleared < cap:
            idx = (i - cleared - np.arange(min(64, cap - cleared))) % cap
            tomb = self.state[idx] == TOMB
            run = int(tomb.argmin()) if not tomb.all() else len(idx)
            self.state[idx[:run]] = EMPTY
            cleared += run
            if run < len(idx):
                break
        self.tombstones -= cleared
