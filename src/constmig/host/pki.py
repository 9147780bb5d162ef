"""The fleet's admin CA: certificates with a role and an expiry, for the agents' mutual TLS (host/admin.py).

It lives beside the attestation root in the CA folder, as `<ca-dir>/admin/{ca.key, ca.pem}`, but is a
separate key: re-issuing it (`constmig ca init --renew`) revokes every operator and host certificate
without touching the root that clients and enclaves trust for attestation.

A certificate is an *identity folder*: `cert.pem`, `key.pem` (0600) and `ca.pem`, the CA it was issued
by, which is also the CA its holder trusts for the other side. An operator's is `~/.constmig/operator`
(or `$CONSTMIG_ADMIN_CERT`); a host's is `<state-dir>/tls`, issued by the agent itself at start when the
CA folder holds `admin/ca.key` (as it holds `root.key` to provision the platform), else by an operator
with `constmig ca issue host ID --out <state-dir>/tls`.

The role is the subject's organizational unit (`operator` or `host`), its name the common name. Host
certificates may serve and authenticate (TLS server and client); operator ones only authenticate.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from constmig.errors import ConfigError
from constmig.files import read_bytes, write_atomic

ROLES = ("operator", "host")
CA_CN = "constmig admin CA"
CA_YEARS = 10
DEFAULT_DAYS = {"operator": 90, "host": 365}
RENEW_BEFORE = dt.timedelta(days=30)  # an agent re-issues its own host certificate this long before expiry
_CLOCK_SKEW = dt.timedelta(minutes=5)


def admin_ca_dir(ca_dir: Path) -> Path:
    return Path(ca_dir) / "admin"


def operator_dir() -> Path:
    """Where the CLI looks for its operator certificate: $CONSTMIG_ADMIN_CERT, else ~/.constmig/operator."""
    return Path(os.environ.get("CONSTMIG_ADMIN_CERT", Path.home() / ".constmig" / "operator"))


def host_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "tls"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(read_bytes(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_bytes(path))
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None


def _usage(**on: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


# ---- the CA ----

def create_admin_ca(ca_dir: Path, renew: bool = False) -> bool:
    """Create `<ca_dir>/admin/{ca.key, ca.pem}` unless they exist (True if created). `renew` replaces
    them: every certificate issued so far stops verifying (agents keep the old CA until restarted)."""
    folder = admin_ca_dir(ca_dir)
    key_path, pem_path = folder / "ca.key", folder / "ca.pem"
    if pem_path.exists() and not renew:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if renew or not key_path.exists():
            write_atomic(key_path, _key_pem(ec.generate_private_key(ec.SECP256R1())), 0o600, replace=renew)
        key = _load_key(key_path)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "constmig"),
                          x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        write_atomic(pem_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=renew)
    except OSError as e:
        raise ConfigError(f"cannot create the admin CA in {folder}: {e.strerror or e}") from None
    return True


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None]:
    """The admin CA's certificate, and its key if this folder holds it."""
    folder = admin_ca_dir(ca_dir)
    if not (folder / "ca.pem").exists():
        raise ConfigError(f"no admin CA in {folder}: create it with `constmig ca init --ca-dir {ca_dir}` "
                          "(an agent creates it at its first start)")
    cert = _load_cert(folder / "ca.pem")
    if not (folder / "ca.key").exists():
        return cert, None
    key = _load_key(folder / "ca.key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{folder}/ca.key does not match {folder}/ca.pem")
    return cert, key


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


# ---- identities ----

@dataclass(frozen=True)
class Identity:
    """An identity folder: who the certificate names and until when, and the files ssl loads."""

    folder: Path
    role: str
    name: str
    not_after: dt.datetime
    cert: x509.Certificate
    ca: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.folder / "key.pem"

    @property
    def ca_path(self) -> Path:
        return self.folder / "ca.pem"

    def problem(self, now: dt.datetime | None = None, margin: dt.timedelta = dt.timedelta(0)) -> str | None:
        """Why this identity cannot be used now (or within `margin`), or None."""
        now = now or _now()
        if now < self.cert.not_valid_before_utc:
            return f"the {self.role} certificate in {self.folder} is not valid before {self.cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        if now + margin > self.not_after:
            verb = "expired" if now > self.not_after else "expires"
            return f"the {self.role} certificate in {self.folder} {verb} on {self.not_after:%Y-%m-%d %H:%M} UTC"
        return None


def subject_role(cert: x509.Certificate) -> tuple[str, str]:
    """(role, name) from a certificate's subject ("" where absent)."""
    def one(oid: x509.ObjectIdentifier) -> str:
        attrs = cert.subject.get_attributes_for_oid(oid)
        return str(attrs[0].value) if len(attrs) == 1 else ""
    return one(NameOID.ORGANIZATIONAL_UNIT_NAME), one(NameOID.COMMON_NAME)


def read_identity(folder: Path) -> Identity:
    """Load and check an identity folder: the certificate is issued by its ca.pem and certifies key.pem."""
    folder = Path(folder)
    cert, ca = _load_cert(folder / "cert.pem"), _load_cert(folder / "ca.pem")
    key = _load_key(folder / "key.pem")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{folder}/cert.pem does not certify {folder}/key.pem")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{folder}/cert.pem is not issued by {folder}/ca.pem") from None
    role, name = subject_role(cert)
    if role not in ROLES:
        raise ConfigError(f"{folder}/cert.pem is not a constmig operator or host certificate")
    return Identity(folder, role, name, cert.not_valid_after_utc, cert, ca)


def check_name(role: str, name: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: use {' or '.join(ROLES)}")
    if not (1 <= len(name) <= 64 and name.isprintable()):
        raise ConfigError(f"a certificate name is 1-64 printable characters, not {name!r}")


def issue(ca_dir: Path, role: str, name: str, out: Path, days: float | None = None,
          now: dt.datetime | None = None) -> Identity:
    """Issue a `role` certificate for `name` from the admin CA in `ca_dir` into the identity folder `out`
    (a new key each time; files replaced). `now` backdates it (tests of expired certificates)."""
    check_name(role, name)
    ca_cert, ca_key = load_ca(ca_dir)
    if ca_key is None:
        raise ConfigError(f"{admin_ca_dir(ca_dir)} has no ca.key: issue certificates where the admin CA's key is")
    days = DEFAULT_DAYS[role] if days is None else days
    if days <= 0:
        raise ConfigError(f"--days must be positive, not {days:g}")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    uses = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role == "host" else [])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        write_atomic(out / "key.pem", _key_pem(key), 0o600)
        write_atomic(out / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write_atomic(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write the certificate to {out}: {e.strerror or e}") from None
    return read_identity(out)


def ensure_host(ca_dir: Path, out: Path, host_id: str) -> tuple[Identity, bool]:
    """This agent's host identity: the one in `out` if it is this host's, from the current admin CA and
    not near expiry; else a new one if the CA's key is here (True: issued now); else one line saying how
    to provision it."""
    ca_cert, ca_key = load_ca(ca_dir)
    try:
        ident = read_identity(out)
        problem = ident.problem(margin=RENEW_BEFORE if ca_key is not None else dt.timedelta(0))
        if problem is None and (ident.role != "host" or ident.name != host_id):
            problem = f"the certificate in {out} is not host {host_id!r}'s"
        elif problem is None and fingerprint(ident.ca) != fingerprint(ca_cert):
            problem = f"the host certificate in {out} is from another admin CA than {admin_ca_dir(ca_dir)}"
    except ConfigError as e:
        problem = str(e) if (out / "cert.pem").exists() else f"no host certificate in {out}"
    if problem is None:
        return ident, False
    if ca_key is None:
        raise ConfigError(f"{problem}, and {admin_ca_dir(ca_dir)} has no ca.key to issue one: run `constmig ca "
                          f"issue host {host_id} --out {out}` where the admin CA's key is")
    return issue(ca_dir, "host", host_id, out), True
