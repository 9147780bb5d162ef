"""A real Prometheus (the distribution's 2.42) scrapes three real agents found through the fleet
directory with `constmig metrics targets`, on the shipped deploy/prometheus/ configuration and rules, and
its own HTTP API shows what an operator's would: the first migration's increase (the series were there
at 0), downtime counted once per direction, the enclaves per host before and after (0, not absent),
`up`, the first rolled-back migration (an unreachable destination) under the same word as the log, and
then a drain of host c written as a mark and carried out by its agent: c's enclaves leave it, and
Prometheus sees each host's enclaves and the drain's migrations counted once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from constmig.errors import AgentError
from constmig.host.cluster import LocalCluster, free_port
from constmig.host.orchestrate import launch_filled, migrate
from constmig.host.prometheus_server import LocalPrometheus, prometheus_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def by_host(found: list[dict]) -> dict[str, float]:
    return {s["labels"]["host_id"]: s["value"] for s in found}


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_real_prometheus_sees_the_first_migration_and_counts_it_once(etcd_url):
    if prometheus_binary() is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run installs it)")
    with LocalCluster(3, metrics=True, agent_args=["--etcd", etcd_url]) as c, LocalPrometheus(DEPLOY) as prom:
        a, b, cc = c.addrs
        launch_filled(a, "kv", "kvstore", 16 << 20, 0.5, seed=1)
        p = subprocess.run([sys.executable, "-m", "constmig", "metrics", "targets", "--etcd", etcd_url, "--out",
                            str(prom.targets_dir / "constmig.json")], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        up = prom.wait('up{job="constmig"}', lambda r: len(r) == 3 and all(s["value"] == 1 for s in r))
        assert sorted(s["labels"]["host_id"] for s in up) == ["a", "b", "c"]
        info = prom.wait("constmig_agent_info", lambda r: len(r) == 3)
        prom.wait("constmig_directory_up", lambda r: by_host(r) == {"a": 1, "b": 1, "c": 1})
        assert {s["labels"]["tee"] for s in info} == {"sim"} and all(s["labels"]["version"] for s in info)
        # before: every host reports its running enclaves, 0 where there is none; the counters are at 0
        prom.wait('constmig_enclaves{state="running"}', lambda r: by_host(r) == {"a": 1, "b": 0, "c": 0})
        prom.wait('constmig_migrations_total{direction="out", strategy="stopcopy", outcome="done"}',
                  lambda r: by_host(r) == {"a": 0, "b": 0, "c": 0})

        migrate("kv", a, b, "stopcopy")
        # the first migration is seen by increase(): its series went 0 -> 1 (born at 1 it would read 0)
        first = prom.wait('sum(increase(constmig_migrations_total{direction="out", outcome="done"}[1m]))',
                          lambda r: r and r[0]["value"] >= 1)
        assert first[0]["value"] < 2  # extrapolated over the window, never a second migration
        migrate("kv", b, cc, "stopcopy")
        # downtime: both ends time each migration, one series per direction; a fleet sums one of them
        prom.wait('sum by (direction) (constmig_downtime_seconds_count{strategy="stopcopy"})',
                  lambda r: {s["labels"]["direction"]: s["value"] for s in r} == {"in": 2, "out": 2})
        # the recording rule counts each migration once fleet-wide
        prom.wait('sum(constmig:migrations:increase5m{outcome="done"})', lambda r: r and 2 <= r[0]["value"] < 3)
        prom.wait('constmig_enclaves{state="running"}', lambda r: by_host(r) == {"a": 0, "b": 0, "c": 1})
        prom.wait('constmig_migrations_in_flight', lambda r: len(r) == 6 and all(s["value"] == 0 for s in r))

        # an unreachable destination: rolled back, the enclave runs on; the first one is seen too
        with pytest.raises(AgentError):
            migrate("kv", cc, f"127.0.0.1:{free_port()}", "stopcopy", timeout=3)
        rolled = prom.wait('increase(constmig_migrations_total{direction="out", outcome="rolled-back"}[1m]) > 0',
                           lambda r: len(r) == 1)
        assert rolled[0]["labels"]["host_id"] == "c" and rolled[0]["labels"]["strategy"] == "stopcopy"
        assert "migration of kv to 127.0.0.1:" in (log := (c.base / "agent-c.log").read_text())
        assert " ended rolled-back: " in log and "failed" not in log.split(" ended rolled-back: ")[0][-80:]
        assert prom.query('ALERTS{alertname="ConstmigMigrationFailed"}') == []
        assert by_host(prom.query('up{job="constmig"}')) == {"a": 1, "b": 1, "c": 1}

        # a drain as a mark (issue 35): c's agent moves its three enclaves off; Prometheus sees c emptied
        for i, name in enumerate(("kv2", "kv3")):
            launch_filled(cc, name, "kvstore", 16 << 20, 0.5, seed=2 + i)
        prom.wait('constmig_enclaves{state="running"}', lambda r: by_host(r) == {"a": 0, "b": 0, "c": 3})
        p = subprocess.run([sys.executable, "-m", "constmig", "drain", "c", "--etcd", etcd_url, "--strategy",
                            "stopcopy", "--json", "-"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        after = prom.wait('constmig_enclaves{state="running"}',
                          lambda r: (h := by_host(r)).get("c") == 0 and h.get("a", 0) + h.get("b", 0) == 3, timeout=30)
        assert set(by_host(after)) == {"a", "b", "c"}
        # every move of the drain is one migration out of c, counted once, none failed
        prom.wait('constmig_migrations_total{direction="out", outcome="done", host_id="c"}',
                  lambda r: sum(s["value"] for s in r) == 3, timeout=30)
        prom.wait('sum(constmig_migrations_total{direction="in", outcome="done"})',
                  lambda r: r and r[0]["value"] == 5, timeout=30)
        assert prom.query('ALERTS{alertname="ConstmigMigrationFailed"}') == []
