"""The protocol tables, driven with event sequences and no I/O."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constmig.errors import ProtocolError
from constmig.migration import messages as m
from constmig.migration.protocol import CHUNK, TABLE, Machine, St, diagram

STATE = m.StateMsg("stopcopy", b"", 1 << 20, 1 << 20, b"", 0.0)


def source_to_handoff() -> Machine:
    s = Machine("source")
    s.sent(STATE)
    s.sent(CHUNK)
    s.sent(m.HeapEnd(1))
    s.received(m.Ready(b"d"))
    s.sent(m.Commit())
    return s


def test_happy_path_both_sides():
    s = source_to_handoff()
    d = Machine("destination")
    for ev in (STATE, CHUNK, m.HeapEnd(1)):
        d.received(ev)
    d.sent(m.Ready(b"d"))
    d.received(m.Commit())
    d.sent(m.Resumed(1.0))
    d.sent(m.Done(1, b"d"))
    s.received(m.Resumed(1.0))
    s.received(m.Done(1, b"d"))
    assert s.state is St.COMPLETE and d.state is St.COMPLETE


@pytest.mark.adversarial
def test_destination_never_resumes_without_commit():
    d = Machine("destination")
    d.received(STATE)
    d.received(m.HeapEnd(0))
    with pytest.raises(ProtocolError, match="cannot send 'resumed'"):
        d.sent(m.Resumed(1.0))
    assert d.state is St.ABORTED


@pytest.mark.adversarial
def test_commit_before_ready_is_refused():
    d = Machine("destination")
    d.received(STATE)
    with pytest.raises(ProtocolError):
        d.received(m.Commit())
    assert d.state is St.ABORTED


@pytest.mark.adversarial
def test_source_cannot_commit_without_ready():
    s = Machine("source")
    s.sent(STATE)
    s.sent(m.HeapEnd(0))
    with pytest.raises(ProtocolError):
        s.sent(m.Commit())
    assert s.state is St.ABORTED and not s.committed


def test_failure_after_handoff_pauses_not_aborts():
    s = source_to_handoff()
    assert s.committed
    s.fail()
    assert s.state is St.PAUSED


def test_abort_before_commit():
    s = Machine("source")
    s.sent(STATE)
    s.received(m.Abort("no"))
    assert s.state is St.ABORTED


@pytest.mark.adversarial
def test_stale_commit_replayed_after_running_is_refused():
    d = Machine("destination")
    for ev in (STATE, m.HeapEnd(0)):
        d.received(ev)
    d.sent(m.Ready(b""))
    d.received(m.Commit())
    d.sent(m.Resumed(0.0))
    with pytest.raises(ProtocolError):
        d.received(m.Commit())
    assert d.state is St.PAUSED  # committed: a bad message pauses, the app keeps running


def test_diagram_lists_every_edge():
    text = diagram()
    n_edges = sum(len(edges) for states in TABLE.values() for edges in states.values())
    assert text.count("-->") == n_edges


EVENTS = [STATE, CHUNK, m.HeapEnd(0), m.Ready(b""), m.Commit(), m.Resumed(0.0), m.Demand(0), m.Done(0, b"")]


@given(st.lists(st.tuples(st.sampled_from(["sent", "received"]), st.sampled_from(EVENTS)), max_size=12),
       st.sampled_from(["source", "destination"]))
def test_any_sequence_ends_in_a_known_state(seq, role):
    """Whatever a hostile peer does, the machine only ever takes table edges or fails closed."""
    mach = Machine(role)
    for direction, ev in seq:
        before = mach.state
        try:
            getattr(mach, direction)(ev)
        except ProtocolError:
            assert mach.state in (St.ABORTED, St.PAUSED) or before in (St.ABORTED, St.PAUSED, St.COMPLETE)
    # the source may only be HANDED_OFF if it received READY first
    if St.HANDED_OFF in mach.history:
        assert St.READY_RECEIVED in mach.history[: mach.history.index(St.HANDED_OFF)]
    if St.RUNNING in mach.history:
        assert St.COMMITTED in mach.history[: mach.history.index(St.RUNNING)]


def test_messages_roundtrip_and_garbage():
    for msg in EVENTS[:1] + EVENTS[2:]:
        assert m.decode(m.encode(msg)) == msg
    with pytest.raises(ProtocolError):
        m.decode(b"\x81\xa4type\xa5bogus")
    with pytest.raises(ProtocolError):
        m.decode(b"")


@pytest.mark.adversarial
def test_abort_before_resumed_lets_the_source_run_again():
    """An authenticated ABORT after COMMIT but before RESUMED: the destination never ran the app."""
    s = source_to_handoff()
    s.received(m.Abort("commit record failed authentication"))
    assert s.state is St.ABORTED and not s.committed


@pytest.mark.adversarial
def test_abort_after_resumed_only_pauses():
    """Once the destination said it resumed, an ABORT cannot give the source the app back (no fork)."""
    s = source_to_handoff()
    s.received(m.Resumed(1.0))
    s.received(m.Abort("late"))
    assert s.state is St.PAUSED and s.committed


def test_demand_may_overtake_resumed():
    s = source_to_handoff()
    s.received(m.Demand(0, 1))
    s.received(m.Resumed(1.0))
    s.received(m.Done(1, b"d"))
    assert s.state is St.COMPLETE
