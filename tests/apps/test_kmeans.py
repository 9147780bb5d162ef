import numpy as np
import pytest

from constmig.apps.kmeans import KMeans
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError, EnclaveError

MiB = 1 << 20


def make(size: int = 4 * MiB, chunk: int = 1 << 20, **config) -> KMeans:
    app = KMeans(Heap(size, chunk_size=chunk))
    app.setup(**config)
    return app


def test_sizing_fills_the_heap():
    app = make(16 * MiB)
    assert app.heap.free_bytes < 4096 and app.x.shape == (app.capacity, 32)
    assert app.c.shape == (16, 32) and app.counts.shape == (16,)
    assert make(dims=3, clusters=2).x.shape[1] == 3


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown kmeans option 'k'"):
        make(k=3)
    with pytest.raises(ConfigError):
        make(dims=0)
    with pytest.raises(ConfigError):
        make(clusters=2.5)
    with pytest.raises(ConfigError, match="too small"):
        make(64 * 1024, chunk=64 * 1024, dims=4096, clusters=1024)


def test_fill_makes_blobs_and_forgy_centroids():
    app = make(dims=8, clusters=4)
    r = app.fill(0.5, seed=1)
    assert r["rows"] == app.rows == round(0.5 * app.capacity)
    x = app.x[: app.rows]
    assert np.abs(x).max() < 13 and x.std() > 3
    assert not app.x[app.rows :].any()
    assert all((x == c).all(axis=1).any() for c in app.c)  # every centroid is a data row
    assert not app.counts.any()


def test_steps_lower_the_inertia():
    app = make(dims=8, clusters=4)
    app.fill(1.0, seed=3)
    start = app.inertia()
    x = app.x[: app.rows].astype(np.float64)
    c = app.c.astype(np.float64)
    ref = ((x[:, None, :] - c[None]) ** 2).sum(-1).min(axis=1).sum()
    assert abs(start - ref) < 1e-6 * ref
    batch = [app.step(n=256, seed=s)["inertia"] for s in range(40)]
    end = app.inertia()
    assert end < 0.8 * start
    assert np.mean(batch[-10:]) < np.mean(batch[:10])
    assert app.counts.sum() == 40 * 256
    p = app.x[10].tolist()
    assert app.predict(p) == int(((app.c - app.x[10]) ** 2).sum(axis=1).argmin())


def test_step_is_deterministic_and_checksum_tracks_state():
    a, b = make(), make()
    a.fill(0.9, seed=2)
    b.fill(0.9, seed=2)
    assert a.checksum() == b.checksum()
    c = make()
    c.fill(0.9, seed=3)
    assert c.checksum() != a.checksum()
    before = a.checksum()
    a.inertia()
    a.centroids()
    a.predict([0.0] * 32)
    assert a.checksum() == before
    assert [a.step(seed=s) for s in range(4)] == [b.step(seed=s) for s in range(4)]
    assert a.checksum() == b.checksum() != before


def test_bad_arguments():
    app = make(dims=2, clusters=2)
    with pytest.raises(EnclaveError, match="fill first"):
        app.step()
    app.fill(1.0)
    for bad in ([1.0], [1.0, "x"], "ab", [1.0, True], None):
        with pytest.raises(EnclaveError):
            app.predict(bad)
    with pytest.raises(EnclaveError):
        app.step(n=0)
    with pytest.raises(EnclaveError):
        app.step(seed=1.5)
    with pytest.raises(EnclaveError):
        app.fill(0.5, seed=-1)


def test_runs_unchanged_on_a_tracked_heap(tracked):
    app = make(8 * MiB, chunk=64 << 10)
    app.fill(0.9, seed=4)
    copy = tracked(app)
    assert copy.app.centroids() == app.centroids()
    assert copy.tracker.demanded <= 2, "the centroids are one small array"
    for s in range(3):
        assert copy.app.step(n=64, seed=s) == app.step(n=64, seed=s)
    assert copy.app.inertia() == app.inertia()
    assert copy.app.checksum() == app.checksum()
    app.heap.close()
