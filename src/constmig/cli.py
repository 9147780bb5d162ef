"""The `constmig` command. Every expected failure ends as one line on stderr and exit status 1."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from constmig.errors import ConfigError, ConstmigError
from constmig.migration.constants import WRITE_TRACKING
from constmig.options import (
    DEFAULT_STRATEGY,
    STRATEGY_CHOICES,
    TRACKER_CHOICES,
    TRACKER_HELP,
    Duration,
    Size,
    etcd_option,
    write_json,
)
from constmig.units import check_writable
from constmig.wire import control

# Command groups imported when named, so that `constmig call` or an agent does not start by importing the
# bench, the testbed and the attestation tools (half of every command's start-up time).
LAZY_GROUPS = {"bench": "constmig.bench.cli:bench", "testbed": "constmig.testbed.cli:testbed",
               "attest": "constmig.tee.attest_cli:attest", "ca": "constmig.host.ca_cli:ca",
               "metrics": "constmig.host.targets:metrics", "migrations": "constmig.host.migrations_cli:migrations"}


class Main(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_GROUPS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_GROUPS:
            module, _, attr = LAZY_GROUPS[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConstmigError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, dict | list):
        return json.dumps(value, indent=2, default=lambda b: b.hex() if isinstance(b, bytes) else str(b))
    return str(value)


@click.group(cls=Main)
@click.version_option(package_name="constmig")
def main() -> None:
    """Secure live migration of large enclaves."""


@main.command()
@click.option("--listen", default="127.0.0.1:7001", show_default=True, help="HOST:PORT to serve on.")
@click.option("--state-dir", type=click.Path(path_type=Path), required=True, help="This host's state folder.")
@click.option("--host-id", required=True, help="This host's name (its platform certificate's subject).")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None,
              help="Root CA folder shared by all hosts [default: $CONSTMIG_CA_DIR or ~/.constmig/ca].")
@click.option("--tee", type=click.Choice(["sim", "auto", "sgx", "tdx"]), default="sim", show_default=True,
              help="The platform enclaves run on: the software TEE, or SGX (Gramine) / TDX hardware; auto "
                   "finds hardware or fails, never falling back to sim.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="One line per event (listening, CA, enclave started/stopped, migration started/done/failed); "
                   "json: one JSON object per line, for log collectors.")
@click.option("--metrics-listen", default=None, metavar="[HOST:]PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST: 127.0.0.1; port 0 picks a free one; "
              "status shows the URL as metrics_url).")
@click.option("--metrics-public", is_flag=True, help="Allow --metrics-listen on an address beyond loopback (the "
              "metrics name this host's enclaves).")
@etcd_option("Join the fleet directory at this etcd endpoint (http://HOST:PORT): register under a lease, "
             "record where each enclave here runs [env: CONSTMIG_ETCD].")
@click.option("--etcd-ttl", type=click.IntRange(2, 3600), default=10, show_default=True,
              help="Seconds this agent stays listed in the directory after it stops answering.")
@click.option("-v", "--verbose", is_flag=True, help="Also debug lines.")
def agent(listen: str, state_dir: Path, host_id: str, ca_dir: Path | None, tee: str, log_format: str,
          metrics_listen: str | None, metrics_public: bool, etcd: str | None, etcd_ttl: int, verbose: bool) -> None:
    """Run a host agent (foreground). Admin requests: its local socket, or a certificate (`constmig ca`)."""
    from constmig.client.trust import default_ca_dir
    from constmig.host.address import parse_addr
    from constmig.host.agent import run_agent
    from constmig.tee.producers import resolve_tee

    parse_addr(listen)
    if metrics_listen is not None:
        from constmig.host.metrics import metrics_address

        metrics_address(metrics_listen, metrics_public)
    if etcd is not None:
        from constmig.host.directory import parse_etcd_url

        parse_etcd_url(etcd)
    found = resolve_tee(tee)  # no hardware: one line saying what was looked for
    if found != "sim":
        raise ConfigError(f"found {found.reason}: this machine can produce quotes (`constmig attest`), but the "
                          "hardware enclave backend (sealing keys, monotonic counters) is not built yet; "
                          "run with --tee sim (see docs/hardware.md)")
    handler = logging.StreamHandler()
    from constmig.host.logs import JsonLog

    handler.setFormatter(JsonLog(host_id) if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    try:
        asyncio.run(run_agent(listen, state_dir, host_id, ca_dir or default_ca_dir(), metrics_listen, etcd, etcd_ttl,
                              metrics_public))
    except OSError as e:
        raise ConfigError(f"cannot serve on {listen}: {e.strerror or e}") from None


ADMIN_TIMEOUT_S = 120.0  # run, stop, checkpoint, restore: an agent that takes longer is reported, not waited on


def _parse_config(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@main.command()
@click.argument("app")
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
@click.option("--heap", type=Size(), default="256M", show_default=True, help="Heap size, e.g. 512M, 4G.")
@click.option("--name", default=None, help="Enclave name [default: the app name].")
@click.option("--chunk-size", type=Size(), default="1M", show_default=True)
@click.option("--set", "settings", multiple=True, help="App config KEY=VALUE (repeatable).")
@click.option("--plain-calls", is_flag=True, help="Also take unsealed calls through the agent (`call --plain`); "
              "part of the measured launch config, so clients pinned to the sealed-only enclave refuse it.")
def run(app: str, addr: str, heap: int, name: str | None, chunk_size: int, settings: tuple[str, ...],
        plain_calls: bool) -> None:
    """Launch an enclave app on an agent."""
    from constmig.apps import load_app
    from constmig.host.client import request

    load_app(app)
    if name is not None and not name.strip():
        raise ConfigError("--name must not be empty (leave it out to name the enclave after the app)")
    spec = control.Run(name=name or app, app=app, heap=heap, chunk_size=chunk_size, config=_parse_config(settings),
                       plain_calls=plain_calls)
    click.echo(_show(request(addr, spec, timeout=ADMIN_TIMEOUT_S)))


@main.command()
@click.argument("name")
@click.argument("method")
@click.argument("args", nargs=-1)
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
@click.option("--expect-measurement", default=None, metavar="HEX",
              help="Talk only to an enclave running this code (64 hex digits) [default: what `trust` pinned, "
                   "or pin on first use].")
@click.option("--min-svn", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Refuse an enclave whose security version is lower.")
@click.option("--known", "known_path", type=click.Path(path_type=Path), default=None,
              help="Pinned enclaves file [default: $CONSTMIG_KNOWN_ENCLAVES or ~/.constmig/known_enclaves.json].")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None,
              help="Root CA the enclave's quote must chain to [default: $CONSTMIG_CA_DIR or ~/.constmig/ca].")
@click.option("--plain", is_flag=True, help="Unsealed, through the agent (only enclaves run with --plain-calls).")
@click.option("--raw", is_flag=True, help="Pass every argument as a string (no JSON parsing).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds to wait for the answer (the call's outcome is unknown after that).")
@etcd_option("Find the enclave by name in this fleet directory (etcd, http://HOST:PORT) instead of --agent "
             "[env: CONSTMIG_ETCD].")
def call(name: str, method: str, args: tuple[str, ...], addr: str, expect_measurement: str | None, min_svn: int,
         known_path: Path | None, ca_dir: Path | None, plain: bool, raw: bool, timeout: float,
         etcd: str | None) -> None:
    """Call an ECALL of an enclave over an attested, sealed session (follows redirects after a migration).

    Arguments: numbers, true/false/null and JSON lists and objects are parsed (the ECALL's annotations
    decide where they exist: `put k 123` stores the string "123"); anything else is a string."""
    from constmig.client import EnclaveClient, UnsettledCalls
    from constmig.errors import AgentError
    from constmig.host.client import PlainEnclaveClient

    if etcd is not None and click.get_current_context().get_parameter_source("addr") is not \
            click.core.ParameterSource.COMMANDLINE:
        from constmig.host.directory import locate

        addr = locate(etcd, name)
    if plain:
        typed = _typed_args(_app_of(addr, name), method, args, raw)
        pc = PlainEnclaveClient(addr, name, timeout=timeout, etcd=etcd)
        try:
            click.echo(_show(pc.call(method, *typed)))
        finally:
            pc.close()
        moved_to = pc.addr
    else:
        trusted = _trust(expect_measurement, min_svn, known_path, ca_dir)
        c = EnclaveClient(addr, name, timeout=timeout, trust=trusted, etcd=etcd,
                          unsettled=UnsettledCalls(trusted.known.path.with_name("unsettled_calls.json")))
        try:
            c.open()  # the attested app's annotations type the arguments, not what the host says it runs
            result = c.call(method, *_typed_args(c.app, method, args, raw))
        except ConstmigError as e:
            if not c.outstanding:
                raise
            raise AgentError(f"{e}; the call's outcome is unknown: the next call to {name!r} closes its session "
                             "and says whether it ran") from None
        finally:
            c.close()
            if c.settled is not None:
                click.echo(f"({c.settled.why})", err=True)
        click.echo(_show(result))
        moved_to = c.addr
    if moved_to != addr:
        click.echo(f"(enclave {name!r} now lives at {moved_to})", err=True)


def _trust(expect_measurement: str | None, min_svn: int, known_path: Path | None, ca_dir: Path | None) -> Any:
    """The pin (on first use, said on stderr), narrowed by the flags: no flag widens what is accepted."""
    from constmig.client import Expect, KnownEnclaves, Trust

    expect = Expect.parse(expect_measurement, min_svn=min_svn, source="--expect-measurement"
                          if expect_measurement else "--min-svn") if expect_measurement or min_svn else None
    return Trust.default(ca_dir, expect, KnownEnclaves(known_path), announce=_tell_pinned)


def _tell_pinned(line: str) -> None:
    click.echo(line, err=True)


@main.command()
@click.argument("name")
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
@click.option("--known", "known_path", type=click.Path(path_type=Path), default=None,
              help="Pinned enclaves file [default: $CONSTMIG_KNOWN_ENCLAVES or ~/.constmig/known_enclaves.json].")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None,
              help="Root CA the enclave's quote must chain to [default: $CONSTMIG_CA_DIR or ~/.constmig/ca].")
@etcd_option("Find the enclave by name in this fleet directory (etcd, http://HOST:PORT) instead of --agent, and "
             "pin it for calls made with the same --etcd [env: CONSTMIG_ETCD].")
def trust(name: str, addr: str, known_path: Path | None, ca_dir: Path | None, etcd: str | None) -> None:
    """Attest an enclave and pin it: this instance, the code it runs, its fleet (later calls refuse anything
    else). Replaces an earlier pin of the name on purpose."""
    from constmig.client import KnownEnclaves, Trust, pin_now

    if etcd is not None and click.get_current_context().get_parameter_source("addr") is not \
            click.core.ParameterSource.COMMANDLINE:
        from constmig.host.directory import locate

        addr = locate(etcd, name)
    known = KnownEnclaves(known_path)
    pin, before = pin_now(addr, name, Trust.default(ca_dir, known=known, announce=None), etcd)  # on purpose
    assert pin is not None
    click.echo(f"pinned enclave {name!r}: measurement {pin.measurement.hex()}, instance {pin.instance.hex()}, "
               f"signer {pin.signer.hex()[:16]}…, svn {pin.svn}, on {pin.platform}, fleet {pin.fleet[:16]}"
               f"{f' via {etcd}' if etcd else ''} ({known.path})")
    if before is not None and (before.instance, before.measurement) != (pin.instance, pin.measurement):
        click.echo(f"(replaces the pin of instance {before.instance.hex()[:16]}…, measurement "
                   f"{before.measurement.hex()[:16]}…, made {before.pinned_at})", err=True)


def _app_of(addr: str, name: str) -> str | None:
    """The app the agent says `name` runs (for a plain call, which the host sees anyway); None if unknown."""
    from constmig.errors import AgentUnreachable
    from constmig.host.client import request

    try:
        st = request(addr, control.Status(), timeout=10)
        if name in st.get("moved", {}):
            st = request(st["moved"][name], control.Status(), timeout=10)
        return str(st["enclaves"][name]["app"])
    except AgentUnreachable:
        raise  # the call would not get through either: say so now, not after its own wait
    except (ConstmigError, OSError, KeyError, TypeError):
        return None


def _typed_args(app: str | None, method: str, args: tuple[str, ...], raw: bool = False) -> list[Any]:
    """Command-line arguments as values: numbers, true/false/null and JSON lists and objects are parsed,
    anything else stays a string; where the ECALL's annotations in `app` say (`fill 0.9 1`: a float and an
    int; `put k 123`: a string), they decide. `raw`: every argument a string."""
    import inspect
    import typing

    from constmig.apps import load_app

    if raw:
        return list(args)
    hints: dict[str, Any] = {}
    params: list[inspect.Parameter] = []
    try:
        fn = getattr(load_app(app), method) if app else None
        if fn is not None:
            hints = typing.get_type_hints(fn)
            params = list(inspect.signature(fn).parameters.values())[1:]  # past self
    except (ConstmigError, OSError, KeyError, AttributeError, NameError, TypeError, ValueError):
        pass  # a convenience only: the ECALL validates what it gets anyway
    out: list[Any] = []
    for i, text in enumerate(args):
        param = params[i] if i < len(params) and params[i].kind is params[i].POSITIONAL_OR_KEYWORD else None
        kind = hints.get(param.name) if param is not None else None
        if kind in (bool, int, float):
            out.append(_scalar(kind, text, method, param.name if param else str(i)))
            continue
        value = _json_value(text)
        out.append(value if kind is None or _accepts(kind, value) or not _accepts(kind, text) else text)
    return out


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _accepts(kind: Any, value: Any) -> bool:
    """Does annotation `kind` admit `value`? Unions, list[...] and dict[...] by their outer types."""
    import types
    import typing

    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(k, value) for k in typing.get_args(kind))
    if kind is Any:
        return True
    if kind is None or kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    target = origin or kind
    return isinstance(target, type) and isinstance(value, target) and not (target is int and isinstance(value, bool))


def _scalar(kind: type, text: str, method: str, pname: str) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{method}: {pname} must be {what}, not {text!r}") from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def apps(as_json: bool) -> None:
    """List the installed enclave apps: name, package, version, and a hash of the code they run."""
    import hashlib

    from constmig.apps import app_source, installed

    rows = []
    for entry in sorted(installed().values(), key=lambda e: e.name):
        try:
            code, problem = hashlib.sha256(app_source(entry.name)).hexdigest(), ""
        except ConstmigError as e:
            code, problem = "", str(e)
        rows.append({"name": entry.name, "package": entry.package, "version": entry.version,
                     "target": entry.target, "code_sha256": code, **({"error": problem} if problem else {})})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        tail = f"code {r['code_sha256'][:16]}…" if r["code_sha256"] else f"cannot load: {r['error']}"
        click.echo(f"{r['name']:<{width}}  {r['package']} {r['version']}  {r['target']}  {tail}")


@main.command()
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Everything the agent says, as JSON.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for the agent's answer.")
def status(addr: str, as_json: bool, timeout: float) -> None:
    """Show an agent's enclaves and recent migrations."""
    from constmig.host.client import request

    st = request(addr, control.Status(), timeout=timeout)
    if as_json:
        click.echo(_show(st))
        return
    from constmig.progress import print_status

    print_status(st)


_HOSTS_HELP = "The fleet's agents, HOST:PORT,HOST:PORT,... [default: every agent in --etcd's directory]."


@main.command("ls")
@click.option("--hosts", default=None, help=_HOSTS_HELP)
@etcd_option()
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def ls_cmd(hosts: str | None, etcd: str | None, as_json: bool) -> None:
    """Every enclave of the fleet: where it runs, its state and size; hosts that do not answer, too (and,
    with a directory, enclaves it lists at agents that are gone, as dead, with what brings them back)."""
    from constmig.host.fleet import fleet_hosts, look, revival, strays

    addrs, listed = fleet_hosts(hosts, etcd)
    views = look(addrs)
    stray = strays(listed, views)
    dead = [s for s in stray if s.state == "dead"]
    advice = revival(dead, etcd) if etcd else []
    draining = _drain_states(etcd)
    if as_json:
        click.echo(_show({**{v.addr: {"host_id": v.host_id, "free_bytes": v.free, "enclaves": v.enclaves,
                                      **({"draining": draining[v.host_id]} if v.host_id in draining else {}),
                                      **({"error": v.error} if v.error else {})} for v in views},
                          **({"dead": {s.name: {"at": s.at, "host_id": s.agent.get("host_id"),
                                                "checkpoint": s.checkpoint} for s in dead},
                              "unknown": {s.name: s.at for s in stray if s.state == "unknown"},
                              "advice": advice} if etcd else {})}))
        return
    from rich.console import Console
    from rich.table import Table

    from constmig.progress import FOLD, whole
    from constmig.units import format_size

    out = Console()
    table = Table(title=f"{sum(len(v.enclaves) for v in views)} enclaves on {len(views)} hosts")
    hosts = [f"{v.host_id} {v.addr}" for v in views if v.enclaves] + [s.at for s in stray]
    for col in ("enclave", "host", "state", "app", "heap", "calls/s"):
        table.add_column(col, justify="right" if col == "calls/s" else "left",
                         **(whole(hosts, col, 1, out.width) if col == "host" else FOLD if col == "enclave" else {}))
    for v in views:
        for name, e in sorted(v.enclaves.items()):
            table.add_row(name, f"{v.host_id} {v.addr}", str(e.get("status")), str(e.get("app", "")),
                          format_size(int(e.get("heap_bytes") or 0)), f"{float(e.get('calls_per_s') or 0):.1f}")
    for s in stray:
        table.add_row(s.name, f"{s.agent.get('host_id') or '?'} {s.at}", s.state, "", "", "")
    out.print(table)
    for v in views:
        if v.error:
            out.print(f"{v.addr}: {v.error}", soft_wrap=True)
        else:
            out.print(f"{v.host_id} {v.addr}: {format_size(v.free)} free for new heaps"
                      + (f"; {draining[v.host_id]}" if v.host_id in draining else ""), soft_wrap=True)
    for line in advice:  # plain: paths and commands must come out exactly, unwrapped and unstyled
        click.echo(line)
    if any(v.error for v in views):
        sys.exit(1)


@main.command()
@click.argument("name")
@etcd_option()
def forget(name: str, etcd: str | None) -> None:
    """Drop NAME from the fleet directory once its agent is gone (see `ls`), so that any agent may run an
    enclave of that name again (a new instance). Refused while its agent is alive: stop it there."""
    from constmig.host.directory import blocking

    if etcd is None:
        raise ConfigError("forget needs the fleet directory: --etcd URL (or set CONSTMIG_ETCD)")
    at = blocking(etcd, lambda d: d.forget(name))
    click.echo(f"forgot {name}{f' (last at {at}, whose agent is gone)' if at else ''}: any agent may now run an "
               "enclave of that name; its checkpoints still restore on that host (with --name NEW once the name is taken)")


def _drain_states(etcd: str | None) -> dict[str, str]:
    """Host id -> "draining (N left)", "drained (undrain to clear the mark)" or "drain refused: why", for
    every host with a drain mark in the fleet directory."""
    if etcd is None:
        return {}
    from constmig.host.marks import marks

    out = {}
    for host_id, mark in marks(etcd).items():
        st = mark.get("status") or {}
        state = str(st.get("state") or "written")
        out[host_id] = ("drained (undrain to clear the mark)" if state == "drained"
                        else f"drain refused: {st.get('reason')}" if state == "refused"
                        else f"{'draining' if state != 'stuck' else 'drain stuck'}"
                             f" ({len(st.get('left') or [])} left{': ' + st['reason'] if st.get('reason') else ''})")
    return out


@main.command()
@click.argument("source")
@click.option("--hosts", default=None,
              help="Where its enclaves may go: HOST:PORT,HOST:PORT,... [default: every agent in --etcd's directory].")
@etcd_option()
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Migrations at once.")
@click.option("--max-bandwidth", type=Size(), default="0", show_default=True,
              help="Cap shared by the drain's migrations, bytes per second (e.g. 500M); 0 = no cap.")
@click.option("--strategy", type=STRATEGY_CHOICES, default=DEFAULT_STRATEGY, show_default=True)
@click.option("--tracker", type=TRACKER_CHOICES, default=control.DEFAULT_TRACKER, show_default=True, help=TRACKER_HELP)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=control.DEFAULT_TIMEOUT_S, show_default=True,
              help="Per-step timeout of each migration, seconds.")
@click.option("--json", "json_path", default=None, help="Write the outcome as JSON (FILE, or - for stdout).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="With --etcd: follow the drain until the host is empty (else return once the mark is written).")
def drain(source: str, hosts: str | None, etcd: str | None, parallel: int, max_bandwidth: int, strategy: str,
          tracker: str, timeout: float, json_path: str | None, wait: bool) -> None:
    """Move every running enclave off SOURCE (an agent's HOST:PORT, or with --etcd its host id) to the
    other hosts with the most room (maintenance). With --etcd (and no --hosts) this writes a signed drain
    mark on SOURCE that its agent carries out, even if this command is killed (docs/fleet.md)."""
    from constmig.host.fleet import look_and_plan_drain

    check_writable(json_path, "--json")
    if etcd is not None and hosts is None:
        _mark_drain(source, etcd, parallel, max_bandwidth, strategy, tracker, timeout, json_path, wait)
        return
    views, moves, skipped = look_and_plan_drain(source, hosts, etcd)
    source = views[0].addr
    for v in views[1:]:
        if v.error:
            click.echo(f"(leaving out {v.addr}: {v.error})", err=True)
    for what in skipped:
        click.echo(f"(not moved: {what}: only running enclaves move)", err=True)
    _run_moves(f"drain of {source}", moves, f"nothing to drain: no running enclave on {source}", parallel,
               max_bandwidth, strategy, tracker, timeout, json_path, {"source": source, "skipped": skipped},
               f"run the same drain again to move what is left off {source}")


def _mark_drain(source: str, etcd: str, parallel: int, max_bandwidth: int, strategy: str, tracker: str,
                timeout: float, json_path: str | None, wait: bool) -> None:
    """`drain SOURCE --etcd`: the signed mark, then (with --wait) its records followed to the end."""
    import time

    from constmig.host import marks
    from constmig.host.fleet import Move, look

    target = marks.resolve(etcd, source)
    view = look([target.addr])[0] if target.addr else None
    heaps = {n: int(e.get("heap_bytes") or 0) for n, e in (view.enclaves if view else {}).items()
             if e.get("status") == "running"}
    options = {"tracker": tracker, "timeout": timeout, "max_bandwidth": float(max_bandwidth) / parallel}
    t0 = time.time()
    mark = marks.write_mark(etcd, target, parallel, strategy, options)
    quiet = json_path == "-"
    if not quiet:
        click.echo(f"drain {mark.id} of host {target.host_id} marked ({len(heaps)} running enclaves; signed as "
                   f"{mark.asked_by}); its agent carries it out", err=not wait)
    if not wait or target.addr is None:
        if target.addr is None and not quiet:
            click.echo(f"host {target.host_id} is not in the fleet directory now: its agent carries the drain out "
                       "when it joins again", err=True)
        write_json({"source": target.addr, "host_id": target.host_id, "drain": mark.id}, json_path)
        return
    from constmig.progress import DrainProgress, print_drain

    phases: dict[str, str] = {}
    with DrainProgress(f"drain of {target.host_id}", [Move(n, h, "") for n, h in heaps.items()], quiet=quiet) as bar:
        def seen(rec: dict[str, Any]) -> None:
            spec, st = rec.get("spec") or {}, rec.get("status") or {}
            name, phase = str(spec.get("enclave")), str(st.get("phase"))
            if name not in heaps:
                return
            key = f"{spec.get('id')}:{phase}:{(st.get('progress') or {}).get('left_bytes')}"
            if phases.get(name) == key:
                return
            was, phases[name] = phases.get(name, ""), key
            if phase == "Running" and not was.startswith(f"{spec.get('id')}:Running"):
                bar.event(name, "start", {"to": st.get("target_addr") or st.get("target")})
            if phase == "Running" and (left := (st.get("progress") or {}).get("left_bytes")) is not None:
                bar.event(name, "progress", {"done": max(heaps[name] - int(left), 0), "total": heaps[name]})
            if phase in ("Succeeded", "Failed", "Cancelled") and f":{phase}" not in was:
                if not was.startswith(f"{spec.get('id')}:Running"):
                    bar.event(name, "start", {"to": st.get("target_addr") or st.get("target") or "-"})
                bar.event(name, "end", {"ok": phase == "Succeeded", "error": st.get("reason", "")})

        end = marks.follow(etcd, target.host_id, mark.id, seen)
    moved = []
    for name, rec in sorted(end.latest.items()):
        spec, st = rec.get("spec") or {}, rec.get("status") or {}
        fig = st.get("figures") or {}
        moved.append({"name": name, "from": target.addr, "to": st.get("target_addr") or "", "ok": st.get("phase") == "Succeeded",
                      "error": None if st.get("phase") == "Succeeded" else st.get("reason") or st.get("phase"),
                      "id": spec.get("id"), "phase": st.get("phase"), "outcome": st.get("outcome"),
                      "strategy": fig.get("strategy"), "downtime_ms": fig.get("downtime_ms"),
                      "total_s": fig.get("total_s"), "state_bytes": fig.get("state_bytes")})
    doc = {"source": target.addr, "host_id": target.host_id, "drain": mark.id, "state": end.state,
           "title": f"drain of {target.host_id}", "wall_s": round(time.time() - t0, 3), "moved": moved,
           "skipped": []}
    write_json(doc, json_path)
    if not quiet and moved:
        print_drain(doc)
    if end.state != "drained":
        raise ConstmigError(f"the drain of host {target.host_id} is {end.state}: {end.reason or 'see above'}; "
                            f"`constmig migrations ls --etcd {etcd}` shows each move")


@main.command()
@click.argument("host")
@etcd_option()
def undrain(host: str, etcd: str | None) -> None:
    """Clear the drain mark on HOST (a host id or HOST:PORT): moves not started are cancelled, those running
    finish or roll back as they will."""
    from constmig.host import marks

    if etcd is None:
        raise ConfigError("undrain needs the fleet directory: --etcd URL (or set CONSTMIG_ETCD)")
    target = marks.resolve(etcd, host)
    if not marks.clear_mark(etcd, target.host_id):
        raise ConfigError(f"host {target.host_id} has no drain mark in the fleet directory at {etcd}")
    click.echo(f"drain mark on host {target.host_id} cleared; moves not started are cancelled")


@main.command()
@click.option("--hosts", default=None, help=_HOSTS_HELP)
@etcd_option()
@click.option("--max-moves", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="At most this many migrations.")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Migrations at once.")
@click.option("--max-bandwidth", type=Size(), default="0", show_default=True,
              help="Cap shared by the migrations, bytes per second (e.g. 500M); 0 = no cap.")
@click.option("--strategy", type=STRATEGY_CHOICES, default=DEFAULT_STRATEGY, show_default=True)
@click.option("--tracker", type=TRACKER_CHOICES, default=control.DEFAULT_TRACKER, show_default=True, help=TRACKER_HELP)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=control.DEFAULT_TIMEOUT_S, show_default=True,
              help="Per-step timeout of each migration, seconds.")
@click.option("--json", "json_path", default=None, help="Write the outcome as JSON (FILE, or - for stdout).")
def rebalance(hosts: str | None, etcd: str | None, max_moves: int, parallel: int, max_bandwidth: int, strategy: str,
              tracker: str, timeout: float, json_path: str | None) -> None:
    """Even out the heap bytes running on each host: each move takes, from the fullest host to the
    emptiest, the enclave closest to half their difference."""
    from constmig.host.fleet import fleet_hosts, look, plan_rebalance

    check_writable(json_path, "--json")
    views = look(fleet_hosts(hosts, etcd)[0])
    for v in views:
        if v.error:
            click.echo(f"(leaving out {v.addr}: {v.error})", err=True)
    moves = plan_rebalance(views, max_moves)
    _run_moves("rebalance", moves, "nothing to rebalance: no move would even out the hosts", parallel,
               max_bandwidth, strategy, tracker, timeout, json_path, {}, "run rebalance again")


def _run_moves(title: str, moves: list[Any], nothing: str, parallel: int, max_bandwidth: int, strategy: str,
               tracker: str, timeout: float, json_path: str | None, doc: dict[str, Any], again: str) -> None:
    """Run a drain's or a rebalance's moves with progress; print the table, write the JSON."""
    import time

    from constmig.host.fleet import run_moves

    quiet = json_path == "-"
    t0 = time.time()
    outcomes = []
    if not moves:
        if not quiet:
            click.echo(nothing)
    else:
        from constmig.progress import DrainProgress

        with DrainProgress(title, moves, quiet=quiet) as bar:
            outcomes = run_moves(moves, parallel=parallel, max_bandwidth=float(max_bandwidth), strategy=strategy,
                                 tracker=tracker, timeout=timeout, on_event=bar.event)
    frm = {mv.name: mv.src for mv in moves}
    doc = {**doc, "title": title, "wall_s": round(time.time() - t0, 3),
           "moved": [{"name": o.name, "from": frm.get(o.name), "to": o.to, "ok": o.ok, "error": o.error or None,
                      **{k: o.figures.get(k) for k in ("strategy", "downtime_ms", "total_s", "state_bytes")}}
                     for o in outcomes]}
    write_json(doc, json_path)
    if not quiet and outcomes:
        from constmig.progress import print_drain

        print_drain(doc)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise ConstmigError(f"{len(failed)} of {len(outcomes)} enclaves did not move (see above); {again}")


@main.command()
@click.argument("name")
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
def checkpoint(name: str, addr: str) -> None:
    """Seal an enclave's state to a file on its host, bound to a monotonic counter (no rollback)."""
    from constmig.host.client import request

    click.echo(_show(request(addr, control.Checkpoint(name=name), timeout=ADMIN_TIMEOUT_S)))


@main.command()
@click.argument("path")
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
@click.option("--name", default=None, help="Enclave name (default: from the file name).")
@click.option("--release", default=None, metavar="CODE",
              help="The code a migration's source printed when its destination died before it handled COMMIT: "
                   "it completes the lineage held pending on that destination host.")
def restore(path: str, addr: str, name: str | None, release: str | None) -> None:
    """Start an enclave from its newest checkpoint (an older one, or one from a host it left, is refused)."""
    from constmig.host.client import request

    req = control.Restore(path=str(Path(path).resolve()), name=name, release=release or "")
    try:
        req.check()  # the agent's rule, said before it is asked
    except control.BadRequest as e:
        raise ConfigError(f"bad --release {release!r}: {e}") from None
    click.echo(_show(request(addr, req, timeout=ADMIN_TIMEOUT_S)))


@main.command()
@click.argument("name")
@click.option("--agent", "addr", default="127.0.0.1:7001", show_default=True)
@click.option("--force", is_flag=True, help="Also stop an enclave whose migration paused or failed after the "
              "handoff (its undelivered heap data is lost).")
def stop(name: str, addr: str, force: bool) -> None:
    """Stop (destroy) an enclave."""
    from constmig.host.client import request

    click.echo(_show(request(addr, control.Stop(name=name, force=force), timeout=ADMIN_TIMEOUT_S)))


def _cancel_migration(name: str, src: str) -> None:
    from constmig.host.client import request

    done = request(src, control.Cancel(name=name), timeout=ADMIN_TIMEOUT_S)
    click.echo(f"cancelled the migration of {name} before its commit point: it keeps running on {done['on']}")


def _interruptible(name: str, src: str, work: Any) -> Any:
    """Run the migration request in a thread, so Ctrl-C can ask whether to cancel it (a migration the
    CLI simply walked away from would go on unseen)."""
    import threading

    box: dict[str, Any] = {}
    finished = threading.Event()

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread below)
            box["error"] = e
        finally:
            finished.set()

    # An Event, not Thread.join: on Python 3.11 a Ctrl-C that interrupts join() can mark the thread
    # stopped while it still runs (CPython's bpo-45274 handler releases the thread's own state lock),
    # and the loop would read a result that is not there yet.
    threading.Thread(target=target, daemon=True, name="migrate").start()
    while not finished.is_set():
        try:
            finished.wait(0.2)
        except KeyboardInterrupt:
            _ask_cancel(name, src)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _ask_cancel(name: str, src: str) -> None:
    if sys.stdin.isatty():
        try:
            yes = click.confirm(f"\ncancel the migration of {name}? Before its commit point it stays on {src}",
                                default=False, err=True)
        except (KeyboardInterrupt, click.Abort):
            yes = True  # Ctrl-C again: yes
    else:
        yes = True  # nobody to ask
        click.echo("interrupted: cancelling the migration", err=True)
    if not yes:
        click.echo("the migration goes on", err=True)
        return
    try:
        _cancel_migration(name, src)
    except ConstmigError as e:
        click.echo(f"not cancelled: {e}", err=True)


def _check_data_plane(data_plane: str, strategy: str) -> None:
    """--data-plane native, refused here before any agent hears of it: a request the agents would refuse, or
    an engine this install did not build (the source enclave checks its own again)."""
    if data_plane != "native":
        return
    try:
        control.Migrate(name="-", to="-", strategy=strategy, data_plane=data_plane).check()
    except control.BadRequest as e:
        raise ConfigError(f"--data-plane native: {e}") from None
    from constmig.native import engine

    if not engine.available():
        raise ConfigError(f"--data-plane native: {engine.why_unavailable()}; use --data-plane python")


@main.command()
@click.argument("name")
@click.option("--from", "src", default=None, help="Source agent HOST:PORT [with --etcd: where the directory says].")
@click.option("--to", "dst", default=None, help="Destination agent HOST:PORT (not with --resume).")
@click.option("--strategy", type=STRATEGY_CHOICES, default=DEFAULT_STRATEGY, show_default=True,
              help="Why auto by default: README.md, \"Which strategy migrate uses by default\".")
@click.option("--tracker", type=TRACKER_CHOICES, default=control.DEFAULT_TRACKER, show_default=True, help=TRACKER_HELP)
@click.option("--max-bandwidth", type=Size(), default="0", show_default=True,
              help="Cap for the stream while the app runs (the post-copy stream, the pre-copy rounds), "
              "bytes per second (e.g. 100M); 0 = no cap. Chunks the app waits for are never held back.")
@click.option("--max-downtime", type=Duration(), default=None,
              help="precopy, hybrid, auto: end the rounds once what is left would take at most this long to send "
              "(e.g. 50ms; default 50ms, auto 10ms).")
@click.option("--rounds", "max_rounds", type=click.IntRange(1, control.MAX_ROUNDS), default=None,
              help="precopy, hybrid, auto: at most this many rounds while the app runs (default: precopy and auto 8, "
              "hybrid 1).")
@click.option("--write-tracking", type=click.Choice(WRITE_TRACKING), default=control.DEFAULT_WRITE_TRACKING,
              show_default=True,
              help="precopy, hybrid, auto: who reports the app's writes during the rounds: the kernel (userfaultfd "
              "write-protect, Linux 6.7+) or the enclave's own write-fault handler; auto: the enclave's where the "
              "writers may be throttled, else the kernel with the Fault Tracker and the enclave with the Access "
              "Tracker (docs/architecture.md).")
@click.option("--max-throttle", type=click.FloatRange(0, control.MAX_THROTTLE), default=None,
              help="precopy, hybrid, auto: when a round does not shrink, slow the calls that write (never the "
              "reads) by up to this share of their pace (from 0.2, or at once what lets the next round shrink, "
              "then +0.1 a round) until the rounds converge; 0: never [default: auto 0.9, the others 0]. Needs "
              "the enclave's write tracking (auto picks it).")
@click.option("--completion-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="precopy, hybrid, auto: the rounds' time budget, seconds per GiB of heap (at least one GiB's worth; "
              f"default {control.DEFAULT_COMPLETION_TIMEOUT_S:.0f}); then the stop takes what is left, and a round "
              "the destination does not acknowledge within it ends the migration with the enclave running here.")
@click.option("--data-plane", type=click.Choice(control.DATA_PLANES), default=control.DEFAULT_DATA_PLANE,
              show_default=True,
              help="Who seals, sends, receives and opens the heap's chunks (stopcopy, the pre-copy rounds, the "
              "stop's rest, the post-copy stream at both ends): the Python channel, or the native engine with the "
              "GIL released (docs/native.md).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=control.DEFAULT_TIMEOUT_S, show_default=True,
              help="Per-step timeout, seconds.")
@click.option("--verify", is_flag=True, help="Compare the app's state checksum before and after "
              "(meaningful only without concurrent writers).")
@click.option("--resume-deadline", type=click.FloatRange(min=0), default=control.RESUME_DEADLINE_S, show_default=True,
              help="If the link breaks after the handoff, keep reconnecting this many seconds (0 = give up at "
              "once; the source keeps its state either way).")
@click.option("--resume", "resume_paused", is_flag=True,
              help="Resume this enclave's migration out of --from that paused after its handoff.")
@click.option("--cancel", "cancel", is_flag=True,
              help="Cancel this enclave's migration out of --from if it has not reached its commit point (it "
              "keeps running there); past that point it cannot be undone. Ctrl-C during a migration asks.")
@click.option("--json", "json_path", default=None, help="Write the figures as JSON (FILE, or - for stdout).")
@etcd_option("Find the source agent (no --from needed) in this fleet directory [env: CONSTMIG_ETCD].")
def migrate(name: str, src: str | None, dst: str | None, strategy: str, tracker: str, max_bandwidth: int,
            max_downtime: float | None, max_rounds: int | None, write_tracking: str, max_throttle: float | None,
            completion_timeout: float | None, data_plane: str, timeout: float,
            verify: bool, resume_deadline: float, resume_paused: bool, cancel: bool, json_path: str | None,
            etcd: str | None) -> None:
    """Migrate an enclave from one agent to another (or, with --resume, finish a paused migration; with
    --cancel, stop one before its commit point)."""
    from constmig.host.address import parse_addr
    from constmig.host.orchestrate import migrate_with_progress, resume

    if src is None:
        if etcd is None:
            raise ConfigError("missing --from (the source agent HOST:PORT), or --etcd to find it")
        from constmig.host.directory import locate

        src = locate(etcd, name)
    parse_addr(src)
    check_writable(json_path, "--json")
    if cancel:
        if dst is not None or resume_paused:
            raise ConfigError("--cancel stops the migration of NAME out of --from; drop --to and --resume")
        _cancel_migration(name, src)
        return
    if resume_paused:
        if dst is not None or verify:
            raise ConfigError("--resume continues the paused migration to where it was going; drop --to and --verify")
        from constmig.progress import MigrationProgress

        with MigrationProgress(f"resuming {name}", quiet=json_path == "-") as bar:
            figures = resume(name, src, timeout, max(resume_deadline, 0.1), on_progress=bar.update)
    else:
        if dst is None:
            raise ConfigError("missing --to (the destination agent HOST:PORT)")
        if parse_addr(dst) == parse_addr(src):
            raise ConfigError(f"--from and --to are the same agent ({src}); migrate to another one")
        from constmig.migration import strategies

        if tracker != control.DEFAULT_TRACKER and not strategies.get(strategy).needs_tracker:
            click.echo(f"(--tracker {tracker} is ignored: {strategy} needs no tracker)", err=True)
        if strategy not in strategies.ROUNDS and (max_downtime is not None or max_rounds is not None or
                                                   write_tracking != control.DEFAULT_WRITE_TRACKING
                                                   or max_throttle is not None or completion_timeout is not None):
            raise ConfigError("--max-downtime, --rounds, --write-tracking, --max-throttle and --completion-timeout "
                              f"steer the rounds before the stop; use them with --strategy "
                              f"{' or '.join(strategies.ROUNDS)}")
        if max_throttle and write_tracking == "kernel":
            raise ConfigError("--max-throttle needs the enclave's write tracking (--write-tracking enclave or auto): "
                              "the kernel's cannot tell which call wrote")
        _check_data_plane(data_plane, strategy)
        figures = _interruptible(name, src, lambda: migrate_with_progress(
            name, src, dst, strategy, timeout, verify=verify, quiet=json_path == "-", tracker=tracker,
            max_bandwidth=max_bandwidth, resume_deadline=resume_deadline, max_downtime=max_downtime,
            max_rounds=max_rounds, write_tracking=write_tracking, max_throttle=max_throttle,
            completion_timeout=completion_timeout, data_plane=data_plane))
    write_json(figures, json_path)
    if json_path != "-":
        from constmig.progress import print_figures

        print_figures(figures)


@main.command()
@click.option("--strategy", type=STRATEGY_CHOICES, default="stopcopy", show_default=True)
@click.option("--tracker", type=TRACKER_CHOICES, default=control.DEFAULT_TRACKER, show_default=True, help=TRACKER_HELP)
@click.option("--heap", type=Size(), default="512M", show_default=True)
@click.option("--app", default="kvstore", show_default=True)
@click.option("--fill", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True,
              help="Fraction of the heap filled with incompressible data before migrating.")
@click.option("--json", "json_path", default=None, help="Write the figures as JSON (FILE, or - for stdout).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for figures.json and a plot of the migration.")
def demo(strategy: str, tracker: str, heap: int, app: str, fill: float, json_path: str | None,
         out: Path | None) -> None:
    """Two agents on this machine, one enclave, one migration, checked end to end."""
    from constmig.bench.demo import run_demo

    check_writable(json_path, "--json")
    check_writable(out, "--out", folder=True)
    figures = run_demo(strategy=strategy, tracker=tracker, heap=heap, app=app, fill=fill, quiet=json_path == "-",
                       out=out)
    write_json(figures, json_path)
    if not figures.get("verified"):
        raise ConstmigError("demo migration finished but the state checksum did not match")


if __name__ == "__main__":
    main()
