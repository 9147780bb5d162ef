"""The software TEE backend: CA and platform files, quotes that verify only when nothing was changed."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from constmig.errors import AttestationError, ConfigError
from constmig.tee import sim
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca, load_root, verify_quote

IDENT = Identity(measurement=measure(b"app code"), signer=bytes(range(32)), product_id=7, svn=3)
RD = bytes(range(64))


class World:
    def __init__(self, base: Path) -> None:
        self.ca = base / "ca"
        create_root_ca(self.ca)
        self.a = SimPlatform.provision(base / "a", self.ca, "a")
        self.b = SimPlatform.provision(base / "b", self.ca, "b")
        self.base = base


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("sim"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fields(quote: bytes) -> dict:
    return msgspec.msgpack.decode(quote)


def _reencode(fields: dict) -> bytes:
    return msgspec.msgpack.encode(fields)


# --- CA and platform files ----------------------------------------------------------------------

def test_root_ca_is_idempotent_and_private(tmp_path: Path) -> None:
    create_root_ca(tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "root.key", tmp_path / "root.pem")}
    create_root_ca(tmp_path)
    assert {p: p.read_bytes() for p in before} == before
    assert _mode(tmp_path / "root.key") == 0o600
    root = load_root(tmp_path)
    assert root == load_root(tmp_path / "root.pem")
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_root_pem_without_key_is_not_replaced(tmp_path: Path) -> None:
    create_root_ca(tmp_path)
    (tmp_path / "root.key").unlink()
    with pytest.raises(ConfigError, match="without root.key"):
        create_root_ca(tmp_path)


def test_load_root_rejects_non_ca_and_missing(world: World, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a self-signed Ed25519 CA"):
        load_root(world.base / "a" / "platform.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        load_root(tmp_path / "nope.pem")


def test_platform_files_and_permissions(world: World) -> None:
    d = world.base / "a"
    assert _mode(d / "platform.key") == 0o600
    assert _mode(d / "platform.secret") == 0o600
    assert len((d / "platform.secret").read_bytes()) == 32
    cert = x509.load_pem_x509_certificate((d / "platform.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert world.a.platform_id == "a" and world.a.name == "sim"


def test_provision_reuses_files_and_checks_host_id(world: World) -> None:
    d = world.base / "a"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    again = SimPlatform.provision(d, world.ca, "a")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert again.sealing_key(IDENT, b"x") == world.a.sealing_key(IDENT, b"x")
    with pytest.raises(ConfigError, match="belongs to host 'a', not 'z'"):
        SimPlatform.provision(d, world.ca, "z")


def test_bad_host_id(tmp_path: Path, world: World) -> None:
    for bad in ("", "x" * 65, "a\nb"):
        with pytest.raises(ConfigError, match="host id"):
            SimPlatform.provision(tmp_path / "p", world.ca, bad)


def test_open_needs_only_platform_files_and_root_cert(world: World, tmp_path: Path) -> None:
    shutil.copytree(world.base / "a", tmp_path / "a")
    shutil.copy(world.ca / "root.pem", tmp_path / "root.pem")
    a = SimPlatform.open(tmp_path / "a", tmp_path / "root.pem")
    assert a.platform_id == "a"
    assert world.b.verify(a.quote(IDENT, RD)).platform_id == "a"


def test_open_under_wrong_root_or_mismatched_key(world: World, tmp_path: Path) -> None:
    create_root_ca(tmp_path / "other")
    with pytest.raises(ConfigError, match="not signed by the trusted root CA"):
        SimPlatform.open(world.base / "a", tmp_path / "other" / "root.pem")
    shutil.copytree(world.base / "a", tmp_path / "a")
    shutil.copy(world.base / "b" / "platform.key", tmp_path / "a" / "platform.key")
    with pytest.raises(ConfigError, match="does not certify"):
        SimPlatform.open(tmp_path / "a", world.ca)
    with pytest.raises(ConfigError, match="cannot read"):
        SimPlatform.open(tmp_path / "missing", world.ca)


# --- quotes ---------------------------------------------------------------------------------------

def test_round_trip(world: World) -> None:
    vq = world.b.verify(world.a.quote(IDENT, RD))
    assert vq.identity == IDENT
    assert vq.report_data == RD
    assert vq.platform_id == "a"
    assert vq.backend == "sim"
    assert world.a.verify(world.a.quote(IDENT, RD)).platform_id == "a"


def test_report_data_is_bound(world: World) -> None:
    other = bytes(64)
    assert world.b.verify(world.a.quote(IDENT, other)).report_data == other
    good = _fields(world.a.quote(IDENT, RD))
    good["report_data"] = other
    with pytest.raises(AttestationError, match="quote signature does not verify with the key of host 'a'"):
        world.b.verify(_reencode(good))


@pytest.mark.parametrize("n", [0, 32, 63, 65, 128])
def test_wrong_report_data_length(world: World, n: int) -> None:
    with pytest.raises(ValueError, match="report_data must be 64 bytes"):
        world.a.quote(IDENT, bytes(n))


@pytest.mark.parametrize("ident", [
    replace(IDENT, measurement=bytes(31)), replace(IDENT, signer=bytes(33)),
    replace(IDENT, product_id=-1), replace(IDENT, svn=1 << 16), replace(IDENT, svn=True),
])
def test_quote_rejects_identity_it_cannot_carry(world: World, ident: Identity) -> None:
    with pytest.raises(ValueError):
        world.a.quote(ident, RD)


def _tweak(value: object) -> object:
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:]
    if isinstance(value, int):
        return value + 1
    return value + "x"


@pytest.mark.parametrize("field", ["version", "backend", "measurement", "signer", "product_id", "svn",
                                   "report_data", "cert", "signature"])
@pytest.mark.adversarial
def test_tampering_with_any_field_fails(world: World, field: str) -> None:
    fields = _fields(world.a.quote(IDENT, RD))
    assert field in fields
    fields[field] = _tweak(fields[field])
    with pytest.raises(AttestationError):
        world.b.verify(_reencode(fields))


@pytest.mark.parametrize("change", [
    {"product_id": 2**64 - 1}, {"svn": -1}, {"svn": 1 << 16}, {"version": 2**63}, {"measurement": bytes(33)},
    {"signer": b""}, {"report_data": bytes(65)}, {"signature": bytes(63)}, {"cert": b""},
    {"cert": bytes(5000)}, {"extra": 1}, {"backend": "sgx"}, {"svn": "3"}, {"measurement": "x" * 32},
])
def test_malformed_fields_fail(world: World, change: dict) -> None:
    fields = _fields(world.a.quote(IDENT, RD))
    fields.update(change)
    with pytest.raises(AttestationError, match="malformed sim quote"):
        world.b.verify(_reencode(fields))


@pytest.mark.parametrize("field", ["version", "signature", "cert"])
def test_missing_field_fails(world: World, field: str) -> None:
    fields = _fields(world.a.quote(IDENT, RD))
    del fields[field]
    with pytest.raises(AttestationError, match="malformed sim quote"):
        world.b.verify(_reencode(fields))


@pytest.mark.adversarial
def test_quote_from_platform_under_another_root_is_rejected(world: World, tmp_path: Path) -> None:
    create_root_ca(tmp_path / "evil-ca")
    evil = SimPlatform.provision(tmp_path / "evil", tmp_path / "evil-ca", "b")
    assert evil.verify(evil.quote(IDENT, RD)).platform_id == "b"
    with pytest.raises(AttestationError, match="certificate of host 'b' is not signed by the trusted root CA"):
        world.a.verify(evil.quote(IDENT, RD))


@pytest.mark.adversarial
def test_stolen_certificate_with_another_key_is_rejected(world: World) -> None:
    """Host b presents a's certificate but can only sign with its own key."""
    fields = _fields(world.b.quote(IDENT, RD))
    fields["cert"] = _fields(world.a.quote(IDENT, RD))["cert"]
    with pytest.raises(AttestationError, match="quote signature does not verify"):
        world.b.verify(_reencode(fields))


def _forged(world: World, name: str = "a", ca: bool = False, usage: bool = True,
            days: tuple[int, int] = (-1, 1)) -> bytes:
    """A quote signed by a's key under a root-signed certificate with the given profile."""
    ca_key = serialization.load_pem_private_key((world.ca / "root.key").read_bytes(), None)
    key = serialization.load_pem_private_key((world.base / "a" / "platform.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name, _validate=len(name) <= 64)]))
        .issuer_name(load_root(world.ca).subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0])).not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                        critical=True)
    cert = builder.sign(ca_key, None)  # type: ignore[arg-type]
    fields = _fields(world.a.quote(IDENT, RD))
    fields["cert"] = cert.public_bytes(serialization.Encoding.DER)
    q = sim._decoder.decode(_reencode(fields))
    fields["signature"] = key.sign(sim._signed_bytes(q))
    return _reencode(fields)


def test_certificate_profile_is_enforced(world: World) -> None:
    assert world.b.verify(_forged(world, name="a2")).platform_id == "a2"  # the forger works when all is right
    with pytest.raises(AttestationError, match="host 'a' is not valid at"):
        world.b.verify(_forged(world, days=(-10, -1)))
    with pytest.raises(AttestationError, match="host 'a' is not valid at"):
        world.b.verify(_forged(world, days=(1, 10)))
    with pytest.raises(AttestationError, match="not an attestation"):
        world.b.verify(_forged(world, ca=True))
    with pytest.raises(AttestationError, match="lacks basic constraints or key usage"):
        world.b.verify(_forged(world, usage=False))


@pytest.mark.adversarial
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")  # flipped serials
def test_every_truncation_and_byte_flip_fails(world: World) -> None:
    quote = world.a.quote(IDENT, RD)
    for n in range(len(quote)):
        with pytest.raises(AttestationError):
            world.b.verify(quote[:n])
    for i in range(len(quote)):
        for mask in (0x01, 0x80):
            bad = bytearray(quote)
            bad[i] ^= mask
            with pytest.raises(AttestationError):
                world.b.verify(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_raises_only_attestation_error(world: World, data: bytes) -> None:
    with pytest.raises(AttestationError):
        world.b.verify(data)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")  # flipped serials
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_mutations_raise_only_attestation_error(world: World, data: st.DataObject) -> None:
    good = world.a.quote(IDENT, RD)
    quote = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(quote) - 1))
        quote[i] = data.draw(st.integers(0, 255))
    if bytes(quote) != good:
        with pytest.raises(AttestationError):
            world.b.verify(bytes(quote))


def test_non_bytes_and_oversized(world: World) -> None:
    with pytest.raises(AttestationError, match="must be bytes"):
        world.b.verify("quote")  # type: ignore[arg-type]
    with pytest.raises(AttestationError, match="more than"):
        world.b.verify(bytes(sim.MAX_QUOTE_SIZE + 1))


def test_verify_quote_needs_only_the_root(world: World) -> None:
    assert verify_quote(world.a.quote(IDENT, RD), load_root(world.ca)).platform_id == "a"


# --- sealing and measurement ----------------------------------------------------------------------

def test_sealing_keys(world: World) -> None:
    k = world.a.sealing_key(IDENT, b"state")
    assert len(k) == 32
    assert k == SimPlatform.open(world.base / "a", world.ca / "root.pem").sealing_key(IDENT, b"state")
    others = {
        world.b.sealing_key(IDENT, b"state"),
        world.a.sealing_key(replace(IDENT, measurement=measure(b"other code")), b"state"),
        world.a.sealing_key(replace(IDENT, signer=bytes(32)), b"state"),
        world.a.sealing_key(IDENT, b"other"),
    }
    assert k not in others and len(others) == 4


def test_measure() -> None:
    m = measure(b"code", b"cfg")
    assert len(m) == 32 and m == measure(b"code", b"cfg")
    assert measure(b"ab", b"c") != measure(b"a", b"bc")
    assert measure(b"code") == measure(b"code", b"") != measure(b"code", b"\x00")


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------

def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificate_profiles_exactly(world: World) -> None:
    """Root: 20 years, only key_cert_sign; platform: 10 years, only digital_signature; both backdated 5
    minutes for clock skew, both extensions critical, both files world-readable (0644)."""
    for path, years, usage in ((world.ca / "root.pem", 20, "key_cert_sign"),
                               (world.base / "a" / "platform.pem", 10, "digital_signature")):
        cert = _cert(path)
        assert _mode(path) == 0o644
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365 * years, minutes=5)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert ku.critical and bc.critical
        flags = {name: getattr(ku.value, name) for name in (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
            "key_cert_sign", "crl_sign")}
        assert flags == {name: name == usage for name in flags}


def test_certificate_is_valid_up_to_and_including_its_last_second(world: World) -> None:
    cert = _cert(world.base / "a" / "platform.pem")
    der = cert.public_bytes(serialization.Encoding.DER)
    root = load_root(world.ca)
    assert sim._check_platform_cert(der, root, cert.not_valid_after_utc)[0] == "a"
    assert sim._check_platform_cert(der, root, cert.not_valid_before_utc)[0] == "a"
    with pytest.raises(AttestationError, match="is not valid at"):
        sim._check_platform_cert(der, root, cert.not_valid_after_utc + dt.timedelta(seconds=1))


@pytest.mark.parametrize("value", [0, 1, 0xFFFF])
@pytest.mark.parametrize("field", ["product_id", "svn"])
def test_16_bit_identity_fields_cover_their_whole_range(world: World, field: str, value: int) -> None:
    ident = replace(IDENT, **{field: value})
    assert getattr(world.b.verify(world.a.quote(ident, RD)).identity, field) == value
    with pytest.raises(ValueError, match="product id and svn must be in 0..65535"):
        world.a.quote(replace(IDENT, **{field: 0x10000}), RD)


@pytest.mark.parametrize("change", [{"measurement": bytes(31)}, {"signer": bytes(31)}, {"signature": bytes(65)},
                                    {"product_id": 0x10000}])
def test_field_sizes_are_exact(world: World, change: dict) -> None:
    fields = _fields(world.a.quote(IDENT, RD))
    fields.update(change)
    with pytest.raises(AttestationError, match="malformed sim quote"):
        world.b.verify(_reencode(fields))


def test_quote_size_limit_is_inclusive(world: World) -> None:
    with pytest.raises(AttestationError, match="malformed sim quote"):  # at the limit: parsed (and refused)
        world.b.verify(bytes(sim.MAX_QUOTE_SIZE))
    with pytest.raises(AttestationError, match="8193 bytes, more than the 8192 allowed"):
        world.b.verify(bytes(8193))


def test_malformed_quote_message_is_the_first_line_cut_at_200(world: World) -> None:
    fields = _fields(world.a.quote(IDENT, RD))
    fields["x" * 400] = 1  # msgspec names the unknown field in its message
    with pytest.raises(AttestationError) as info:
        world.b.verify(_reencode(fields))
    detail = str(info.value).removeprefix("malformed sim quote: ")
    assert detail != str(info.value) and len(detail) == 200 and "xxxx" in detail


def test_platform_certificate_with_two_common_names_is_refused(world: World) -> None:
    ca_key = serialization.load_pem_private_key((world.ca / "root.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, "b")]))
        .issuer_name(load_root(world.ca).subject).public_key(Ed25519PrivateKey.generate().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .sign(ca_key, None)  # type: ignore[arg-type]
    )
    with pytest.raises(AttestationError, match="exactly one subject common name"):
        sim._check_platform_cert(cert.public_bytes(serialization.Encoding.DER), load_root(world.ca), now)


def test_host_id_of_64_characters_is_fine(world: World, tmp_path: Path) -> None:
    assert SimPlatform.provision(tmp_path / "p", world.ca, "h" * 64).platform_id == "h" * 64


def test_unreadable_file_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read .*missing\.pem: No such file or directory$"):
        SimPlatform.open(tmp_path, tmp_path / "missing.pem")


def test_counters_are_a_property_and_need_a_directory(world: World) -> None:
    from constmig.tee.counters import CounterStore

    assert isinstance(world.a.counters, CounterStore)
    cid = world.a.counters.create(4)
    assert world.a.counters.read(cid) == 4
    world.a.counters.destroy(cid)
    d = world.base / "a"
    bare = SimPlatform("a", sim._load_key(d / "platform.key"), _cert(d / "platform.pem"),
                       (d / "platform.secret").read_bytes(), load_root(world.ca))
    with pytest.raises(ConfigError, match="opened without a directory"):
        _ = bare.counters


@pytest.mark.parametrize(("size", "match"), [(1, "platform certificate is malformed"),
                                             (4096, "platform certificate is malformed"),
                                             (4097, "malformed sim quote")])
def test_certificate_field_is_1_to_4096_bytes(world: World, size: int, match: str) -> None:
    fields = _fields(world.a.quote(IDENT, RD))
    fields["cert"] = b"\x30" * size
    with pytest.raises(AttestationError, match=match):
        world.b.verify(_reencode(fields))


def test_root_allows_no_intermediate_ca(world: World) -> None:
    assert load_root(world.ca).extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def _self_signed(tmp_path: Path, key: object, ca: bool) -> Path:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()))  # type: ignore[arg-type]
    path = tmp_path / f"root-{ca}-{type(key).__name__}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_load_root_needs_both_an_ed25519_key_and_the_ca_flag(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    for key, ca in ((Ed25519PrivateKey.generate(), False), (ec.generate_private_key(ec.SECP256R1()), True)):
        with pytest.raises(ConfigError, match="not a self-signed Ed25519 CA certificate"):
            load_root(_self_signed(tmp_path, key, ca))
    assert load_root(_self_signed(tmp_path, Ed25519PrivateKey.generate(), True))


@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")  # a forged, over-long common name
def test_messages_name_at_most_64_characters_of_a_host(world: World) -> None:
    long = "n" * 100
    with pytest.raises(AttestationError, match=f"certificate of host '{'n' * 64}' is not valid at"):
        world.b.verify(_forged(world, name=long, days=(-10, -1)))
    fields = _fields(_forged(world, name=long))
    fields["report_data"] = bytes(64)  # the signature no longer covers the fields
    with pytest.raises(AttestationError, match=f"does not verify with the key of host '{'n' * 64}'$"):
        world.b.verify(_reencode(fields))


def test_provision_creates_nested_and_existing_folders(world: World, tmp_path: Path) -> None:
    create_root_ca(tmp_path / "deep" / "ca")
    assert (tmp_path / "deep" / "ca" / "root.pem").exists()
    assert SimPlatform.provision(tmp_path / "x" / "y" / "p", world.ca, "nested").platform_id == "nested"
    (tmp_path / "empty").mkdir()
    assert SimPlatform.provision(tmp_path / "empty", world.ca, "empty").platform_id == "empty"
