"""A maintenance drain on the netns testbed with a real etcd as the fleet directory: host a,
holding four enclaves (two under client load), is emptied onto b and c by `constmig drain a` with no
address given (the directory names the hosts and resolves "a"); no call is lost or wrong, every
enclave keeps its state, and the directory says where each one went."""

import json
import os
import subprocess
import sys

import pytest
from tb_helpers import needs_netns, unique_name

from constmig.client import EnclaveClient
from constmig.host import client
from constmig.host.directory import blocking
from constmig.host.etcd_server import etcd_binary
from constmig.host.orchestrate import app_checksum, launch_filled
from constmig.testbed import LinkSpec, Testbed

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.reliability, needs_netns,
              pytest.mark.skipif(etcd_binary() is None, reason="no etcd binary (apt-get install etcd-server)")]

HEAP = 48 << 20


def test_drain_a_host_of_four_enclaves_under_load_through_the_directory(tmp_path):
    from constmig.bench.loadgen import KVHammer

    tb = Testbed(unique_name("te"), 3, LinkSpec.parse("1gbit"), state_dir=tmp_path, etcd=True)
    with tb:
        url = tb.etcd_url
        assert url and tb.status()["etcd_alive"]
        a, b, c = tb.addrs
        assert {e["host_id"] for e in blocking(url, lambda d: d.hosts()).values()} == {"a", "b", "c"}
        names = ["kv1", "kv2", "kv3", "kv4"]
        for i, n in enumerate(names):
            launch_filled(a, n, "kvstore", HEAP, 0.7, seed=i)
        sums = {n: app_checksum(a, n) for n in names[2:]}
        assert blocking(url, lambda d: d.enclaves()) == dict.fromkeys(names, a)
        hammers = [KVHammer(a, n, keys=300, write_ratio=0.3, seed=11 + i) for i, n in enumerate(names[:2])]
        for h in hammers:
            h.preload()
            h.start()
        try:
            p = subprocess.run([sys.executable, "-m", "constmig", "drain", "a", "--parallel", "2",
                                "--max-bandwidth", "500M", "--json", "-"], env={**os.environ, **tb.env()},
                               capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        finally:
            reports = [h.stop() for h in hammers]
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["source"] == a and sorted(m["name"] for m in doc["moved"]) == names
        assert all(m["ok"] for m in doc["moved"]) and {m["to"] for m in doc["moved"]} <= {b, c}
        for h, r in zip(hammers, reports, strict=True):
            assert r.calls > 0 and r.errors == [] and r.wrong == 0
            assert h.verify() == 0  # every acknowledged write is where the enclave runs now
            h.close()
        assert blocking(url, lambda d: d.enclaves()) == {m["name"]: m["to"] for m in doc["moved"]}
        assert client.request(a, {"op": "status"})["enclaves"] == {}
        for n in names[2:]:
            with EnclaveClient(None, n, timeout=30, etcd=url) as found:  # by name, through the directory
                assert found.call("checksum") == sums[n]
        print(f"\ndrain figures: {len(doc['moved'])} enclaves, "
              f"{sum(m['state_bytes'] or 0 for m in doc['moved']) / 2**20:.0f} MiB, wall {doc['wall_s']:.2f} s, "
              f"worst client gap {max(r.max_gap_ms for r in reports):.1f} ms, "
              f"downtimes {[m['downtime_ms'] for m in doc['moved']]} ms")


def test_a_drain_through_a_cut_link_leaves_each_enclave_in_one_place_and_finishes_when_run_again(tmp_path):
    """Host b's link goes down for 3 s in the middle of a drain: whatever each migration did (paused and
    resumed, rolled back before its commit point), every enclave runs in exactly one place afterwards,
    and the same drain run again moves what is left."""
    import time

    tb = Testbed(unique_name("tc"), 3, LinkSpec.parse("1gbit"), state_dir=tmp_path, etcd=True)
    with tb:
        a, b, c = tb.addrs
        names = ["kv1", "kv2", "kv3", "kv4"]
        for i, n in enumerate(names):
            launch_filled(a, n, "kvstore", 64 << 20, 0.9, seed=i)
        sums = {n: app_checksum(a, n) for n in names}
        env = {**os.environ, **tb.env()}
        argv = [sys.executable, "-m", "constmig", "drain", "a", "--parallel", "2", "--max-bandwidth", "60M",
                "--json", "-"]
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        deadline = time.monotonic() + 60
        while not any(e["status"] == "migrating-out" for e in client.request(a, {"op": "status"})["enclaves"].values()):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        tb.link_down("b")
        time.sleep(3)
        tb.link_up("b")
        out, err = p.communicate(timeout=300)
        assert "Traceback" not in err

        def placed() -> dict[str, list[str]]:
            where: dict[str, list[str]] = {n: [] for n in names}
            for addr in (a, b, c):
                for n, e in client.request(addr, {"op": "status"})["enclaves"].items():
                    if e["status"] == "running":
                        where[n].append(addr)
            return where

        deadline = time.monotonic() + 60  # a paused migration settles within its resume deadline
        while any(len(v) != 1 for v in placed().values()):
            assert time.monotonic() < deadline, placed()
            time.sleep(0.5)
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert again.returncode == 0, again.stderr
        where = placed()
        assert all(len(v) == 1 and v[0] in (b, c) for v in where.values()), where
        assert blocking(tb.etcd_url, lambda d: d.enclaves()) == {n: v[0] for n, v in where.items()}
        for n in names:
            with EnclaveClient(None, n, timeout=30, etcd=tb.etcd_url) as found:
                assert found.call("checksum") == sums[n]
        print(f"\nfirst drain exit {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else 'ok'}")
