"""Quote producers for real machines: Gramine SGX and Linux TDX (configfs-tsm). They cannot run here.

Each takes the 64 bytes of report data the handshake wants bound and returns the platform's DCAP quote.
The interfaces are the ones the platforms document:
- Gramine (SGX): write the report data to /dev/attestation/user_report_data, read /dev/attestation/quote.
- Linux configfs-tsm (TDX guest): mkdir /sys/kernel/config/tsm/report/<name>, write `inblob`, read
  `outblob`, rmdir the entry. Our own fresh entry keeps other users' report data out of our quote.
Both check the quote they got back carries our report data, so a concurrent writer cannot slip its own.

`detect()` says which one this machine has; `resolve_tee("auto")` never falls back to the sim.
Every path hangs off a `root` parameter so tests can point them at a fake tree.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import dcap_qvl

from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import MAX_QUOTE_SIZE, REPORT_DATA_SIZE

TEE_CHOICES = ("auto", "sim", "sgx", "tdx")
NO_HARDWARE = "no SGX (Gramine /dev/attestation) or TDX (configfs-tsm) found; use --tee sim for the software TEE"


class QuoteProducer(Protocol):
    name: Literal["sgx", "tdx"]

    def quote(self, report_data: bytes) -> bytes: ...


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes")
    return report_data


def _check_quote(quote: bytes, tee: Literal["sgx", "tdx"], report_data: bytes, source: str) -> bytes:
    """The platform's answer must be a quote of the right kind carrying exactly our report data."""
    if not quote or len(quote) > MAX_QUOTE_SIZE:
        raise AttestationError(f"{source} returned {len(quote)} bytes, not a quote")
    try:
        parsed = dcap_qvl.parse_quote(quote)
        got = bytes(parsed.report.report_data)
        is_tdx = parsed.is_tdx()
    except ValueError as e:
        raise AttestationError(f"{source} returned a malformed quote: {' '.join(str(e).split())[:160]}") from None
    if is_tdx != (tee == "tdx"):
        raise AttestationError(f"{source} returned a {'TDX' if is_tdx else 'SGX'} quote, expected {tee.upper()}")
    if got != report_data:
        raise AttestationError(f"{source} returned a quote over other report data (a concurrent user?)")
    return quote


def _os_error(what: str, e: OSError) -> AttestationError:
    return AttestationError(f"{what}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}")


@dataclass(frozen=True)
class GramineSgx:
    """Quotes from inside a Gramine SGX enclave (sgx.remote_attestation = "dcap" in the manifest)."""

    root: Path = Path("/")
    name: Literal["sgx", "tdx"] = "sgx"

    @property
    def dev(self) -> Path:
        return self.root / "dev" / "attestation"

    def quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        try:
            (self.dev / "user_report_data").write_bytes(report_data)
            quote = (self.dev / "quote").read_bytes()
        except OSError as e:
            raise _os_error("Gramine SGX quote", e) from None
        return _check_quote(quote, "sgx", report_data, "Gramine /dev/attestation/quote")


@dataclass(frozen=True)
class TdxConfigfsTsm:
    """Quotes from a TDX guest kernel through configfs-tsm (Linux 6.7+, provider tdx_guest)."""

    root: Path = Path("/")
    name: Literal["sgx", "tdx"] = "tdx"

    @property
    def reports(self) -> Path:
        return self.root / "sys" / "kernel" / "config" / "tsm" / "report"

    def _create_entry(self, entry: Path) -> None:
        """mkdir; configfs then fills the entry with inblob, outblob, provider, generation, ..."""
        entry.mkdir()

    def _remove_entry(self, entry: Path) -> None:
        """rmdir; configfs removes an entry with its attribute files."""
        entry.rmdir()

    def quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        entry = self.reports / f"constmig-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._create_entry(entry)
        except OSError as e:
            raise _os_error("TDX configfs-tsm report entry", e) from None
        try:
            provider = (entry / "provider").read_text().strip()
            if provider != "tdx_guest":
                raise AttestationError(f"configfs-tsm provider is {provider[:32]!r}, not tdx_guest")
            (entry / "inblob").write_bytes(report_data)
            before = (entry / "generation").read_text().strip()
            quote = (entry / "outblob").read_bytes()
            if (entry / "generation").read_text().strip() != before:
                raise AttestationError("configfs-tsm entry was written by someone else while we read the quote")
        except OSError as e:
            raise _os_error("TDX configfs-tsm quote", e) from None
        finally:  # a leftover entry holds no secret; never hide the quote's own outcome behind it
            with contextlib.suppress(OSError):
                self._remove_entry(entry)
        return _check_quote(quote, "tdx", report_data, "configfs-tsm outblob")


@dataclass(frozen=True)
class Detection:
    """Which hardware quote producer this machine offers; `reason` says why when there is none."""

    producer: GramineSgx | TdxConfigfsTsm | None
    reason: str

    @property
    def kind(self) -> str | None:
        return self.producer.name if self.producer else None


def _gramine(root: Path) -> tuple[GramineSgx | None, str]:
    g = GramineSgx(root)
    if not g.dev.is_dir():
        return None, f"Gramine: no {g.dev}"
    missing = [n for n in ("user_report_data", "quote") if not (g.dev / n).exists()]
    if missing:
        return None, f"Gramine: {g.dev} lacks {', '.join(missing)}"
    kind_file = g.dev / "attestation_type"
    if kind_file.exists():
        try:
            kind = kind_file.read_text().strip()
        except OSError as e:
            return None, f"Gramine: cannot read {kind_file}: {e.strerror or e}"
        if kind != "dcap":
            return None, f"Gramine runs with attestation type {kind[:16]!r}, not dcap"
    return g, f"Gramine SGX with DCAP at {g.dev}"


def _tdx(root: Path) -> tuple[TdxConfigfsTsm | None, str]:
    t = TdxConfigfsTsm(root)
    if not t.reports.is_dir():
        return None, f"TDX: no {t.reports} (configfs-tsm)"
    guest = root / "dev" / "tdx_guest"
    if not guest.exists():
        return None, f"TDX: {t.reports} exists but {guest} does not (not a TDX guest?)"
    return t, f"TDX guest with configfs-tsm at {t.reports}"


def detect(root: Path = Path("/")) -> Detection:
    """Look for Gramine SGX first (an enclave inside a TD would quote as SGX), then a TDX guest."""
    root = Path(root)
    g, g_reason = _gramine(root)
    if g is not None:
        return Detection(g, g_reason)
    t, t_reason = _tdx(root)
    if t is not None:
        return Detection(t, t_reason)
    return Detection(None, f"{g_reason}; {t_reason}")


def resolve_tee(choice: str, root: Path = Path("/")) -> Detection | Literal["sim"]:
    """`--tee` as the operator chose it: sim, sgx, tdx or auto (hardware or an error, never the sim)."""
    if choice not in TEE_CHOICES:
        raise ConfigError(f"--tee must be one of {', '.join(TEE_CHOICES)}, not {choice!r}")
    if choice == "sim":
        return "sim"
    if choice == "auto":
        found = detect(root)
        if found.producer is None:
            raise ConfigError(f"{NO_HARDWARE} ({found.reason})")
        return found
    producer, reason = (_gramine if choice == "sgx" else _tdx)(Path(root))
    if producer is None:
        raise ConfigError(f"--tee {choice}: {reason}")
    return Detection(producer, reason)
