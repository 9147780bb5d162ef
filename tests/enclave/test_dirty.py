"""Write tracking for pre-copy (enclave/dirty.py) on a real heap, both mechanisms (the kernel's
userfaultfd write-protect, the enclave's own write-fault handler): a scan names exactly the chunks
written since the last scan, re-arms them, and misses no write whatever page it lands on or whatever
code makes it."""

from __future__ import annotations

import ctypes
import errno
import json
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
from constmig.errors import MigrationError, UffdError
from constmig.migration import trackers
from constmig.migration.constants import WRITE_TRACKING

_KERNEL = kernel_problem()
_ENCLAVE = enclave_problem()
KINDS = [pytest.param(KernelWriteTracker, id="kernel",
                      marks=pytest.mark.skipif(_KERNEL is not None, reason=f"kernel write tracking: {_KERNEL}")),
         pytest.param(EnclaveWriteTracker, id="enclave",
                      marks=pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}"))]

CHUNK = 1 << 20


def _kernel_has_it() -> bool:
    """What the kernel's tracker needs, judged without it: Linux 6.7 or later (UFFD_FEATURE_WP_ASYNC and
    PAGEMAP_SCAN) and a userfaultfd this process may open."""
    from constmig.kernel.uffd import preflight

    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 7) and preflight() is None


def test_the_probes_find_the_trackers_where_they_can_work():
    """The trackers' own probes decide what migrations use (and which of these tests run): where the
    kernel has what the kernel's tracker needs, and where the handler is built, they must say so. A
    broken scan or handler must fail here, not skip its tests."""
    if _kernel_has_it():
        assert kernel_problem() is None
    if dirty._wtrack is not None:
        assert enclave_problem() is None
    assert (dirty.preflight() is None) == (kernel_problem() is None or enclave_problem() is None)


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
    """Each destination tracker names the write tracking it pairs with; an explicit choice wins; the
    mechanisms are the ones `--write-tracking` offers."""
    paired = {name: t.write_tracking for name, t in trackers.REGISTRY.items()}
    assert paired == {"none": "auto", "fault": "kernel", "access": "enclave"}
    assert dirty.write_tracker(heap, "auto", paired["fault"]).mechanism == "kernel"
    assert dirty.write_tracker(heap, "auto", paired["access"]).mechanism == "enclave"
    assert dirty.write_tracker(heap, "enclave", paired["fault"]).mechanism == "enclave"
    expected = "kernel" if _KERNEL is None else "enclave"
    assert dirty.write_tracker(heap, "auto", paired["none"]).mechanism == expected
    assert ("auto", *dirty.MECHANISMS) == WRITE_TRACKING


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


@pytest.mark.parametrize("WriteTracker", KINDS)
def test_a_scan_rearms_by_default(heap, WriteTracker):
    """Between rounds the app runs on: what a scan found is tracked again, so a second scan with no write
    in between finds nothing, and a write after it is found by the next."""
    t = WriteTracker(heap)
    t.arm()
    try:
        _write(heap, 3, 0)
        assert t.scan().tolist() == [3]
        assert t.scan().tolist() == []
        _write(heap, 3, 1)
        assert t.scan().tolist() == [3]
    finally:
        t.close()


# --- the map budget: the write tracker fails safe --------------------------------------------------
#
# Every chunk the handler opens inside a read-only run splits the heap's mapping; a scattered write
# pattern over N chunks needs about N mappings, and past vm.max_map_count mprotect fails with ENOMEM.
# Arming refuses a heap the budget cannot hold; a handler that still cannot open a chunk gives tracking
# up (the whole heap counts as written, and is writable again) instead of letting the app die.


@pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")
@pytest.mark.parametrize("spare", [0, -1])
def test_arming_refuses_a_heap_the_map_budget_cannot_split(heap, spare):
    """A budget read through the tracker's injectable reader: exactly enough arms, one mapping less is
    refused in one line, before the handler or any protection is touched."""
    limit = 100_000
    in_use = limit - heap.n_chunks - dirty.MAP_HEADROOM - spare
    t = EnclaveWriteTracker(heap, maps=lambda: (limit, in_use))
    if spare == 0:
        t.arm()
        t.close()
        return
    with pytest.raises(UffdError) as e:
        t.arm()
    says = str(e.value)
    assert "\n" not in says and "vm.max_map_count" in says and f"{heap.n_chunks} chunks" in says, says
    assert f"{limit:,}" in says and f"{in_use:,}" in says, says
    _write(heap, 3, 0)  # nothing was protected: the write lands, no fault, no mark
    assert np.frombuffer(heap.chunk_view(3), dtype=np.uint8)[0] == 0xFF
    assert t.faults == 0
    with pytest.raises(UffdError, match="not armed"):
        t.scan()
    t.close()  # a refused tracker closes like one never armed


def test_the_map_budget_is_read_from_the_system():
    limit, in_use = dirty.map_budget()
    with open("/proc/sys/vm/max_map_count") as f:
        assert limit == int(f.read())
    assert 0 < in_use < limit


@pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")
def test_a_scan_that_cannot_reprotect_gives_tracking_up_and_names_the_whole_heap(heap, monkeypatch):
    """Re-protecting the written chunks fails (ENOMEM): the chunks it did not reach would go untracked, so
    the tracker says tracking is lost, every chunk counts as written from then on, and the heap is
    writable again."""
    t = EnclaveWriteTracker(heap)
    t.arm()
    try:
        _write(heap, 2, 0)
        _write(heap, 9, 0)
        real = dirty.protect_chunks

        def failing(h, chunks, prot):
            if prot == t.protection and len(chunks):
                raise MigrationError("mprotect of heap chunks 9..9 failed: Cannot allocate memory")
            return real(h, chunks, prot)

        monkeypatch.setattr(dirty, "protect_chunks", failing)
        assert t.lost is None
        assert t.scan().tolist() == list(range(heap.n_chunks))
        assert t.lost is not None and "Cannot allocate memory" in t.lost, t.lost
        faults = t.faults
        for c in range(heap.n_chunks):  # writable again: no write faults any more
            _write(heap, c, 17)
        assert t.faults == faults
        assert t.scan().tolist() == list(range(heap.n_chunks))  # and it stays lost until re-armed
        assert t.scan(rearm=False).tolist() == list(range(heap.n_chunks))
    finally:
        t.close()
    monkeypatch.undo()
    t.arm()  # arming again starts afresh
    try:
        assert t.lost is None and t.scan().tolist() == []
    finally:
        t.close()


_SPEND_THE_BUDGET = r"""
import ctypes, json, mmap
import numpy as np
from constmig.enclave.heap import Heap
from constmig.enclave.dirty import EnclaveWriteTracker

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
PAGE = mmap.PAGESIZE
CHUNK, N, SLACK = 64 << 10, 512, 40


def in_use():
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


h = Heap(N * CHUNK, chunk_size=CHUNK)
data = h.buf.reshape(N, CHUNK)
data[:, 0] = np.arange(N) % 251  # each chunk says which it is
data[:, 1] = 7
t = EnclaveWriteTracker(h)
t.arm()  # the budget was fine when the migration started
written = list(range(0, N, 2))  # scattered: every other chunk, each one a new mapping or two
expect = data.copy()
expect[written, 100] = 0xEE

# Then the process's other mappings grow (the app, the host's pressure) until SLACK are left.
with open("/proc/sys/vm/max_map_count") as f:
    limit = int(f.read())
pairs = (limit - in_use() - SLACK) // 2  # a read-only page between two writable ones: two mappings more
size = (2 * pairs + 1) * PAGE
filler = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
assert filler not in (None, ctypes.c_void_p(-1).value)
for i in range(pairs):
    assert libc.mprotect(filler + (2 * i + 1) * PAGE, PAGE, mmap.PROT_READ) == 0, ctypes.get_errno()
left = limit - in_use()

for c in written:  # the app writes on; somewhere here the handler's mprotect fails (ENOMEM)
    ctypes.memset(h.address + c * CHUNK + 100, 0xEE, 1)
libc.munmap(filler, size)  # the budget back, for what Python allocates below

lost = t.lost
chunks = t.scan()
intact = bool((data == expect).all())
t.close()
ctypes.memset(h.address + 5 * CHUNK, 1, 1)  # plain memory again
print(json.dumps({"left": left, "lost": lost, "chunks": chunks.tolist(), "intact": intact}))
"""


@pytest.mark.adversarial
@pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")
def test_a_write_the_handler_cannot_open_loses_tracking_not_the_app():
    """For real, in a child process: the mappings budget is spent after arming (as a scattered write
    pattern over a big heap of small chunks spends it), so the handler's mprotect fails. The process
    lives on, tracking says it is lost, the scan names every chunk, and every byte written is there."""
    p = subprocess.run([sys.executable, "-c", _SPEND_THE_BUDGET], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"the app died: {p.returncode} {p.stderr[-2000:]}"
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["left"] <= 60, got["left"]  # the budget was really (almost) spent
    assert got["lost"] is not None and "Cannot allocate memory" in got["lost"], got["lost"]
    assert got["chunks"] == list(range(512))  # the whole heap counts as written
    assert got["intact"]
