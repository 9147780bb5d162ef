"""`constmig testbed ...`: build, inspect, use and tear down a multi-host testbed from the shell.

Options are taken as strings and parsed here, so a bad value is one `error:` line and exit 1 (the
main group's rule) rather than click's multi-line usage error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from constmig.testbed.bed import Testbed
from constmig.testbed.spec import LinkSpec, TestbedError, parse_loss, parse_rate

_STATE_HELP = "Folder of testbed records [default: $CONSTMIG_TESTBED_DIR or /run/constmig-testbed]."


class TestbedGroup(click.Group):
    """Turns OS errors (a read-only /run, a vanished process) into the one-line TestbedError."""

    __test__ = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            raise TestbedError(f"testbed: {e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None


def _name_opt(f: Any) -> Any:
    f = click.option("--state-dir", type=click.Path(path_type=Path), default=None, help=_STATE_HELP)(f)
    return click.option("--name", default="tb", show_default=True, help="Testbed name (1-8 letters/digits).")(f)


@click.group(cls=TestbedGroup)
def testbed() -> None:
    """A multi-host network testbed: one namespace and agent per host, shaped links (needs root)."""


@testbed.command()
@click.option("--hosts", default="2", show_default=True, help="Number of hosts (1-16).")
@click.option("--link", "rate", default="1gbit", show_default=True, help="Rate of each host's link, each way.")
@click.option("--delay", default="0", show_default=True,
              help="One-way delay added to every connection to an agent (e.g. 0.2ms, 20ms).")
@click.option("--loss", default="0", show_default=True, help="Packet loss on each host's link, each way (e.g. 0.1%).")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None,
              help="Root CA folder for the agents [default: a fresh one inside the testbed's folder].")
@click.option("--etcd", is_flag=True, help="Also run etcd in the root namespace and have every agent join its "
              "fleet directory (needs the etcd-server package).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_name_opt
def up(hosts: str, rate: str, delay: str, loss: str, ca_dir: Path | None, etcd: bool, as_json: bool, name: str,
       state_dir: Path | None) -> None:
    """Build the testbed and start an agent per host; prints their addresses."""
    bed = Testbed(name, hosts, LinkSpec.parse(rate, delay, loss), state_dir, ca_dir, etcd=etcd).up()
    _print_status(bed.status(), as_json)


@testbed.command()
@_name_opt
def down(name: str, state_dir: Path | None) -> None:
    """Kill the testbed's processes and remove its namespaces, links and record (safe to repeat)."""
    removed = Testbed(name, state_dir=state_dir).down()
    click.echo(f"testbed {name}: removed {', '.join(removed)}" if removed else f"testbed {name}: nothing to remove")


@testbed.command()
@click.option("--json", "as_json", is_flag=True)
@_name_opt
def status(as_json: bool, name: str, state_dir: Path | None) -> None:
    """Hosts, addresses, link settings, and whether each agent is alive and answering."""
    _print_status(Testbed.attach(name, state_dir).status(), as_json)


@testbed.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_name_opt
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(name: str, state_dir: Path | None, command: tuple[str, ...]) -> None:
    """Run COMMAND from the root namespace with CONSTMIG_TESTBED_HOSTS and CONSTMIG_HOST_A.. set."""
    sys.exit(Testbed.attach(name, state_dir).run(command))


@testbed.command()
@click.argument("state")
@click.argument("host")
@_name_opt
def link(state: str, host: str, name: str, state_dir: Path | None) -> None:
    """Unplug (down) or replug (up) HOST's link at the switch."""
    bed = Testbed.attach(name, state_dir)
    if state not in ("up", "down"):
        raise TestbedError(f"bad link state {state!r}: use up or down")
    (bed.link_up if state == "up" else bed.link_down)(host)
    click.echo(f"host {bed.host(host).id}: link {state}")


@testbed.command("set-loss")
@click.argument("host")
@click.argument("loss")
@_name_opt
def set_loss(host: str, loss: str, name: str, state_dir: Path | None) -> None:
    """Set HOST's packet loss (each way), e.g. 1% or 0."""
    pct = parse_loss(loss)
    bed = Testbed.attach(name, state_dir)
    bed.set_loss(host, pct)
    click.echo(f"host {bed.host(host).id}: loss {pct:g}%")


@testbed.command("set-rate")
@click.argument("host")
@click.argument("rate")
@_name_opt
def set_rate(host: str, rate: str, name: str, state_dir: Path | None) -> None:
    """Set HOST's link rate (each way), e.g. 100mbit."""
    bps = parse_rate(rate)
    bed = Testbed.attach(name, state_dir)
    bed.set_rate(host, bps)
    click.echo(f"host {bed.host(host).id}: rate {rate}")


@testbed.command("kill-agent")
@click.argument("host")
@_name_opt
def kill_agent(host: str, name: str, state_dir: Path | None) -> None:
    """SIGKILL HOST's agent (and its enclaves)."""
    bed = Testbed.attach(name, state_dir)
    bed.kill_agent(host)
    click.echo(f"host {bed.host(host).id}: agent killed")


@testbed.command("restart-agent")
@click.argument("host")
@_name_opt
def restart_agent(host: str, name: str, state_dir: Path | None) -> None:
    """Start HOST's agent again (killing it first if it runs), same state folder and address."""
    bed = Testbed.attach(name, state_dir)
    bed.restart_agent(host)
    click.echo(f"host {bed.host(host).id}: agent answering at {bed.addr(host)}")


def _print_status(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(f"testbed {st['name']} ({st['status']}): subnet {st['subnet']}, "
               f"controller {st['controller']} (root namespace), folder {st['dir']}")
    for h in st["hosts"]:
        agent = "answering" if h["agent_answers"] else ("alive, not answering" if h["agent_alive"] else "dead")
        relay = "" if h["relay_alive"] is None else f", relay {'alive' if h['relay_alive'] else 'dead'}"
        click.echo(f"  {h['id']}  {h['addr']:<18} ns {h['ns']:<14} link {'up' if h['link_up'] else 'DOWN'}, "
                   f"{h['rate']}, delay {h['delay_ms']:g}ms, loss {h['loss_pct']:g}%; agent {agent}{relay}")
    if st.get("etcd"):
        click.echo(f"  fleet directory: etcd at {st['etcd']} ({'alive' if st['etcd_alive'] else 'DEAD'})")
    hosts = ",".join(h["addr"] for h in st["hosts"])
    click.echo(f"CONSTMIG_TESTBED_HOSTS={hosts}")
