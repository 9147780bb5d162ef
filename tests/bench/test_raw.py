"""`constmig bench raw`: the machine's bound for a heap stream, measured between two real processes."""

from __future__ import annotations

import json
import subprocess
import sys

from constmig.bench.raw import stream_vs_raw
from constmig.kernel.uffd import preflight as uffd_problem
from constmig.native.engine import available as native_built


def _cm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_bench_raw_measures_both_ways_into_the_heap():
    p = _cm("bench", "raw", "--heap", "32M", "--repeat", "2", "--json", "-")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    modes = ["plain"] + (["uffd"] if uffd_problem() is None else [])
    for mode in modes:
        f = doc[mode]
        assert len(f["runs"]) == 2 and 0 < f["min"] <= f["raw_gbps"] <= f["max"], f
    assert doc["raw_gbps"] == doc["plain"]["raw_gbps"]
    if native_built():  # the native bound, beside the Python one (docs/native.md)
        f = doc["native"]
        assert len(f["runs"]) == 2 and 0 < f["min"] <= f["raw_gbps"] <= f["max"], f
        assert doc["native_gbps"] == f["raw_gbps"]
        assert doc["native_vs_python"] == round(f["raw_gbps"] / doc["raw_gbps"], 2)
    else:
        assert doc["native_gbps"] is None and "native engine was not built" in doc["skipped"]["native"]
    floor = doc["floor"]
    assert 0 < floor["tcp_pingpong_us"]["p50"] <= floor["tcp_pingpong_us"]["p99"]
    if uffd_problem() is not None:
        assert "userfaultfd unusable here" in doc["skipped"]["uffd"]
        assert "userfaultfd unusable here" in floor["skipped"]
    else:
        f = floor["demand_fault_us"]
        assert f["n"] == 400 and 0 < f["p50"] <= f["p99"]
        # The fault crosses between processes twice (app -> pager -> source and back), each at least a
        # TCP round trip's worth of wake-ups: it cannot beat one round trip.
        assert f["p50"] > floor["tcp_pingpong_us"]["p50"]


def test_the_floor_pager_serves_real_bytes():
    """The floor's fault path installs the source's bytes: a fault that found a zero page (its pager
    gone) raises instead of counting."""
    import pytest

    if uffd_problem() is not None:
        pytest.skip(f"userfaultfd unusable here: {uffd_problem()}")
    from constmig.bench.floor import demand_faults

    got = demand_faults(30)
    assert len(got) == 30 and all(0 < x < 5 for x in got)


def test_bench_raw_refuses_a_size_that_is_not_whole_mib():
    p = _cm("bench", "raw", "--heap", "3000K")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--heap must be a whole number of MiB" in p.stderr


def test_stream_vs_raw_divides_by_the_bound_of_the_same_way_in():
    raw = {"plain": {"raw_gbps": 2.0}, "uffd": {"raw_gbps": 1.0}}
    assert stream_vs_raw({"tracker": "fault", "stream_gbps": 0.5}, raw) == 0.5
    assert stream_vs_raw({"tracker": "access", "stream_gbps": 0.5}, raw) == 0.25
    assert stream_vs_raw({"tracker": "none"}, raw) is None  # stop-and-copy streams nothing after the stop
    assert stream_vs_raw({"tracker": "fault", "stream_gbps": 0.5}, {"plain": {"raw_gbps": 2.0}}) == 0.25


def test_bench_raw_says_so_when_the_native_engine_is_missing(monkeypatch):
    """Without the engine the Python bound is still measured, and the native one is skipped with the reason."""
    import constmig.native.engine
    from constmig.bench.raw import run_raw

    monkeypatch.setattr(constmig.native.engine, "available", lambda: False)
    monkeypatch.setattr(constmig.native.engine, "why_unavailable", lambda: "the native engine was not built (test)")
    doc = run_raw(4 << 20, 1, quiet=True, floor_faults=0)
    assert doc["plain"]["raw_gbps"] > 0 and "native" not in doc
    assert doc["native_gbps"] is None and doc["native_vs_python"] is None
    assert doc["skipped"]["native"].startswith("the native engine was not built (test)")
