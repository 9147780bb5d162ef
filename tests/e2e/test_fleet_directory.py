"""Agents in a fleet directory on a real etcd: clients find an enclave by name wherever it
runs, after its old host is retired too; a dead agent drops out; and a poisoned entry misroutes a client
into a clear error but never makes two copies of an enclave run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from constmig.client import EnclaveClient
from constmig.client.trust import Expect, Trust
from constmig.errors import AgentUnreachable, AttestationError, NoSuchEnclave
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.directory import blocking, parse_etcd_url
from constmig.host.orchestrate import app_checksum, launch_filled

pytestmark = pytest.mark.e2e


def cm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def where(url: str, name: str) -> str | None:
    return blocking(url, lambda d: d.where(name))


def poison(url: str, name: str, at: str) -> None:
    """The untrusted store's owner rewrites an entry: raw bytes, no agent involved."""
    import aetcd

    async def put() -> None:
        host, port = parse_etcd_url(url)
        async with aetcd.Client(host, port, options={"grpc.enable_http_proxy": 0}) as c:
            await c.put(f"/constmig/enclaves/{name}".encode(), json.dumps({"at": at}).encode())

    asyncio.run(put())


def running(addrs: list[str], name: str) -> list[str]:
    """The agents where `name` runs (its process answering as running)."""
    return [a for a in addrs if request(a, {"op": "status"})["enclaves"].get(name, {}).get("state") == "running"]


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_found_by_name_wherever_it_runs_and_after_its_old_host_is_retired(etcd_url):
    with LocalCluster(3, agent_args=["--etcd", etcd_url]) as c:
        a, b, d = c.addrs
        listed = blocking(etcd_url, lambda dd: dd.hosts())
        assert {listed[x]["host_id"] for x in (a, b, d)} == {"a", "b", "c"}
        assert request(a, {"op": "status"})["directory"] == etcd_url
        launch_filled(a, "kv1", "kvstore", 32 << 20, 0.5, seed=1)
        assert where(etcd_url, "kv1") == a
        p = cm("call", "kv1", "--etcd", etcd_url, "put", "k1", "v1")
        assert p.returncode == 0, p.stderr
        kept = EnclaveClient(a, "kv1", etcd=etcd_url)  # a client that knew the old host, and the directory
        assert kept.call("get", "k1") == b"v1"
        p = cm("migrate", "kv1", "--etcd", etcd_url, "--to", b, "--strategy", "constmig")  # no --from: found
        assert p.returncode == 0, p.stderr
        assert where(etcd_url, "kv1") == b  # moved at the handoff, from the old location
        request(a, {"op": "shutdown"})  # host A retired: its redirect is gone with it
        c.procs[0].wait(15)
        wait_for(lambda: a not in blocking(etcd_url, lambda dd: dd.hosts()), 5)  # it left at once
        p = cm("call", "kv1", "--etcd", etcd_url, "get", "k1")
        assert p.returncode == 0 and p.stdout.strip() == "v1", p.stderr
        # The kept connection to A died with it: that call's outcome is unknown to the client (an error);
        # the next one finds A unreachable, asks the directory, and completes the lost one first.
        with pytest.raises(AgentUnreachable, match="closed the connection"):
            kept.call("get", "k1")
        assert kept.call("get", "k1") == b"v1" and kept.addr == b
        kept.close()
        ls = cm("ls", "--etcd", etcd_url, "--json")
        assert ls.returncode == 0, ls.stderr
        doc = json.loads(ls.stdout)
        assert set(doc) == {b, d, "dead", "unknown", "advice"} and "kv1" in doc[b]["enclaves"] and doc["dead"] == {}
        # Names are fleet-wide: another agent refuses a second kv1 while the first one's agent lives.
        p = cm("run", "kvstore", "--agent", d, "--heap", "16M", "--name", "kv1")
        assert p.returncode == 1 and f"the fleet directory says an enclave named 'kv1' runs at {b}" in p.stderr
        p = cm("stop", "kv1", "--agent", b)
        assert p.returncode == 0, p.stderr
        assert where(etcd_url, "kv1") is None


def test_a_dead_agent_drops_out_and_its_restored_enclave_is_found_again(etcd_url):
    with LocalCluster(2, agent_args=["--etcd", etcd_url, "--etcd-ttl", "2"]) as c:
        a, b = c.addrs
        launch_filled(a, "kv2", "kvstore", 32 << 20, 0.5, seed=2, client_keys=16)
        before = app_checksum(a, "kv2")
        ckpt = request(a, {"op": "checkpoint", "name": "kv2"})["path"]
        c.kill_agent(0)  # SIGKILL: no goodbye, only the lease running out
        wait_for(lambda: a not in blocking(etcd_url, lambda dd: dd.hosts()), 8)
        ls = cm("ls", "--etcd", etcd_url)
        assert ls.returncode == 0 and "dead" in ls.stdout and "kv2" in ls.stdout, ls.stdout
        p = cm("call", "kv2", "--etcd", etcd_url, "checksum")
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert f"enclave 'kv2' was last at {a}, whose agent is not in the fleet directory" in p.stderr
        # A checkpoint is sealed to its platform: the host comes back, and its agent restores it there.
        p = cm("restore", ckpt, "--agent", b, "--name", "kv2")
        assert p.returncode == 1 and "no persistent state on this platform" in p.stderr
        c.start_agent(0, a)
        wait_for(lambda: a in blocking(etcd_url, lambda dd: dd.hosts()), 5)
        p = cm("restore", ckpt, "--agent", a, "--name", "kv2")
        assert p.returncode == 0, p.stderr
        assert where(etcd_url, "kv2") == a
        p = cm("call", "kv2", "--etcd", etcd_url, "checksum")
        assert p.returncode == 0 and p.stdout.strip() == before, p.stderr


def test_a_poisoned_entry_misroutes_into_a_clear_error_and_never_makes_two_copies(etcd_url):
    with LocalCluster(3, agent_args=["--etcd", etcd_url]) as c:
        a, b, d = c.addrs
        launch_filled(a, "kv3", "kvstore", 32 << 20, 0.5, seed=3)
        p = cm("call", "kv3", "--etcd", etcd_url, "put", "k", "1")  # pins kvstore's measurement for kv3
        assert p.returncode == 0, p.stderr
        # 1. The entry names a live agent that has no kv3: one line from there, nothing runs twice.
        poison(etcd_url, "kv3", d)
        p = cm("call", "kv3", "--etcd", etcd_url, "get", "k")
        assert p.returncode == 1 and "no enclave named 'kv3' on agent c" in p.stderr and "Traceback" not in p.stderr
        with pytest.raises(NoSuchEnclave):
            EnclaveClient(None, "kv3", timeout=10, etcd=etcd_url).call("get", "k")
        # 2. The entry names an agent where another enclave of that name runs (other code): the pinned
        #    client refuses it on attestation; the real one keeps its data on A.
        poison(etcd_url, "kv3", "127.0.0.1:1")  # a dead agent: B may take the name
        p = cm("run", "matrix", "--agent", b, "--heap", "16M", "--name", "kv3")
        assert p.returncode == 0, p.stderr
        assert where(etcd_url, "kv3") == b
        p = cm("call", "kv3", "--etcd", etcd_url, "--raw", "get", "k")
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert "measurement" in p.stderr, p.stderr
        real = request(a, {"op": "status"})["enclaves"]["kv3"]["measurement"]
        pinned = Trust.default(expect=Expect.parse(real, source="the test"))
        with pytest.raises(AttestationError):
            EnclaveClient(None, "kv3", timeout=10, trust=pinned, etcd=etcd_url).call("get", "k")
        p = cm("call", "kv3", "--agent", a, "get", "k")
        assert p.returncode == 0 and p.stdout.strip() == "1", p.stderr
        assert request(b, {"op": "stop", "name": "kv3"}) == "stopped"
        # 3. The entry points back at the old host after a migration: the client is redirected to the one
        #    running copy, and a migration "from" the poisoned location is refused.
        poison(etcd_url, "kv3", a)
        p = cm("migrate", "kv3", "--from", a, "--to", d, "--strategy", "precopy")
        assert p.returncode == 0, p.stderr
        assert where(etcd_url, "kv3") == d
        poison(etcd_url, "kv3", a)
        p = cm("call", "kv3", "--etcd", etcd_url, "get", "k")
        assert p.returncode == 0 and p.stdout.strip() == "1", p.stderr
        p = cm("migrate", "kv3", "--etcd", etcd_url, "--to", b)
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert running(c.addrs, "kv3") == [d]


def test_the_store_going_away_is_logged_not_fatal_and_the_entries_are_mended_after(tmp_path):
    from constmig.host.cluster import free_port
    from constmig.host.etcd_server import LocalEtcd

    port, peer = free_port(), free_port()
    store = LocalEtcd(port=port, peer_port=peer, data_dir=tmp_path / "etcd").start()
    url = store.url
    try:
        with LocalCluster(3, agent_args=["--etcd", url, "--etcd-ttl", "3"]) as c:
            a, b, d = c.addrs
            launch_filled(a, "kv4", "kvstore", 32 << 20, 0.5, seed=4, client_keys=8)
            before = app_checksum(a, "kv4")
            store.stop()  # the directory is gone: runs, migrations and calls go on
            p = cm("migrate", "kv4", "--from", a, "--to", b, "--strategy", "constmig")
            assert p.returncode == 0, p.stderr
            p = cm("run", "kvstore", "--agent", d, "--heap", "16M", "--name", "kv5")
            assert p.returncode == 0, p.stderr
            assert app_checksum(a, "kv4") == before  # through A's redirect
            p = cm("call", "kv4", "--etcd", url, "checksum")
            assert p.returncode == 1 and f"fleet directory at {url}: unreachable" in p.stderr
            store = LocalEtcd(port=port, peer_port=peer, data_dir=tmp_path / "etcd").start()  # same data
            wait_for(lambda: blocking(url, lambda dd: dd.enclaves()) == {"kv4": b, "kv5": d}, 15)
            p = cm("call", "kv4", "--etcd", url, "checksum")
            assert p.returncode == 0 and p.stdout.strip() == before, p.stderr
            log = (c.base / "agent-b.log").read_text()
            assert "cannot record kv4 in the fleet directory (retrying)" in log
    finally:
        store.stop()
