"""The source agent carries out what host/recovery.py decides: its status, where callers go, the metrics,
the destination's prepared instance, and the one line the requester sees. In process, no sockets: a fake
enclave answers as a real one does, and the destination agent is a fake `open_data` and `request`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from constmig.enclave.lifecycle import Life
from constmig.errors import AgentError, EnclaveError, NoReconnect, PastCommitPoint
from constmig.host import outgoing
from constmig.host.metrics import AgentMetrics
from constmig.host.outgoing import Outgoing
from constmig.host.roster import Hosted, Roster
from constmig.host.status import Status as S
from constmig.host.status import StatusCell
from constmig.host.upkeep import Upkeep
from constmig.wire import control

HERE, THERE = "127.0.0.1:7001", "127.0.0.1:7002"
DONE = {"strategy": "stopcopy", "total_s": 1.5, "downtime_ms": 4.0}

Answer = Callable[[Any, Callable[[dict], None] | None], Any]  # (request, on_progress) -> result, or raise


class FakeEnclave:
    """An enclave process's handle: each op answered by a script (a result, or an error to raise)."""

    def __init__(self, name: str, **script: Any) -> None:
        self.spec = control.LaunchSpec(name, "kvstore", 4 << 20)
        self.proc = SimpleNamespace(returncode=None, pid=os.getpid())
        self.script = script
        self.asked: list[str] = []
        self.stopped = False

    async def call(self, req: Any, fds: Any = (), on_progress: Callable[[dict], None] | None = None) -> Any:
        op = control.op(req)
        self.asked.append(op)
        answer = self.script.get(op, {})
        if isinstance(answer, list):  # one answer per call, in order
            answer = answer.pop(0)
        if callable(answer):
            answer = await answer(req, on_progress)
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    async def stop(self) -> None:
        self.stopped = True

    def pager_status(self) -> dict[str, Any]:
        return {}


class FakeWriter:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)


class FakeSock:
    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class Source:
    """The source agent's parts, without its server: a roster, metrics, and the outgoing side."""

    def __init__(self, tmp_path: Path) -> None:
        self.roster = Roster(tmp_path / "state", "a", HERE)
        self.metrics = AgentMetrics(self.roster.rows)
        self.out = Outgoing(self.roster, Upkeep(None, 10, HERE, self.roster, dict), self.metrics, HERE,
                            tls=None)  # type: ignore[arg-type]

    def host(self, enclave: FakeEnclave, status: S = S.RUNNING, **fields: Any) -> Hosted:
        hosted = Hosted(enclave, StatusCell(status), **fields)  # type: ignore[arg-type]
        self.roster.enclaves[enclave.spec.name] = hosted
        return hosted

    def ended(self, outcome: str, strategy: str = "stopcopy") -> float:
        return self.metrics.registry.get_sample_value(
            "constmig_migrations_total", {"direction": "out", "strategy": strategy, "outcome": outcome}) or 0.0


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return Source(tmp_path)


@pytest.fixture
def destination(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The destination agent: what it was asked, and how it answers data connections (a list, in order)."""
    dest = SimpleNamespace(asked=[], data=[], prepare={"host_id": "b", "tracker": "none", "tracker_reason": "-"})

    def request(addr: str, req: Any, on_progress: Any = None, timeout: Any = None, identity: Any = None) -> Any:
        dest.asked.append(control.op(req))
        if isinstance(dest.prepare, BaseException) and isinstance(req, control.PrepareIn):
            raise dest.prepare
        return dest.prepare if isinstance(req, control.PrepareIn) else "dropped"

    def open_data(addr: str, name: str, timeout: float, channel: str = "main", resume: int = 0) -> FakeSock:
        answer = dest.data.pop(0) if dest.data else FakeSock()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(outgoing.client, "request", request)
    monkeypatch.setattr(outgoing, "open_data", open_data)
    monkeypatch.setattr(outgoing, "FIRST_BACKOFF_S", 0.001)
    monkeypatch.setattr(outgoing, "MAX_BACKOFF_S", 0.001)
    return dest


def migrate(source: Source, name: str = "kv", deadline: float = 30.0) -> Any:
    """Run a migration out to completion; its result, or the AgentError it ended in."""
    async def go() -> Any:
        try:
            return await source.out.migrate(control.Migrate(name=name, to=THERE, strategy="stopcopy",
                                                            resume_deadline=deadline), FakeWriter())  # type: ignore[arg-type]
        except AgentError as e:
            return e
        finally:
            await asyncio.sleep(0.05)  # what it left to run (a drop of the prepared instance) runs
    return asyncio.run(go())


def resume(source: Source, name: str = "kv", deadline: float = 30.0) -> Any:
    async def go() -> Any:
        try:
            return await source.out.resume(control.Resume(name=name, resume_deadline=deadline),
                                           FakeWriter())  # type: ignore[arg-type]
        except AgentError as e:
            return e
    return asyncio.run(go())


def handed_off_then(error: BaseException) -> Any:
    """The enclave passes its commit point (the progress frame), then the link breaks."""
    async def answer(req: Any, on_progress: Callable[[dict], None] | None) -> BaseException:
        assert on_progress is not None
        on_progress({"phase": "lineage_released", "release": "cd" * 32})
        on_progress({"phase": "handed_off"})
        await asyncio.sleep(0.01)  # the agent sees the frame before the error, as from the enclave's thread
        return error
    return answer


# ---- the migration's own failure ----


def test_aborted_before_the_handoff_runs_on_here(source, destination):
    hosted = source.host(FakeEnclave("kv", migrate_out=EnclaveError("integrity check failed", Life.RUNNING)))
    err = migrate(source)
    assert isinstance(err, AgentError) and str(err) == "integrity check failed"
    assert hosted.status is S.RUNNING and hosted.settled.is_set() and "kv" not in source.roster.moved
    assert source.ended("rolled-back") == 1 and destination.asked == ["prepare_in"]  # it wiped its own


def test_a_destination_that_cannot_prepare_leaves_the_enclave_running(source, destination):
    destination.prepare = AgentError(f"cannot reach agent {THERE}")
    hosted = source.host(FakeEnclave("kv"))
    err = migrate(source)
    assert str(err) == f"cannot reach agent {THERE}" and hosted.status is S.RUNNING
    assert hosted.handle.asked == ["check_export"] and source.ended("rolled-back") == 1


def test_a_data_connection_refused_drops_the_prepared_instance(source, destination):
    destination.data = [AgentError("destination refused the data connection")]
    hosted = source.host(FakeEnclave("kv"))
    err = migrate(source)
    assert "refused the data connection" in str(err) and hosted.status is S.RUNNING
    assert destination.asked == ["prepare_in", "drop_in"]


def test_a_cancel_says_so_and_counts_as_cancelled(source, destination):
    async def cancelled(req: Any, on_progress: Any) -> BaseException:
        hosted.cancel = "operator"
        return EnclaveError("migration cancelled before the commit point (operator)", Life.RUNNING)

    hosted = source.host(FakeEnclave("kv", migrate_out=cancelled))
    err = migrate(source)
    assert str(err) == (f"migration of 'kv' cancelled before its commit point (operator); it keeps running on "
                        f"{HERE} with all its data")
    assert hosted.status is S.RUNNING and source.ended("cancelled") == 1 and source.ended("rolled-back") == 0


def test_past_the_commit_point_without_a_deadline_fails_for_good(source, destination):
    hosted = source.host(FakeEnclave("kv", migrate_out=handed_off_then(EnclaveError("link lost", Life.HANDED_OFF))))
    err = migrate(source, deadline=0)
    assert str(err) == "link lost" and hosted.status is S.FAILED and source.ended("failed") == 1
    assert source.roster.moved["kv"] == THERE  # callers go where it runs now
    assert hosted.release == "cd" * 32


def test_past_the_commit_point_it_pauses_and_a_reconnect_finishes_it(source, destination):
    enclave = FakeEnclave("kv", migrate_out=handed_off_then(EnclaveError("link lost", Life.HANDED_OFF)),
                          resume_out=[EnclaveError("reconnect cut", Life.HANDED_OFF), DONE])
    hosted = source.host(enclave)
    destination.data = [FakeSock(), AgentError("connection refused"), FakeSock()]
    result = migrate(source)
    assert not isinstance(result, Exception), result
    assert enclave.asked == ["check_export", "migrate_out", "resume_out", "resume_out"]
    assert result["to"] == THERE and result["migrate_s"] == 1.5 and result["tracker_reason"] == "-"
    assert S.PAUSED in hosted.cell.history and S.RESUMING in hosted.cell.history
    assert "kv" not in source.roster.enclaves and source.roster.moved["kv"] == THERE and enclave.stopped
    assert source.roster.history[-1]["direction"] == "out"


# ---- reconnects (a resume by request runs the same loop) ----


def paused(source: Source, **script: Any) -> Hosted:
    return source.host(FakeEnclave("kv", **script), S.FAILED, moving_to=THERE, strategy="stopcopy",
                       release="ef" * 32)


def test_a_destination_that_keeps_saying_it_has_no_copy_strands_it(source, destination, tmp_path):
    hosted = paused(source)
    source.roster.checkpoints.mkdir(parents=True)
    for v in (2, 9, 10):
        (source.roster.checkpoints / f"kv.v{v}.ckpt").write_bytes(b"")
    gone = NoReconnect("no enclave named 'kv' here takes a reconnect")
    destination.data = [gone, gone, gone]
    err = resume(source)
    newest = source.roster.checkpoints / "kv.v10.ckpt"
    assert "The enclave is stranded" in str(err) and "no enclave named 'kv' here takes a reconnect" in str(err)
    assert f"constmig restore {newest} --agent {THERE} --name kv --release {'ef' * 32}" in str(err)
    assert hosted.status is S.FAILED and hosted.handle.asked == []


def test_a_refusal_between_no_copy_answers_starts_the_count_again(source, destination):
    gone = NoReconnect("no copy")
    destination.data = [gone, gone, AgentError("connection refused"), gone, gone, FakeSock()]
    hosted = paused(source, resume_out=DONE)
    result = resume(source)
    assert result["to"] == THERE and hosted.handle.asked == ["resume_out"]


def test_the_destinations_abort_gives_the_enclave_back(source, destination):
    hosted = paused(source, resume_out=EnclaveError("the destination gave the migration up", Life.RUNNING))
    source.roster.moved["kv"] = THERE
    err = resume(source)
    assert str(err) == "the destination gave the migration up"
    assert hosted.status is S.RUNNING and hosted.moving_to == "" and "kv" not in source.roster.moved


def test_an_enclave_that_cannot_say_where_it_is_fails_the_resume(source, destination):
    hosted = paused(source, resume_out=EnclaveError("enclave 'kv' process exited"))
    err = resume(source)
    assert str(err) == "migration of 'kv' cannot be resumed: enclave 'kv' process exited"
    assert hosted.status is S.FAILED


def test_the_deadline_ends_the_reconnects_with_the_retry_command(source, destination):
    destination.data = [AgentError("connection refused")] * 10_000
    hosted = paused(source)
    err = resume(source, deadline=0.1)
    assert "could not be resumed within 0.1 s" in str(err) and "last: connection refused" in str(err)
    assert f"constmig migrate kv --from {HERE} --resume" in str(err)
    assert "there is no checkpoint of it here" in str(err) and hosted.status is S.FAILED


def test_only_a_failed_migration_is_resumed(source, destination):
    source.host(FakeEnclave("kv"), S.PAUSED, moving_to=THERE, strategy="stopcopy")
    assert "reconnecting already" in str(resume(source))
    source.host(FakeEnclave("kv2"))
    assert "no paused migration to resume" in str(resume(source, "kv2"))
    assert "no enclave named 'nope'" in str(resume(source, "nope"))


# ---- a cancel that comes too late says so by its type (host/fleet.py acts on it) ----


def cancel(source: Source, name: str = "kv") -> Any:
    async def go() -> Any:
        try:
            return await source.out.cancel_request(control.Cancel(name=name))
        except AgentError as e:
            return e
    return asyncio.run(go())


@pytest.mark.parametrize("status", [S.HANDED_OFF, S.PAUSED])
def test_a_cancel_past_the_commit_point_is_refused_as_too_late(source, status):
    source.host(FakeEnclave("kv"), status)
    err = cancel(source)
    assert isinstance(err, PastCommitPoint) and "passed its commit point" in str(err)


def test_a_cancel_after_the_move_is_refused_as_too_late(source):
    source.roster.moved["kv"] = THERE
    err = cancel(source)
    assert isinstance(err, PastCommitPoint) and f"is over: it runs on {THERE}" in str(err)
    err = cancel(source, "other")
    assert type(err) is AgentError and "no enclave named 'other'" in str(err)


@pytest.mark.parametrize(("state", "late"), [(Life.HANDED_OFF, True), (Life.RUNNING, False)])
def test_the_enclaves_refusal_is_too_late_only_when_it_handed_off(source, state, late):
    refusal = EnclaveError("the migration passed its commit point" if late else "no migration out is in progress",
                           state)
    hosted = source.host(FakeEnclave("kv", cancel_out=refusal), S.MIGRATING_OUT)
    err = cancel(source)
    assert isinstance(err, PastCommitPoint) is late and "cannot cancel the migration of 'kv'" in str(err)
    assert hosted.cancel is None  # a later failure is not a cancel


# ---- one word per ending: the metrics, the log and the history agree ----


def _cut_reconnects(source: Source, destination: SimpleNamespace) -> Any:
    destination.data = [AgentError("connection refused")] * 10_000
    paused(source)
    return resume(source, deadline=0.05)


def _no_copy(source: Source, destination: SimpleNamespace) -> Any:
    destination.data = [NoReconnect("no copy")] * 3
    paused(source)
    return resume(source)


def _abort_on_reconnect(source: Source, destination: SimpleNamespace) -> Any:
    paused(source, resume_out=EnclaveError("the destination gave the migration up", Life.RUNNING))
    return resume(source)


def _prepare_unreachable(source: Source, destination: SimpleNamespace) -> Any:
    destination.prepare = AgentError(f"cannot reach agent {THERE}")
    source.host(FakeEnclave("kv"))
    return migrate(source)


def _cancelled(source: Source, destination: SimpleNamespace) -> Any:
    async def answer(req: Any, on_progress: Any) -> BaseException:
        source.roster.enclaves["kv"].cancel = "operator"
        return EnclaveError("migration cancelled before the commit point (operator)", Life.RUNNING)
    source.host(FakeEnclave("kv", migrate_out=answer))
    return migrate(source)


ENDINGS = {  # each way a migration out can end that this file can produce -> its one word
    "aborted before the handoff": ("rolled-back", lambda s, d: (
        s.host(FakeEnclave("kv", migrate_out=EnclaveError("integrity check failed", Life.RUNNING))), migrate(s))[1]),
    "destination unreachable": ("rolled-back", _prepare_unreachable),
    "data connection refused": ("rolled-back", lambda s, d: (
        setattr(d, "data", [AgentError("refused")]), s.host(FakeEnclave("kv")), migrate(s))[2]),
    "cancelled": ("cancelled", _cancelled),
    "link lost past the commit point": ("failed", lambda s, d: (s.host(FakeEnclave(
        "kv", migrate_out=handed_off_then(EnclaveError("link lost", Life.HANDED_OFF)))), migrate(s, deadline=0))[1]),
    "enclave process gone on a resume": ("failed", lambda s, d: (paused(
        s, resume_out=EnclaveError("enclave 'kv' process exited")), resume(s))[1]),
    "reconnects out of time": ("failed", _cut_reconnects),
    "destination has no copy": ("stranded", _no_copy),
    "destination's abort on a reconnect": ("rolled-back", _abort_on_reconnect),
    "reconnect finishes it": ("done", lambda s, d: (s.host(FakeEnclave(
        "kv", migrate_out=handed_off_then(EnclaveError("link lost", Life.HANDED_OFF)), resume_out=[DONE])),
        migrate(s))[1]),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_each_ending_has_one_word_in_metrics_log_and_history(source, destination, caplog, ending):
    word, run = ENDINGS[ending]
    with caplog.at_level("INFO", logger="constmig.agent"):
        run(source, destination)
    from constmig.host.metrics import OUTCOMES

    counted = {o: source.ended(o) for o in OUTCOMES}
    assert counted == {o: float(o == word) for o in OUTCOMES}, counted
    assert source.roster.history[-1]["outcome"] == word
    said = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "migration-ended"]
    assert [r.fields["outcome"] for r in said] == [word]
    assert said[0].fields["enclave"] == "kv" and said[0].fields["direction"] == "out"
    assert f"ended {word}:" in said[0].getMessage() if word != "done" else " done: " in said[0].getMessage()


@pytest.mark.parametrize(("answer", "word"), [(DONE, "done"), (AgentError("integrity check failed"), "failed")])
def test_an_incoming_migration_has_one_word_too(source, caplog, answer, word):
    from constmig.host.incoming import Incoming

    incoming = Incoming(source.roster, Upkeep(None, 10, HERE, source.roster, dict), source.metrics, "a",
                        None)  # type: ignore[arg-type]
    hosted = source.host(FakeEnclave("kv", migrate_in=answer), S.INCOMING, strategy="stopcopy")
    with caplog.at_level("INFO", logger="constmig.agent"):
        asyncio.run(incoming._run(hosted, [], 1.0))
    got = source.metrics.registry.get_sample_value(
        "constmig_migrations_total", {"direction": "in", "strategy": "stopcopy", "outcome": word})
    assert got == 1 and source.roster.history[-1]["outcome"] == word
    assert [r.fields["outcome"] for r in caplog.records if hasattr(r, "fields")] == [word]
