"""The client's side of a session (client/session.py) against a real enclave session table, in process: the
test is the host in between, and forwards, drops, holds or denies what the client sends."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from constmig.client.session import EnclaveClient, UnsettledCalls, pin_now
from constmig.client.trust import Expect, KnownEnclaves, Trust
from constmig.enclave.sessions import SessionTable
from constmig.errors import (
    AgentUnreachable,
    AttestationError,
    CallFailed,
    ConfigError,
    EnclaveError,
    ProtocolError,
    SessionUnknown,
)
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.session import About, Closing

APP = Identity(measurement=measure(b"kv app code"), signer=bytes(range(32)), product_id=1, svn=2)
ABOUT = About(bytes(range(16)), bytes(32), '{"app": "kvstore", "heap": 16777216}')


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimPlatform:
    base: Path = tmp_path_factory.mktemp("cli")
    create_root_ca(base / "ca")
    return SimPlatform.provision(base / "a", base / "ca", "host-a")


class Host:
    """The agent, played by the test: forwards session requests to an enclave's table, and may drop an answer
    after the request ran (`lose`), or claim the session is unknown without forwarding (`deny`)."""

    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.store: dict[str, Any] = {}
        self.runs: list[tuple[str, list[Any]]] = []
        self.seen: list[bytes] = []  # every byte string the host forwarded
        self.lose = 0
        self.deny = 0

    def run(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.runs.append((method, args))
        if method == "put":
            self.store[args[0]] = args[1]
            return True
        if method == "get":
            if args[0] not in self.store:
                raise EnclaveError(f"no such key {args[0]!r}")
            return self.store[args[0]]
        if method == "big":
            return "x" * args[0]
        raise AttributeError(method)

    def request(self, req: Any) -> Any:
        hello, record = (req.get("hello"), req.get("record")) if isinstance(req, dict) else \
            (getattr(req, "hello", None), getattr(req, "record", None))
        if hello is not None:
            self.seen.append(hello)
            return self.table.open(hello)
        assert record is not None
        self.seen.append(record)
        if self.deny:
            self.deny -= 1
            raise SessionUnknown("no such session in this enclave")
        answer = self.table.call(record, self.run)
        if self.lose:
            self.lose -= 1
            raise AgentUnreachable("connection to the agent was cut")
        return answer


def connect(host: Host, trust: Trust, unsettled: UnsettledCalls | None = None, name: str = "kv1") -> EnclaveClient:
    c = EnclaveClient("127.0.0.1:7001", name, timeout=5, trust=trust, unsettled=unsettled)
    c.route.request = host.request  # type: ignore[method-assign]
    return c


@pytest.fixture
def trust(platform: SimPlatform, tmp_path: Path) -> Trust:
    return Trust(platform.verify, None, KnownEnclaves(tmp_path / "known.json"), None)


@pytest.fixture
def host(platform: SimPlatform) -> Host:
    return Host(SessionTable(platform, APP, ABOUT))


def test_a_call_runs_over_an_attested_session_the_host_cannot_read(host: Host, trust: Trust) -> None:
    c = connect(host, trust)
    assert c.identity is None and c.instance is None and c.platform is None and c.attested is None
    assert c.session_id is None and c.moves == [] and not c.outstanding
    assert c.call("put", "canary-key", "canary-value") is True and c.call("get", "canary-key") == "canary-value"
    assert c.identity == APP and c.instance == ABOUT.instance and c.platform == "host-a" and c.moves == []
    assert c.attested is not None and c.attested.platform_id == "host-a" and c.session_id is not None
    assert not c.outstanding and host.runs == [("put", ["canary-key", "canary-value"]), ("get", ["canary-key"])]
    assert not any(b"canary" in b for b in host.seen) and len(host.table) == 1
    assert trust.pinned is not None and trust.pinned.instance == ABOUT.instance  # pinned on first use


def test_the_apps_refusal_is_the_calls_error(host: Host, trust: Trust) -> None:
    c = connect(host, trust)
    with pytest.raises(CallFailed, match="no such key 'nope'"):
        c.call("get", "nope")
    assert c.call("put", "k", 1) is True  # the session goes on


def test_a_lost_answer_is_asked_for_again_with_the_same_record_and_the_request_runs_once(host: Host,
                                                                                        trust: Trust) -> None:
    c = connect(host, trust)
    c.call("put", "balance", 0)
    host.lose = 1
    with pytest.raises(AgentUnreachable):
        c.call("put", "balance", 100)
    assert c.outstanding
    assert c.call("get", "balance") == 100  # the lost one is completed first: the same record, its kept answer
    assert host.runs.count(("put", ["balance", 100])) == 1 and not c.outstanding
    assert host.seen[-3] == host.seen[-2]  # the very record the host had dropped the answer of


def test_a_host_that_claims_the_session_is_unknown_gets_the_call_run_once_in_a_new_session(host: Host,
                                                                                          trust: Trust) -> None:
    c = connect(host, trust)
    c.call("put", "k", "v1")
    old = c.session_id
    host.deny = 1  # held, never forwarded
    assert c.call("put", "k", "v2") is True
    assert c.session_id != old and host.runs.count(("put", ["k", "v2"])) == 1 and len(host.table) == 1
    assert c.settled is not None and c.settled.ran is False and "(put k v2)" in c.settled.why
    assert "ran once in a new one" in c.settled.why


def test_a_call_that_ran_before_the_host_claimed_the_session_unknown_is_not_run_again(host: Host,
                                                                                       trust: Trust) -> None:
    c = connect(host, trust)
    host.lose = 1
    with pytest.raises(AgentUnreachable):
        c.call("put", "k", "v")
    host.deny = 1  # the resend is denied: the client must close the old session and learn the request ran
    c._finish_pending()
    assert c.settled is not None and c.settled.ran is True and host.runs == [("put", ["k", "v"])]
    assert c.call("get", "k") == "v"


def test_a_ran_call_whose_answer_was_too_large_to_keep_says_so(host: Host, trust: Trust) -> None:
    c = connect(host, trust)
    host.lose = 1
    with pytest.raises(AgentUnreachable):
        c.call("big", 70_000)
    host.deny = 1  # the resend is denied: the close says the call ran; its answer (70 kB) was too large to keep
    with pytest.raises(CallFailed, match=r"the call \(big 70000\) ran, but the host withheld its answer"):
        c.call("get", "k")
    assert host.runs == [("big", [70_000])] and c.call("put", "k", 1) is True  # the next call: a new session


def test_a_session_the_enclave_forgot_cannot_run_and_the_client_says_the_outcome_is_unknown(
        host: Host, trust: Trust, platform: SimPlatform) -> None:
    c = connect(host, trust)
    c.call("put", "k", "v")
    host.table = SessionTable(platform, APP, ABOUT)  # restored from a checkpoint: no session
    with pytest.raises(CallFailed, match=r"does not know this session any more .* the call \(put k 2\) may or may "
                                         r"not have run, and it can no longer run"):
        c.call("put", "k", 2)
    assert c.call("put", "k", 3) is True and host.runs[-1] == ("put", ["k", 3])


def test_a_host_that_keeps_claiming_the_session_is_unknown_gets_nothing_run(host: Host, trust: Trust) -> None:
    c = connect(host, trust)
    c.call("put", "k", "v")
    host.deny = 10
    with pytest.raises(CallFailed, match=r"the call \(put k 2\) did not run: the host kept claiming"):
        c.call("put", "k", 2)
    assert host.deny == 10 - 3 and host.runs == [("put", ["k", "v"])]  # the first try and two resends


def test_a_platform_quote_is_bound_to_the_session(host: Host, trust: Trust) -> None:
    c = connect(host, trust)
    vq = c.platform_quote()
    assert vq.identity == APP and vq.platform_id == "host-a" and host.runs == []


def test_the_next_process_closes_what_this_one_left_outstanding(host: Host, trust: Trust, tmp_path: Path) -> None:
    unsettled = UnsettledCalls(tmp_path / "state" / "client" / "unsettled.json")
    first = connect(host, trust, unsettled)
    first.call("put", "k", "v")
    assert json.loads(unsettled.path.read_text()) == {}  # answered: nothing kept
    host.lose = 1
    with pytest.raises(AgentUnreachable):
        first.call("put", "k", "lost")
    assert not stat.S_IMODE(unsettled.path.stat().st_mode) & 0o077
    (entry,) = json.loads(unsettled.path.read_text()).values()
    assert entry["what"] == "put k lost" and entry["pending"] == 1
    second = connect(host, trust, unsettled)  # the next process: its first open closes the old session
    assert second.call("get", "k") == "lost"
    assert second.settled is not None and second.settled.ran is True and second.settled.answer is not None
    assert second.settled.answer.result is True and json.loads(unsettled.path.read_text()) == {}
    assert host.runs.count(("put", ["k", "lost"])) == 1 and len(host.table) == 1


def test_unsettled_calls_file_holds_one_entry_per_enclave_and_reads_what_it_wrote(tmp_path: Path) -> None:
    unsettled = UnsettledCalls(tmp_path / "unsettled.json")
    closing = Closing(bytes(16), bytes([1] * 32), bytes([2] * 16), 3, bytes([4] * 32), "put k 1")
    unsettled.put("a", closing)
    unsettled.put("b", Closing(bytes([5] * 16), bytes(32), bytes(16)))
    assert unsettled.get("a") == closing and unsettled.get("b") == Closing(bytes([5] * 16), bytes(32), bytes(16))
    unsettled.drop("a")
    assert unsettled.get("a") is None and unsettled.get("b") is not None
    for bad in ("[]", '{"a": 1}', '{"a": {"session_id": "zz"}}'):
        unsettled.path.write_text(bad)
        assert unsettled.get("a") is None
    unsettled.path.write_text("not json")
    with pytest.raises(ConfigError, match="cannot read unsettled calls file"):
        unsettled.get("a")


def test_the_client_refuses_an_enclave_its_trust_does_not_accept(host: Host, platform: SimPlatform,
                                                                 tmp_path: Path) -> None:
    narrow = Trust(platform.verify, Expect(min_svn=3), None)
    with pytest.raises(AttestationError, match="below the minimum 3"):
        connect(host, narrow).call("put", "k", 1)
    assert host.runs == [] and len(host.table) == 1  # attested and refused before anything was sent sealed


def test_an_agent_that_answers_with_something_else_than_bytes_is_a_protocol_error(host: Host, trust: Trust) -> None:
    c = connect(host, trust)
    c.route.request = lambda req: {"not": "bytes"}  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match="answered a session open with something else than bytes"):
        c.call("get", "k")
    c = connect(host, trust)
    c.open()
    c.route.request = lambda req: "text"  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match="answered a sealed request with something else than bytes"):
        c.call("get", "k")


def test_pin_now_pins_what_answers_on_purpose(host: Host, platform: SimPlatform, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from constmig.client import session as session_mod

    routes: list[Any] = []

    class Route:
        def __init__(self, addr: str | None, name: str, timeout: float | None, etcd: str | None) -> None:
            self.addr, self.name, self.timeout, self.etcd = addr or "", name, timeout, etcd
            routes.append(self)

        def request(self, req: Any) -> Any:
            return host.request(req)

        def close(self) -> None:
            pass

    monkeypatch.setattr(session_mod, "EnclaveRoute", Route)
    known = KnownEnclaves(tmp_path / "known.json")
    t = Trust(platform.verify, None, known, None)
    pin, before = pin_now("h:1", "kv1", t)
    assert before is None and pin is not None and pin.instance == ABOUT.instance and known.get("kv1") == pin
    host.table.about = About(bytes([9] * 16), ABOUT.code, ABOUT.launch)  # another instance answers now
    again, before = pin_now("h:1", "kv1", t)
    assert before == pin and again is not None and again.instance == bytes([9] * 16) and known.get("kv1") == again
    with pytest.raises(AttestationError, match="below the minimum 5"):
        pin_now("h:1", "kv1", Trust(platform.verify, Expect(min_svn=5), known, None))
    assert known.get("kv1") == again  # refused: the pin stays
    assert pin_now("h:1", "kv1", Trust(platform.verify, None, None)) == (None, None)
    assert routes[0].timeout == 60.0  # pinning waits a minute for the enclave by default
    found, before = pin_now(None, "kv1", t, etcd="http://dir:2379")  # found through a directory: its own pin
    assert before is None and found is not None and known.get("kv1", directory="http://dir:2379") == found
    again, before = pin_now(None, "kv1", t, etcd="http://dir:2379", timeout=5)
    assert before == found and routes[-1].timeout == 5 and routes[-1].etcd == "http://dir:2379"


def test_what_a_call_is_called_is_at_most_80_characters() -> None:
    from constmig.client.session import _describe

    assert _describe("put", ("k", 1, [2])) == "put k 1 [2]"
    exact = _describe("put", ("k", "v" * 74))
    assert len(exact) == 80 and exact.endswith("v")
    longer = _describe("put", ("k", "v" * 75))
    assert longer == "put k " + "v" * 73 + "…" and len(longer) == 80


def test_the_agent_and_the_wait_can_be_changed_and_each_change_drops_the_connection(host: Host, trust: Trust) -> None:
    c = EnclaveClient("127.0.0.1:7001", "kv1", trust=trust)
    assert c.addr == "127.0.0.1:7001" and c.timeout == 600.0  # a call may run long: ten minutes by default
    closed: list[str] = []
    c.route.close = lambda: closed.append("closed")  # type: ignore[method-assign]
    c.addr = "127.0.0.1:7002"
    c.timeout = 3.0
    assert c.route.addr == c.addr == "127.0.0.1:7002" and c.route.timeout == c.timeout == 3.0
    assert closed == ["closed", "closed"]


def test_the_app_is_what_the_quote_bound_launch_configuration_names(platform: SimPlatform, trust: Trust) -> None:
    for launch, app in (('{"app": "kvstore"}', "kvstore"), ("not json", None), ("[1]", None), ('{"app": 3}', None),
                        ("{}", None)):
        c = connect(Host(SessionTable(platform, APP, About(ABOUT.instance, ABOUT.code, launch))),
                    Trust(platform.verify, None, None))
        assert c.app is None  # nothing attested yet
        c.open()
        assert c.app == app, launch


def test_a_platform_quote_answer_that_is_not_a_quote_is_refused(host: Host, trust: Trust) -> None:
    class NoQuote:
        platform_id = "host-a"

        def quote(self, identity: Identity, report_data: bytes) -> Any:
            return "not a quote"

    c = connect(host, trust)
    c.open()
    host.table.backend = NoQuote()  # type: ignore[assignment]
    with pytest.raises(CallFailed, match="^the enclave did not return a quote$"):
        c.platform_quote()


def test_a_failure_to_write_the_unsettled_calls_file_is_one_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from constmig.client import session as session_mod

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    unsettled = UnsettledCalls(tmp_path / "unsettled.json")
    monkeypatch.setattr(session_mod.tempfile, "mkstemp", full)
    with pytest.raises(ConfigError) as info:
        unsettled.put("a", Closing(bytes(16), bytes(32), bytes(16)))
    assert str(info.value) == f"cannot write unsettled calls file {unsettled.path}: No space left on device"


def test_an_outstanding_call_is_closed_only_by_a_client_of_the_same_enclave(host: Host, trust: Trust,
                                                                            tmp_path: Path) -> None:
    """The same name in another fleet directory is another enclave: its client must not close, or claim to
    settle, a session this one left."""
    import msgspec

    unsettled = UnsettledCalls(tmp_path / "unsettled.json")
    a = EnclaveClient(None, "kv1", timeout=5, trust=trust, etcd="http://dir-a:2379", unsettled=unsettled)
    a.route.request = host.request  # type: ignore[method-assign]
    host.lose = 1
    with pytest.raises(AgentUnreachable):
        a.call("put", "k", 1)
    other = Host(host.table)
    b = EnclaveClient(None, "kv1", timeout=5, trust=Trust(trust.verify, None, None), etcd="http://dir-b:2379",
                      unsettled=unsettled)
    b.route.request = other.request  # type: ignore[method-assign]
    b.open()
    assert msgspec.msgpack.decode(other.seen[0])["close"] is None and b.settled is None
    assert len(json.loads(unsettled.path.read_text())) == 1  # still there for a's next process
