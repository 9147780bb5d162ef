"""`constmig bench directory` (what the fleet directory asks of etcd) and `constmig bench drain` (a drain
on the netns testbed with etcd), run small, JSON out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd binary (apt-get install etcd-server)")


def _cm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@needs_etcd
def test_bench_directory_measures_every_request_and_cleans_up(etcd_url):
    p = _cm("bench", "directory", "--etcd", etcd_url, "--ops", "40", "--concurrency", "4", "--repeat", "2",
            "--json", "-")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for key in ("lookup", "move", "refresh", "register"):
        f = doc[key]
        assert 0 < f["p50_ms"]["min"] <= f["p50_ms"]["median"] <= f["p50_ms"]["max"], (key, f)
        assert f["p99_ms"]["median"] >= f["p50_ms"]["median"]
    assert doc["moves_per_s"]["median"] > 0 and doc["moves_per_s"]["concurrency"] == 4
    from constmig.host.directory import blocking

    assert blocking(etcd_url, lambda d: d.enclaves()) == {}  # its private prefix is gone
    bad = _cm("bench", "directory", "--etcd", "ftp://x:1")
    assert bad.returncode != 0 and "only http:// and https:// endpoints" in bad.stderr and "Traceback" not in bad.stderr


@needs_etcd
@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_bench_drain_empties_host_a_with_nothing_lost():
    p = _cm("bench", "drain", "--enclaves", "3", "--heap", "32M", "--loaded", "1", "--repeat", "1", "--json", "-",
            timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    run = doc["runs"][0]
    assert doc["all_ok"] and run["directory_ok"] and run["lost_writes"] == 0 and run["client_calls"] > 0
    assert run["bytes"] >= 3 * (32 << 20) and set(run["to"]) == {"kv0", "kv1", "kv2"}
    assert doc["wall_s"]["median"] > 0 and doc["gbps"] > 0
    bad = _cm("bench", "drain", "--enclaves", "2", "--loaded", "3")
    assert bad.returncode != 0 and "--loaded 3 is more than --enclaves 2" in bad.stderr
