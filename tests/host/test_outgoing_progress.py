"""What is left of a migration out while it runs (issue 33): the source agent keeps its enclave's latest
progress frames for `status` (`outgoing`) and the metrics, forgets them when the migration ends, and
keeps its outcome and duration in the history. In process, no sockets: test_outgoing.py's fake enclave
sends the frames a real one sends through the agent's progress callback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from test_outgoing import THERE, FakeEnclave, FakeSock, FakeWriter, Source

from constmig.enclave.lifecycle import Life
from constmig.errors import AgentError, EnclaveError
from constmig.host import outgoing
from constmig.host.metrics import AgentMetrics
from constmig.host.outgoing import seen
from constmig.host.status import Status as S
from constmig.progress import outgoing_line, print_status
from constmig.wire import control

MIB = 1 << 20
GAUGES = ("constmig_migration_remaining_bytes", "constmig_migration_dirty_rate_bytes_per_second",
          "constmig_migration_ack_rate_bytes_per_second", "constmig_migration_throttle_ratio",
          "constmig_migration_round")
# what rounds.py sends: a round's chunks as they go, then what the round left and at which rates
ROUND_2 = {"phase": "round", "done": 3 * MIB, "total": 8 * MIB, "round": 2, "throttle": 0.2}
ROUND_2_END = {"phase": "round_end", "round": 2, "left": 6 * MIB, "dirty_rate": 3 * MIB, "rate": 12 * MIB,
               "throttle": 0.3, "held_calls": 7, "held_s": 0.25}


def start(**kw: Any) -> control.OutgoingProgress:
    return control.OutgoingProgress(to=THERE, strategy="precopy", started=100.0, **kw)


# ---- one frame after another (the pure part) ----


def test_a_round_running_leaves_what_it_has_still_to_send():
    p = seen(start(), ROUND_2)
    assert (p.phase, p.round, p.left_bytes, p.throttle) == ("round", 2, 5 * MIB, 0.2)
    assert p.dirty_bytes_per_s is None and p.ack_bytes_per_s is None and p.eta_s is None  # no round ended yet


def test_a_round_end_gives_what_is_left_its_rates_and_the_time_it_takes():
    p = seen(seen(start(), ROUND_2), ROUND_2_END)
    assert (p.round, p.left_bytes, p.dirty_bytes_per_s, p.ack_bytes_per_s, p.throttle) == \
        (2, 6 * MIB, 3 * MIB, 12 * MIB, 0.3)
    assert p.eta_s == 0.5  # 6 MiB at the 12 MiB/s the destination acknowledged
    assert (p.held_calls, p.held_s) == (7, 0.25)  # what holding the writers cost so far
    nxt = seen(p, {**ROUND_2, "round": 3, "done": 2 * MIB, "total": 6 * MIB})
    assert (nxt.round, nxt.left_bytes, nxt.ack_bytes_per_s, nxt.eta_s) == (3, 4 * MIB, 12 * MIB, pytest.approx(1 / 3,
                                                                                                            abs=1e-3))


def test_frames_without_figures_or_with_bad_ones_change_only_the_phase():
    p = seen(seen(start(), ROUND_2_END), {"phase": "handed_off"})
    assert p.phase == "handed_off" and p.left_bytes == 6 * MIB and p.round == 2
    odd = seen(p, {"phase": "round_end", "left": "lots", "rate": None, "round": True, "dirty_rate": [1]})
    assert msgspec.structs.replace(odd, phase="handed_off") == p
    stop = seen(start(), {"phase": "copy", "done": 9 * MIB, "total": 8 * MIB})  # never below nothing
    assert stop.left_bytes == 0 and stop.round is None and stop.eta_s is None


def test_old_answers_without_outgoing_still_decode():
    old = {"host_id": "a", "listen": "h:1", "enclaves": {}, "moved": {}, "migrations": [], "died": {},
           "metrics_url": None, "directory": None, "admin": {}, "memory": {}}
    st = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=control.AgentStatus)
    assert st.outgoing == {}
    new = msgspec.structs.replace(st, outgoing={"kv": seen(start(), ROUND_2_END)})
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=control.AgentStatus)
    assert back.outgoing["kv"].eta_s == 0.5 and back == new


# ---- through the agent: its progress callback, status, metrics, the end ----


@pytest.fixture
def source(tmp_path) -> Source:
    src = Source(tmp_path)
    src.metrics = AgentMetrics(src.roster.rows, src.roster.outgoing)  # the agent's wiring (agent.py)
    src.out.metrics = src.metrics
    return src


@pytest.fixture
def destination(monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination agent that prepares and takes every data connection."""
    monkeypatch.setattr(outgoing.client, "request", lambda addr, req, *a, **kw: {
        "host_id": "b", "tracker": "none", "tracker_reason": "-"} if isinstance(req, control.PrepareIn) else "ok")
    monkeypatch.setattr(outgoing, "open_data", lambda *a, **kw: FakeSock())


def gauges(source: Source, name: str = "kv") -> dict[str, float | None]:
    return {g: source.metrics.registry.get_sample_value(g, {"enclave": name}) for g in GAUGES}


def sending(frames: list[dict], then: Any, looked: dict[str, Any], source: Source) -> Callable[..., Any]:
    """migrate_out: the frames, from a thread as the real enclave's arrive; what status and the metrics
    say after them (in `looked`), then the answer (a result, or an error)."""
    async def answer(req: Any, on_progress: Callable[[dict], None] | None) -> Any:
        assert on_progress is not None
        await asyncio.to_thread(lambda: [on_progress(f) for f in frames])
        await asyncio.sleep(0.01)  # the agent's loop takes them in
        looked.update(outgoing=source.roster.outgoing(), gauges=gauges(source))
        return then
    return answer


def migrate(source: Source, deadline: float = 30.0) -> Any:
    """A pre-copy migration of kv to completion: its result, or the AgentError it ended in."""
    async def go() -> Any:
        try:
            return await source.out.migrate(control.Migrate(name="kv", to=THERE, strategy="precopy",
                                                            resume_deadline=deadline), FakeWriter())  # type: ignore[arg-type]
        except AgentError as e:
            return e
    return asyncio.run(go())


def test_status_and_metrics_show_what_is_left_while_it_runs_and_nothing_after(source, destination):
    looked: dict[str, Any] = {}
    done = {"strategy": "precopy", "total_s": 1.5, "downtime_ms": 4.0}
    source.host(FakeEnclave("kv", migrate_out=sending([ROUND_2, ROUND_2_END], done, looked, source)))
    assert gauges(source) == dict.fromkeys(GAUGES)  # nothing before it starts
    result = migrate(source)
    assert result["to"] == THERE
    p = looked["outgoing"]["kv"]
    assert (p.to, p.strategy, p.phase, p.round, p.left_bytes, p.eta_s) == (THERE, "precopy", "round_end", 2,
                                                                           6 * MIB, 0.5)
    assert p.elapsed_s > 0
    assert looked["gauges"] == {"constmig_migration_remaining_bytes": 6 * MIB,
                                "constmig_migration_dirty_rate_bytes_per_second": 3 * MIB,
                                "constmig_migration_ack_rate_bytes_per_second": 12 * MIB,
                                "constmig_migration_throttle_ratio": 0.3, "constmig_migration_round": 2}
    assert source.roster.outgoing() == {} and gauges(source) == dict.fromkeys(GAUGES)  # moved away: gone
    last = source.roster.history[-1]
    assert (last["name"], last["direction"], last["outcome"], last["migrate_s"]) == ("kv", "out", "done", 1.5)
    assert 0 < last["total_s"] < 10 and last["ended"] > 0


@pytest.mark.parametrize(("error", "outcome", "status"), [
    (EnclaveError("integrity check failed", Life.RUNNING), "rolled-back", S.RUNNING),
    (EnclaveError("link lost", Life.HANDED_OFF), "failed", S.FAILED),  # past its commit point, no deadline
])
def test_a_migration_that_ends_short_leaves_its_outcome_and_duration(source, destination, error, outcome, status):
    looked: dict[str, Any] = {}
    frames = [ROUND_2, ROUND_2_END] + ([{"phase": "handed_off"}] if status is S.FAILED else [])
    hosted = source.host(FakeEnclave("kv", migrate_out=sending(frames, error, looked, source)))
    assert isinstance(migrate(source, deadline=0), AgentError)
    assert looked["outgoing"]["kv"].round == 2 and looked["gauges"]["constmig_migration_round"] == 2
    assert hosted.status is status and hosted.outgoing is None and source.roster.outgoing() == {}
    assert gauges(source) == dict.fromkeys(GAUGES)
    last = source.roster.history[-1]
    assert (last["name"], last["to"], last["strategy"], last["outcome"]) == ("kv", THERE, "precopy", outcome)
    assert 0 < last["total_s"] < 10 and last["error"] == str(error) and last["ended"] > 0
    # what it had reached, its own figures never having come
    assert (last["round"], last["left_bytes"], last["throttle"], last["held_calls"], last["held_s"]) == \
        (2, 6 * MIB, 0.3, 7, 0.25)
    assert last["phase"] == ("handed_off" if status is S.FAILED else "round_end")
    assert source.ended(outcome, "precopy") == 1  # the metrics' outcome is the same word


# ---- what a person reads ----


def test_status_prints_a_line_per_migration_out_and_each_outcome(capsys: pytest.CaptureFixture[str]):
    p = msgspec.to_builtins(msgspec.structs.replace(seen(start(), ROUND_2_END), elapsed_s=3.25))
    assert outgoing_line(p) == (f"migrating to {THERE} (precopy) for 3.2 s, round 2, 6.0 MiB left, written at "
                                "3.0 MiB/s, acknowledged at 12.0 MiB/s, throttle 30% (7 calls held 0.25 s), ~0.5 s to send what is "
                                "left")
    print_status({"host_id": "a", "listen": "h:1", "enclaves": {"kv": {"status": "migrating-out"}},
                  "outgoing": {"kv": p},
                  "migrations": [{"direction": "out", "name": "kv0", "strategy": "precopy", "outcome": "cancelled",
                                  "total_s": 0.75, "ended": 1.7e9}]})
    out = capsys.readouterr().out
    assert "kv: migrating to" in out and "~0.5 s to send" in out
    assert "cancelled" in out and "0.75 s" in out and "2023-11-1" in out, out  # when it ended


def test_a_stop_and_copy_shows_what_is_left_and_no_round():
    line = outgoing_line(msgspec.to_builtins(seen(start(), {"phase": "copy", "done": MIB, "total": 4 * MIB})))
    assert "(precopy) for 0.0 s, copy, 3.0 MiB left" in line and "round" not in line and "~" not in line
