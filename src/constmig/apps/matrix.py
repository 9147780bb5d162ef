"""A dense-matrix app: one big float64 matrix in the heap plus a vector, updated by power iteration.

It stands for the numeric enclave workloads (ML inference, analytics) whose state is one large array
read end to end on every step: the opposite access pattern to the key-value store's random slots.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import numpy as np

from constmig.apps.common import PAGE, check_options
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError

_OPTIONS = ("n", "fraction")


class MatrixApp(EnclaveApp):
    """Square float64 matrix `a` (n x n) and vector `x` (n), both heap arrays."""

    name = "matrix"

    def setup(self, **config: Any) -> None:
        """Allocate an n x n matrix: `n` if given, else the largest that fits `fraction` (0.9) of the heap."""
        check_options("matrix", config, _OPTIONS)
        free = self.heap.free_bytes - 2 * PAGE
        n = config.get("n")
        if n is None:
            frac = config.get("fraction", 0.9)
            if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac <= 1:
                raise ConfigError(f"matrix fraction must be a number in (0, 1], not {frac!r}")
            budget = int(self.heap.size * frac)
            n = math.isqrt(max(min(budget, free), 0) // 8)
            while n > 0 and 8 * n * (n + 1) > free:
                n -= 1
            if n < 1:
                raise ConfigError(f"heap of {self.heap.size} bytes is too small for a matrix")
        elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"matrix n must be a positive integer, not {n!r}")
        elif 8 * n * (n + 1) > free:
            raise ConfigError(f"matrix n={n} needs {8 * n * (n + 1)} bytes; the heap has {free} free")
        self.n = n
        self.iterations = 0
        self.filled_rows = 0
        self.steps = 0
        self.a = self.heap.alloc("matrix.a", (n, n), np.float64)
        self.x = self.heap.alloc("matrix.x", n, np.float64)
        self.x[:] = 1.0 / math.sqrt(n)

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Fill the leading rows covering about `fraction` of the heap with uniform random values.

        Random doubles are generated straight into the heap (Generator.random(out=...)), no temporary.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise EnclaveError(f"fill seed must be a non-negative integer, not {seed!r}")
        t0 = time.perf_counter()
        rows = min(self.n, math.ceil(fraction * self.heap.size / (8 * self.n)))
        rng = np.random.Generator(np.random.PCG64(seed))
        step = max(1, (16 << 20) // (8 * self.n))  # 16 MiB slices keep the generator's output in cache
        for r in range(0, rows, step):
            rng.random(out=self.a[r : min(rows, r + step)])
        self.filled_rows = max(self.filled_rows, rows)
        return {
            "rows": rows,
            "n": self.n,
            "bytes": rows * self.n * 8,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    @ecall
    def matvec(self, iters: int = 1) -> float:
        """Power-iteration steps x <- A x / |A x|, in place; returns the last |A x|."""
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise EnclaveError(f"matvec iters must be a positive integer, not {iters!r}")
        norm = 0.0
        for _ in range(iters):
            y = self.a @ self.x
            norm = float(np.linalg.norm(y))
            if norm == 0.0:
                break
            np.divide(y, norm, out=self.x)
            self.iterations += 1
        return norm

    @ecall
    def step(self, n: int | None = None, seed: int = 0) -> dict[str, Any]:
        """A bounded unit of power iteration: y = A x over `n` consecutive rows from a random start.

        `n` defaults to the rows in about 16 MiB, so a step costs the same at any matrix size. Reads
        only; einsum rather than BLAS, so a replay gives bit-identical results on any thread count.
        """
        rows = max(1, min(self.n, (16 << 20) // (8 * self.n))) if n is None else n
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= self.n:
            raise EnclaveError(f"step n must be an integer from 1 to {self.n}, not {rows!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise EnclaveError(f"step seed must be an integer from 0 to 2**64-1, not {seed!r}")
        start = int(np.random.Generator(np.random.PCG64(seed)).integers(0, self.n - rows + 1))
        y = np.einsum("ij,j->i", self.a[start : start + rows], self.x)
        self.steps += 1
        return {"ops": rows, "start": start, "norm2": float(np.einsum("i,i->", y, y))}

    @ecall
    def set(self, i: int, j: int, v: float) -> bool:
        """Set one element."""
        self._check_index(i, j)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise EnclaveError(f"matrix value must be a number, not {type(v).__name__}")
        self.a[i, j] = v
        return True

    @ecall
    def get(self, i: int, j: int) -> float:
        """One element."""
        self._check_index(i, j)
        return float(self.a[i, j])

    @ecall
    def row_sum(self, i: int) -> float:
        """Sum of row i (touches one row of the heap)."""
        self._check_index(i, 0)
        return float(self.a[i].sum())

    @ecall
    def stats(self) -> dict[str, Any]:
        """Size facts from small state only."""
        return {
            "n": self.n,
            "matrix_bytes": 8 * self.n * self.n,
            "filled_rows": self.filled_rows,
            "iterations": self.iterations,
            "steps": self.steps,
            "used_bytes": self.heap.used_bytes,
        }

    @ecall
    def checksum(self) -> str:
        """sha256 over the matrix and vector bytes and the small state."""
        h = hashlib.sha256()
        h.update(f"matrix:{self.n}:{self.iterations}:{self.filled_rows}:{self.steps}:".encode())
        h.update(memoryview(self.a).cast("B"))
        h.update(memoryview(self.x).cast("B"))
        return h.hexdigest()

    def _check_index(self, i: Any, j: Any) -> None:
        for v in (i, j):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.n:
                raise EnclaveError(f"matrix index {v!r} out of range 0..{self.n - 1}")
