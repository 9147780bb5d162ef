"""The protocol tables, driven with event sequences and no I/O."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constmig.errors import ProtocolError
from constmig.migration import messages as m
from constmig.migration.protocol import CHUNK, RECONNECT, TABLE, Machine, St, diagram, event_name

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


def test_protocol_doc_carries_the_generated_diagram():
    """docs/protocol.md shows the tables as they are (docs that drift are bugs)."""
    from pathlib import Path

    from constmig.migration.protocol import BEGIN_DIAGRAM, END_DIAGRAM
    from constmig.migration.strategies import STRATEGIES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    block = doc[doc.index(BEGIN_DIAGRAM) + len(BEGIN_DIAGRAM):doc.index(END_DIAGRAM)]
    assert block.strip() == diagram(STRATEGIES.values()).strip()
    assert "post-copy sends no chunk before the handoff" in block


def test_a_strategy_removes_edges_with_its_reason():
    from constmig.migration.strategies import get

    mach = Machine("destination", St.RECEIVING, strategy=get("constmig"))
    with pytest.raises(ProtocolError, match="cannot receive 'chunk' in state receiving: post-copy sends no chunk"):
        mach.received(CHUNK)
    assert mach.state is St.ABORTED
    assert mach.sent(m.Abort("told")) is St.ABORTED  # a side that failed still tells its peer
    plain = Machine("destination", St.RECEIVING, strategy=get("stopcopy"))
    assert plain.received(CHUNK) is St.RECEIVING


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


DEST_BEFORE_READY = {  # every destination state before READY_SENT, and how to get there
    St.CONNECTED: (),
    St.RECEIVING: (STATE, CHUNK),
    St.HEAP_RECEIVED: (STATE, CHUNK, m.HeapEnd(1)),
}


@pytest.mark.adversarial
@pytest.mark.parametrize("event", [m.Commit(), RECONNECT], ids=["commit", "reconnect"])
@pytest.mark.parametrize("where", list(DEST_BEFORE_READY), ids=lambda s: s.value)
def test_destination_refuses_commit_in_every_state_before_ready(where, event):
    """COMMIT, or the keyed reconnect that stands for a lost one, only after READY went out."""
    d = Machine("destination")
    for ev in DEST_BEFORE_READY[where]:
        d.received(ev)
    assert d.state is where
    name = event_name(event)
    with pytest.raises(ProtocolError, match=f"destination cannot receive '{name}' in state {where.value}"):
        d.received(event)
    assert d.state is St.ABORTED and not d.committed
    assert St.COMMITTED not in d.history


@pytest.mark.adversarial
@pytest.mark.parametrize("where", [St.CONNECTED, St.STATE_SENT, St.AWAIT_READY], ids=lambda s: s.value)
def test_source_cannot_commit_in_any_state_before_ready(where):
    s = Machine("source")
    for ev in {St.CONNECTED: (), St.STATE_SENT: (STATE,), St.AWAIT_READY: (STATE, m.HeapEnd(0))}[where]:
        s.sent(ev)
    assert s.state is where
    with pytest.raises(ProtocolError, match=f"source cannot send 'commit' in state {where.value}"):
        s.sent(m.Commit())
    assert s.state is St.ABORTED and St.HANDED_OFF not in s.history


def destination_committed():
    d = Machine("destination")
    for ev in (STATE, m.HeapEnd(0)):
        d.received(ev)
    d.sent(m.Ready(b""))
    d.received(m.Commit())
    assert d.state is St.COMMITTED
    return d


@pytest.mark.adversarial
@pytest.mark.parametrize("event", ["recv abort", "send abort", "fail", "bad event"])
def test_destination_past_commit_pauses_never_aborts(event):
    """From COMMIT on the source has handed off: an ABORT either way, a broken link or a bad record
    must pause the destination (it keeps the migrated state), never abort (which would wipe it)."""
    d = destination_committed()
    assert d.committed
    if event == "recv abort":
        d.received(m.Abort("late"))
    elif event == "send abort":
        d.sent(m.Abort("giving up"))
    elif event == "fail":
        d.fail()
    else:
        with pytest.raises(ProtocolError):
            d.received(m.Done(0, b""))
    assert d.state is St.PAUSED and d.committed
    assert St.ABORTED not in d.history
