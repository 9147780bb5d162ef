"""Write tracking inside the enclave, for pre-copy: which heap chunks the app wrote since they were sent.

Two mechanisms with one interface (`arm`, `scan`, `close`), one per tracker (`write_tracker` picks):

The enclave's own (`EnclaveWriteTracker`, the Access Tracker's, and anywhere the kernel lacks the
other): the enclave makes its heap read-only, and its own SIGSEGV handler (_wtrack.c) records the first
write to a chunk and opens the chunk again; a scan takes the marks and makes those chunks read-only
again before they are read. This is what an SGX2 enclave does with EMODPR + EACCEPT and its own #PF
handler. It needs nothing from the kernel but mprotect, and it sees every write, whatever code makes
it: numpy, `np.asarray(a)[i] = x`, ctypes, a memoryview. A write by the kernel itself into a read-only
chunk (a `recv_into` the heap) fails with EFAULT instead: loud, never lost.

Each chunk opened inside a read-only run splits the heap's mapping, so a scattered write pattern over N
chunks needs about N mappings, and past vm.max_map_count mprotect fails. So arming refuses a heap whose
chunks the process's mapping budget cannot hold (`map_budget`, one line, before anything is protected),
and the tracker fails safe when the budget runs out all the same (the process's other mappings grew): a
write the handler cannot open a chunk for, or a scan that cannot re-protect what it found, loses
*tracking*, never the app. The whole heap is writable again and counts as written, `lost` says why,
every scan from then on names every chunk, and the rounds end (everything goes at the stop).

The kernel's (`KernelWriteTracker`; figures in docs/architecture.md, "Write tracking inside the
enclave"): the heap is registered with a userfaultfd in write-protect mode with WP_ASYNC, so the first
write to a protected page costs about a microsecond inside the kernel (no fault reaches anyone) and marks
the page written; one PAGEMAP_SCAN ioctl on /proc/self/pagemap lists the written pages and, with
PM_SCAN_WP_MATCHING, protects them again in the same walk. So a round is: scan
(and re-arm), then read and send what the scan named; a write that lands after the scan is named by
the next one, a write during the read is sent again next round. Nothing is missed: a page is re-armed
before it is read.

On hardware the trusted party differs: on SGX2 the enclave restricts its own pages through the OS and
confirms with EACCEPT, so a write to a restricted page faults into the enclave; on TDX the TDX module
tracks writes for the migration TD. In the sim the kernel plays that part (it is the platform here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Callable

import numpy as np

from constmig.enclave.heap import Heap
from constmig.enclave.tracker.state import PROT_RW, protect_chunks
from constmig.errors import ConstmigError, MigrationError, UffdError
from constmig.kernel.uffd import (
    PAGE_IS_WRITTEN,
    PAGEMAP_SCAN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_REGISTER_MODE_WP,
    Userfaultfd,
    _ioctl,
    page_region,
    pm_scan_arg,
)

try:
    from constmig.enclave import _wtrack
except ImportError as e:  # built by `pip install` (setup.py); absent where no C compiler was at hand
    _wtrack = None
    _NOT_BUILT = f"the enclave's write-fault handler was not built at install ({e})"

ARM_STEP = 64  # chunks protected per mprotect while arming (64 MiB of 1 MiB chunks: about 1 ms)
REGIONS = 4096  # page runs one scan call can report; a longer list continues from where it stopped
MAP_HEADROOM = 1024  # mappings kept free for everything else the process maps meanwhile (threads, buffers)


def map_budget() -> tuple[int, int]:
    """(vm.max_map_count, mappings this process holds now): what the enclave's write tracker may split
    its heap into is the difference."""
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
        in_use = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return limit, in_use


class KernelWriteTracker:
    """Tracks the writes to one heap from `arm()` on; `scan()` names the chunks written since the last scan."""

    mechanism = "kernel"
    lost: str | None = None  # never: write-protection lives in the page tables and splits no mapping

    def __init__(self, heap: Heap) -> None:
        self.heap = heap
        self._shift = heap.chunk_size.bit_length() - 1
        self._uffd: Userfaultfd | None = None
        self._pagemap: int | None = None
        self._vec = (page_region * REGIONS)()

    def arm(self) -> None:
        """Register the heap and write-protect all of it (tens of ms per GiB): call before the first send."""
        heap = self.heap
        try:
            self._uffd = Userfaultfd.open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            self._uffd.register(heap.address, heap.size, UFFDIO_REGISTER_MODE_WP)
            self._uffd.writeprotect(heap.address, heap.size)
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (UffdError, OSError) as e:
            self.close()
            raise UffdError(f"write tracking is unavailable: {e}") from None

    def scan(self, rearm: bool = True) -> np.ndarray:
        """Sorted unique chunk indices with a page written since the last scan (or arm); re-arms them
        (unless `rearm` is false: the last scan, at the stop, when the app writes no more)."""
        if self._pagemap is None:
            raise UffdError("write tracker is not armed")
        flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if rearm else 0)
        base, end = self.heap.address, self.heap.address + self.heap.size
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        at = base
        while at < end:
            arg = pm_scan_arg(ctypes.sizeof(pm_scan_arg), flags, at, end, 0,
                              ctypes.addressof(self._vec), REGIONS, 0, 0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN)
            n = _ioctl(self._pagemap, PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                err = ctypes.get_errno()
                raise UffdError(f"PAGEMAP_SCAN failed: {os.strerror(err)}", err)
            if n:
                regions = np.ctypeslib.as_array(self._vec)[:n]  # structured view: (start, end, categories)
                raw = regions.view(np.uint64).reshape(n, 3)
                starts.append(raw[:, 0].astype(np.int64) - base)
                ends.append(raw[:, 1].astype(np.int64) - base)
            if n < REGIONS or arg.walk_end >= end:
                break
            at = int(arg.walk_end)
        if not starts:
            return np.zeros(0, dtype=np.int64)
        first = np.concatenate(starts) >> self._shift
        last = (np.concatenate(ends) - 1) >> self._shift
        counts = last - first + 1
        chunks = np.repeat(first, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts,
                                                                                        counts))
        return np.unique(chunks)

    def close(self) -> None:
        """Stop tracking: unprotect and unregister (the heap is plain memory again)."""
        if self._uffd is not None:
            with contextlib.suppress(UffdError):
                self._uffd.unregister(self.heap.address, self.heap.size)
            self._uffd.close()
            self._uffd = None
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


class EnclaveWriteTracker:
    """The enclave's own write-fault handler over one heap (see the module's docstring)."""

    mechanism = "enclave"
    protection = mmap.PROT_READ  # what an armed chunk allows: reads (a write is what faults and is marked)

    def __init__(self, heap: Heap, maps: Callable[[], tuple[int, int]] = map_budget) -> None:
        self.heap = heap
        self._marks = np.zeros(heap.size // heap.chunk_size, dtype=np.uint8)  # the handler's, while armed
        self._taken = np.zeros_like(self._marks)
        self._every = np.arange(self._marks.size)  # the whole heap, as one run of chunks
        self._armed = False
        self._maps = maps  # (limit, in use): injectable, so a test can fake a small budget
        self._lost: str | None = None

    def arm(self) -> None:
        """Register the heap with the handler, then make all of it read-only (tens of ms per GiB). Refused,
        before anything is protected, where the mapping budget cannot hold the heap's chunks."""
        if _wtrack is None:
            raise UffdError(f"write tracking is unavailable: {_NOT_BUILT}")
        heap = self.heap
        self._check_budget()
        self._lost = None
        self._marks[:] = 0
        _wtrack.arm(heap.address, heap.size, heap.chunk_size, self._marks.ctypes.data, self._marks.size)
        self._armed = True
        try:
            self._protect_all(self.protection)
        except ConstmigError:
            self.close()
            raise

    def scan(self, rearm: bool = True) -> np.ndarray:
        """Sorted chunk indices written since the last scan (or arm), made read-only again before the caller
        reads them: a write after this is marked for the next scan, a write before it is in what is read.
        The last scan, at the stop, need not re-arm (`rearm=False`): mprotect there would be downtime."""
        if not self._armed:
            raise UffdError("write tracker is not armed")
        _wtrack.take(self.heap.address, self._taken.ctypes.data)
        chunks = np.flatnonzero(self._taken).astype(np.int64)
        if rearm and self.lost is None:
            try:
                protect_chunks(self.heap, chunks, self.protection)  # type: ignore[arg-type]
            except MigrationError as e:  # the chunks it did not reach would go untracked
                self._lose(f"re-protecting the written chunks failed ({e})")
        if self.lost is not None:  # checked after re-protecting: a loss meanwhile counts now
            return self._every.copy()
        return chunks

    @property
    def lost(self) -> str | None:
        """None while tracking holds; else one line why it was lost (a chunk could not be opened or
        re-protected). From then on every scan names every chunk, until the next `arm`."""
        if self._lost is None and self._armed:
            chunk_err, heap_err = _wtrack.lost(self.heap.address)
            if chunk_err:
                self._lose(f"a write fault could not open its chunk (mprotect: {os.strerror(chunk_err)}"
                           + (f"; and the whole heap: {os.strerror(heap_err)}, so writes wait" if heap_err else "")
                           + ")")
        return self._lost

    def _lose(self, why: str) -> None:
        """Tracking is lost: say why, and make the whole heap writable again in one mprotect (over the heap's
        own mappings it only merges). If that fails too, the handler still opens what a write faults on."""
        hint = " (vm.max_map_count reached?)" if os.strerror(errno.ENOMEM) in why else ""
        self._lost = f"write tracking lost: {why}{hint}; every chunk counts as written"
        with contextlib.suppress(MigrationError):
            protect_chunks(self.heap, self._every, PROT_RW)  # type: ignore[arg-type]

    def _check_budget(self) -> None:
        problem = self.budget_problem()
        if problem is not None:
            raise UffdError(problem)

    def budget_problem(self) -> str | None:
        """A heap of N chunks whose protections alternate needs about N mappings: why a heap whose chunks
        do not fit what vm.max_map_count leaves (with headroom for the rest of the process) is refused,
        or None."""
        try:
            limit, in_use = self._maps()
        except (OSError, ValueError) as e:
            return f"write tracking is unavailable: cannot read the mapping budget ({e})"
        n = int(self._every.size)
        if in_use + n + MAP_HEADROOM > limit:
            return (f"write tracking is unavailable: the enclave's write tracker may split this heap of {n:,} "
                    f"chunks into as many mappings, and vm.max_map_count is {limit:,} with {in_use:,} in use (and "
                    f"{MAP_HEADROOM:,} kept free); use larger chunks, --write-tracking kernel, or raise "
                    f"vm.max_map_count (sysctl)")
        return None

    @property
    def faults(self) -> int:
        """First writes the handler caught since `arm` (one per chunk and round)."""
        return 0 if _wtrack is None else int(_wtrack.faults(self.heap.address))

    def close(self) -> None:
        """Stop tracking: the heap is writable again; a write already faulting is let through."""
        if not self._armed:
            return
        self._armed = False
        _wtrack.opening(self.heap.address)
        if not self.heap.closed:
            try:
                self._protect_all(PROT_RW)
            except MigrationError:  # a step that had to split a mapping, at vm.max_map_count: all at once
                protect_chunks(self.heap, self._every, PROT_RW)  # type: ignore[arg-type]

    def _protect_all(self, prot: int) -> None:
        """The whole heap, in steps: one mprotect over a GiB holds the address space's lock ~15 ms, and an
        access of the app to a chunk changed meanwhile would wait for all of it (here for one step)."""
        for start in range(0, self._every.size, ARM_STEP):
            protect_chunks(self.heap, self._every[start:start + ARM_STEP], prot)  # type: ignore[arg-type]


WriteTracker = KernelWriteTracker | EnclaveWriteTracker
MECHANISMS = ("kernel", "enclave")  # what `--write-tracking` may name besides "auto"


def write_tracker(heap: Heap, mechanism: str = "auto", paired: str = "auto") -> WriteTracker:
    """The write tracker a migration uses: the one asked for, else the one the destination's tracker pairs
    with (`paired`: the Fault Tracker's kernel, the Access Tracker's own handler), else the kernel's where
    it works here."""
    if mechanism not in ("auto", *MECHANISMS):
        raise UffdError(f"unknown write tracking {mechanism!r}; known: auto, {', '.join(MECHANISMS)}")
    if mechanism == "auto":
        mechanism = paired if paired in MECHANISMS else ("kernel" if kernel_problem() is None else "enclave")
    return KernelWriteTracker(heap) if mechanism == "kernel" else EnclaveWriteTracker(heap)


def enclave_problem() -> str | None:
    """None if the enclave's own write-fault handler works in this process, else one line why."""
    return _probe(EnclaveWriteTracker)


def kernel_problem() -> str | None:
    """None if this process can track writes with the kernel (uffd WP_ASYNC and PAGEMAP_SCAN), else why."""
    return _probe(KernelWriteTracker)


def preflight() -> str | None:
    """None if pre-copy can track writes here by some mechanism, else one line naming why neither works."""
    kernel = kernel_problem()
    if kernel is None:
        return None
    enclave = enclave_problem()
    return None if enclave is None else f"{kernel}; and {enclave}"


def _probe(kind: type[KernelWriteTracker] | type[EnclaveWriteTracker]) -> str | None:
    mm = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    heap = _ProbeHeap(mm)
    tracker = kind(heap)  # type: ignore[arg-type]
    try:
        tracker.arm()
        mm[mmap.PAGESIZE * 2] = 1
        found = tracker.scan().tolist()
        again = tracker.scan().tolist()
        if found != [0] or again != []:
            return f"write tracking reported {found} then {again} for one written page (expected [0] then [])"
        return None
    except ConstmigError as e:
        return str(e)
    finally:
        tracker.close()
        if _wtrack is not None:
            _wtrack.forget(heap.address)  # as Heap.close does before unmapping
        mm.close()


class _ProbeHeap:
    """Just enough of a Heap for the preflight: one chunk over a small mapping."""

    closed = False

    def __init__(self, mm: mmap.mmap) -> None:
        anchor = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(anchor)
        del anchor  # release the buffer export so the mapping can close
        self.size = len(mm)
        self.chunk_size = len(mm)

