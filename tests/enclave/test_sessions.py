"""The enclave's session table (enclave/sessions.py) without processes: closes proven with the old
session's keys, the table's limit against strangers, and the freeze while a migration exports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from constmig.enclave import sessions as table_mod
from constmig.enclave.sessions import SessionTable
from constmig.errors import EnclaveError, EnclaveNotRunning, IntegrityError, SessionUnknown
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.session import About, ClientOpen, ClientSession, Closed, Closing, settle

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
    assert again.closed is not None and again.closed.ran == 0 and closer.closed is not None
    src.thaw()
    client(src, verify)  # the migration failed before the handoff: the source's table is its own again
