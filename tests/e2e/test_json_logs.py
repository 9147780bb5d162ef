"""A real agent with `--log-format json`: its lines are objects a collector can select by event, enclave,
host and migration id, and the migration's start and end lines share that id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import launch_filled, migrate


@pytest.mark.e2e
def test_json_log_lines_carry_the_events_fields():
    with LocalCluster(2, agent_args=["--log-format", "json"]) as c:
        a, b = c.addrs
        launch_filled(a, "kv", "kvstore", 8 << 20, 0.5, seed=1)
        migrate("kv", a, b, "stopcopy")
        request(b, {"op": "stop", "name": "kv"})
        lines = [json.loads(x) for x in (c.base / "agent-a.log").read_text().splitlines() if x.startswith("{")]
        into = [json.loads(x) for x in (c.base / "agent-b.log").read_text().splitlines() if x.startswith("{")]
    events = {(x.get("event"), x.get("outcome")): x for x in lines if "event" in x}
    assert {x["host"] for x in lines} == {"a"} and {x["host"] for x in into} == {"b"}
    assert events[("enclave-started", None)]["enclave"] == "kv"
    started, ended = events[("migration-started", None)], events[("migration-ended", "done")]
    assert started["migration"] == ended["migration"] and len(started["migration"]) == 16
    assert ended["enclave"] == "kv" and ended["to"] == b and ended["direction"] == "out"
    arrived = [x for x in into if x.get("event") == "migration-ended"]
    assert [(x["enclave"], x["direction"], x["outcome"]) for x in arrived] == [("kv", "in", "done")]
    assert any(x.get("event") == "enclave-stopped" and x["enclave"] == "kv" for x in into)


@pytest.mark.e2e
def test_an_enclave_that_dies_is_logged_at_once_with_its_signal_and_a_stop_is_not():
    """Issue 34: a crash (here SIGSEGV, as a missed access under the Access Tracker would be) is in the
    agent's log at once, with the signal, before anyone asks for its status; a stop asked for is not."""
    import os
    import signal
    import time

    with LocalCluster(1, agent_args=["--log-format", "json"]) as c:
        a = c.addrs[0]
        for name in ("kv", "quiet"):
            request(a, {"op": "run", "name": name, "app": "kvstore", "heap": 8 << 20, "config": {}})
        started = {x["enclave"]: x for x in _lines(c.base / "agent-a.log") if x.get("event") == "enclave-started"}
        assert set(started) == {"kv", "quiet"}, started
        pid = _pid(c.base, "kv")
        os.kill(pid, signal.SIGSEGV)
        request(a, {"op": "stop", "name": "quiet"})
        deadline = time.monotonic() + 10
        while not (died := [x for x in _lines(c.base / "agent-a.log") if x.get("event") == "enclave-died"]):
            assert time.monotonic() < deadline, "no enclave-died line within 10 s"
            time.sleep(0.05)
        time.sleep(0.5)  # the stop's exit, had it been taken for a death, would be logged by now
        died = [x for x in _lines(c.base / "agent-a.log") if x.get("event") == "enclave-died"]
    assert [(x["enclave"], x["reason"], x["pid"], x["level"]) for x in died] == [("kv", "SIGSEGV", pid, "warning")]
    assert "killed by SIGSEGV" in died[0]["message"]


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


def _pid(base, name: str) -> int:
    """The enclave process's pid, from /proc: the runtime whose --socket is this enclave's."""
    import os

    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"constmig.enclave.runtime" in cmd and any(str(base).encode() in x and x.endswith(f"/{name}.sock".encode())
                                                          for x in cmd):
                return int(d)
    raise AssertionError(f"no enclave process for {name}")
