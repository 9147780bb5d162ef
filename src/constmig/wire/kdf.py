"""The key-agreement pieces both attested handshakes share (migration: handshake.py; clients: session.py).

Hash inputs are length-prefixed so no two transcripts hash alike by moving bytes between fields; keys come
from HKDF-SHA256 salted by the transcript hash, so two sides derive the same keys only if they saw the
same bytes.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from constmig.errors import ProtocolError


def lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: unambiguous, so fields cannot be shifted between parts."""
    return b"".join(struct.pack("!I", len(p)) + bytes(p) for p in parts)


def transcript_hash(label: bytes, *parts: bytes) -> bytes:
    """SHA-512 over a label and length-prefixed parts: 64 bytes, the size of a quote's report data."""
    return hashlib.sha512(label + lp(*parts)).digest()


def hkdf32(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(secret)


def x25519_pub(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_shared(private: X25519PrivateKey, peer_pub: bytes, peer: str) -> bytes:
    """The shared secret; ProtocolError for a low-order point (the secret would be all zeros)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    except ValueError:
        raise ProtocolError(f"{peer} sent an invalid X25519 public key") from None
