"""What the source agent does when a migration out fails: a pure function from what happened to what to do.

The enclave's commit point decides everything (docs/architecture.md, "Failure handling and recovery"):
before it the source still owns the enclave and runs it on; past it the destination may run it, so the
source may never run it again unless the destination proves it did not (an authenticated ABORT, which
the enclave reports by answering RUNNING). The agent learns where it is from the enclave's answer
(its lifecycle state), from its own status when the enclave was not asked, and from the destination
agent's word during a reconnect. `decide` turns that into one `Action`; the agent carries it out
(host/outgoing.py). No sockets, no clock: the agent measures and passes the figures, and
tests/host/test_recovery.py checks the table.
"""

from __future__ import annotations

import enum
import shlex
from dataclasses import dataclass
from pathlib import Path

from constmig.enclave.lifecycle import Life
from constmig.host.status import Status

GONE_ANSWERS = 3  # a paused migration stops reconnecting after the destination says this often it has no copy

# The agent's statuses before it saw the handoff: an enclave that fails in one of these without saying
# where it is (not asked, or its process gone) has not passed its commit point as far as anyone knows.
BEFORE_COMMIT = frozenset({Status.PREPARING_OUT, Status.MIGRATING_OUT})


class Cause(enum.Enum):
    """Who reported the failure, which says what `Failure.state` means."""

    ENCLAVE = "enclave"  # the source enclave answered with an error and its lifecycle state (None: it could
    #                      not say, e.g. its process is gone)
    AGENT = "agent"  # one of the agent's own steps failed and the enclave was not asked: preparing the
    #                  destination, opening a data connection (before the stop, or for a reconnect)
    NO_COPY = "no-copy"  # during a reconnect, the destination agent answered that no copy there takes it


class Action(enum.Enum):
    ROLL_BACK = "roll-back"  # the enclave runs here again with all its data (before the commit point, or the
    #                          destination proved it never ran it)
    PAUSE = "pause"  # past the commit point: keep every chunk, reconnect (again) after a backoff
    FAIL = "fail"  # no reconnect can help: the enclave never runs here again and keeps its state
    OUT_OF_TIME = "out-of-time"  # paused past the resume deadline: fail, naming the retry and restore commands
    STRANDED = "stranded"  # the destination keeps saying it has no copy: fail, naming the restore command


@dataclass(frozen=True)
class Failure:
    """What the agent knows when a migration out, or one reconnect of it, fails."""

    cause: Cause
    status: Status  # the agent's status for the enclave at the failure (EXITED if its process is gone)
    state: Life | None = None  # the enclave's lifecycle in its answer (Cause.ENCLAVE only)
    reconnecting: bool = False  # a reconnect attempt of a migration that paused past its commit point
    resume_deadline: float = 0.0  # how long a paused migration may reconnect (0: it may not)
    time_left: float = 0.0  # of that deadline, now
    no_copy_answers: int = 0  # the destination's "no copy" answers in a row, this one included


def decide(f: Failure) -> Action:
    """The one rule for a failed migration out (see the module doc); total over every input."""
    if f.cause is Cause.NO_COPY:
        if f.no_copy_answers >= GONE_ANSWERS:  # a live destination agent says so again and again
            return Action.STRANDED
        return Action.PAUSE if f.time_left > 0 else Action.OUT_OF_TIME
    state = f.state if f.cause is Cause.ENCLAVE else _unasked(f)
    if state is Life.RUNNING or (state is None and f.status in BEFORE_COMMIT):
        return Action.ROLL_BACK
    if state is not Life.HANDED_OFF or f.resume_deadline <= 0:
        return Action.FAIL
    return Action.PAUSE if f.time_left > 0 else Action.OUT_OF_TIME


def _unasked(f: Failure) -> Life | None:
    """Where an enclave the agent did not ask is: a reconnect begins only past the commit point and its
    failed connection changed nothing, so handed off; before the stop, unknown (its status decides)."""
    return Life.HANDED_OFF if f.reconnecting else None


# ---- what the operator is told (pure text; the agent finds the checkpoint) ----

def restore_command(checkpoint: Path | str, agent: str, name: str, release: str = "") -> str:
    """The one way a restore command is printed: each word quoted for a shell, so a checkpoint path (the
    agent's state folder) with a space or a shell character still runs as printed, and as nothing else."""
    return shlex.join(["constmig", "restore", str(checkpoint), "--agent", agent, "--name", name,
                       *(["--release", release] if release else [])])


def restore_advice(name: str, to: str, release: str, checkpoint: Path | None) -> str:
    """How the newest checkpoint restores on the destination host, where the lineage went at the commit
    point (with the release code, should the destination have died before it handled COMMIT)."""
    if checkpoint is None:
        return "there is no checkpoint of it here, so its data is lost"
    return (f"its newest checkpoint here, {checkpoint}, restores on the destination host (the lineage moved "
            f"there at the commit point): {restore_command(checkpoint, to, name, release)}"
            " (copy the file there first if the hosts share no folder); writes since it are lost")


def stranded_message(name: str, to: str, answer: str, advice: str) -> str:
    """The destination has no copy to reconnect to: the enclave is stranded (the source may not run it: a
    dead copy and one its host hides look the same), and what restores it."""
    return (f"migration of {name!r} to {to} cannot be resumed: the destination answers \"{answer}\" (its copy "
            f"died, or its host hides it). The enclave is stranded: this source keeps every chunk but may not "
            f"run it, since it cannot tell a dead copy from a hidden one. To recover, {advice}")


def out_of_time_message(name: str, to: str, source: str, deadline: float, attempts: int, last: str,
                        advice: str) -> str:
    """Reconnects gave up at the deadline: the source still holds what the destination lacks."""
    return (f"migration of {name!r} to {to} paused after the handoff and could not be resumed within "
            f"{deadline:g} s ({attempts} attempts; last: {last}); this source keeps every chunk the "
            f"destination lacks: retry with `constmig migrate {name} --from {source} --resume`; if the "
            f"destination lost its copy, {advice}")
