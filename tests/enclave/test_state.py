import hashlib

import numpy as np
import pytest

from constmig.apps.kvstore import KVStore
from constmig.apps.matrix import MatrixApp
from constmig.enclave.app import EnclaveApp, ecall
from constmig.enclave.heap import Heap
from constmig.enclave.state import export_app_state, import_app_state
from constmig.errors import EnclaveError

MiB = 1 << 20


class Toy(EnclaveApp):
    """Small state of every kind: heap arrays, sub-views, nested references, plain arrays, objects."""

    name = "toy"

    def setup(self, **config):
        self.data = self.heap.alloc("data", (1000, 100), np.int64)
        self.vec = self.heap.alloc("vec", 5000, np.float32)
        self.row7 = self.data[7]  # a view inside an allocation
        self.cols = self.data[:, ::3]  # a strided view
        self.frozen = self.heap.array("vec")
        self.frozen.flags.writeable = False
        self.nested = {"arrays": [self.vec, self.data], "n": 3}
        self.small = np.arange(10)  # not in the heap: pickled as is
        self.counter = 0
        self.label = "hello"
        self.heap_again = self.heap

    @ecall
    def fill(self, fraction=0.9, seed=0):
        rng = np.random.default_rng(seed)
        self.data[:] = rng.integers(0, 1 << 40, self.data.shape)
        self.vec[:] = rng.random(self.vec.shape, dtype=np.float32)
        self.counter += 1
        return {}

    @ecall
    def checksum(self):
        h = hashlib.sha256()
        for a in (self.data, self.vec, self.small):
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        h.update(f"{self.counter}:{self.label}".encode())
        return h.hexdigest()


def migrate(app: EnclaveApp, size: int | None = None) -> EnclaveApp:
    """What a migration does: export small state, copy the used chunks, import on a fresh heap."""
    src = app.heap
    blob = export_app_state(app)
    dst = Heap(size or src.size, chunk_size=src.chunk_size)
    for i in src.export_chunks():
        dst.chunk_view(int(i))[:] = src.chunk_view(int(i))
    return import_app_state(type(app), dst, blob)


def test_round_trip_rebinds_heap_arrays():
    app = Toy(Heap(8 * MiB, chunk_size=1 << 16))
    app.setup()
    app.fill(seed=3)
    app.data[7, 0] = 12345
    before = app.checksum()
    new = migrate(app)
    assert new.checksum() == before
    assert new.heap is not app.heap
    for arr in (new.data, new.vec, new.row7, new.cols, new.frozen, *new.nested["arrays"]):
        assert np.shares_memory(arr, new.heap.buf)
    assert not np.shares_memory(new.small, new.heap.buf)
    assert new.row7[0] == 12345 and new.cols.strides == app.cols.strides
    new.data[7, 0] = 1
    assert new.row7[0] == 1 and new.cols[7, 0] == 1  # sub-views alias the new allocation
    assert not new.frozen.flags.writeable and new.data.flags.writeable
    assert new.heap_again is new.heap and new.counter == 1 and new.label == "hello"
    assert new.nested["n"] == 3


def test_kvstore_round_trip():
    app = KVStore(Heap(16 * MiB))
    app.setup(value_size=256)
    app.fill(0.5, seed=1)
    app.put("k", b"v")
    app.delete("fill-3")
    before = app.checksum()
    new = migrate(app)
    assert new.checksum() == before
    assert new.get("k") == b"v" and new.get("fill-3") is None and new.get("fill-4") == app.get("fill-4")
    assert new.stats() == app.stats()
    new.put("after", b"migration")
    assert new.get("after") == b"migration"


def test_matrix_round_trip():
    app = MatrixApp(Heap(8 * MiB))
    app.setup()
    app.fill(0.5, seed=2)
    app.matvec(2)
    before = app.checksum()
    new = migrate(app)
    assert new.checksum() == before
    assert new.matvec(1) == app.matvec(1)


def test_only_allocated_chunks_needed():
    app = KVStore(Heap(16 * MiB))
    app.setup(value_size=64, capacity=1000)
    app.fill(1.0)
    used = app.heap.export_chunks()
    assert 0 < len(used) < app.heap.n_chunks
    assert migrate(app).checksum() == app.checksum()


def test_import_rejects_wrong_app_and_geometry():
    app = Toy(Heap(8 * MiB))
    app.setup()
    blob = export_app_state(app)
    with pytest.raises(EnclaveError, match="toy"):
        import_app_state(KVStore, Heap(8 * MiB), blob)
    with pytest.raises(EnclaveError, match="mismatch"):
        import_app_state(Toy, Heap(16 * MiB), blob)
    with pytest.raises(EnclaveError, match="malformed"):
        import_app_state(Toy, Heap(8 * MiB), b"not a pickle")
    with pytest.raises(EnclaveError, match="malformed"):
        import_app_state(Toy, Heap(8 * MiB), blob[: len(blob) // 2])


def test_export_refuses_array_outside_allocations():
    app = Toy(Heap(8 * MiB))
    app.setup()
    app.stray = app.heap.buf[7 * MiB : 7 * MiB + 10]
    with pytest.raises(EnclaveError, match="outside every allocation"):
        export_app_state(app)


def test_heap_arrays_are_not_copied_into_the_blob():
    app = KVStore(Heap(16 * MiB))
    app.setup()
    app.fill(0.9)
    blob = export_app_state(app)
    assert len(blob) < 4096


def test_state_that_cannot_travel_names_the_attribute():
    """An app keeping a lock (or a file, a socket) in small state: one line saying which attribute."""
    import threading

    with Heap(1 << 20) as heap:
        app = Toy(heap)
        app.setup()
        app.guard = threading.Lock()
        with pytest.raises(EnclaveError, match=r"cannot export state of app 'toy': attribute 'guard' \(lock\) "
                                               r"cannot travel: cannot pickle '_thread.lock' object"):
            export_app_state(app)
