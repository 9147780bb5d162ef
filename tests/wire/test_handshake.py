"""The attested handshake: both machines in memory, an adversary that edits or replays messages, and
the drivers over real channels. The TEE is the software backend `constmig.tee.sim`."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from constmig.errors import AttestationError, ConfigError, HandshakeAborted, ProtocolError
from constmig.tee.backend import Identity, VerifiedQuote
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.channel import ControlRecord, SecureChannel
from constmig.wire.handshake import (
    DIR_D2S,
    DIR_S2D,
    Initiator,
    Policy,
    Responder,
    SessionKeys,
    abort_message,
    run_initiator,
    run_responder,
)

APP = Identity(measurement=measure(b"kv app code"), signer=bytes(range(32)), product_id=3, svn=5)
PARAMS = {"app": "kv", "heap_size": 1 << 30, "chunk_size": 1 << 20, "strategy": "constmig"}
MID = bytes(range(16))
REJECTED = (ProtocolError, AttestationError)


@dataclass
class World:
    a: SimPlatform  # source host
    b: SimPlatform  # destination host
    rogue: SimPlatform  # a host certified by a CA nobody trusts


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base: Path = tmp_path_factory.mktemp("hs")
    create_root_ca(base / "ca")
    create_root_ca(base / "rogue-ca")
    return World(SimPlatform.provision(base / "a", base / "ca", "host-a"),
                 SimPlatform.provision(base / "b", base / "ca", "host-b"),
                 SimPlatform.provision(base / "r", base / "rogue-ca", "host-b"))


DEFAULT_POLICY = Policy()


def machines(world: World, src: Identity = APP, dst: Identity = APP, src_policy: Policy = DEFAULT_POLICY,
             dst_policy: Policy = DEFAULT_POLICY, params: dict[str, Any] = PARAMS) -> tuple[Initiator, Responder]:
    return (Initiator(world.a, src, src_policy, params, migration_id=MID),
            Responder(world.b, dst, dst_policy))


@dataclass
class Transcript:
    m1: bytes
    m2: bytes
    m3: bytes
    m4: bytes
    src: SessionKeys
    dst: SessionKeys


def handshake(ini: Initiator, res: Responder) -> Transcript:
    m1 = ini.start()
    m2 = res.receive_hello(m1)
    m3 = ini.receive_reply(m2)
    m4 = res.receive_finish(m3)
    return Transcript(m1, m2, m3, m4, ini.receive_confirm(m4), res.keys)


def test_round_trip(world: World) -> None:
    ini, res = machines(world)
    t = handshake(ini, res)
    assert ini.done and res.done and ini.keys is t.src
    assert (t.src.send_key, t.src.recv_key) == (t.dst.recv_key, t.dst.send_key)
    assert t.src.send_key != t.src.recv_key and len(t.src.send_key) == 32
    assert (t.src.send_dir, t.src.recv_dir, t.dst.send_dir, t.dst.recv_dir) == (DIR_S2D, DIR_D2S, DIR_D2S, DIR_S2D)
    assert t.src.transcript_hash == t.dst.transcript_hash and len(t.src.transcript_hash) == 64
    assert t.src.migration_id == t.dst.migration_id == MID
    assert t.dst.params == PARAMS == res.params
    assert t.src.peer.platform_id == "host-b" and t.dst.peer.platform_id == "host-a"
    assert t.src.peer.identity == t.dst.peer.identity == APP
    assert "send_key" not in repr(t.src) and t.src.send_key.hex() not in repr(t.src)


def test_every_run_has_fresh_keys(world: World) -> None:
    t1, t2 = handshake(*machines(world)), handshake(*machines(world))
    assert t1.src.send_key != t2.src.send_key and t1.src.transcript_hash != t2.src.transcript_hash


# --- policy ------------------------------------------------------------------------------------------

OTHER_CODE = replace(APP, measurement=measure(b"other code"))


@pytest.mark.parametrize(("src", "dst", "src_policy", "dst_policy", "who_refuses", "match"), [
    # the source refuses the destination (at M2) ...
    (APP, OTHER_CODE, Policy(), Policy(), "source",
     r"^destination enclave measurement [0-9a-f]{16}… differs from this enclave's [0-9a-f]{16}…; refusing to migrate$"),
    (APP, replace(APP, svn=2), Policy(min_svn=4), Policy(allow_svn_downgrade=True), "source",
     "destination enclave security version 2 is below the policy minimum 4"),
    (APP, replace(APP, svn=4), Policy(), Policy(), "source",
     "destination security version 4 is lower than the source's 5; refusing a downgrade"),
    (APP, replace(APP, signer=bytes(32)), Policy(), Policy(), "source", "destination enclave signer .* differs"),
    (APP, replace(APP, product_id=4), Policy(), Policy(), "source", "destination enclave product id 4 differs"),
    (APP, APP, Policy(allowed_platforms=frozenset({"host-c"})), Policy(), "source",
     "destination platform 'host-b' is not an allowed platform"),
    (APP, APP, Policy(allowed_signers=frozenset({bytes(32)})), Policy(), "source", "not an allowed signer"),
    # ... or the destination refuses the source (at M3)
    (APP, APP, Policy(), Policy(min_svn=6), "destination",
     "source enclave security version 5 is below the policy minimum 6"),
    (APP, APP, Policy(), Policy(allowed_platforms=frozenset({"host-x"})), "destination",
     "source platform 'host-a' is not an allowed platform"),
    (replace(APP, svn=9), APP, Policy(allow_svn_downgrade=True), Policy(), "destination",
     "destination security version 5 is lower than the source's 9"),
])
@pytest.mark.adversarial
def test_policy_refusals(world: World, src: Identity, dst: Identity, src_policy: Policy, dst_policy: Policy,
                         who_refuses: str, match: str) -> None:
    ini, res = machines(world, src, dst, src_policy, dst_policy)
    m2 = res.receive_hello(ini.start())
    if who_refuses == "source":
        with pytest.raises(AttestationError, match=match):
            ini.receive_reply(m2)
        return
    m3 = ini.receive_reply(m2)
    with pytest.raises(AttestationError, match=match):
        res.receive_finish(m3)
    with pytest.raises(ProtocolError, match="has not completed"):
        _ = res.keys


OTHER_SIGNER = bytes(32)


@pytest.mark.adversarial
@pytest.mark.parametrize(("src", "dst", "src_policy", "dst_policy", "who_refuses"), [
    # our own signer is on the list, the peer's is not: refused (whether ours is listed does not matter)
    (APP, replace(APP, signer=OTHER_SIGNER), Policy(allowed_signers=frozenset({APP.signer})),
     Policy(allowed_signers=frozenset({APP.signer, OTHER_SIGNER})), "source"),
    (replace(APP, signer=OTHER_SIGNER), APP, Policy(allowed_signers=frozenset({APP.signer, OTHER_SIGNER})),
     Policy(allowed_signers=frozenset({APP.signer})), "destination"),
    # the peer's signer is on the list, ours is not: accepted on both sides
    (APP, replace(APP, signer=OTHER_SIGNER), Policy(allowed_signers=frozenset({OTHER_SIGNER})),
     Policy(allowed_signers=frozenset({APP.signer})), None),
])
def test_signer_allow_list_judges_the_peers_signer(world: World, src: Identity, dst: Identity, src_policy: Policy,
                                                    dst_policy: Policy, who_refuses: str | None) -> None:
    ini, res = machines(world, src, dst, src_policy, dst_policy)
    m2 = res.receive_hello(ini.start())
    if who_refuses == "source":
        with pytest.raises(AttestationError, match=r"^destination enclave signer [0-9a-f]{16}… is not an allowed signer"):
            ini.receive_reply(m2)
        return
    m3 = ini.receive_reply(m2)
    if who_refuses == "destination":
        with pytest.raises(AttestationError, match=r"^source enclave signer [0-9a-f]{16}… is not an allowed signer"):
            res.receive_finish(m3)
        return
    keys = ini.receive_confirm(res.receive_finish(m3))
    assert keys.peer.identity.signer == OTHER_SIGNER and res.keys.peer.identity.signer == APP.signer


@pytest.mark.parametrize(("src", "dst", "policy"), [
    (APP, OTHER_CODE, Policy(same_measurement=False)),
    (APP, replace(APP, signer=bytes(32)), Policy(allowed_signers=frozenset({bytes(32), APP.signer}))),
    (replace(APP, svn=9), APP, Policy(allow_svn_downgrade=True)),
    (APP, replace(APP, svn=7), Policy(min_svn=5, allowed_platforms=frozenset({"host-a", "host-b"}))),
])
def test_policy_acceptances(world: World, src: Identity, dst: Identity, policy: Policy) -> None:
    handshake(*machines(world, src, dst, policy, policy))


def test_policy_arguments() -> None:
    with pytest.raises(ValueError):
        Policy(min_svn=-1)
    with pytest.raises(TypeError):
        Policy(allowed_platforms="host-a")  # type: ignore[arg-type]
    assert Policy(allowed_platforms={"a"}).allowed_platforms == frozenset({"a"})  # type: ignore[arg-type]
    vq = VerifiedQuote(APP, bytes(64), "h", "sim")
    with pytest.raises(ValueError):
        Policy().check(APP, vq, "peer")


@pytest.mark.adversarial
def test_untrusted_root_is_refused(world: World) -> None:
    """A host certified by another CA (same name as the real destination) cannot pass as it."""
    ini = Initiator(world.a, APP, Policy(), PARAMS)
    m2 = Responder(world.rogue, APP, Policy()).receive_hello(ini.start())
    with pytest.raises(AttestationError, match="by the trusted root CA"):
        ini.receive_reply(m2)


# --- an adversary that edits messages ---------------------------------------------------------------------

Tamper = Callable[[bytes], bytes]


def run_tampered(world: World, step: int, tamper: Tamper) -> BaseException | None:
    """Run a handshake with message `step` (1-4) edited in flight; return what stopped it, if anything."""
    ini, res = machines(world)
    t = (lambda m: tamper(m) if step == 1 else m, lambda m: tamper(m) if step == 2 else m,
         lambda m: tamper(m) if step == 3 else m, lambda m: tamper(m) if step == 4 else m)
    try:
        m2 = res.receive_hello(t[0](ini.start()))
        m4 = res.receive_finish(t[2](ini.receive_reply(t[1](m2))))
        keys = ini.receive_confirm(t[3](m4))
    except REJECTED as e:
        return e
    assert keys.send_key == res.keys.recv_key  # if nobody noticed, the edit must have been harmless
    return None


def flip_at(i: int) -> Tamper:
    return lambda m: m[:i] + bytes([m[i] ^ 0x01]) + m[i + 1:]


@pytest.mark.adversarial
@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_any_flipped_byte_is_caught(world: World, step: int) -> None:
    ini, res = machines(world)
    t = handshake(ini, res)
    size = len((t.m1, t.m2, t.m3, t.m4)[step - 1])
    for i in range(size):
        assert run_tampered(world, step, flip_at(i)) is not None, f"flip at byte {i} of M{step} went unnoticed"


def reencode(change: Callable[[dict[str, Any]], None]) -> Tamper:
    def tamper(m: bytes) -> bytes:
        d = msgspec.msgpack.decode(m)
        change(d)
        return msgspec.msgpack.encode(d)
    return tamper


@pytest.mark.parametrize(("step", "tamper", "exc", "match"), [
    (1, reencode(lambda d: d["params"].update(heap_size=1 << 40)), AttestationError, "report data mismatch"),
    (1, reencode(lambda d: d.update(eph_pub=bytes(range(32)))), AttestationError, "report data mismatch"),
    (1, reencode(lambda d: d.update(migration_id=bytes(16))), AttestationError, "report data mismatch"),
    (1, reencode(lambda d: d.update(version=2)), ProtocolError, "version 2"),
    (1, reencode(lambda d: d.update(eph_pub=bytes(32))), ProtocolError, "invalid X25519 public key"),
    (2, reencode(lambda d: d.update(eph_pub=bytes(range(32)))), AttestationError, "report data mismatch"),
    (2, reencode(lambda d: d.update(nonce=bytes(32))), AttestationError, "report data mismatch"),
    (3, reencode(lambda d: d.update(extra=1)), ProtocolError, "malformed Finish"),
    (4, reencode(lambda d: d.update(mac=bytes(32))), ProtocolError, "key confirmation does not match"),
    (2, lambda m: abort_message("nope"), HandshakeAborted, "destination aborted the handshake: nope"),
    (3, lambda m: abort_message("bad\nline"), HandshakeAborted, "source aborted the handshake: bad line$"),
])
@pytest.mark.adversarial
def test_semantic_tampering(world: World, step: int, tamper: Tamper, exc: type, match: str) -> None:
    err = run_tampered(world, step, tamper)
    assert isinstance(err, exc), repr(err)
    assert re.search(match, str(err)), str(err)
    assert "\n" not in str(err)


@pytest.mark.adversarial
def test_key_substitution_by_a_host_in_the_middle(world: World) -> None:
    """A relay that runs its own key exchange with each side (classic MITM) cannot get a quote over it."""
    ini, res = machines(world)
    evil = Initiator(world.b, APP, Policy(), PARAMS, migration_id=MID)  # same params, its own X25519 key
    m1_evil = evil.start()
    m2 = res.receive_hello(m1_evil)  # the destination answers the relay
    with pytest.raises(AttestationError, match="report data mismatch"):
        ini.start()
        ini.receive_reply(m2)  # the real source sees a quote bound to someone else's hello


@pytest.mark.adversarial
def test_host_swapping_the_destination_key_in_m2_is_refused_by_the_source(world: World) -> None:
    """M2's quote must cover the destination's X25519 key. If it did not, a host could put its own key
    into M2: the source would then share its session keys with the host, which computes M4 itself and
    never needs the destination to accept M3. So the source must refuse the edited M2 at once, before M3."""
    ini, res = machines(world)
    m2 = res.receive_hello(ini.start())
    host_pub = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    forged = reencode(lambda d: d.update(eph_pub=host_pub))(m2)
    with pytest.raises(AttestationError, match="report data mismatch"):
        ini.receive_reply(forged)
    with pytest.raises(ProtocolError, match="has not completed"):
        _ = ini.keys


# --- replay --------------------------------------------------------------------------------------------------

@pytest.mark.adversarial
def test_replayed_m2_is_refused(world: World) -> None:
    old = handshake(*machines(world))
    ini, _ = machines(world)
    ini.start()
    with pytest.raises(AttestationError, match="report data mismatch"):
        ini.receive_reply(old.m2)


@pytest.mark.adversarial
def test_replayed_m3_is_refused(world: World) -> None:
    old = handshake(*machines(world))
    ini, res = machines(world)
    res.receive_hello(ini.start())
    with pytest.raises(AttestationError, match="report data mismatch"):
        res.receive_finish(old.m3)


@pytest.mark.adversarial
def test_replayed_m1_and_m3_are_refused(world: World) -> None:
    """Replaying a whole old source side to a new destination: its fresh M2 nonce defeats the old M3."""
    old = handshake(*machines(world))
    res = Responder(world.b, APP, Policy())
    res.receive_hello(old.m1)
    with pytest.raises(AttestationError, match="report data mismatch"):
        res.receive_finish(old.m3)


@pytest.mark.adversarial
def test_replayed_m4_is_refused(world: World) -> None:
    old = handshake(*machines(world))
    ini, res = machines(world)
    res.receive_finish(ini.receive_reply(res.receive_hello(ini.start())))
    with pytest.raises(ProtocolError, match="key confirmation"):
        ini.receive_confirm(old.m4)


# --- order and arguments -----------------------------------------------------------------------------------

@pytest.mark.adversarial
def test_out_of_order_calls(world: World) -> None:
    ini, res = machines(world)
    with pytest.raises(ProtocolError, match="cannot receive M2 in phase 'start'"):
        ini.receive_reply(b"")
    with pytest.raises(ProtocolError, match="cannot receive M3"):
        res.receive_finish(b"")
    with pytest.raises(ProtocolError, match="has not completed"):
        _ = ini.keys
    m1 = ini.start()
    with pytest.raises(ProtocolError, match="cannot start"):
        ini.start()
    with pytest.raises(ProtocolError, match="cannot receive M4"):
        ini.receive_confirm(b"")
    m2 = res.receive_hello(m1)
    with pytest.raises(ProtocolError, match="cannot receive M1"):
        res.receive_hello(m1)
    ini.receive_reply(m2)
    with pytest.raises(ProtocolError, match="has not completed"):
        _ = ini.keys  # not before the destination confirmed


def test_failure_is_final(world: World) -> None:
    ini, res = machines(world)
    m1 = ini.start()
    with pytest.raises(ProtocolError):
        ini.receive_reply(b"\xc1")
    with pytest.raises(ProtocolError, match="phase 'failed'"):
        ini.receive_reply(res.receive_hello(m1))


def test_abort_fails_the_machine(world: World) -> None:
    ini, res = machines(world)
    m2 = res.receive_hello(ini.start())
    msg = ini.abort("operator cancelled")
    with pytest.raises(ProtocolError, match="phase 'failed'"):
        ini.receive_reply(m2)
    with pytest.raises(HandshakeAborted, match="source aborted the handshake: operator cancelled"):
        res.receive_finish(msg)


@pytest.mark.parametrize(("kwargs", "exc"), [
    ({"migration_id": b"short"}, ValueError),
    ({"migration_id": "x" * 16}, ValueError),
    ({"params": ["not", "a", "dict"]}, TypeError),
    ({"params": {1: "int key"}}, TypeError),
    ({"params": {"x": object()}}, TypeError),
    ({"policy": None}, TypeError),
])
def test_bad_initiator_arguments(world: World, kwargs: dict, exc: type) -> None:
    args: dict[str, Any] = {"policy": Policy(), "params": PARAMS, **kwargs}
    policy, params = args.pop("policy"), args.pop("params")
    with pytest.raises(exc):
        Initiator(world.a, APP, policy, params, **args)


# --- garbage ------------------------------------------------------------------------------------------------

fields = st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32), st.integers(-(1 << 63), (1 << 64) - 1),
                   st.text(max_size=10), st.none(), st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3),
                   st.lists(st.integers(-5, 5), max_size=3))
structured = st.builds(
    lambda tag, extra: msgspec.msgpack.encode({"t": tag, **extra}),
    st.sampled_from(["hello", "reply", "finish", "confirm", "abort", "other", ""]),
    st.dictionaries(st.sampled_from(["version", "migration_id", "eph_pub", "nonce", "params", "quote", "mac",
                                     "reason", "x"]), fields, max_size=6),
)
garbage = st.one_of(st.binary(max_size=300), structured)


@settings(max_examples=150, deadline=None)
@given(data=garbage, step=st.sampled_from([1, 2, 3, 4]))
def test_garbage_is_refused_cleanly(world: World, data: bytes, step: int) -> None:
    err = run_tampered(world, step, lambda m: data)
    assert err is not None and isinstance(err, REJECTED) and "\n" not in str(err)


@settings(max_examples=50, deadline=None)
@given(quote=st.binary(min_size=1, max_size=2000))
def test_garbage_quotes_are_attestation_errors(world: World, quote: bytes) -> None:
    err = run_tampered(world, 2, reencode(lambda d: d.update(quote=quote)))
    assert isinstance(err, AttestationError)


# --- over real channels --------------------------------------------------------------------------------------

def over_channels(world: World, src_kwargs: dict | None = None, dst_kwargs: dict | None = None,
                  src_mid: bytes | None = MID) -> tuple[Any, Any, SecureChannel, SecureChannel]:
    """Run both drivers in threads; return (source result or error, destination result or error, channels)."""
    a, b = socket.socketpair()
    src_ch, dst_ch = SecureChannel(a, src_mid), SecureChannel(b)
    results: dict[str, Any] = {}

    def source() -> None:
        kw = {"policy": Policy(), "identity": APP, "params": PARAMS, **(src_kwargs or {})}
        try:
            results["src"] = run_initiator(src_ch, world.a, kw.pop("identity"), kw.pop("policy"), kw.pop("params"),
                                           timeout=10, **kw)
        except Exception as e:  # noqa: BLE001 - returned to the test
            results["src"] = e

    th = threading.Thread(target=source)
    th.start()
    kw = {"policy": Policy(), "identity": APP, **(dst_kwargs or {})}
    try:
        results["dst"] = run_responder(dst_ch, world.b, kw.pop("identity"), kw.pop("policy"), timeout=10, **kw)
    except Exception as e:  # noqa: BLE001
        results["dst"] = e
    th.join(20)
    return results["src"], results["dst"], src_ch, dst_ch


def test_drivers_install_keys(world: World) -> None:
    src, dst, src_ch, dst_ch = over_channels(world)
    assert isinstance(src, SessionKeys) and isinstance(dst, SessionKeys)
    assert src_ch.keys_installed and dst_ch.keys_installed and dst_ch.migration_id == MID
    src_ch.send_control(b"STOP")
    assert dst_ch.recv() == ControlRecord(b"STOP")
    dst_ch.send_control(b"READY")
    assert src_ch.recv() == ControlRecord(b"READY")


def test_destination_refusing_params_tells_the_source(world: World) -> None:
    def check(params: dict[str, Any]) -> None:
        if params["heap_size"] > 1 << 20:
            raise ConfigError(f"heap of {params['heap_size']} bytes does not fit on this host")

    src, dst, _, _ = over_channels(world, dst_kwargs={"check_params": check})
    assert isinstance(dst, ConfigError)
    assert isinstance(src, HandshakeAborted)
    assert str(src) == "destination aborted the handshake: heap of 1073741824 bytes does not fit on this host"


def test_source_refusing_destination_tells_it(world: World) -> None:
    src, dst, _, _ = over_channels(world, dst_kwargs={"identity": OTHER_CODE})
    assert isinstance(src, AttestationError) and "destination enclave measurement" in str(src)
    assert isinstance(dst, HandshakeAborted) and "source aborted the handshake: destination enclave" in str(dst)


def test_destination_refusing_source_tells_it(world: World) -> None:
    src, dst, _, _ = over_channels(world, dst_kwargs={"policy": Policy(min_svn=9)})
    assert isinstance(dst, AttestationError) and "below the policy minimum 9" in str(dst)
    assert isinstance(src, HandshakeAborted) and "destination aborted the handshake: source enclave" in str(src)


def test_driver_migration_id_must_match_channel(world: World) -> None:
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="differs from the channel"):
        run_initiator(SecureChannel(a, MID), world.a, APP, Policy(), PARAMS, migration_id=bytes(16))
    b.close()
    a, b = socket.socketpair()
    src_ch, dst_ch = SecureChannel(a, MID), SecureChannel(b, bytes(16))
    errors: list[Exception] = []

    def source() -> None:
        try:
            run_initiator(src_ch, world.a, APP, Policy(), PARAMS, timeout=10)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=source)
    th.start()
    with pytest.raises(ProtocolError, match="handshake is for migration 000102"):
        run_responder(dst_ch, world.b, APP, Policy(), timeout=10)
    th.join(20)
    assert isinstance(errors[0], HandshakeAborted)


def test_unexpected_error_in_check_params_still_aborts_the_source(world: World) -> None:
    src, dst, _, _ = over_channels(world, dst_kwargs={"check_params": lambda p: p["missing"]})
    assert isinstance(dst, KeyError)
    assert isinstance(src, HandshakeAborted)
    assert str(src) == "destination aborted the handshake: internal error in the destination"


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------

@pytest.mark.adversarial
@pytest.mark.parametrize("field", ["eph_pub", "nonce"])
@pytest.mark.parametrize("size", [31, 33])
def test_hello_fields_are_exactly_32_bytes(world: World, field: str, size: int) -> None:
    ini, _ = machines(world)
    m1 = reencode(lambda d: d.update({field: bytes(range(1, size + 1))}))(ini.start())
    with pytest.raises(ProtocolError, match="malformed Hello message from the source"):
        Responder(world.b, APP, Policy()).receive_hello(m1)


def test_policy_is_immutable() -> None:
    import dataclasses

    policy = Policy(min_svn=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.min_svn = 0  # type: ignore[misc]
    assert policy.min_svn == 3


def test_options_are_keyword_only(world: World) -> None:
    """migration_id, check_params and timeout are easy to pass in the wrong place: keywords only."""
    with pytest.raises(TypeError):
        Initiator(world.a, APP, Policy(), PARAMS, MID)  # type: ignore[misc]
    a, b = socket.socketpair()
    try:
        with pytest.raises(TypeError):
            run_responder(SecureChannel(b), world.b, APP, Policy(), None)  # type: ignore[misc]
        with pytest.raises(TypeError):
            run_initiator(SecureChannel(a, MID), world.a, APP, Policy(), PARAMS, MID)  # type: ignore[misc]
    finally:
        a.close()
        b.close()


def test_session_keys_are_immutable(world: World) -> None:
    import dataclasses

    t = handshake(*machines(world))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.src.send_key = bytes(32)  # type: ignore[misc]


def test_default_policy_has_no_svn_floor(world: World) -> None:
    assert Policy().min_svn == 0
    zero = replace(APP, svn=0)
    t = handshake(*machines(world, zero, zero))
    assert t.src.peer.identity.svn == t.dst.peer.identity.svn == 0


@pytest.mark.adversarial
@pytest.mark.parametrize(("size", "exc", "match"), [
    (64 * 1024, AttestationError, "more than the 8192 allowed"),  # parsed, then refused by the TEE backend
    (64 * 1024 + 1, ProtocolError, "malformed HelloReply message from the destination"),
])
def test_quote_field_is_bounded_at_64_kib(world: World, size: int, exc: type, match: str) -> None:
    ini, res = machines(world)
    m2 = reencode(lambda d: d.update(quote=bytes(size)))(res.receive_hello(ini.start()))
    with pytest.raises(exc, match=match):
        ini.receive_reply(m2)


@pytest.mark.parametrize(("reason", "sent"), [
    ("x" * 300, "x" * 300),
    ("x" * 301, "x" * 299 + "…"),
    ("", "refused"),
])
def test_abort_reason_is_cut_at_300_characters(reason: str, sent: str) -> None:
    assert msgspec.msgpack.decode(abort_message(reason))["reason"] == sent


def test_done_is_a_property_and_keys_stay_out_of_repr(world: World) -> None:
    ini, res = machines(world)
    assert ini.done is False and res.done is False
    t = handshake(ini, res)
    assert ini.done is True and res.done is True
    for keys in (t.src, t.dst):
        text = repr(keys)
        assert keys.send_key.hex() not in text and keys.recv_key.hex() not in text
        assert "send_key" not in text and "recv_key" not in text


def test_handshake_messages_are_immutable() -> None:
    from constmig.wire.handshake import Confirm

    msg = Confirm(bytes(32))
    with pytest.raises(AttributeError):
        msg.mac = b"x" * 32  # type: ignore[misc]


@pytest.mark.adversarial
def test_empty_quote_is_malformed(world: World) -> None:
    ini, res = machines(world)
    m2 = reencode(lambda d: d.update(quote=b""))(res.receive_hello(ini.start()))
    with pytest.raises(ProtocolError, match="malformed HelloReply message from the destination"):
        ini.receive_reply(m2)


@pytest.mark.adversarial
@pytest.mark.parametrize(("size", "outcome"), [(1200, "aborted"), (1201, "malformed")])
def test_abort_reason_received_is_bounded(world: World, size: int, outcome: str) -> None:
    """A peer's Abort reason is read only up to 1200 characters, and shown cut to one line of 300."""
    ini, _ = machines(world)
    ini.start()
    m2 = msgspec.msgpack.encode({"t": "abort", "reason": "y" * size})
    if outcome == "malformed":
        with pytest.raises(ProtocolError, match="malformed HelloReply message from the destination"):
            ini.receive_reply(m2)
        return
    with pytest.raises(HandshakeAborted) as info:
        ini.receive_reply(m2)
    assert str(info.value) == "destination aborted the handshake: " + "y" * 299 + "…"


def test_malformed_message_detail_is_cut_at_200_characters(world: World) -> None:
    ini, _ = machines(world)
    m1 = reencode(lambda d: d.update({"z" * 400: 1}))(ini.start())  # msgspec names the unknown field
    with pytest.raises(ProtocolError) as info:
        Responder(world.b, APP, Policy()).receive_hello(m1)
    prefix = "malformed Hello message from the source: "
    assert str(info.value).startswith(prefix) and len(str(info.value)) == len(prefix) + 200


@pytest.mark.parametrize("length", [64, 100])
def test_platform_refusal_names_at_most_64_characters_of_the_platform(length: int) -> None:
    vq = VerifiedQuote(APP, bytes(64), "p" * length, "sim")
    with pytest.raises(AttestationError) as info:
        Policy(allowed_platforms=frozenset({"host-a"})).check(APP, vq, "destination")
    assert f"destination platform '{'p' * 64}' is not an allowed platform" in str(info.value)


def test_wire_constants_of_handshake_v1(world: World) -> None:
    """A peer of the same version must understand M1; changing these is a deliberate protocol break."""
    from constmig.wire import handshake as hs

    assert (hs.VERSION, hs.DIR_S2D, hs.DIR_D2S, hs.MIGRATION_ID_SIZE) == (1, 1, 2, 16)
    ini, _ = machines(world)
    assert msgspec.msgpack.decode(ini.start())["version"] == 1


@pytest.mark.parametrize("src_mid", [None, MID])
def test_initiator_migration_id_may_be_given_when_it_agrees(world: World, src_mid: bytes | None) -> None:
    src, dst, _, dst_ch = over_channels(world, src_kwargs={"migration_id": MID}, src_mid=src_mid)
    assert isinstance(src, SessionKeys) and isinstance(dst, SessionKeys), (src, dst)
    assert src.migration_id == dst.migration_id == dst_ch.migration_id == MID
