"""Migration records without a store: the phase table (a phase never goes back, an ended record takes
nothing), outcomes to phases, malformed specs, replay windows; and the signatures that let a record or a
drain mark act (a real admin CA, real ECDSA)."""

from __future__ import annotations

import datetime as dt

import pytest

from constmig.host import pki, records
from constmig.host.metrics import OUTCOMES
from constmig.host.records import FINAL, TRANSITIONS, Event, Phase, PhaseError, step
from constmig.host.signing import Signer, Unsigned, may_ask, sign, verify

ORDER = [Phase.PENDING, Phase.SCHEDULED, Phase.RUNNING, Phase.SUCCEEDED]


def test_every_step_goes_forward_and_ended_records_take_nothing():
    for (was, _), to in TRANSITIONS.items():
        assert was not in FINAL
        assert to in FINAL or ORDER.index(to) > ORDER.index(was)
    for phase in FINAL:
        for event in Event:
            with pytest.raises(PhaseError, match=f"in phase {phase.value}"):
                step({"phase": phase.value}, event, 1.0)


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", list(Event))
def test_the_table_is_the_only_rule(phase, event):
    status = {"phase": phase.value, "times": {phase.value: 1.0}}
    to = TRANSITIONS.get((phase, event))
    if to is None:
        with pytest.raises(PhaseError):
            step(status, event, 2.0)
        return
    new = step(status, event, 2.0)
    assert new["phase"] == to.value and new["times"] == {phase.value: 1.0, to.value: 2.0}
    assert status["phase"] == phase.value  # a new dict: the caller's is left as it was


def test_a_whole_migration_and_its_outcome_words():
    st = {"phase": "Pending", "times": {"Pending": 0.0}}
    st = step(st, Event.SCHEDULE, 1.0, target="b", target_addr="127.0.0.1:7002")
    st = step(st, Event.START, 2.0)
    assert st["target"] == "b" and list(st["times"]) == ["Pending", "Scheduled", "Running"]
    with pytest.raises(PhaseError, match="does not end a record in Succeeded"):
        step(st, Event.SUCCEED, 3.0, outcome="rolled-back")
    assert step(st, Event.SUCCEED, 3.0, outcome="done")["phase"] == "Succeeded"
    for outcome in OUTCOMES:  # the words metrics and logs use, each ending a record in one phase
        assert step(st, records.end_event(outcome), 3.0, outcome=outcome)["phase"] == \
            records.OUTCOME_PHASE[outcome].value
    assert records.phase_of({"phase": "Exploded"}) is Phase.FAILED  # a phase no agent writes counts as over
    assert records.phase_of({}) is Phase.PENDING


@pytest.mark.parametrize("bad", [None, [], {"enclave": "kv"}, {"id": "a/../b", "enclave": "kv", "source": "a"},
                                 {"id": "a.kv.1", "enclave": "kv", "source": "a", "created": "yesterday"}])
def test_malformed_specs_are_one_line(bad):
    with pytest.raises(ValueError) as e:
        records.Spec.parse(bad)
    assert "\n" not in str(e.value)


def test_mark_specs_parse_and_bound_their_parallelism():
    spec = records.MarkSpec("m1", "a", 3, "hybrid", {"timeout": 5.0}, "operator alice", 10.0)
    assert records.MarkSpec.parse(spec.as_dict()) == spec
    with pytest.raises(ValueError, match="parallel must be 1-64"):
        records.MarkSpec.parse({**spec.as_dict(), "parallel": 0})


def test_an_old_item_never_seen_is_taken_for_a_replay():
    assert records.stale(1000.0, 1000.0 + records.FRESH_S - 1, False) is None
    assert "replay" in (records.stale(1000.0, 1000.0 + records.FRESH_S + 1, False) or "")
    assert records.stale(1000.0, 1000.0 + 10 * records.FRESH_S, True) is None  # its agent took it before
    assert "replay" in (records.stale(1000.0 + 10 * records.FRESH_S, 1000.0, False) or "")  # from the future


def test_new_ids_start_with_their_source():
    rid = records.new_id("a", "kv1")
    assert rid.startswith("a.kv1.") and records.check_id(rid) == rid and rid != records.new_id("a", "kv1")


# ---- signatures ----

@pytest.fixture(scope="module")
def fleet_ca(tmp_path_factory):
    ca = tmp_path_factory.mktemp("ca")
    pki.create_admin_ca(ca)
    other = tmp_path_factory.mktemp("other-ca")
    pki.create_admin_ca(other)
    out = tmp_path_factory.mktemp("ids")
    return {"ca": pki.load_ca(ca)[0],
            "alice": pki.issue(ca, "operator", "alice", out / "alice"),
            "host-a": pki.issue(ca, "host", "a", out / "host-a"),
            "host-b": pki.issue(ca, "host", "b", out / "host-b"),
            "stranger": pki.issue(other, "operator", "mallory", out / "mallory"),
            "expired": pki.issue(ca, "operator", "bob", out / "bob", days=1,
                                 now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))}


def test_a_signature_names_its_signer(fleet_ca):
    spec = records.Spec("a.kv.1", "kv", "a", asked_by="operator alice", created=5.0).as_dict()
    assert verify(fleet_ca["ca"], spec, sign(fleet_ca["alice"], spec)) == Signer("operator", "alice")


@pytest.mark.parametrize(("who", "change", "said"), [
    ("alice", {"enclave": "kv2"}, "does not match"),  # a good signature moved onto another enclave's spec
    ("alice", {"source": "b"}, "does not match"),
    ("stranger", {}, "not issued by this fleet's admin CA"),
    ("expired", {}, "valid only"),
])
def test_what_does_not_verify_says_why(fleet_ca, who, change, said):
    spec = records.Spec("a.kv.1", "kv", "a", created=5.0).as_dict()
    signature = sign(fleet_ca[who], spec)
    with pytest.raises(Unsigned, match=said):
        verify(fleet_ca["ca"], {**spec, **change}, signature)


@pytest.mark.parametrize("signature", [None, {}, {"cert": "x", "sig": "y"}, {"cert": 1, "sig": 2}])
def test_no_signature_or_garbage_is_unsigned(fleet_ca, signature):
    with pytest.raises(Unsigned):
        verify(fleet_ca["ca"], {"id": "x"}, signature)


def test_a_signature_by_another_key_with_a_good_certificate_does_not_verify(fleet_ca):
    spec = {"id": "x"}
    forged = {**sign(fleet_ca["stranger"], spec), "cert": sign(fleet_ca["alice"], spec)["cert"]}
    with pytest.raises(Unsigned, match="does not match"):
        verify(fleet_ca["ca"], spec, forged)


def test_who_may_ask_what_of_which_host():
    assert may_ask(Signer("operator", "alice"), "a") is None
    assert may_ask(Signer("host", "a"), "a") is None  # the host itself (its local CLI)
    assert "may not ask this of host 'a'" in (may_ask(Signer("host", "b"), "a") or "")


@pytest.mark.parametrize(("obj", "expect", "named"), [
    ({}, records.Settings(), []),
    ({"max_in_flight": 3, "outbound_per_host": 1, "keep_records_s": 60}, records.Settings(3, 1, 60.0), []),
    ({"outbound_per_host": 4.0, "other": "kept out"}, records.Settings(outbound_per_host=4), []),
    ({"max_in_flight": -1}, records.Settings(), ["max_in_flight=-1"]),
    ({"max_in_flight": "3"}, records.Settings(), ["max_in_flight='3'"]),
    ({"max_in_flight": True}, records.Settings(), ["max_in_flight=True"]),
    ({"outbound_per_host": 0}, records.Settings(), ["outbound_per_host=0"]),
    ({"outbound_per_host": 1.5}, records.Settings(), ["outbound_per_host=1.5"]),
    ({"keep_records_s": "x", "max_in_flight": None}, records.Settings(), ["max_in_flight=None", "keep_records_s='x'"]),
    ({"keep_records_s": -5}, records.Settings(), ["keep_records_s=-5"]),
])
def test_settings_the_store_holds_are_taken_only_in_range(obj, expect, named) -> None:
    """The store's holder writes the settings unsigned: a value out of range or of the wrong type is left
    at its default and named, never taken (a garbled store must not stall or stop the fleet's work)."""
    got = records.Settings.from_obj(obj)
    assert (got.max_in_flight, got.outbound_per_host, got.keep_records_s) == \
        (expect.max_in_flight, expect.outbound_per_host, expect.keep_records_s)
    assert len(got.problems) == len(named) and all(n in p for n, p in zip(named, got.problems, strict=True)), got
