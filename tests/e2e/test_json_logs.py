"""A real agent with `--log-format json`: its lines are objects a collector can select by event, enclave,
host and migration id, and the migration's start and end lines share that id."""

from __future__ import annotations

import json

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
