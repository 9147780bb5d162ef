"""What write tracking costs, per mechanism (enclave/dirty.py), on one heap in this process: arming,
a first write per chunk, writing every page once, scans with and without writes, and closing.

The mechanisms alternate repeat by repeat, so the machine's noise falls on both alike; each figure is
the median over the repeats with its spread. No plot: seven numbers per mechanism read better as a table.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from constmig.bench.results import machine_info
from constmig.bench.stats import spread
from constmig.enclave.dirty import EnclaveWriteTracker, KernelWriteTracker, enclave_problem, kernel_problem
from constmig.enclave.heap import Heap

CHUNK = 1 << 20
PAGE = 4096


def _one(kind: type[KernelWriteTracker] | type[EnclaveWriteTracker], heap_bytes: int) -> dict[str, float]:
    h = Heap(heap_bytes, chunk_size=CHUNK)
    try:
        a = np.frombuffer(h.buf, dtype=np.uint8)
        a[::PAGE] = 1  # populated, as a filled heap is
        n = heap_bytes // CHUNK
        t = kind(h)
        f: dict[str, float] = {}
        t0 = time.perf_counter()
        t.arm()
        f["arm_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        t.scan()
        f["scan_clean_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        a[::CHUNK] = 2  # one write in every chunk
        f["first_write_per_chunk_us"] = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        a[::PAGE] = 3  # then every page once
        f["every_page_once_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        found = t.scan()
        f["scan_all_written_ms"] = (time.perf_counter() - t0) * 1e3
        if found.size != n:
            raise AssertionError(f"{kind.mechanism}: the scan named {found.size} of {n} written chunks")
        t0 = time.perf_counter()
        t.close()
        f["close_ms"] = (time.perf_counter() - t0) * 1e3
        return f
    finally:
        h.close()


def run_writes(heap_bytes: int, repeat: int, quiet: bool = False) -> dict[str, Any]:
    from rich.progress import Progress

    kinds = [k for k, why in ((KernelWriteTracker, kernel_problem()), (EnclaveWriteTracker, enclave_problem()))
             if why is None]
    skipped = {k.mechanism: why for k, why in (("kernel", kernel_problem()), ("enclave", enclave_problem()))
               if why is not None} if len(kinds) < 2 else {}
    runs: dict[str, list[dict[str, float]]] = {k.mechanism: [] for k in kinds}
    with Progress(disable=quiet, transient=True) as bar:
        task = bar.add_task("write tracking", total=repeat * len(kinds))
        for _ in range(repeat):
            for kind in kinds:
                runs[kind.mechanism].append(_one(kind, heap_bytes))
                bar.advance(task)
    out: dict[str, Any] = {"bench": "writes", "machine": machine_info(), "heap_bytes": heap_bytes,
                           "chunk_bytes": CHUNK, "repeat": repeat, "skipped": skipped}
    for mech, rows in runs.items():
        out[mech] = {key: spread(r[key] for r in rows) for key in rows[0]}
    return out
