"""Write tracking inside the enclave, for pre-copy: which heap chunks the app wrote since they were sent.

The kernel mechanism (FACTS.md): the heap is registered with a userfaultfd in write-protect mode with
WP_ASYNC, so the first write to a protected page costs about a microsecond inside the kernel (no fault
reaches anyone) and marks the page written; one PAGEMAP_SCAN ioctl on /proc/self/pagemap lists the
written pages and, with PM_SCAN_WP_MATCHING, protects them again in the same walk. So a round is: scan
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
import mmap
import os

import numpy as np

from constmig.enclave.heap import Heap
from constmig.errors import UffdError
from constmig.migration.uffd import (
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

REGIONS = 4096  # page runs one scan call can report; a longer list continues from where it stopped


class WriteTracker:
    """Tracks the writes to one heap from `arm()` on; `scan()` names the chunks written since the last scan."""

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

    def scan(self) -> np.ndarray:
        """Sorted unique chunk indices with a page written since the last scan (or arm); re-arms them."""
        if self._pagemap is None:
            raise UffdError("write tracker is not armed")
        base, end = self.heap.address, self.heap.address + self.heap.size
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        at = base
        while at < end:
            arg = pm_scan_arg(ctypes.sizeof(pm_scan_arg), PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, at, end, 0,
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


def preflight() -> str | None:
    """None if this process can track writes (uffd WP_ASYNC and PAGEMAP_SCAN), else one line why."""
    mm = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    heap = _ProbeHeap(mm)
    tracker = WriteTracker(heap)  # type: ignore[arg-type]
    try:
        tracker.arm()
        mm[mmap.PAGESIZE * 2] = 1
        found = tracker.scan().tolist()
        again = tracker.scan().tolist()
        if found != [0] or again != []:
            return f"write tracking reported {found} then {again} for one written page (expected [0] then [])"
        return None
    except UffdError as e:
        return str(e)
    finally:
        tracker.close()
        mm.close()


class _ProbeHeap:
    """Just enough of a Heap for the preflight: one chunk over a small mapping."""

    def __init__(self, mm: mmap.mmap) -> None:
        anchor = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(anchor)
        del anchor  # release the buffer export so the mapping can close
        self.size = len(mm)
        self.chunk_size = len(mm)
