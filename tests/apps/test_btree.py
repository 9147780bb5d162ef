import bisect
import random

import numpy as np
import pytest

from constmig.apps.btree import BTree, _levels
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError, EnclaveError

MiB = 1 << 20


def make(size: int = 4 * MiB, chunk: int = 1 << 20, **config) -> BTree:
    app = BTree(Heap(size, chunk_size=chunk))
    app.setup(**config)
    return app


def all_items(app: BTree) -> list[tuple[int, int]]:
    """Every (key, value) in key order, read leaf by leaf through the directory."""
    out = []
    for p in range(app.n_dir):
        leaf = int(app.dirleaf[p])
        n = int(app.cnt[leaf])
        out += list(zip(app.keys[leaf, :n].tolist(), app.vals[leaf, :n].tolist(), strict=True))
    return out


def test_sizing_fills_the_heap():
    app = make(16 * MiB)
    assert app.heap.free_bytes < 64 * 1024
    assert app.capacity * app.fanout * 16 > 0.95 * 16 * MiB
    small = make(leaves=10, fanout=8)
    assert small.capacity == 10 and small.dir_size == 16
    assert small.stats()["count"] == 0 and small.lookup(5) is None


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown btree option 'fanuot'"):
        make(fanuot=3)
    with pytest.raises(ConfigError, match="fanout"):
        make(fanout=4)
    with pytest.raises(ConfigError, match="at most"):
        make(leaves=10**7)
    with pytest.raises(ConfigError):
        make(leaves=True)
    with pytest.raises(ConfigError, match="too small"):
        make(64 * 1024, chunk=64 * 1024, fanout=4096)


def test_inserts_match_a_sorted_model_through_splits():
    app = make(leaves=300, fanout=8)
    assert len(_levels(app.dir_size, 8)) == 2  # directory, two inner levels
    rng = random.Random(1)
    model: dict[int, int] = {}
    for _ in range(900):
        k, v = rng.randrange(5000), rng.randrange(1 << 63)
        assert app.insert(k, v) == (k not in model)
        model[k] = v
    assert app.stats()["count"] == len(model) and app.n_leaves > 100
    assert all_items(app) == sorted(model.items())
    for k in range(0, 5100, 7):
        assert app.lookup(k) == model.get(k)
    keys = sorted(model)
    for lo, hi in [(0, 5000), (10, 11), (100, 2000), (4999, 10**6), (300, 300), (7, 3)]:
        sel = keys[bisect.bisect_left(keys, lo) : bisect.bisect_left(keys, hi)] if hi > lo else []
        assert app.range(lo, hi) == {"count": len(sel), "sum": sum(model[k] for k in sel) % (1 << 64)}


def test_full_pool():
    app = make(leaves=2, fanout=8)
    for k in range(12):  # leaf 0 splits 4+4 at the 9th key; then leaf 1 fills up to 8
        app.insert(k, k)
    app.insert(3, 99)  # overwriting needs no room
    with pytest.raises(EnclaveError, match="btree is full: all 2 leaves are in use"):
        app.insert(100, 1)
    assert app.insert(5, 5) is False  # a failed insert changed nothing
    assert all_items(app) == [(k, 99 if k == 3 else k) for k in range(12)]


def test_fill_bulk_loads_sorted_keys():
    app = make(fanout=16)
    r = app.fill(0.5, seed=3)
    assert r["leaves"] == round(0.5 * app.capacity) and r["keys"] == app.count == r["leaves"] * 14
    items = all_items(app)
    keys = np.array([k for k, _ in items])
    assert len(items) == app.count and (np.diff(keys) > 0).all() and (np.diff(keys) <= 3).all()
    assert app.key_hi == keys[-1] + 1
    model = dict(items)
    for k in random.Random(0).sample(range(app.key_hi), 300):
        assert app.lookup(k) == model.get(k)
    # about half the key space is stored, with random values
    q = np.random.default_rng(0).integers(0, app.key_hi, 5000)
    assert 0.4 < np.isin(q, keys).mean() < 0.6
    assert len({v for _, v in items[:1000]}) == 1000
    assert app.range(0, app.key_hi)["count"] == app.count
    assert app.fill(0.0)["keys"] == 0 and app.lookup(int(keys[0])) is None


def test_step_counts_match_the_model():
    app = make(fanout=16)
    app.fill(0.9, seed=1)
    model = dict(all_items(app))
    r = app.step(n=512, seed=11)
    rng = np.random.Generator(np.random.PCG64(11))
    q = rng.integers(0, app.key_hi, 512)
    hits = [int(k) for k in q if int(k) in model]
    assert r["hits"] == len(hits) and r["sum"] == sum(model[k] for k in hits) % (1 << 64)
    lo = int(rng.integers(0, app.key_hi))
    in_range = [k for k in model if lo <= k < lo + 4 * 16]
    assert r["range_count"] == len(in_range) > 0
    assert r["range_sum"] == sum(model[k] for k in in_range) % (1 << 64)
    ups = rng.integers(0, app.key_hi, 8).tolist()
    assert r["ops"] == 512 + 1 + 8 and r["full"] == 0
    assert r["inserted"] == len(set(ups) - set(model)) and app.count == len(model) + r["inserted"]


def test_step_is_deterministic_and_checksum_tracks_state():
    a, b = make(fanout=16), make(fanout=16)
    a.fill(0.9, seed=2)
    b.fill(0.9, seed=2)
    assert a.checksum() == b.checksum()
    c = make(fanout=16)
    c.fill(0.9, seed=3)
    assert c.checksum() != a.checksum()
    before = a.checksum()
    a.lookup(5)
    a.range(0, 1000)
    a.stats()
    assert a.checksum() == before
    assert [a.step(seed=s) for s in range(5)] == [b.step(seed=s) for s in range(5)]
    assert a.checksum() == b.checksum() != before
    k = next(k for k in range(a.key_hi) if a.lookup(k) is None)
    a.insert(k, 1)
    assert a.checksum() != b.checksum()


def test_bad_arguments():
    app = make(leaves=10, fanout=8)
    for args in [(-1, 0), (1 << 62, 0), ("1", 0), (True, 0), (1, -1), (1, 1 << 63), (1, 1.5)]:
        with pytest.raises(EnclaveError):
            app.insert(*args)
    with pytest.raises(EnclaveError):
        app.lookup(None)
    with pytest.raises(EnclaveError):
        app.range("a", 5)
    with pytest.raises(EnclaveError):
        app.step(n=0)
    with pytest.raises(EnclaveError):
        app.step(seed=-1)
    with pytest.raises(EnclaveError):
        app.fill(1.5)
    with pytest.raises(EnclaveError):
        app.fill(0.5, seed="x")


def test_runs_unchanged_on_a_tracked_heap(tracked):
    app = make(8 * MiB, chunk=64 << 10)
    app.fill(0.9, seed=4)
    key = all_items(app)[12345][0]
    copy = tracked(app)
    assert copy.app.lookup(key) == app.lookup(key)
    assert copy.tracker.demanded <= 8, "a point lookup reads one node per level and one leaf row"
    for s in range(3):
        assert copy.app.step(seed=s) == app.step(seed=s)
    assert copy.app.range(1000, 50000) == app.range(1000, 50000)
    k = next(k for k in range(app.key_hi) if app.lookup(k) is None)
    assert copy.app.insert(k, 7) == app.insert(k, 7)
    assert copy.app.checksum() == app.checksum()
    app.heap.close()
