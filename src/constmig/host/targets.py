"""`constmig metrics targets`: Prometheus's file-based service discovery from the fleet directory.

Every live agent registers its `metrics_url` in etcd (docs/fleet.md), so the directory already knows
what to scrape. This writes it as a `file_sd_configs` file (deploy/prometheus/prometheus.yml reads
`targets/*.json`): one group per agent, labelled with its host id and listen address, so the alerts can
name a host. The file is replaced in one rename, as Prometheus asks (it never reads half a file); run
it from a timer (or `--every SECONDS`) to follow the fleet.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from constmig.errors import ConfigError
from constmig.host.address import parse_addr
from constmig.options import etcd_option
from constmig.units import check_writable


def file_sd(hosts: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The target groups of every agent that serves metrics, the agents that do not, and the ones whose
    record names a metrics URL on another host than the agent's own (by listen). A directory record is
    its host's word: taken as it is, it would point the fleet's Prometheus at any address the host likes."""
    groups, without, elsewhere = [], [], []
    for listen, entry in sorted(hosts.items()):
        url = urlsplit(str(entry.get("metrics_url") or ""))
        if url.scheme not in ("http", "https") or not url.netloc:
            without.append(listen)
            continue
        try:
            own = parse_addr(listen)[0]
        except ConfigError:
            own = None
        if url.hostname is None or own is None or url.hostname.lower() != own.lower():
            elsewhere.append(listen)
            continue
        labels = {"host_id": str(entry.get("host_id") or listen), "listen": listen,
                  "__metrics_path__": url.path or "/metrics", "__scheme__": url.scheme}
        groups.append({"targets": [url.netloc], "labels": labels})
    return groups, without, elsewhere


def write_targets(groups: list[dict[str, Any]], out: str) -> None:
    """`-`: stdout; else the file, replaced atomically (a temporary beside it, then a rename)."""
    text = json.dumps(groups, indent=2, sort_keys=True) + "\n"
    if out == "-":
        click.echo(text, nl=False)
        return
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None


def read_fleet(etcd: str) -> dict[str, dict[str, Any]]:
    from constmig.host.directory import blocking

    async def read(d: Any) -> dict[str, dict[str, Any]]:
        return await d.hosts()

    return blocking(etcd, read)


@click.group("metrics")
def metrics() -> None:
    """Prometheus for the fleet: the agents' metrics as scrape targets (docs/metrics.md)."""


@metrics.command("targets")
@etcd_option("The fleet directory whose live agents to list (http://HOST:PORT) [env: CONSTMIG_ETCD].")
@click.option("--out", default="-", show_default=True, metavar="FILE",
              help="The file_sd JSON file to write (replaced atomically); - prints it.")
@click.option("--every", type=click.FloatRange(min=0.5), default=None, metavar="SECONDS",
              help="Write it again every SECONDS until interrupted (else once).")
def targets(etcd: str | None, out: str, every: float | None) -> None:
    """Write Prometheus file_sd targets: every live agent in the directory that serves metrics."""
    if etcd is None:
        raise ConfigError("name the fleet directory: --etcd URL (or set CONSTMIG_ETCD)")
    check_writable(out, "--out")
    while True:
        groups, without, elsewhere = file_sd(read_fleet(etcd))
        write_targets(groups, out)
        if without:
            click.echo(f"{len(without)} agent(s) serve no metrics (start them with --metrics-listen): "
                       f"{', '.join(without)}", err=True)
        if elsewhere:
            click.echo(f"{len(elsewhere)} agent(s) left out: their directory record names a metrics URL on "
                       f"another host than their own: {', '.join(elsewhere)}", err=True)
        if every is None:
            return
        sys.stdout.flush()
        time.sleep(every)
