"""`migrate --data-plane`: bad input is one line and a non-zero exit, before any agent is asked (the
addresses below answer nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from constmig import cli
from constmig.host.cluster import free_port
from constmig.native import engine
from constmig.wire import control


def _migrate(*extra: str) -> list[str]:
    return ["migrate", "kv", "--from", f"127.0.0.1:{free_port()}", "--to", f"127.0.0.1:{free_port()}", *extra]


def _one_line_error(out: str, fragment: str) -> None:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out, out


def test_an_unknown_data_plane_is_one_error_line():
    """Click's usage error, as for every bad choice: the usage, then one line that names the option."""
    p = subprocess.run([sys.executable, "-m", "constmig", *_migrate("--data-plane", "bogus")], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--data-plane" in errors[0] and "'bogus'" in errors[0], p.stderr


def test_native_where_the_engine_is_not_built_is_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(engine, "available", lambda: False)
    monkeypatch.setattr(engine, "why_unavailable", lambda: "the native engine was not built or does not load (test)")
    result = CliRunner().invoke(cli.main, _migrate("--data-plane", "native", "--strategy", "stopcopy"))
    assert result.exit_code == 1
    _one_line_error(result.output, "--data-plane native: the native engine was not built or does not load (test); "
                                   "use --data-plane python")


def test_the_request_refuses_what_the_cli_refuses():
    """An agent or enclave asked directly (not through the CLI) refuses the same, in one line."""
    with pytest.raises(control.BadRequest, match="unknown data plane 'bogus'; known: python, native"):
        control.decode({"op": "migrate", "name": "kv", "to": "x:1", "data_plane": "bogus"}, control.Migrate)
    # every strategy takes it since step 2b (docs/native.md): constmig's post-copy stream too
    for strategy in control.STRATEGIES:
        req = control.decode({"op": "migrate_out", "strategy": strategy, "data_plane": "native"}, control.MigrateOut)
        assert req.data_plane == "native"
    # an older sender's map, without the field: the Python path, as before
    assert control.decode({"op": "migrate_out", "strategy": "stopcopy"}, control.MigrateOut).data_plane == "python"

