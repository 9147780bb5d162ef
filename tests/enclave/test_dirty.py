"""Write tracking for pre-copy (enclave/dirty.py) on a real heap, both mechanisms (the kernel's
userfaultfd write-protect, the enclave's own write-fault handler): a scan names exactly the chunks
written since the last scan, re-arms them, and misses no write whatever page it lands on or whatever
code makes it."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from constmig.enclave import dirty
from constmig.enclave.dirty import EnclaveWriteTracker, KernelWriteTracker, enclave_problem, kernel_problem
from constmig.enclave.heap import Heap
from constmig.errors import UffdError

_KERNEL = kernel_problem()
_ENCLAVE = enclave_problem()
KINDS = [pytest.param(KernelWriteTracker, id="kernel",
                      marks=pytest.mark.skipif(_KERNEL is not None, reason=f"kernel write tracking: {_KERNEL}")),
         pytest.param(EnclaveWriteTracker, id="enclave",
                      marks=pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}"))]

CHUNK = 1 << 20


@pytest.fixture(params=KINDS)
def WriteTracker(request):
    return request.param


@pytest.fixture
def heap():
    h = Heap(16 * CHUNK, chunk_size=CHUNK)
    np.frombuffer(h.chunk_view(0), dtype=np.uint8)[::4096] = 1  # some pages populated before arming
    yield h
    h.close()


def _write(heap: Heap, chunk: int, offset: int) -> None:
    np.frombuffer(heap.chunk_view(chunk), dtype=np.uint8)[offset] ^= 0xFF


def test_a_scan_names_what_was_written_since_the_last_one(heap, WriteTracker):
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


def test_every_page_of_a_chunk_counts(heap, WriteTracker):
    t = WriteTracker(heap)
    t.arm()
    try:
        for page in range(0, CHUNK, 4096 * 37):
            _write(heap, 7, page)
            assert t.scan().tolist() == [7], page
    finally:
        t.close()


def test_many_scattered_writes_in_one_scan(heap, monkeypatch, WriteTracker):
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


def test_closed_tracker_leaves_plain_memory_and_refuses_scans(heap, WriteTracker):
    t = WriteTracker(heap)
    t.arm()
    t.close()
    t.close()  # idempotent
    _write(heap, 2, 0)  # no longer tracked, and the write lands
    assert np.frombuffer(heap.chunk_view(2), dtype=np.uint8)[0] == 0xFF
    with pytest.raises(UffdError, match="not armed"):
        t.scan()


def test_writes_that_no_python_hook_sees_are_tracked(heap, WriteTracker):
    """numpy through a plain view, ctypes, a memoryview, a write from another thread: each one is named."""
    t = WriteTracker(heap)
    t.arm()
    try:
        np.asarray(np.frombuffer(heap.chunk_view(1), dtype=np.int64))[5] = 42
        ctypes.memmove(heap.address + 4 * CHUNK + 100, b"ctypes", 6)
        heap.chunk_view(9)[CHUNK - 3:] = b"end"
        th = threading.Thread(target=_write, args=(heap, 12, 4096 * 3))
        th.start()
        th.join()
        np.frombuffer(heap.chunk_view(13), dtype=np.uint8)[:] = 3  # one call over a whole chunk
        assert t.scan().tolist() == [1, 4, 9, 12, 13]
        assert bytes(heap.chunk_view(4)[100:106]) == b"ctypes"
        assert np.frombuffer(heap.chunk_view(1), dtype=np.int64)[5] == 42
    finally:
        t.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_rounds_beside_a_busy_writer_miss_no_write(heap, WriteTracker, seed):
    """The protocol the rounds run, against a thread writing all the time: copy what each scan names; once
    the writer stops, one last scan and copy leave the copy equal to the heap, byte for byte."""
    t = WriteTracker(heap)
    shadow = np.zeros(heap.size, dtype=np.uint8)
    view = np.frombuffer(heap.buf, dtype=np.uint8)
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(seed)
        words = np.frombuffer(heap.buf, dtype=np.uint64)
        while not stop.is_set():
            idx = rng.integers(0, words.size, 64)
            words[idx] = rng.integers(1, 2**63, 64, dtype=np.uint64)

    t.arm()
    shadow[:] = view  # round 1 reads everything after arming
    th = threading.Thread(target=writer)
    th.start()
    try:
        for _ in range(30):
            for c in t.scan():
                shadow[c * CHUNK:(c + 1) * CHUNK] = view[c * CHUNK:(c + 1) * CHUNK]
    finally:
        stop.set()
        th.join()
    for c in t.scan():  # the stop: the app writes no more
        shadow[c * CHUNK:(c + 1) * CHUNK] = view[c * CHUNK:(c + 1) * CHUNK]
    t.close()
    assert np.count_nonzero(view)  # the writer did write
    bad = np.flatnonzero((shadow != view).reshape(-1, CHUNK).any(axis=1))
    assert bad.size == 0, f"chunks {bad.tolist()} differ: a write was missed"


@pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")
def test_the_handler_counts_one_fault_per_chunk_and_round(heap):
    t = EnclaveWriteTracker(heap)
    t.arm()
    try:
        for _ in range(3):
            np.frombuffer(heap.chunk_view(2), dtype=np.uint8)[::4096] = 9  # 256 pages, one chunk
        assert t.faults == 1
        t.scan()
        _write(heap, 2, 0)
        assert t.faults == 2
    finally:
        t.close()


@pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")
def test_a_kernel_write_into_a_tracked_chunk_fails_loudly(heap):
    """The kernel gets EFAULT where the CPU would fault: a recv_into the heap raises, nothing is lost."""
    t = EnclaveWriteTracker(heap)
    t.arm()
    r, w = os.pipe()
    try:
        os.write(w, b"kernel")
        with pytest.raises(OSError) as e:
            os.readv(r, [heap.chunk_view(3)[:6]])
        assert e.value.errno == errno.EFAULT
        assert t.scan().tolist() == []
    finally:
        os.close(r)
        os.close(w)
        t.close()


@pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")
def test_a_fault_outside_tracked_heaps_still_kills_the_process():
    """The handler passes on what is not its own: a real bug dies of SIGSEGV, it does not spin or go on."""
    code = ("from constmig.enclave.heap import Heap\n"
            "from constmig.enclave.dirty import EnclaveWriteTracker\n"
            "import ctypes\n"
            "h = Heap(4 << 20, chunk_size=1 << 20)\n"
            "t = EnclaveWriteTracker(h)\n"
            "t.arm()\n"
            "ctypes.memset(h.address, 1, 10)\n"  # tracked: lands
            "print('tracked write landed', flush=True)\n"
            "ctypes.memset(8, 1, 10)\n")  # not a heap: a bug
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "tracked write landed" in p.stdout
    assert p.returncode == -signal.SIGSEGV, (p.returncode, p.stderr)


def test_unknown_mechanism_is_refused(heap):
    with pytest.raises(UffdError, match="unknown write tracking 'magic'; known: auto, kernel, enclave"):
        dirty.write_tracker(heap, "magic")


def test_one_mechanism_per_tracker(heap):
    assert dirty.write_tracker(heap, "auto", "fault").mechanism == "kernel"
    assert dirty.write_tracker(heap, "auto", "access").mechanism == "enclave"
    assert dirty.write_tracker(heap, "enclave", "fault").mechanism == "enclave"
    expected = "kernel" if _KERNEL is None else "enclave"
    assert dirty.write_tracker(heap, "auto", "none").mechanism == expected


def test_the_last_scan_need_not_rearm(heap, WriteTracker):
    """At the stop the app writes no more: the scan reports without re-arming (no mprotect in the downtime)."""
    t = WriteTracker(heap)
    t.arm()
    try:
        _write(heap, 5, 0)
        assert t.scan(rearm=False).tolist() == [5]
        _write(heap, 5, 1)  # not re-armed: this write is not reported
        assert t.scan().tolist() == ([] if WriteTracker is EnclaveWriteTracker else [5])
    finally:
        t.close()
