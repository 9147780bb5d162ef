"""`constmig bench load` and `constmig bench soak --quick`, run as a user would, checked from their JSON.

Load: a small fleet at a fixed rate through one migration per variant must lose nothing and answer
nothing wrongly, and every phase (before, during, after) must have calls and a p99. Soak: six
migrations back and forth under load must keep the state checksum equal every time and leave no
process, file descriptor or mapping behind (within the soak's stated slack).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from constmig.bench.soak import SLACK_FDS, SLACK_MAPS, enclave_files

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def constmig(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout)


# ---- bench load ----

@pytest.fixture(scope="module")
def load(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    out = tmp_path_factory.mktemp("load")
    p = constmig("bench", "load", "--clients", "4", "--rate", "100", "--duration", "8", "--heap", "64M",
                 "--out", str(out), timeout=150)
    assert (out / "load.json").exists(), p.stderr[-2000:]
    return p, json.loads((out / "load.json").read_text()), out


def test_load_loses_nothing_and_answers_nothing_wrong(load):
    p, doc, _ = load
    assert p.returncode == 0, p.stderr[-2000:]
    assert doc["ok"] is True
    assert len(doc["runs"]) >= 2  # stopcopy and constmig-access everywhere, constmig-fault where it works
    for run in doc["runs"]:
        t = run["totals"]
        assert "error" not in run["migration"], run["migration"]
        assert t["lost"] == 0 and t["wrong"] == 0, (run["variant"], t)
        assert t["unverified"] == 0 and t["unsent"] == 0
        assert t["verified_keys"] == 4 * doc["config"]["keys_per_client"]
        assert t["scheduled"] == 800 and t["calls"] == 800  # 100/s for 8 s, every one sent
        assert t["ok"] + t["failed"] == t["calls"]


def test_load_every_phase_has_calls_and_a_p99(load):
    _, doc, _ = load
    for run in doc["runs"]:
        start, end = run["window_s"]
        assert 3.0 < start < end < 8.0  # the migration ran midway, inside the load
        for phase in ("before", "during", "after"):
            ph = run["phases"][phase]
            assert ph["calls"] > 0, (run["variant"], phase)
            assert ph["p99_ms"] is not None and ph["p50_ms"] <= ph["p99_ms"] <= ph["max_ms"]
        assert sum(run["phases"][ph]["calls"] for ph in ("before", "during", "after")) == run["totals"]["calls"]


def test_load_json_schema_and_plot(load):
    p, doc, out = load
    assert {"machine", "started", "config", "skipped", "runs", "ok"} <= set(doc)
    assert {"clients", "rate", "duration_s", "heap_bytes", "agents"} <= set(doc["config"])
    for run in doc["runs"]:
        assert {"variant", "strategy", "tracker", "migration", "window_s", "totals", "phases", "timeline",
                "ok"} <= set(run)
        assert {"calls", "ok", "failed", "retried", "retries", "p50_ms", "p99_ms", "max_ms", "lost", "wrong"} \
            <= set(run["totals"])
        assert {"downtime_ms", "total_s"} <= set(run["migration"])
        assert run["timeline"] and {"t", "calls", "p99_ms"} <= set(run["timeline"][0])
    assert (out / "load_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p99" in p.stderr  # the table


def test_load_bad_option_is_one_line():
    p = constmig("bench", "load", "--heap", "12Q", "--out", "/tmp/never", timeout=30)
    assert p.returncode != 0 and "Traceback" not in p.stderr


# ---- bench soak --quick ----

@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    out = tmp_path_factory.mktemp("soak")
    p = constmig("bench", "soak", "--quick", "--out", str(out), timeout=150)
    assert (out / "soak.json").exists(), p.stderr[-2000:]
    return p, json.loads((out / "soak.json").read_text()), out


def test_soak_checksums_equal_every_time(soak):
    _, doc, _ = soak
    migs = doc["migrations"]
    assert len(migs) == 6 and not any(m.get("error") for m in migs)
    assert {m["variant"] for m in migs} >= {"stopcopy", "constmig-access"}
    assert [m["from"] for m in migs] == ["a", "b"] * 3  # back and forth
    for m in migs:
        assert m["checksum_equal"] and m["checksum_before"] == m["checksum_after"]
        assert m["state_changed"]  # writes between migrations: each one moved a new state
        assert m["read_back_bad"] == 0 and m["client_wrong"] == 0 and m["client_errors"] == 0
        assert m["client_calls"] > 0  # the client read throughout
    assert len({m["checksum_after"] for m in migs}) == 6


def test_soak_leaves_no_processes_fds_or_mappings(soak):
    _, doc, _ = soak
    leaks = [p for p in doc["problems"] if p["kind"] != "disk"]
    assert not leaks, leaks
    for m in doc["migrations"]:
        left, hosting = m["counters"][m["from"]], m["counters"][m["to"]]
        assert left["procs"] == 0 and left["zombies"] == 0  # enclave and pager gone from the host it left
        assert hosting["children"] == 1 and hosting["procs"] <= 2  # the enclave (and its pager, kept for a reconnect)
        assert m["counters"]["strays"] == 0
    before, after = doc["idle_before"], doc["idle_after"]
    for host in ("a", "b"):
        assert after[host]["procs"] == 0 and after[host]["zombies"] == 0
        assert after[host]["fds"] <= before[host]["fds"] + SLACK_FDS
        assert after[host]["maps"] <= max(m["counters"][host]["maps"] for m in doc["migrations"]) + SLACK_MAPS
        assert after[host]["checkpoints"] == 0
    assert after["strays"] == 0


def test_soak_json_and_plot(soak):
    p, doc, out = soak
    assert {"machine", "config", "migrations", "problems", "notes", "idle_before", "idle_after", "summary",
            "duration_s", "ok"} <= set(doc)
    assert doc["config"]["migrations"] == 6 and doc["config"]["heap_bytes"] == 64 << 20
    assert {"downtime_ms", "total_s", "settle_s", "counters", "wall_s"} <= set(doc["migrations"][0])
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert p.returncode == (0 if doc["ok"] else 1)
    if p.returncode:
        assert p.stderr.strip().splitlines()[-1].startswith("error: soak found")


def test_soak_leaves_no_files_of_a_departed_enclave(soak):
    _, doc, _ = soak
    for m in doc["migrations"]:
        assert not enclave_files(m["counters"][m["from"]]["run_files"]), m["i"]
    assert not doc["idle_after"]["a"]["run_files"] and not doc["idle_after"]["b"]["run_files"]
