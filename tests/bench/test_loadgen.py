"""The Fleet's pure parts: schedule, percentiles, phases, and the lost/wrong accounting (fake clients)."""

from __future__ import annotations

import threading
import time

import pytest

from constmig.bench.loadgen import (
    CallRecord,
    Fleet,
    WriteBook,
    call_stats,
    fleet_schedule,
    latency_timeline,
    phase_of,
    phase_stats,
)
from constmig.errors import AgentError

# ---- schedule ----


def test_schedule_spreads_the_aggregate_rate_over_the_clients():
    sched = fleet_schedule(rate=100.0, duration=2.0, clients=3)
    flat = sorted(t for ts in sched for t in ts)
    assert len(flat) == 200
    assert flat[0] == 0.0 and flat[-1] == pytest.approx(1.99)
    assert all(b - a == pytest.approx(0.01) for a, b in zip(flat, flat[1:], strict=False))
    assert [len(ts) for ts in sched] == [67, 67, 66]
    assert sched[1][:2] == [pytest.approx(0.01), pytest.approx(0.04)]  # client i takes every N-th slot


@pytest.mark.parametrize("args", [(0, 1, 1), (10, 0, 1), (10, 1, 0), (-1, 1, 1)])
def test_schedule_refuses_empty_runs(args):
    with pytest.raises(ValueError):
        fleet_schedule(*args)


# ---- phases (percentiles: test_stats.py) ----


def rec(t: float, lat_ms: float, ok: bool = True, retries: int = 0, op: str = "get") -> CallRecord:
    return CallRecord(0, op, t, t, lat_ms / 1e3, ok, retries)


def test_phase_is_taken_from_the_scheduled_time():
    w = (5.0, 6.0)
    assert phase_of(4.999, w) == "before"
    assert phase_of(5.0, w) == "during"
    assert phase_of(5.999, w) == "during"
    assert phase_of(6.0, w) == "after"
    assert phase_of(100.0, None) == "before"


def test_phase_stats_counts_and_percentiles():
    records = [rec(t / 10, 1.0) for t in range(50)]  # 0.0 .. 4.9 s: before
    records += [rec(5.0, 100.0, retries=2), rec(5.5, 300.0, ok=False, retries=5, op="put")]  # during
    records += [rec(6.0 + t / 10, 2.0) for t in range(40)]  # after
    ph = phase_stats(records, (5.0, 6.0), duration=10.0)
    assert ph["before"]["calls"] == 50 and ph["before"]["p99_ms"] == 1.0 and ph["before"]["span_s"] == 5.0
    d = ph["during"]
    assert (d["calls"], d["ok"], d["failed"], d["retried"], d["retries"]) == (2, 1, 1, 2, 7)
    assert d["p99_ms"] == 100.0 and d["max_ms"] == 100.0  # a failed call has no latency to count
    assert d["puts"] == 1 and d["span_s"] == 1.0 and d["rate"] == 2.0
    assert ph["after"]["calls"] == 40 and ph["after"]["p50_ms"] == 2.0 and ph["after"]["span_s"] == 4.0


def test_stats_of_nothing_have_no_percentiles():
    s = call_stats([], 0.0)
    assert s["calls"] == 0 and s["p99_ms"] is None and s["rate"] is None


def test_timeline_buckets():
    tl = latency_timeline([rec(0.1, 1.0), rec(0.2, 3.0), rec(0.3, 5.0, ok=False)], bucket_s=0.25)
    assert [b["t"] for b in tl] == [0.0, 0.25]
    assert tl[0]["calls"] == 2 and tl[0]["max_ms"] == 3.0
    assert tl[1]["failed"] == 1 and tl[1]["p99_ms"] is None


# ---- judging answers ----


def test_writebook_judges_reads():
    b = WriteBook()
    for v in (b"v1", b"v2"):
        b.sending("k", v)
        b.acknowledged("k", v)
    assert b.judge("k", b"v2") == "ok"
    assert b.judge("k", b"v1") == "lost"  # an acknowledged write was rolled back
    assert b.judge("k", None) == "lost"
    assert b.judge("k", b"never") == "wrong"
    b.sending("k", b"v3")
    b.failed("k", b"v3")  # maybe applied, maybe not: both answers are right
    assert b.judge("k", b"v3") == "ok" and b.judge("k", b"v2") == "ok"
    assert b.judge("other", None) == "ok"  # never written: nothing to find


# ---- the fleet against fake clients ----


class FakeKV:
    """A kvstore behind N fake connections; hooks decide when a call fails or misbehaves."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.calls = 0
        self.fail_next: dict[int, int] = {}  # client -> its next N put/get calls raise
        self.drop_puts_of: set[str] = set()  # acknowledged but not stored: a lost write
        self.corrupt: set[str] = set()  # read back as garbage
        self.slow_first_call_s = 0.0

    def conn(self, i: int) -> FakeConn:
        return FakeConn(self, i)


class FakeConn:
    def __init__(self, kv: FakeKV, i: int) -> None:
        self.kv, self.i = kv, i
        self.closed = False

    def call(self, method: str, *args):
        kv = self.kv
        with kv.lock:
            kv.calls += 1
            first = kv.calls == 1 + kv_preload_calls(kv)
            if kv.fail_next.get(self.i, 0) > 0 and method in ("put", "get"):
                kv.fail_next[self.i] -= 1
                raise AgentError("agent at fake closed the connection")
        if first and kv.slow_first_call_s:
            time.sleep(kv.slow_first_call_s)
        if method == "put_many":
            for k, v in args[0]:
                kv.data[k] = v
            return len(args[0])
        if method == "put":
            if args[0] not in kv.drop_puts_of:
                kv.data[args[0]] = args[1]
            return True
        if method == "get":
            return kv.data.get(args[0])
        if method == "get_many":
            return [b"garbage" if k in kv.corrupt else kv.data.get(k) for k in args[0]]
        raise AssertionError(method)

    def close(self) -> None:
        self.closed = True


def kv_preload_calls(kv: FakeKV) -> int:
    return getattr(kv, "preload_calls", 0)


def run_fleet(kv: FakeKV, **kw) -> tuple[Fleet, object]:
    opts = {"clients": 3, "rate": 600.0, "duration": 0.3, "keys_per_client": 5, "backoff": 0.001,
            "retries": 3, "write_ratio": 0.5, "seed": 4}
    opts.update(kw)
    fleet = Fleet("fake:1", "kv", client_factory=kv.conn, **opts)
    fleet.preload()
    kv.preload_calls = kv.calls
    report = fleet.verify(fleet.start().join())
    fleet.close()
    return fleet, report


def test_a_clean_run_sends_every_call_and_loses_nothing():
    kv = FakeKV()
    fleet, r = run_fleet(kv)
    t = r.totals()
    assert t["scheduled"] == 180 and t["calls"] == 180 and t["unsent"] == 0
    assert t["ok"] == 180 and t["failed"] == 0 and t["retried"] == 0
    assert t["lost"] == 0 and t["wrong"] == 0 and t["verified_keys"] == 15
    assert t["puts"] > 0 and t["gets"] > 0
    assert all(c.closed for c in fleet.conns)
    # open loop: no call went out before its time
    assert all(x.sent >= x.scheduled - 1e-6 for x in r.records)


def test_failed_attempts_are_retried_and_counted():
    kv = FakeKV()
    kv.fail_next = {1: 2}  # client 1's first call fails twice, then succeeds on its third attempt
    _, r = run_fleet(kv)
    t = r.totals()
    assert t["retried"] == 1 and t["retries"] == 2 and t["failed"] == 0 and t["lost"] == 0


def test_a_call_that_keeps_failing_counts_as_failed_not_lost():
    kv = FakeKV()
    kv.fail_next = {0: 4}  # one call of client 0: the first attempt and all 3 retries
    _, r = run_fleet(kv)
    t = r.totals()
    assert t["failed"] == 1 and t["retried"] == 1 and t["lost"] == 0 and t["wrong"] == 0
    assert r.errors and "closed the connection" in r.errors[0]


def test_an_acknowledged_write_that_vanishes_is_lost():
    kv = FakeKV()
    kv.drop_puts_of = {"fleet-0-0", "fleet-1-3"}
    _, r = run_fleet(kv, write_ratio=1.0, keys_per_client=5)
    # every key got puts; the two dropped ones read back as their preload value: older than acknowledged
    assert r.lost == 2 and r.wrong_final == 0


def test_garbage_read_back_is_wrong():
    kv = FakeKV()
    kv.corrupt = {"fleet-2-1"}
    _, r = run_fleet(kv)
    assert r.wrong_final == 1 and r.lost == 0 and r.wrong >= 1


def test_a_stale_read_during_the_run_is_counted():
    kv = FakeKV()
    kv.drop_puts_of = {"fleet-0-0"}
    _, r = run_fleet(kv, clients=1, keys_per_client=1, write_ratio=0.5, rate=400.0, duration=0.2)
    assert r.stale_reads > 0 and r.wrong >= r.stale_reads and r.lost == 1


def test_latency_counts_from_the_schedule_so_a_stall_charges_the_calls_behind_it():
    kv = FakeKV()
    kv.slow_first_call_s = 0.15
    _, r = run_fleet(kv, clients=1, rate=200.0, duration=0.3)
    first, second = r.records[0], r.records[1]
    assert first.latency >= 0.15
    # the second call was due 5 ms in but could only go after the first: it waited ~145 ms
    assert second.sent - second.scheduled >= 0.1
    assert second.latency >= 0.1


@pytest.mark.e2e
def test_bench_calls_compares_sealed_and_plain_on_one_enclave(tmp_path):
    """`constmig bench calls`: both paths measured in one run, answers checked, the plot beside the JSON."""
    from constmig.bench.calls import run_calls

    doc = run_calls(rounds=2, calls=50, out=tmp_path, quiet=True)
    for path in ("sealed", "plain"):
        assert len(doc[path]["calls_per_s"]) == 2 and doc[path]["calls_per_s_median"] > 0
        assert 0 < doc[path]["latency_us_p50"] <= doc[path]["latency_us_p99"]
    assert len(doc["sealed_over_plain_calls_per_s"]["per_round"]) == 2
    assert doc["session_open_ms"] > 0
    assert (tmp_path / "calls.json").exists() and (tmp_path / "calls.png").stat().st_size > 1000
