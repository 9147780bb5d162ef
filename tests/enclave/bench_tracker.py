"""What the Access Tracker costs an app when no chunk is missing: kvstore throughput, four ways.

Not a test (pytest does not collect it). Run:  python tests/enclave/bench_tracker.py [capacity]

  plain      the app on plain numpy arrays (what every non-migrating enclave runs)
  complete   TrackedArray, tracker complete: the fast path, one attribute check per access
  restored   TrackedArray, tracker not complete but every chunk the app touches restored: the
             slow path's bookkeeping (which chunks, are they there) without any waiting
  untracked  after untrack_app: plain again (what the runtime switches to once the stream is done)

Each mode runs get_many and put_many batches of 100 keys over the same migrated table; the figure is
the median of 5 runs, in keys per second, and its ratio to plain.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import constmig.apps.kvstore as kvmod
from constmig.apps.kvstore import KVStore
from constmig.enclave.heap import Heap
from constmig.enclave.state import export_app_state, import_app_state
from constmig.enclave.tracker import AccessTracker, interpose, restore, untrack_app

MiB = 1 << 20
BATCH = 100
BATCHES = 100
RUNS = 5


def migrate(src: KVStore, mode: str) -> tuple[KVStore, AccessTracker | None]:
    """A destination copy of `src` in the given mode, every used chunk already installed."""
    heap = Heap(src.heap.size, chunk_size=src.heap.chunk_size)
    used = src.heap.export_chunks()
    blob = export_app_state(src)
    if mode == "plain":
        for i in used.tolist():
            heap.chunk_view(i)[:] = src.heap.chunk_view(i)
        return import_app_state(KVStore, heap, blob), None
    # "restored": one extra expected chunk past every allocation never arrives, so complete stays False
    spare = heap.n_chunks - 1
    assert not src.heap.allocated_chunks()[spare], "heap too small for a spare chunk"
    expected = used if mode in ("complete", "untracked") else np.append(used, spare)
    tracker = AccessTracker(heap, expected, lambda c: None, timeout=5)
    tracker.guard()
    for i in used.tolist():
        tracker.begin_install(i)[:] = src.heap.chunk_view(i)
        tracker.finish_install(i)
    app = import_app_state(KVStore, heap, blob, wrap=tracker.track)
    assert tracker.complete == (mode != "restored")
    if mode == "untracked":
        untrack_app(app)
    return app, tracker


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    capacity = int(sys.argv[1]) if len(sys.argv) > 1 else 40_000
    src = KVStore(Heap(64 * MiB, chunk_size=MiB))
    src.setup(capacity=capacity, value_size=1024)
    src.fill(0.9, seed=1)
    n_keys = src.count
    rng = np.random.default_rng(7)
    get_batches = [[f"fill-{int(i)}" for i in rng.integers(0, n_keys, BATCH)] for _ in range(BATCHES)]
    put_batches = [[[f"fill-{int(i)}", rng.bytes(200)] for i in rng.integers(0, n_keys, BATCH)]
                   for _ in range(BATCHES)]
    print(f"kvstore: {capacity} slots x 1 KiB values, {n_keys} keys; batches of {BATCH}, "
          f"{BATCHES} batches per run, median of {RUNS} runs")
    modes = ("plain", "complete", "restored", "untracked")
    apps = {mode: migrate(src, mode) for mode in modes}
    for app in (src, *(a for a, _ in apps.values())):  # reach the state every later round ends in
        for b in put_batches:
            app.put_many(b)
    expect = [src.get_many(b) for b in get_batches[:3]]
    times: dict[tuple[str, str], list[float]] = {(m, op): [] for m in modes for op in ("get", "put")}
    # Round-robin over the modes, so that noise from other processes hits them all alike.
    for _ in range(RUNS + 1):  # the first round warms up and is dropped
        for mode in modes:
            app, tracker = apps[mode]
            if mode in ("complete", "restored"):
                interpose(kvmod)  # the runtime interposes while tracking, and restores when done
            try:
                assert [app.get_many(b) for b in get_batches[:3]] == expect
                times[mode, "get"].append(timed(lambda app=app: [app.get_many(b) for b in get_batches]))
                times[mode, "put"].append(timed(lambda app=app: [app.put_many(b) for b in put_batches]))
            finally:
                restore(kvmod)
    rate = {k: BATCH * BATCHES / statistics.median(v[1:]) for k, v in times.items()}
    print(f"{'mode':<10} {'get_many keys/s':>16} {'ratio':>7} {'put_many keys/s':>16} {'ratio':>7}")
    for mode in modes:
        g, p = rate[mode, "get"], rate[mode, "put"]
        print(f"{mode:<10} {g:>16,.0f} {rate['plain', 'get'] / g:>6.2f}x "
              f"{p:>16,.0f} {rate['plain', 'put'] / p:>6.2f}x")
    restored = apps["restored"][1]
    assert restored is not None and restored.demanded == 0 and not restored.complete
    for _, tracker in apps.values():
        if tracker is not None:
            tracker.unguard()
    print("ratio = time per key relative to plain (1.00x = no overhead)")


if __name__ == "__main__":
    main()
