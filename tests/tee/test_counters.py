"""The sim platform's monotonic counters: values only go up, and the host cannot edit them unnoticed."""

import json

import pytest

from constmig.errors import ConfigError, EnclaveError
from constmig.tee.counters import CounterStore


def test_create_increment_read_destroy(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    cid = store.create(5)
    assert store.read(cid) == 5
    assert store.increment(cid) == 6 and store.read(cid) == 6
    other = store.create()
    assert other != cid and store.read(other) == 0
    store.destroy(cid)
    with pytest.raises(EnclaveError, match="migrated away"):
        store.read(cid)
    with pytest.raises(EnclaveError, match="does not exist"):
        store.increment(cid)
    assert CounterStore(tmp_path / "c.json", b"k" * 32).read(other) == 0  # persisted


@pytest.mark.adversarial
def test_edited_counter_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    store = CounterStore(path, b"k" * 32)
    cid = store.create(3)
    doc = json.loads(path.read_text())
    doc["counters"] = json.dumps({cid: 1})  # the host winds the counter back
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="changed outside the platform"):
        store.read(cid)
    with pytest.raises(ConfigError, match="changed outside the platform"):
        CounterStore(path, b"other key" * 4).read(cid)


def test_bad_values_and_garbage(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    with pytest.raises(EnclaveError):
        store.create(-1)
    (tmp_path / "c.json").write_text("not json")
    with pytest.raises(ConfigError, match="not a counter file"):
        store.read("x")
