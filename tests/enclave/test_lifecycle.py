import pytest

from constmig.enclave.lifecycle import TRANSITIONS, Life, Lifecycle
from constmig.errors import EnclaveError


def test_handed_off_never_runs_again():
    lc = Lifecycle(Life.RUNNING)
    lc.move(Life.RUNNING, Life.STOPPING)
    lc.move(Life.STOPPING, Life.HANDED_OFF)
    with pytest.raises(EnclaveError):
        lc.move(Life.HANDED_OFF, Life.RUNNING)
    assert lc.state is Life.HANDED_OFF


def test_compare_and_set_refuses_stale_expectation():
    lc = Lifecycle(Life.RUNNING)
    lc.move(Life.RUNNING, Life.STOPPING)
    with pytest.raises(EnclaveError, match="not running"):
        lc.move(Life.RUNNING, Life.STOPPING)


def test_no_path_back_to_running_from_terminal_states():
    for start in (Life.HANDED_OFF, Life.DESTROYED):
        seen, todo = set(), [start]
        while todo:
            s = todo.pop()
            for n in TRANSITIONS[s]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        assert Life.RUNNING not in seen


def test_require():
    lc = Lifecycle(Life.INCOMING)
    with pytest.raises(EnclaveError, match="incoming"):
        lc.require(Life.RUNNING)


def test_reclaim_only_from_handed_off():
    """reclaim() is the one way back from HANDED_OFF; from any other state it must refuse and change nothing."""
    lc = Lifecycle(Life.HANDED_OFF)
    lc.reclaim()
    assert lc.state is Life.RUNNING
    for state in Life:
        if state is Life.HANDED_OFF:
            continue
        lc = Lifecycle(state)
        with pytest.raises(EnclaveError, match=f"enclave is {state.value}, not handed-off"):
            lc.reclaim()
        assert lc.state is state


EXPECTED_EDGES = {  # the whole table, spelled out: an edge added or dropped by mistake fails here
    Life.CREATED: {Life.RUNNING, Life.DESTROYED},
    Life.INCOMING: {Life.RUNNING, Life.DESTROYED},
    Life.RUNNING: {Life.STOPPING, Life.DESTROYED},
    Life.STOPPING: {Life.RUNNING, Life.HANDED_OFF, Life.DESTROYED},
    Life.HANDED_OFF: {Life.DESTROYED},
    Life.DESTROYED: set(),
}


@pytest.mark.parametrize("start", list(Life), ids=lambda s: s.value)
def test_move_takes_exactly_the_table_edges(start):
    assert TRANSITIONS[start] == EXPECTED_EDGES[start]
    for new in Life:
        lc = Lifecycle(start)
        if new in EXPECTED_EDGES[start]:
            lc.move(start, new)
            assert lc.state is new
        else:
            with pytest.raises(EnclaveError, match=f"cannot go from {start.value} to {new.value}"):
                lc.move(start, new)
            assert lc.state is start


def test_require_accepts_any_listed_state():
    lc = Lifecycle(Life.STOPPING)
    lc.require(Life.RUNNING, Life.STOPPING)
    with pytest.raises(EnclaveError, match="this needs it running or handed-off"):
        lc.require(Life.RUNNING, Life.HANDED_OFF)
