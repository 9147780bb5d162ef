"""Drain marks and migration records carried out by real agents on a real etcd: what a signature allows
(and what the host, who holds the store, cannot make them do), a record's phases, a cancel, an undrain,
and an agent killed mid-drain that says what became of the moves it owned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from tests.host.fleet_store import raw_put, read, until

from constmig.host import pki, records
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.directory import blocking
from constmig.host.orchestrate import launch_filled
from constmig.host.record_store import RecordStore
from constmig.host.signing import canonical, sign


def cm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def spec_of(rid: str, enclave: str, source: str = "a", **kw: Any) -> dict[str, Any]:
    return records.Spec(rid, enclave, source, created=time.time(), **kw).as_dict()


def record(spec: dict[str, Any], ident: pki.Identity | None) -> dict[str, Any]:
    return {"spec": spec, **({"signature": sign(ident, spec)} if ident else {}), "status": {"phase": "Pending", "times": {"Pending": spec["created"]}}}


@pytest.fixture(scope="module")
def fleet(etcd_url, tmp_path_factory):
    with LocalCluster(3, agent_args=["--etcd", etcd_url]) as c:
        ids = tmp_path_factory.mktemp("ids")
        other = tmp_path_factory.mktemp("other-ca")
        pki.create_admin_ca(other)
        yield c, etcd_url, {"alice": pki.issue(c.ca_dir, "operator", "alice", ids / "alice"),
                            "mallory": pki.issue(other, "operator", "mallory", ids / "mallory"),
                            "host-b": pki.read_identity(pki.host_dir(c.base / "host-b"))}


def history(addr: str) -> list[dict[str, Any]]:
    return request(addr, {"op": "status"})["migrations"]


@pytest.mark.e2e
@pytest.mark.adversarial
def test_what_the_store_holds_alone_moves_nothing(fleet):
    """The host (it holds etcd) writes marks and records straight into the store: unsigned, signed by
    another CA, by another host, replayed from another host or from long ago, a good signature moved onto
    another enclave. None moves anything, and each says why in its status."""
    c, url, ids = fleet
    a, b, d = c.addrs
    request(a, {"op": "run", "name": "kva", "app": "kvstore", "heap": 8 << 20})
    before = history(a)
    marks = {
        "not signed": {"spec": records.MarkSpec("m0", "a", created=time.time()).as_dict()},
        "not issued by this fleet's admin CA": None,
        "may not ask this of host 'a'": None,
        "taken for a replay": None,
    }
    good = records.MarkSpec("m1", "a", created=time.time()).as_dict()
    marks["not issued by this fleet's admin CA"] = {"spec": good, "signature": sign(ids["mallory"], good)}
    for_b = records.MarkSpec("m2", "b", created=time.time()).as_dict()  # host b's own drain, put on a's key
    marks["may not ask this of host 'a'"] = {"spec": for_b, "signature": sign(ids["host-b"], for_b)}
    old = records.MarkSpec("m3", "a", created=time.time() - 2 * records.FRESH_S).as_dict()
    marks["taken for a replay"] = {"spec": old, "signature": sign(ids["alice"], old)}
    for said, mark in marks.items():
        raw_put(url, "drains/a", mark)
        st = until(lambda: (read(url, "drains/a").get("status") or {}))
        assert st["state"] == "refused" and said in st["reason"], (said, st)
    other = spec_of("a.kvz.1", "kvz")
    moved = {**record(other, ids["alice"]), "spec": {**other, "enclave": "kva", "id": "a.kva.1"}}
    forged = {
        "a.kva.0": ("not signed", record(spec_of("a.kva.0", "kva"), None)),
        "a.kva.1": ("does not match", moved),
        "a.kva.2": ("not issued by this fleet's admin CA", record(spec_of("a.kva.2", "kva"), ids["mallory"])),
        # host b's certificate may sign only host b's own moves
        "a.kva.3": ("may not ask this of host 'a'", record(spec_of("a.kva.3", "kva", drain="m2"), ids["host-b"])),
        "a.kva.4": ("a replay", record({**spec_of("a.kva.4", "kva", target="b"),
                                        "created": time.time() - 2 * records.FRESH_S}, ids["alice"])),
        "a.kva.5": ("a record of host 'b'", record(spec_of("b.kva.5", "kva", source="b"), ids["alice"])),
    }
    for rid, (_, rec) in forged.items():
        raw_put(url, f"migrations/{rid}", rec)
    for rid, (said, _) in forged.items():
        st = until(lambda rid=rid: (read(url, f"migrations/{rid}").get("status") or {}).get("refused"))
        assert said in st, (rid, st)
        assert read(url, f"migrations/{rid}")["status"]["phase"] == "Pending"  # not acted on
    time.sleep(1.0)  # a few more of the agents' ticks
    assert request(a, {"op": "status"})["enclaves"]["kva"]["status"] == "running"
    assert "kva" not in request(b, {"op": "status"})["enclaves"] and "kva" not in request(d, {"op": "status"})["enclaves"]
    assert history(a) == before
    p = cm("migrations", "ls", "--etcd", url, "--json")
    rows = {r["id"]: r for r in json.loads(p.stdout)}
    assert rows["a.kva.0"]["reason"] == "not acted on: not signed", rows  # what the operator sees
    ls = cm("ls", "--etcd", url)
    assert ls.returncode == 0 and "; drain refused: signed" in ls.stdout and "taken for a replay" in ls.stdout, ls.stdout
    p = cm("undrain", "a", "--etcd", url)
    assert p.returncode == 0, p.stderr
    request(a, {"op": "stop", "name": "kva"})


@pytest.mark.e2e
def test_an_operator_record_runs_with_its_phases_and_a_cancel_rolls_one_back(fleet):
    c, url, ids = fleet
    a, b, _ = c.addrs
    launch_filled(a, "kvr", "kvstore", 16 << 20, 0.5, seed=1)
    rid = records.new_id("a", "kvr")
    spec = spec_of(rid, "kvr", target="b", strategy="precopy", options={"timeout": 20.0}, asked_by="operator alice")
    assert blocking(url, lambda d: RecordStore(d).create(RecordStore.record_key(rid), record(spec, ids["alice"])))
    st = until(lambda: (s := read(url, f"migrations/{rid}")["status"])["phase"] in ("Succeeded", "Failed") and s)
    assert st["phase"] == "Succeeded" and st["outcome"] == "done" and st["target"] == "b", st
    assert sorted(st["times"], key=st["times"].get) == ["Pending", "Scheduled", "Running", "Succeeded"], st
    assert "kvr" in request(b, {"op": "status"})["enclaves"] and st["figures"]["state_bytes"] > 0
    p = cm("migrations", "show", rid, "--etcd", url)
    assert p.returncode == 0 and json.loads(p.stdout)["signature"]["signer"] == "operator alice", p.stdout
    p = cm("migrations", "ls", "--etcd", url, "--json")
    rows = {r["id"]: r for r in json.loads(p.stdout)}
    assert rows[rid]["phase"] == "Succeeded" and rows[rid]["to"] == "b" and rows[rid]["outcome"] == "done"
    p = cm("migrations", "ls", "--etcd", url)
    assert p.returncode == 0 and rid in p.stdout, p.stdout

    # A slow one (2 MB/s for 16 MiB), cancelled while it runs, before its commit point: it rolls back.
    launch_filled(a, "kvs", "kvstore", 16 << 20, 0.9, seed=2)
    rid = records.new_id("a", "kvs")
    spec = spec_of(rid, "kvs", target="b", strategy="precopy", options={"max_bandwidth": 2e6})
    blocking(url, lambda d: RecordStore(d).create(RecordStore.record_key(rid), record(spec, ids["alice"])))
    until(lambda: read(url, f"migrations/{rid}")["status"]["phase"] == "Running")
    env = {**os.environ, "CONSTMIG_ADMIN_CERT": str(ids["alice"].folder)}
    p = cm("migrations", "cancel", rid, "--etcd", url, env=env)
    assert p.returncode == 0 and "Cancelled (cancelled)" in p.stdout, (p.stdout, p.stderr)
    st = read(url, f"migrations/{rid}")["status"]
    # signed by host a's own certificate: this CLI runs where agent a does (as it uses a's local socket)
    assert st["phase"] == "Cancelled" and st["outcome"] == "cancelled" and "cancelled by host a" in st["reason"], st
    assert request(a, {"op": "status"})["enclaves"]["kvs"]["status"] == "running"
    again = cm("migrations", "cancel", rid, "--etcd", url, env=env)
    assert again.returncode == 1 and "is over (Cancelled)" in again.stderr and "Traceback" not in again.stderr
    for name, at in (("kvr", b), ("kvs", a)):
        request(at, {"op": "stop", "name": name})


@pytest.mark.e2e
@pytest.mark.adversarial
def test_an_unsigned_cancel_is_refused_and_the_move_goes_on(fleet):
    c, url, ids = fleet
    a, b, _ = c.addrs
    launch_filled(a, "kvu", "kvstore", 16 << 20, 0.9, seed=3)
    rid = records.new_id("a", "kvu")
    spec = spec_of(rid, "kvu", target="b", strategy="precopy", options={"max_bandwidth": 4e6})
    blocking(url, lambda d: RecordStore(d).create(RecordStore.record_key(rid), record(spec, ids["alice"])))
    until(lambda: read(url, f"migrations/{rid}")["status"]["phase"] == "Running")

    async def forge(d):
        return await RecordStore(d).update(RecordStore.record_key(rid), lambda v: {**v, "abort": {"at": 1.0}})
    blocking(url, forge)
    st = until(lambda: (s := read(url, f"migrations/{rid}")["status"])["phase"] == "Succeeded" and s, timeout=30)
    assert st["abort"].startswith("refused: not signed"), st
    request(b, {"op": "stop", "name": "kvu"})


@pytest.mark.e2e
def test_undrain_cancels_what_has_not_started_and_a_killed_agent_says_what_became_of_its_moves(fleet):
    c, url, ids = fleet
    a, b, d = c.addrs
    for i, n in enumerate(("kw1", "kw2", "kw3")):
        launch_filled(a, n, "kvstore", 8 << 20, 0.9, seed=10 + i)
    # One at a time, slowly: the first runs, the others wait; undrain cancels those.
    p = cm("drain", "a", "--etcd", url, "--parallel", "1", "--max-bandwidth", "1M", "--strategy", "precopy",
           "--no-wait")
    assert p.returncode == 0 and "marked" in p.stderr, p.stderr
    first_mark = read(url, "drains/a")["spec"]["id"]
    running = until(lambda: [r for r in _mine(url, "a", first_mark) if r["status"]["phase"] == "Running"])
    ls = cm("ls", "--etcd", url, "--json")
    assert json.loads(ls.stdout)[a]["draining"].startswith("draining ("), ls.stdout
    assert cm("undrain", "a", "--etcd", url).returncode == 0
    first = running[0]["spec"]["id"]
    ended = until(lambda: (rs := _mine(url, "a", first_mark)) and all(
        r["status"]["phase"] in records.FINAL_VALUES for r in rs) and rs, timeout=40)
    waiting = [r for r in ended if r["spec"]["id"] != first]
    assert all(r["status"]["phase"] == "Cancelled" and "undrain" in r["status"]["reason"] for r in waiting), waiting
    assert len(waiting) == 2 and read(url, f"migrations/{first}")["status"]["phase"] == "Succeeded"  # it ran on

    # Drain again, and kill the agent while its first move runs; restarted, it says what became of each.
    p = cm("drain", "a", "--etcd", url, "--parallel", "1", "--max-bandwidth", "1M", "--strategy", "precopy",
           "--no-wait")
    assert p.returncode == 0, p.stderr
    mark = read(url, "drains/a")["spec"]["id"]
    live = until(lambda: [r for r in _mine(url, "a", mark) if r["status"]["phase"] == "Running"])
    c.kill_agent(0)
    c.start_agent(0, a)
    ended = until(lambda: (rs := _mine(url, "a", mark)) and all(
        r["status"]["phase"] in records.FINAL_VALUES for r in rs) and rs, timeout=30)
    by_id = {r["spec"]["id"]: r["status"] for r in ended}
    killed = by_id[live[0]["spec"]["id"]]
    assert killed["phase"] == "Failed" and "restarted before its handoff" in killed["reason"], killed
    assert until(lambda: read(url, "drains/a")["status"]["state"] == "drained")
    assert request(a, {"op": "status"})["enclaves"] == {}
    assert cm("undrain", "a", "--etcd", url).returncode == 0


def _mine(url: str, host: str, mark: str | None = None) -> list[dict[str, Any]]:
    async def work(d):
        return [s.value for s in await RecordStore(d).records(f"{host}.")]
    return [r for r in blocking(url, work) if mark is None or r["spec"].get("drain") == mark]


def test_canonical_bytes_do_not_depend_on_key_order():
    assert canonical({"b": 1, "a": [2, {"d": 3, "c": 4}]}) == canonical({"a": [2, {"c": 4, "d": 3}], "b": 1})


@pytest.mark.e2e
def test_a_signed_record_that_cannot_run_fails_with_one_line(fleet):
    c, url, ids = fleet
    a = c.addrs[0]
    request(a, {"op": "run", "name": "kvb", "app": "kvstore", "heap": 8 << 20})
    cases = {"a.kvb.bad1": ("bad options: ", spec_of("a.kvb.bad1", "kvb", target="b", options={"max_bandwidth": "x"})),
             "a.kvb.bad2": ("target host 'zz' is not in the fleet directory", spec_of("a.kvb.bad2", "kvb", target="zz")),
             "a.kvb.bad3": ("enclave 'nope' is not here on host a", spec_of("a.kvb.bad3", "nope", target="b"))}
    for rid, (_, spec) in cases.items():
        blocking(url, lambda d, rid=rid, spec=spec: RecordStore(d).create(RecordStore.record_key(rid),
                                                                           record(spec, ids["alice"])))
    for rid, (said, _) in cases.items():
        st = until(lambda rid=rid: (s := read(url, f"migrations/{rid}")["status"])["phase"] == "Failed" and s)
        assert said in st["reason"] and "\n" not in st["reason"], st
    assert request(a, {"op": "status"})["enclaves"]["kvb"]["status"] == "running"
    request(a, {"op": "stop", "name": "kvb"})


@pytest.mark.e2e
@pytest.mark.adversarial
def test_garbled_settings_in_the_store_are_named_and_the_moves_run_on_defaults(fleet):
    """The host writes settings no agent can use: each agent says which (once) and runs its moves on the
    defaults, where a garbled value used to fail every look of the fleet's work."""
    c, url, ids = fleet
    a = c.addrs[0]
    launch_filled(a, "kvg", "kvstore", 8 << 20, 0.5, seed=5)
    raw_put(url, "settings", {"max_in_flight": "all", "outbound_per_host": -1, "keep_records_s": "x"})
    try:
        rid = records.new_id("a", "kvg")
        spec = spec_of(rid, "kvg", target="b", strategy="stopcopy")
        blocking(url, lambda d: RecordStore(d).create(RecordStore.record_key(rid), record(spec, ids["alice"])))
        st = until(lambda: (s := read(url, f"migrations/{rid}")["status"])["phase"] in records.FINAL_VALUES and s,
                   timeout=30)
        assert st["phase"] == "Succeeded", st
        log = (c.base / "agent-a.log").read_text()
        assert "settings outbound_per_host=-1 is not an integer >= 1: 2 is used" in log
        assert "fleet work failed unexpectedly" not in log
    finally:
        blocking(url, lambda d: RecordStore(d).delete("settings"))
    request(c.addrs[1], {"op": "stop", "name": "kvg"})


@pytest.mark.e2e
def test_the_fleet_runs_at_most_its_max_in_flight_migrations(fleet):
    """settings max_in_flight 1: two records on two sources run one after the other, never together."""
    c, url, ids = fleet
    a, b, _ = c.addrs
    launch_filled(a, "kvm1", "kvstore", 8 << 20, 0.9, seed=21)
    launch_filled(b, "kvm2", "kvstore", 8 << 20, 0.9, seed=22)
    raw_put(url, "settings", {"max_in_flight": 1})
    try:
        rids = [records.new_id("a", "kvm1"), records.new_id("b", "kvm2")]
        for rid, src, name, to in ((rids[0], "a", "kvm1", "b"), (rids[1], "b", "kvm2", "a")):
            spec = spec_of(rid, name, source=src, target=to, strategy="precopy", options={"max_bandwidth": 4e6})
            blocking(url, lambda d, rid=rid, spec=spec: RecordStore(d).create(RecordStore.record_key(rid),
                                                                               record(spec, ids["alice"])))
        most = 0
        deadline = time.monotonic() + 60
        while True:
            phases = [read(url, f"migrations/{rid}")["status"]["phase"] for rid in rids]
            most = max(most, phases.count("Running"))
            if all(p in records.FINAL_VALUES for p in phases) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert phases == ["Succeeded", "Succeeded"] and most == 1, (phases, most)
        until(lambda: read(url, "slots/0") == {}, timeout=10)  # released by the move that held it, once it ended
    finally:
        blocking(url, lambda d: RecordStore(d).delete("settings"))
    request(b, {"op": "stop", "name": "kvm1"})
    request(a, {"op": "stop", "name": "kvm2"})


@pytest.mark.e2e
@pytest.mark.adversarial
def test_a_room_entry_that_does_not_parse_places_nothing_there_and_stalls_nothing(fleet):
    """The host garbles host b's room entry (each agent writes its own, unsigned): a move to "anywhere"
    goes to the one host whose entry parses, where it used to fail every look of the source's fleet work."""
    c, url, ids = fleet
    a, b, _ = c.addrs
    launch_filled(a, "kvp", "kvstore", 8 << 20, 0.5, seed=6)
    kept = read(url, "room/b")
    stop = threading.Event()

    def garble() -> None:  # b's agent rewrites its entry when its figures move: the host garbles it again
        while not stop.wait(0.1):
            raw_put(url, "room/b", {**kept, "free": "plenty"})

    raw_put(url, "room/b", {**kept, "free": "plenty"})
    garbler = threading.Thread(target=garble, daemon=True)
    garbler.start()
    try:
        rid = records.new_id("a", "kvp")
        spec = spec_of(rid, "kvp", strategy="stopcopy")  # target: anywhere
        blocking(url, lambda d: RecordStore(d).create(RecordStore.record_key(rid), record(spec, ids["alice"])))
        st = until(lambda: (s := read(url, f"migrations/{rid}")["status"])["phase"] in records.FINAL_VALUES and s,
                   timeout=30)
        assert st["phase"] == "Succeeded" and st["target"] == "c", st
        log = (c.base / "agent-a.log").read_text()
        assert "host b's room entry does not parse" in log and "fleet work failed unexpectedly" not in log
    finally:
        stop.set()
        garbler.join()
        raw_put(url, "room/b", kept)
    request(c.addrs[2], {"op": "stop", "name": "kvp"})


@pytest.mark.e2e
def test_bad_names_are_one_line_and_a_host_that_left_is_drained_by_its_id(fleet):
    """Last in this module: it retires agent c."""
    c, url, ids = fleet
    cases = ((["drain", "zz", "--etcd", url], "no host 'zz' has ever joined the fleet directory"),
             (["drain", "127.0.0.1:1", "--etcd", url], "no agent at 127.0.0.1:1 in the fleet directory"),
             (["undrain", "b", "--etcd", url], "host b has no drain mark"),
             (["migrations", "show", "a.nope.0", "--etcd", url], "no migration record 'a.nope.0'"),
             (["migrations", "show", "../x", "--etcd", url], "bad migration id"),
             (["migrations", "ls"], "--etcd URL"))
    env = {k: v for k, v in os.environ.items() if k != "CONSTMIG_ETCD"}
    with ThreadPoolExecutor(len(cases)) as pool:  # each CLI start takes a second: all at once
        done = list(pool.map(lambda case: cm(*case[0], env=env), cases))
    for (args, said), p in zip(cases, done, strict=True):
        assert p.returncode == 1 and said in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    request(c.addrs[2], {"op": "shutdown"})  # host c leaves the directory at once
    c.procs[2].wait(15)
    env = {**os.environ, "CONSTMIG_ADMIN_CERT": str(ids["alice"].folder)}
    p = cm("drain", "c", "--etcd", url, env=env)  # by its id; no agent here to sign for it: the operator does
    assert p.returncode == 0 and "carries the drain out when it joins again" in p.stderr, p.stderr
    mark = read(url, "drains/c")
    assert mark["spec"]["host_id"] == "c" and mark["spec"]["asked_by"] == "operator alice"
    p = cm("undrain", "c", "--etcd", url)
    assert p.returncode == 0 and read(url, "drains/c") == {}, p.stderr
