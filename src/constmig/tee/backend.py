"""The TEE backend interface: what a platform gives an enclave, and nothing more.

Migration code only talks to this interface, so a hardware backend (SGX DCAP via Gramine, TDX)
can be added without touching it. The software backend is `constmig.tee.sim`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from constmig.tee.counters import CounterStore

REPORT_DATA_SIZE = 64
# The largest quote any backend produces and any message carries (a DCAP quote with its PCK chain is ~5 KB)
MAX_QUOTE_SIZE = 64 * 1024


@dataclass(frozen=True)
class Identity:
    """What an enclave is: the code that was measured and who signed it."""

    measurement: bytes  # 32 bytes, hash over the enclave app's code and config
    signer: bytes  # 32 bytes, hash of the signer's identity
    product_id: int
    svn: int  # security version number; policies can require a minimum


@dataclass(frozen=True)
class VerifiedQuote:
    """The content of a quote whose signature chain verified up to a trusted root."""

    identity: Identity
    report_data: bytes  # 64 bytes chosen by the enclave (we bind key-exchange transcripts here)
    platform_id: str  # subject of the platform certificate (the host id)
    backend: str


class TeeBackend(ABC):
    """A platform: quotes for enclaves running on it, verification of anyone's quotes, sealing."""

    name: str

    @abstractmethod
    def quote(self, identity: Identity, report_data: bytes) -> bytes:
        """Sign (identity, report_data) with this platform's attestation key; opaque bytes out."""

    @abstractmethod
    def verify(self, quote: bytes) -> VerifiedQuote:
        """Check a quote from any platform against the trusted root; raise AttestationError."""

    @abstractmethod
    def sealing_key(self, identity: Identity, label: bytes) -> bytes:
        """A 32-byte key only this enclave identity on this platform can derive."""

    @property
    @abstractmethod
    def counters(self) -> CounterStore:
        """This platform's monotonic counters (for rollback-proof sealed state)."""

    @property
    @abstractmethod
    def platform_id(self) -> str:
        """This platform's identity as it appears in its certificate."""
