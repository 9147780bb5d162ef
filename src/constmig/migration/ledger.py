"""Which chunks a migration moves, which arrived, and the digest that proves completeness.

Kept as numpy arrays over the heap's chunk indices, so a 16 GiB heap costs a few KiB of Python work.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from constmig.errors import ProtocolError

TAG_SIZE = 16
PIECE = 64 << 10  # a demanded chunk travels as pieces of this size, the awaited one first


def pieces_tag(tags: list[bytes]) -> bytes:
    """One ledger tag for a chunk that travelled as pieces: binds every piece's GCM tag, in piece order."""
    h = hashlib.sha256(b"constmig-pieces-v1")
    for t in tags:
        h.update(t)
    return h.digest()[:TAG_SIZE]


class ChunkLedger:
    """Expected set, at-most-once acceptance, and per-chunk GCM tags for the DONE digest."""

    def __init__(self, migration_id: bytes, n_chunks: int, expected: np.ndarray) -> None:
        expected = np.asarray(expected, dtype=np.int64)
        if expected.size and (expected.min() < 0 or expected.max() >= n_chunks):
            raise ProtocolError(f"chunk list names chunks outside the heap's {n_chunks} chunks")
        if expected.size and np.any(np.diff(expected) <= 0):
            raise ProtocolError("chunk list is not strictly ascending")
        self.migration_id = migration_id
        self.n_chunks = n_chunks
        self.expected = expected
        self.expected_mask = np.zeros(n_chunks, dtype=bool)
        self.expected_mask[expected] = True
        self.received = np.zeros(n_chunks, dtype=bool)
        self.tags = np.zeros((n_chunks, TAG_SIZE), dtype=np.uint8)
        self.count = 0

    @classmethod
    def from_wire(cls, migration_id: bytes, n_chunks: int, packed: bytes) -> ChunkLedger:
        if not isinstance(packed, bytes | bytearray | memoryview) or len(packed) % 8:
            raise ProtocolError("chunk list length is not a multiple of 8 bytes")
        return cls(migration_id, n_chunks, np.frombuffer(packed, dtype="<i8").astype(np.int64))

    def to_wire(self) -> bytes:
        return self.expected.astype("<i8").tobytes()

    def check_acceptable(self, index: int) -> None:
        """Raise unless `index` is an expected chunk that has not arrived yet (call before writing it)."""
        if not 0 <= index < self.n_chunks or not self.expected_mask[index]:
            raise ProtocolError(f"chunk {index} is not part of this migration")
        if self.received[index]:
            raise ProtocolError(f"chunk {index} arrived twice")

    def accept(self, index: int, tag: bytes) -> None:
        """Record a verified chunk; at most once."""
        self.check_acceptable(index)
        self.received[index] = True
        self.tags[index] = np.frombuffer(tag, dtype=np.uint8)
        self.count += 1

    def record_sent(self, index: int, tag: bytes) -> None:
        """Source side: remember the tag of the last copy of a chunk that went out."""
        self.tags[index] = np.frombuffer(tag, dtype=np.uint8)
        if not self.received[index]:
            self.received[index] = True
            self.count += 1

    def keep_only(self, have: np.ndarray) -> None:
        """Source, after a reconnect: only chunks in `have` (a bool mask) count as delivered; the rest go again."""
        lost = self.received & ~have
        self.received &= have
        self.count -= int(np.count_nonzero(lost))

    @property
    def complete(self) -> bool:
        return self.count == self.expected.size

    def missing(self) -> np.ndarray:
        return self.expected[~self.received[self.expected]]

    def digest(self) -> bytes:
        h = hashlib.sha256(b"constmig-done-v1")
        h.update(self.migration_id)
        h.update(struct.pack("!Q", self.expected.size))
        h.update(self.expected.astype("<i8").tobytes())
        h.update(self.tags[self.expected].tobytes())
        return h.digest()
