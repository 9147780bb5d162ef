"""`constmig metrics targets`: Prometheus file_sd targets from the fleet directory on a real etcd, each
live agent that serves metrics once, labelled with its host id; bad input is one line and exit 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from constmig.host.directory import Directory, blocking
from constmig.host.targets import file_sd


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", "metrics", "targets", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_group_per_agent_that_serves_metrics():
    groups, without, elsewhere = file_sd({
        "10.0.0.2:7001": {"host_id": "b", "metrics_url": "http://10.0.0.2:9464/metrics"},
        "10.0.0.1:7001": {"host_id": "a", "metrics_url": "http://10.0.0.1:9464/metrics"},
        "10.0.0.3:7001": {"host_id": "c", "metrics_url": None},
        "10.0.0.4:7001": {"host_id": "d", "metrics_url": "nonsense"},
    })
    assert groups == [{"targets": ["10.0.0.1:9464"], "labels": {"host_id": "a", "listen": "10.0.0.1:7001",
                                                               "__metrics_path__": "/metrics", "__scheme__": "http"}},
                      {"targets": ["10.0.0.2:9464"], "labels": {"host_id": "b", "listen": "10.0.0.2:7001",
                                                               "__metrics_path__": "/metrics", "__scheme__": "http"}}]
    assert without == ["10.0.0.3:7001", "10.0.0.4:7001"] and elsewhere == []


def test_a_record_that_points_prometheus_at_another_host_is_left_out():
    """The directory is the hosts' word: a host that writes another address into its record's metrics URL
    (to have the fleet's Prometheus scrape, or probe, something that is not its agent) gets no target."""
    groups, without, elsewhere = file_sd({
        "10.0.0.1:7001": {"host_id": "a", "metrics_url": "http://10.0.0.1:9464/metrics"},
        "10.0.0.6:7001": {"host_id": "evil", "metrics_url": "http://169.254.169.254:80/latest/meta-data"},
        "10.0.0.7:7001": {"host_id": "evil2", "metrics_url": "http://10.0.0.1:9464/metrics"},  # a's, as its own
        "not-an-address": {"host_id": "x", "metrics_url": "http://not-an-address:9464/metrics"},
    })
    assert [g["targets"] for g in groups] == [["10.0.0.1:9464"]] and without == []
    assert elsewhere == ["10.0.0.6:7001", "10.0.0.7:7001", "not-an-address"]


def test_the_live_agents_of_the_directory_become_targets(etcd_url, tmp_path):
    async def register(d: Directory) -> None:
        await d.register("10.9.5.1:7001", {"host_id": "a", "listen": "10.9.5.1:7001",
                                           "metrics_url": "http://10.9.5.1:9464/metrics"})
        await d.register("10.9.5.2:7001", {"host_id": "b", "listen": "10.9.5.2:7001", "metrics_url": None})

    blocking(etcd_url, register)
    out = tmp_path / "targets.json"
    p = cli("--etcd", etcd_url, "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text()) == [{"targets": ["10.9.5.1:9464"], "labels": {
        "host_id": "a", "listen": "10.9.5.1:7001", "__metrics_path__": "/metrics", "__scheme__": "http"}}]
    assert p.stderr.strip() == ("1 agent(s) serve no metrics (start them with --metrics-listen): 10.9.5.2:7001")
    assert not list(tmp_path.glob(".*.tmp"))  # replaced in one rename
    printed = cli("--etcd", etcd_url)  # --out - (the default) prints it
    assert printed.returncode == 0 and json.loads(printed.stdout) == json.loads(out.read_text())


@pytest.mark.parametrize(("args", "said"), [
    ((), "error: name the fleet directory: --etcd URL (or set CONSTMIG_ETCD)"),
    (("--etcd", "ftp://h:2379"), "only http:// and https://"),
    (("--etcd", "http://127.0.0.1:1", "--out", "/nonexistent-folder/t.json"), "/nonexistent-folder"),
])
def test_bad_input_is_one_line(args, said, monkeypatch):
    monkeypatch.delenv("CONSTMIG_ETCD", raising=False)
    p = cli(*args)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and said in p.stderr, p.stderr


def test_an_unreachable_directory_is_one_line(monkeypatch):
    from constmig.host.cluster import free_port

    p = cli("--etcd", f"http://127.0.0.1:{free_port()}")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "unreachable" in p.stderr, p.stderr
