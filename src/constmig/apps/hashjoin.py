"""A hash join: a build table R with its hash table, and a probe table S, all in the heap.

It stands for in-memory analytics (a join followed by a group-by), whose probes read buckets and build
rows at random all over the heap while the probe side is scanned in morsels.

R is stored in hash order: bucket b's rows are R[bstart[b]:bstart[b+1]], the layout a radix-partitioned
build produces. `fill` generates R directly in that order, so building a multi-GB table needs no sort:
it draws increasing 64-bit hash values and takes each key as the inverse of the hash function
(MurmurHash3's finalizer, a bijection). S gets `match_ratio` of its keys from R, the rest random. A
step joins one random morsel of S against R and adds each matched S payload into R's aggregate
column (`agg`), so it reads a little of everything and writes a little.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from constmig.apps.common import M1, M2, PAGE, check_options, fmix, int_arg, largest_fitting
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError

_OPTIONS = ("build_rows", "probe_ratio", "match_ratio")
_S33 = np.uint64(33)
_MORSEL = 1 << 16




def _fmix_inv(h: np.ndarray) -> np.ndarray:
    """The key whose hash is `h` (xor-shifts by 33 undo themselves; the multipliers are odd)."""
    h = h ^ (h >> _S33)
    h = h * np.uint64(pow(M2, -1, 1 << 64))
    h = h ^ (h >> _S33)
    h = h * np.uint64(pow(M1, -1, 1 << 64))
    return h ^ (h >> _S33)



class HashJoin(EnclaveApp):
    """Build table R (keys, payloads, aggregates) in hash-bucket order, bucket starts, probe table S."""

    name = "hashjoin"

    def setup(self, **config: Any) -> None:
        """Size R (and S = probe_ratio x R) to fill the free heap, or to `build_rows`, and allocate."""
        check_options("hashjoin", config, _OPTIONS)
        ratio = int_arg(config.get("probe_ratio", 4), "hashjoin probe_ratio", 1, 65, ConfigError)
        match = config.get("match_ratio", 0.5)
        if isinstance(match, bool) or not isinstance(match, int | float) or not 0 <= match <= 1:
            raise ConfigError(f"hashjoin match_ratio must be a number from 0 to 1, not {match!r}")
        free = self.heap.free_bytes
        fit = largest_fitting(lambda k: self._bytes(k, ratio), free, free // (24 + 16 * ratio))
        n = config.get("build_rows")
        if n is None:
            n = fit
        else:
            n = int_arg(n, "hashjoin build_rows", 1, 1 << 40, ConfigError)
            if n > fit:
                raise ConfigError(
                    f"hashjoin of {n} build rows with probe_ratio {ratio} needs more heap; at most {fit} fit"
                )
        if n < 1:
            raise ConfigError(f"heap of {self.heap.size} bytes is too small for a hashjoin")
        self.r_cap = n
        self.s_cap = n * ratio
        self.bits = self._bits(n)
        self.match_ratio = float(match)
        self.r_rows = 0
        self.s_rows = 0
        self.salt = 0
        self.steps = 0
        self.r_keys = self.heap.alloc("hj.r_keys", n, np.uint64)
        self.r_pay = self.heap.alloc("hj.r_pay", n, np.int64)
        self.agg = self.heap.alloc("hj.agg", n, np.int64)
        self.bstart = self.heap.alloc("hj.bstart", (1 << self.bits) + 1, np.int64)
        self.s_keys = self.heap.alloc("hj.s_keys", n * ratio, np.uint64)
        self.s_pay = self.heap.alloc("hj.s_pay", n * ratio, np.int64)

    @staticmethod
    def _bits(n: int) -> int:
        """log2 of the bucket count: the first power of two (at least 2) not below n/2."""
        return max(1, (max(n // 2, 1) - 1).bit_length())

    @classmethod
    def _bytes(cls, n: int, ratio: int) -> int:
        sizes = [8 * n] * 3 + [8 * ((1 << cls._bits(n)) + 1)] + [8 * n * ratio] * 2
        return sum(-(-x // PAGE) * PAGE for x in sizes)

    # -- ECALLs ------------------------------------------------------------------------------------

    @ecall
    def probe(self, key: int) -> list[int]:
        """Payloads of the R rows whose key is `key` (one bucket read)."""
        k = int_arg(key, "hashjoin key", 0, 1 << 64)
        rows, _ = self._probe(np.array([k], dtype=np.uint64))
        return [int(v) for v in self.r_pay[rows]]

    @ecall
    def join(self, start: int = 0, count: int | None = None) -> dict[str, int]:
        """Join S[start:start+count] (default: to the end) with R: matches and the sum of R+S payloads.

        The sum wraps modulo 2**64 (as int64), like the payloads themselves. Reads, writes nothing.
        """
        a = int_arg(start, "join start", 0, self.s_rows + 1)
        c = self.s_rows - a if count is None else int_arg(count, "join count", 0, self.s_rows - a + 1)
        matches = total = 0
        for m in range(a, a + c, _MORSEL):
            z = min(a + c, m + _MORSEL)
            rows, si = self._probe(self.s_keys[m:z].copy())
            matches += len(rows)
            total += int((self.r_pay[rows] + self.s_pay[m:z][si]).sum())
        total &= (1 << 64) - 1
        return {"matches": matches, "sum": total - (1 << 64) if total >> 63 else total}

    @ecall
    def step(self, n: int = 16384, seed: int = 0) -> dict[str, Any]:
        """Join one random morsel of `n` S rows with R and add each matched S payload into R's `agg`."""
        n = int_arg(n, "step n", 1, 1 << 22)
        seed = int_arg(seed, "step seed", 0, 1 << 64)
        if not self.r_rows or not self.s_rows:
            raise EnclaveError("hashjoin has no rows; call fill first")
        rng = np.random.Generator(np.random.PCG64(seed))
        a = int(rng.integers(0, max(self.s_rows - n, 0) + 1))
        z = min(self.s_rows, a + n)
        rows, si = self._probe(self.s_keys[a:z].copy())
        sp = self.s_pay[a:z][si]
        total = (self.r_pay[rows] + sp).sum()
        u, inv = np.unique(rows, return_inverse=True)
        acc = np.zeros(len(u), dtype=np.int64)
        np.add.at(acc, inv.ravel(), sp)
        self.agg[u] += acc
        self.steps += 1
        return {"ops": z - a, "start": a, "matches": len(rows), "sum": int(total)}

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Generate `fraction` of R (in hash order, with its bucket starts) and of S (replaces all).

        R's keys and hashes are pure functions of the row number and seed, so S draws matching keys
        without reading R; everything else is random words, written in 8 MiB batches.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        seed = int_arg(seed, "fill seed", 0, 1 << 64)
        t0 = time.perf_counter()
        nr = min(self.r_cap, round(fraction * self.r_cap))
        ns = min(self.s_cap, round(fraction * self.s_cap))
        rng = np.random.Generator(np.random.PCG64(seed))
        self.salt = int(rng.integers(0, 1 << 63))
        self.r_rows, self.s_rows = nr, ns
        shift = np.uint64(64 - self.bits)
        self.bstart[:] = 0
        batch = 1 << 20
        for a in range(0, nr, batch):
            z = min(nr, a + batch)
            h = self._hash_of_row(np.arange(a, z, dtype=np.uint64))
            self.r_keys[a:z] = _fmix_inv(h)
            self.r_pay[a:z] = rng.bit_generator.random_raw(z - a).view(np.int64)
            self.agg[a:z] = 0
            bk = (h >> shift).astype(np.int64)
            counts = np.bincount(bk - bk[0])
            self.bstart[bk[0] + 1 : bk[0] + 1 + len(counts)] += counts
        np.cumsum(self.bstart, out=self.bstart)
        for a in range(0, ns, batch):
            z = min(ns, a + batch)
            raw = rng.bit_generator.random_raw(z - a)
            keys = rng.bit_generator.random_raw(z - a)
            if nr:
                hit = (raw >> np.uint64(11)) < np.uint64(int(self.match_ratio * (1 << 53)))
                rows = rng.integers(0, nr, int(hit.sum()), dtype=np.int64).astype(np.uint64)
                keys[hit] = _fmix_inv(self._hash_of_row(rows))
            self.s_keys[a:z] = keys
            self.s_pay[a:z] = raw.view(np.int64)
        return {
            "build_rows": nr,
            "probe_rows": ns,
            "buckets": 1 << self.bits,
            "bytes": 24 * nr + 16 * ns,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    @ecall
    def stats(self) -> dict[str, Any]:
        """Sizes from small state only (reads no heap chunk)."""
        return {
            "build_rows": self.r_rows,
            "probe_rows": self.s_rows,
            "build_capacity": self.r_cap,
            "probe_capacity": self.s_cap,
            "buckets": 1 << self.bits,
            "match_ratio": self.match_ratio,
            "steps": self.steps,
            "used_bytes": self.heap.used_bytes,
        }

    @ecall
    def checksum(self) -> str:
        """sha256 over every heap array and the small state (hashlib over buffers, no Python loop)."""
        h = hashlib.sha256()
        h.update(
            f"hashjoin:{self.r_cap}:{self.s_cap}:{self.bits}:{self.match_ratio!r}:{self.r_rows}:"
            f"{self.s_rows}:{self.salt}:{self.steps}:".encode()
        )
        for arr in (self.r_keys, self.r_pay, self.agg, self.bstart, self.s_keys, self.s_pay):
            h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    # -- internals ---------------------------------------------------------------------------------

    def _hash_of_row(self, i: np.ndarray) -> np.ndarray:
        """Hash of R row i: i*stride plus a pseudo-random jitter below stride, so increasing in i."""
        stride = (1 << 64) // max(self.r_rows, 1)
        jitter = (fmix(i ^ np.uint64(self.salt)) >> np.uint64(40)) * np.uint64(stride >> 24)
        return i * np.uint64(stride) + jitter

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(R rows, indices into `keys`) of every matching pair: one bucket lookup per key."""
        if not self.r_rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        bk = (fmix(keys) >> np.uint64(64 - self.bits)).astype(np.int64)
        lo = self.bstart[bk]
        cnt = self.bstart[bk + 1] - lo
        total = int(cnt.sum())
        rows = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(total, dtype=np.int64)
        si = np.repeat(np.arange(len(keys), dtype=np.int64), cnt)
        eq = self.r_keys[rows] == keys[si]
        return rows[eq], si[eq]
