"""Enclave measurement: the one place an enclave app's code and config become a 32-byte identity.

Migration policy compares measurements, so every part of constmig must compute them the same way.
"""

from __future__ import annotations

import hashlib
import struct

MEASUREMENT_SIZE = 32
_DOMAIN = b"constmig-measure-v1\x00"


def measure(code: bytes, config: bytes = b"") -> bytes:
    """sha256 over length-prefixed (code, config), so no two different pairs share an encoding."""
    h = hashlib.sha256(_DOMAIN)
    for part in (code, config):
        h.update(struct.pack(">Q", len(part)))
        h.update(part)
    return h.digest()
