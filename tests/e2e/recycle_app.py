"""A test-only enclave app that frees and re-allocates heap arrays: none of the shipped apps frees, but
`Heap.free` is public API, so a user's app may free and allocate again while its heap moves in rounds.

Launched as `recycle_app:Recycler` (the app registry loads any `module:Class`), with this folder on the
agents' PYTHONPATH (tests/e2e/test_round_frees.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from constmig.apps.common import check_options, int_arg
from constmig.enclave.app import EnclaveApp, ecall

MAX_BYTES = 1 << 30


class Recycler(EnclaveApp):
    """Named uint8 arrays that ECALLs create filled with one byte, free, and allocate again fresh."""

    name = "recycler"

    def setup(self, **config: Any) -> None:
        check_options("recycler", config, ())
        self.arrays: dict[str, np.ndarray] = {}  # travel as heap references (rebound, tracked at the destination)

    @ecall
    def make(self, name: str, nbytes: int, byte: int) -> int:
        """Allocate `name` and fill it with `byte`; returns its heap offset."""
        arr = self.heap.alloc(name, int_arg(nbytes, "nbytes", 1, MAX_BYTES), np.uint8)
        arr[:] = int_arg(byte, "byte", 0, 256)
        self.arrays[name] = arr
        return self.heap.extent(name)[0]

    @ecall
    def alloc(self, name: str, nbytes: int) -> int:
        """Allocate `name` and write nothing: a fresh allocation must read zeros."""
        self.arrays[name] = self.heap.alloc(name, int_arg(nbytes, "nbytes", 1, MAX_BYTES), np.uint8)
        return self.heap.extent(name)[0]

    @ecall
    def paint(self, name: str, byte: int) -> None:
        """Write `byte` over every byte of `name` (a write the trackers see)."""
        self.arrays[name][:] = int_arg(byte, "byte", 0, 256)

    @ecall
    def free(self, name: str) -> None:
        """Drop `name` (the heap zeroes its pages)."""
        self.arrays.pop(name, None)
        self.heap.free(name)

    @ecall
    def clear(self) -> None:
        """Free every array (an arena reset): the next allocations reuse the heap from its start."""
        for name in sorted(self.arrays):
            self.free(name)

    @ecall
    def recycle(self, name: str) -> int:
        """Free `name` and allocate it again, same size, writing nothing; returns the new offset."""
        nbytes = self.heap.extent(name)[1]
        self.free(name)
        return self.alloc(name, nbytes)

    @ecall
    def nonzero(self, name: str) -> int:
        """Bytes of `name` that are not zero."""
        return int(np.count_nonzero(self.arrays[name]))

    @ecall
    def checksum(self) -> str:
        """sha256 over every array's name, offset and bytes."""
        h = hashlib.sha256(b"recycler:")
        for name in sorted(self.arrays):
            h.update(f"{name}@{self.heap.extent(name)[0]}:".encode())
            h.update(memoryview(self.arrays[name]).cast("B"))
        return h.hexdigest()
