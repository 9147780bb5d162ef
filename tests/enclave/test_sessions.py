"""The enclave's session table (enclave/sessions.py) without processes: closes proven with the old
session's keys, the table's limit against strangers, and the freeze while a migration exports it."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from constmig.enclave import sessions as table_mod
from constmig.enclave.sessions import SessionTable
from constmig.errors import EnclaveError, EnclaveNotRunning, IntegrityError, SessionUnknown
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.session import About, ClientOpen, ClientSession, Closed, Closing, encode_table, settle

APP = Identity(measurement=measure(b"kv app code"), signer=bytes(range(32)), product_id=1, svn=2)
ABOUT = About(bytes(range(16)), bytes(32), '{"app": "kv"}')


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimPlatform:
    base: Path = tmp_path_factory.mktemp("tbl")
    create_root_ca(base / "ca")
    return SimPlatform.provision(base / "a", base / "ca", "host-a")


@pytest.fixture
def verify(platform: SimPlatform) -> Any:
    return lambda q: platform.verify(q)


def client(table: SessionTable, verify: Any, closing: Closing | None = None) -> ClientSession:
    hs = ClientOpen(closing)
    return hs.finish(table.open(hs.hello), verify, lambda vq, about: None)


def put(table: SessionTable, c: ClientSession, store: dict[str, Any], key: str, value: Any) -> Any:
    def run(method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        store[args[0]] = args[1]
        return True

    return c.open_answer(table.call(c.seal_call("put", [key, value], {}), run)).result


def test_a_close_drops_the_session_and_its_held_record_is_refused(platform: SimPlatform, verify: Any) -> None:
    table, store = SessionTable(platform, APP, ABOUT), {}
    old = client(table, verify)
    put(table, old, store, "balance", 0)
    held = old.seal_call("put", ["balance", 100], {})  # the host keeps it
    new = client(table, verify, old.closing("put balance 100"))
    assert new.closed is not None and new.closed.known and new.closed.ran == 1
    assert settle(old.closing(), new.closed, new.about).ran is False
    put(table, new, store, "balance", 50)
    with pytest.raises(SessionUnknown, match="closed"):
        table.call(held, lambda *a: store.update(balance=100))
    assert store == {"balance": 50} and len(table) == 1
    again = client(table, verify, old.closing())  # the closing Accept was lost: asked again, the count stays
    assert again.closed is not None and again.closed.ran == 1


def test_a_close_of_a_session_the_enclave_never_had_claims_nothing(platform: SimPlatform, verify: Any) -> None:
    table = SessionTable(platform, APP, ABOUT)
    other = client(SessionTable(platform, APP, ABOUT), verify)  # a session of another enclave
    other.seal_call("put", ["k", 1], {})
    new = client(table, verify, other.closing())
    assert new.closed == Closed(other.session_id, False, 0, b"")  # not known: no request ran, no answer
    assert settle(other.closing(), new.closed, new.about).ran is None  # its outcome stays unknown


def test_a_close_without_the_keys_is_refused_and_closes_nothing(platform: SimPlatform, verify: Any) -> None:
    from dataclasses import replace

    table, store = SessionTable(platform, APP, ABOUT), {}
    victim = client(table, verify)
    put(table, victim, store, "k", "v1")
    with pytest.raises(IntegrityError, match="does not verify"):
        client(table, verify, replace(victim.closing(), key=bytes(32)))
    assert put(table, victim, store, "k", "v2") is True  # the victim's session goes on


def test_a_full_table_of_live_sessions_refuses_newcomers(platform: SimPlatform, verify: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_mod, "MAX_SESSIONS", 3)
    table, store = SessionTable(platform, APP, ABOUT), {}
    idle = client(table, verify)
    put(table, idle, store, "i", 1)
    live = client(table, verify)
    client(table, verify)  # a stranger
    with pytest.raises(EnclaveError, match="3 open sessions and none has been idle"):
        client(table, verify)
    assert put(table, live, store, "k", "v") is True
    # once a session sat idle past the limit it makes room, and its client learns what ran when it comes back
    monkeypatch.setattr(table_mod, "IDLE_EVICT_S", 0.0)
    client(table, verify)
    assert len(table) == 3 and idle.session_id not in table._ends and live.session_id in table._ends
    back = client(table, verify, idle.closing())
    assert back.closed is not None and back.closed.known and back.closed.ran == 1


def test_the_export_freezes_opens_and_closes_until_thawed_or_moved(platform: SimPlatform, verify: Any) -> None:
    src, store = SessionTable(platform, APP, ABOUT), {}
    c = client(src, verify)
    put(src, c, store, "k", "v")
    closed_one = client(src, verify)
    closer = client(src, verify, closed_one.closing())
    blob = src.export()
    with pytest.raises(EnclaveNotRunning):
        client(src, verify, c.closing())  # a close now would not move with the table: refused, nothing closed
    dst = SessionTable(platform, APP)
    with pytest.raises(EnclaveNotRunning):
        client(dst, verify)  # an incoming enclave opens nothing before it knows who it is (COMMIT)
    dst.adopt(blob)
    dst.about = ABOUT
    assert put(dst, c, store, "k", "w") is True  # the session moved
    again = client(dst, verify, closed_one.closing())  # and so did the close
    assert again.closed is not None and again.closed.known and again.closed.ran == 0 and closer.closed is not None
    src.thaw()
    client(src, verify)  # the migration failed before the handoff: the source's table is its own again


def test_the_table_holds_1024_sessions_and_one_idle_for_10_minutes_makes_room(
        platform: SimPlatform, verify: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits docs/protocol.md states: 1,024 open sessions; a newcomer beyond them only once the least
    recently used one has been idle for 10 minutes."""
    now = [1000.0]
    monkeypatch.setattr(table_mod, "time", SimpleNamespace(monotonic=lambda: now[0]))
    table = SessionTable(platform, APP, ABOUT)
    first = client(table, verify)
    for _ in range(1023):
        table.open(ClientOpen().hello)
    now[0] += 599.5
    with pytest.raises(EnclaveError, match="1024 open sessions and none has been idle for 10 minutes"):
        table.open(ClientOpen().hello)
    now[0] += 0.5  # the first session has sat idle for exactly 10 minutes
    client(table, verify)
    assert len(table) == 1024 and first.session_id not in table._ends


def test_the_last_4096_closes_are_remembered_the_oldest_forgotten_first(platform: SimPlatform, verify: Any) -> None:
    table = SessionTable(platform, APP, ABOUT)
    sids = [i.to_bytes(16, "big") for i in range(4097)]
    table.adopt(encode_table([], [Closed(sid, True, 1) for sid in sids]))  # one close more than the table keeps

    def known(sid: bytes) -> bool:
        c = client(table, verify, Closing(sid, bytes(32), ABOUT.instance))  # a session gone: no proof needed
        assert c.closed is not None and c.closed.session_id == sid
        return c.closed.known

    assert not known(sids[0]) and known(sids[1])
    live = client(table, verify)
    put(table, live, {}, "k", "v")
    client(table, verify, live.closing())  # one more close: the oldest one remembered makes room
    assert not known(sids[1]) and known(sids[2]) and known(live.session_id)


def test_after_the_handoff_nothing_opens_here_and_a_rollback_gives_the_table_back(platform: SimPlatform,
                                                                                  verify: Any) -> None:
    table, store = SessionTable(platform, APP, ABOUT), {}
    c = client(table, verify)
    table.export()
    table.close()  # handed off
    with pytest.raises(SessionUnknown, match="has moved"):
        client(table, verify)
    table.reopen()  # the destination gave the enclave back
    assert put(table, c, store, "k", "v") is True
    client(table, verify)
    table.wipe()  # the destination runs it for good
    with pytest.raises(SessionUnknown, match="has moved"):
        client(table, verify)
    with pytest.raises(SessionUnknown, match="no such session"):
        table.call(c.seal_call("put", ["k", "w"], {}), lambda *a: store.update(k="w"))
    assert store == {"k": "v"}


def test_an_answer_says_whether_the_call_succeeded_and_a_platform_quote_is_this_sessions(
        platform: SimPlatform, verify: Any) -> None:
    table = SessionTable(platform, APP, ABOUT)
    c = client(table, verify)

    def run(method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if method == "get_missing":
            raise EnclaveError("no such key 'x'")  # the app's own refusal
        return 42

    ok = c.open_answer(table.call(c.seal_call("get", [], {}), run))
    assert ok.ok and ok.result == 42 and ok.platform == "host-a"
    refused = c.open_answer(table.call(c.seal_call("get_missing", [], {}), run))
    assert not refused.ok and refused.kind == "EnclaveError" and refused.error == "no such key 'x'"
    quoted = c.open_answer(table.call(c.seal_quote_request(), run))
    assert quoted.ok and c.check_platform_quote(quoted.result, verify).platform_id == "host-a"


def _running_call(table: SessionTable, c: ClientSession, runs: list[str]) -> tuple[threading.Thread, threading.Event]:
    """A request of `c` that is running in the enclave (on another thread) until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def run(method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        started.set()
        release.wait(10)
        runs.append(method)
        return "done"

    call = threading.Thread(target=table.call, args=(c.seal_call("deposit", [5], {}), run), daemon=True)
    call.start()
    assert started.wait(10)
    return call, release


def test_a_close_that_arrives_while_the_request_runs_waits_and_counts_it(platform: SimPlatform, verify: Any) -> None:
    """Opens do not take the app lock, so the host can deliver a closing Hello while the old session's request
    runs. The close must count that request: told it never ran, the client would send it again, and it
    would run twice."""
    table, runs = SessionTable(platform, APP, ABOUT), []
    old = client(table, verify)
    call, release = _running_call(table, old, runs)
    got: dict[str, ClientSession] = {}
    opener = threading.Thread(target=lambda: got.update(new=client(table, verify, old.closing("deposit 5"))),
                              daemon=True)
    opener.start()
    opener.join(0.3)
    assert opener.is_alive()  # the close waits for the running request's answer
    release.set()
    call.join(10)
    opener.join(10)
    settled = settle(old.closing(), got["new"].closed, got["new"].about)
    assert runs == ["deposit"] and settled.ran is True and settled.answer is not None
    assert settled.answer.result == "done"


def test_a_session_whose_request_runs_is_never_evicted(platform: SimPlatform, verify: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(table_mod, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(table_mod, "MAX_SESSIONS", 2)
    table, runs = SessionTable(platform, APP, ABOUT), []
    slow, other = client(table, verify), client(table, verify)
    call, release = _running_call(table, slow, runs)
    now[0] += 1.0
    put(table, other, {}, "k", "v")  # the running session is the least recently used one now
    now[0] += 3600.0
    with pytest.raises(EnclaveError, match="2 open sessions and none has been idle"):
        client(table, verify)
    release.set()
    call.join(10)
    client(table, verify)  # answered: idle since its request came, it makes room
    back = client(table, verify, slow.closing())
    assert back.closed is not None and back.closed.known and back.closed.ran == 1 and runs == ["deposit"]
