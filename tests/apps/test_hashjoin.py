import numpy as np
import pytest

from constmig.apps.common import fmix as _fmix
from constmig.apps.hashjoin import HashJoin, _fmix_inv
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError, EnclaveError

MiB = 1 << 20
M64 = 1 << 64


def make(size: int = 4 * MiB, chunk: int = 1 << 20, **config) -> HashJoin:
    app = HashJoin(Heap(size, chunk_size=chunk))
    app.setup(**config)
    return app


def signed(x: int) -> int:
    x %= M64
    return x - M64 if x >> 63 else x


def reference_join(app: HashJoin, a: int, z: int) -> tuple[int, int, dict[int, int]]:
    """(matches, payload sum, R row -> summed S payloads) of S[a:z] joined with R, by a Python dict."""
    where = {k: i for i, k in enumerate(app.r_keys[: app.r_rows].tolist())}
    matches, total, agg = 0, 0, {}
    for k, p in zip(app.s_keys[a:z].tolist(), app.s_pay[a:z].tolist(), strict=True):
        if k in where:
            i = where[k]
            matches += 1
            total += int(app.r_pay[i]) + p
            agg[i] = agg.get(i, 0) + p
    return matches, signed(total), agg


def test_hash_is_a_bijection():
    x = np.random.default_rng(0).integers(0, 1 << 63, 10000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    assert (_fmix_inv(_fmix(x)) == x).all() and (_fmix(_fmix_inv(x)) == x).all()


def test_sizing_fills_the_heap():
    app = make(16 * MiB)
    assert app.heap.free_bytes < 64 * 1024
    assert app.s_cap == 4 * app.r_cap and 2 * (1 << app.bits) >= app.r_cap
    assert make(build_rows=100, probe_ratio=2).s_cap == 200


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown hashjoin option 'rows'"):
        make(rows=3)
    with pytest.raises(ConfigError, match="at most"):
        make(build_rows=10**8)
    with pytest.raises(ConfigError):
        make(probe_ratio=0)
    with pytest.raises(ConfigError):
        make(match_ratio=1.5)
    with pytest.raises(ConfigError):
        make(build_rows="10")


def test_fill_lays_r_out_in_bucket_order():
    app = make(build_rows=5000)
    r = app.fill(1.0, seed=3)
    assert r["build_rows"] == 5000 and r["probe_rows"] == 20000
    keys = app.r_keys[:5000]
    assert len(np.unique(keys)) == 5000
    buckets = (_fmix(keys) >> np.uint64(64 - app.bits)).astype(np.int64)
    assert (np.diff(buckets) >= 0).all()
    starts = app.bstart[buckets]
    assert (starts <= np.arange(5000)).all() and (np.arange(5000) < app.bstart[buckets + 1]).all()
    assert app.bstart[0] == 0 and app.bstart[-1] == 5000
    matched = np.isin(app.s_keys[:20000], keys).mean()
    assert 0.45 < matched < 0.55


def test_join_and_probe_match_a_dict_join():
    app = make(build_rows=3000)
    app.fill(0.9, seed=1)
    matches, total, _ = reference_join(app, 0, app.s_rows)
    assert app.join() == {"matches": matches, "sum": total}
    m, t, _ = reference_join(app, 100, 1100)
    assert app.join(100, 1000) == {"matches": m, "sum": t}
    assert app.join(app.s_rows) == {"matches": 0, "sum": 0}
    i = 1234
    assert app.probe(int(app.r_keys[i])) == [int(app.r_pay[i])]
    assert app.probe(12345) == []


def test_step_joins_a_morsel_and_aggregates():
    app = make(build_rows=3000)
    app.fill(0.9, seed=1)
    r = app.step(n=2000, seed=5)
    a = r["start"]
    matches, total, agg = reference_join(app, a, a + 2000)
    assert (r["ops"], r["matches"], r["sum"]) == (2000, matches, total)
    expect = np.zeros(app.r_cap, dtype=np.int64)
    for i, p in agg.items():
        expect[i] = signed(p)
    assert (app.agg == expect).all()


def test_step_is_deterministic_and_checksum_tracks_state():
    a, b = make(), make()
    a.fill(0.9, seed=2)
    b.fill(0.9, seed=2)
    assert a.checksum() == b.checksum()
    c = make()
    c.fill(0.9, seed=3)
    assert c.checksum() != a.checksum()
    before = a.checksum()
    a.join(0, 5000)
    a.probe(3)
    assert a.checksum() == before
    assert [a.step(seed=s) for s in range(4)] == [b.step(seed=s) for s in range(4)]
    assert a.checksum() == b.checksum() != before


def test_bad_arguments():
    app = make(build_rows=100)
    with pytest.raises(EnclaveError, match="fill first"):
        app.step()
    app.fill(1.0)
    for bad in [(-1,), (app.s_rows + 1,), (0, app.s_rows + 1), ("0",), (0, -2)]:
        with pytest.raises(EnclaveError):
            app.join(*bad)
    with pytest.raises(EnclaveError):
        app.probe(-1)
    with pytest.raises(EnclaveError):
        app.probe(1 << 64)
    with pytest.raises(EnclaveError):
        app.step(n=0)
    with pytest.raises(EnclaveError):
        app.fill(-0.1)


def test_runs_unchanged_on_a_tracked_heap(tracked):
    app = make(8 * MiB, chunk=64 << 10)
    app.fill(0.9, seed=4)
    key = int(app.r_keys[4321])
    copy = tracked(app)
    assert copy.app.probe(key) == app.probe(key)
    assert copy.tracker.demanded <= 4, "a probe reads one bucket and one build row"
    for s in range(3):
        assert copy.app.step(seed=s) == app.step(seed=s)
    assert copy.app.join(1000, 3000) == app.join(1000, 3000)
    assert copy.app.checksum() == app.checksum()
    app.heap.close()
