"""Verify Intel DCAP quotes (SGX v3, TDX v4) with the maintained `dcap-qvl` library, then apply a policy.

dcap-qvl checks everything cryptographic: the PCK certificate chain up to Intel's root, the CRLs, the
QE report and its signature, the attestation key binding, the quote signature over header and report,
and the platform's TCB level against signed TCB info, all at a caller-given time. We never parse X.509
or ECDSA ourselves; we read the report fields from the report the library verified and judge them.

A policy judges the *signed report fields*, never the raw quote bytes: some bytes of a quote are covered
by no signature (padding after the signature data, the copy of Intel's root certificate, PEM line breaks),
so two quotes that differ there verify alike.

Mapping into the project's `Identity` (so the handshake's `Policy` can compare peers):
- SGX: measurement = MRENCLAVE, signer = MRSIGNER, product_id = ISVPRODID, svn = ISVSVN.
- TDX: measurement = SHA-256 over a label, MRTD and RTMR0..2 (firmware, then kernel/boot chain; RTMR3 is
  extended at run time, so it is left out); signer = SHA-256 over a label, MRCONFIGID, MROWNER and
  MROWNERCONFIG; product_id = svn = 0 (a TD has no ISV SVN; its TCB level is judged by the TCB status).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dcap_qvl

from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import MAX_QUOTE_SIZE, Identity, VerifiedQuote
from constmig.units import one_line, short_hex

MAX_COLLATERAL_SIZE = 1 << 20
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")
_SGX_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1 (byte 0)
_TDX_DEBUG = 0x01  # TD_ATTRIBUTES bit 0 (byte 0)
_TDX_MEASUREMENT = b"constmig-tdx-measurement-v1\x00"
_TDX_SIGNER = b"constmig-tdx-signer-v1\x00"
_SGX_FIELDS = ("mr_enclave", "mr_signer", "attributes", "cpu_svn", "misc_select", "isv_prod_id", "isv_svn")
_TDX_FIELDS = ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3", "mr_config_id", "mr_owner", "mr_owner_config",
               "td_attributes", "xfam", "tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes")

Tee = Literal["sgx", "tdx"]


def iso_utc(unix: int) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- result --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DcapResult:
    """What a verified quote says. Byte fields are bytes here; `to_json` gives them as hex."""

    tee: Tee
    tcb_status: str
    advisories: tuple[str, ...]
    report_data: bytes
    fields: Mapping[str, bytes | int]  # the signed report's fields, names as dcap-qvl spells them
    fmspc: str
    ppid: str
    verified_at: int
    tcb_evaluation: int = 0  # the lower tcbEvaluationDataNumber of the signed TCB info and QE identity

    @property
    def debug(self) -> bool:
        if self.tee == "sgx":
            return bool(self._b("attributes")[0] & _SGX_DEBUG)
        return bool(self._b("td_attributes")[0] & _TDX_DEBUG)

    def _b(self, name: str) -> bytes:
        value = self.fields[name]
        assert isinstance(value, bytes)
        return value

    def identity(self) -> Identity:
        """The enclave/TD identity in the project's 32-byte shape (see the module docstring)."""
        if self.tee == "sgx":
            prod, svn = self.fields["isv_prod_id"], self.fields["isv_svn"]
            assert isinstance(prod, int) and isinstance(svn, int)
            return Identity(self._b("mr_enclave"), self._b("mr_signer"), prod, svn)
        measurement = hashlib.sha256(_TDX_MEASUREMENT + b"".join(
            self._b(n) for n in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2"))).digest()
        signer = hashlib.sha256(_TDX_SIGNER + b"".join(
            self._b(n) for n in ("mr_config_id", "mr_owner", "mr_owner_config"))).digest()
        return Identity(measurement, signer, 0, 0)

    def verified_quote(self) -> VerifiedQuote:
        return VerifiedQuote(identity=self.identity(), report_data=self.report_data,
                             platform_id=f"dcap-{self.tee}:{self.ppid}", backend=f"dcap-{self.tee}")

    def to_json(self) -> dict[str, Any]:
        return {
            "tee": self.tee, "tcb_status": self.tcb_status, "advisories": list(self.advisories),
            "debug": self.debug, "report_data": self.report_data.hex(), "fmspc": self.fmspc, "ppid": self.ppid,
            "verified_at": iso_utc(self.verified_at), "tcb_evaluation": self.tcb_evaluation,
            "fields": {k: v.hex() if isinstance(v, bytes) else v for k, v in self.fields.items()},
        }


# --- policy --------------------------------------------------------------------------------------------

def _check_len(name: str, value: bytes | None, size: int) -> None:
    if value is not None and (not isinstance(value, bytes) or len(value) != size):
        raise ConfigError(f"policy {name} must be {size} bytes ({2 * size} hex digits)")


@dataclass(frozen=True)
class DcapPolicy:
    """What a verifier accepts. None means "not checked"; defaults refuse debug and any TCB but UpToDate.

    SGX: mrenclave (code), mrsigner (who signed it), isv_prod_id, min_isv_svn.
    TDX: mrtd (initial TD image) plus rtmrs {index: value} for the boot chain; mrconfigid / mrowner (the
    owner-chosen fields, for the "signer" role). Setting any SGX field refuses TDX quotes and vice versa.
    """

    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    mrtd: bytes | None = None
    rtmrs: Mapping[int, bytes] = field(default_factory=dict)
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    allow_debug: bool = False
    accepted_tcb: frozenset[str] = frozenset({"UpToDate"})
    # Freshness floor: collateral from before Intel's TCB recovery number N (tcbEvaluationDataNumber) is
    # refused even while still inside its validity, so a host cannot serve an older, still-valid TCB view.
    min_tcb_evaluation: int = 0

    def __post_init__(self) -> None:
        for name in ("mrenclave", "mrsigner"):
            _check_len(name, getattr(self, name), 32)
        for name in ("mrtd", "mrconfigid", "mrowner"):
            _check_len(name, getattr(self, name), 48)
        for i, v in self.rtmrs.items():
            if i not in range(4):
                raise ConfigError(f"policy RTMR index must be 0..3, not {i}")
            _check_len(f"RTMR{i}", v, 48)
        for name in ("isv_prod_id", "min_isv_svn", "min_tcb_evaluation"):
            v = getattr(self, name)
            if v is not None and not (type(v) is int and 0 <= v <= 0xFFFF):
                raise ConfigError(f"policy {name} must be in 0..65535, not {v!r}")
        if isinstance(self.accepted_tcb, str):
            raise ConfigError("policy accepted_tcb must be a set of statuses, not one string")
        accepted = frozenset(self.accepted_tcb)
        unknown = sorted(accepted - set(TCB_STATUSES))
        if unknown:
            raise ConfigError(f"unknown TCB status {unknown[0]!r}; known: {', '.join(TCB_STATUSES)}")
        if "Revoked" in accepted:
            raise ConfigError("TCB status Revoked can never be accepted")
        if not accepted:
            raise ConfigError("policy accepts no TCB status at all")
        object.__setattr__(self, "accepted_tcb", accepted)
        object.__setattr__(self, "rtmrs", dict(self.rtmrs))
        if self.expects("sgx") and self.expects("tdx"):
            raise ConfigError("policy mixes SGX (MRENCLAVE/MRSIGNER/ISV) and TDX (MRTD/RTMR/owner) expectations")

    def expects(self, tee: Tee) -> bool:
        """Whether the policy names fields only a quote of this TEE type has."""
        if tee == "sgx":
            return any(v is not None for v in (self.mrenclave, self.mrsigner, self.isv_prod_id)) \
                or self.min_isv_svn > 0
        return self.mrtd is not None or bool(self.rtmrs) or self.mrconfigid is not None or self.mrowner is not None

    def check(self, r: DcapResult) -> None:
        """Raise AttestationError with one line naming the first check `r` fails."""
        other: Tee = "tdx" if r.tee == "sgx" else "sgx"
        if self.expects(other):
            raise AttestationError(f"policy expects a {other.upper()} quote, got a {r.tee.upper()} quote")
        what = f"{r.tee.upper()} quote"

        def same(label: str, name: str, expected: bytes | None) -> None:
            got = r.fields[name]
            assert isinstance(got, bytes)
            if expected is not None and got != expected:
                raise AttestationError(f"{what}: {label} {short_hex(got)} differs from the expected {short_hex(expected)}")

        if r.tee == "sgx":
            same("MRENCLAVE", "mr_enclave", self.mrenclave)
            same("MRSIGNER", "mr_signer", self.mrsigner)
            prod, svn = r.fields["isv_prod_id"], r.fields["isv_svn"]
            assert isinstance(prod, int) and isinstance(svn, int)
            if self.isv_prod_id is not None and prod != self.isv_prod_id:
                raise AttestationError(f"{what}: ISVPRODID {prod} differs from the expected {self.isv_prod_id}")
            if svn < self.min_isv_svn:
                raise AttestationError(f"{what}: ISV SVN {svn} is below the policy minimum {self.min_isv_svn}")
        else:
            same("MRTD", "mr_td", self.mrtd)
            for i, v in sorted(self.rtmrs.items()):
                same(f"RTMR{i}", f"rt_mr{i}", v)
            same("MRCONFIGID", "mr_config_id", self.mrconfigid)
            same("MROWNER", "mr_owner", self.mrowner)
        if r.debug and not self.allow_debug:
            bit = "ATTRIBUTES.DEBUG" if r.tee == "sgx" else "TD_ATTRIBUTES.DEBUG"
            raise AttestationError(f"{what}: debug mode ({bit} set): the host can read its memory; "
                                   "debug is not allowed")
        if r.tcb_evaluation < self.min_tcb_evaluation:
            raise AttestationError(f"collateral is from TCB evaluation {r.tcb_evaluation}, older than the policy's "
                                   f"floor {self.min_tcb_evaluation}: fetch current collateral")
        if r.tcb_status not in self.accepted_tcb:
            adv = f"advisories {', '.join(r.advisories)}" if r.advisories else "no advisories"
            raise AttestationError(f"TCB status {r.tcb_status} is not accepted ({adv}); accepted: "
                                   f"{', '.join(sorted(self.accepted_tcb))}")


# --- verification --------------------------------------------------------------------------------------

def parse_collateral(text: str, origin: str = "collateral") -> tuple[Any, Tee, str]:
    """(dcap-qvl collateral, TEE type, FMSPC) from collateral JSON; ConfigError if it is not collateral."""
    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(text)
        info = json.loads(collateral.tcb_info)
        tee_id, fmspc = info["id"], info["fmspc"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{origin} is not DCAP collateral JSON: {one_line(str(e), 160)}") from None
    if tee_id not in ("SGX", "TDX") or not isinstance(fmspc, str):
        raise ConfigError(f"{origin}: TCB info is for {str(tee_id)[:20]!r}, not SGX or TDX")
    return collateral, tee_id.lower(), fmspc.upper()


def _tcb_evaluation(collateral: Any) -> int:
    """The lower tcbEvaluationDataNumber of the TCB info and the QE identity (both signed by Intel, and
    dcap-qvl checked the signatures by now)."""
    try:
        return min(int(json.loads(collateral.tcb_info)["tcbEvaluationDataNumber"]),
                   int(json.loads(collateral.qe_identity)["tcbEvaluationDataNumber"]))
    except (ValueError, KeyError, TypeError) as e:
        raise AttestationError(f"collateral has no TCB evaluation number: {one_line(str(e), 160)}") from None


def _quote_bytes(quote: Any) -> bytes:
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise AttestationError(f"quote must be bytes, not {type(quote).__name__}")
    if len(quote) > MAX_QUOTE_SIZE:
        raise AttestationError(f"quote is {len(quote)} bytes, more than the {MAX_QUOTE_SIZE} allowed")
    return bytes(quote)


def quote_platform(quote: bytes) -> tuple[Tee, str]:
    """(TEE type, FMSPC) of an unverified quote: only to pick collateral, never to accept anything."""
    try:
        parsed = dcap_qvl.parse_quote(_quote_bytes(quote))
        return ("tdx" if parsed.is_tdx() else "sgx"), parsed.fmspc().upper()
    except ValueError as e:
        raise AttestationError(f"malformed DCAP quote: {one_line(str(e), 160)}") from None


def _report_fields(report_json: str) -> tuple[Tee, dict[str, bytes | int], bytes]:
    """The verified report's fields from dcap-qvl's JSON (it has ISVPRODID/ISVSVN, parse_quote does not)."""
    try:
        (kind, body), = json.loads(report_json)["report"].items()
        tee: Tee = "sgx" if kind == "SgxEnclave" else "tdx"
        if tee == "tdx" and not kind.startswith("TD"):
            raise ValueError(f"report type {kind[:20]!r}")
        names = _SGX_FIELDS if tee == "sgx" else _TDX_FIELDS
        out = {n: body[n] if isinstance(body[n], int) else bytes.fromhex(body[n]) for n in names}
        return tee, out, bytes.fromhex(body["report_data"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AttestationError(f"cannot read the verified report dcap-qvl returned: {one_line(repr(e), 160)}") \
            from None


def verify_dcap(quote: bytes, collateral_json_text: str, at_unix_time: int, policy: DcapPolicy) -> DcapResult:
    """Verify `quote` with its collateral as of `at_unix_time`, then apply `policy`.

    Any refusal is AttestationError with one line naming the failed check; bad collateral is ConfigError.
    """
    if type(at_unix_time) is not int or at_unix_time < 0:
        raise ConfigError(f"verification time must be non-negative unix seconds, not {at_unix_time!r}")
    quote = _quote_bytes(quote)
    collateral, c_tee, c_fmspc = parse_collateral(collateral_json_text)
    q_tee, q_fmspc = quote_platform(quote)
    if (q_tee, q_fmspc) != (c_tee, c_fmspc):
        raise AttestationError(f"collateral is for {c_tee.upper()} FMSPC {c_fmspc}, the quote is "
                               f"{q_tee.upper()} FMSPC {q_fmspc}")
    try:
        verified = dcap_qvl.verify(quote, collateral, at_unix_time)
    except BaseException as e:  # ValueError normally; a Rust panic surfaces as BaseException: fail closed
        if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        reason = str(e).removeprefix("Verification failed:").strip() or type(e).__name__
        raise AttestationError(f"quote verification failed at {iso_utc(at_unix_time)}: "
                               f"{one_line(reason)}") from None
    tee, fields, report_data = _report_fields(verified.to_json())
    if tee != q_tee:
        raise AttestationError(f"quote header says {q_tee.upper()} but its report is {tee.upper()}")
    result = DcapResult(tee=tee, tcb_status=verified.status, advisories=tuple(verified.advisory_ids),
                        report_data=report_data, fields=fields, fmspc=q_fmspc, ppid=bytes(verified.ppid).hex(),
                        verified_at=at_unix_time, tcb_evaluation=_tcb_evaluation(collateral))
    policy.check(result)
    return result


# --- collateral store and the verifier the backend interface uses --------------------------------------

def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_COLLATERAL_SIZE:
            raise ConfigError(f"{path} is larger than {MAX_COLLATERAL_SIZE} bytes; not collateral")
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read collateral {path}: {getattr(e, 'strerror', None) or e}") from None


class CollateralStore:
    """Collateral from one JSON file, or a directory of them picked by the quote's TEE type and FMSPC."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._by_platform: dict[tuple[Tee, str], str] = {}
        self._single: str | None = None
        if self.path.is_dir():
            for f in sorted(self.path.glob("*.json")):
                text = _read_text(f)
                _, tee, fmspc = parse_collateral(text, str(f))
                if (tee, fmspc) in self._by_platform:
                    raise ConfigError(f"{self.path} holds two collateral files for {tee.upper()} FMSPC {fmspc}")
                self._by_platform[(tee, fmspc)] = text
            if not self._by_platform:
                raise ConfigError(f"no collateral (*.json) in {self.path}")
        elif self.path.exists():
            self._single = _read_text(self.path)
            parse_collateral(self._single, str(self.path))
        else:
            raise ConfigError(f"collateral {self.path} does not exist")

    def for_quote(self, quote: bytes) -> str:
        if self._single is not None:
            return self._single
        tee, fmspc = quote_platform(quote)
        try:
            return self._by_platform[(tee, fmspc)]
        except KeyError:
            raise AttestationError(f"no collateral for {tee.upper()} FMSPC {fmspc} in {self.path}") from None


class DcapVerifier:
    """`verify(quote) -> VerifiedQuote` for DCAP quotes, as `SimPlatform.verify` is for sim quotes."""

    def __init__(self, collateral: Path | CollateralStore, policy: DcapPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.collateral = collateral if isinstance(collateral, CollateralStore) else CollateralStore(collateral)
        self.policy = policy or DcapPolicy()
        self.clock = clock

    def check(self, quote: bytes) -> DcapResult:
        quote = _quote_bytes(quote)
        return verify_dcap(quote, self.collateral.for_quote(quote), int(self.clock()), self.policy)

    def verify(self, quote: bytes) -> VerifiedQuote:
        return self.check(quote).verified_quote()
