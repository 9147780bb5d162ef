"""Mini-batch k-means: a float32 dataset and its centroids in the heap.

It stands for ML training workloads: a big, read-only dataset sampled at random rows by every step,
and a small model updated by every step. A step is one mini-batch iteration (Sculley 2010): assign a
random batch of rows to their nearest centroids and move each centroid towards its batch mean, with a
learning rate of 1/(points it has seen). Distances are computed without BLAS, so a step gives
bit-identical results on any host and thread count (a replayed run can be compared exactly).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from constmig.apps.common import PAGE, check_options, int_arg
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError

_OPTIONS = ("dims", "clusters")
_BLOCK_BYTES = 16 << 20



def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(m, k) squared distances, summed in a fixed order (no BLAS: deterministic everywhere)."""
    diff = x[:, None, :] - c[None, :, :]
    return np.einsum("mkd,mkd->mk", diff, diff)


class KMeans(EnclaveApp):
    """Dataset `x` (rows x dims, float32), centroids `c` (clusters x dims) and their counts."""

    name = "kmeans"

    def setup(self, **config: Any) -> None:
        """Size the dataset to fill the free heap at `dims` float32 columns, and allocate the model."""
        check_options("kmeans", config, _OPTIONS)
        d = int_arg(config.get("dims", 32), "kmeans dims", 1, 4097, ConfigError)
        k = int_arg(config.get("clusters", 16), "kmeans clusters", 1, 1025, ConfigError)
        model = -(-4 * k * d // PAGE) * PAGE + -(-8 * k // PAGE) * PAGE
        n = max(self.heap.free_bytes - model, 0) // (4 * d)
        if n < k:
            raise ConfigError(
                f"heap of {self.heap.size} bytes is too small for kmeans with {k} clusters of {d} dims"
            )
        self.dims = d
        self.clusters = k
        self.capacity = n
        self.rows = 0
        self.steps = 0
        self.x = self.heap.alloc("km.x", (n, d), np.float32)
        self.c = self.heap.alloc("km.c", (k, d), np.float32)
        self.counts = self.heap.alloc("km.counts", k, np.int64)

    # -- ECALLs ------------------------------------------------------------------------------------

    @ecall
    def step(self, n: int = 1024, seed: int = 0) -> dict[str, Any]:
        """One mini-batch iteration on `n` random rows; returns the batch inertia before the update."""
        n = int_arg(n, "step n", 1, 1 << 20)
        seed = int_arg(seed, "step seed", 0, 1 << 64)
        self._need_data()
        rng = np.random.Generator(np.random.PCG64(seed))
        xb = self.x[np.sort(rng.integers(0, self.rows, n))]
        c = self.c.copy()
        best = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)
        per = max(1, (4 << 20) // (4 * self.clusters * self.dims))  # bounds the (m, k, d) temporary
        for a in range(0, n, per):
            d2 = _sqdist(xb[a : a + per], c)
            best[a : a + per] = d2.argmin(axis=1)
            dist[a : a + per] = d2[np.arange(len(d2)), best[a : a + per]]
        nb = np.bincount(best, minlength=self.clusters)
        sums = np.zeros(c.shape, dtype=np.float64)
        np.add.at(sums, best, xb)
        total = self.counts.copy() + nb
        hit = nb > 0
        c64 = c.astype(np.float64)
        c64[hit] += (sums[hit] - nb[hit, None] * c64[hit]) / total[hit, None]
        self.c[:] = c64.astype(np.float32)
        self.counts[:] = total
        self.steps += 1
        return {"ops": n, "inertia": float(dist.astype(np.float64).sum())}

    @ecall
    def inertia(self) -> float:
        """Sum of squared distances of every row to its nearest centroid (reads the whole dataset)."""
        self._need_data()
        c = self.c.copy().astype(np.float64)
        cc = (c * c).sum(axis=1)
        per = max(1, _BLOCK_BYTES // (4 * self.dims))
        total = 0.0
        for a in range(0, self.rows, per):
            xb = self.x[a : min(self.rows, a + per)].astype(np.float64)
            d2 = (xb * xb).sum(axis=1)[:, None] - 2 * xb @ c.T + cc
            total += float(np.maximum(d2.min(axis=1), 0).sum())
        return total

    @ecall
    def predict(self, point: list[float]) -> int:
        """Index of the centroid nearest to `point` (a list of `dims` numbers)."""
        if not isinstance(point, list | tuple) or len(point) != self.dims or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in point
        ):
            raise EnclaveError(f"predict takes a list of {self.dims} numbers")
        x = np.array([point], dtype=np.float32)
        return int(_sqdist(x, self.c.copy())[0].argmin())

    @ecall
    def centroids(self) -> list[list[float]]:
        """The centroids, as lists of floats."""
        return self.c.tolist()

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Generate `fraction` of the rows as blobs around `clusters` random centres; pick initial centroids.

        Each row is a centre plus uniform noise, made in 16 MiB blocks. The centroids start at random
        rows (Forgy). Replaces the dataset and resets the model.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        seed = int_arg(seed, "fill seed", 0, 1 << 64)
        t0 = time.perf_counter()
        k, d = self.clusters, self.dims
        rows = min(self.capacity, round(fraction * self.capacity))
        rng = np.random.Generator(np.random.PCG64(seed))
        centres = rng.uniform(-10, 10, (k, d)).astype(np.float32)
        per = max(1, _BLOCK_BYTES // (4 * d))
        for a in range(0, rows, per):
            z = min(rows, a + per)
            block = rng.random((z - a, d), dtype=np.float32)
            block -= np.float32(0.5)
            block *= np.float32(6.0)
            block += centres[rng.integers(0, k, z - a)]
            self.x[a:z] = block
        self.rows = rows
        if rows >= k:
            self.c[:] = self.x[np.sort(rng.choice(rows, k, replace=False))]
        else:
            self.c[:] = centres
        self.counts[:] = 0
        return {
            "rows": rows,
            "dims": d,
            "bytes": 4 * rows * d,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    @ecall
    def stats(self) -> dict[str, Any]:
        """Sizes from small state only (reads no heap chunk)."""
        return {
            "rows": self.rows,
            "capacity": self.capacity,
            "dims": self.dims,
            "clusters": self.clusters,
            "steps": self.steps,
            "used_bytes": self.heap.used_bytes,
        }

    @ecall
    def checksum(self) -> str:
        """sha256 over the dataset, the model and the small state (hashlib over buffers)."""
        h = hashlib.sha256()
        h.update(f"kmeans:{self.capacity}:{self.dims}:{self.clusters}:{self.rows}:{self.steps}:".encode())
        for arr in (self.x, self.c, self.counts):
            h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    def _need_data(self) -> None:
        if self.rows < 1:
            raise EnclaveError("kmeans has no data; call fill first")
