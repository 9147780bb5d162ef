"""DCAP verification on real recorded SGX and TDX quotes (tests/tee/vectors, see its README).

The library (dcap-qvl) runs for real; nothing is mocked. Times are fixed inside the collateral's validity
(TCB info issued 2025-06-19, next update 2025-07-19), since the recorded collateral has long expired.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import struct
from pathlib import Path

import dcap_qvl
import pytest

from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import Identity, VerifiedQuote
from constmig.tee.dcap import (
    CollateralStore,
    DcapPolicy,
    DcapResult,
    DcapVerifier,
    verify_dcap,
)

VECTORS = Path(__file__).parent / "vectors"
SGX_AT, TDX_AT = 1751626571, 1751624163  # 2025-07-04, inside both collaterals' validity
BEFORE_ISSUE, AFTER_EXPIRY = 1750204800, 1752969600  # 2025-06-18, 2025-07-20 (UTC midnight)
SGX_TCB = frozenset({"UpToDate", "ConfigurationAndSWHardeningNeeded"})  # the SGX vector's platform status

SGX_EXPECT = {
    "mr_enclave": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
    "mr_signer": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
    "attributes": "0500000000000000e700000000000000", "isv_prod_id": 0, "isv_svn": 0,
}
TDX_EXPECT = {
    "mr_td": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
    "rt_mr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0",
    "rt_mr1": "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378",
    "rt_mr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132",
    "td_attributes": "0000001000000000", "mr_owner": "00" * 48,
}


def quote(tee: str) -> bytes:
    return (VECTORS / f"{tee}_quote").read_bytes()


def collateral(tee: str) -> str:
    return (VECTORS / f"{tee}_quote_collateral.json").read_text()


SGX_POLICY = DcapPolicy(mrenclave=bytes.fromhex(SGX_EXPECT["mr_enclave"]),
                        mrsigner=bytes.fromhex(SGX_EXPECT["mr_signer"]), isv_prod_id=0, accepted_tcb=SGX_TCB)
TDX_POLICY = DcapPolicy(mrtd=bytes.fromhex(TDX_EXPECT["mr_td"]),
                        rtmrs={i: bytes.fromhex(TDX_EXPECT[f"rt_mr{i}"]) for i in range(3)},
                        mrowner=bytes(48))
CASES = {"sgx": (SGX_AT, SGX_POLICY), "tdx": (TDX_AT, TDX_POLICY)}


def refused(fn, *args, match: str, exc: type[Exception] = AttestationError) -> str:
    with pytest.raises(exc) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


# --- accepted -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_vector_verifies_and_fields_match_the_policy_values(tee: str) -> None:
    at, policy = CASES[tee]
    r = verify_dcap(quote(tee), collateral(tee), at, policy)
    expect = SGX_EXPECT if tee == "sgx" else TDX_EXPECT
    assert r.tee == tee and r.verified_at == at and not r.debug
    for name, value in expect.items():
        got = r.fields[name]
        assert (got.hex() if isinstance(got, bytes) else got) == value, name
    assert r.report_data == bytes(dcap_qvl.parse_quote(quote(tee)).report.report_data)
    assert r.to_json()["fields"]["mr_td" if tee == "tdx" else "mr_enclave"] == expect[
        "mr_td" if tee == "tdx" else "mr_enclave"]


def test_statuses_and_advisories_are_reported() -> None:
    sgx = verify_dcap(quote("sgx"), collateral("sgx"), SGX_AT, SGX_POLICY)
    assert sgx.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert sgx.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    tdx = verify_dcap(quote("tdx"), collateral("tdx"), TDX_AT, TDX_POLICY)
    assert (tdx.tcb_status, tdx.advisories) == ("UpToDate", ())


def test_identity_mapping() -> None:
    sgx = verify_dcap(quote("sgx"), collateral("sgx"), SGX_AT, SGX_POLICY).verified_quote()
    assert sgx.identity == Identity(bytes.fromhex(SGX_EXPECT["mr_enclave"]), bytes.fromhex(SGX_EXPECT["mr_signer"]),
                                    0, 0)
    assert sgx.backend == "dcap-sgx" and sgx.platform_id.startswith("dcap-sgx:") and sgx.report_data[:13] == \
        b"Hello, world!"
    tdx = verify_dcap(quote("tdx"), collateral("tdx"), TDX_AT, TDX_POLICY).verified_quote()
    chain = b"".join(bytes.fromhex(TDX_EXPECT[n]) for n in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2"))
    assert tdx.identity.measurement == hashlib.sha256(b"constmig-tdx-measurement-v1\x00" + chain).digest()
    assert tdx.identity.signer == hashlib.sha256(b"constmig-tdx-signer-v1\x00" + bytes(3 * 48)).digest()
    assert (tdx.identity.product_id, tdx.identity.svn, tdx.backend) == (0, 0, "dcap-tdx")


def test_verifier_picks_collateral_by_fmspc_from_a_folder() -> None:
    v = DcapVerifier(VECTORS, DcapPolicy(accepted_tcb=SGX_TCB), clock=lambda: SGX_AT)
    assert v.verify(quote("sgx")).backend == "dcap-sgx"
    assert v.verify(quote("tdx")).backend == "dcap-tdx"


def test_verifier_with_a_folder_lacking_the_platform(tmp_path: Path) -> None:
    (tmp_path / "sgx.json").write_text(collateral("sgx"))
    v = DcapVerifier(tmp_path, clock=lambda: TDX_AT)
    refused(v.verify, quote("tdx"), match=r"^no collateral for TDX FMSPC B0C06F000000 in ")


def test_bad_collateral_is_config_error(tmp_path: Path) -> None:
    refused(verify_dcap, quote("sgx"), "{}", SGX_AT, SGX_POLICY, match="not DCAP collateral", exc=ConfigError)
    refused(CollateralStore, tmp_path / "none.json", match="does not exist", exc=ConfigError)
    refused(CollateralStore, tmp_path, match="no collateral", exc=ConfigError)
    (tmp_path / "a.json").write_text(collateral("sgx"))
    (tmp_path / "b.json").write_text(collateral("sgx"))
    refused(CollateralStore, tmp_path, match="two collateral files for SGX FMSPC", exc=ConfigError)


@pytest.mark.parametrize("kw,match", [
    ({"mrenclave": b"12"}, "mrenclave must be 32 bytes"),
    ({"mrtd": bytes(32)}, "mrtd must be 48 bytes"),
    ({"rtmrs": {4: bytes(48)}}, "RTMR index"),
    ({"min_isv_svn": -1}, "min_isv_svn"),
    ({"min_tcb_evaluation": -1}, "min_tcb_evaluation"),
    ({"min_tcb_evaluation": 1 << 16}, "min_tcb_evaluation"),
    ({"accepted_tcb": frozenset({"UptoDate"})}, "unknown TCB status 'UptoDate'"),
    ({"accepted_tcb": frozenset({"UpToDate", "Revoked"})}, "Revoked can never"),
    ({"accepted_tcb": "UpToDate"}, "not one string"),
    ({"mrenclave": bytes(32), "mrtd": bytes(48)}, "mixes SGX"),
])
def test_bad_policy_is_config_error(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DcapPolicy(**kw)


# --- refused: time and collateral -------------------------------------------------------------------------

@pytest.mark.adversarial
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_collateral_older_than_the_freshness_floor_is_refused(tee: str) -> None:
    """The host serves collateral still inside its validity but from before a TCB recovery the owner
    requires (both vectors are from tcbEvaluationDataNumber 17): refused, naming the floor."""
    at, policy = CASES[tee]
    assert verify_dcap(quote(tee), collateral(tee), at, dataclasses.replace(policy, min_tcb_evaluation=17)).tcb_evaluation == 17
    refused(verify_dcap, quote(tee), collateral(tee), at, dataclasses.replace(policy, min_tcb_evaluation=18),
            match="TCB evaluation 17, older than the policy's floor 18")


@pytest.mark.adversarial
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_refused_after_expiry_and_before_issue(tee: str) -> None:
    _, policy = CASES[tee]
    refused(verify_dcap, quote(tee), collateral(tee), AFTER_EXPIRY, policy,
            match=r"^quote verification failed at 2025-07-20T00:00:00Z: (TCBInfo expired|CrlExpired)")
    refused(verify_dcap, quote(tee), collateral(tee), BEFORE_ISSUE, policy,
            match=r"^quote verification failed at 2025-06-18T00:00:00Z: TCBInfo issue date is in the future")


@pytest.mark.adversarial
@pytest.mark.parametrize("tee,other", [("sgx", "tdx"), ("tdx", "sgx")])
def test_refused_with_the_other_vectors_collateral(tee: str, other: str) -> None:
    at, policy = CASES[tee]
    refused(verify_dcap, quote(tee), collateral(other), at, policy,
            match=rf"^collateral is for {other.upper()} FMSPC \w+, the quote is {tee.upper()} FMSPC")
    with pytest.raises(ValueError):  # our early check is not the only line: the library refuses it too
        dcap_qvl.verify(quote(tee), dcap_qvl.QuoteCollateralV3.from_json(collateral(other)), at)


@pytest.mark.adversarial
@pytest.mark.parametrize("data", [b"", b"\x03\x00" + bytes(100), quote("sgx")[:600], bytes(70_000)])
def test_malformed_quotes_are_refused_in_one_line(data: bytes) -> None:
    refused(verify_dcap, data, collateral("sgx"), SGX_AT, SGX_POLICY, match=r"malformed DCAP quote|more than")


# --- refused: bit flips in signed regions ----------------------------------------------------------------

def signed_regions(q: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges covered by a signature, from the quote layout (SGX v3 / TDX v4, ECDSA-P256 key)."""
    version, = struct.unpack_from("<H", q, 0)
    body = 384 if version == 3 else 584
    sig = 48 + body + 4  # after the 4-byte signature-data length
    regions = {"header": (0, 48), "report body": (48, 48 + body), "quote signature": (sig, sig + 64),
               "attestation key": (sig + 64, sig + 128)}
    qe = sig + 128
    if version == 4:  # TDX v4 wraps the QE report in certification data of type 6
        qe += 6
    auth_len, = struct.unpack_from("<H", q, qe + 448)
    regions |= {"QE report": (qe, qe + 384), "QE report signature": (qe + 384, qe + 448),
                "QE authentication data": (qe + 450, qe + 450 + auth_len)}
    cert_type, cert_size = struct.unpack_from("<HI", q, qe + 450 + auth_len)
    assert cert_type == 5  # PCK certificate chain, PEM
    start = qe + 450 + auth_len + 6
    regions["certification data"] = (start, start + cert_size)
    return regions


def flip(q: bytes, pos: int, bit: int) -> bytes:
    return q[:pos] + bytes([q[pos] ^ (1 << bit)]) + q[pos + 1:]


def flip_in_pck_leaf(q: bytes, start: int, k: int) -> bytes:
    """Flip bit k%8 of byte ~k/n through the DER of the PCK leaf certificate (the first PEM block) and
    re-encode it in place: a change to signed certificate content, not to the PEM text's line breaks."""
    text = q[start:]
    m = re.search(rb"-----BEGIN CERTIFICATE-----\n(.*?)\n-----END CERTIFICATE-----", text, re.S)
    assert m is not None
    der = bytearray(base64.b64decode(m.group(1)))
    der[k] ^= 1 << (k % 8)
    b64 = base64.b64encode(bytes(der))
    pem = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    assert len(pem) == len(m.group(1))
    a, b = start + m.start(1), start + m.end(1)
    return q[:a] + pem + q[b:]


@pytest.mark.adversarial
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_bit_flips_in_each_signed_region_are_refused(tee: str) -> None:
    q, at, policy = quote(tee), *CASES[tee]
    c = collateral(tee)
    lib_collateral = dcap_qvl.QuoteCollateralV3.from_json(c)
    regions = signed_regions(q)
    assert len(regions) == 8
    tried = 0
    for name, (lo, hi) in regions.items():
        if name == "certification data":
            der_len = len(base64.b64decode(re.search(rb"BEGIN CERTIFICATE-----\n(.*?)\n-----END", q[lo:], re.S)
                                           .group(1)))
            variants = [flip_in_pck_leaf(q, lo, k) for k in range(1, der_len, max(1, der_len // 24))]
        else:
            step = max(1, (hi - lo) // 24)
            variants = [flip(q, pos, pos % 8) for pos in range(lo, hi, step)]
        for bad in variants:
            assert bad != q and len(bad) == len(q)
            with pytest.raises(AttestationError) as info:
                verify_dcap(bad, c, at, policy)
            assert "\n" not in str(info.value), (name, str(info.value))
            with pytest.raises(ValueError):  # and the library alone refuses it, not only our early checks
                dcap_qvl.verify(bad, lib_collateral, at)
            tried += 1
    assert tried >= 8 * 20


@pytest.mark.adversarial
def test_unsigned_bytes_exist_so_policies_judge_fields_not_bytes() -> None:
    """The vectors' README: some flips still verify. Here: bytes past the signature data of the TDX quote."""
    q = quote("tdx")
    _, end = signed_regions(q)["certification data"]
    assert end < len(q)
    r = verify_dcap(flip(q, len(q) - 1, 0), collateral("tdx"), TDX_AT, TDX_POLICY)
    assert r.fields == verify_dcap(q, collateral("tdx"), TDX_AT, TDX_POLICY).fields


# --- refused by policy ------------------------------------------------------------------------------------

OTHER32, OTHER48 = bytes(range(32)), bytes(range(48))


@pytest.mark.adversarial
@pytest.mark.parametrize("tee,change,match", [
    ("sgx", {"mrenclave": OTHER32}, r"^SGX quote: MRENCLAVE 33d8736db756ed49… differs from the expected 0001"),
    ("sgx", {"mrsigner": OTHER32}, r"^SGX quote: MRSIGNER 815f42f11cf64430… differs from the expected 0001"),
    ("sgx", {"min_isv_svn": 1}, r"^SGX quote: ISV SVN 0 is below the policy minimum 1$"),
    ("sgx", {"isv_prod_id": 7}, r"^SGX quote: ISVPRODID 0 differs from the expected 7$"),
    ("sgx", {"accepted_tcb": frozenset({"UpToDate"})},
     r"^TCB status ConfigurationAndSWHardeningNeeded is not accepted \(advisories INTEL-SA-00289, "
     r"INTEL-SA-00615\); accepted: UpToDate$"),
    ("tdx", {"mrtd": OTHER48}, r"^TDX quote: MRTD 91eb2b44d141d4ec… differs from the expected 0001"),
    ("tdx", {"rtmrs": {2: OTHER48}}, r"^TDX quote: RTMR2 d833feef2cd94514… differs from the expected 0001"),
    ("tdx", {"mrowner": OTHER48}, r"^TDX quote: MROWNER 0000000000000000… differs from the expected 0001"),
    ("tdx", {"mrconfigid": OTHER48}, r"^TDX quote: MRCONFIGID 0000000000000000… differs"),
])
def test_policy_refusals_name_the_check(tee: str, change: dict, match: str) -> None:
    at, policy = CASES[tee]
    refused(verify_dcap, quote(tee), collateral(tee), at, dataclasses.replace(policy, **change), match=match)


@pytest.mark.adversarial
@pytest.mark.parametrize("tee,policy,match", [
    ("tdx", SGX_POLICY, r"^policy expects a SGX quote, got a TDX quote$"),
    ("sgx", TDX_POLICY, r"^policy expects a TDX quote, got a SGX quote$"),
])
def test_policy_for_the_other_tee_type_refuses(tee: str, policy: DcapPolicy, match: str) -> None:
    refused(verify_dcap, quote(tee), collateral(tee), CASES[tee][0], policy, match=match)


DEBUG_BIT = {"sgx": ("attributes", 48 + 48, 1), "tdx": ("td_attributes", 48 + 120, 0)}  # field, offset, bit


@pytest.mark.adversarial
@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_debug_bit_is_signed_and_refused_by_policy(tee: str) -> None:
    """No recorded debug quote exists, so two honest halves: (1) the DEBUG bit sits in the signed report, and
    setting it in the quote breaks verification; (2) the policy check refuses a verified report whose DEBUG
    bit is set (the real report with only that bit changed), unless allow_debug."""
    field, offset, bit = DEBUG_BIT[tee]
    at, policy = CASES[tee]
    q = quote(tee)
    debug_q = flip(q, offset, bit)
    parsed = getattr(dcap_qvl.parse_quote(debug_q).report, field)
    assert parsed[0] & (1 << bit) and not q[offset] & (1 << bit)  # the offset is the DEBUG bit's
    refused(verify_dcap, debug_q, collateral(tee), at, policy, match=r"^quote verification failed at ")

    real: DcapResult = verify_dcap(q, collateral(tee), at, policy)
    value = bytearray(real.fields[field])
    value[0] |= 1 << bit
    debug = dataclasses.replace(real, fields={**real.fields, field: bytes(value)})
    assert debug.debug
    label = "ATTRIBUTES.DEBUG" if tee == "sgx" else "TD_ATTRIBUTES.DEBUG"
    refused(policy.check, debug, match=rf"^{tee.upper()} quote: debug mode \({label} set\)")
    dataclasses.replace(policy, allow_debug=True).check(debug)
    policy.check(real)


# --- the handshake refuses a replayed hardware quote -------------------------------------------------------

class RecordedDcapBackend:
    """A destination that can only show the recorded SGX quote, whatever the handshake asks it to bind."""

    name = "recorded-dcap"

    def __init__(self, verifier: DcapVerifier) -> None:
        self._verifier = verifier

    def quote(self, identity: Identity, report_data: bytes) -> bytes:
        return quote("sgx")

    def verify(self, q: bytes) -> VerifiedQuote:
        return self._verifier.verify(q)


class SimQuotingDcapVerifying:
    """The source: quotes with the sim platform, verifies its peer's quotes as DCAP quotes."""

    name = "sim+dcap"

    def __init__(self, sim, verifier: DcapVerifier) -> None:
        self._sim, self._verifier = sim, verifier

    def quote(self, identity: Identity, report_data: bytes) -> bytes:
        return self._sim.quote(identity, report_data)

    def verify(self, q: bytes) -> VerifiedQuote:
        return self._verifier.verify(q)


@pytest.mark.adversarial
def test_handshake_refuses_a_replayed_hardware_quote(tmp_path: Path) -> None:
    from constmig.tee.sim import SimPlatform, create_root_ca
    from constmig.wire.handshake import Initiator, Policy, Responder

    create_root_ca(tmp_path / "ca")
    sim = SimPlatform.provision(tmp_path / "a", tmp_path / "ca", "host-a")
    verifier = DcapVerifier(VECTORS / "sgx_quote_collateral.json", SGX_POLICY, clock=lambda: SGX_AT)
    # the vector's own identity: every policy rule but the binding would accept it
    own = verifier.verify(quote("sgx")).identity
    source = Initiator(SimQuotingDcapVerifying(sim, verifier), own, Policy(), {"app": "kv"})  # type: ignore[arg-type]
    dest = Responder(RecordedDcapBackend(verifier), own, Policy())  # type: ignore[arg-type]

    m2 = dest.receive_hello(source.start())
    vq = verifier.verify(quote("sgx"))  # positive control: the quote itself verifies and passes the policy
    Policy().check(own, vq, "destination")
    refused(source.receive_reply, m2, match=r"^destination quote is not bound to this handshake \(report data "
                                            r"mismatch: replayed or tampered\)$")
    assert not source.done
