"""An agent's /metrics (`--metrics-listen`): the Prometheus text format, from real agents, after real
migrations in and out, read over HTTP as Prometheus would."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from constmig.bench.loadgen import KVHammer
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import launch_filled, migrate


def scrape(addr: str) -> dict[str, list]:
    url = request(addr, {"op": "status"})["metrics_url"]
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    hits = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, samples)
    return hits[0]


@pytest.mark.e2e
def test_metrics_follow_enclaves_and_migrations():
    with LocalCluster(2, metrics=True) as c:
        a, b = c.addrs
        launch_filled(a, "kv", "kvstore", 32 << 20, 0.5, seed=1)
        launch_filled(a, "kv2", "kvstore", 16 << 20, 0.5, seed=2)
        m = scrape(a)
        assert value(m["constmig_enclaves"], "constmig_enclaves", state="running") == 2
        # before any migration: every outcome's series is there at 0, so increase() sees the first one
        for outcome in ("done", "rolled-back", "cancelled", "failed", "stranded"):
            assert value(m["constmig_migrations"], "constmig_migrations_total", direction="out",
                         strategy="constmig", outcome=outcome) == 0
        assert value(m["constmig_downtime_seconds"], "constmig_downtime_seconds_count", direction="in",
                     strategy="constmig") == 0
        assert value(m["constmig_migrations_in_flight"], "constmig_migrations_in_flight", direction="out") == 0
        assert value(m["constmig_enclave_deaths"], "constmig_enclave_deaths_total", reason="SIGKILL") == 0
        assert value(m["constmig_agent_info"], "constmig_agent_info", host_id="a", tee="sim") == 1
        assert value(m["constmig_host_memory_available_bytes"], "constmig_host_memory_available_bytes") > 0
        assert value(m["constmig_enclave_heap_bytes"], "constmig_enclave_heap_bytes", enclave="kv") == 32 << 20
        hammer = KVHammer(a, "kv", keys=500, write_ratio=0.0, seed=3)  # its reads fault on missing chunks
        hammer.preload()
        open_now = scrape(a)["constmig_enclave_sessions"]  # asked of each enclave at the scrape
        assert value(open_now, "constmig_enclave_sessions", enclave="kv") >= 1  # the hammer's session
        assert value(open_now, "constmig_enclave_sessions", enclave="kv2") >= 0
        hammer.start()
        try:
            fig = migrate("kv", a, b, "constmig", tracker="fault", max_bandwidth=16 << 20)
        finally:
            report = hammer.stop()
            hammer.close()
        assert fig["faults"] > 0
        out, into = scrape(a), scrape(b)
        assert value(out["constmig_migrations"], "constmig_migrations_total", direction="out",
                     strategy="constmig", outcome="done") == 1
        assert value(into["constmig_migrations"], "constmig_migrations_total", direction="in",
                     strategy="constmig", outcome="done") == 1
        # both ends time the downtime, each under its direction: a fleet sums one of them
        for x, direction in ((out, "out"), (into, "in")):
            assert value(x["constmig_downtime_seconds"], "constmig_downtime_seconds_count", direction=direction,
                         strategy="constmig") == 1
            assert value(x["constmig_downtime_seconds"], "constmig_downtime_seconds_count",
                         direction={"in": "out", "out": "in"}[direction], strategy="constmig") == 0
        assert value(out["constmig_downtime_seconds"], "constmig_downtime_seconds_sum", direction="out",
                     strategy="constmig") == pytest.approx(fig["downtime_ms"] / 1e3)
        assert value(out["constmig_migrated_bytes"], "constmig_migrated_bytes_total", direction="out") == \
            fig["state_bytes"]
        faults = value(out["constmig_demand_fault_seconds"], "constmig_demand_fault_seconds_count", tracker="fault")
        assert faults == fig["faults"]
        assert value(out["constmig_enclaves"], "constmig_enclaves", state="running") == 1
        assert value(into["constmig_enclaves"], "constmig_enclaves", state="running") == 1
        assert value(into["constmig_enclaves"], "constmig_enclaves", state="incoming") == 0  # 0, not absent
        assert value(into["constmig_migrations_in_flight"], "constmig_migrations_in_flight", direction="in") == 0
        # Every call the client made was answered by one agent or the other and counted there (its preload
        # too), and the destination counted calls that came while the enclave was still arriving.
        calls = sum(value(x["constmig_call_seconds"], "constmig_call_seconds_count", moving=mv)
                    for x in (out, into) for mv in ("yes", "no")
                    if any(smp.labels.get("moving") == mv for smp in x["constmig_call_seconds"]))
        assert calls >= report.calls
        assert value(into["constmig_call_seconds"], "constmig_call_seconds_count", moving="yes") > 0


@pytest.mark.e2e
def test_metrics_are_off_unless_asked():
    with LocalCluster(1) as c:
        assert request(c.addrs[0], {"op": "status"})["metrics_url"] is None


@pytest.mark.parametrize("how", ["bad", "busy"])
def test_a_metrics_address_that_cannot_serve_is_one_line(tmp_path, how):
    import socket
    import subprocess
    import sys

    from constmig.host.cluster import free_port

    with socket.create_server(("127.0.0.1", 0)) as busy:
        where = "nowhere" if how == "bad" else f"127.0.0.1:{busy.getsockname()[1]}"
        p = subprocess.run([sys.executable, "-m", "constmig", "agent", "--listen", f"127.0.0.1:{free_port()}",
                            "--state-dir", str(tmp_path / "s"), "--host-id", "m", "--ca-dir", str(tmp_path / "ca"),
                            "--metrics-listen", where], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    want = "bad address 'nowhere'" if how == "bad" else f"cannot serve metrics on {where}: Address already in use"
    assert want in p.stderr, p.stderr
