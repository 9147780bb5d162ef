"""Fleet operations over a list of agents (without etcd): `constmig ls` and `constmig drain`.
Placement is a pure function, tested on views; the drain runs on three real agents with clients calling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from constmig.errors import AgentError, ConfigError, PastCommitPoint
from constmig.host import fleet
from constmig.host.fleet import HEADROOM, HostView, Move, hosts_arg, plan_drain, plan_rebalance
from constmig.wire import control

MiB = 1 << 20


def view(addr: str, free: int, **enclaves: tuple[str, int]) -> HostView:
    return HostView(addr, addr[-1], {n: {"status": st, "heap_bytes": heap} for n, (st, heap) in enclaves.items()},
                    free + HEADROOM)


def test_an_interrupt_starts_no_further_move(monkeypatch):
    """Ctrl-C while the first of three moves runs, one at a time. The agent's cancel answers only once
    the move rolled back (here 0.3 s), and in that time the pool must not start the next move. The next
    move is the one a cancel could miss: it was not yet known to its agent. The other two never start."""
    started: list[str] = []
    released = threading.Event()

    def fake_migrate(name, *args, **kwargs):
        started.append(name)
        if name == "kv0":
            released.wait(10)
            raise AgentError("migration of 'kv0' cancelled before its commit point (interrupted)")
        return {}

    def fake_request(addr, req, timeout=None):
        assert isinstance(req, control.Cancel)
        if req.name != "kv0":
            raise AgentError(f"no migration of {req.name!r} is in progress on this agent (it is running)")
        released.set()
        time.sleep(0.3)  # the agent answers once the rollback is done
        return {"cancelled": True}

    monkeypatch.setattr(fleet, "migrate", fake_migrate)
    monkeypatch.setattr(fleet, "request", fake_request)
    moves = [Move(f"kv{i}", MiB, "h:2", "h:1") for i in range(3)]
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        fleet.run_moves(moves, parallel=1, max_bandwidth=0, strategy="precopy", tracker="auto", timeout=10)
    assert started == ["kv0"]


@pytest.mark.parametrize(("answer", "asks"), [
    (PastCommitPoint("the migration of 'kv0' passed its commit point (the destination runs it)"), 1),
    (PastCommitPoint("the migration of 'kv0' is over: it runs on h:1"), 1),
    # the same words in an error of another type are not taken for the type: asked again until the move ends
    (AgentError("the enclave 'kv0' did not answer the cancel in time (commit point? is over?)"), 3),
])
def test_an_interrupt_leaves_a_move_past_its_commit_point_to_finish(monkeypatch, answer, asks):
    """A cancel refused as too late (the typed PastCommitPoint, never its wording) ends the asking: the move
    goes on and finishes; any other refusal is asked again while the move runs."""
    asked: list[str] = []
    fut: Future = Future()

    def fake_request(addr, req, timeout=None):
        asked.append(req.name)
        if len(asked) == 3:
            fut.set_result(None)  # the move ended meanwhile
        raise answer

    monkeypatch.setattr(fleet, "request", fake_request)
    fleet._cancel_move(fut, Move("kv0", MiB, "h:2", "h:1"))
    assert len(asked) == asks


def test_the_largest_heap_goes_first_to_the_host_with_the_most_room():
    src = view("h:1", 0, small=("running", 100 * MiB), big=("running", 600 * MiB), mid=("running", 300 * MiB),
               moving=("migrating-out", 50 * MiB))
    moves, skipped = plan_drain(src, [view("h:2", 700 * MiB), view("h:3", 500 * MiB)])
    assert [(m.name, m.to) for m in moves] == [("big", "h:2"), ("mid", "h:3"), ("small", "h:3")]
    assert skipped == ["moving (migrating-out)"]


def test_a_drain_the_fleet_cannot_hold_is_refused_before_anything_moves():
    src = view("h:1", 0, a=("running", 600 * MiB), b=("running", 600 * MiB))
    with pytest.raises(ConfigError, match=r"the rest of the fleet cannot hold what must leave h:1: .* needs 600"):
        plan_drain(src, [view("h:2", 1000 * MiB)])
    down = HostView("h:9", error="cannot reach agent")
    with pytest.raises(ConfigError, match="no other reachable host to drain to"):
        plan_drain(src, [down])


def test_a_busy_enclave_goes_where_the_calls_are_fewest_when_both_have_room():
    src = view("h:1", 0, hot=("running", 300 * MiB), cold=("running", 200 * MiB))
    src.enclaves["hot"]["calls_per_s"] = 400.0
    busy = view("h:2", 2000 * MiB, web=("running", 100 * MiB))
    busy.enclaves["web"]["calls_per_s"] = 900.0
    idle = view("h:3", 1500 * MiB)
    moves, _ = plan_drain(src, [busy, idle])
    # hot (largest first): h:2 has the most room but most of the fleet's 1,300 calls/s:
    #   h:2 1 - 900/1300 = 0.31 < h:3 0.75 - 0 = 0.75.
    # cold: h:3 now has 1200 MiB left and hot's 400 calls/s: h:2 0.31 > h:3 0.6 - 0.31 = 0.29.
    assert [(m.name, m.to) for m in moves] == [("hot", "h:3"), ("cold", "h:2")]
    assert busy.calls_per_s == 900.0 and idle.calls_per_s == 0.0
    # With no calls anywhere, room alone decides (the busy host has the most).
    busy.enclaves["web"]["calls_per_s"] = 0.0
    src.enclaves["hot"]["calls_per_s"] = 0.0
    assert [m.to for m in plan_drain(src, [busy, idle])[0]] == ["h:2", "h:2"]


def test_call_rates_count_the_last_ten_whole_seconds():
    from constmig.host.metrics import CallRate

    r = CallRate()
    for t in (100.1, 100.5, 101.2, 105.0, 109.9):
        r.record(t)
    assert r.per_second(110.0) == 0.5  # 5 calls in seconds 100-109
    assert r.per_second(109.5) == 0.4  # second 109 still filling
    assert r.per_second(115.0) == 0.2  # 105 and 109 remain
    r.record(121.0)  # a bucket reused a full window later starts from zero
    assert r.per_second(122.0) == 0.1


def test_rebalance_evens_out_the_hosts_and_stops_when_no_move_helps():
    a = view("h:1", 10_000 * MiB, e1=("running", 400 * MiB), e2=("running", 300 * MiB), e3=("running", 100 * MiB),
             e4=("migrating-out", 500 * MiB))
    b = view("h:2", 10_000 * MiB, f1=("running", 100 * MiB))
    c = view("h:3", 10_000 * MiB)
    moves = plan_rebalance([a, b, c], max_moves=10)
    # 800/100/0: e1 (closest to half of 800) to h:3. Then 400/100/400: h:3's only enclave (400) would not
    # narrow its gap to h:2, h:1's e2 (300) would not either; e3 (100) does. Then 300/200/400: nothing helps.
    assert [(m.name, m.src, m.to) for m in moves] == [("e1", "h:1", "h:3"), ("e3", "h:1", "h:2")]
    assert plan_rebalance([a, b, c], max_moves=1) == moves[:1]
    even = [view("h:1", 10_000 * MiB, x=("running", 100 * MiB)), view("h:2", 10_000 * MiB, y=("running", 100 * MiB))]
    assert plan_rebalance(even, max_moves=4) == []
    full = [view("h:1", 10_000 * MiB, x=("running", 800 * MiB)), view("h:2", 10 * MiB)]
    assert plan_rebalance(full, max_moves=4) == []  # no room on the emptier host


@pytest.mark.parametrize(("text", "fragment"), [("", "--hosts needs at least one"), ("a:1,a:1", "names a:1 twice"),
                                                ("nope", "bad address 'nope'")])
def test_hosts_lists_are_checked(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        hosts_arg(text)


def test_strays_are_the_directory_enclaves_whose_agent_is_gone_or_does_not_answer():
    from constmig.host.fleet import Listing, source_addr, strays

    listing = Listing({"h:1": {"host_id": "a"}, "h:2": {"host_id": "b"}, "h:3": {"host_id": "c"}},
                      {"e1": "h:1", "e2": "h:2", "e3": "h:9", "e4": "not an address", "e5": "h:3"})
    views = [HostView("h:1", "a"), HostView("h:2", "b", error="cannot reach agent")]  # h:3 not asked (--hosts)
    assert [(s.name, s.at, s.state) for s in strays(listing, views)] == [
        ("e2", "h:2", "unknown"), ("e3", "h:9", "dead"), ("e4", "not an address", "dead")]
    assert strays(None, views) == []
    assert source_addr("b", listing) == "h:2"  # a host id the directory lists
    assert source_addr("h:7", listing) == "h:7"  # or an address
    with pytest.raises(ConfigError, match="bad address 'zz'"):
        source_addr("zz", listing)


def test_a_fleet_command_needs_hosts_or_a_directory():
    from constmig.host.fleet import fleet_hosts

    with pytest.raises(ConfigError, match="--hosts HOST:PORT,... or --etcd URL"):
        fleet_hosts(None, None)
    assert fleet_hosts("h:1,h:2", None) == (["h:1", "h:2"], None)


def cm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.e2e
def test_drain_a_host_of_four_enclaves_under_client_load():
    from constmig.bench.loadgen import KVHammer
    from constmig.host.client import request
    from constmig.host.cluster import LocalCluster
    from constmig.host.orchestrate import app_checksum, launch_filled

    with LocalCluster(3) as c:
        a, b, d = c.addrs
        names = ["kv1", "kv2", "kv3", "kv4"]
        for i, n in enumerate(names):
            launch_filled(a, n, "kvstore", (16 + 16 * i) << 20, 0.5, seed=i)
        sums = {n: app_checksum(a, n) for n in names[2:]}
        hammers = [KVHammer(a, n, keys=200, write_ratio=0.3, seed=7 + i) for i, n in enumerate(names[:2])]
        for h in hammers:
            h.preload()
            h.start()
        try:
            p = cm("drain", a, "--hosts", f"{a},{b},{d}", "--parallel", "2", "--max-bandwidth", "200M", "--json", "-")
        finally:
            reports = [h.stop() for h in hammers]
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert sorted(m["name"] for m in doc["moved"]) == names and all(m["ok"] for m in doc["moved"])
        assert {m["to"] for m in doc["moved"]} == {b, d}  # spread by room
        for h, r in zip(hammers, reports, strict=True):
            assert r.calls > 0 and r.errors == [] and r.wrong == 0
            assert h.verify() == 0  # every acknowledged write is where the enclave runs now
            h.close()
        assert request(a, {"op": "status"})["enclaves"] == {}
        for n in names[2:]:
            assert app_checksum(a, n) == sums[n]  # found through the old host's redirect
        ls = cm("ls", "--hosts", f"{a},{b},{d}", "--json")
        assert ls.returncode == 0, ls.stderr
        where = {n: addr for addr, v in json.loads(ls.stdout).items() for n in v["enclaves"]}
        assert where == {m["name"]: m["to"] for m in doc["moved"]}
        again = cm("drain", a, "--hosts", f"{b},{d}")
        assert again.returncode == 0 and "nothing to drain: no running enclave on" in again.stdout


@pytest.mark.e2e
def test_rebalance_moves_one_of_three_enclaves_to_the_empty_host():
    from constmig.host.cluster import LocalCluster
    from constmig.host.orchestrate import app_checksum, launch_filled

    with LocalCluster(2) as c:
        a, b = c.addrs
        for i in range(3):
            launch_filled(a, f"kv{i}", "kvstore", 32 << 20, 0.5, seed=i)
        sums = {f"kv{i}": app_checksum(a, f"kv{i}") for i in range(3)}
        p = cm("rebalance", "--hosts", f"{a},{b}", "--json", "-")
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert len(doc["moved"]) == 1 and doc["moved"][0]["ok"] and doc["moved"][0]["to"] == b
        assert doc["moved"][0]["from"] == a
        for name, before in sums.items():
            assert app_checksum(a, name) == before  # wherever it runs now (the old host redirects)
        again = cm("rebalance", "--hosts", f"{a},{b}")
        assert again.returncode == 0 and "nothing to rebalance" in again.stdout


@pytest.mark.e2e
def test_ls_names_a_host_that_does_not_answer():
    from constmig.host.cluster import LocalCluster, free_port

    with LocalCluster(1) as c:
        dead = f"127.0.0.1:{free_port()}"
        p = cm("ls", "--hosts", f"{c.addrs[0]},{dead}")
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert f"{dead}: cannot reach agent" in p.stdout, p.stdout


@pytest.mark.e2e
def test_an_interrupted_drain_leaves_each_enclave_in_one_place_and_runs_again():
    """Ctrl-C (SIGINT, no terminal) during a drain's first move: it is cancelled before its commit point,
    the others never start; every enclave still runs on the source, and the same drain finishes the job."""
    import signal
    import time

    from constmig.host.client import request
    from constmig.host.cluster import LocalCluster
    from constmig.host.orchestrate import app_checksum, launch_filled

    with LocalCluster(2) as c:
        a, b = c.addrs
        names = ["kv0", "kv1", "kv2"]
        for i, n in enumerate(names):
            launch_filled(a, n, "kvstore", 64 << 20, 0.9, seed=i)
        sums = {n: app_checksum(a, n) for n in names}
        args = ["drain", a, "--hosts", b, "--parallel", "1", "--strategy", "precopy", "--max-bandwidth", "4M"]
        p = subprocess.Popen([sys.executable, "-m", "constmig", *args], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not any(e["status"] == "migrating-out" for e in request(a, {"op": "status"})["enclaves"].values()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
        assert p.returncode != 0
        deadline = time.monotonic() + 15
        while {e["status"] for e in request(a, {"op": "status"})["enclaves"].values()} != {"running"}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sorted(request(a, {"op": "status"})["enclaves"]) == names
        assert not {n for n, e in request(b, {"op": "status"})["enclaves"].items() if e["status"] == "running"}
        again = cm("drain", a, "--hosts", b, "--json", "-")
        assert again.returncode == 0, again.stderr
        assert sorted(m["name"] for m in json.loads(again.stdout)["moved"]) == names
        for n in names:
            assert app_checksum(b, n) == sums[n]
