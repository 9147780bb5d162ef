"""A drain as a mark the fleet carries out (issue 35), end to end: a real etcd, three agents, the stock
CLI writes the mark and is killed once the first move runs; the drained host's agent finishes the drain,
every enclave answers with its data where it went (a client reads and writes one of them throughout,
and finds every acknowledged write), and each record shows its phases. Then the host plays
the attacker: an unsigned mark written straight into etcd moves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tests.host.fleet_store import raw_put, read, until

from constmig.bench.loadgen import KVHammer
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.directory import blocking
from constmig.host.orchestrate import app_checksum, launch_filled
from constmig.host.record_store import RecordStore
from constmig.host.records import FINAL_VALUES, MarkSpec

pytestmark = pytest.mark.e2e
NAMES = ["kv1", "kv2", "kv3", "kv4"]


def records_of(url: str, host: str, mark: str) -> list[dict]:
    async def work(d):
        return [s.value for s in await RecordStore(d).records(f"{host}.")]
    return [r for r in blocking(url, work) if r["spec"].get("drain") == mark]


def test_a_drain_whose_cli_is_killed_finishes_and_an_unsigned_mark_moves_nothing(etcd_url):
    url = etcd_url
    with LocalCluster(3, agent_args=["--etcd", url]) as c:
        a, b, d = c.addrs
        written = {n: launch_filled(a, n, "kvstore", 16 << 20, 0.8, seed=i, client_keys=16)
                   for i, n in enumerate(NAMES)}
        sums = {n: app_checksum(a, n) for n in NAMES[1:]}
        hammer = KVHammer(a, "kv1", keys=200, write_ratio=0.3, seed=7)  # a client reads and writes throughout
        hammer.preload()
        hammer.start()
        cli = subprocess.Popen([sys.executable, "-m", "constmig", "drain", "a", "--etcd", url, "--parallel", "2",
                                "--max-bandwidth", "16M", "--strategy", "precopy", "--json", "-"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mark = until(lambda: (read(url, "drains/a").get("spec") or {}).get("id"), timeout=30)
        until(lambda: any(r["status"]["phase"] == "Running" for r in records_of(url, "a", mark)), timeout=30)
        cli.send_signal(signal.SIGKILL)  # the command that asked is gone; the fleet goes on
        cli.communicate(timeout=10)
        t0 = time.monotonic()
        st = until(lambda: (s := read(url, "drains/a")["status"])["state"] in ("drained", "stuck") and s, timeout=60)
        report = hammer.stop()
        print(f"\ndrain finished {time.monotonic() - t0:.1f} s after its CLI was killed; the client made "
              f"{report.calls} calls, worst gap {report.max_gap_ms:.0f} ms")
        assert report.calls > 0 and report.errors == [] and report.wrong == 0
        assert hammer.verify() == 0  # every acknowledged write is where kv1 runs now
        hammer.close()
        assert st["state"] == "drained" and st["left"] == [], st
        recs = records_of(url, "a", mark)
        assert sorted(r["spec"]["enclave"] for r in recs) == NAMES  # one record per move, none repeated
        for r in recs:
            s = r["status"]
            assert s["phase"] == "Succeeded" and s["outcome"] == "done" and s["target"] in ("b", "c"), s
            assert sorted(s["times"], key=s["times"].get) == ["Pending", "Scheduled", "Running", "Succeeded"]
            assert r["spec"]["asked_by"] == "host a"  # the CLI ran where agent a does: a's own certificate
        assert request(a, {"op": "status"})["enclaves"] == {}
        where = {r["spec"]["enclave"]: r["status"]["target_addr"] for r in recs}
        for n in NAMES:
            assert request(where[n], {"op": "status"})["enclaves"][n]["status"] == "running"
        for n in NAMES[1:]:
            assert app_checksum(where[n], n) == sums[n]
        from constmig.client import EnclaveClient

        for n, keys in written.items():  # every acknowledged write, found by name through the directory
            with EnclaveClient(None, n, timeout=30, etcd=url) as found:
                assert all(found.call("get", k) == v for k, v in keys.items())
        p = subprocess.run([sys.executable, "-m", "constmig", "migrations", "ls", "--etcd", url, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert {r["id"] for r in json.loads(p.stdout)} >= {r["spec"]["id"] for r in recs}

        # The host (it holds the store) writes an unsigned mark on b: nothing moves off b.
        on_b = request(b, {"op": "status"})["enclaves"]
        raw_put(url, "drains/b", {"spec": MarkSpec("forged", "b", created=time.time()).as_dict()})
        st = until(lambda: read(url, "drains/b").get("status"), timeout=20)
        assert st["state"] == "refused" and st["reason"] == "not signed", st
        time.sleep(1.5)
        assert request(b, {"op": "status"})["enclaves"].keys() == on_b.keys()
        assert all(e["status"] == "running" for e in request(b, {"op": "status"})["enclaves"].values())
        assert not any(r["status"].get("phase") not in FINAL_VALUES for r in records_of(url, "b", "forged"))
        assert os.path.exists(c.base / "host-a" / "fleetwork.json")  # what a restarted agent a would pick up
