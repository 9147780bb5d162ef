"""The client's trust decisions without an enclave: pinning like known_hosts, expectations, the root."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from constmig.client.trust import Expect, KnownEnclaves, SimVerifier, Trust
from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import Identity, VerifiedQuote
from constmig.tee.sim import SimPlatform, create_root_ca

APP = Identity(measurement=bytes(range(32)), signer=bytes(32), product_id=1, svn=3)
NEW = Identity(measurement=bytes(range(1, 33)), signer=bytes(32), product_id=1, svn=4)


def vq(ident: Identity = APP, platform: str = "a") -> VerifiedQuote:
    return VerifiedQuote(ident, bytes(64), platform, "sim")


def test_first_use_pins_and_later_checks(tmp_path: Path) -> None:
    known = KnownEnclaves(tmp_path / "sub" / "known.json")
    trust = Trust(lambda q: vq(), known=known)
    trust.check("kv1", vq())
    assert trust.first_use
    entry = json.loads(known.path.read_text())["enclaves"]["kv1"]
    assert entry["measurement"] == APP.measurement.hex() and entry["svn"] == 3 and entry["platform"] == "a"
    assert not stat.S_IMODE(known.path.stat().st_mode) & 0o077  # the user's own file
    trust.check("kv1", vq(platform="b"))  # the same code on another platform: fine
    assert not trust.first_use
    with pytest.raises(AttestationError, match=r"runs measurement 0102.*not the expected 0001.*pinned in .*"
                                               r"constmig trust kv1"):
        trust.check("kv1", vq(NEW))
    trust.check("other", vq(NEW))  # pins are per name
    known.pin("kv1", vq(NEW))  # what `constmig trust` does
    trust.check("kv1", vq(NEW))


def test_expect_names_what_differs() -> None:
    Expect(APP.measurement, APP.signer, 3).check("kv", vq())
    with pytest.raises(AttestationError, match="signed by 0000.*not the expected 0101"):
        Expect(signer=bytes([1] * 32)).check("kv", vq())
    with pytest.raises(AttestationError, match="security version 3, below the minimum 4 .--x."):
        Expect(min_svn=4, source="--x").check("kv", vq())


@pytest.mark.parametrize("text", ["", "zz" * 32, "00" * 31, "00" * 33])
def test_expect_parse_refuses_bad_hex(text: str) -> None:
    if not text:
        assert Expect.parse(text).measurement is None
        return
    with pytest.raises(ConfigError, match="64 hex digits"):
        Expect.parse(text)


@pytest.mark.parametrize("content", ["not json", "[]", '{"enclaves": 3}', '{"enclaves": {"kv1": {"x": 1}}}'])
def test_malformed_known_file_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "known.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        KnownEnclaves(path).get("kv1")


def test_root_is_read_at_the_first_quote_and_must_exist(tmp_path: Path) -> None:
    verify = SimVerifier(tmp_path / "missing")  # nothing read yet
    with pytest.raises(ConfigError, match="no root CA certificate"):
        verify(b"quote")
    create_root_ca(tmp_path / "ca")
    plat = SimPlatform.provision(tmp_path / "p", tmp_path / "ca", "host-a")
    got = SimVerifier(tmp_path / "ca")(plat.quote(APP, bytes(64)))
    assert got.identity == APP and got.platform_id == "host-a"
