"""Write tracking for pre-copy (enclave/dirty.py) on a real heap: a scan names exactly the chunks written
since the last scan, re-arms them in the same walk, and misses no write whatever page it lands on."""

from __future__ import annotations

import numpy as np
import pytest

from constmig.enclave import dirty
from constmig.enclave.dirty import WriteTracker, preflight
from constmig.enclave.heap import Heap
from constmig.errors import UffdError

_WP = preflight()
pytestmark = pytest.mark.skipif(_WP is not None, reason=f"write tracking unavailable: {_WP}")

CHUNK = 1 << 20


@pytest.fixture
def heap():
    h = Heap(16 * CHUNK, chunk_size=CHUNK)
    np.frombuffer(h.chunk_view(0), dtype=np.uint8)[::4096] = 1  # some pages populated before arming
    yield h
    h.close()


def _write(heap: Heap, chunk: int, offset: int) -> None:
    np.frombuffer(heap.chunk_view(chunk), dtype=np.uint8)[offset] ^= 0xFF


def test_a_scan_names_what_was_written_since_the_last_one(heap):
    t = WriteTracker(heap)
    t.arm()
    try:
        assert t.scan().tolist() == []
        _write(heap, 0, 0)  # populated before arming
        _write(heap, 3, CHUNK - 1)  # never touched, last byte of the chunk
        _write(heap, 3, 5)
        _write(heap, 15, 4096 * 7)
        assert t.scan().tolist() == [0, 3, 15]
        assert t.scan().tolist() == []  # re-armed by the scan that reported them
        _write(heap, 3, 9)
        assert t.scan().tolist() == [3]
    finally:
        t.close()


def test_every_page_of_a_chunk_counts(heap):
    t = WriteTracker(heap)
    t.arm()
    try:
        for page in range(0, CHUNK, 4096 * 37):
            _write(heap, 7, page)
            assert t.scan().tolist() == [7], page
    finally:
        t.close()


def test_many_scattered_writes_in_one_scan(heap, monkeypatch):
    """More written page runs than one PAGEMAP_SCAN call reports: the scan continues where it stopped."""
    monkeypatch.setattr(dirty, "REGIONS", 64)  # one call reports 64 runs; the writes make 2048
    t = WriteTracker(heap)
    t.arm()
    try:
        for c in range(16):
            np.frombuffer(heap.chunk_view(c), dtype=np.uint8)[::8192] = 7  # every other page
        assert t.scan().tolist() == list(range(16))
        assert t.scan().tolist() == []  # every one of them re-armed, across the calls
    finally:
        t.close()


def test_closed_tracker_leaves_plain_memory_and_refuses_scans(heap):
    t = WriteTracker(heap)
    t.arm()
    t.close()
    t.close()  # idempotent
    _write(heap, 2, 0)  # no longer tracked, and the write lands
    assert np.frombuffer(heap.chunk_view(2), dtype=np.uint8)[0] == 0xFF
    with pytest.raises(UffdError, match="not armed"):
        t.scan()
