"""`constmig bench prefetch`: heap order against --prefetch used-last, alternately, under a zipf client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from constmig.bench.prefetch import summarize

pytestmark = pytest.mark.e2e


def test_both_orders_run_alternately_and_every_acknowledged_write_reads_back():
    p = subprocess.run([sys.executable, "-m", "constmig", "bench", "prefetch", "--heap", "64M", "--repeat", "2",
                        "--tracker", "access", "--json", "-"], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [r["order"] for r in doc["runs"]] == ["heap", "used-last", "used-last", "heap"]
    assert doc["ok"] and all(r["lost_writes"] == 0 and r["client_wrong"] == 0 for r in doc["runs"])
    for r in doc["runs"]:
        assert r["tracker"] == "access" and r["client_calls"] > 0 and r["ops_s_during"] > 0
        assert ("hot_chunks" in r) == (r["order"] == "used-last")  # only the reordered stream watched the app
    hot = [r for r in doc["runs"] if r["order"] == "used-last"]
    assert all(0 < r["hot_chunks"] <= r["touched_chunks"] and 0 <= r["hot_demanded"] <= r["hot_chunks"] for r in hot)
    assert set(doc["orders"]) == {"heap", "used-last"} and "client_gap_ms" in doc["used_last_vs_heap"]


def test_ratios_pair_each_repeat_s_two_orders():
    runs = [{"order": "heap", "client_gap_ms": 100.0, "demand_chunks": 40},
            {"order": "used-last", "client_gap_ms": 50.0, "demand_chunks": 10, "hot_chunks": 20, "hot_demanded": 5},
            {"order": "used-last", "client_gap_ms": 90.0, "demand_chunks": 30, "hot_chunks": 10, "hot_demanded": 5},
            {"order": "heap", "client_gap_ms": 60.0, "demand_chunks": 30}]
    doc = summarize(runs)
    assert doc["used_last_vs_heap"]["client_gap_ms"] == {"median": 1.0, "min": 0.5, "max": 1.5}
    assert doc["used_last_vs_heap"]["demand_chunks"]["min"] == 0.25
    assert doc["orders"]["used-last"]["hot_demanded_share"] == {"median": 0.375, "min": 0.25, "max": 0.5}
    assert doc["orders"]["heap"]["client_gap_ms"]["median"] == 80.0
