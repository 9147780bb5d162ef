"""Client sessions (wire/session.py) on bytes, no sockets: the client's and the enclave's halves, with
the test as the host in between editing, replaying, reordering and forging what it forwards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from constmig.client.trust import Expect
from constmig.errors import AttestationError, IntegrityError, ProtocolError
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca, load_root, verify_quote
from constmig.wire.session import (
    HEADER,
    About,
    Answer,
    Call,
    ClientOpen,
    ClientSession,
    EnclaveEnd,
    QuoteRequest,
    accept,
    decode_ends,
    encode_ends,
)

APP = Identity(measurement=measure(b"kv app code"), signer=bytes(range(32)), product_id=1, svn=2)
OTHER = Identity(measurement=measure(b"other code"), signer=bytes(range(32)), product_id=1, svn=2)
ABOUT = About(bytes(range(16)), bytes(32), '{"app": "kv"}')  # which instance, code and launch answer


@dataclass
class World:
    a: SimPlatform
    b: SimPlatform
    rogue: SimPlatform  # certified by a CA the client does not trust
    root: Any

    def verify(self, quote: bytes) -> Any:
        return verify_quote(quote, self.root)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base: Path = tmp_path_factory.mktemp("sess")
    create_root_ca(base / "ca")
    create_root_ca(base / "rogue-ca")
    return World(SimPlatform.provision(base / "a", base / "ca", "host-a"),
                 SimPlatform.provision(base / "b", base / "ca", "host-b"),
                 SimPlatform.provision(base / "r", base / "rogue-ca", "host-a"), load_root(base / "ca"))


def open_session(world: World, platform: SimPlatform | None = None, ident: Identity = APP,
                 check: Any = None) -> tuple[ClientSession, EnclaveEnd]:
    hs = ClientOpen()
    plat = platform or world.a
    end, acc = accept(hs.hello, lambda rd: plat.quote(ident, rd), ABOUT)
    return hs.finish(acc, world.verify, check or (lambda vq, about: None)), end


class App:
    """A stand-in for the app: records every run, so a second run of one request shows."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, list[Any]]] = []
        self.balance = 0

    def serve(self, end: EnclaveEnd, record: bytes, platform: str = "host-a") -> bytes:
        req = end.receive(record)
        if isinstance(req, bytes):
            return req
        assert isinstance(req, Call)
        self.runs.append((req.method, req.args))
        if req.method == "deposit":
            self.balance += req.args[0]
        return end.answer(record, Answer(True, platform, self.balance))


def test_round_trip_and_the_platform_in_each_answer(world: World) -> None:
    client, end = open_session(world)
    app = App()
    assert client.identity == APP and client.platform == "host-a"
    for i, amount in enumerate((100, 5, 7)):
        answer = client.open_answer(app.serve(end, client.seal_call("deposit", [amount], {})))
        assert answer.ok and answer.result == sum((100, 5, 7)[:i + 1])
    assert client.pending is None and end.next_seq == 3 and client.moves == []
    # after a move, the enclave's answers say so, authenticated
    answer = client.open_answer(app.serve(end, client.seal_call("deposit", [1], {}), platform="host-b"))
    assert answer.result == 113 and client.platform == "host-b" and client.moves == ["host-b"]


def test_nothing_the_client_sends_is_readable(world: World) -> None:
    client, end = open_session(world)
    canary = b"canary-" + bytes(range(40))
    record = client.seal_call("put", ["k", canary], {})
    assert canary not in record and b"put" not in record
    answer_record = end.answer(record, Answer(True, "host-a", canary))
    assert canary not in answer_record


def test_resent_request_runs_once_and_gets_the_same_answer(world: World) -> None:
    client, end = open_session(world)
    app = App()
    record = client.seal_call("deposit", [100], {})
    first = app.serve(end, record)  # the answer is lost on the way back
    again = app.serve(end, client.pending)  # the client resends the same record
    assert again == first and app.runs == [("deposit", [100])]
    assert client.open_answer(again).result == 100


def test_replayed_request_is_refused_and_changes_nothing(world: World) -> None:
    client, end = open_session(world)
    app = App()
    records = []
    for amount in (100, 5):
        records.append(client.seal_call("deposit", [amount], {}))
        client.open_answer(app.serve(end, records[-1]))
    with pytest.raises(IntegrityError, match="seq 0 where 2 was expected .replayed"):
        app.serve(end, records[0])
    assert app.balance == 105 and len(app.runs) == 2 and end.next_seq == 2
    # the session goes on
    assert client.open_answer(app.serve(end, client.seal_call("deposit", [1], {}))).result == 106


def test_reordered_request_is_refused(world: World) -> None:
    client, end = open_session(world)
    first = client.seal_call("deposit", [1], {})
    client.pending = None  # the client seals a second request without waiting (a host holding back #0)
    second = client.seal_call("deposit", [2], {})
    app = App()
    with pytest.raises(IntegrityError, match="seq 1 where 0 was expected .reordered"):
        app.serve(end, second)
    assert app.runs == [] and end.next_seq == 0
    app.serve(end, first)
    assert app.runs == [("deposit", [1])]


@pytest.mark.parametrize("where", ["session id", "seq", "ciphertext", "tag"])
def test_modified_request_is_refused_and_the_original_still_runs(world: World, where: str) -> None:
    client, end = open_session(world)
    app = App()
    record = bytearray(client.seal_call("deposit", [100], {}))
    at = {"session id": 3, "seq": HEADER.size - 1, "ciphertext": HEADER.size + 2, "tag": len(record) - 1}[where]
    record[at] ^= 0x01
    with pytest.raises(IntegrityError):
        app.serve(end, bytes(record))
    assert app.runs == [] and end.next_seq == 0
    assert client.open_answer(app.serve(end, client.pending)).result == 100


def test_modified_or_forged_answer_is_refused_and_ends_the_session(world: World) -> None:
    client, end = open_session(world)
    app = App()
    answer = bytearray(app.serve(end, client.seal_call("deposit", [100], {})))
    answer[-3] ^= 0x80
    with pytest.raises(IntegrityError, match="failed authentication"):
        client.open_answer(bytes(answer))
    with pytest.raises(IntegrityError, match="unusable"):
        client.open_answer(app.serve(end, client.pending))  # even the real answer: the session is over


def test_an_old_answer_is_refused(world: World) -> None:
    """An answer from an earlier position (the old copy after a handoff replaying what it said)."""
    client, end = open_session(world)
    app = App()
    old = app.serve(end, client.seal_call("deposit", [100], {}))
    client.open_answer(old)
    client.seal_call("deposit", [5], {})
    with pytest.raises(IntegrityError, match="seq 0 arrived where 1 was expected"):
        client.open_answer(old)


def test_answer_of_another_session_is_refused(world: World) -> None:
    c1, e1 = open_session(world)
    c2, e2 = open_session(world)
    app = App()
    c2.seal_call("deposit", [1], {})
    with pytest.raises(IntegrityError, match="another session"):
        c2.open_answer(app.serve(e1, c1.seal_call("deposit", [1], {})))


def test_quote_of_another_session_is_refused(world: World) -> None:
    """A rogue host answers a client's Hello with an Accept recorded from another session."""
    first = ClientOpen()
    _, recorded = accept(first.hello, lambda rd: world.a.quote(APP, rd), ABOUT)
    with pytest.raises(AttestationError, match="not bound to this session"):
        ClientOpen().finish(recorded, world.verify, lambda vq, about: None)


def test_host_swapping_the_enclave_key_is_refused(world: World) -> None:
    """The host keeps the quote but puts its own key in the Accept: the binding catches it."""
    hs = ClientOpen()
    _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), ABOUT)
    msg = msgspec.msgpack.decode(acc)
    body = msgspec.msgpack.decode(msg["body"])
    body["eph_pub"] = msgspec.msgpack.decode(ClientOpen().hello)["eph_pub"]  # some other valid key
    msg["body"] = msgspec.msgpack.encode(body)
    with pytest.raises(AttestationError, match="not bound to this session"):
        hs.finish(msgspec.msgpack.encode(msg), world.verify, lambda vq, about: None)


def test_enclave_under_another_root_is_refused(world: World) -> None:
    with pytest.raises(AttestationError, match="not issued by the trusted root|not signed by the trusted root"):
        open_session(world, platform=world.rogue)


def test_client_pinned_to_other_code_refuses(world: World) -> None:
    pinned = Expect(measurement=OTHER.measurement, source="pinned in known.json")
    with pytest.raises(AttestationError, match=r"runs measurement [0-9a-f]{16}…, not the expected "
                                               r"[0-9a-f]{16}… \(pinned in known.json\)"):
        open_session(world, check=lambda vq, about: pinned.check("kv1", vq))
    with pytest.raises(AttestationError, match="security version 2, below the minimum 3"):
        open_session(world, check=lambda vq, about: Expect(min_svn=3).check("kv1", vq))
    open_session(world, check=lambda vq, about: Expect(measurement=APP.measurement).check("kv1", vq))  # the control


def test_sessions_travel_as_data_and_continue(world: World) -> None:
    """What a migration carries: the table encoded on one side, decoded on the other, same keys."""
    client, end = open_session(world)
    app = App()
    client.open_answer(app.serve(end, client.seal_call("deposit", [100], {})))
    in_flight = client.seal_call("deposit", [5], {})
    last = app.serve(end, in_flight)  # ran at the source; its answer never reached the client
    (moved,) = decode_ends(encode_ends([end]))
    assert moved == end
    assert app.serve(moved, client.pending, platform="host-b") == last  # answered again, not run again
    assert client.open_answer(last).result == 105 and len(app.runs) == 2


def test_platform_quote_is_bound_to_the_session(world: World) -> None:
    client, end = open_session(world)
    record = client.seal_quote_request()
    req = end.receive(record)
    assert isinstance(req, QuoteRequest)
    quote = world.b.quote(APP, end.quote_report_data(req))
    answer = client.open_answer(end.answer(record, Answer(True, "host-b", quote)))
    vq = client.check_platform_quote(answer.result, world.verify)
    assert vq.platform_id == "host-b" and client.moves == ["host-b"]
    # a quote for another request, or of other code, is refused
    record = client.seal_quote_request()
    req = end.receive(record)
    stale = world.b.quote(APP, end.quote_report_data(QuoteRequest(bytes(32))))
    client.open_answer(end.answer(record, Answer(True, "host-b", stale)))
    with pytest.raises(AttestationError, match="not bound"):
        client.check_platform_quote(stale, world.verify)
    record = client.seal_quote_request()
    req = end.receive(record)
    other = world.b.quote(OTHER, end.quote_report_data(req))
    client.open_answer(end.answer(record, Answer(True, "host-b", other)))
    with pytest.raises(AttestationError, match="other code"):
        client.check_platform_quote(other, world.verify)


@pytest.mark.parametrize("blob", [b"", b"\x00" * 10, b"\xc1", b"not msgpack at all"])
def test_malformed_messages_are_protocol_errors(world: World, blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        accept(blob, lambda rd: world.a.quote(APP, rd), ABOUT)
    with pytest.raises(ProtocolError):
        ClientOpen().finish(blob, world.verify, lambda vq, about: None)
    _, end = open_session(world)
    with pytest.raises(ProtocolError):
        end.receive(blob)


def test_an_app_bug_is_answered_sealed_and_never_run_again(world: World) -> None:
    """The enclave's table: a call that raised (an app bug, after changing state, perhaps) is answered as
    an internal error and counts as run; the same record again gets that answer, not a second run."""
    from constmig.enclave.sessions import SessionTable

    table = SessionTable(world.a, APP, ABOUT)
    hs = ClientOpen()
    client = hs.finish(table.open(hs.hello), world.verify, lambda vq, about: None)
    runs = []

    def buggy(method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        runs.append(method)
        raise ZeroDivisionError("division by zero")

    record = client.seal_call("oops", [], {})
    first = table.call(record, buggy)
    assert table.call(record, buggy) == first and runs == ["oops"]
    answer = client.open_answer(first)
    assert not answer.ok and answer.kind == "InternalError" and "ZeroDivisionError" in answer.error


# --- which enclave answers, and closing a session the client gave up on (issue 31) ------------------------

def test_the_accept_binds_the_instance_code_and_launch(world: World) -> None:
    """The host rewrites `about` (another instance id, say) in a real Accept: the quote no longer covers it."""
    hs = ClientOpen()
    _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), ABOUT)
    msg = msgspec.msgpack.decode(acc)
    body = msgspec.msgpack.decode(msg["body"])
    for field, value in (("instance", bytes(16)), ("code", bytes([1] * 32)), ("launch", '{"app": "other"}')):
        forged = {**body, "about": {**body["about"], field: value}}
        with pytest.raises(AttestationError, match="not bound to this session"):
            hs.finish(msgspec.msgpack.encode({**msg, "body": msgspec.msgpack.encode(forged)}), world.verify,
                      lambda vq, about: None)
    seen = []
    hs.finish(acc, world.verify, lambda vq, about: seen.append(about))
    assert seen == [ABOUT]


def reopen(world: World, end: EnclaveEnd, closing: Any) -> tuple[ClientSession, Any]:
    """A new session whose Hello closes `closing`, answered by an enclave that holds `end` (or not)."""
    from constmig.wire.session import parse_hello

    hs = ClientOpen(closing)
    h = parse_hello(hs.hello)
    closed = end.closed() if end is not None and end.proves_close(h) else None
    _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), ABOUT, closed)
    return hs.finish(acc, world.verify, lambda vq, about: None), closed


def test_a_close_says_whether_the_outstanding_request_ran(world: World) -> None:
    from constmig.wire.session import settle

    client, end = open_session(world)
    app = App()
    client.open_answer(app.serve(end, client.seal_call("deposit", [100], {})))
    client.seal_call("deposit", [5], {})  # held by the host: never reaches the enclave
    closing = client.closing("deposit 5")
    assert closing.pending == 1
    new, closed = reopen(world, end, closing)
    assert closed.known and closed.ran == 1
    got = settle(closing, new.closed, new.about)
    assert got.ran is False and "did not run" in got.why and "never will" in got.why
    # the same, but the request did run and only its answer was lost: its kept answer comes back
    client, end = open_session(world)
    record = client.seal_call("deposit", [7], {})
    app.serve(end, record)
    new, _ = reopen(world, end, client.closing())
    got = settle(client.closing(), new.closed, new.about)
    assert got.ran is True and got.answer is not None and got.answer.result == 107  # 100 + 7: the 5 never ran


def test_a_close_needs_the_old_sessions_keys_and_this_hello(world: World) -> None:
    """A close made without the session's keys, or taken from one Hello into another, closes nothing."""
    from dataclasses import replace

    from constmig.wire.session import parse_hello

    client, end = open_session(world)
    client.seal_call("deposit", [1], {})
    forged = replace(client.closing(), key=bytes(32))
    assert not end.proves_close(parse_hello(ClientOpen(forged).hello))
    real = ClientOpen(client.closing())
    moved = msgspec.msgpack.decode(ClientOpen().hello)
    moved["close"] = msgspec.msgpack.decode(real.hello)["close"]  # the host grafts the proof onto its own Hello
    assert not end.proves_close(parse_hello(msgspec.msgpack.encode(moved)))
    assert end.proves_close(parse_hello(real.hello))


def test_a_close_must_be_answered_and_is_read_against_the_instance(world: World) -> None:
    from constmig.wire.session import Closed, settle

    client, end = open_session(world)
    client.seal_call("deposit", [1], {})
    closing = client.closing()
    hs = ClientOpen(closing)
    _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), ABOUT)  # an enclave that ignores the close
    with pytest.raises(ProtocolError, match="does not answer the close"):
        hs.finish(acc, world.verify, lambda vq, about: None)
    unknown = settle(closing, Closed(closing.session_id, False), ABOUT)
    assert unknown.ran is None and "can no longer run" in unknown.why
    other = settle(closing, Closed(closing.session_id, True, 0), About(bytes(16), bytes(32), "{}"))
    assert other.ran is None and "not this one" in other.why
    client.pending = None  # pretend request 0 was answered and request 1 is the one outstanding
    client.seal_call("deposit", [2], {})
    with pytest.raises(ProtocolError, match="after answers to all before it"):  # fewer ran than were answered
        settle(client.closing(), Closed(closing.session_id, True, 0), ABOUT)
