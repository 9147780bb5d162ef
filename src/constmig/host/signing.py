"""Signatures on what the fleet is asked to do through etcd (drain marks, migration records, cancels).

The store is untrusted (host/directory.py): whoever holds it may write any key. So a mark or a record
acts only if it carries a signature by a certificate from the fleet's admin CA (host/pki.py) that may
ask for it: an operator's (`~/.constmig/operator`, `$CONSTMIG_ADMIN_CERT`), or, the way the CLI reaches a
local agent through its socket (host/admin.py), the host's own certificate read from its state folder by
a user who may read it (who could use that agent's socket anyway). ECDSA P-256 over SHA-256 of the
canonical JSON of what is signed; the certificate travels with the signature.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from constmig.errors import ConfigError
from constmig.files import read_bytes
from constmig.host import admin, pki


def canonical(obj: Any) -> bytes:
    """One byte layout for a JSON value, whoever writes it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Signer:
    role: str
    name: str

    def describe(self) -> str:
        return f"{self.role} {self.name}"


def sign(ident: pki.Identity, payload: Any) -> dict[str, str]:
    """{"cert": PEM, "sig": base64} over `payload`'s canonical bytes, with `ident`'s key."""
    try:
        key = serialization.load_pem_private_key(read_bytes(ident.key_path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm, OSError):
        raise ConfigError(f"cannot read the private key in {ident.key_path}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ident.key_path} is not an EC key")
    sig = key.sign(canonical(payload), ec.ECDSA(hashes.SHA256()))
    return {"cert": ident.cert.public_bytes(serialization.Encoding.PEM).decode(),
            "sig": base64.b64encode(sig).decode()}


class Unsigned(Exception):
    """Why a signed item may not act (one line, for its status and the log)."""


def verify(ca: x509.Certificate, payload: Any, signature: Any, now: dt.datetime | None = None) -> Signer:
    """Who signed `payload`: the certificate must be issued by `ca`, valid now, of a constmig role, and
    its key must have made the signature. Unsigned otherwise."""
    if not isinstance(signature, dict) or not isinstance(signature.get("cert"), str) \
            or not isinstance(signature.get("sig"), str):
        raise Unsigned("not signed")
    try:
        cert = x509.load_pem_x509_certificate(signature["cert"].encode())
        sig = base64.b64decode(signature["sig"], validate=True)
    except ValueError:
        raise Unsigned("the signature's certificate or value does not parse") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise Unsigned("signed by a certificate not issued by this fleet's admin CA") from None
    now = now or dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc or now > cert.not_valid_after_utc:
        raise Unsigned(f"signed by a certificate valid only {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                       f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    role, name = pki.subject_role(cert)
    if role not in pki.ROLES:
        raise Unsigned(f"signed by {name!r}, whose certificate has no constmig role")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Unsigned("signed by a certificate whose key is not an EC key")
    try:
        key.verify(sig, canonical(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Unsigned(f"the signature of {role} {name!r} does not match what it is on (changed since)") from None
    return Signer(role, name)


def may_ask(signer: Signer, host_id: str) -> str | None:
    """Why `signer` may not ask for something done by (or to) host `host_id`, or None: an operator may,
    and the host itself (its certificate is read only by who could use its local socket)."""
    if signer.role == "operator" or (signer.role == "host" and signer.name == host_id):
        return None
    return f"signed by {signer.describe()!r}, which may not ask this of host {host_id!r} (an operator's or that " \
           "host's own certificate may)"


def local_host_identity(addr: str) -> pki.Identity | None:
    """The host certificate of the agent at `addr` if it runs on this machine and this user may read its
    state folder (the same test the CLI's local socket passes: host/admin.py)."""
    entry = admin.find_local(addr)
    if entry is None:
        return None
    try:
        sock = Path(entry.readlink())
        ident = pki.read_identity(pki.host_dir(sock.parent.parent))
    except (OSError, ConfigError):
        return None
    return ident if ident.role == "host" else None


def signing_identity(addr: str | None) -> pki.Identity:
    """Who the CLI signs as, asking something of the host at `addr`: its own certificate if that agent
    runs here (as the CLI uses its local socket), else this user's operator certificate; else one line."""
    ident = local_host_identity(addr) if addr else None
    if ident is None:
        folder = pki.operator_dir()
        if (folder / "cert.pem").exists():
            ident = pki.read_identity(folder)
    if ident is None:
        where = f"the agent at {addr} does not run on this machine, and " if addr else ""
        raise ConfigError(f"{where}there is no operator certificate in {pki.operator_dir()} to sign with "
                          "($CONSTMIG_ADMIN_CERT; `constmig ca issue operator NAME --out DIR` where the admin CA's "
                          "key is)")
    if problem := ident.problem():
        raise ConfigError(f"{problem}: ask for a new one")
    return ident
