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
