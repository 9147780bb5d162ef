"""Client sessions (wire/session.py) on bytes, no sockets: the client's and the enclave's halves, with
the test as the host in between editing, replaying, reordering and forging what it forwards."""

from __future__ import annotations

import re
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


# --- which enclave answers, and closing a session the client gave up on ----------------------------------

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


# --- version 2 on the wire: its bounds, its strictness, its bytes (what a mutation run found unchecked) --

V2_RECORD = b"constmig-session-v2 record"
LARGEST_BODY = 64 * 1024 + 2 * 4096  # an Accept's body: a kept answer (64 KiB) and room for the launch twice over


def quoted_accept(world: World, hello: bytes, body: dict[str, Any]) -> bytes:
    """An Accept the enclave really quoted, for a body the test wrote (a field the protocol does not have)."""
    from constmig.wire.kdf import transcript_hash

    raw = msgspec.msgpack.encode(body)
    quote = world.a.quote(APP, transcript_hash(b"constmig-session-v2 accept", hello, raw))
    return msgspec.msgpack.encode({"type": "accept", "body": raw, "quote": quote})


def sealed(key: bytes, direction: int, sid: bytes, seq: int, plain: bytes) -> bytes:
    """A record as version 2 seals it: session id | seq | AES-GCM(key, nonce (direction, seq), aad label | header)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = sid + seq.to_bytes(8, "big")
    return header + AESGCM(key).encrypt(direction.to_bytes(4, "big") + seq.to_bytes(8, "big"), plain,
                                        V2_RECORD + header)


def test_the_hello_says_version_2_and_other_versions_are_refused() -> None:
    from constmig.wire.session import parse_hello

    hello = msgspec.msgpack.decode(ClientOpen().hello)
    assert hello["version"] == 2
    for version in (1, 3):
        with pytest.raises(ProtocolError, match=f"client speaks session version {version}, this enclave 2"):
            parse_hello(msgspec.msgpack.encode({**hello, "version": version}))


def test_version_2_records_are_what_the_protocol_says(world: World) -> None:
    """Another build of version 2 must read these bytes: requests sealed under c2e with nonce direction 11,
    answers under e2c with direction 12, the header in the associated data."""
    from constmig.tee.backend import VerifiedQuote

    sid, c2e, e2c, th = bytes(range(16)), bytes([1] * 32), bytes([2] * 32), bytes(64)
    client = ClientSession(sid, c2e, e2c, th, VerifiedQuote(APP, bytes(64), "host-a", "sim"), ABOUT)
    record = client.seal_call("get", ["k"], {})
    assert record == sealed(c2e, 11, sid, 0, msgspec.msgpack.encode({"type": "call", "method": "get",
                                                                     "args": ["k"], "kwargs": {}}))
    end = EnclaveEnd(sid, c2e, e2c, th)
    answer = end.answer(record, Answer(True, "host-a", "v"))
    assert answer == sealed(e2c, 12, sid, 0, msgspec.msgpack.encode(
        {"ok": True, "platform": "host-a", "result": "v", "error": "", "kind": ""}))
    assert client.open_answer(answer).result == "v"


@pytest.mark.parametrize("what", ["hello", "close", "accept", "body", "about", "closed", "call", "quote request",
                                  "answer", "table", "table entry"])
def test_every_message_refuses_a_field_it_does_not_know(world: World, what: str) -> None:
    """A field this version does not know is refused, never skipped: the enclave would otherwise ignore, say, a
    close it cannot read, and the client a word of the enclave's it does not understand. (Each message is
    also read without the field: the field alone is refused.)"""
    from constmig.wire.session import DIR_C2E, DIR_E2C, decode_table, parse_hello

    def attempt(extra: dict[str, Any]) -> None:
        client, end = open_session(world)
        if what in ("hello", "close"):
            hello = msgspec.msgpack.decode(ClientOpen(client.closing()).hello)
            (hello if what == "hello" else hello["close"]).update(extra)
            parse_hello(msgspec.msgpack.encode(hello))
        elif what in ("accept", "body", "about", "closed"):
            client.seal_call("deposit", [1], {})
            hs = ClientOpen(client.closing())
            _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), ABOUT, end.closed())
            msg = msgspec.msgpack.decode(acc)
            if what == "accept":
                forged = msgspec.msgpack.encode({**msg, **extra})
            else:
                body = msgspec.msgpack.decode(msg["body"])
                (body if what == "body" else body[what]).update(extra)
                forged = quoted_accept(world, hs.hello, body)
            hs.finish(forged, world.verify, lambda vq, about: None)
        elif what in ("call", "quote request"):
            req = {"type": "call", "method": "deposit"} if what == "call" else {"type": "quote", "nonce": bytes(32)}
            end.receive(sealed(end.c2e, DIR_C2E, end.session_id, 0, msgspec.msgpack.encode({**req, **extra})))
        elif what == "answer":
            client.seal_call("deposit", [1], {})
            client.open_answer(sealed(end.e2c, DIR_E2C, end.session_id, 0, msgspec.msgpack.encode(
                {"ok": True, "platform": "host-a", **extra})))
        else:
            entry = msgspec.structs.asdict(end)
            decode_table(msgspec.msgpack.encode({"ends": [{**entry, **extra}], "closed": []} if what == "table entry"
                                                else {"ends": [entry], "closed": [], **extra}))

    attempt({})
    with pytest.raises(ProtocolError, match="malformed (session hello|session accept|sealed request|sealed answer|"
                                            "session table)"):
        attempt({"extra": 1})


def test_messages_and_what_a_close_settles_are_immutable() -> None:
    from constmig.wire.session import (
        Accept,
        AcceptBody,
        Close,
        Closed,
        Closing,
        Hello,
        Settled,
    )

    sid = bytes(16)
    for msg, field in ((Close(sid, bytes(32)), "mac"), (Hello(2, bytes(32), bytes(32)), "close"),
                       (ABOUT, "instance"), (Closed(sid, True, 1), "ran"),
                       (AcceptBody(sid, bytes(32), bytes(32), ABOUT), "about"), (Accept(b"b", b"q"), "body"),
                       (Call("get"), "method"), (QuoteRequest(bytes(32)), "nonce"), (Answer(True, "a"), "result"),
                       (Closing(sid, bytes(32), bytes(16), 0), "pending"), (Settled(False, None, ""), "ran")):
        with pytest.raises(AttributeError):
            setattr(msg, field, None)


def test_malformed_message_detail_is_cut_at_200_characters() -> None:
    from constmig.wire.session import parse_hello

    hello = {**msgspec.msgpack.decode(ClientOpen().hello), "z" * 400: 1}  # msgspec names the unknown field
    with pytest.raises(ProtocolError) as info:
        parse_hello(msgspec.msgpack.encode(hello))
    prefix = "malformed session hello from the client: "
    assert str(info.value).startswith(prefix) and len(str(info.value)) == len(prefix) + 200


@pytest.mark.parametrize("size", [31, 33])
def test_keys_and_nonces_are_32_bytes(size: int) -> None:
    from constmig.wire.session import parse_hello

    hello = msgspec.msgpack.decode(ClientOpen().hello)
    with pytest.raises(ProtocolError, match="malformed session hello"):
        parse_hello(msgspec.msgpack.encode({**hello, "nonce": bytes(size)}))


@pytest.mark.parametrize(("body", "quote", "read"), [(0, 1, False), (1, 0, False), (1, 1, True),
                                                     (LARGEST_BODY, 1, True), (LARGEST_BODY + 1, 1, False)])
def test_an_accept_out_of_bounds_is_refused_before_its_quote_is_read(body: int, quote: int, read: bool) -> None:
    seen: list[bytes] = []

    def verify(q: bytes) -> Any:
        seen.append(q)
        raise AttestationError("not a quote")

    msg = msgspec.msgpack.encode({"type": "accept", "body": b"b" * body, "quote": b"q" * quote})
    with pytest.raises(AttestationError if read else ProtocolError):
        ClientOpen().finish(msg, verify, lambda vq, about: None)
    assert bool(seen) is read


@pytest.mark.parametrize(("size", "ok"), [(4096, True), (4097, False)])
def test_the_launch_configuration_is_at_most_4096_characters(world: World, size: int, ok: bool) -> None:
    launch = '{"pad": "' + "x" * (size - 11) + '"}'
    assert len(launch) == size
    hs = ClientOpen()
    _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), About(ABOUT.instance, ABOUT.code, launch))
    if ok:
        assert hs.finish(acc, world.verify, lambda vq, about: None).about.launch == launch
    else:
        with pytest.raises(ProtocolError, match="malformed session accept"):
            hs.finish(acc, world.verify, lambda vq, about: None)


@pytest.mark.parametrize(("size", "kept"), [(64 * 1024, True), (64 * 1024 + 1, False)])
def test_a_kept_answer_up_to_64_kib_rides_in_the_closing_accept(world: World, size: int, kept: bool) -> None:
    """The largest Accept there is (a 64 KiB kept answer, a 4096-character launch) gets through; one byte
    more and the answer is withheld: the client learns the call ran, not its result."""
    import copy

    from constmig.wire.session import parse_hello, settle

    client, end = open_session(world)
    record = client.seal_call("put", ["k"], {})
    overhead = len(copy.copy(end).answer(record, Answer(True, "host-a", b"x" * 60000))) - 60000
    result = b"x" * (size - overhead)
    assert len(end.answer(record, Answer(True, "host-a", result))) == size
    hs = ClientOpen(client.closing("put k"))
    closed = end.closed() if end.proves_close(parse_hello(hs.hello)) else None
    big = About(ABOUT.instance, ABOUT.code, '{"pad": "' + "x" * 4085 + '"}')
    _, acc = accept(hs.hello, lambda rd: world.a.quote(APP, rd), big, closed)
    new = hs.finish(acc, world.verify, lambda vq, about: None)
    got = settle(client.closing("put k"), new.closed, new.about)
    assert got.ran is True and "(put k) ran" in got.why
    assert (got.answer is not None and got.answer.result == result) if kept else got.answer is None


@pytest.mark.parametrize(("size", "ok"), [(39, False), (40, True), ((8 << 20) - 4096, True),
                                          ((8 << 20) - 4095, False)])
def test_a_record_is_a_header_and_a_tag_at_least_and_fits_an_agent_frame(size: int, ok: bool) -> None:
    from constmig.wire.session import split_record

    if ok:
        assert split_record(bytes(size))[2] == bytes(size - 24)
    else:
        with pytest.raises(ProtocolError, match="malformed session record"):
            split_record(bytes(size))


def test_a_changed_copy_of_the_last_request_is_refused_not_answered(world: World) -> None:
    """Only the identical record of the last request gets its kept answer; one with the same seq but other
    bytes is refused like any replay."""
    client, end = open_session(world)
    app = App()
    record = client.seal_call("deposit", [100], {})
    client.open_answer(app.serve(end, record))
    changed = bytearray(record)
    changed[HEADER.size + 1] ^= 0x01
    with pytest.raises(IntegrityError, match="seq 0 where 1 was expected .replayed"):
        app.serve(end, bytes(changed))
    assert app.runs == [("deposit", [100])] and end.next_seq == 1


def test_the_last_sequence_number_is_never_used() -> None:
    from constmig.wire.records import U64_MAX
    from constmig.wire.session import DIR_C2E

    end = EnclaveEnd(bytes(16), bytes([1] * 32), bytes([2] * 32), bytes(64), next_seq=U64_MAX - 1)
    req = msgspec.msgpack.encode(Call("get"))
    record = sealed(end.c2e, DIR_C2E, end.session_id, U64_MAX - 1, req)
    assert end.receive(record) == Call("get")
    end.answer(record, Answer(True, "host-a"))
    assert end.next_seq == U64_MAX
    with pytest.raises(IntegrityError, match="exhausted"):
        end.receive(sealed(end.c2e, DIR_C2E, end.session_id, U64_MAX, req))


def test_settling_says_which_call_and_reads_only_its_own_kept_answer(world: World) -> None:
    from dataclasses import replace

    from constmig.wire.session import Closed, Settled, settle

    client, end = open_session(world)
    app = App()
    record = client.seal_call("deposit", [7], {})
    app.serve(end, record)
    closing = client.closing("deposit 7")
    sid = closing.session_id
    nothing = settle(replace(closing, pending=None), Closed(sid, True, 1), ABOUT)
    assert nothing == Settled(False, None, "nothing was outstanding")
    withheld = settle(closing, Closed(sid, True, 1), ABOUT)  # ran; its answer was too large to carry
    assert withheld.ran is True and withheld.answer is None and "(deposit 7) ran" in withheld.why
    other, other_end = open_session(world)
    foreign = app.serve(other_end, other.seal_call("deposit", [1], {}))  # seq 0 too, of another session
    assert settle(closing, Closed(sid, True, 1, foreign), ABOUT).answer is None
    tampered = bytearray(end.last_answer)
    tampered[-1] ^= 0x01
    with pytest.raises(IntegrityError, match="kept answer of the closed session failed authentication"):
        settle(closing, Closed(sid, True, 1, bytes(tampered)), ABOUT)
    elsewhere = settle(closing, Closed(sid, True, 1), About(bytes(16), bytes(32), "{}"))
    assert elsewhere.ran is None and re.search(r"the earlier call \(deposit 7\) was with instance [0-9a-f]{16}…, "
                                               r"not this one \(0{16}…\)", elsewhere.why)
