import math

import numpy as np
import pytest

from constmig.apps.matrix import MatrixApp
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError, EnclaveError

MiB = 1 << 20


def make(size: int = 8 * MiB, **config) -> MatrixApp:
    app = MatrixApp(Heap(size))
    app.setup(**config)
    return app


def test_default_size_is_about_ninety_percent_of_the_heap():
    app = make(16 * MiB)
    assert app.a.shape == (app.n, app.n) and app.x.shape == (app.n,)
    assert 0.85 < 8 * app.n * app.n / (16 * MiB) <= 0.9
    assert np.shares_memory(app.a, app.heap.buf) and np.shares_memory(app.x, app.heap.buf)
    assert math.isclose(float(np.linalg.norm(app.x)), 1.0)
    assert app.stats()["n"] == app.n and app.stats()["filled_rows"] == 0


def test_config():
    assert make(n=100).n == 100
    with pytest.raises(ConfigError, match="needs"):
        make(n=100_000)
    with pytest.raises(ConfigError, match="unknown matrix option 'm'"):
        make(m=3)
    with pytest.raises(ConfigError):
        make(n=0)


def test_fill_is_random_deterministic_and_partial():
    a, b = make(), make()
    ra = a.fill(0.45, seed=7)
    b.fill(0.45, seed=7)
    assert a.checksum() == b.checksum()
    assert 0 < ra["rows"] < a.n
    assert a.a[: ra["rows"]].all() and not a.a[ra["rows"] :].any()
    assert 0.4 < a.a[: ra["rows"]].mean() < 0.6
    # untouched rows are never-touched chunks: they travel as zero records
    assert not a.heap.touched_chunks().all()
    c = make()
    c.fill(0.45, seed=8)
    assert c.checksum() != a.checksum()
    assert a.fill(1.0)["rows"] == a.n


def test_matvec_is_power_iteration():
    app = make(n=50)
    app.fill(1.0, seed=1)
    a = app.a.copy()
    x = app.x.copy()
    for _ in range(3):
        y = a @ x
        norm = np.linalg.norm(y)
        x = y / norm
    assert math.isclose(app.matvec(3), norm, rel_tol=1e-12)
    assert np.allclose(app.x, x)
    assert app.stats()["iterations"] == 3
    with pytest.raises(EnclaveError):
        app.matvec(0)


def test_matvec_of_zero_matrix():
    app = make(n=10)
    assert app.matvec(2) == 0.0


def test_set_get_row_sum_and_checksum():
    app = make(n=64)
    before = app.checksum()
    assert app.set(3, 4, 2.5) is True
    app.set(3, 5, 1)
    assert app.get(3, 4) == 2.5 and app.row_sum(3) == 3.5 and app.row_sum(0) == 0.0
    assert app.checksum() != before
    for bad in ((64, 0), (-1, 0), (0, 64), ("1", 0), (True, 0)):
        with pytest.raises(EnclaveError, match="out of range"):
            app.get(*bad)
    with pytest.raises(EnclaveError):
        app.set(0, 0, "x")
    with pytest.raises(EnclaveError):
        app.fill(2.0)


def test_step_is_a_bounded_block_of_the_matvec():
    app = make(n=300)
    app.fill(1.0, seed=3)
    before = app.checksum()
    r = app.step(n=20, seed=4)
    start = r["start"]
    y = app.a[start : start + 20] @ app.x
    assert r["ops"] == 20 and 0 <= start <= 280
    assert math.isclose(r["norm2"], float(y @ y), rel_tol=1e-12)
    assert app.step(seed=4)["ops"] == 300  # default: the rows in about 16 MiB, here all of them
    assert app.stats()["steps"] == 2 and app.checksum() != before  # steps count in the small state
    b = make(n=300)
    b.fill(1.0, seed=3)
    assert b.step(n=20, seed=4) == r  # deterministic given the seed
    for bad in ({"n": 0}, {"n": 301}, {"n": "2"}, {"seed": -1}):
        with pytest.raises(EnclaveError):
            app.step(**bad)


def test_step_runs_unchanged_on_a_tracked_heap(tracked):
    app = MatrixApp(Heap(8 * MiB, chunk_size=64 << 10))
    app.setup(n=800)
    app.fill(1.0, seed=2)
    copy = tracked(app)
    assert copy.app.step(n=4, seed=1) == app.step(n=4, seed=1)
    assert copy.tracker.demanded <= 3, "four rows of 6400 bytes, and the vector"
    for s in range(3):
        assert copy.app.step(seed=s) == app.step(seed=s)
    assert copy.app.checksum() == app.checksum()
    app.heap.close()
