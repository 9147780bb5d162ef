"""Faults at every phase of a migration on the namespace testbed, each checked against the table in
faults.py (which docs/reliability.md renders): who runs the enclave afterwards, what the migration came
to, and whether every write a client saw acknowledged can still be read.

One testbed serves every scenario (module fixture); each run starts from a clean bed (links up, no
loss, both agents alive and empty). A scenario whose outcome today is a bug is checked twice from the
same run: `test_fault` proves today's outcome (the table), `test_known_bug` asserts the correct one
as a strict xfail, so fixing the bug turns it into an XPASS failure that asks for the table to move.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import faults as F  # tests/reliability/faults.py
import harness as H
import pytest
from tb_helpers import NETNS_REASON, needs_nft, unique_name

from constmig.client import EnclaveClient
from constmig.errors import ConstmigError
from constmig.host import client
from constmig.kernel.uffd import preflight
from constmig.migration.strategies import ROUNDS
from constmig.testbed import LinkSpec, Testbed

pytestmark = [pytest.mark.reliability, pytest.mark.root, pytest.mark.e2e,
              pytest.mark.skipif(NETNS_REASON is not None, reason=NETNS_REASON or "")]

_UFFD = preflight()


class OutcomeMismatch(AssertionError):
    """The run ended differently from the table (as opposed to the harness or the bed failing)."""


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise OutcomeMismatch(msg)


# ----- the plan: how each scenario's phase and fault become a trigger, a fault and parameters --------

def plan(s: F.Scenario) -> tuple[H.At | None, H.Fault, H.Params]:
    at: H.At | None
    if s.phase == "attest":
        at = H.HANDSHAKE_M1
    elif s.phase == "stop":
        at = H.chunk(5) if s.strategy == "stopcopy" else H.STATE
    elif s.phase == "commit" and s.strategy in ROUNDS:  # round ends in front: find them by length
        at = H.COMMIT_BY_LEN if s.fault.startswith("link") else H.READY_BY_LEN
    elif s.phase == "commit":  # a cut loses COMMIT in flight; a killed agent dies once READY is out
        at = H.COMMIT if s.fault.startswith("link") else H.READY
    elif s.phase == "rounds":  # round 1 sends every allocated chunk: the 5th is in it
        at = H.chunk(5)
    elif s.phase == "stream" and s.strategy in ROUNDS:  # the round's chunks come first: count demands
        at = H.chunk(1, "demand")
    elif s.phase == "stream":
        at = H.chunk(3, "any")
    elif s.phase == "done":
        at = H.DONE_BY_LEN if s.strategy in ROUNDS else H.DONE
    else:
        at = None
    fault = {
        "link": H.Fault("link", "b", seconds=F.OUTAGE),
        "link-long": H.Fault("link", "b", seconds=F.OUTAGE_DONE),
        "link-flap": H.Fault("link", "b", seconds=1.0),
        "loss1": H.Fault("loss", loss_pct=1.0),
        "loss5": H.Fault("loss", loss_pct=5.0),
        "kill-src": H.Fault("kill-agent", "a", restart_after=0.5),
        # killed "just before DONE": the DONE the proxy holds was never sent
        "kill-dst": H.Fault("kill-agent", "b", restart_after=0.5, drop=s.phase == "done"),
        "kill-dst-enclave": H.Fault("kill-enclave", "b"),
    }[s.fault]
    lossy = s.fault.startswith("loss")
    params = H.Params(s.strategy, s.tracker if s.tracker != "none" else "access",
                      timeout=10.0 if lossy else F.TIMEOUT, resume_deadline=s.resume_deadline,
                      max_bandwidth=F.STREAM_BW if s.phase == "stream" else 0.0,
                      checkpoint=bool(s.mitigation))
    return at, fault, params


# ----- what a run left behind, captured once (both tests judge the same snapshot) --------------------

@dataclass
class Observed:
    outcome: H.Outcome
    statuses: dict[str, dict[str, Any] | None]  # host -> the agent's entry for the enclave
    serves: dict[str, str]  # host -> "ok" or the error a `stats` call there got
    reads: dict[str, int | str]  # host that runs -> wrong/missing acknowledged writes, or the read error
    restore: str = ""  # mitigation: "ok: ..." or the error of restoring the checkpoint
    restored_reads: int | str = ""
    leaks: list[str] = field(default_factory=list)  # enclave processes no agent accounts for
    dead_listed: list[str] = field(default_factory=list)  # hosts listing as running an enclave whose process died


def _stats(addr: str) -> str:
    try:
        with EnclaveClient(addr, H.NAME, timeout=30) as c:
            c.call("stats")
        return "ok"
    except ConstmigError as e:
        return str(e) or type(e).__name__


def observe(tb: Testbed, s: F.Scenario, o: H.Outcome) -> Observed:
    # A copy that is going away (a wiped destination, a finished source) may take a moment to leave.
    H.wait_until(lambda: not any(_leaving(tb, h) for h in ("a", "b")), 10)
    statuses = {h: H.status(tb.addr(h))["enclaves"].get(H.NAME) for h in ("a", "b")}
    serves = {h: _stats(tb.addr(h)) for h in ("a", "b")}
    reads: dict[str, int | str] = {}
    runs, _ = H.where(tb)
    for h in runs:
        try:
            reads[h] = H.read_back(tb.addr(h), o.acked)
        except ConstmigError as e:
            reads[h] = str(e)
    obs = Observed(o, statuses, serves, reads)
    obs.dead_listed = [h for h in ("a", "b") if (statuses[h] or {}).get("status") == "running"
                       and not H.enclave_pids(tb, h, H.NAME)]
    obs.leaks = [h for h in ("a", "b") if statuses[h] is None and _has_enclave_process(tb, h)]
    if s.mitigation:
        host = "a" if s.fault == "kill-src" else "b"
        path = o.notes["checkpoint"]["path"]
        code = re.search(r"--release ([0-9a-f]{64})", o.error or "")  # what the source printed, if it did
        try:
            client.request(tb.addr(host), {"op": "restore", "path": path, "name": "kvr",
                                           **({"release": code.group(1)} if code else {})}, timeout=60)
            obs.restore = f"ok on {host}"
            try:
                obs.restored_reads = H.read_back(tb.addr(host), o.notes["acked_at_checkpoint"], name="kvr")
            except ConstmigError as e:
                obs.restored_reads = str(e)
        except ConstmigError as e:
            obs.restore = str(e)
    return obs


def _leaving(tb: Testbed, h: str) -> bool:
    info = H.status(tb.addr(h))["enclaves"].get(H.NAME)
    return info is not None and info.get("status") in ("incoming", "migrating-out", "resuming")


def _has_enclave_process(tb: Testbed, h: str) -> bool:
    """An enclave process of the scenario's enclave is still there after 5 s (a stopping one may linger briefly)."""
    return not H.wait_until(lambda: not H.enclave_pids(tb, h, H.NAME), 5)


# ----- judging a snapshot against an expected outcome -------------------------------------------------

def judge(e: F.Expect, obs: Observed, s: F.Scenario) -> None:
    o = obs.outcome
    expect(o.fired, f"the fault never fired (trigger {plan(s)[0]})")
    expect(len(o.runs) <= 1, f"two live copies: {o.runs}")
    expect(o.calls > 0, "the client never got an answer")
    expect(not obs.leaks, f"an enclave process without an agent entry on {obs.leaks}")
    if e.honest_status:
        expect(not obs.dead_listed, f"agent on {obs.dead_listed} lists a dead enclave as running")
    # what the caller of migrate saw
    if e.says:
        expect(o.error is not None and re.search(e.says, o.error) is not None,
               f"migrate should fail with /{e.says}/, got {o.error or o.figures}")
    else:
        expect(o.error is None, f"migrate failed: {o.error}")
    # who runs it, and what the migration came to
    want_runs = {"source": ["a"], "destination": ["b"], "none": []}.get(e.runs)
    if e.runs == "one":
        expect(len(o.runs) == 1, f"exactly one copy should run, got {o.runs}")
    elif s.mitigation != "checkpoint":
        expect(o.runs == want_runs, f"runs on {o.runs}, expected {e.runs}")
    r = e.result
    if r in ("finished", "resumed"):
        expect(obs.statuses["a"] is None, f"the source still lists the enclave: {obs.statuses['a']}")
        if o.figures is not None:
            resumes = int(o.figures.get("resumes", 0))
            expect(resumes >= 1 if r == "resumed" else resumes == 0, f"{resumes} reconnects for a {r} migration")
            expect((r == "resumed") == ("resumed" in o.phases), f"progress phases {o.phases} for a {r} migration")
        else:
            expect(r == "finished", f"no figures for a {r} migration: {o.error}")
    elif r == "rolled-back":
        expect(obs.statuses["b"] is None, f"the destination still lists the enclave: {obs.statuses['b']}")
        expect(obs.statuses["a"] is not None and obs.statuses["a"].get("status") == "running",
               f"the source does not run it: {obs.statuses['a']}")
    elif r == "paused":
        expect(obs.statuses["a"] is None, f"the source still lists the enclave: {obs.statuses['a']}")
        expect(obs.statuses["b"] is not None, "the destination lost the enclave")
    elif r in ("stranded", "unconfirmed"):
        expect(obs.statuses["a"] is not None and obs.statuses["a"].get("status") == "failed",
               f"the source should hold the enclave as failed: {obs.statuses['a']}")
    elif r == "lost":
        # A destination that gave up after READY stays listed as "aborted": a wiped tombstone that would
        # answer the (here dead) source's reconnect with ABORT. It holds and runs nothing.
        expect(obs.statuses["a"] is None and (obs.statuses["b"] is None
                                              or obs.statuses["b"].get("status") == "aborted"),
               f"lost enclave still listed: {obs.statuses}")
    # the acknowledged writes
    w = e.writes
    host = o.runs[0] if o.runs else None
    if w in ("all", "fork"):
        expect(host is not None and obs.reads.get(host) == 0,
               f"acknowledged writes at {host}: {obs.reads.get(host) if host else 'no copy runs'}")
        expect(not o.wrong, f"{o.wrong} reads returned something other than the acknowledged write")
    elif w in ("lost", "held", "since-handoff"):
        expect(all(v != "ok" for v in obs.serves.values()), f"a copy still serves calls: {obs.serves}")
        expect(o.runs == [], f"runs on {o.runs}")
    elif w == "streamed":
        expect(obs.serves.get("b") == "ok", f"the destination serves no call: {obs.serves}")
        got = obs.reads.get("b")
        expect(isinstance(got, str) and "paused" in got, f"reads of unstreamed chunks should fail clearly: {got}")
    elif w == "stuck":
        expect("waiting for heap data" in obs.serves.get("b", ""), f"calls at the destination: {obs.serves}")
    if s.mitigation == "checkpoint":
        expect(obs.restore.startswith("ok"), f"the checkpoint did not restore: {obs.restore}")
        expect(w != "checkpoint" or obs.restored_reads == 0,
               f"writes up to the checkpoint after the restore: {obs.restored_reads}")
    elif s.mitigation == "refused":
        if w == "fork":
            expect(obs.restore.startswith("ok"), f"the checkpoint was refused: {obs.restore}")
        else:
            expect(not obs.restore.startswith("ok"), "the checkpoint restored at the destination while the "
                                                     "source runs: two live copies")


# ----- the tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory):
    """Two hosts at 1 Gbit/s, no delay (no relay: a dead agent's port refuses at once)."""
    tb = Testbed(unique_name("rf"), 2, LinkSpec.parse("1gbit"), state_dir=tmp_path_factory.mktemp("tb"))
    with tb:
        yield tb


_SEEN: dict[str, Observed] = {}
DURATIONS: dict[str, float] = {}


def _marks(s: F.Scenario) -> list[pytest.MarkDecorator]:
    marks = []
    if s.fault.startswith("loss"):
        marks.append(needs_nft)
    if s.tracker == "fault":
        marks.append(pytest.mark.skipif(_UFFD is not None, reason=f"userfaultfd unusable: {_UFFD}"))
    return marks


@pytest.mark.parametrize("s", [pytest.param(s, id=s.id, marks=_marks(s)) for s in F.SCENARIOS])
def test_fault(bed: Testbed, s: F.Scenario) -> None:
    at, fault, params = plan(s)
    t0 = time.monotonic()
    outcome = H.run(bed, params, at, fault)
    obs = observe(bed, s, outcome)
    DURATIONS[s.id] = time.monotonic() - t0
    _SEEN[s.id] = obs
    judge(s.today, obs, s)


@pytest.mark.parametrize("s", [pytest.param(s, id=s.id, marks=[
    *_marks(s), pytest.mark.xfail(strict=True, raises=OutcomeMismatch, reason=s.bug)])
    for s in F.SCENARIOS if s.bug])
def test_known_bug(s: F.Scenario) -> None:
    """The correct outcome of a scenario whose outcome today is a bug (judged on test_fault's run)."""
    obs = _SEEN.get(s.id)
    if obs is None:
        pytest.skip("its test_fault run did not happen")
    assert s.should is not None
    judge(s.should, obs, s)
