import mmap

import msgspec
import numpy as np
import pytest

import constmig.enclave.heap as heap_mod
from constmig.enclave.heap import PAGE_SIZE, Heap
from constmig.errors import HeapError

MiB = 1 << 20


@pytest.fixture
def heap():
    h = Heap(16 * MiB, chunk_size=MiB)
    yield h
    h.close()


def zero_page_known() -> bool:
    return heap_mod._zero_pfns()[0] != 0


# -- construction ------------------------------------------------------------------------------------


def test_geometry_and_address(heap):
    assert heap.size == 16 * MiB and heap.chunk_size == MiB and heap.n_chunks == 16
    assert heap.buf.dtype == np.uint8 and heap.buf.shape == (16 * MiB,)
    assert heap.address == heap.buf.ctypes.data
    assert heap.address % PAGE_SIZE == 0


@pytest.mark.parametrize(
    "size,chunk",
    [
        (0, MiB),
        (-MiB, MiB),
        (MiB + 4096, MiB),
        (MiB, 3 * (1 << 16)),  # not a power of two
        (MiB, 32 << 10),  # below 64 KiB
        (16 * MiB, 8 * MiB),  # above 4 MiB
        (1.5 * MiB, MiB),
    ],
)
def test_bad_sizes(size, chunk):
    with pytest.raises(HeapError):
        Heap(size, chunk_size=chunk)


def test_size_beyond_available_memory_names_both_numbers(monkeypatch):
    monkeypatch.setattr(heap_mod, "available_memory", lambda: 4 * MiB)
    with pytest.raises(HeapError) as e:
        Heap(8 * MiB)
    msg = str(e.value)
    assert str(8 * MiB) in msg and str(4 * MiB) in msg and "\n" not in msg


# -- allocator ---------------------------------------------------------------------------------------


def test_alloc_alignment_and_zero_copy(heap):
    a = heap.alloc("a", 10, np.uint8)
    b = heap.alloc("b", (3, 5), np.float64)
    c = heap.alloc("c", 4097, np.int32)
    for name in ("a", "b", "c"):
        off, _ = heap.extent(name)
        assert off % PAGE_SIZE == 0
    assert heap.extent("b")[0] == PAGE_SIZE and heap.extent("c")[0] == 2 * PAGE_SIZE
    assert b.shape == (3, 5) and b.dtype == np.float64 and b.flags.c_contiguous
    assert np.shares_memory(a, heap.buf) and np.shares_memory(c, heap.buf)
    b[2, 4] = 1.5
    assert heap.array("b")[2, 4] == 1.5
    off = heap.extent("b")[0]
    assert heap.buf[off : off + 120].view(np.float64)[14] == 1.5
    assert heap.names() == ["a", "b", "c"]
    assert heap.used_bytes == PAGE_SIZE + PAGE_SIZE + 5 * PAGE_SIZE


def test_alloc_duplicate_overflow_and_bad_specs(heap):
    heap.alloc("x", 100)
    with pytest.raises(HeapError, match="already"):
        heap.alloc("x", 100)
    with pytest.raises(HeapError, match="does not fit"):
        heap.alloc("big", 16 * MiB)
    heap.alloc("rest", 16 * MiB - PAGE_SIZE)  # exactly fills the heap
    assert heap.free_bytes == 0
    with pytest.raises(HeapError):
        heap.alloc("one", 1)
    with pytest.raises(HeapError):
        heap.array("nope")
    with pytest.raises(HeapError, match="dtype"):
        Heap(MiB).alloc("o", 3, object)
    with pytest.raises(HeapError):
        Heap(MiB).alloc("", 3)
    with pytest.raises(HeapError):
        Heap(MiB).alloc("neg", (-1, 2))


def test_free_releases_and_rolls_back(heap):
    heap.alloc("a", PAGE_SIZE)
    b = heap.alloc("b", 2 * PAGE_SIZE)
    b[:] = 7
    heap.free("b")
    assert heap.names() == ["a"] and heap.free_bytes == 16 * MiB - PAGE_SIZE
    c = heap.alloc("c", 2 * PAGE_SIZE)
    assert heap.extent("c")[0] == PAGE_SIZE and not c.any()  # pages were given back, so zero


# -- the allocator's record of what it changed (pre-copy rounds add it to each scan) ---------------------


def test_take_changed_names_what_free_and_alloc_changed_once(heap):
    """A free zeroes with a madvise no write tracker sees: its chunks are recorded, including one it only
    shares with an allocation that stays; an allocation's chunks too (handed out again). A take forgets."""
    heap.alloc("keep", PAGE_SIZE)
    blob = heap.alloc("blob", 3 * MiB)  # from PAGE_SIZE: chunks 0..3, chunk 0 shared with `keep`
    blob[:] = 0xAB
    assert heap.take_changed().tolist() == [0, 1, 2, 3]  # the allocations
    assert heap.take_changed().size == 0  # taken: forgotten
    heap.free("blob")
    assert heap.take_changed().tolist() == [0, 1, 2, 3]
    again = heap.alloc("blob", MiB)  # same offset (it was last): a fresh allocation over sent chunks
    assert not again.any() and heap.take_changed().tolist() == [0, 1]
    heap.alloc("empty", 0)
    assert heap.take_changed().size == 0  # no bytes, no chunk


def test_take_changed_names_every_zeroing(heap):
    heap.take_changed()
    heap.zero_chunks(np.array([5, 3, 4, 9]))
    assert heap.take_changed().tolist() == [3, 4, 5, 9]
    heap.wipe()
    assert heap.take_changed().tolist() == list(range(heap.n_chunks))
    assert heap.take_changed().dtype == np.int64


def test_take_changed_loses_nothing_beside_zeroing_in_another_thread(heap):
    """Rounds take the record while an ECALL frees (each in its own thread): every chunk changed is
    named by a take after its change, and no take names one more often than it changed."""
    import threading

    heap.take_changed()
    stop = threading.Event()
    seen = np.zeros(heap.n_chunks, dtype=np.int64)

    def taker() -> None:
        while not stop.is_set():
            np.add.at(seen, heap.take_changed(), 1)

    t = threading.Thread(target=taker)
    t.start()
    try:
        for i in range(50 * heap.n_chunks):
            heap.zero_chunks(np.array([i % heap.n_chunks]))
    finally:
        stop.set()
        t.join()
    np.add.at(seen, heap.take_changed(), 1)
    assert (seen >= 1).all() and (seen <= 50).all(), seen


# -- metadata ----------------------------------------------------------------------------------------


def test_metadata_round_trip(heap):
    heap.alloc("keys", (100, 32), np.uint8)
    heap.alloc("vals", 1000, "<f8")
    heap.array("vals")[:] = np.arange(1000)
    meta = heap.metadata()
    meta = msgspec.msgpack.decode(msgspec.msgpack.encode(meta))  # small and msgpack-able
    dst = Heap(16 * MiB, chunk_size=MiB)
    dst.restore_metadata(meta)
    assert dst.names() == ["keys", "vals"]
    for name in dst.names():
        assert dst.extent(name) == heap.extent(name)
        assert dst.array(name).shape == heap.array(name).shape
        assert dst.array(name).dtype == heap.array(name).dtype
    # the next allocation lands where it would have on the source
    assert dst.alloc("more", 1).ctypes.data - dst.address == heap.alloc("more", 1).ctypes.data - heap.address
    dst.close()


def test_restore_metadata_rejects_mismatch(heap):
    heap.alloc("a", 100)
    meta = heap.metadata()
    with pytest.raises(HeapError, match="mismatch"):
        Heap(32 * MiB).restore_metadata(meta)
    with pytest.raises(HeapError, match="mismatch"):
        Heap(16 * MiB, chunk_size=2 * MiB).restore_metadata(meta)
    full = Heap(16 * MiB)
    full.alloc("z", 1)
    with pytest.raises(HeapError, match="already"):
        full.restore_metadata(meta)
    bad = dict(meta, allocations=[dict(meta["allocations"][0], offset=100)])
    with pytest.raises(HeapError, match="offset"):
        Heap(16 * MiB).restore_metadata(bad)
    overlap = dict(
        meta, allocations=[meta["allocations"][0], dict(meta["allocations"][0], name="b")], bump=100
    )
    with pytest.raises(HeapError, match="overlapping"):
        Heap(16 * MiB).restore_metadata(overlap)
    with pytest.raises(HeapError):
        Heap(16 * MiB).restore_metadata({"version": 1})
    with pytest.raises(HeapError):
        Heap(16 * MiB).restore_metadata(dict(meta, allocations=[dict(meta["allocations"][0], dtype="O")]))


# -- chunks ------------------------------------------------------------------------------------------


def test_export_chunks_are_the_allocated_ones(heap):
    """What an export carries comes from the allocator, touched or not (zero chunks travel as zero records)."""
    assert heap.export_chunks().tolist() == []
    a = heap.alloc("a", 3 * MiB + 1, np.uint8)
    assert heap.export_chunks().dtype == np.int64
    assert heap.export_chunks().tolist() == [0, 1, 2, 3]  # untouched: still the app's to write
    heap.buf[10 * MiB] = 1  # not part of any allocation: never exported
    a[0] = 1
    assert heap.export_chunks().tolist() == [0, 1, 2, 3]
    b = heap.alloc("b", 2 * MiB)  # starts on the next page, inside chunk 3
    assert heap.export_chunks().tolist() == [0, 1, 2, 3, 4, 5]
    del b
    heap.free("b")
    assert heap.export_chunks().tolist() == [0, 1, 2, 3]


def test_touched_chunks_untouched_and_touched(heap):
    a = heap.alloc("a", 12 * MiB, np.uint8)
    assert not heap.touched_chunks().any()
    a[3 * MiB + 17] = 1
    a[7 * MiB] = 2
    a[5 * MiB - 1] = 3
    assert np.flatnonzero(heap.touched_chunks()).tolist() == [3, 4, 7]


def test_touched_chunks_skip_pages_only_read():
    if not zero_page_known():
        pytest.skip("zero page PFN not visible (needs CAP_SYS_ADMIN)")
    with Heap(8 * MiB) as h:
        a = h.alloc("a", 8 * MiB)
        assert int(a.sum()) == 0  # maps the zero page everywhere
        a[2 * MiB] = 9
        assert np.flatnonzero(h.touched_chunks()).tolist() == [2]


def test_touched_chunks_skip_huge_zero_pages():
    if not heap_mod._zero_pfns()[1]:
        pytest.skip("huge zero page not available or PFN not visible")
    with Heap(16 * MiB, chunk_size=4 * MiB) as h:
        a = h.alloc("a", 16 * MiB)
        h._mm.madvise(mmap.MADV_HUGEPAGE, 0, h.size)
        assert int(a[::4096].sum()) == 0  # read faults map the huge zero page where THP applies
        a[9 * MiB] = 1
        assert np.flatnonzero(h.touched_chunks()).tolist() == [2]


def test_touched_chunks_without_pagemap_is_none(heap, monkeypatch):
    def boom(*args):
        raise OSError("no pagemap")

    monkeypatch.setattr(heap_mod, "_read_pagemap", boom)
    assert heap.touched_chunks() is None


def test_chunk_view_writes_land_in_arrays(heap):
    a = heap.alloc("a", (4 * MiB // 8,), np.int64)
    assert heap.chunk_range(2) == (2 * MiB, MiB)
    view = heap.chunk_view(2)
    assert isinstance(view, memoryview) and len(view) == MiB and not view.readonly
    np.frombuffer(view, dtype=np.int64)[:] = 42
    assert (a[2 * MiB // 8 : 3 * MiB // 8] == 42).all()
    assert a[2 * MiB // 8 - 1] == 0 and a[3 * MiB // 8] == 0
    view[0:8] = (7).to_bytes(8, "little")
    assert a[2 * MiB // 8] == 7
    with pytest.raises(HeapError):
        heap.chunk_view(16)
    with pytest.raises(HeapError):
        heap.chunk_range(-1)


def test_wipe_zeroes_and_keeps_allocations(heap):
    a = heap.alloc("a", 2 * MiB)
    a[:] = 5
    heap.wipe()
    assert not a.any() and heap.names() == ["a"]
    assert not heap.touched_chunks().any()


def test_close_is_idempotent_even_with_live_views():
    h = Heap(MiB)
    a = h.alloc("a", 10)
    v = h.chunk_view(0)
    h.close()
    h.close()
    assert h.closed
    with pytest.raises(HeapError, match="closed"):
        h.alloc("b", 1)
    del a, v
    h2 = Heap(MiB)
    h2.alloc("a", 10)
    h2.close()


def test_chunk_runs_are_the_consecutive_stretches():
    from constmig.enclave.heap import chunk_runs

    assert chunk_runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]
    assert chunk_runs(np.array([5])) == [(5, 6)]
    assert chunk_runs(np.zeros(0, dtype=np.int64)) == []
