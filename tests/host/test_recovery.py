"""What the source agent does when a migration out fails (host/recovery.py): a table of cases, as h11 tests
its state machine, then the rule's safety properties over every input, then what the operator is told.
No sockets, no agent: tests/host/test_outgoing.py checks that the agent carries the actions out."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import pytest

from constmig.enclave.lifecycle import Life
from constmig.host.recovery import (
    BEFORE_COMMIT,
    GONE_ANSWERS,
    Action,
    Cause,
    Failure,
    decide,
    out_of_time_message,
    restore_advice,
    restore_command,
    stranded_message,
)
from constmig.host.status import Status as S

A = Action
DEADLINE = 30.0


def first(cause: Cause, status: S, state: Life | None = None, deadline: float = DEADLINE) -> Failure:
    """The migration's own failure (before any reconnect): the whole deadline is left."""
    return Failure(cause, status, state, resume_deadline=deadline, time_left=deadline)


def retry(cause: Cause, state: Life | None = None, left: float = 10.0, no_copy: int = 0,
          status: S = S.RESUMING) -> Failure:
    """A failed reconnect attempt of a migration that paused past its commit point."""
    return Failure(cause, status, state, reconnecting=True, resume_deadline=DEADLINE, time_left=left,
                   no_copy_answers=no_copy)


CASES: list[tuple[str, Failure, Action]] = [
    # ---- the migration itself fails ----
    ("destination unreachable while preparing", first(Cause.AGENT, S.PREPARING_OUT), A.ROLL_BACK),
    ("cancelled while preparing", first(Cause.AGENT, S.PREPARING_OUT), A.ROLL_BACK),
    ("enclave process gone while preparing", first(Cause.AGENT, S.EXITED), A.FAIL),
    ("aborted before the handoff", first(Cause.ENCLAVE, S.MIGRATING_OUT, Life.RUNNING), A.ROLL_BACK),
    ("enclave could not say, before the handoff", first(Cause.ENCLAVE, S.MIGRATING_OUT), A.ROLL_BACK),
    ("enclave could not say, after the handoff", first(Cause.ENCLAVE, S.HANDED_OFF), A.FAIL),
    ("enclave process died mid-migration", first(Cause.ENCLAVE, S.EXITED), A.FAIL),
    ("destination's ABORT after the handoff: reclaimed", first(Cause.ENCLAVE, S.HANDED_OFF, Life.RUNNING),
     A.ROLL_BACK),
    ("link lost past the commit point", first(Cause.ENCLAVE, S.HANDED_OFF, Life.HANDED_OFF), A.PAUSE),
    ("link lost before the handoff frame arrived", first(Cause.ENCLAVE, S.MIGRATING_OUT, Life.HANDED_OFF),
     A.PAUSE),
    ("past the commit point with no resume deadline",
     first(Cause.ENCLAVE, S.HANDED_OFF, Life.HANDED_OFF, deadline=0), A.FAIL),
    ("stopped but neither running nor handed off", first(Cause.ENCLAVE, S.MIGRATING_OUT, Life.STOPPING), A.FAIL),
    ("state wiped", first(Cause.ENCLAVE, S.MIGRATING_OUT, Life.DESTROYED), A.FAIL),
    # ---- a reconnect attempt fails ----
    ("connection refused: try again", retry(Cause.AGENT, status=S.PAUSED), A.PAUSE),
    ("connection refused at the deadline", retry(Cause.AGENT, left=0.0, status=S.PAUSED), A.OUT_OF_TIME),
    ("connection refused, enclave gone meanwhile", retry(Cause.AGENT, status=S.EXITED), A.PAUSE),
    ("reconnect broke, still handed off", retry(Cause.ENCLAVE, Life.HANDED_OFF), A.PAUSE),
    ("reconnect broke past the deadline", retry(Cause.ENCLAVE, Life.HANDED_OFF, left=-0.5), A.OUT_OF_TIME),
    ("destination answered ABORT: reclaimed", retry(Cause.ENCLAVE, Life.RUNNING), A.ROLL_BACK),
    ("enclave could not say during a reconnect", retry(Cause.ENCLAVE), A.FAIL),
    ("enclave wiped during a reconnect", retry(Cause.ENCLAVE, Life.DESTROYED), A.FAIL),
    ("no copy, once", retry(Cause.NO_COPY, no_copy=1, status=S.PAUSED), A.PAUSE),
    ("no copy, once, at the deadline", retry(Cause.NO_COPY, no_copy=1, left=0.0, status=S.PAUSED), A.OUT_OF_TIME),
    ("no copy, again", retry(Cause.NO_COPY, no_copy=GONE_ANSWERS - 1, status=S.PAUSED), A.PAUSE),
    ("no copy, the last time", retry(Cause.NO_COPY, no_copy=GONE_ANSWERS, status=S.PAUSED), A.STRANDED),
    ("no copy, the last time, past the deadline", retry(Cause.NO_COPY, no_copy=GONE_ANSWERS, left=-1.0),
     A.STRANDED),
    # ---- before any attempt (the loop asks with a failure of the agent's own) ----
    ("paused, time left", retry(Cause.AGENT, left=DEADLINE, status=S.PAUSED), A.PAUSE),
    ("resumed by request after it failed", retry(Cause.AGENT, left=0.1, status=S.PAUSED), A.PAUSE),
]


@pytest.mark.parametrize(("failure", "action"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_table(failure: Failure, action: Action) -> None:
    assert decide(failure) is action


def every_failure() -> list[Failure]:
    """Every combination of the inputs (a destination agent's 'no copy' answers only a reconnect)."""
    return [Failure(cause, status, state, reconnecting, deadline, left, no_copy)
            for cause, status, state, reconnecting, deadline, left, no_copy in itertools.product(
                Cause, S, [None, *Life], (False, True), (0.0, DEADLINE), (-1.0, 0.0, 5.0), range(GONE_ANSWERS + 2))
            if reconnecting or cause is not Cause.NO_COPY]


ALL = every_failure()


def test_it_is_total_and_every_action_is_reachable() -> None:
    assert {decide(f) for f in ALL} == set(Action)


def test_an_enclave_that_says_it_handed_off_never_runs_here_again() -> None:
    """No fork: past the commit point only the enclave's own RUNNING (the destination's authenticated ABORT)
    brings it back; its HANDED_OFF, a 'no copy' answer, or a failed reconnect never do."""
    for f in ALL:
        if decide(f) is A.ROLL_BACK:
            assert f.cause is not Cause.NO_COPY
            if f.cause is Cause.ENCLAVE:
                assert f.state is Life.RUNNING or (f.state is None and f.status in BEFORE_COMMIT), f
            else:
                assert not f.reconnecting and f.status in BEFORE_COMMIT, f


def test_it_reconnects_only_past_the_commit_point_with_time_left() -> None:
    """A pause starts only from the enclave's own HANDED_OFF with a resume deadline, and goes on only while
    reconnects are being tried and time is left."""
    for f in ALL:
        if decide(f) is A.PAUSE:
            assert f.time_left > 0, f
            assert f.reconnecting or (f.cause is Cause.ENCLAVE and f.state is Life.HANDED_OFF
                                      and f.resume_deadline > 0), f
            assert f.cause is not Cause.ENCLAVE or f.state is Life.HANDED_OFF, f


def test_running_is_believed_whatever_the_agent_thought() -> None:
    """The enclave's RUNNING is its own word that its destination never ran it: roll back from any status."""
    for status in S:
        assert decide(first(Cause.ENCLAVE, status, Life.RUNNING)) is A.ROLL_BACK
        assert decide(retry(Cause.ENCLAVE, Life.RUNNING, status=status)) is A.ROLL_BACK


def test_stranded_takes_the_destinations_word_again_and_again() -> None:
    actions = [decide(retry(Cause.NO_COPY, no_copy=n, status=S.PAUSED)) for n in range(1, GONE_ANSWERS + 1)]
    assert actions == [A.PAUSE] * (GONE_ANSWERS - 1) + [A.STRANDED]


# ---- what the operator is told ----


def test_restore_advice_names_the_command_on_the_destination(tmp_path: Path) -> None:
    ckpt = tmp_path / "kv.v7.ckpt"
    text = restore_advice("kv", "10.0.0.2:7002", "ab" * 32, ckpt)
    assert f"constmig restore {ckpt} --agent 10.0.0.2:7002 --name kv --release {'ab' * 32}" in text
    assert "writes since it are lost" in text and "\n" not in text
    assert "--release" not in restore_advice("kv", "b:1", "", ckpt)
    assert restore_advice("kv", "b:1", "ab", None) == "there is no checkpoint of it here, so its data is lost"


def test_stranded_and_out_of_time_say_what_to_run() -> None:
    advice = restore_advice("kv", "b:2", "", Path("/s/checkpoints/kv.v3.ckpt"))
    stranded = stranded_message("kv", "b:2", "no enclave named 'kv' here takes a reconnect", advice)
    assert "stranded" in stranded and "may not run it" in stranded and stranded.endswith(advice)
    late = out_of_time_message("kv", "b:2", "a:1", 30.0, 12, "connection refused", advice)
    assert "within 30 s (12 attempts; last: connection refused)" in late
    assert "constmig migrate kv --from a:1 --resume" in late and late.endswith(advice)
    assert "\n" not in stranded + late


def test_a_restore_command_runs_as_printed_whatever_the_state_folder_is_called() -> None:
    """The checkpoint's path is the agent's state folder, which the host names: a space or a shell
    character in it is one word of the printed command, never a second command."""
    ckpt = "/srv/host a/state; touch pwned/checkpoints/kv.v3.ckpt"
    printed = restore_command(ckpt, "10.0.0.2:7001", "kv", release="abc")
    assert shlex.split(printed) == ["constmig", "restore", ckpt, "--agent", "10.0.0.2:7001", "--name", "kv",
                                    "--release", "abc"]
    assert restore_command("/srv/a/kv.v1.ckpt", "10.0.0.2:7001", "kv") == \
        "constmig restore /srv/a/kv.v1.ckpt --agent 10.0.0.2:7001 --name kv"  # plain paths stay as they were
