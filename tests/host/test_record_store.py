"""Records in a real etcd: created once, changed only by compare-and-set on their revision, so two
writers never overwrite each other and a phase never goes back."""

from __future__ import annotations

import asyncio

import pytest

from constmig.errors import DirectoryError
from constmig.host import records
from constmig.host.directory import Directory, blocking
from constmig.host.record_store import CAS_TRIES, RecordStore
from constmig.host.records import Event


def test_created_once_and_changed_only_from_the_revision_read(etcd_url):
    async def work(d: Directory) -> None:
        store = RecordStore(d)
        key = RecordStore.record_key("a.kv.cas1")
        first = {"spec": {"id": "a.kv.cas1"}, "status": {"phase": "Pending"}}
        assert await store.create(key, first)
        assert not await store.create(key, {"spec": {"id": "other"}})  # the key exists: nothing replaced
        got = await store.get(key)
        assert got is not None and got.value == first
        assert await d.write_if(key, b'{"late": true}', got.mod - 1) is False  # a stale revision changes nothing

        # Two writers step the same record at once: each CAS sees the other's write and applies its own on
        # top, and a step the table refuses (a phase going back) leaves the record as it is.
        def schedule(v):
            try:
                return {**v, "status": records.step(v["status"], Event.SCHEDULE, 1.0, target="b")}
            except records.PhaseError:
                return None

        def progress(v):
            return {**v, "status": {**v["status"], "progress": {"left_bytes": 5}}}

        await asyncio.gather(store.update(key, schedule), store.update(key, progress))
        now = (await store.get(key)).value["status"]
        assert now["phase"] == "Scheduled" and now["progress"] == {"left_bytes": 5}
        before = (await store.get(key)).mod
        await store.update(key, schedule)  # again: Scheduled cannot be scheduled; untouched
        assert (await store.get(key)).mod == before
        assert [s.value["spec"]["id"] for s in await store.records("a.kv.")] == ["a.kv.cas1"]
        assert await store.delete(key) and await store.get(key) is None
        assert await store.update(key, progress) is None  # gone: nothing written back

    blocking(etcd_url, work)


def test_a_writer_that_always_loses_gives_up_in_one_line(etcd_url):
    async def work(d: Directory) -> None:
        store = RecordStore(d)
        key = RecordStore.record_key("a.kv.busy")
        await store.create(key, {"n": 0})

        calls = 0

        def meddle(v):  # another writer changes it between every read and write of ours
            nonlocal calls
            calls += 1
            asyncio.get_running_loop().create_task(d.write(key, f'{{"n": {calls}}}'.encode()))
            return {"n": -1}

        async def slow_cas(rest, value, mod, lease=None):
            await asyncio.sleep(0.05)  # the other write lands first
            return await Directory.write_if(d, rest, value, mod, lease)

        d.write_if = slow_cas  # type: ignore[method-assign]
        with pytest.raises(DirectoryError, match="kept changing"):
            await store.update(key, meddle)
        assert calls == CAS_TRIES

    blocking(etcd_url, work)


def test_an_agent_deletes_its_records_that_ended_long_ago(etcd_url, tmp_path):
    """Each look reads every record its host kept: ended ones go after keep_records_s, except those of
    the host's standing mark (its drain counts its tries from them); running ones stay."""
    from constmig.host import pki
    from constmig.host.fleetwork import FleetWork

    pki.create_admin_ca(tmp_path / "ca")
    ident = pki.issue(tmp_path / "ca", "host", "a", tmp_path / "tls")
    now = 1_000_000.0
    rows = {"a.kw.old": ("Failed", now - 3 * 86400, ""), "a.kw.new": ("Succeeded", now - 60, ""),
            "a.kw.run": ("Running", now - 3 * 86400, ""), "a.kw.mark": ("Failed", now - 3 * 86400, "m1")}

    async def work(d: Directory) -> list[str]:
        store = RecordStore(d)
        for rid, (phase, t, drain) in rows.items():
            await store.create(RecordStore.record_key(rid), {"spec": {"id": rid, "drain": drain},
                                                             "status": {"phase": phase, "times": {phase: t}}})
        fw = FleetWork(etcd_url, "a", "127.0.0.1:1", None, None, ident, tmp_path, lambda: False)  # type: ignore[arg-type]
        fw.directory, fw.store = d, store
        fw.mark = records.MarkSpec("m1", "a")
        await fw._forget_old(await store.records("a."), now)
        return [s.value["spec"]["id"] for s in await store.records("a.kw.")]

    assert blocking(etcd_url, work) == ["a.kw.mark", "a.kw.new", "a.kw.run"]
