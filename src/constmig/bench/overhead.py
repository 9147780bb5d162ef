"""What each tracker costs an app when no migration is under way: in-process throughput, four ways.

A migration benchmark cannot show this (the trackers are only armed while a migration streams), so it
is measured directly, in this process, on copies of one filled app that differ only in the tracker:

  plain           the app on plain heap arrays (every enclave that is not receiving a migration)
  access          Access Tracker armed and complete: the app holds TrackedArrays, every chunk present;
                  each access pays the fast path (one attribute check). The runtime untracks the app
                  as soon as a stream completes, so this is the cost if that were never done.
  access-stream   the same arrays, with the tracker held in its streaming state (complete = False)
                  although every chunk is present: each access runs the slow path's bookkeeping
                  (which chunks, are they restored) and never waits. This is the per-access tax the
                  app pays while a heap streams in, with the waiting taken out.
  fault           heap fully populated, then registered with userfaultfd for MISSING faults, with a
                  standby pager process (answers any fault with a zero page and counts it; expected 0).
                  This is what the Fault Tracker leaves in place between registration and the end of
                  a stream: the kernel only involves userfaultfd on a missing page, so the expected
                  cost of an armed, fully present heap is nothing, and this checks that it is.

Every copy gets the same bytes, the same small state and the same sequence of work units (same
seeds), so they stay in the same state and every unit must answer the same in every mode (checked:
`answers_match`). Modes are timed round-robin, so noise from other processes hits them alike; the
first round warms up and is dropped. All heaps are populated first (first touch on these VMs is slow
and would otherwise land in whichever mode touches a page first).
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from constmig.apps import load_app
from constmig.bench.stats import spread
from constmig.enclave.app import EnclaveApp
from constmig.enclave.heap import Heap
from constmig.enclave.state import export_app_state, import_app_state
from constmig.enclave.tracker import AccessTracker, interpose, restore

MODES = ("plain", "access", "access-stream", "fault")
MODE_LABELS = {
    "plain": "plain arrays",
    "access": "Access Tracker armed (complete)",
    "access-stream": "Access Tracker, streaming path (all present)",
    "fault": "Fault Tracker armed (all populated)",
}
KV_GETS, KV_PUTS = 100, 10  # one kvstore work unit: single-key calls, as the benchmark's client makes them


@dataclass
class _Copy:
    """One mode's copy of the app and what must be undone when it is dropped."""

    app: EnclaveApp
    heap: Heap
    tracker: AccessTracker | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    faults: int | None = None  # fault mode: faults the standby pager served (set on close)

    def close(self) -> None:
        for fn in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                fn()
        self.cleanup = []
        if not self.heap.closed:
            self.heap.close()


class StandbyPager:
    """A pager process for an armed heap that should never fault: a zero page per fault, counted.

    Why a process: the faulting thread holds the GIL, so no thread of this process could answer.
    Why zero pages are right: a MISSING fault only happens on a page never backed, whose content in
    anonymous memory is zero anyway.
    """

    def __init__(self, uffd: Any) -> None:
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from constmig.bench.overhead import standby_pager_main; "
             "standby_pager_main(int(sys.argv[1]))", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        uffd.send(self.sock)
        self.sock.settimeout(30)
        if self.sock.recv(16) != b"ready\n":
            raise RuntimeError("standby pager did not start")

    def stop(self) -> int:
        """Stop the pager; returns how many faults it served."""
        try:
            self.sock.sendall(b"stop\n")
            data = self.sock.recv(64)
            return int(data.decode().strip() or "0")
        finally:
            self.sock.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def standby_pager_main(fd: int) -> None:
    """Child side of StandbyPager: serve faults with zero pages until told to stop."""
    import select

    from constmig.kernel.uffd import PAGE_SIZE, Userfaultfd

    ctl = socket.socket(fileno=fd)
    uffd = Userfaultfd.receive(ctl)
    ctl.sendall(b"ready\n")
    faults = 0
    poll = select.poll()
    poll.register(uffd.fileno(), select.POLLIN)
    poll.register(ctl.fileno(), select.POLLIN)
    while True:
        ready = {f for f, _ in poll.poll()}
        if uffd.fileno() in ready:
            for addr in uffd.read_faults():
                uffd.zeropage(addr - addr % PAGE_SIZE, PAGE_SIZE)
                faults += 1
        if ctl.fileno() in ready:
            ctl.recv(64)
            ctl.sendall(f"{faults}\n".encode())
            uffd.close()
            return


def _copy(src: EnclaveApp, mode: str) -> _Copy:
    """A copy of `src` on a fresh, fully populated heap, set up the way `mode` says."""
    heap = Heap(src.heap.size, chunk_size=src.heap.chunk_size)
    heap.populate()
    used = src.heap.export_chunks()
    blob = export_app_state(src)
    cls = type(src)
    if mode in ("plain", "fault"):
        for i in used.tolist():
            heap.chunk_view(i)[:] = src.heap.chunk_view(i)
        out = _Copy(import_app_state(cls, heap, blob), heap)
        if mode == "fault":
            _arm_fault(out)
        return out
    tracker = AccessTracker(heap, used, lambda c: None, timeout=30)
    for i in used.tolist():
        tracker.begin_install(i)[:] = src.heap.chunk_view(i)
        tracker.finish_install(i)
    app = import_app_state(cls, heap, blob, wrap=tracker.track)
    if mode == "access-stream":
        tracker.complete = False  # every chunk is there; accesses take the streaming path anyway
    return _Copy(app, heap, tracker)


def _arm_fault(c: _Copy) -> None:
    """Register the (populated) heap for MISSING faults, as the Fault Tracker does, with a pager standing by."""
    from constmig.kernel.uffd import Userfaultfd

    uffd = Userfaultfd.open()
    c.cleanup.append(uffd.close)
    uffd.register_missing(c.heap.address, c.heap.size)
    c.cleanup.append(lambda: uffd.unregister(c.heap.address, c.heap.size))
    pager = StandbyPager(uffd)

    def stop_pager() -> None:
        c.faults = pager.stop()

    c.cleanup.append(stop_pager)


def _unit(app: EnclaveApp, workload: str, seed: int) -> tuple[int, Any]:
    """One unit of work (what the benchmark's client asks for in one or a few calls): (ops, answer)."""
    if workload == "kvstore":
        rng = random.Random(seed)
        n = app.count  # type: ignore[attr-defined]
        answers = []
        for _ in range(KV_GETS):
            answers.append(app.get(f"fill-{rng.randrange(n)}"))  # type: ignore[attr-defined]
        for i in range(KV_PUTS):
            app.put(f"fill-{rng.randrange(n)}", f"put-{seed}-{i}".encode())  # type: ignore[attr-defined]
        return KV_GETS + KV_PUTS, answers
    result = app.step(seed=seed)  # type: ignore[attr-defined]
    ops = result.get("ops", 1) if isinstance(result, dict) else 1
    return int(ops), result


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except ValueError:  # numpy arrays in an answer
        return bool(np.array_equal(a, b))


def measure_workload(workload: str, heap_size: int, rounds: int = 5, round_s: float = 0.4, seed: int = 0,
                     modes: tuple[str, ...] = MODES, fill: float = 0.9) -> dict[str, Any]:
    """Throughput of `workload` in each mode (units/s and ops/s per round), answers cross-checked."""
    cls = load_app(workload)
    src = cls(Heap(heap_size))
    copies: dict[str, _Copy] = {}
    module = sys.modules[cls.__module__]
    try:
        src.setup()
        src.fill(fill, seed)
        for mode in modes:
            copies[mode] = _copy(src, mode)
        src.heap.close()
        # Calibrate on plain: units per round so a round takes about round_s (at least 3 units).
        plain = copies[modes[0]].app
        t0, n_cal = time.perf_counter(), 0
        while time.perf_counter() - t0 < min(0.2, round_s) or n_cal < 2:
            _unit(plain, workload, seed=(1 << 40) + n_cal)
            n_cal += 1
        per_unit = (time.perf_counter() - t0) / n_cal
        units = max(3, int(round_s / per_unit))
        for mode in modes[1:]:  # bring the other copies to the calibrated state
            for i in range(n_cal):
                _unit(copies[mode].app, workload, seed=(1 << 40) + i)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        matches = True
        for r in range(rounds + 1):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            answers: dict[str, list[Any]] = {}
            for mode in order:
                app = copies[mode].app
                tracked = mode.startswith("access")
                if tracked:
                    interpose(module)  # what the runtime does while the Access Tracker is armed
                try:
                    got, ops = [], 0
                    t0 = time.perf_counter()
                    for i in range(units):
                        o, ans = _unit(app, workload, seed=r * units + i)
                        ops += o
                        got.append(ans)
                    dt = time.perf_counter() - t0
                finally:
                    if tracked:
                        restore(module)
                answers[mode] = got
                if r > 0:
                    rates[mode].append(ops / dt)
            ref = answers[modes[0]]
            matches = matches and all(
                len(a) == len(ref) and all(_same(x, y) for x, y in zip(a, ref, strict=True)) for a in answers.values())
        faults = None
        if "fault" in copies:
            copies["fault"].close()
            faults = copies["fault"].faults
        out: dict[str, Any] = {"workload": workload, "heap_bytes": heap_size, "units_per_round": units,
                               "rounds": rounds, "answers_match": matches, "uffd_faults": faults, "modes": {}}
        for mode in modes:
            vals = rates[mode]
            # Each round's rate over plain's in the same round: adjacent in time, so a burst of noise
            # from other processes cancels out; the median over rounds is the figure.
            rel = spread(v / p for v, p in zip(vals, rates[modes[0]], strict=True))
            out["modes"][mode] = {"ops_s": vals, **spread(vals), "relative": rel["median"],
                                  "relative_min": rel["min"], "relative_max": rel["max"]}
        return out
    finally:
        for c in copies.values():
            c.close()
        if not src.heap.closed:
            src.heap.close()


def measure(workloads: list[str], heap_size: int, rounds: int, round_s: float, seed: int = 0,
            fault_problem: str | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """measure_workload for each workload; the fault mode is left out (with the reason) if userfaultfd
    cannot be used here."""
    modes = MODES if fault_problem is None else tuple(m for m in MODES if m != "fault")
    doc: dict[str, Any] = {"heap_bytes": heap_size, "rounds": rounds, "round_s": round_s, "modes": list(modes),
                           "mode_labels": {m: MODE_LABELS[m] for m in modes}, "workloads": []}
    if fault_problem is not None:
        doc["fault_skipped"] = fault_problem
    for w in workloads:
        if progress is not None:
            progress(w)
        doc["workloads"].append(measure_workload(w, heap_size, rounds, round_s, seed, modes))
    return doc
