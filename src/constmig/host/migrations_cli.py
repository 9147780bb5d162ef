"""`constmig migrations ls|show|cancel`: the migration records in the fleet's store (host/records.py),
with their phases and figures; a cancel is a signed `abort` the source agent acts on."""

from __future__ import annotations

import json
import time

import click

from constmig.errors import ConfigError
from constmig.options import etcd_option


def _need(etcd: str | None) -> str:
    if etcd is None:
        raise ConfigError("migration records live in the fleet directory: --etcd URL (or set CONSTMIG_ETCD)")
    return etcd


@click.group()
def migrations() -> None:
    """Migration records in the fleet directory: what the agents were asked to move, and how it went."""


@migrations.command("ls")
@etcd_option()
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def ls(etcd: str | None, as_json: bool) -> None:
    """Every record: id, enclave, from, to, phase, outcome, bytes left, why it failed."""
    from constmig.host import marks, records

    rows = [records.summary(r) for r in marks.all_records(_need(etcd))]
    rows.sort(key=lambda r: str(r["id"]))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from constmig.units import format_size

    table = Table(title=f"{len(rows)} migration records")
    for col in ("id", "enclave", "from", "to", "phase", "outcome", "left", "reason"):
        table.add_column(col, **({"no_wrap": True} if col in ("id", "phase") else {"overflow": "fold"}))
    for r in rows:
        left = r["left_bytes"]
        table.add_row(str(r["id"]), str(r["enclave"]), str(r["from"]), str(r["to"]), r["phase"], r["outcome"],
                      format_size(int(left)) if isinstance(left, int) else "", str(r["reason"])[:200])
    Console().print(table)


@migrations.command()
@click.argument("rid", metavar="ID")
@etcd_option()
def show(rid: str, etcd: str | None) -> None:
    """One record in full: its spec, who signed it, its status (phase times, progress, outcome)."""
    from constmig.host import marks

    rec = marks.one_record(_need(etcd), rid)
    sig = rec.get("signature") or {}
    shown = {**rec, "signature": {"signer": _signer(sig), "sig": sig.get("sig")}}
    if isinstance(rec.get("abort"), dict):
        shown["abort"] = {k: v for k, v in rec["abort"].items() if k != "signature"}
    click.echo(json.dumps(shown, indent=2, sort_keys=True))


def _signer(sig: dict) -> str:
    """Who the certificate attached to a signature names (not a verdict: the agent verifies)."""
    from cryptography import x509

    from constmig.host.pki import subject_role

    try:
        role, name = subject_role(x509.load_pem_x509_certificate(str(sig.get("cert", "")).encode()))
    except ValueError:
        return "(no certificate)"
    return f"{role} {name}"


@migrations.command()
@click.argument("rid", metavar="ID")
@etcd_option()
@click.option("--wait", "wait_s", type=click.FloatRange(0, 600), default=15.0, show_default=True,
              help="Seconds to wait for the source agent's answer.")
def cancel(rid: str, etcd: str | None, wait_s: float) -> None:
    """Ask the source agent to cancel migration ID: one not started is cancelled, one running rolls back if
    it has not reached its commit point (past it, it goes on); the record says which."""
    from constmig.host import marks, records

    url = _need(etcd)
    rec = marks.cancel(url, rid)
    at = rec["abort"]["at"]
    deadline = time.monotonic() + wait_s
    while True:
        st = rec.get("status") or {}
        if st.get("abort_at") == at and st.get("abort") != "asked" or records.phase_of(st) in records.FINAL:
            break
        if time.monotonic() > deadline:
            click.echo(f"cancel of {rid} written; its source agent has not answered yet (see `constmig migrations "
                       f"show {rid}`)")
            return
        time.sleep(0.2)
        rec = marks.one_record(url, rid)
    st = rec.get("status") or {}
    click.echo(f"{rid}: {records.phase_of(st).value}"
               + (f" ({st['outcome']})" if st.get("outcome") else "")
               + (f"; cancel {st['abort']}" if st.get("abort") else ""))
    if str(st.get("abort", "")).startswith("refused"):
        raise ConfigError(f"the cancel of {rid} was {st['abort']}")
