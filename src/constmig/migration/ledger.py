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


def chunks_from_wire(packed: object, n_chunks: int) -> np.ndarray:
    """A packed chunk list (int64 little-endian, strictly ascending, inside the heap), checked."""
    if not isinstance(packed, bytes | bytearray | memoryview) or len(packed) % 8:
        raise ProtocolError("chunk list length is not a multiple of 8 bytes")
    chunks = np.frombuffer(packed, dtype="<i8").astype(np.int64)
    if chunks.size and (chunks.min() < 0 or chunks.max() >= n_chunks):
        raise ProtocolError(f"chunk list names chunks outside the heap's {n_chunks} chunks")
    if chunks.size and np.any(np.diff(chunks) <= 0):
        raise ProtocolError("chunk list is not strictly ascending")
    return chunks


def chunks_to_wire(chunks: np.ndarray) -> bytes:
    """The packed form `chunks_from_wire` reads."""
    return np.asarray(chunks, dtype=np.int64).astype("<i8").tobytes()


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
    def everything(cls, migration_id: bytes, n_chunks: int) -> ChunkLedger:
        """A ledger over every chunk of the heap: what pre-copy rounds record before the stop, when the
        final list (the chunks allocated at the stop) is not known yet (see `hold`)."""
        return cls(migration_id, n_chunks, np.arange(n_chunks, dtype=np.int64))

    @classmethod
    def from_wire(cls, migration_id: bytes, n_chunks: int, packed: bytes) -> ChunkLedger:
        return cls(migration_id, n_chunks, chunks_from_wire(packed, n_chunks))

    def to_wire(self) -> bytes:
        return chunks_to_wire(self.expected)

    def check_acceptable(self, index: int, *, again: bool = False) -> None:
        """Raise unless `index` is an expected chunk that has not arrived yet, or with `again` (a newer
        version in pre-copy, before the handoff) arrived or not (call before writing it)."""
        if not 0 <= index < self.n_chunks or not self.expected_mask[index]:
            raise ProtocolError(f"chunk {index} is not part of this migration")
        if self.received[index] and not again:
            raise ProtocolError(f"chunk {index} arrived twice")

    def accept(self, index: int, tag: bytes, *, again: bool = False) -> None:
        """Record a verified chunk: at most once, or with `again` as the newest version of it."""
        self.check_acceptable(index, again=again)
        if not self.received[index]:
            self.received[index] = True
            self.count += 1
        self.tags[index] = np.frombuffer(tag, dtype=np.uint8)

    def hold(self, indices: np.ndarray, tags: np.ndarray | bytes) -> None:
        """Count expected chunks as in place already, with the tags of their versions (pre-copy rounds
        that stayed current; a post-copy stream of such a migration sends only the rest)."""
        idx = np.asarray(indices, dtype=np.int64)
        tag_rows = np.frombuffer(tags, dtype=np.uint8) if isinstance(tags, bytes | bytearray) else np.asarray(tags)
        tag_rows = tag_rows.reshape(-1, TAG_SIZE)
        if tag_rows.shape[0] != idx.size:
            raise ProtocolError(f"{idx.size} chunks held but {tag_rows.shape[0]} tags")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.n_chunks or not self.expected_mask[idx].all()):
            raise ProtocolError("a held chunk is not part of this migration")
        self.received[idx] = True
        self.tags[idx] = tag_rows
        self.count = int(np.count_nonzero(self.received))

    def held_wire(self) -> tuple[bytes, bytes]:
        """The chunks in place and their tags, packed (what a pager continuing this ledger needs)."""
        idx = np.flatnonzero(self.received)
        return chunks_to_wire(idx), self.tags[idx].tobytes()

    def record_sent(self, index: int, tag: bytes) -> None:
        """Source side: remember the tag of the last copy of a chunk that went out."""
        self.tags[index] = np.frombuffer(tag, dtype=np.uint8)
        if not self.received[index]:
            self.received[index] = True
            self.count += 1

    def record_sent_many(self, indexes: np.ndarray, tags: np.ndarray) -> None:
        """Source side: record_sent for a batch (the native data plane's tags, (n, 16) uint8, in send order)."""
        idx = np.asarray(indexes, dtype=np.int64)
        if np.unique(idx).size != idx.size:  # a chunk twice in one batch: the later copy counts, as one by one
            for i, tag in zip(idx.tolist(), tags, strict=True):
                self.record_sent(i, tag.tobytes())
            return
        self.tags[idx] = tags
        new = idx[~self.received[idx]]
        self.received[new] = True
        self.count += int(new.size)

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
