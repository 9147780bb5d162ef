"""Issue 35's drain on the netns testbed (real links, a real etcd): six enclaves leave host a under a
client load; the CLI that wrote the mark is killed after the first move, and host a's agent is SIGKILLed
mid-drain and restarted. Its enclaves that had not reached their handoff died with it; the restarted
agent says so in their records, with the restore command of the checkpoint each sealed before the
drain; those commands, run as printed, bring them back on a, and the mark that still stands moves them
off. In the end every enclave runs in exactly one place, never two, with the data its clients saw
acknowledged, and each record shows its phases."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from tests.host.fleet_store import read, until
from tests.testbed.tb_helpers import needs_netns, unique_name

from constmig.bench.loadgen import KVHammer
from constmig.host import client
from constmig.host.directory import blocking
from constmig.host.etcd_server import etcd_binary
from constmig.host.orchestrate import app_checksum, launch_filled
from constmig.host.record_store import RecordStore
from constmig.testbed import LinkSpec, Testbed

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.reliability, needs_netns,
              pytest.mark.skipif(etcd_binary() is None, reason="no etcd binary (apt-get install etcd-server)")]
NAMES = [f"kv{i}" for i in range(1, 7)]


def test_a_drain_survives_its_cli_and_its_source_agent_being_killed(tmp_path):
    tb = Testbed(unique_name("tr"), 3, LinkSpec.parse("1gbit"), state_dir=tmp_path, etcd=True)
    with tb:
        url, (a, b, c) = tb.etcd_url, tb.addrs
        env = {**os.environ, **tb.env()}
        for i, n in enumerate(NAMES):
            launch_filled(a, n, "kvstore", 32 << 20, 0.7, seed=i)
            client.request(a, {"op": "checkpoint", "name": n})  # what the restarted agent will name
        sums = {n: app_checksum(a, n) for n in NAMES[1:]}  # kv1's data changes under its client
        hammer = KVHammer(a, "kv1", keys=200, write_ratio=0.3, seed=5)
        hammer.preload()
        hammer.start()
        cli = subprocess.Popen([sys.executable, "-m", "constmig", "drain", "a", "--parallel", "2",
                                "--max-bandwidth", "40M", "--strategy", "precopy", "--json", "-"], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mark = until(lambda: (read(url, "drains/a").get("spec") or {}).get("id"), timeout=30)

        def recs() -> list[dict]:
            async def work(d):
                return [s.value for s in await RecordStore(d).records("a.")]
            return [r for r in blocking(url, work) if r["spec"]["drain"] == mark]

        def phase(name: str) -> str:
            return next((r["status"]["phase"] for r in recs() if r["spec"]["enclave"] == name), "")

        until(lambda: any(r["status"]["phase"] == "Running" for r in recs()), timeout=60)
        cli.kill()
        cli.wait(10)
        until(lambda: phase("kv1") == "Succeeded", timeout=60)  # the largest-first order: kv1 and kv2 lead
        until(lambda: sum(r["status"]["phase"] == "Running" for r in recs()) > 0
              and sum(r["status"]["phase"] == "Pending" for r in recs()) > 0, timeout=60, every=0.05)
        tb.kill_agent("a")  # mid-drain: moves running, others waiting
        tb.restart_agent("a")
        # It says what became of each move it owned; those whose enclave died carry its restore command.
        until(lambda: all(r["status"]["phase"] in ("Succeeded", "Failed") for r in recs()), timeout=60)
        dead = [r for r in recs() if r["status"]["phase"] == "Failed"]
        assert dead, recs()
        for r in dead:
            assert "died with" in r["status"]["reason"] and r["status"]["restore"], r["status"]
            argv = shlex.split(r["status"]["restore"])
            assert argv[:2] == ["constmig", "restore"], argv
            p = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stderr
        def placed() -> dict[str, list[str]]:
            return {n: [h for h in (a, b, c)
                        if client.request(h, {"op": "status"})["enclaves"].get(n, {}).get("status") == "running"]
                    for n in NAMES}

        try:
            until(lambda: all(len(v) == 1 and v[0] in (b, c) for v in placed().values()), timeout=120, every=0.5)
        except AssertionError:
            pytest.fail(f"not placed: {placed()}; mark {read(url, 'drains/a').get('status')}; records "
                        + "; ".join(f"{r['spec']['id']} {r['status']['phase']} {r['status'].get('reason', '')}"
                                    for r in recs()))
        st = until(lambda: (s := read(url, "drains/a")["status"])["state"] in ("drained", "stuck") and s, timeout=30)
        report = hammer.stop()
        assert st["state"] == "drained", st
        assert report.calls > 0 and report.errors == [] and report.wrong == 0
        assert hammer.verify() == 0  # every acknowledged write of kv1 is where it runs
        hammer.close()

        running = placed()
        assert all(len(v) == 1 and v[0] in (b, c) for v in running.values()), running  # one place each, off a
        assert blocking(url, lambda d: d.enclaves()) == {n: v[0] for n, v in running.items()}
        for n in NAMES[1:]:
            assert app_checksum(running[n][0], n) == sums[n]
        ended = recs()
        assert all(r["status"]["phase"] in ("Succeeded", "Failed") for r in ended)
        for n in NAMES:  # each enclave's last record moved it; the ones that died have a Failed one before it
            mine = sorted((r for r in ended if r["spec"]["enclave"] == n), key=lambda r: r["spec"]["created"])
            assert mine[-1]["status"]["phase"] == "Succeeded", mine
            s = mine[-1]["status"]
            assert sorted(s["times"], key=s["times"].get) == ["Pending", "Scheduled", "Running", "Succeeded"]
        print(f"\n{len(dead)} enclave(s) died with agent a and came back from their checkpoints; "
              f"{len(ended)} records; the client made {report.calls} calls, worst gap {report.max_gap_ms:.0f} ms")
