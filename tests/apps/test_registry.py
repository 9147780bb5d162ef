import pytest

from constmig.apps import APPS, app_source, load_app
from constmig.apps.kvstore import KVStore
from constmig.apps.matrix import MatrixApp
from constmig.errors import ConfigError


def test_load_app():
    assert load_app("kvstore") is KVStore and load_app("matrix") is MatrixApp
    for name in APPS:
        assert load_app(name).name == name


def test_unknown_app():
    with pytest.raises(ConfigError) as e:
        load_app("x")
    assert str(e.value) == "unknown app 'x'; known apps: kvstore, matrix"
    with pytest.raises(ConfigError):
        app_source("x")


def test_app_source_is_the_module_file():
    src = app_source("kvstore")
    assert isinstance(src, bytes) and b"class KVStore(EnclaveApp)" in src
    assert b"class MatrixApp(EnclaveApp)" in app_source("matrix")


def test_ecalls_listed():
    assert {"put", "get", "delete", "put_many", "get_many", "fill", "stats", "checksum"} <= set(
        KVStore.ecalls()
    )
    assert {"matvec", "set", "get", "row_sum", "fill", "stats", "checksum"} <= set(MatrixApp.ecalls())
