from collections import Counter

import pytest

from constmig.apps import APPS, app_source, installed, load_app
from constmig.apps.kvstore import KVStore
from constmig.apps.matrix import MatrixApp
from constmig.bench.loadgen import KVHammer, LoadReport, StepDriver, driver_for
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError

WORKLOADS = ["btree", "graph", "hashjoin", "kmeans", "matrix", "xsbench"]


def test_load_app():
    assert load_app("kvstore") is KVStore and load_app("matrix") is MatrixApp
    for name in APPS:
        assert load_app(name).name == name


def test_unknown_app():
    with pytest.raises(ConfigError) as e:
        load_app("x")
    assert str(e.value).startswith("unknown app 'x'; installed apps: " + ", ".join(sorted(installed())))
    assert "constmig.apps" in str(e.value) and "module:Class" in str(e.value)
    with pytest.raises(ConfigError):
        app_source("x")


@pytest.mark.parametrize(("ref", "message"), [
    ("nosuchmodule_xyz:App", "cannot import nosuchmodule_xyz"),
    ("constmig.apps.kvstore:Nope", "is not an EnclaveApp"),
    ("constmig.units:parse_size", "is not an EnclaveApp"),
    ("a:b:c", "unknown app"),
    ("bad name:App", "unknown app"),
])
def test_module_class_references(ref, message):
    with pytest.raises(ConfigError, match=message):
        load_app(ref)


def test_module_class_reference_loads_the_class_and_its_svn():
    from constmig.apps.kvstore import KVStore

    assert load_app("constmig.apps.kvstore:KVStore") is KVStore
    assert KVStore.svn == 1


def test_an_app_with_a_bad_security_version_is_refused(monkeypatch):
    from constmig.apps.kvstore import KVStore

    for bad in (-1, 1 << 16, True, "2"):
        monkeypatch.setattr(KVStore, "svn", bad)
        with pytest.raises(ConfigError, match="security version"):
            load_app("kvstore")


def test_app_source_is_the_module_file():
    src = app_source("kvstore")
    assert isinstance(src, bytes) and b"class KVStore(EnclaveApp)" in src
    assert b"class MatrixApp(EnclaveApp)" in app_source("matrix")


def test_ecalls_listed():
    assert {"put", "get", "delete", "put_many", "get_many", "fill", "stats", "checksum"} <= set(
        KVStore.ecalls()
    )
    assert {"matvec", "set", "get", "row_sum", "fill", "stats", "checksum"} <= set(MatrixApp.ecalls())


def test_every_workload_is_registered_and_steps():
    assert set(APPS) == {"kvstore", *WORKLOADS}
    for name in WORKLOADS:
        cls = load_app(name)
        assert {"step", "fill", "stats", "checksum"} <= set(cls.ecalls())
        assert f"class {cls.__name__}(EnclaveApp)".encode() in app_source(name)
        with Heap(16 << 20) as heap:
            app = cls(heap)
            app.setup()
            if name != "matrix":  # a square matrix takes `fraction` (0.9) of the heap by default
                assert heap.free_bytes < 64 << 10, f"{name} leaves heap unused"
            r = app.fill(0.5, seed=1)
            assert isinstance(r["seconds"], float)
            out = app.step(seed=3)
            assert isinstance(out["ops"], int) and out["ops"] > 0
            del app


def test_driver_for_picks_the_client_load():
    assert type(driver_for("kvstore", "127.0.0.1:1", "kv", zipf=0.99)) is KVHammer
    d = driver_for("btree", "127.0.0.1:1", "bt", n=10, record=True)
    assert type(d) is StepDriver and d.n == 10 and d.record
    assert d.seed_of(5) == (1 << 32) + 5


def test_zipf_keys_are_skewed():
    h = KVHammer("127.0.0.1:1", "kv", keys=1000, zipf=0.99)  # no call made: nothing connects
    counts = Counter(h._key() for _ in range(20000))
    assert counts["hammer-0"] > 0.1 * 20000 > 50 * counts.get("hammer-999", 0) + 1
    u = KVHammer("127.0.0.1:1", "kv", keys=1000)
    assert max(Counter(u._key() for _ in range(20000)).values()) < 60
    with pytest.raises(ValueError):
        KVHammer("127.0.0.1:1", "kv", zipf=0.0)


def test_load_report_figures_keep_their_keys():
    r = LoadReport(calls=3, ops=300, max_gap_ms=1.234)
    assert r.figures() == {"client_calls": 3, "client_errors": 0, "client_wrong": 0, "client_gap_ms": 1.23,
                           "client_ops": 300}


def test_measured_source_covers_the_shared_helpers():
    """The apps run apps/common.py too: a change there must change every app's measurement."""
    import constmig.apps.common as common
    from constmig.apps import app_source

    src = app_source("btree")
    with open(common.__file__, "rb") as f:
        assert f.read() in src
    assert app_source("btree") != app_source("graph")


# --- app packages: the constmig.apps entry points ---------------------------------------------------------

def test_shipped_apps_register_as_entry_points_like_any_package():
    from importlib.metadata import entry_points

    registered = {ep.name: ep.value for ep in entry_points(group="constmig.apps") if ep.dist.name == "constmig"}
    assert registered == APPS


def _fake_package(root, name: str, target: str, module: str = "", source: str = "") -> None:
    """A distribution on sys.path registering `name = target` under constmig.apps (what pip install makes)."""
    info = root / f"fake_{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-{name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[constmig.apps]\n{name} = {target}\n")
    if module:
        (root / f"{module}.py").write_text(source)


@pytest.mark.parametrize(("target", "source", "message"), [
    ("fakebroken_mod:App", "raise RuntimeError('boom at import')\n", "importing fakebroken_mod failed: RuntimeError: boom"),
    ("fakenotapp_mod:App", "class App:\n    pass\n", "is not an EnclaveApp"),
    ("fakemissing_mod:App", "", "cannot import fakemissing_mod"),
    ("not a target", "", "its entry point 'not a target' is not module:Class"),
])
def test_a_package_whose_app_does_not_load_is_one_clear_error(tmp_path, monkeypatch, target, source, message):
    module = target.partition(":")[0] if source else ""
    _fake_package(tmp_path, "fake", target, module, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed()["fake"].package == "fake-fake"
    with pytest.raises(ConfigError, match=message):
        load_app("fake")


def test_measurement_covers_the_modules_an_app_declares(tmp_path, monkeypatch):
    from constmig.enclave.runtime import measure_app

    (tmp_path / "fakeledger_helper.py").write_text("RATE = 1\n")
    _fake_package(tmp_path, "fakeapp", "fakeapp_mod:App", "fakeapp_mod",
                  "from constmig.enclave.app import EnclaveApp\n\nclass App(EnclaveApp):\n"
                  "    name = 'fakeapp'\n    measured_modules = ('fakeledger_helper',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = measure_app("fakeapp", {"heap": 1 << 20})
    (tmp_path / "fakeledger_helper.py").write_text("RATE = 2\n")  # a changed copy of a helper module
    assert measure_app("fakeapp", {"heap": 1 << 20}) != before
