"""The client's trust decisions without an enclave: pins (instance, code, fleet, directory) like known_hosts,
options that only narrow, refusals that say what differs and how to re-pin, and the root."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from constmig.client.trust import Expect, KnownEnclaves, SimVerifier, Trust, pin_key, repin_command
from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import Identity, VerifiedQuote
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.session import About

APP = Identity(measurement=bytes(range(32)), signer=bytes(32), product_id=1, svn=3)
NEW = Identity(measurement=bytes(range(1, 33)), signer=bytes(32), product_id=1, svn=4)
LAUNCH = '{"app": "kvstore", "chunk": 1048576, "heap": 16777216}'
ONE = About(bytes([1] * 16), bytes([7] * 32), LAUNCH)
COPY = About(bytes([2] * 16), bytes([7] * 32), LAUNCH)  # another instance of the same code and launch


def vq(ident: Identity = APP, platform: str = "a") -> VerifiedQuote:
    return VerifiedQuote(ident, bytes(64), platform, "sim")


class Fleet:
    """A verifier stand-in with a root fingerprint, as SimVerifier has once it read the root."""

    def __init__(self, fleet: str = "ab" * 32) -> None:
        self.fleet = fleet

    def __call__(self, quote: bytes) -> VerifiedQuote:
        return vq()


def trust(tmp_path: Path, fleet: str = "ab" * 32, expect: Expect | None = None) -> Trust:
    lines: list[str] = []
    t = Trust(Fleet(fleet), expect, KnownEnclaves(tmp_path / "sub" / "known.json"), lines.append)
    t.said = lines  # type: ignore[attr-defined]
    return t


def test_first_use_pins_the_instance_and_its_code_and_says_so(tmp_path: Path) -> None:
    t = trust(tmp_path)
    t.check("kv1", vq(), ONE, agent="h:1")
    assert t.first_use and "trusting enclave 'kv1' on first use: instance 0101" in t.said[0]  # type: ignore[attr-defined]
    entry = json.loads(t.known.path.read_text())["enclaves"][pin_key("kv1", "ab" * 32)]
    assert entry["instance"] == ONE.instance.hex() and entry["measurement"] == APP.measurement.hex()
    assert entry["launch"] == LAUNCH and entry["fleet"] == "ab" * 32 and entry["platform"] == "a"
    assert not stat.S_IMODE(t.known.path.stat().st_mode) & 0o077  # the user's own file
    t.check("kv1", vq(platform="b"), ONE)  # the same instance after a migration: fine
    assert not t.first_use


def test_refusals_say_what_differs_and_the_command_that_re_pins(tmp_path: Path) -> None:
    t = trust(tmp_path)
    t.check("kv1", vq(), ONE)
    with pytest.raises(AttestationError, match=r"another instance of the pinned code \(instance 0202.*pinned "
                                               r"0101.*if you replaced it on purpose: constmig trust kv1 --agent h:1 "
                                               r"--known \S+/known.json$"):
        t.check("kv1", vq(), COPY, agent="h:1")
    t.check("kv1", vq(), ONE, directory="http://e:1")  # the same enclave, found through a directory: its own pin
    bigger = About(ONE.instance, ONE.code, LAUNCH.replace("16777216", "33554432"))
    with pytest.raises(AttestationError, match=r"the pinned code with another launch configuration \(heap 32.0 MiB "
                                               r"where the pin has 16.0 MiB\).*--etcd http://e:1 --known"):
        t.check("kv1", vq(NEW), bigger, directory="http://e:1")
    with pytest.raises(AttestationError, match=r"runs other code than the pinned enclave \(code 0808"):
        t.check("kv1", vq(NEW), About(ONE.instance, bytes([8] * 32), LAUNCH))


def test_one_name_in_two_fleets_or_directories_is_two_pins(tmp_path: Path) -> None:
    t = trust(tmp_path)
    t.check("kv1", vq(), ONE)
    t.check("kv1", vq(NEW), COPY, directory="http://127.0.0.1:2479")  # the fleet walk-through's kv1
    assert t.first_use
    other = trust(tmp_path, fleet="cd" * 32)
    other.check("kv1", vq(NEW), COPY)  # another root CA: another fleet
    assert other.first_use
    with pytest.raises(AttestationError, match="another instance"):
        t.check("kv1", vq(), COPY)  # but within one fleet and directory, the pin holds


def test_every_option_only_narrows_the_pin(tmp_path: Path) -> None:
    pinned = trust(tmp_path)
    pinned.check("kv1", vq(), ONE)
    for expect in (Expect(min_svn=1), Expect(measurement=NEW.measurement), Expect(NEW.measurement, NEW.signer, 4)):
        t = trust(tmp_path, expect=expect)
        with pytest.raises(AttestationError, match="pinned"):
            t.check("kv1", vq(NEW), ONE)  # the flags hold for the new code; the pin does not: refused
    with pytest.raises(AttestationError, match="below the minimum 4"):
        trust(tmp_path, expect=Expect(min_svn=4, source="--min-svn")).check("kv1", vq(), ONE)
    fresh = trust(tmp_path / "fresh", expect=Expect(measurement=NEW.measurement))
    with pytest.raises(AttestationError, match="not the expected"):
        fresh.check("kv2", vq(), ONE)
    assert fresh.known is not None and fresh.known.get("kv2", "ab" * 32) is None  # nothing pinned on a refusal


def test_any_code_is_a_named_choice_and_in_memory_pins_quietly(tmp_path: Path) -> None:
    anything = Trust.any_code(tmp_path)
    assert anything.known is None
    anything.check("kv1", vq(), ONE)
    anything.check("kv1", vq(NEW), COPY)
    mem = Trust(Fleet(), None, KnownEnclaves.in_memory())
    mem.check("kv1", vq(), ONE)
    with pytest.raises(AttestationError, match="another instance.*this process's memory"):
        mem.check("kv1", vq(), COPY)
    assert not (tmp_path / "known.json").exists()


def test_a_pin_from_before_instances_still_holds_its_code(tmp_path: Path) -> None:
    path = tmp_path / "known.json"
    path.write_text(json.dumps({"enclaves": {"kv1": {"measurement": APP.measurement.hex(), "signer": bytes(32).hex(),
                                                     "svn": 3}}}))
    t = Trust(Fleet(), None, KnownEnclaves(path))
    with pytest.raises(AttestationError, match="not the expected .*by name alone.*constmig trust kv1"):
        t.check("kv1", vq(NEW), ONE)
    t.check("kv1", vq(), ONE)  # the same code: pinned anew, with its instance
    assert t.first_use and KnownEnclaves(path).get("kv1", "ab" * 32) is not None


def test_expect_names_what_differs() -> None:
    Expect(APP.measurement, APP.signer, 3).check("kv", vq())
    with pytest.raises(AttestationError, match="signed by 0000.*not the expected 0101"):
        Expect(signer=bytes([1] * 32)).check("kv", vq())
    with pytest.raises(AttestationError, match="security version 3, below the minimum 4 .--x."):
        Expect(min_svn=4, source="--x").check("kv", vq())


def test_the_re_pin_command_names_how_this_client_reaches_the_enclave(tmp_path: Path) -> None:
    assert repin_command("kv1", "127.0.0.1:7001") == "constmig trust kv1 --agent 127.0.0.1:7001"
    assert repin_command("kv1", "a:1", "http://e:2") == "constmig trust kv1 --etcd http://e:2"
    assert repin_command("kv 1", "a:1", None, tmp_path / "k.json", tmp_path / "ca") == \
        f"constmig trust 'kv 1' --agent a:1 --known {tmp_path}/k.json --ca-dir {tmp_path}/ca"


@pytest.mark.parametrize("text", ["", "zz" * 32, "00" * 31, "00" * 33])
def test_expect_parse_refuses_bad_hex(text: str) -> None:
    if not text:
        assert Expect.parse(text).measurement is None
        return
    with pytest.raises(ConfigError, match="64 hex digits"):
        Expect.parse(text)


@pytest.mark.parametrize("content", ["not json", "[]", '{"enclaves": 3}',
                                     '{"enclaves": {"kv1 @ abababababababab": {"x": 1}}}'])
def test_malformed_known_file_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "known.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        KnownEnclaves(path).get("kv1", "ab" * 32)


def test_root_is_read_at_the_first_quote_and_must_exist(tmp_path: Path) -> None:
    verify = SimVerifier(tmp_path / "missing")  # nothing read yet
    with pytest.raises(ConfigError, match="no root CA certificate"):
        verify(b"quote")
    create_root_ca(tmp_path / "ca")
    plat = SimPlatform.provision(tmp_path / "p", tmp_path / "ca", "host-a")
    verify = SimVerifier(tmp_path / "ca")
    got = verify(plat.quote(APP, bytes(64)))
    assert got.identity == APP and got.platform_id == "host-a" and len(verify.fleet) == 64


# --- what a mutation run of client/trust.py found unchecked -------------------------------------------------

def pinned(tmp_path: Path, launch: str) -> Trust:
    t = trust(tmp_path)
    t.check("kv1", vq(), About(ONE.instance, ONE.code, launch))
    return t


@pytest.mark.parametrize(("pinned_launch", "now", "said"), [
    (LAUNCH, LAUNCH.replace('"heap": 16777216', '"heap": 16777216, "workers": 8'),
     'the pinned code with another launch configuration (workers 8 where the pin has unset)'),
    ('{"app": "kv", "workers": 4}', '{"app": "kv", "workers": 8}',
     "the pinned code with another launch configuration (workers 8 where the pin has 4)"),
    ('{"app": "kv"}', "not json", "the pinned code with another launch configuration (its launch configuration)"),
    ('{"app": "kv"}', "[1]", "the pinned code with another launch configuration (its launch configuration)"),
    ("[1]", '{"app": "kv"}', "the pinned code with another launch configuration (its launch configuration)"),
])
def test_a_launch_difference_names_each_setting_or_says_the_launch_differs(tmp_path: Path, pinned_launch: str,
                                                                          now: str, said: str) -> None:
    t = pinned(tmp_path, pinned_launch)
    with pytest.raises(AttestationError) as info:
        t.check("kv1", vq(NEW), About(ONE.instance, ONE.code, now))
    assert f"runs {said}: measurement " in str(info.value)


def test_refusals_and_the_first_use_line_show_16_hex_digits_and_where_the_name_was_found(tmp_path: Path) -> None:
    t = trust(tmp_path)
    t.check("kv1", vq(), ONE, directory="http://e:1")
    assert t.said == [  # type: ignore[attr-defined]
        f"(trusting enclave 'kv1' on first use: instance {'01' * 8}…, measurement {APP.measurement.hex()[:16]}…, "
        f"svn 3, fleet {'ab' * 8}, found via http://e:1; pinned in {t.known.where})"]
    with pytest.raises(AttestationError, match=rf"\(instance {'02' * 8}…, pinned {'01' * 8}…\)"):
        t.check("kv1", vq(), COPY, directory="http://e:1")
    nowhere = trust(tmp_path / "nowhere", fleet="")
    nowhere.check("kv1", vq(), ONE)
    assert ", fleet -; pinned in " in nowhere.said[0]  # type: ignore[attr-defined]


def test_pins_and_expectations_are_values(tmp_path: Path) -> None:
    t = trust(tmp_path)
    t.check("kv1", vq(), ONE)
    for value, field in ((t.pinned, "instance"), (Expect(min_svn=1), "min_svn")):
        with pytest.raises(AttributeError):
            setattr(value, field, None)


def test_no_option_means_no_minimum_security_version() -> None:
    zero = vq(Identity(APP.measurement, APP.signer, 1, 0))
    Expect(measurement=APP.measurement).check("kv", zero)
    Expect.parse(APP.measurement.hex()).check("kv", zero)


def test_a_pin_round_trips_through_the_file_and_older_entries_still_load(tmp_path: Path) -> None:
    from constmig.client.trust import Pin

    t = trust(tmp_path)
    t.check("kv1", vq(platform="host-a"), ONE, directory="http://e:1")
    assert t.pinned is not None and t.pinned.pinned_at and t.pinned.platform == "host-a"
    assert KnownEnclaves(t.known.path).get("kv1", "ab" * 32, "http://e:1") == t.pinned
    old = {k: v for k, v in t.pinned.to_json().items() if k not in ("directory", "svn", "platform", "pinned_at")}
    loaded = Pin.from_json(old)
    assert (loaded.directory, loaded.svn, loaded.platform, loaded.pinned_at) == ("", 0, "", "")


def test_a_pin_from_before_instances_without_a_security_version_accepts_any(tmp_path: Path) -> None:
    path = tmp_path / "known.json"
    path.write_text(json.dumps({"enclaves": {"kv1": {"measurement": APP.measurement.hex(), "signer": bytes(32).hex()}}}))
    t = Trust(Fleet(), None, KnownEnclaves(path))
    t.check("kv1", vq(Identity(APP.measurement, APP.signer, 1, 0)), ONE)
    assert t.first_use


@pytest.mark.parametrize("entry", [{"signer": "00" * 32}, 7, {"measurement": "00" * 32, "signer": "00" * 32,
                                                                  "svn": "three"},
                                   {"measurement": "zz", "signer": "00" * 32}])
def test_a_malformed_pin_from_before_instances_is_one_clear_error(tmp_path: Path, entry: object) -> None:
    path = tmp_path / "known.json"
    path.write_text(json.dumps({"enclaves": {"kv1": entry}}))
    with pytest.raises(ConfigError, match=rf"entry 'kv1' of {path} is malformed"):
        Trust(Fleet(), None, KnownEnclaves(path)).check("kv1", vq(), ONE)


def test_the_known_file_is_made_where_asked_and_a_failure_to_write_it_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from constmig.client import trust as trust_mod

    deep = tmp_path / "a" / "b" / "known.json"
    KnownEnclaves(deep).pin(_a_pin())
    assert KnownEnclaves(deep).get("kv1", "ab" * 32) == _a_pin()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trust_mod.tempfile, "mkstemp", full)
    with pytest.raises(ConfigError) as info:
        KnownEnclaves(deep).pin(_a_pin())
    assert str(info.value) == f"cannot write known enclaves file {deep}: No space left on device"


def _a_pin() -> Any:
    from constmig.client.trust import Pin

    return replace(Pin.of("kv1", "ab" * 32, "", vq(), ONE), pinned_at="2025-01-01T00:00:00Z")


def test_the_trusts_a_client_can_choose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSTMIG_KNOWN_ENCLAVES", str(tmp_path / "default.json"))
    mine = KnownEnclaves(tmp_path / "mine.json")
    t = Trust.default(tmp_path / "ca", known=mine)
    assert t.known is mine and not t.first_use and t.pinned is None and t.verify.path == tmp_path / "ca"
    assert Trust.default(tmp_path / "ca").known.path == tmp_path / "default.json"  # type: ignore[union-attr]
    mem = Trust.in_memory(tmp_path / "ca", Expect(min_svn=2))
    assert mem.known is not None and not mem.known.is_file and mem.expect == Expect(min_svn=2) and mem.announce is None
    # the re-pin command names a file of pins only where there is one
    assert mem.repin("kv1", agent="h:1") == f"constmig trust kv1 --agent h:1 --ca-dir {tmp_path}/ca"
    assert Trust.any_code(tmp_path / "ca").repin("kv1", agent="h:1") == \
        f"constmig trust kv1 --agent h:1 --ca-dir {tmp_path}/ca"
    assert t.repin("kv1", agent="h:1") == f"constmig trust kv1 --agent h:1 --known {tmp_path}/mine.json " \
                                          f"--ca-dir {tmp_path}/ca"
