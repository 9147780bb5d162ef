"""What runs here (host/roster.py): the state folder's lock, the record a restarted agent reads, and the
lookups every part of the agent shares. In process: no agent, no enclave."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from constmig.errors import AgentError, ConfigError, NoSuchEnclave, Redirect
from constmig.host.roster import MAX_NAME, Hosted, Roster
from constmig.host.status import Status as S
from constmig.host.status import StatusCell
from constmig.wire import control


def hosted(name: str, status: S = S.RUNNING, heap: int = 1 << 20) -> Hosted:
    handle = SimpleNamespace(spec=control.LaunchSpec(name, "kvstore", heap),
                             proc=SimpleNamespace(returncode=None, pid=os.getpid()))
    return Hosted(handle, StatusCell(status))  # type: ignore[arg-type]


def test_one_agent_per_state_folder(tmp_path: Path) -> None:
    first = Roster(tmp_path / "s", "a", "h:1")
    with pytest.raises(ConfigError, match=rf"in use by another agent \(pid {os.getpid()}\)"):
        Roster(tmp_path / "s", "b", "h:2")
    os.close(first.lock_fd)
    os.close(Roster(tmp_path / "s", "b", "h:2").lock_fd)  # free once the first lets go
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        Roster(tmp_path / "file", "c", "h:3")


def test_a_restarted_agent_lists_what_died_with_its_restore_command(tmp_path: Path) -> None:
    old = Roster(tmp_path, "a", "h:1")
    old.enclaves.update(kv=hosted("kv"), gone=hosted("gone", S.EXITED), other=hosted("other"))
    old.save()
    assert set(json.loads(old.path.read_text())) == {"kv", "other"}  # an exited one is not running here
    os.close(old.lock_fd)
    old.checkpoints.mkdir()
    for v in (3, 12):
        (old.checkpoints / f"kv.v{v}.ckpt").write_bytes(b"")
    new = Roster(tmp_path, "a", "h:1")
    new.recall()
    newest = tmp_path / "checkpoints" / "kv.v12.ckpt"
    assert new.died["kv"]["restore"] == f"constmig restore {newest} --agent h:1 --name kv"
    assert new.died["other"]["checkpoint"] is None and new.died["other"]["restore"] is None
    assert not new.path.exists()  # read once
    new.enclaves["kv"] = hosted("kv")
    new.save()
    assert "kv" not in new.died  # a new enclave of that name runs here now


def test_lookups_redirect_a_name_that_moved_and_refuse_an_unknown_one(tmp_path: Path) -> None:
    roster = Roster(tmp_path, "a", "h:1")
    roster.enclaves["kv"] = hosted("kv")
    assert roster.get("kv") is roster.enclaves["kv"]
    with pytest.raises(NoSuchEnclave, match=r"no enclave named 'x' on agent a \(known: kv\)"):
        roster.get("x")
    roster.moved["x"] = "h:2"
    with pytest.raises(Redirect) as r:
        roster.get("x")
    assert r.value.location == "h:2"
    roster.enclaves["x"] = hosted("x", S.INCOMING)  # coming back here: ours to wait for
    assert roster.get("x").status is S.INCOMING


@pytest.mark.parametrize(("name", "why"), [
    ("kv", "already exists"), ("", "bad enclave name"), ("a.b", "bad enclave name"),
    ("x" * (MAX_NAME + 1), "too long"),
])
def test_a_new_instance_needs_a_free_well_formed_name(tmp_path: Path, name: str, why: str) -> None:
    roster = Roster(tmp_path, "a", "h:1")
    roster.enclaves["kv"] = hosted("kv")
    with pytest.raises(AgentError, match=why):
        roster.check_new(control.LaunchSpec(name, "kvstore", 1 << 20))


def test_a_heap_larger_than_the_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="exceeds this host's available memory"):
        Roster(tmp_path, "a", "h:1").check_new(control.LaunchSpec("big", "kvstore", 1 << 50))
