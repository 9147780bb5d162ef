"""The enclave heap: one big anonymous mmap region that holds an app's large state, moved in chunks.

Why one region: migration moves memory chunk by chunk with single syscalls (userfaultfd registers one
range, UFFDIO_COPY fills whole chunks), and a bump allocator with small metadata lets the destination
rebuild every array at the same offset from a few hundred bytes sent during the stop.

Nothing here loops over pages in Python: zeroing is one madvise call, and the (diagnostic) page state
comes from one read of /proc/self/pagemap turned into numpy arrays.

The allocator also keeps a record of the chunks it changed behind the app's back (`take_changed`): a
free or any other zeroing (MADV_DONTNEED, which no write tracker sees as a write: the enclave's own
handler never faults on it) and every chunk an allocation hands out. Pre-copy rounds add it to what
the write tracker found, so a chunk freed (and perhaps allocated again) after a round sent it is sent
again, never kept at the destination with that round's old bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
import time
from typing import Any

import numpy as np

from constmig.errors import HeapError
from constmig.units import available_memory, format_size

try:  # the enclave's write-fault handler (enclave/dirty.py), told when a heap it may track goes away
    from constmig.enclave import _wtrack
except ImportError:
    _wtrack = None

PAGE_SIZE = mmap.PAGESIZE
MIN_CHUNK = 64 << 10
MAX_CHUNK = 4 << 20
# Not exported by the mmap module before Python 3.13; the value is the same on every Linux arch we run.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

# /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
_PM_PRESENT = np.uint64(1 << 63)
_PM_SWAPPED = np.uint64(1 << 62)
_PM_EXCLUSIVE = np.uint64(1 << 56)
_PM_PFN_MASK = np.uint64((1 << 55) - 1)
_HUGE_ZERO_PAGES = 512  # a PMD-sized huge zero page covers 512 base pages on x86_64

META_VERSION = 1


def chunk_runs(chunks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, unique chunk indices as runs of consecutive ones, [start, stop): one syscall or message
    per run instead of one per chunk."""
    idx = np.asarray(chunks, dtype=np.int64)
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], breaks))]
    stops = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _read_pagemap(address: int, n_pages: int) -> np.ndarray:
    """Pagemap entries for n_pages pages from `address`, read with one preadv into a numpy array."""
    out = np.empty(n_pages, dtype=np.uint64)
    view = memoryview(out).cast("B")
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        offset = (address // PAGE_SIZE) * 8
        while done < len(view):  # the kernel may return short reads; loop per read, not per page
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read of /proc/self/pagemap ({done} of {len(view)} bytes)")
            done += n
    finally:
        os.close(fd)
    return out


def _has_data(entries: np.ndarray, pages_per_chunk: int) -> np.ndarray:
    """Per chunk: does any of its pagemap entries hold data (swapped, or present and not a zero page)?"""
    data = (entries & _PM_SWAPPED) != 0
    present = (entries & _PM_PRESENT) != 0
    small, huge = _zero_pfns()
    if small or huge:
        pfn = entries & _PM_PFN_MASK
        zero = pfn == np.uint64(small) if small else np.zeros(len(pfn), dtype=bool)
        if huge:
            zero |= (pfn >= np.uint64(huge)) & (pfn < np.uint64(huge + _HUGE_ZERO_PAGES))
        present &= ~zero
    data |= present
    return data.reshape(-1, pages_per_chunk).any(axis=1)


_zero_pfns_cache: tuple[int, int] | None = None


def _probe_zero_pfn(length: int, at: int, huge: bool) -> int:
    """PFN mapped by a read fault on fresh anonymous memory, or 0 if it is not provably the zero page."""
    m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    try:
        arr = np.frombuffer(m, dtype=np.uint8)
        base = arr.ctypes.data
        start = _align_up(base, at) - base
        if huge:
            m.madvise(mmap.MADV_HUGEPAGE, start, at)
        int(arr[start])  # read fault: the kernel maps its shared zero page
        entry = int(_read_pagemap(base + start, 1)[0])
        del arr
    finally:
        with contextlib.suppress(BufferError):
            m.close()
    present = bool(entry & int(_PM_PRESENT))
    exclusive = bool(entry & int(_PM_EXCLUSIVE))
    # A page of our own would be exclusive (mapcount 1); the zero page never is, and is never PFN 0.
    return entry & int(_PM_PFN_MASK) if present and not exclusive else 0


def _zero_pfns() -> tuple[int, int]:
    """(zero page PFN, huge zero page first PFN), 0 where unknown (e.g. PFNs hidden from non-root).

    Reading untouched heap memory (a checksum does) maps the kernel's zero page; such pages hold no data
    and need not migrate. A PFN counts only if two fresh probes agree and the page is not exclusively
    ours, so a real data page can never be mistaken for the zero page.
    """
    global _zero_pfns_cache
    if _zero_pfns_cache is None:
        small = huge = 0
        try:
            a = _probe_zero_pfn(PAGE_SIZE, PAGE_SIZE, huge=False)
            if a and a == _probe_zero_pfn(PAGE_SIZE, PAGE_SIZE, huge=False):
                small = a
            hp = PAGE_SIZE * _HUGE_ZERO_PAGES
            h = _probe_zero_pfn(2 * hp, hp, huge=True)
            if h and h != small and h == _probe_zero_pfn(2 * hp, hp, huge=True):
                huge = h
        except (OSError, ValueError):
            pass
        _zero_pfns_cache = (small, huge)
    return _zero_pfns_cache


class Heap:
    """One anonymous private mapping plus a bump allocator of page-aligned typed numpy arrays.

    Arrays handed out are zero-copy views of the mapping, so writing them writes the heap that
    migration moves; `metadata()` is all the destination needs to rebuild them by name.
    """

    def __init__(self, size: int, chunk_size: int = 1 << 20) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise HeapError(f"chunk size must be an integer, not {type(chunk_size).__name__}")
        if chunk_size < MIN_CHUNK or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise HeapError(f"chunk size {chunk_size} must be a power of two between 64 KiB and 4 MiB")
        if isinstance(size, bool) or not isinstance(size, int):
            raise HeapError(f"heap size must be an integer, not {type(size).__name__}")
        if size <= 0 or size % chunk_size:
            raise HeapError(
                f"heap size {size} must be a positive multiple of the chunk size {chunk_size} "
                f"({format_size(chunk_size)})"
            )
        avail = available_memory()
        if size > avail:
            raise HeapError(
                f"heap size {size} bytes ({format_size(size)}) exceeds available memory "
                f"{avail} bytes ({format_size(avail)})"
            )
        self.size = size
        self.chunk_size = chunk_size
        self.n_chunks = size // chunk_size
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            )
        except OSError as e:
            raise HeapError(f"cannot map a heap of {size} bytes: {e.strerror or e}") from None
        anchor = ctypes.c_ubyte.from_buffer(self._mm)
        self.address: int = ctypes.addressof(anchor)
        del anchor  # release the buffer export so close() can unmap
        self.buf: np.ndarray = np.frombuffer(self._mm, dtype=np.uint8)
        self._mv: memoryview = memoryview(self._mm)
        self._allocs: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        self._bump = 0
        self._changed = np.zeros(self.n_chunks, dtype=bool)  # see take_changed()
        self._changed_lock = threading.Lock()  # an ECALL frees while a migration's round takes the record
        self.closed = False

    # -- allocator ---------------------------------------------------------------------------------

    def alloc(self, name: str, shape: int | tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """Reserve a page-aligned C-contiguous array called `name` and return a zero-copy view of it."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise HeapError(f"allocation name must be a non-empty string, not {name!r}")
        if name in self._allocs:
            raise HeapError(f"heap already has an allocation named {name!r}")
        shape_t, dt = self._check_spec(name, shape, dtype)
        nbytes = int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize
        offset = _align_up(self._bump, PAGE_SIZE)
        if offset + nbytes > self.size:
            raise HeapError(
                f"allocation {name!r} of {nbytes} bytes does not fit: {self.size - offset} of "
                f"{self.size} heap bytes left"
            )
        self._allocs[name] = (offset, shape_t, dt)
        self._bump = offset + nbytes
        self._record_changed(offset, nbytes)  # handed out (again): counts as written
        return self._view(offset, shape_t, dt)

    def array(self, name: str) -> np.ndarray:
        """A fresh zero-copy view of the allocation called `name`."""
        self._check_open()
        try:
            offset, shape, dt = self._allocs[name]
        except KeyError:
            raise HeapError(f"heap has no allocation named {name!r}") from None
        return self._view(offset, shape, dt)

    def names(self) -> list[str]:
        """Names of the live allocations, in allocation order."""
        return list(self._allocs)

    def extent(self, name: str) -> tuple[int, int]:
        """(offset, nbytes) of allocation `name`."""
        try:
            offset, shape, dt = self._allocs[name]
        except KeyError:
            raise HeapError(f"heap has no allocation named {name!r}") from None
        return offset, int(np.prod(shape, dtype=np.int64)) * dt.itemsize

    def find(self, offset: int, nbytes: int) -> str | None:
        """Name of the allocation that wholly contains heap bytes [offset, offset+nbytes), if any."""
        for name in self._allocs:
            a_off, a_len = self.extent(name)
            if a_len and a_off <= offset and offset + nbytes <= a_off + a_len:
                return name
        return None

    def free(self, name: str) -> None:
        """Drop an allocation and give its pages back to the OS; the space is reused only if it was last."""
        self._check_open()
        offset, nbytes = self.extent(name)
        del self._allocs[name]
        start, end = offset, _align_up(offset + nbytes, PAGE_SIZE)
        if end > start:  # allocations start on a page and own every page they touch
            assert self._mm is not None
            self._mm.madvise(mmap.MADV_DONTNEED, start, min(end, self.size) - start)
            self._record_changed(start, min(end, self.size) - start)  # after the zeroing, never before
        self._bump = max((self.extent(n)[0] + self.extent(n)[1] for n in self._allocs), default=0)

    @property
    def used_bytes(self) -> int:
        """Heap bytes reserved by allocations (each rounded up to whole pages). Safe beside an ECALL that
        allocates (status requests run in their own thread): it reads one snapshot of the table."""
        allocs = tuple(self._allocs.values())  # one C-level copy under the GIL
        return sum(_align_up(int(np.prod(shape, dtype=np.int64)) * dt.itemsize, PAGE_SIZE) for _, shape, dt in allocs)

    @property
    def free_bytes(self) -> int:
        """Bytes left for new allocations past the bump pointer."""
        return self.size - _align_up(self._bump, PAGE_SIZE)

    # -- metadata (travels at the stop) ------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """Small msgpack-able description of the layout: enough to rebuild every array by name."""
        return {
            "version": META_VERSION,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "bump": self._bump,
            "allocations": [
                {"name": n, "offset": off, "shape": list(shape), "dtype": dt.str}
                for n, (off, shape, dt) in self._allocs.items()
            ],
        }

    def restore_metadata(self, meta: dict[str, Any]) -> None:
        """Rebuild the allocations of a source heap on this (empty, same-geometry) destination heap."""
        self._check_open()
        if not isinstance(meta, dict):
            raise HeapError(f"heap metadata must be a dict, not {type(meta).__name__}")
        if meta.get("version") != META_VERSION:
            raise HeapError(f"heap metadata version {meta.get('version')!r} is not {META_VERSION}")
        if meta.get("size") != self.size or meta.get("chunk_size") != self.chunk_size:
            raise HeapError(
                f"heap geometry mismatch: source size {meta.get('size')} chunk {meta.get('chunk_size')}, "
                f"this heap size {self.size} chunk {self.chunk_size}"
            )
        if self._allocs:
            raise HeapError(
                f"cannot restore metadata into a heap that already has {len(self._allocs)} allocations"
            )
        allocs: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        spans = []
        try:
            for a in meta["allocations"]:
                name, offset = a["name"], a["offset"]
                if not isinstance(name, str) or not name or name in allocs:
                    raise HeapError(f"heap metadata has a bad or duplicate allocation name {name!r}")
                shape_t, dt = self._check_spec(name, tuple(a["shape"]), a["dtype"])
                nbytes = int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize
                if (
                    not isinstance(offset, int)
                    or offset < 0
                    or offset % PAGE_SIZE
                    or offset + nbytes > self.size
                ):
                    raise HeapError(f"heap metadata puts {name!r} at a bad offset {offset!r}")
                allocs[name] = (offset, shape_t, dt)
                spans.append((offset, offset + nbytes))
            bump = meta["bump"]
        except (KeyError, TypeError) as e:
            raise HeapError(f"malformed heap metadata: {e!r}") from None
        spans.sort()
        for (_, end1), (start2, _) in zip(spans, spans[1:], strict=False):
            if start2 < end1:
                raise HeapError("heap metadata has overlapping allocations")
        if not isinstance(bump, int) or bump > self.size or (spans and bump < max(e for _, e in spans)):
            raise HeapError(f"heap metadata has a bad bump pointer {bump!r}")
        self._allocs = allocs
        self._bump = bump

    # -- chunks ------------------------------------------------------------------------------------

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk i in the heap."""
        if not 0 <= i < self.n_chunks:
            raise HeapError(f"chunk index {i} out of range 0..{self.n_chunks - 1}")
        return int(i) * self.chunk_size, self.chunk_size

    def chunk_view(self, i: int) -> memoryview:
        """Writable zero-copy memoryview of chunk i (what the sender encrypts and the receiver fills)."""
        self._check_open()
        off, n = self.chunk_range(i)
        return self._mv[off : off + n]

    def allocated_chunks(self) -> np.ndarray:
        """Bool mask (n_chunks,) of chunks that overlap an allocation. Safe beside an ECALL that allocates
        (pre-copy rounds read it while the app runs): it reads one snapshot of the table."""
        mask = np.zeros(self.n_chunks, dtype=bool)
        for off, shape, dt in tuple(self._allocs.values()):  # one C-level copy under the GIL
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if nbytes:
                mask[off // self.chunk_size : (off + nbytes - 1) // self.chunk_size + 1] = True
        return mask

    def zero_chunks(self, chunks: np.ndarray) -> None:
        """Make these chunks zero again (one madvise per run of consecutive chunks)."""
        self._check_open()
        assert self._mm is not None
        for start, stop in chunk_runs(np.unique(np.asarray(chunks, dtype=np.int64))):
            self._mm.madvise(mmap.MADV_DONTNEED, start * self.chunk_size, (stop - start) * self.chunk_size)
            self._record_changed(start * self.chunk_size, (stop - start) * self.chunk_size)

    def export_chunks(self) -> np.ndarray:
        """Sorted int64 indices of the chunks a whole-heap export (migration, checkpoint) carries.

        Every chunk an allocation overlaps, from the allocator's own records: the app may have written
        any of them. Not the OS's view of memory (pagemap), which the host controls and which shows a
        page still arriving by userfaultfd as absent: chunks of zeros cost little anyway, because the
        sender ships them as zero records (wire/records.py).
        """
        return np.flatnonzero(self.allocated_chunks()).astype(np.int64)

    def touched_chunks(self) -> np.ndarray | None:
        """Bool mask (n_chunks,) of chunks holding a page with data (present or swapped) in the OS's view.

        A diagnostic (tests use it to see whether memory was touched), never what decides an export.
        Pages mapped to the kernel's zero page (read but never written) do not count. None means
        /proc/self/pagemap could not be read.
        """
        self._check_open()
        try:
            return _has_data(_read_pagemap(self.address, self.size // PAGE_SIZE), self.chunk_size // PAGE_SIZE)
        except OSError:
            return None

    # -- lifecycle ---------------------------------------------------------------------------------

    def populate(self) -> float:
        """Back every page with memory now (one madvise); returns the seconds it took.

        A migration destination does this while the source still runs, as an SGX enclave's pages are
        added at build time: first touches are slow on these VMs and must not land in the downtime.
        """
        self._check_open()
        assert self._mm is not None
        t0 = time.perf_counter()
        self._mm.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23), 0, self.size)
        return time.perf_counter() - t0

    def wipe(self) -> None:
        """Zero the whole heap and return its memory to the OS (one madvise); allocations stay valid."""
        self._check_open()
        assert self._mm is not None
        self._mm.madvise(mmap.MADV_DONTNEED, 0, self.size)
        self._record_changed(0, self.size)

    def take_changed(self) -> np.ndarray:
        """Sorted int64 indices of the chunks the allocator zeroed (free, zero_chunks, wipe) or handed out
        (alloc) since the last take, and forget them.

        Write trackers do not see these changes (a madvise is no write fault), yet a chunk a pre-copy
        round sent before them holds other bytes now: the rounds add this record to each scan. The mark
        is set after the zeroing, so a take that misses it still sees the zeroed bytes when it reads the
        chunk, and one that sees it reads after the zeroing.
        """
        with self._changed_lock:
            idx = np.flatnonzero(self._changed)
            self._changed[idx] = False
        return idx.astype(np.int64)

    def close(self) -> None:
        """Unmap the heap. If arrays handed out are still alive, wipe it and let the GC unmap it later."""
        if self.closed or self._mm is None:
            return
        self.closed = True
        if _wtrack is not None:
            _wtrack.forget(self.address)
        mm, self._mm = self._mm, None
        with contextlib.suppress(BufferError):  # something still uses the view; the mapping outlives us
            self._mv.release()
        del self.buf
        try:
            mm.close()
        except BufferError:
            mm.madvise(mmap.MADV_DONTNEED, 0, self.size)

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = (
            "closed"
            if self.closed
            else f"{len(self._allocs)} allocations, {format_size(self.used_bytes)} used"
        )
        return f"<Heap {format_size(self.size)} chunk {format_size(self.chunk_size)} {state}>"

    # -- internals ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise HeapError("heap is closed")

    def _record_changed(self, offset: int, nbytes: int) -> None:
        """Mark the chunks that heap bytes [offset, offset+nbytes) overlap for `take_changed`."""
        if nbytes <= 0:
            return
        with self._changed_lock:
            self._changed[offset // self.chunk_size : (offset + nbytes - 1) // self.chunk_size + 1] = True

    def _check_spec(self, name: str, shape: Any, dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
        """Validate shape and dtype; only plain fixed-size dtypes (no objects, no pointers) live in a heap."""
        if isinstance(shape, int | np.integer):
            shape = (int(shape),)
        try:
            shape_t = tuple(int(s) for s in shape)
            dt = np.dtype(dtype)
        except (TypeError, ValueError) as e:
            raise HeapError(f"allocation {name!r}: bad shape or dtype: {e}") from None
        if any(s < 0 for s in shape_t):
            raise HeapError(f"allocation {name!r}: negative dimension in shape {shape_t}")
        if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.itemsize == 0:
            raise HeapError(
                f"allocation {name!r}: dtype {dt} cannot live in a heap (use a plain numeric dtype)"
            )
        return shape_t, dt

    def _view(self, offset: int, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._mm, dtype=dt, count=count, offset=offset).reshape(shape)
