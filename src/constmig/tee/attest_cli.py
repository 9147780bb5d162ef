"""`constmig attest ...`: verify a DCAP quote from the shell; say which TEE this machine offers.

Options are taken as strings and parsed here, so a bad value is one `error:` line and exit 1 (the main
group's rule, which this group also applies when run on its own) rather than click's usage text.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

from constmig.errors import ConfigError
from constmig.tee.dcap import TCB_STATUSES, CollateralStore, DcapPolicy, DcapResult, iso_utc, verify_dcap
from constmig.tee.producers import TEE_CHOICES, resolve_tee


def parse_time(text: str) -> int:
    """Unix seconds, or an ISO-8601 date or date-time (UTC unless it names an offset)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--at {text[:40]!r} is neither unix seconds nor an ISO-8601 date/time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def _hex(option: str, value: str | None, size: int) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"{option} is not hex: {value[:40]!r}") from None
    if len(raw) != size:
        raise ConfigError(f"{option} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


def _read_quote(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read quote {path}: {e.strerror or e}") from None


def _show(result: DcapResult) -> None:
    doc = result.to_json()
    click.echo(f"accepted: {result.tee.upper()} quote verified at {doc['verified_at']}, "
               f"TCB status {result.tcb_status}")
    if result.advisories:
        click.echo(f"  advisories       {', '.join(result.advisories)}")
    rows = {"fmspc": doc["fmspc"], "ppid": doc["ppid"], "debug": str(doc["debug"]).lower(), **doc["fields"],
            "report_data": doc["report_data"]}
    for k, v in rows.items():
        click.echo(f"  {k:<16} {v}")


@click.group(name="attest")  # errors: one line via constmig.cli.Main
def attest() -> None:
    """Hardware attestation: verify DCAP quotes, detect the machine's TEE."""


@attest.command("verify")
@click.argument("quote")
@click.option("--collateral", default=None, help="Collateral JSON file, or a folder of them (picked by FMSPC).")
@click.option("--at", "at", default=None, help="Verification time: unix seconds or ISO-8601 [default: now].")
@click.option("--expect-mrenclave", default=None, help="SGX: expected MRENCLAVE (64 hex digits).")
@click.option("--expect-mrsigner", default=None, help="SGX: expected MRSIGNER (64 hex digits).")
@click.option("--min-svn", default=None, help="SGX: minimum ISV SVN.")
@click.option("--expect-mrtd", default=None, help="TDX: expected MRTD (96 hex digits).")
@click.option("--allow-debug", is_flag=True, help="Accept debug enclaves/TDs (their memory is host-readable).")
@click.option("--accept-tcb", multiple=True,
              help=f"Accept this TCB status too (repeatable) [always: UpToDate]; one of {', '.join(TCB_STATUSES)}.")
@click.option("--min-tcb-evaluation", default=None,
              help="Refuse collateral older than this TCB recovery (tcbEvaluationDataNumber), even while valid.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision and fields as JSON.")
def verify_cmd(quote: str, collateral: str | None, at: str | None, expect_mrenclave: str | None,
               expect_mrsigner: str | None, min_svn: str | None, expect_mrtd: str | None, allow_debug: bool,
               accept_tcb: tuple[str, ...], min_tcb_evaluation: str | None, as_json: bool) -> None:
    """Verify the DCAP quote in file QUOTE; exit 0 only if it verifies and the policy accepts it."""
    if collateral is None:
        raise ConfigError("--collateral FILE (or folder) is required")
    when = parse_time(at) if at is not None else int(dt.datetime.now(dt.UTC).timestamp())
    if min_svn is not None and not min_svn.isdigit():
        raise ConfigError(f"--min-svn must be a non-negative integer, not {min_svn[:20]!r}")
    if min_tcb_evaluation is not None and not min_tcb_evaluation.isdigit():
        raise ConfigError(f"--min-tcb-evaluation must be a non-negative integer, not {min_tcb_evaluation[:20]!r}")
    accepted = {"UpToDate", *(s.strip() for a in accept_tcb for s in a.split(",") if s.strip())}
    policy = DcapPolicy(mrenclave=_hex("--expect-mrenclave", expect_mrenclave, 32),
                        mrsigner=_hex("--expect-mrsigner", expect_mrsigner, 32),
                        min_isv_svn=int(min_svn or 0), mrtd=_hex("--expect-mrtd", expect_mrtd, 48),
                        allow_debug=allow_debug, accepted_tcb=frozenset(accepted),
                        min_tcb_evaluation=int(min_tcb_evaluation or 0))
    raw = _read_quote(quote)
    result = verify_dcap(raw, CollateralStore(Path(collateral)).for_quote(raw), when, policy)
    if as_json:
        click.echo(json.dumps({"decision": "accepted", **result.to_json()}, indent=2))
    else:
        _show(result)
        if not policy.expects(result.tee):
            click.echo(f"  note: no expected code identity was given; only signature, TCB and debug were "
                       f"checked (at {iso_utc(when)})")


@attest.command("detect")
@click.option("--tee", default="auto", show_default=True, help=f"One of {', '.join(TEE_CHOICES)}.")
@click.option("--root", default="/", hidden=True, help="Root of the tree to look in (tests).")
def detect_cmd(tee: str, root: str) -> None:
    """Say which TEE `--tee` selects on this machine; `auto` never falls back to the sim."""
    found = resolve_tee(tee, Path(root))
    click.echo("sim: software TEE (no hardware protection)" if found == "sim" else f"{found.kind}: {found.reason}")
