"""A maintenance drain on the netns testbed with a real etcd as the fleet directory (issue 16): host a,
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
