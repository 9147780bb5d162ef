"""Access Tracker: apps run unchanged on a heap whose chunks are still arriving.

A fake "network" plays source and receiver: it serves demanded chunks by copying them from the source
heap into `begin_install` views, in random order and with small delays, from its own thread.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import constmig.apps.kvstore as kvmod
from constmig.apps.kvstore import KVStore
from constmig.apps.matrix import MatrixApp
from constmig.enclave.app import EnclaveApp, ecall
from constmig.enclave.heap import Heap
from constmig.enclave.state import export_app_state, import_app_state
from constmig.enclave.tracker import (
    AccessTracker,
    TrackedArray,
    interpose,
    key_chunks,
    restore,
    untrack_app,
)
from constmig.errors import MigrationError

MiB = 1 << 20
CHUNK = 64 << 10


class FakeNet:
    """Source plus receiver: demanded chunks are copied in by a server thread, optionally all others too.

    Chunks come from a snapshot of the source heap taken now (the source stops at the handoff; tests
    then run the same operations on it to compute the expected results).
    """

    def __init__(self, src: Heap, *, delay: float = 0.0, serve: bool = True, seed: int = 0) -> None:
        self.snapshot = src.buf.copy()
        self.chunk = src.chunk_size
        self.delay = delay
        self.serve = serve
        self.rng = random.Random(seed)
        self.requests: list[np.ndarray] = []
        self.tracker: AccessTracker | None = None
        self._q: queue.Queue[np.ndarray | None] = queue.Queue()
        self._lock = threading.Lock()
        self._taken = np.zeros(src.n_chunks, dtype=bool)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def request(self, chunks: np.ndarray) -> None:
        assert chunks.dtype == np.int64
        self.requests.append(chunks.copy())
        if self.serve:
            self._q.put(chunks.copy())

    def attach(self, tracker: AccessTracker) -> FakeNet:
        self.tracker = tracker
        self._start(self._demand_loop)
        return self

    def stream_rest(self) -> None:
        """Background streaming of every expected chunk, in random order."""
        assert self.tracker is not None
        order = np.flatnonzero(self.tracker.missing).tolist()
        self.rng.shuffle(order)
        self._start(lambda: [self._install(i) for i in order if not self._stop.is_set()])

    def finish(self, timeout: float = 10.0) -> None:
        """Stream everything left and wait until the tracker is complete."""
        self.stream_rest()
        deadline = time.monotonic() + timeout
        while not self.tracker.complete:
            assert time.monotonic() < deadline, "tracker never completed"
            time.sleep(0.005)

    @property
    def requested(self) -> np.ndarray:
        return np.concatenate(self.requests) if self.requests else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        self._stop.set()
        self._q.put(None)
        for t in self._threads:
            t.join(5)

    def _start(self, fn: Callable[[], Any]) -> None:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        self._threads.append(t)

    def _demand_loop(self) -> None:
        while True:
            chunks = self._q.get()
            if chunks is None:
                return
            order = chunks.tolist()
            self.rng.shuffle(order)
            for i in order:
                self._install(i)

    def _install(self, i: int) -> None:
        with self._lock:
            if self._taken[i]:
                return
            self._taken[i] = True
        if self.delay:
            time.sleep(self.delay * self.rng.random())
        assert self.tracker is not None
        view = self.tracker.begin_install(i)
        view[:] = self.snapshot[i * self.chunk : (i + 1) * self.chunk]
        self.tracker.finish_install(i)


class Migration:
    """A post-copy migration of `app` frozen right after resume: nothing of the heap has arrived yet."""

    def __init__(self, app: EnclaveApp, *, delay: float = 0.0005, serve: bool = True, guard: bool = False,
                 timeout: float = 10.0, seed: int = 0) -> None:
        self.src_app = app
        src = app.heap
        blob = export_app_state(app)
        self.expected = src.export_chunks()
        self.heap = Heap(src.size, chunk_size=src.chunk_size)
        self.net = FakeNet(src, delay=delay, serve=serve, seed=seed)
        self.tracker = AccessTracker(self.heap, self.expected, self.net.request, timeout=timeout)
        self.net.attach(self.tracker)
        if guard:
            self.tracker.guard()
        self.app = import_app_state(type(app), self.heap, blob, wrap=self.tracker.track)

    def close(self) -> None:
        self.net.close()
        self.tracker.fail("test over")
        self.tracker.unguard()
        self.heap.close()


def kv_source(capacity: int = 4000, value_size: int = 1024) -> KVStore:
    app = KVStore(Heap(8 * MiB, chunk_size=CHUNK))
    app.setup(capacity=capacity, value_size=value_size)
    app.fill(0.9, seed=1)
    app.put("hello", b"world")
    app.put(b"bin\x00key", bytearray(b"\x01\x02"))
    return app


@pytest.fixture
def kv() -> Iterator[Migration]:
    mig = Migration(kv_source(), guard=True)
    interpose(kvmod)
    yield mig
    restore(kvmod)
    mig.close()
    mig.src_app.heap.close()


# -- apps, unchanged ---------------------------------------------------------------------------------


def test_kvstore_runs_unchanged_while_chunks_arrive(kv):
    src, app, t = kv.src_app, kv.app, kv.tracker
    assert isinstance(app.values, TrackedArray) and isinstance(app.state, TrackedArray)
    assert not t.complete and t.remaining == kv.expected.size
    assert app.get("hello") == b"world"
    assert app.get(b"bin\x00key") == b"\x01\x02"
    assert app.get("absent") is None
    keys = [f"fill-{i}" for i in range(0, 3600, 37)] + ["hello", "nope"]
    assert app.get_many(keys) == src.get_many(keys)
    assert app.stats() == src.stats()
    assert not t.complete, "a few gets must not pull the whole heap"
    assert app.checksum() == src.checksum()  # reads every array: everything arrives
    assert t.complete and t.remaining == 0
    requested = kv.net.requested
    assert np.unique(requested).size == requested.size, "a chunk was requested twice"
    assert set(requested.tolist()) <= set(kv.expected.tolist())
    assert t.demanded == requested.size and len(t.latencies) >= 1
    assert all(lat >= 0 for lat in t.latencies)


def test_single_get_demands_only_the_chunks_it_touches(kv):
    t = kv.tracker
    assert kv.app.get("fill-123") == kv.src_app.get("fill-123")
    assert 1 <= t.demanded <= 6, f"one get demanded {t.demanded} of {kv.expected.size} chunks"
    src = kv.src_app
    match = (src.keys[:, :8].view("<u8")[:, 0] == int.from_bytes(b"fill-123", "little")) & (src.klen == 8)
    slot = int(np.flatnonzero(match)[0])
    values_chunk = (kv.app.values.__array_interface__["data"][0] + slot * kv.app.value_size - kv.heap.address) // CHUNK
    assert values_chunk in kv.net.requested.tolist()
    assert t.remaining >= kv.expected.size - 6


def test_writes_wait_for_their_chunk_and_survive_the_install(kv):
    src, app = kv.src_app, kv.app
    for a in (src, app):
        a.put("hello", b"again")  # overwrite
        a.put("new-key", b"v" * 100)  # insert
        assert a.delete("fill-77")
        a.put_many([[f"fill-{i}", bytes([i % 256]) * 10] for i in range(500, 520)])
    assert app.get("hello") == b"again" and app.get("fill-77") is None
    assert not kv.tracker.complete
    kv.net.finish()  # every other chunk streams in now, in random order
    assert app.checksum() == src.checksum()
    assert app.get_many(["new-key", "fill-510", "fill-78"]) == src.get_many(["new-key", "fill-510", "fill-78"])


def test_a_write_to_a_missing_chunk_is_not_overwritten_later():
    heap = Heap(MiB, chunk_size=CHUNK)
    src = Heap(MiB, chunk_size=CHUNK)
    a_src = src.alloc("a", 100_000, np.int64)
    a_src[:] = np.arange(100_000)
    heap.alloc("a", 100_000, np.int64)
    net = FakeNet(src, delay=0.01)
    t = AccessTracker(heap, src.export_chunks(), net.request, timeout=5)
    net.attach(t)
    a = t.track(heap.array("a"))
    a[50_000] = -1
    a[60_000:60_010] = -2
    a[np.array([[70_000, 70_001], [-1, -2]])] = -3
    chunks = {(50_000 * 8) // CHUNK, (60_000 * 8) // CHUNK, (70_000 * 8) // CHUNK, (99_999 * 8) // CHUNK}
    assert set(net.requested.tolist()) == chunks
    net.finish()
    expect = np.arange(100_000)
    expect[50_000] = -1
    expect[60_000:60_010] = -2
    expect[[70_000, 70_001, -1, -2]] = -3
    assert np.array_equal(np.asarray(a), expect)
    net.close()


def test_matrix_app_runs_unchanged():
    app = MatrixApp(Heap(8 * MiB, chunk_size=CHUNK))
    app.setup(n=600)
    app.fill(0.5, seed=2)
    mig = Migration(app, guard=True)
    interpose(sys.modules[MatrixApp.__module__])
    try:
        new, t = mig.app, mig.tracker
        assert new.get(3, 4) == app.get(3, 4)
        assert new.row_sum(500) == app.row_sum(500)
        assert t.demanded <= 3, "one element and one row need at most a chunk or two each"
        for a in (app, new):
            a.set(7, 7, 42.0)
        assert new.matvec(2) == app.matvec(2)
        assert t.complete and new.checksum() == app.checksum()
    finally:
        restore(sys.modules[MatrixApp.__module__])
        mig.close()
        app.heap.close()


def test_concurrent_app_threads_share_demands(kv):
    kv.net.delay = 0.003
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(5):
                keys = [f"fill-{int(i)}" for i in rng.integers(0, 3600, 20)]
                assert kv.app.get_many(keys) == kv.src_app.get_many(keys)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors
    requested = kv.net.requested
    assert np.unique(requested).size == requested.size, "a chunk was requested twice"


# -- failure -----------------------------------------------------------------------------------------


def test_fail_wakes_a_waiting_access_and_refuses_later_ones():
    mig = Migration(kv_source(), serve=False)
    interpose(kvmod)
    caught: list[BaseException] = []

    def access() -> None:
        try:
            mig.app.get("hello")
        except BaseException as e:  # noqa: BLE001 - checked below
            caught.append(e)

    th = threading.Thread(target=access)
    th.start()
    deadline = time.monotonic() + 5
    while mig.tracker.demanded == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.02)
    assert th.is_alive(), "the access should be waiting"
    mig.tracker.fail("source vanished")
    th.join(5)
    try:
        assert len(caught) == 1 and isinstance(caught[0], MigrationError)
        assert "source vanished" in str(caught[0]) and "\n" not in str(caught[0])
        with pytest.raises(MigrationError, match="source vanished"):
            mig.app.get_many(["fill-1"])
        with pytest.raises(MigrationError, match="source vanished"):
            mig.tracker.ensure_range(0, 1)
    finally:
        restore(kvmod)
        mig.close()
        mig.src_app.heap.close()


def test_timeout_raises():
    mig = Migration(kv_source(), serve=False, timeout=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match=r"timed out after 0\.2 s"):
            mig.app.values[5].sum()
        assert 0.2 <= time.monotonic() - t0 < 3
        assert mig.tracker.demanded == 1
        with pytest.raises(MigrationError, match="timed out"):  # requested once, waits again
            mig.app.values[5].sum()
        assert mig.tracker.demanded == 1
        assert mig.tracker.outstanding().tolist() == mig.net.requested.tolist()
    finally:
        mig.close()
        mig.src_app.heap.close()


def test_a_failing_request_fails_the_tracker():
    heap = Heap(MiB, chunk_size=CHUNK)

    def request(chunks: np.ndarray) -> None:
        raise OSError("link down")

    t = AccessTracker(heap, np.arange(4), request, timeout=5)
    a = t.track(heap.alloc("a", 1000, np.int64))
    with pytest.raises(MigrationError, match="link down"):
        a.sum()
    assert t.failed and "link down" in t.failed
    with pytest.raises(MigrationError, match="link down"):
        a[900]


def test_ensure_range_and_chunks_demand_exactly_the_missing_chunks():
    src = Heap(MiB, chunk_size=CHUNK)
    src.buf[:] = 7
    net = FakeNet(src, delay=0.002)
    t = AccessTracker(Heap(MiB, chunk_size=CHUNK), np.arange(2, 12), net.request, timeout=5)
    net.attach(t)
    t.ensure_range(0, 2 * CHUNK)  # chunks 0 and 1 were never expected: nothing to wait for
    t.ensure_range(3 * CHUNK - 1, 4 * CHUNK + 1)  # chunks 2, 3, 4
    t.ensure_chunks(np.array([4, 9, 9, 2, 10]))
    assert [r.tolist() for r in net.requests] == [[2, 3, 4], [9, 10]]
    assert t.demanded == 5 and len(t.latencies) == 5 and t.stalls == 2
    assert t.outstanding().size == 0 and t.remaining == 5
    assert bytes(t.heap.chunk_view(9)[:3]) == b"\x07\x07\x07"
    net.close()


def test_installer_misuse_is_refused():
    heap = Heap(MiB, chunk_size=CHUNK)
    t = AccessTracker(heap, np.array([1, 2]), lambda c: None)
    with pytest.raises(MigrationError, match="not awaited"):
        t.begin_install(0)
    with pytest.raises(MigrationError, match="out of range"):
        t.begin_install(16)
    with pytest.raises(MigrationError, match="begin_install first"):
        t.finish_install(1)
    t.begin_install(1)
    with pytest.raises(MigrationError, match="being installed"):
        t.begin_install(1)
    t.abort_install(1)
    t.abort_install(1)  # harmless twice (error paths)
    assert t.missing[1]
    view = t.begin_install(1)
    view[:] = b"\x07" * CHUNK
    t.finish_install(1)
    with pytest.raises(MigrationError, match="not awaited"):
        t.begin_install(1)
    assert not t.complete and t.remaining == 1
    with pytest.raises(MigrationError, match="outside"):
        AccessTracker(heap, np.array([16]), lambda c: None)
    with pytest.raises(MigrationError, match="outside"):
        t.ensure_chunks(np.array([-1]))


# -- back to plain arrays ------------------------------------------------------------------------------


class Nested(EnclaveApp):
    name = "nested"

    def setup(self, **config: Any) -> None:
        self.data = self.heap.alloc("data", (100, 50), np.int64)
        self.frozen = self.heap.array("data")
        self.frozen.flags.writeable = False
        self.row = self.data[3]
        self.in_list = [self.data, 5]
        self.in_dict = {"v": self.data[:, ::2], "n": 1}
        self.in_tuple = (self.data, "x")
        self.outside = np.arange(10)
        self.counter = 0

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        self.data[:] = np.random.default_rng(seed).integers(0, 1 << 40, self.data.shape)
        return {}

    @ecall
    def checksum(self) -> str:
        return hashlib.sha256(self.data.tobytes()).hexdigest()


def test_wrap_applies_to_every_heap_array_and_untrack_restores_plain_ones():
    app = Nested(Heap(MiB, chunk_size=CHUNK))
    app.setup()
    app.fill(seed=4)
    mig = Migration(app)
    new = mig.app
    tracked = [new.data, new.frozen, new.row, new.in_list[0], new.in_dict["v"], new.in_tuple[0]]
    assert all(type(x) is TrackedArray for x in tracked)
    assert type(new.outside) is np.ndarray
    assert not new.frozen.flags.writeable and new.data.flags.writeable
    with pytest.raises(MigrationError, match="missing"):
        mig.tracker.untrack_app(new)
    assert new.checksum() == app.checksum()
    assert new.row[7] == app.row[7] and np.array_equal(new.in_dict["v"], app.in_dict["v"])
    mig.net.finish()
    assert mig.tracker.untrack_app(new) == 6
    plain = [new.data, new.frozen, new.row, new.in_list[0], new.in_dict["v"], new.in_tuple[0]]
    assert all(type(x) is np.ndarray for x in plain)
    assert all(np.shares_memory(x, mig.heap.buf) for x in plain)
    assert not new.frozen.flags.writeable and new.in_list[1] == 5 and new.in_tuple[1] == "x"
    assert untrack_app(new) == 0
    new.data[3, 0] = -9
    assert new.row[0] == -9
    mig.close()
    app.heap.close()


def test_import_without_wrap_is_unchanged():
    app = Nested(Heap(MiB, chunk_size=CHUNK))
    app.setup()
    new = import_app_state(Nested, Heap(MiB, chunk_size=CHUNK), export_app_state(app))
    assert type(new.data) is np.ndarray and type(new.row) is np.ndarray


# -- numpy operations on a tracked array -----------------------------------------------------------------


Arrays = tuple[dict[str, np.ndarray], dict[str, np.ndarray], AccessTracker, FakeNet]


@pytest.fixture
def arrays() -> Iterator[Callable[[], Arrays]]:
    """Factory: (source arrays, tracked arrays with every chunk missing, tracker, net)."""
    made: list[tuple[FakeNet, Heap, Heap]] = []

    def make() -> Arrays:
        rng = np.random.default_rng(5)
        src, dst = Heap(MiB, chunk_size=CHUNK), Heap(MiB, chunk_size=CHUNK)
        specs = {"m": ((100, 300), np.float64), "v": (300, np.float64), "i": (2000, np.int64)}
        s = {k: src.alloc(k, shape, dt) for k, (shape, dt) in specs.items()}
        s["m"][:] = rng.random(s["m"].shape)
        s["v"][:] = rng.random(300)
        s["i"][:] = rng.integers(-1000, 1000, 2000)
        net = FakeNet(src)
        t = AccessTracker(dst, src.export_chunks(), net.request, timeout=5)
        net.attach(t)
        d = {k: t.track(dst.alloc(k, shape, dt)) for k, (shape, dt) in specs.items()}
        made.append((net, src, dst))
        return s, d, t, net

    yield make
    for net, src, dst in made:
        net.close()
        src.close()
        dst.close()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if type(a) is TrackedArray:  # a view into the heap: checked when read, as here
            a = np.ndarray.view(a.copy(), np.ndarray)
        return type(a) is type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


READS: dict[str, Callable[[dict[str, np.ndarray]], Any]] = {
    "sum": lambda a: a["m"].sum(),
    "mean axis": lambda a: a["m"].mean(axis=0),
    "max": lambda a: a["m"].max(),
    "min axis": lambda a: a["m"].min(axis=1),
    "any": lambda a: a["i"].any(),
    "all": lambda a: a["i"].all(),
    "argmax": lambda a: a["m"].argmax(),
    "argmin": lambda a: a["v"].argmin(),
    "dot": lambda a: a["m"].dot(a["v"]),
    "matmul": lambda a: a["m"] @ a["v"],
    "np.dot": lambda a: np.dot(a["m"], a["v"]),
    "tobytes": lambda a: a["m"].tobytes(),
    "tolist": lambda a: a["v"].tolist(),
    "item flat": lambda a: a["m"].item(2345),
    "item tuple": lambda a: a["m"].item((70, 4)),
    "item args": lambda a: a["m"].item(70, 4),
    "copy": lambda a: a["m"].copy(),
    "astype": lambda a: a["i"].astype(np.float32),
    "iter": lambda a: list(a["v"]),
    "iter rows": lambda a: [r.sum() for r in a["m"]],
    "bytes": lambda a: bytes(a["v"]),
    "repr": lambda a: repr(a["v"]),
    "str": lambda a: str(a["m"]),
    "format": lambda a: f"{a['v'][3:4]}",
    "format 0-d": lambda a: f"{a['v'][3, ...]:.3f}",
    "np.sum": lambda a: np.sum(a["m"]),
    "concatenate": lambda a: np.concatenate([a["v"], a["v"][::-1]]),
    "block": lambda a: np.block([[a["v"][:2], a["v"][5:7]]]),
    "ufunc": lambda a: a["m"] + 1,
    "compare": lambda a: a["i"] > 3,
    "reduce": lambda a: np.add.reduce(a["i"]),
    "int row": lambda a: a["m"][70],
    "int row sum": lambda a: a["m"][70].sum(),
    "scalar": lambda a: a["m"][70, 4],
    "negative": lambda a: a["i"][-3],
    "fancy": lambda a: a["m"][[1, 50, 99]],
    "fancy 2d": lambda a: a["i"][np.array([[1, 1500], [-1, 700]])],
    "fancy tuple": lambda a: a["m"][np.array([3, 80]), 5:9],
    "mask": lambda a: a["v"][a["v"] > 0.5],
    "column": lambda a: a["m"][:, 5].copy(),
    "transpose copy": lambda a: a["m"].T.copy(),
    "strided": lambda a: a["m"][::-1, ::3].sum(),
    "take": lambda a: a["i"].take([1, 1999]),
    "sort": lambda a: np.sort(a["v"]),
    "cumsum": lambda a: a["v"].cumsum(),
    "flatten": lambda a: a["m"].flatten(),
    "ravel copy": lambda a: a["m"].T.ravel(),
    "ravel view": lambda a: a["m"].ravel()[12345],
    "reshape copy": lambda a: a["m"][:, :7].reshape(-1),
    "reshape strided view": lambda a: a["m"][:, ::2].reshape(-1)[777],
    "reshape view": lambda a: a["m"].reshape(300, 100)[250].copy(),
    "np.reshape": lambda a: np.reshape(a["v"], (30, 10)),
    "float": lambda a: float(a["v"][3, ...]),
    "int": lambda a: int(a["i"][7, ...]),
    "index": lambda a: [0, 1, 2][a["i"][7, ...] % 3],
    "bool": lambda a: bool(a["i"][9, ...]),
    "bool 1-elt": lambda a: bool(a["i"][9:10]),
    "contains": lambda a: a["v"][5].item() in a["v"],
    "round": lambda a: a["v"].round(2),
    "clip": lambda a: a["v"].clip(0.2, 0.8),
    "norm": lambda a: np.linalg.norm(a["m"]),
    "std": lambda a: a["v"].std(),
    "where": lambda a: np.where(a["v"] > 0.5, a["v"], 0),
    "unique": lambda a: np.unique(a["i"]),
    "view plain": lambda a: a["v"].view(np.ndarray).sum(),
    "view dtype": lambda a: a["v"].view(np.int64)[3],
    "flat": lambda a: a["m"].flat[777],
    "pickle": lambda a: pickle.loads(pickle.dumps(a["m"])),
    "deepcopy": lambda a: copy.deepcopy(a["v"]),
    "searchsorted": lambda a: np.sort(a["v"]).searchsorted(0.5),
    "nonzero": lambda a: a["i"].nonzero(),
    "memoryview data": lambda a: bytes(a["v"].data),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_reads_see_the_source_bytes(arrays, name):
    s, d, t, _ = arrays()
    got = READS[name](d)
    want = READS[name](s)
    assert _same(got, want), f"{name}: {got!r} != {want!r}"
    assert t.demanded > 0


WRITES: dict[str, Callable[[dict[str, np.ndarray]], Any]] = {
    "fill": lambda a: a["v"].fill(3.0),
    "slice": lambda a: a["v"].__setitem__(slice(10, 20), 1.0),
    "scalar": lambda a: a["m"].__setitem__((70, 4), -1.0),
    "row": lambda a: a["m"].__setitem__(70, a["v"]),
    "fancy": lambda a: a["i"].__setitem__(np.array([1, 1500, -1]), 9),
    "mask": lambda a: a["m"].__setitem__(a["m"] > 0.9, 0.0),
    "transposed": lambda a: a["m"].T.__setitem__(3, 0.0),
    "iadd": lambda a: a["m"].__iadd__(1),
    "ufunc out": lambda a: np.add(a["v"], 1, out=a["v"]),
    "ufunc at": lambda a: np.add.at(a["i"], [1, 1, 1999], 1),
    "sort": lambda a: a["v"].sort(),
    "put": lambda a: a["i"].put([3, 1900], [7, 7]),
    "copyto": lambda a: np.copyto(a["v"], a["m"][5]),
    "flat set": lambda a: setattr(a["v"], "flat", 4.0),
    "list value": lambda a: a["m"].__setitem__(slice(0, 2), [a["v"], a["v"]]),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_writes_land_after_the_chunk_and_stay(arrays, name):
    s, d, t, net = arrays()
    got = WRITES[name](d)
    want = WRITES[name](s)
    if isinstance(want, np.ndarray):
        assert got is d["v"] or got is d["m"], "out= must give back the caller's own array"
    net.finish()
    for k in s:
        assert np.array_equal(np.asarray(d[k]), s[k]), f"{name}: {k} differs"


def test_results_are_plain_except_views(arrays):
    s, d, t, _ = arrays()
    m = d["m"]
    assert type(m[3]) is TrackedArray and type(m[2:5]) is TrackedArray and type(m.T) is TrackedArray
    assert type(m[..., 3]) is TrackedArray and type(m.reshape(-1)) is TrackedArray
    assert t.demanded == 0, "making views reads nothing"
    assert type(m[[1, 2]]) is np.ndarray and type(m[m[:, 0] > 0.5]) is np.ndarray
    assert type(m + 1) is np.ndarray and type(np.sum(m, axis=0)) is np.ndarray
    assert type(m[3, 4]) is np.float64 and type(m.copy()) is np.ndarray
    assert type(m.imag) is TrackedArray and not np.shares_memory(m.imag, m)
    assert m.imag.sum() == 0  # fresh zeros, not heap memory: nothing to wait for
    t2 = AccessTracker(Heap(MiB, chunk_size=CHUNK), np.zeros(0, dtype=np.int64), lambda c: None)
    assert t2.complete


# -- index -> chunks, against brute force ----------------------------------------------------------------

_HEAP = Heap(2 * MiB, chunk_size=CHUNK)
_TRACKER = AccessTracker(_HEAP, np.arange(_HEAP.n_chunks), lambda c: None, timeout=0.5)  # nothing arrives


@st.composite
def view_and_key(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, Any]:
    dtype = np.dtype(draw(st.sampled_from(["u1", "i2", "f4", "f8", "c16"])))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 60), min_size=ndim, max_size=ndim)))
    nbytes = int(np.prod(shape)) * dtype.itemsize
    assume(nbytes <= _HEAP.size)
    offset = draw(st.integers(0, _HEAP.size - nbytes)) // dtype.itemsize * dtype.itemsize
    base = np.ndarray(shape, dtype=dtype, buffer=_HEAP.buf, offset=offset)
    view = base[tuple(slice(None, None, draw(st.sampled_from([1, 2, -1, -3]))) for _ in shape)]
    if draw(st.booleans()):
        view = view.transpose(draw(st.permutations(range(ndim))))
    addr = np.zeros(view.shape, dtype=np.int64) + (view.__array_interface__["data"][0] - _HEAP.address)
    for ax, (n, s) in enumerate(zip(view.shape, view.strides, strict=True)):
        addr += (np.arange(n) * s).reshape((n,) + (1,) * (view.ndim - ax - 1))
    n0 = view.shape[0]
    row = st.integers(-n0, n0 - 1)
    first = draw(st.one_of(
        row,
        row.map(np.int32),
        st.lists(row, min_size=0, max_size=6).flatmap(
            lambda xs: st.sampled_from([np.array(xs, dtype=np.int64), np.array(xs, dtype=np.intp).reshape(-1, 1)])
        ),
    ))
    rest = [draw(st.one_of(st.integers(-n, n - 1), st.just(slice(None)), st.just(slice(1, None, 2))))
            for n in view.shape[1:draw(st.integers(1, view.ndim))]]
    key = (first, *rest) if rest or draw(st.booleans()) else first
    return view, addr, key  # plain: hypothesis may print it


def _chunks_of(lo: np.ndarray, hi: np.ndarray) -> set[int]:
    out: set[int] = set()
    for a, b in zip((lo // CHUNK).tolist(), ((hi - 1) // CHUNK).tolist(), strict=True):
        out.update(range(a, b + 1))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(view_and_key())
def test_key_chunks_match_brute_force(case):
    plain, addr, key = case
    arr = _TRACKER.track(plain)
    item = arr.itemsize
    result = plain[key]
    first = key[0] if isinstance(key, tuple) else key
    rows = np.unique(np.arange(arr.shape[0])[first])
    by_rows = _chunks_of(np.array([addr[r].min() for r in rows.tolist()], dtype=np.int64),
                         np.array([addr[r].max() + item for r in rows.tolist()], dtype=np.int64))
    touched = addr[key]  # the element addresses the access reads or writes
    by_elements = _chunks_of(np.ravel(touched), np.ravel(touched) + item)
    read = set(key_chunks(arr, key).tolist())
    write = set(key_chunks(arr, key, write=True).tolist())
    parts = key if isinstance(key, tuple) else (key,)
    if isinstance(result, np.ndarray) and not any(isinstance(k, np.ndarray) for k in parts):  # basic: a view
        assert read == set(), "a view reads nothing when made"
        view_chunks = set(key_chunks(arr[key], Ellipsis, write=True).tolist())
        assert by_elements <= view_chunks <= by_rows
    else:
        assert read == by_rows
    assert by_elements <= write <= by_rows


def test_rows_longer_than_a_chunk():
    base = _HEAP.alloc("long_rows", (4, 40_000), np.float64)  # 320 KB rows: 5 or 6 chunks each
    try:
        arr = _TRACKER.track(base)
        off = base.__array_interface__["data"][0] - _HEAP.address

        def row(r: int) -> list[int]:
            return list(range((off + r * 320_000) // CHUNK, (off + (r + 1) * 320_000 - 1) // CHUNK + 1))

        assert key_chunks(arr, 1).tolist() == []  # a row view: checked when used
        assert key_chunks(arr, 1, write=True).tolist() == row(1)
        assert key_chunks(arr, np.array([3, 1])).tolist() == sorted(set(row(1) + row(3)))
        many = np.array([3, 1] * 20)  # more chunk entries than the heap has chunks: counted with a bincount
        assert key_chunks(arr, many).tolist() == sorted(set(row(1) + row(3)))
        assert key_chunks(arr, (np.array([-1]), 5)).tolist() == row(3)
        # a "row" of the transpose is a column: its span runs from the first to the last row of `base`
        assert key_chunks(arr.T, (7, np.array([0, 2]))).tolist() == list(
            range((off + 56) // CHUNK, (off + 3 * 320_000 + 63) // CHUNK + 1)
        )
    finally:
        _HEAP.free("long_rows")


def test_conservative_keys_cover_the_whole_array(arrays):
    _, d, t, _ = arrays()
    m = d["m"]
    lo = (m.__array_interface__["data"][0] - t.heap.address) // CHUNK
    hi = (m.__array_interface__["data"][0] + m.nbytes - 1 - t.heap.address) // CHUNK
    whole = list(range(lo, hi + 1))
    assert key_chunks(m, np.ones(100, dtype=bool)).tolist() == whole
    assert key_chunks(m, [1, 2]).tolist() == whole
    assert key_chunks(m, (slice(None), np.array([1]))).tolist() == whole
    assert key_chunks(m, (Ellipsis, 3)).tolist() == []  # a view
    assert key_chunks(m, 1000).tolist() == []  # out of range: numpy raises before reading
    with pytest.raises(IndexError):
        m[1000]
    assert t.demanded == 0


# -- interposed builtins -------------------------------------------------------------------------------

APP_MODULE = '''
import hashlib

def as_bytes(x):
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, bytes | bytearray | memoryview):
        return bytes(x)
    raise TypeError(type(x).__name__)

def digest(a):
    return hashlib.sha256(memoryview(a).cast("B")).hexdigest()

def copies(a):
    return bytes(a), bytearray(a), bytes.fromhex("00ff"), issubclass(bytearray, bytes | bytearray)
'''


def test_interpose_ensures_buffer_reads_and_keeps_isinstance(arrays):
    s, d, t, _ = arrays()
    mod = types.ModuleType("fake_app")
    exec(APP_MODULE, vars(mod))  # noqa: S102 - test module source
    interpose(mod)
    interpose(mod)  # idempotent
    try:
        for x in (b"ab", bytearray(b"ab"), memoryview(b"ab"), "ab"):
            assert mod.as_bytes(x) == b"ab" and type(mod.as_bytes(x)) is bytes
        with pytest.raises(TypeError):
            mod.as_bytes(3)
        assert isinstance(b"x", mod.bytes) and not isinstance("x", mod.bytes) and mod.bytes is not bytes
        assert mod.digest(d["m"]) == hashlib.sha256(s["m"].tobytes()).hexdigest()
        assert t.demanded > 0
        b, ba, fx, sub = mod.copies(d["i"])
        assert b == s["i"].tobytes() and ba == bytearray(s["i"].tobytes()) and type(ba) is bytearray
        assert fx == b"\x00\xff" and sub
    finally:
        restore(mod)
    assert "bytes" not in vars(mod) and "memoryview" not in vars(mod)
    restore(mod)  # harmless twice


def test_interpose_leaves_a_modules_own_names_alone():
    mod = types.ModuleType("own")
    mine = object()
    mod.bytes = mine
    interpose(mod)
    assert mod.bytes is mine and "memoryview" in vars(mod)
    restore(mod)
    assert mod.bytes is mine and "memoryview" not in vars(mod)


# -- the tripwire ---------------------------------------------------------------------------------------


def test_guard_coalesces_runs_into_single_mprotect_calls():
    heap = Heap(MiB, chunk_size=CHUNK)
    t = AccessTracker(heap, np.array([1, 2, 3, 7, 9, 10]), lambda c: None)
    assert t.guard() == 3
    view = t.begin_install(2)  # writable again while being installed
    view[:5] = b"hello"
    t.finish_install(2)
    assert bytes(heap.chunk_view(2)[:5]) == b"hello"
    assert t.unguard() == 4  # [1], [3], [7], [9, 10]: the installed chunk splits the first run
    heap.close()


def test_guarded_heap_tracked_access_works_in_process(kv):
    # The kv fixture guards every missing chunk: any untracked read in kvstore would kill this process.
    assert kv.tracker._guarded
    assert kv.app.get_many(["fill-1", "fill-2000", "hello"]) == kv.src_app.get_many(["fill-1", "fill-2000", "hello"])
    assert kv.app.checksum() == kv.src_app.checksum()


CHILD = """
import ctypes, sys
import numpy as np
from constmig.enclave.heap import Heap
from constmig.enclave.tracker import AccessTracker
CHUNK = 64 << 10
heap = Heap(1 << 20, chunk_size=CHUNK)
t = AccessTracker(heap, np.array([2, 3, 4, 8]), lambda c: None, timeout=1)
t.guard()
a = t.track(heap.alloc("a", (1 << 20) // 8, np.int64))
view = t.begin_install(3)
view[:] = b"\\x01" * CHUNK
{install}
assert a[0] == 0  # chunk 0 was never expected: readable
assert a[3 * CHUNK // 8] == 0x0101010101010101  # installed chunk through tracking
print("tracked ok", flush=True)
{escape}
print("escaped without a fault", flush=True)
"""

ESCAPES = {
    "memmove": "ctypes.memmove(ctypes.create_string_buffer(8), heap.address + 2 * CHUNK, 8)",
    "memoryview": "bytes(memoryview(a)[4 * CHUNK // 8 : 4 * CHUNK // 8 + 1])",
    "asarray": "int(np.asarray(a)[8 * CHUNK // 8])",
    "write": "heap.buf[2 * CHUNK] = 1",
    "aborted install": "t.begin_install(4); t.abort_install(4); heap.buf[4 * CHUNK + 5]",
}


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_escaped_access_to_a_guarded_chunk_faults(escape):
    code = CHILD.format(install="t.finish_install(3)", escape=ESCAPES[escape])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "tracked ok" in proc.stdout, proc.stderr
    assert "escaped without a fault" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)


def test_installed_chunk_is_not_guarded_in_a_child():
    code = CHILD.format(install="t.finish_install(3)", escape="bytes(heap.chunk_view(3)[:8]); heap.buf[0]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "escaped without a fault" in proc.stdout, proc.stderr
