"""`constmig attest` as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from constmig.errors import ConfigError
from constmig.tee.attest_cli import parse_time

V = Path(__file__).parent / "vectors"
SGX_ARGS = [str(V / "sgx_quote"), "--collateral", str(V / "sgx_quote_collateral.json"), "--at", "2025-07-04"]
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def cm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", "attest", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def one_line_error(p: subprocess.CompletedProcess, fragment: str) -> None:
    assert p.returncode != 0 and p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], p.stderr


def test_accepted_prints_decision_and_fields() -> None:
    p = cm("verify", *SGX_ARGS, "--accept-tcb", "ConfigurationAndSWHardeningNeeded", "--expect-mrenclave", MRENCLAVE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("accepted: SGX quote verified at 2025-07-04T00:00:00Z, TCB status "
                               "ConfigurationAndSWHardeningNeeded")
    assert MRENCLAVE in p.stdout and "INTEL-SA-00289" in p.stdout


def test_accepted_json_for_tdx_with_a_folder_of_collateral() -> None:
    p = cm("verify", str(V / "tdx_quote"), "--collateral", str(V), "--at", "1751624163", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["decision"] == "accepted" and doc["tee"] == "tdx" and doc["tcb_status"] == "UpToDate"
    assert doc["fields"]["mr_td"].startswith("91eb2b44d141d4ec")


@pytest.mark.adversarial
@pytest.mark.parametrize("extra,fragment", [
    ([], "TCB status ConfigurationAndSWHardeningNeeded is not accepted (advisories INTEL-SA-00289"),
    (["--accept-tcb", "ConfigurationAndSWHardeningNeeded", "--expect-mrenclave", "00" * 32], "MRENCLAVE"),
    (["--accept-tcb", "ConfigurationAndSWHardeningNeeded", "--expect-mrsigner", "00" * 32], "MRSIGNER"),
    (["--accept-tcb", "ConfigurationAndSWHardeningNeeded", "--min-svn", "3"], "ISV SVN 0 is below"),
    (["--expect-mrtd", "00" * 48], "policy expects a TDX quote"),
    (["--accept-tcb", "ConfigurationAndSWHardeningNeeded", "--min-tcb-evaluation", "18"],
     "TCB evaluation 17, older than the policy's floor 18"),
])
def test_refused_is_one_line(extra: list[str], fragment: str) -> None:
    one_line_error(cm("verify", *SGX_ARGS, *extra), fragment)


@pytest.mark.adversarial
def test_expired_collateral_is_refused() -> None:
    one_line_error(cm("verify", *SGX_ARGS[:-1], "2025-08-01T00:00:00Z"),
                   "quote verification failed at 2025-08-01T00:00:00Z: TCBInfo expired")


@pytest.mark.parametrize("args,fragment", [
    (["verify", "/nonexistent/quote", "--collateral", str(V), "--at", "1"], "cannot read quote"),
    (["verify", str(V / "sgx_quote"), "--collateral", "/nonexistent.json", "--at", "1"], "does not exist"),
    (["verify", str(V / "sgx_quote"), "--at", "1"], "--collateral FILE (or folder) is required"),
    (["verify", *SGX_ARGS[:-1], "next tuesday"], "is neither unix seconds nor an ISO-8601"),
    (["verify", *SGX_ARGS, "--expect-mrenclave", "zz"], "--expect-mrenclave is not hex"),
    (["verify", *SGX_ARGS, "--expect-mrenclave", "00"], "must be 32 bytes"),
    (["verify", *SGX_ARGS, "--accept-tcb", "Fine"], "unknown TCB status 'Fine'"),
    (["verify", *SGX_ARGS, "--min-svn", "-1"], "--min-svn must be"),
    (["verify", *SGX_ARGS, "--min-tcb-evaluation", "x"], "--min-tcb-evaluation must be"),
    (["verify", str(V / "README.md"), "--collateral", str(V), "--at", "1"], "malformed DCAP quote"),
    (["verify", str(V / "sgx_quote"), "--collateral", str(V / "README.md"), "--at", "1"], "not DCAP collateral"),
])
def test_bad_input_is_one_line(args: list[str], fragment: str) -> None:
    one_line_error(cm(*args), fragment)


def test_detect_auto_on_a_bare_machine_is_an_error(tmp_path: Path) -> None:
    one_line_error(cm("detect", "--root", str(tmp_path)), "no SGX (Gramine /dev/attestation) or TDX (configfs-tsm) "
                   "found; use --tee sim for the software TEE")
    p = cm("detect", "--tee", "sim", "--root", str(tmp_path))
    assert p.returncode == 0 and p.stdout.startswith("sim:")


@pytest.mark.parametrize("text,unix", [
    ("1751626571", 1751626571), ("2025-07-04", 1751587200), ("2025-07-04T10:56:11Z", 1751626571),
    ("2025-07-04T12:56:11+02:00", 1751626571), ("2025-07-04T10:56:11", 1751626571),
])
def test_parse_time(text: str, unix: int) -> None:
    assert parse_time(text) == unix


def test_parse_time_refuses_junk() -> None:
    with pytest.raises(ConfigError):
        parse_time("-5")
