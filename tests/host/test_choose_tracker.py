"""`--tracker auto` picks the Fault Tracker only where userfaultfd works, and always says why."""

import pytest

from constmig.errors import AgentError
from constmig.host import incoming


def test_auto_takes_fault_where_userfaultfd_works(monkeypatch):
    monkeypatch.setattr(incoming, "preflight", lambda: None)
    assert incoming.choose_tracker("auto") == ("fault", "auto: userfaultfd works here")


def test_auto_falls_back_to_access_and_says_why(monkeypatch):
    problem = "userfaultfd needs root here: vm.unprivileged_userfaultfd is 0"
    monkeypatch.setattr(incoming, "preflight", lambda: problem)
    tracker, reason = incoming.choose_tracker("auto")
    assert tracker == "access"
    assert problem in reason


def test_fault_requested_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(incoming, "preflight", lambda: "no userfaultfd in this kernel")
    with pytest.raises(AgentError, match="fault tracker cannot run on this host: no userfaultfd"):
        incoming.choose_tracker("fault")


def test_access_needs_nothing_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(incoming, "preflight", lambda: "anything")
    assert incoming.choose_tracker("access") == ("access", "requested")
    with pytest.raises(AgentError, match="unknown tracker 'magic'"):
        incoming.choose_tracker("magic")
