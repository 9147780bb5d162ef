"""`constmig ca ...`: the fleet's admin CA, and the operator and host certificates that let their holders
administer agents over the network (host/pki.py, host/admin.py).

Arguments are taken as strings and checked here, so a bad value is one `error:` line and exit 1 (the main
group's rule) rather than click's usage text.
"""

from __future__ import annotations

from pathlib import Path

import click

from constmig.client.trust import default_ca_dir
from constmig.errors import ConfigError
from constmig.host import pki

_CA_HELP = "The CA folder the agents share; the admin CA is its admin/ [default: $CONSTMIG_CA_DIR or ~/.constmig/ca]."


def _days(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        days = float(text)
    except ValueError:
        raise ConfigError(f"--days {text[:20]!r} is not a number") from None
    if not 0 < days <= 3650:
        raise ConfigError(f"--days must be more than 0 and at most 3650, not {text}")
    return days


@click.group("ca")
def ca() -> None:
    """The fleet's admin CA: certificates for operators and hosts (mutual TLS to agents' admin requests)."""


@ca.command("init")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None, help=_CA_HELP)
@click.option("--renew", is_flag=True, help="Replace the admin CA: every certificate issued so far stops working "
              "once the agents restart (those with the CA's key issue themselves new host certificates).")
def init(ca_dir: Path | None, renew: bool) -> None:
    """Create the admin CA (an agent creates it at its first start too)."""
    ca_dir = ca_dir or default_ca_dir()
    created = pki.create_admin_ca(ca_dir, renew)
    cert, _ = pki.load_ca(ca_dir)
    state = "renewed" if renew else "created" if created else "already there"
    click.echo(f"admin CA {state} in {pki.admin_ca_dir(ca_dir)} (sha256 {pki.fingerprint(cert)[:16]}…)")


@ca.command("issue")
@click.argument("role")
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to write cert.pem, key.pem and ca.pem to [operator: $CONSTMIG_ADMIN_CERT or "
                   "~/.constmig/operator; host: required, the host's <state-dir>/tls].")
@click.option("--days", default=None, help="Days it is valid [default: operator 90, host 365].")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None, help=_CA_HELP)
def issue(role: str, name: str, out: Path | None, days: str | None, ca_dir: Path | None) -> None:
    """Issue an operator (ROLE operator) or host (ROLE host, NAME its --host-id) certificate."""
    pki.check_name(role, name)
    if out is None:
        if role == "host":
            raise ConfigError("a host certificate needs --out: that host's <state-dir>/tls (copy the folder there if "
                              "it is another machine)")
        out = pki.operator_dir()
    ident = pki.issue(ca_dir or default_ca_dir(), role, name, out, _days(days))
    click.echo(f"issued {role} certificate {name!r} in {out} (cert.pem, key.pem, ca.pem), valid until "
               f"{ident.not_after:%Y-%m-%d %H:%M} UTC")


@ca.command("show")
@click.argument("folder", required=False, type=click.Path(path_type=Path))
def show(folder: Path | None) -> None:
    """Whose certificate a folder holds and until when [default: this user's operator certificate]."""
    folder = folder or pki.operator_dir()
    if not (folder / "cert.pem").exists():
        raise ConfigError(f"no certificate in {folder} (`constmig ca issue operator NAME` writes one there)")
    ident = pki.read_identity(folder)
    problem = ident.problem()
    click.echo(f"{ident.role} {ident.name!r}, valid until {ident.not_after:%Y-%m-%d %H:%M} UTC, from admin CA sha256 "
               f"{pki.fingerprint(ident.ca)[:16]}…" + (f" ({problem})" if problem else ""))
