"""The software TEE backend ("sim"): X.509-certified platform keys standing in for hardware ones.

Each host (platform) has an Ed25519 attestation key certified by a root CA that every verifier trusts,
and a 32-byte secret from which sealing keys are derived. A quote is the platform's signature over the
enclave identity and 64 bytes of report data. The key and secret are plain files: whoever reads them can
forge quotes and unseal data; that is the accepted limit of a software TEE (hardware keeps them in fuses).

Files: ca_dir/{root.key, root.pem}; platform_dir/{platform.key, platform.pem, platform.secret}.
`create_root_ca` and `SimPlatform.provision` create them (once); `SimPlatform.open` only reads them,
so an enclave process needs neither the CA key nor write access.
"""

from __future__ import annotations

import datetime as dt
import secrets
import struct
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from constmig.errors import AttestationError, ConfigError
from constmig.files import read_bytes, write_atomic
from constmig.tee.backend import REPORT_DATA_SIZE, Identity, TeeBackend, VerifiedQuote
from constmig.tee.counters import CounterStore

QUOTE_VERSION = 1
MAX_QUOTE_SIZE = 8192  # a quote is ~600 bytes; refuse to parse anything much bigger
_QUOTE_DOMAIN = b"constmig-sim-quote-v1\x00"
_SEAL_DOMAIN = b"constmig-seal"
_ROOT_CN = "constmig sim root CA"
_U16 = 0xFFFF  # product id and svn are 16-bit, as ISVPRODID / ISVSVN are in SGX
_CLOCK_SKEW = dt.timedelta(minutes=5)
_B32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_U16T = Annotated[int, msgspec.Meta(ge=0, le=_U16)]


class _Quote(msgspec.Struct, forbid_unknown_fields=True):
    version: Literal[1]
    backend: Literal["sim"]
    measurement: _B32
    signer: _B32
    product_id: _U16T
    svn: _U16T
    report_data: Annotated[bytes, msgspec.Meta(min_length=REPORT_DATA_SIZE, max_length=REPORT_DATA_SIZE)]
    cert: Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]  # platform certificate, DER
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


_decoder = msgspec.msgpack.Decoder(_Quote)


def _signed_bytes(q: _Quote) -> bytes:
    """Canonical, domain-separated encoding of every quote field but the signature.

    Signing this (not the msgpack bytes) means no encoder quirk can make two quotes share a signature.
    """
    backend = q.backend.encode()
    return b"".join([
        _QUOTE_DOMAIN, struct.pack(">HH", q.version, len(backend)), backend, q.measurement, q.signer,
        struct.pack(">HH", q.product_id, q.svn), q.report_data, struct.pack(">I", len(q.cert)), q.cert,
    ])


# --- files -----------------------------------------------------------------------------------------

def _load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_bytes(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def _key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_bytes(path))
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise AttestationError("platform certificate must have exactly one subject common name")
    return names[0].value


def _check_host_id(host_id: str) -> None:
    if not (isinstance(host_id, str) and 1 <= len(host_id) <= 64 and host_id.isprintable()):
        raise ConfigError(f"host id must be 1-64 printable characters, got {host_id!r}")


def _issue(subject: str, issuer: x509.Name | None, pub: Ed25519PublicKey, signer: Ed25519PrivateKey,
           ca: bool, years: int) -> bytes:
    """A PEM certificate with the minimal profile verifiers check: CA flag and key usage, both critical."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    usage = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"], False)
    usage["key_cert_sign" if ca else "digital_signature"] = True
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .sign(signer, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --- root CA ---------------------------------------------------------------------------------------

def create_root_ca(ca_dir: Path) -> None:
    """Create root.key (0600) and a self-signed root.pem in ca_dir unless they exist already."""
    ca_dir = Path(ca_dir)
    ca_dir.mkdir(parents=True, exist_ok=True)
    key_path, pem_path = ca_dir / "root.key", ca_dir / "root.pem"
    if pem_path.exists():
        if not key_path.exists():
            raise ConfigError(f"{pem_path} exists without root.key; refusing to replace a trusted root")
        return
    if not key_path.exists():
        write_atomic(key_path, _key_pem(Ed25519PrivateKey.generate()), 0o600, replace=False)
    key = _load_key(key_path)
    write_atomic(pem_path, _issue(_ROOT_CN, None, key.public_key(), key, ca=True, years=20), 0o644, replace=False)


def load_root(path: Path) -> x509.Certificate:
    """Load the trusted root certificate from a CA directory or a PEM file, checking it is a root CA."""
    path = Path(path)
    if path.is_dir():
        path = path / "root.pem"
    cert = _load_cert(path)
    try:
        cert.verify_directly_issued_by(cert)
        ok = isinstance(cert.public_key(), Ed25519PublicKey)
        ok = ok and cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except Exception:  # see _check_platform_cert: a bad certificate can fail to parse in many ways
        ok = False
    if not ok:
        raise ConfigError(f"{path} is not a self-signed Ed25519 CA certificate")
    return cert


def _check_platform_cert(der: bytes, root: x509.Certificate, now: dt.datetime) -> tuple[str, Ed25519PublicKey]:
    """Check a platform certificate against the trusted root; return (host id, attestation public key).

    cryptography parses certificate fields lazily, and a malformed one can fail with ValueError, KeyError,
    InvalidVersion, ... depending on the field and the library version; all of them mean "malformed".
    """
    try:
        return _check_platform_cert_fields(der, root, now)
    except AttestationError:
        raise
    except Exception as e:
        raise AttestationError(f"platform certificate is malformed ({type(e).__name__})") from None


def _check_platform_cert_fields(der: bytes, root: x509.Certificate, now: dt.datetime) \
        -> tuple[str, Ed25519PublicKey]:
    cert = x509.load_der_x509_certificate(der)
    cn = _cn(cert)
    what = f"platform certificate of host {cn[:64]!r}"
    if cert.issuer != root.subject:
        raise AttestationError(f"{what} is not issued by the trusted root CA")
    try:
        cert.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise AttestationError(f"{what} is not signed by the trusted root CA") from None
    for c, name in ((root, "trusted root CA certificate"), (cert, what)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise AttestationError(f"{name} is not valid at {now:%Y-%m-%d %H:%M:%S} UTC")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"{what} lacks basic constraints or key usage") from None
    if bc.ca or not ku.digital_signature:
        raise AttestationError(f"{what} is not an attestation (end-entity, digital signature) certificate")
    pub = cert.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise AttestationError(f"{what} does not hold an Ed25519 key")
    return cn, pub


def verify_quote(quote: bytes, root: x509.Certificate) -> VerifiedQuote:
    """Check a sim quote against `root`; any failure, malformed input included, is AttestationError."""
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise AttestationError(f"quote must be bytes, not {type(quote).__name__}")
    if len(quote) > MAX_QUOTE_SIZE:
        raise AttestationError(f"quote is {len(quote)} bytes, more than the {MAX_QUOTE_SIZE} allowed")
    try:
        q = _decoder.decode(quote)
    except (msgspec.DecodeError, ValueError) as e:  # msgspec raises UnicodeDecodeError for bad utf-8
        raise AttestationError(f"malformed sim quote: {(str(e).splitlines() or [''])[0][:200]}") from None
    host, pub = _check_platform_cert(q.cert, root, _now())
    try:
        pub.verify(q.signature, _signed_bytes(q))
    except InvalidSignature:
        raise AttestationError(f"quote signature does not verify with the key of host {host[:64]!r}") from None
    return VerifiedQuote(identity=Identity(q.measurement, q.signer, q.product_id, q.svn),
                         report_data=q.report_data, platform_id=host, backend="sim")


# --- platform --------------------------------------------------------------------------------------

def _check_identity(identity: Identity) -> None:
    """Reject identities a quote cannot carry: a caller bug, hence ValueError, not a ConstmigError."""
    if len(identity.measurement) != 32 or len(identity.signer) != 32:
        raise ValueError("identity measurement and signer must be 32 bytes each")
    if not all(type(v) is int and 0 <= v <= _U16 for v in (identity.product_id, identity.svn)):
        raise ValueError(f"product id and svn must be in 0..{_U16}")


class SimPlatform(TeeBackend):
    """One host of the software TEE. Build with `provision` (creates files) or `open` (reads them)."""

    name = "sim"

    def __init__(self, host_id: str, key: Ed25519PrivateKey, cert: x509.Certificate, secret: bytes,
                 root: x509.Certificate) -> None:
        self._host_id, self._key, self._secret, self._root = host_id, key, secret, root
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self._counters: CounterStore | None = None

    @classmethod
    def provision(cls, platform_dir: Path, ca_dir: Path, host_id: str) -> SimPlatform:
        """Create this host's key, secret and CA-signed certificate unless present, then open it."""
        _check_host_id(host_id)
        platform_dir, ca_dir = Path(platform_dir), Path(ca_dir)
        pem = platform_dir / "platform.pem"
        if not pem.exists():
            platform_dir.mkdir(parents=True, exist_ok=True)
            if not (platform_dir / "platform.key").exists():
                write_atomic(platform_dir / "platform.key", _key_pem(Ed25519PrivateKey.generate()), 0o600, replace=False)
            if not (platform_dir / "platform.secret").exists():
                write_atomic(platform_dir / "platform.secret", secrets.token_bytes(32), 0o600, replace=False)
            key = _load_key(platform_dir / "platform.key")
            ca_key, root = _load_key(ca_dir / "root.key"), load_root(ca_dir)
            if ca_key.public_key() != root.public_key():
                raise ConfigError(f"{ca_dir}/root.key does not match {ca_dir}/root.pem")
            write_atomic(pem, _issue(host_id, root.subject, key.public_key(), ca_key, ca=False, years=10), 0o644, replace=False)
        platform = cls.open(platform_dir, ca_dir / "root.pem")
        if platform.platform_id != host_id:
            raise ConfigError(f"{platform_dir} belongs to host {platform.platform_id!r}, not {host_id!r}")
        return platform

    @classmethod
    def open(cls, platform_dir: Path, root_pem: Path) -> SimPlatform:
        """Load an already provisioned platform; needs only its files and the trusted root certificate."""
        platform_dir = Path(platform_dir)
        root = load_root(root_pem)
        key = _load_key(platform_dir / "platform.key")
        cert = _load_cert(platform_dir / "platform.pem")
        secret = read_bytes(platform_dir / "platform.secret")
        if len(secret) != 32:
            raise ConfigError(f"{platform_dir}/platform.secret must be 32 bytes, not {len(secret)}")
        try:
            host, pub = _check_platform_cert(cert.public_bytes(serialization.Encoding.DER), root, _now())
        except AttestationError as e:
            raise ConfigError(f"{platform_dir}: {e}") from None
        if pub != key.public_key():
            raise ConfigError(f"{platform_dir}/platform.pem does not certify {platform_dir}/platform.key")
        platform = cls(host, key, cert, secret, root)
        counter_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"constmig-counters").derive(secret)
        platform._counters = CounterStore(platform_dir / "counters.json", counter_key)
        return platform

    @property
    def platform_id(self) -> str:
        return self._host_id

    @property
    def counters(self) -> CounterStore:
        if self._counters is None:
            raise ConfigError("this platform was opened without a directory, so it has no counters")
        return self._counters

    def quote(self, identity: Identity, report_data: bytes) -> bytes:
        """Sign (identity, report_data, our certificate) with the platform attestation key."""
        _check_identity(identity)
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, not {len(report_data)}")
        q = _Quote(QUOTE_VERSION, "sim", bytes(identity.measurement), bytes(identity.signer),
                   identity.product_id, identity.svn, bytes(report_data), self._cert_der, b"")
        q.signature = self._key.sign(_signed_bytes(q))
        return msgspec.msgpack.encode(q)

    def verify(self, quote: bytes) -> VerifiedQuote:
        return verify_quote(quote, self._root)

    def sealing_key(self, identity: Identity, label: bytes) -> bytes:
        """HKDF over the platform secret, bound to measurement and signer, so only that enclave here gets it."""
        _check_identity(identity)
        info = _SEAL_DOMAIN + identity.measurement + identity.signer + label
        return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(self._secret)
