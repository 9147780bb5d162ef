"""The control protocol (wire/control.py) on bytes, h11 style: no sockets, no agents. Every request
round-trips, encodes to the map the other side always read, and anything else is refused in one line."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import msgspec
import pytest

from constmig.enclave.lifecycle import Life
from constmig.errors import AgentError, ConstmigError, ProtocolError
from constmig.host import admin
from constmig.migration import constants, strategies
from constmig.migration.strategies.converge import Goal
from constmig.wire import control as c
from constmig.wire.framing import decode_body
from constmig.wire.framing import encode as frame

SAMPLES: list[c.Request] = [
    c.Ping(), c.Status(), c.Tls(), c.Shutdown(),
    c.Run(name="kv", app="kvstore", heap=64 << 20, config={"shards": 4}, plain_calls=True),
    c.Checkpoint(name="kv"), c.Restore(path="/x/kv.v3.ckpt", name="kv2", release="ab" * 32),
    c.Call(name="kv", method="put", args=["k", 1], kwargs={"x": None}),
    c.SessionOpen(name="kv", hello=b"\x00hello"), c.SessionCall(name="kv", record=b"\xffrec"),
    c.Stop(name="kv", force=True),
    c.Migrate(name="kv", to="10.0.0.2:7001", strategy="precopy", max_downtime=0.05, max_rounds=3,
              write_tracking="enclave", max_bandwidth=1e8, resume_deadline=0.0),
    c.Cancel(name="kv", reason="interrupted"), c.Resume(name="kv", timeout=5, resume_deadline=1),
    c.PrepareIn(spec=c.LaunchSpec("kv", "kvstore", 1 << 26), strategy="constmig", source="10.0.0.1:7001",
                tracker="access"),
    c.DropIn(name="kv"), c.Data(name="kv", channel="demand", resume=2),
    c.Ecall(name="get", args=["k"]), c.EnclaveSessionOpen(hello=b"h"), c.EnclaveSessionCall(record=b"r"),
    c.EnclaveStatus(), c.Seal(folder="/s/checkpoints", name="kv", final=True), c.CancelOut(token="t1"),
    c.CheckExport(), c.MigrateOut(strategy="hybrid", token="t1", tracker="fault"),
    c.MigrateIn(timeout=5, commit_wait=30), c.ResumeOut(timeout=9), c.ResumeIn(timeout=9),
    c.PagerInit(address=1 << 40, size=1 << 26, chunk_size=1 << 20),
    c.PagerStream(main={"mid": bytes(16)}, demand={"mid": bytes(16)}, expected=bytes(16), t_resume=1.5,
                  resume={"mid": bytes(16), "secret": bytes(32)}, epoch=2),
    c.PagerProgress(),
]
UNIONS = {"agent": c.AgentRequest, "enclave": c.EnclaveRequest, "pager": c.PagerRequest}


def union_of(msg: c.Request) -> typing.Any:
    for union in UNIONS.values():
        if type(msg) in typing.get_args(union):
            return union
    return type(msg)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_request_round_trips_through_its_frame(msg: c.Request) -> None:
    body = decode_body(frame(msg)[4:])  # what the receiving end's framing hands on: a map
    assert body["op"] == c.op(msg)
    assert c.decode(body, union_of(msg)) == msg
    assert c.decode(c.encode(msg), union_of(msg)) == msg  # straight from the bytes


def test_each_union_names_each_op_once_and_every_struct_is_in_one() -> None:
    for union in UNIONS.values():
        tags = [t.__struct_config__.tag for t in typing.get_args(union)]
        assert len(tags) == len(set(tags)), tags
    covered = {type(m) for m in SAMPLES}
    every = {v for v in vars(c).values() if isinstance(v, type) and issubclass(v, c.Request)
             and v.__struct_config__.tag not in ("Request", "_MigrationOptions")}
    assert every <= covered, every - covered


def test_the_agent_ops_are_the_ones_admin_classifies() -> None:
    agent_ops = {t.__struct_config__.tag for t in typing.get_args(c.AgentRequest)}
    assert agent_ops == admin.OPEN_OPS | admin.AGENT_OPS | admin.ADMIN_OPS


def test_a_struct_encodes_to_the_map_the_hand_built_requests_sent() -> None:
    """A struct's bytes are the map a hand-built dict of the same fields encodes to;
    defaults travel (a receiver of another version does what was asked), unset options do not."""
    enc = msgspec.msgpack.Encoder()
    assert c.encode(c.Status()) == enc.encode({"op": "status"})
    assert c.encode(c.Stop(name="kv")) == enc.encode({"op": "stop", "name": "kv", "force": False})
    assert c.encode(c.SessionCall(name="kv", record=b"r")) == enc.encode({"op": "session_call", "name": "kv",
                                                                           "record": b"r"})
    sent = decode_body(c.encode(c.Migrate(name="kv", to="b:1")))
    assert sent["strategy"] == "auto" and "max_rounds" not in sent and "max_downtime" not in sent
    older = c.decode({"op": "migrate_out", "max_rounds": None}, c.MigrateOut)  # None, from an older sender ...
    assert Goal.of(older, 3, 1 << 30).max_rounds == 3  # ... is unset too: the strategy's default
    prep = decode_body(c.encode(c.PrepareIn(spec=c.LaunchSpec("kv", "kvstore", 8), source="a:1")))
    assert prep["from"] == "a:1" and "source" not in prep  # "from", as the agents always said
    assert prep["spec"] == {"name": "kv", "app": "kvstore", "heap": 8, "chunk_size": 1 << 20, "config": {},
                            "plain_calls": False}


def test_a_map_from_an_older_sender_decodes_with_the_defaults() -> None:
    m = c.decode({"op": "migrate", "name": "kv", "to": "b:1"}, c.AgentRequest)
    assert isinstance(m, c.Migrate)
    assert (m.strategy, m.tracker, m.timeout, m.resume_deadline, m.write_tracking) == \
        ("auto", "auto", 120.0, 30.0, "auto")
    assert m.max_rounds is msgspec.UNSET and m.max_downtime is msgspec.UNSET
    assert c.decode({"op": "status", "extra": 1}, c.AgentRequest) == c.Status()  # unknown fields are ignored


def test_one_set_of_defaults_and_it_is_auto() -> None:
    assert c.DEFAULT_STRATEGY == "auto"
    assert c.Migrate(name="kv", to="b").strategy == c.DEFAULT_STRATEGY
    assert c.PrepareIn(spec=c.LaunchSpec("kv", "kvstore", 8)).strategy == c.DEFAULT_STRATEGY
    assert c.MigrateOut().strategy == c.DEFAULT_STRATEGY
    assert c.decode({"strategy": "stopcopy"}, c.MigrateOut).timeout == c.DEFAULT_TIMEOUT_S


def test_the_name_lists_are_the_registry() -> None:
    assert tuple(strategies.STRATEGIES) == constants.STRATEGIES
    assert constants.TRACKERS == strategies.TRACKERS


@pytest.mark.parametrize(("frame_map", "says"), [
    ({"op": "nope"}, "unknown request 'nope'"),
    ({"name": "kv"}, "unknown request None"),
    ({"op": 7}, "unknown request 7"),
    ({"op": "migrate", "to": "b:1"}, "bad 'migrate' request: Object missing required field `name`"),
    ({"op": "stop", "name": 5}, "bad 'stop' request: Expected `str`, got `int` - at `$.name`"),
    ({"op": "migrate", "name": "kv", "to": "b", "strategy": "warp"}, "unknown strategy 'warp'; known: stopcopy"),
    ({"op": "migrate", "name": "kv", "to": "b", "tracker": "magic"}, "unknown tracker 'magic'"),
    ({"op": "migrate", "name": "kv", "to": "b", "write_tracking": "magic"}, "unknown write tracking 'magic'"),
    ({"op": "migrate", "name": "kv", "to": "b", "max_rounds": 0}, "max_rounds must be an integer from 1 to 100"),
    ({"op": "migrate", "name": "kv", "to": "b", "max_rounds": True}, "Expected `int | null`, got `bool`"),
    ({"op": "migrate", "name": "kv", "to": "b", "max_downtime": -1}, "max_downtime must be a number of seconds"),
    ({"op": "migrate", "name": "kv", "to": "b", "max_bandwidth": -5}, "max_bandwidth must be a number of bytes"),
    ({"op": "migrate", "name": "kv", "to": "b", "timeout": math.inf}, "timeout must be a number of seconds"),
    ({"op": "migrate", "name": "kv", "to": "b", "timeout": "10"}, "timeout must be a number of seconds in (0, 86400], not '10'"),
    ({"op": "migrate", "name": "kv", "to": "b", "timeout": True}, "timeout must be a number of seconds"),
    ({"op": "resume", "name": "kv", "resume_deadline": math.nan}, "resume_deadline must be a number of seconds"),
    ({"op": "data", "name": "kv", "timeout": 10**9}, "timeout must be a number of seconds"),
    ({"op": "restore", "path": "p", "release": "zz"}, "a release code is 64 hex digits"),
    ({"op": "prepare_in", "spec": {"name": "kv", "app": "kvstore", "heap": "1"}}, "at `$.spec.heap`"),
    ({"op": "session_call", "name": "kv", "record": "text"}, "Expected `bytes`, got `str` - at `$.record`"),
])
def test_a_bad_request_is_one_line_naming_what_is_wrong(frame_map: dict, says: str) -> None:
    with pytest.raises(c.BadRequest) as e:
        c.decode(frame_map, c.AgentRequest)
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(c.BadRequest):  # the same from bytes
        c.decode(msgspec.msgpack.encode(frame_map), c.AgentRequest)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\xa4text", msgspec.msgpack.encode([1])])
def test_bytes_that_are_no_map_are_refused_in_one_line(data: bytes) -> None:
    with pytest.raises(c.BadRequest):
        c.decode(data, c.AgentRequest)


def test_an_enclave_wait_from_the_agent_is_bounded() -> None:
    for bad in (math.inf, math.nan, -1, "10", 10**9):
        with pytest.raises(c.BadRequest, match="commit_wait must be a number of seconds"):
            c.decode({"op": "migrate_in", "timeout": 5, "commit_wait": bad}, c.EnclaveRequest)
    with pytest.raises(c.BadRequest, match="unknown tracker 'auto'"):  # the destination has decided by now
        c.decode({"op": "migrate_out", "tracker": "auto"}, c.EnclaveRequest)


def test_a_struct_is_checked_where_it_is_decoded_and_check_says_the_same() -> None:
    """Validated once, where a request enters a process: a struct built here is sent as it is (the agent
    refuses it in one line); `check()` is the same rule, for a caller that wants it early (the CLI)."""
    m = c.Migrate(name="kv", to="b", strategy="warp")
    with pytest.raises(c.BadRequest, match="bad 'migrate' request: unknown strategy 'warp'"):
        c.decode(c.encode(m), c.AgentRequest)
    with pytest.raises(ConstmigError, match="^unknown strategy 'warp'"):
        m.check()
    with pytest.raises(ConstmigError, match="a release code is 64 hex digits"):
        c.Restore(path="p", release="zz").check()


def test_a_reply_carries_the_lifecycle_as_the_enum() -> None:
    r = c.reply(decode_body(frame(c.refused("enclave is handed-off", kind="EnclaveError", state=Life.HANDED_OFF,
                                            tombstone=True))[4:]))
    assert r.state is Life.HANDED_OFF and r.tombstone and not r.ok and r.kind == "EnclaveError"
    assert decode_body(c.encode(c.refused("x", state=Life.RUNNING)))["state"] == "running"  # the value on the wire
    assert c.reply({"ok": True, "result": {"a": b"b"}}).result == {"a": b"b"}
    with pytest.raises(ProtocolError, match="malformed reply"):
        c.reply({"ok": False, "state": "sleeping"})
    with pytest.raises(ProtocolError, match="malformed reply"):
        c.reply({"error": "no ok"})


def test_typed_results() -> None:
    info = c.result({"cancelled": True, "name": "kv", "state": "running", "on": "a:1"}, c.CancelResult)
    assert info.state is Life.RUNNING
    assert c.builtins(info) == {"cancelled": True, "name": "kv", "state": "running", "on": "a:1"}
    with pytest.raises(ProtocolError, match="malformed PrepareInResult"):
        c.result({"host_id": "b"}, c.PrepareInResult)
    assert c.builtins(c.ok(b"bytes stay bytes")) == {"ok": True, "result": b"bytes stay bytes"}


def test_launch_spec_from_the_wire() -> None:
    spec = c.LaunchSpec("kv", "kvstore", 8, config={"s": 1})
    assert c.LaunchSpec.from_wire(spec.to_wire()) == spec
    for bad in ({"name": "kv"}, {"name": "kv", "app": "a", "heap": math.inf}, [], {"name": 1, "app": "a", "heap": 1}):
        with pytest.raises(AgentError, match="bad enclave spec"):
            c.LaunchSpec.from_wire(bad)


def test_the_ops_are_built_only_here() -> None:
    """One module holds the control protocol: `grep -rn '"op":' src/constmig` finds the ops only in wire/control.py."""
    src = Path(c.__file__).resolve().parents[1]
    found = [f"{p.relative_to(src)}:{n}" for p in sorted(src.rglob("*.py")) if p.name != "control.py" or
             p.parent.name != "wire" for n, line in enumerate(p.read_text().splitlines(), 1) if '"op":' in line]
    assert not found, found


@pytest.mark.e2e
def test_the_agent_refuses_a_bad_request_in_one_line_and_serves_on() -> None:
    """Decoded once at dispatch: an unknown op or a bad field is one line back, and the connection (and
    the agent) go on; a malformed data connection gets its one answer and is closed."""
    from constmig.host.client import AgentClient, connect, request
    from constmig.host.cluster import LocalCluster
    from constmig.wire.framing import FramedSocket

    with LocalCluster(1) as cluster:
        a = cluster.addrs[0]
        with AgentClient(a, timeout=10) as plain:  # plain TCP: what anyone may ask
            with pytest.raises(AgentError, match=r"^unknown request 'frobnicate'$"):
                plain.request({"op": "frobnicate"})
            with pytest.raises(AgentError, match=r"^bad 'call' request: Expected `str`, got `int` - at `\$\.method`$"):
                plain.request({"op": "call", "name": "kv", "method": 7})
            assert plain.request(c.Ping())["listen"] == a  # the same connection serves on
        with pytest.raises(AgentError, match=r"bad 'migrate' request: unknown strategy 'warp'"):
            request(a, {"op": "migrate", "name": "kv", "to": "127.0.0.1:1", "strategy": "warp"}, timeout=10)
        with pytest.raises(AgentError, match=r"bad 'migrate' request: timeout must be a number of seconds"):
            request(a, c.Migrate(name="kv", to="127.0.0.1:1", timeout=-1), timeout=10)
        sock = connect(a, 10)
        fs = FramedSocket(sock)
        try:
            reply = c.reply(fs.exchange({"op": "data", "name": "kv", "channel": 3}))
            assert not reply.ok and "Expected `str`, got `int` - at `$.channel`" in reply.error
            with pytest.raises(ConstmigError):
                fs.exchange(c.Ping())  # closed after its one answer
        finally:
            fs.close()
        assert request(a, c.Status(), timeout=10)["enclaves"] == {}
