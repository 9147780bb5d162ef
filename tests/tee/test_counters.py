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


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------


def test_at_most_max_counters_per_platform(tmp_path):
    from constmig.tee.counters import MAX_COUNTERS

    assert MAX_COUNTERS == 4096
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    store._save({f"{i:032x}": 0 for i in range(MAX_COUNTERS - 1)})  # a platform one short of full
    last = store.create(7)
    assert store.read(last) == 7
    with pytest.raises(EnclaveError, match=f"already holds {MAX_COUNTERS} counters"):
        store.create()
    store.destroy(last)
    store.create()  # room again


@pytest.mark.parametrize("counters", [{"a": "1"}, {"a": 1.5}, [1, 2], 3])
def test_authentic_but_malformed_counters_are_refused(tmp_path, counters):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    store._save(counters)  # MAC'd with the platform key: only the content is wrong
    with pytest.raises(ConfigError, match="malformed counters"):
        store.read("a")


def test_counter_file_folder_is_created_and_ids_are_128_bit(tmp_path):
    store = CounterStore(tmp_path / "platform" / "state" / "c.json", b"k" * 32)
    cid = store.create()
    assert len(bytes.fromhex(cid)) == 16
    assert store.read(cid) == 0
