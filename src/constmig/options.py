"""What every `constmig` command group shares on the command line: size and duration options, `--json`
output, `--etcd`, and the strategy and tracker choices. A leaf below cli.py and the groups it registers
(bench/cli.py), so that a group can use them without importing cli.py back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from constmig.errors import ConfigError
from constmig.migration import constants
from constmig.units import check_writable, parse_duration, parse_size
from constmig.wire import control

STRATEGY_CHOICES = click.Choice(list(constants.STRATEGIES))
DEFAULT_STRATEGY = control.DEFAULT_STRATEGY  # one default for CLI, agent and enclave (wire/control.py)
TRACKER_CHOICES = click.Choice(["auto", *constants.TRACKERS])
TRACKER_HELP = ("How the destination finds chunks the resumed app needs before they arrived (constmig, hybrid): "
                "fault = userfaultfd and a pager process, access = instrumented heap arrays, auto = fault "
                "where userfaultfd works.")
ETCD_HELP = "The fleet directory, an etcd endpoint like http://127.0.0.1:2379 (https:// with TLS) [env: CONSTMIG_ETCD]."


class Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


def _export(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An --etcd-* option stands for its environment variable: set it for this process, where every
    connection to the store reads it (host/etcd_auth.py), the agent's included."""
    if value is not None and param.envvar:
        os.environ[str(param.envvar)] = str(value)
    return value


def etcd_option(help_text: str = ETCD_HELP) -> Any:
    """--etcd URL, and the TLS files and user for a store that asks for them (the password only from
    $CONSTMIG_ETCD_PASSWORD: a command line is visible to every user of the machine)."""
    from constmig.host.etcd_auth import ENV

    options = [click.option("--etcd", default=None, envvar="CONSTMIG_ETCD", metavar="URL", help=help_text),
               *(click.option(f"--etcd-{field}", envvar=ENV[field], metavar=meta, expose_value=False, callback=_export,
                              help=f"{what} [env: {ENV[field]}].")
                 for field, meta, what in (
                     ("ca", "PEM", "With an https:// --etcd: the CA that signed the store's certificate"),
                     ("cert", "PEM", "With an https:// --etcd: this client's certificate, if the store asks for one"),
                     ("key", "PEM", "The key of --etcd-cert"),
                     ("user", "NAME", "The etcd user, if the store has users on (its password from "
                                      "$CONSTMIG_ETCD_PASSWORD)")))]

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def write_json(obj: Any, path: str | None) -> None:
    """`--json -` prints to stdout, `--json FILE` writes the file."""
    if path is None:
        return
    text = json.dumps(obj, indent=2, sort_keys=True)
    if path == "-":
        click.echo(text)
    else:
        check_writable(path, "--json")
        Path(path).write_text(text + "\n")
