import numpy as np
import pytest

from constmig.apps.xsbench import CHANNELS, N_MATERIALS, XSBench, material_sizes
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError, EnclaveError

MiB = 1 << 20


def make(size: int = 4 * MiB, chunk: int = 1 << 20, **config) -> XSBench:
    app = XSBench(Heap(size, chunk_size=chunk))
    app.setup(**config)
    return app


def grid(app: XSBench, nuc: int) -> tuple[np.ndarray, np.ndarray]:
    base, g = nuc * app.gridpoints, app.grid_used
    return app.egrid[base : base + g], app.xs[base : base + g]


def reference(app: XSBench, e: float, mat: int) -> np.ndarray:
    """Macroscopic cross sections by np.interp over each nuclide of the material."""
    out = np.zeros(CHANNELS)
    for k in range(int(app.nnucs[mat])):
        eg, xs = grid(app, int(app.mats[mat, k]))
        out += app.conc[mat, k] * np.array([np.interp(e, eg, xs[:, c]) for c in range(CHANNELS)])
    return out


def test_sizing_fills_the_heap():
    app = make(16 * MiB)
    assert app.heap.free_bytes < 8 * 4096 and app.nuclides == 68
    assert app.egrid.shape == (68 * app.gridpoints,) and app.xs.shape == (68 * app.gridpoints, 5)
    assert material_sizes(68) == [34, 5, 4, 4, 27, 21, 21, 21, 21, 21, 9, 9]
    assert material_sizes(355)[0] == 177 and max(material_sizes(3)) == 3


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown xsbench option 'isotopes'"):
        make(isotopes=3)
    with pytest.raises(ConfigError, match="at most"):
        make(gridpoints=10**7)
    with pytest.raises(ConfigError):
        make(nuclides=0)
    with pytest.raises(ConfigError):
        make(gridpoints=1)


def test_fill_makes_sorted_grids_and_materials():
    app = make(nuclides=10)
    r = app.fill(0.5, seed=2)
    assert r["gridpoints"] == app.grid_used == round(0.5 * app.gridpoints)
    for nuc in (0, 9):
        eg, xs = grid(app, nuc)
        assert (np.diff(eg) > 0).all() and eg[-1] == 1.0 and eg[0] > 0
        assert xs.min() >= 0 and xs.max() < 1
    for m, k in enumerate(material_sizes(10)):
        row = app.mats[m, :k]
        assert app.nnucs[m] == k and len(set(row.tolist())) == k and row.max() < 10
        assert (app.conc[m, :k] > 0).all()
    assert not app.egrid[app.grid_used : app.gridpoints].any()  # the rest of each row stays untouched


def test_lookups_match_np_interp():
    app = make(nuclides=12, gridpoints=500)
    app.fill(1.0, seed=3)
    for e in (0.0, 1e-9, 0.3, 0.5, 0.999, 1.0):
        for mat in range(N_MATERIALS):
            assert np.allclose(app.lookup(e, mat), reference(app, e, mat), rtol=1e-12, atol=0)
    eg, xs = grid(app, 7)
    for e in (eg[0], eg[100], (eg[3] + eg[4]) / 2):
        want = [np.interp(e, eg, xs[:, c]) for c in range(CHANNELS)]
        assert np.allclose(app.micro(7, float(e)), want, rtol=1e-12, atol=0)


def test_step_matches_lookups():
    app = make(nuclides=12, gridpoints=500)
    app.fill(1.0, seed=3)
    r = app.step(n=50, seed=9)
    rng = np.random.Generator(np.random.PCG64(9))
    e = rng.random(50)
    cdf = np.cumsum([0.140, 0.052, 0.275, 0.134, 0.154, 0.064, 0.066, 0.055, 0.008, 0.015, 0.025, 0.013])
    mats = np.minimum(np.searchsorted(cdf, rng.random(50) * cdf[-1], side="right"), N_MATERIALS - 1)
    macro = np.array([app.lookup(float(x), int(m)) for x, m in zip(e, mats, strict=True)])
    assert r["ops"] == 50 and r["verification"] == int((macro.argmax(axis=1) + 1).sum())
    assert abs(r["xs_sum"] - macro.sum()) < 1e-9 * macro.sum()


def test_step_is_deterministic_and_checksum_tracks_state():
    a, b = make(), make()
    a.fill(0.9, seed=2)
    b.fill(0.9, seed=2)
    assert a.checksum() == b.checksum()
    c = make()
    c.fill(0.9, seed=3)
    assert c.checksum() != a.checksum()
    before = a.checksum()
    a.lookup(0.5, 0)
    a.micro(3, 0.2)
    assert a.checksum() == before
    assert [a.step(seed=s) for s in range(4)] == [b.step(seed=s) for s in range(4)]
    assert a.checksum() == b.checksum() != before  # steps are counted in the small state


def test_bad_arguments():
    app = make(nuclides=4, gridpoints=100)
    with pytest.raises(EnclaveError, match="fill first"):
        app.step()
    app.fill(1.0)
    for bad in ((1.5, 0), (-0.1, 0), ("0.5", 0), (0.5, 12), (0.5, -1), (0.5, 1.0)):
        with pytest.raises(EnclaveError):
            app.lookup(*bad)
    with pytest.raises(EnclaveError):
        app.micro(4, 0.5)
    with pytest.raises(EnclaveError):
        app.step(n=0)
    with pytest.raises(EnclaveError):
        app.fill(None)


def test_runs_unchanged_on_a_tracked_heap(tracked):
    app = make(8 * MiB, chunk=64 << 10)
    app.fill(0.9, seed=4)
    copy = tracked(app)
    assert copy.app.micro(30, 0.7) == app.micro(30, 0.7)
    assert copy.tracker.demanded <= 20, "one binary search touches about log2(gridpoints) places"
    for s in range(3):
        assert copy.app.step(n=64, seed=s) == app.step(n=64, seed=s)
    assert copy.app.checksum() == app.checksum()
    app.heap.close()
