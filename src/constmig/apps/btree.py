"""An ordered index: a B+tree whose leaves and inner levels are rows of heap arrays.

It stands for the database-index workloads (point lookups, short range scans, a trickle of inserts)
whose reads land on random leaves all over the heap but always go through the same few inner nodes.

Layout: a pool of `leaves` leaf nodes, each a row of `fanout` sorted int64 keys (`keys`) with their
values (`vals`) and a fill count (`cnt`); a directory (`dir`, `dirleaf`) holding, in key order, each
leaf's separator (smallest key it may hold) and its pool row; and the inner levels above the directory
(`inner`, level k's entry j = level k-1's entry j*fanout, so each node is one fanout-wide row). A query
batch descends all levels at once by gathering one node row per query with fancy indexing, so the
Access Tracker needs exactly the rows a query reads. Unused slots hold a sentinel above every key.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from constmig.apps.common import PAGE, check_options, int_arg, largest_fitting
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError

KEY_LIMIT = 1 << 62  # keys are integers 0..KEY_LIMIT-1
VALUE_LIMIT = 1 << 63  # values are integers 0..VALUE_LIMIT-1
_SENT = np.iinfo(np.int64).max  # above every key: unused directory and inner slots
_OPTIONS = ("fanout", "leaves")
_MASK64 = (1 << 64) - 1


def _levels(p0: int, b: int) -> list[tuple[int, int]]:
    """(offset, padded size) in `inner` of each level above the directory (of padded size p0), bottom up."""
    out = []
    off, size = 0, p0
    while size > b:
        n = -(-size // b)  # entries: one per node of the level below
        size = -(-n // b) * b
        out.append((off, size))
        off += size
    return out


def _inner_size(p0: int, b: int) -> int:
    lv = _levels(p0, b)
    return lv[-1][0] + lv[-1][1] if lv else 0


def _sum64(v: np.ndarray) -> int:
    """Sum of int64 values modulo 2**64, as a non-negative int (what msgpack can carry, unlike big sums)."""
    return int(v.view(np.uint64).sum(dtype=np.uint64)) if v.size else 0



class BTree(EnclaveApp):
    """B+tree of int64 keys and values: leaf pool rows, a key-ordered directory and inner levels."""

    name = "btree"

    def setup(self, **config: Any) -> None:
        """Size the leaf pool to fill the free heap (or `leaves` leaves of `fanout` slots) and allocate."""
        check_options("btree", config, _OPTIONS)
        b = int_arg(config.get("fanout", 64), "btree fanout", 8, 4097, ConfigError)
        free = self.heap.free_bytes
        fit = largest_fitting(lambda k: self._bytes(k, b), free, free // (16 * b))
        n = config.get("leaves")
        if n is None:
            n = fit
        else:
            n = int_arg(n, "btree leaves", 1, 1 << 40, ConfigError)
            if n > fit:
                raise ConfigError(f"btree of {n} leaves with fanout {b} needs more heap; at most {fit} fit")
        if n < 1:
            raise ConfigError(f"heap of {self.heap.size} bytes is too small for a btree with fanout {b}")
        p0 = -(-n // b) * b
        self.fanout = b
        self.capacity = n  # leaves in the pool
        self.dir_size = p0
        self.n_leaves = 1  # pool rows in use
        self.n_dir = 1  # directory entries in use (leaves in key order)
        self.count = 0  # keys stored
        self.key_hi = 1 << 20  # step draws keys from [0, key_hi)
        self.steps = 0
        self.keys = self.heap.alloc("bt.keys", (n, b), np.int64)
        self.vals = self.heap.alloc("bt.vals", (n, b), np.int64)
        self.cnt = self.heap.alloc("bt.cnt", n, np.int32)
        self.dir = self.heap.alloc("bt.dir", p0, np.int64)
        self.dirleaf = self.heap.alloc("bt.dirleaf", p0, np.int32)
        self.inner = self.heap.alloc("bt.inner", max(_inner_size(p0, b), 1), np.int64)
        self.dir[1:] = _SENT
        self.dir[0] = 0
        self.inner[:] = _SENT
        self._rebuild_levels(0)

    @staticmethod
    def _bytes(n: int, b: int) -> int:
        p0 = -(-n // b) * b
        pages = [16 * n * b // 2, 16 * n * b // 2, 4 * n, 8 * p0, 4 * p0, 8 * max(_inner_size(p0, b), 1)]
        return sum(-(-x // PAGE) * PAGE for x in pages)

    # -- ECALLs ------------------------------------------------------------------------------------

    @ecall
    def insert(self, key: int, value: int) -> bool:
        """Store `value` under `key` (overwriting); True if the key is new."""
        k = int_arg(key, "btree key", 0, KEY_LIMIT)
        v = int_arg(value, "btree value", 0, VALUE_LIMIT)
        new = self._upsert(k, v)
        if new is None:
            raise EnclaveError(f"btree is full: all {self.capacity} leaves are in use")
        return new

    @ecall
    def lookup(self, key: int) -> int | None:
        """The value stored under `key`, or None."""
        k = int_arg(key, "btree key", 0, KEY_LIMIT)
        found, vals = self._lookup(np.array([k], dtype=np.int64))
        return int(vals[0]) if found[0] else None

    @ecall
    def range(self, lo: int, hi: int) -> dict[str, int]:
        """Count and sum (modulo 2**64) of the values of keys in [lo, hi) (reads every leaf in range)."""
        a = int_arg(lo, "btree range start", 0, KEY_LIMIT + 1)
        z = int_arg(hi, "btree range end", 0, KEY_LIMIT + 1)
        count, total = self._range(a, z)
        return {"count": count, "sum": total}

    @ecall
    def step(self, n: int = 512, seed: int = 0) -> dict[str, Any]:
        """One unit of index traffic: `n` random point lookups, one short range scan, n//64 upserts.

        Keys are drawn uniformly from [0, key_hi), about half of which are stored after a fill. Sums
        of values are modulo 2**64 (an exact one could outgrow what msgpack carries).
        """
        n = int_arg(n, "step n", 1, 1 << 20)
        seed = int_arg(seed, "step seed", 0, 1 << 64)
        rng = np.random.Generator(np.random.PCG64(seed))
        q = rng.integers(0, self.key_hi, n, dtype=np.int64)
        found, vals = self._lookup(q)
        lo = int(rng.integers(0, self.key_hi))
        rcount, rsum = self._range(lo, lo + 4 * self.fanout)
        ups = n // 64
        ks = rng.integers(0, self.key_hi, ups, dtype=np.int64).tolist()
        vs = rng.integers(0, VALUE_LIMIT, ups, dtype=np.int64).tolist()
        inserted = full = 0
        for k, v in zip(ks, vs, strict=True):
            new = self._upsert(k, v)
            if new is None:
                full += 1
            inserted += bool(new)
        self.steps += 1
        return {
            "ops": n + 1 + ups,
            "hits": int(found.sum()),
            "sum": _sum64(vals[found]),
            "range_count": rcount,
            "range_sum": rsum,
            "inserted": inserted,
            "full": full,
        }

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Bulk-load `fraction` of the leaf pool with sorted random keys and random values (replaces all).

        Leaves are filled 7/8 full, leaving room for inserts before they split; keys are a running sum
        of random gaps of 1-3, so about half of [0, key_hi) is stored and no sort is needed.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        seed = int_arg(seed, "fill seed", 0, 1 << 64)
        t0 = time.perf_counter()
        b = self.fanout
        per = b - b // 8
        nl = min(self.capacity, round(fraction * self.capacity))
        rng = np.random.Generator(np.random.PCG64(seed))
        step = max(1, (8 << 20) // (8 * b))  # leaves per batch: 8 MiB of keys
        carry = -1
        ks = np.zeros((step, b), dtype=np.int64)  # whole rows, so each heap row is written once
        vs = np.zeros((step, b), dtype=np.int64)
        for a in range(0, nl, step):
            z = min(nl, a + step)
            raw = rng.bit_generator.random_raw((z - a, per)).view(np.int64)
            gaps = 1 + (raw & 1) + ((raw >> 1) & 1)
            ks[: z - a, :per] = np.cumsum(gaps).reshape(z - a, per) + carry
            carry = int(ks[z - a - 1, per - 1])
            np.bitwise_and(raw >> 1, np.int64(VALUE_LIMIT - 1), out=vs[: z - a, :per])
            self.keys[a:z] = ks[: z - a]
            self.vals[a:z] = vs[: z - a]
        used = max(nl, 1)  # an empty tree still has its one (empty) leaf
        self.cnt[:nl] = per
        self.cnt[nl:] = 0
        self.dir[:nl] = self.keys[:nl, 0]
        self.dir[0] = 0
        self.dir[used:] = _SENT
        self.dirleaf[:used] = np.arange(used, dtype=np.int32)
        self.n_leaves = self.n_dir = used
        self.count = nl * per
        self.key_hi = carry + 1 if nl else 1 << 20
        self.inner[:] = _SENT
        self._rebuild_levels(0)
        return {
            "leaves": nl,
            "keys": self.count,
            "bytes": nl * b * 16,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    @ecall
    def stats(self) -> dict[str, Any]:
        """Sizes from small state only (reads no heap chunk)."""
        return {
            "count": self.count,
            "leaves": self.n_leaves,
            "capacity": self.capacity,
            "fanout": self.fanout,
            "depth": len(_levels(self.dir_size, self.fanout)) + 2,
            "key_hi": self.key_hi,
            "steps": self.steps,
            "used_bytes": self.heap.used_bytes,
        }

    @ecall
    def checksum(self) -> str:
        """sha256 over every heap array and the small state (hashlib over buffers, no Python loop)."""
        h = hashlib.sha256()
        h.update(
            f"btree:{self.fanout}:{self.capacity}:{self.n_leaves}:{self.n_dir}:{self.count}:"
            f"{self.key_hi}:{self.steps}:".encode()
        )
        for arr in (self.keys, self.vals, self.cnt, self.dir, self.dirleaf, self.inner):
            h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    # -- tree internals ----------------------------------------------------------------------------

    def _descend(self, q: np.ndarray) -> np.ndarray:
        """Directory position of the leaf that holds (or would hold) each key in `q`."""
        b = self.fanout
        cols = np.arange(b, dtype=np.int64)
        pos = np.zeros(len(q), dtype=np.int64)
        levels = _levels(self.dir_size, b)
        for off, _ in reversed(levels):
            rows = self.inner[off + pos[:, None] * b + cols]
            pos = pos * b + np.maximum((rows <= q[:, None]).sum(axis=1) - 1, 0)
        rows = self.dir[pos[:, None] * b + cols]
        return pos * b + np.maximum((rows <= q[:, None]).sum(axis=1) - 1, 0)

    def _lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, values) for keys `q`, one vectorized descent and one leaf-row gather."""
        leaf = self.dirleaf[self._descend(q)].astype(np.int64)
        rows = self.keys[leaf]
        n = self.cnt[leaf]
        valid = np.arange(self.fanout) < n[:, None]
        i = ((rows < q[:, None]) & valid).sum(axis=1)
        at = np.minimum(i, self.fanout - 1)
        r = np.arange(len(q))
        found = (i < n) & (rows[r, at] == q)
        vals = np.zeros(len(q), dtype=np.int64)
        vals[found] = self.vals[leaf[found], at[found]]
        return found, vals

    def _range(self, lo: int, hi: int) -> tuple[int, int]:
        if hi <= lo:
            return 0, 0
        p = self._descend(np.array([lo, hi - 1], dtype=np.int64))
        count = total = 0
        cols = np.arange(self.fanout)
        for a in range(int(p[0]), int(p[1]) + 1, 4096):
            pos = np.arange(a, min(int(p[1]) + 1, a + 4096), dtype=np.int64)
            leaf = self.dirleaf[pos].astype(np.int64)
            rows = self.keys[leaf]
            sel = (cols < self.cnt[leaf][:, None]) & (rows >= lo) & (rows < hi)
            count += int(sel.sum())
            total = (total + _sum64(self.vals[leaf][sel])) & _MASK64
        return count, total

    def _upsert(self, key: int, value: int) -> bool | None:
        """Insert or overwrite one key; True if new, False if overwritten, None if the pool is full."""
        b = self.fanout
        pos = int(self._descend(np.array([key], dtype=np.int64))[0])
        leaf = int(self.dirleaf[pos])
        n = int(self.cnt[leaf])
        row = self.keys[leaf, :n]
        i = int(np.searchsorted(row, key))
        if i < n and int(row[i]) == key:
            self.vals[leaf, i] = value
            return False
        if n == b:
            if self.n_leaves >= self.capacity:
                return None
            new = self._split(pos, leaf)
            if i > b // 2:
                leaf, i, n = new, i - b // 2, b - b // 2
            else:
                n = b // 2
        if i < n:
            self.keys[leaf, i + 1 : n + 1] = self.keys[leaf, i:n].copy()
            self.vals[leaf, i + 1 : n + 1] = self.vals[leaf, i:n].copy()
        self.keys[leaf, i] = key
        self.vals[leaf, i] = value
        self.cnt[leaf] = n + 1
        self.count += 1
        return True

    def _split(self, pos: int, leaf: int) -> int:
        """Move the upper half of full leaf `leaf` (directory position `pos`) to a fresh pool row."""
        b, h = self.fanout, self.fanout // 2
        new = self.n_leaves
        self.n_leaves += 1
        self.keys[new, : b - h] = self.keys[leaf, h:]
        self.vals[new, : b - h] = self.vals[leaf, h:]
        self.keys[leaf, h:] = 0
        self.vals[leaf, h:] = 0
        self.cnt[leaf] = h
        self.cnt[new] = b - h
        nd = self.n_dir
        self.dir[pos + 2 : nd + 1] = self.dir[pos + 1 : nd].copy()
        self.dirleaf[pos + 2 : nd + 1] = self.dirleaf[pos + 1 : nd].copy()
        self.dir[pos + 1] = self.keys[new, 0]
        self.dirleaf[pos + 1] = new
        self.n_dir = nd + 1
        self._rebuild_levels(pos + 1)
        return new

    def _rebuild_levels(self, first: int) -> None:
        """Recompute inner entries that depend on directory positions >= `first` (one op per level)."""
        b = self.fanout
        below, n_below, changed = self.dir, self.n_dir, first
        for off, size in _levels(self.dir_size, b):
            n = -(-n_below // b)
            j0 = changed // b
            level = self.inner[off : off + size]
            level[j0:n] = below[j0 * b : n_below : b]
            below, n_below, changed = level, n, j0
