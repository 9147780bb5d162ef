"""The example app outside the package (examples/ledger), installed as a user's own app would be:
found through its entry point, measured with the modules it declares, and migrated with every strategy
and both trackers under a client, with `constmig.testing.check_migrates` (the helper app authors use)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from constmig.apps import installed
from constmig.kernel.uffd import preflight

pytestmark = pytest.mark.skipif(importlib.util.find_spec("constmig_ledger") is None,
                                reason="the example app is not installed: pip install ./examples/ledger")


def cm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_the_example_app_is_found_through_its_entry_point():
    entry = installed()["ledger"]
    assert (entry.package, entry.target) == ("constmig-ledger", "constmig_ledger.app:Ledger")
    rows = json.loads(cm("apps", "--json").stdout)
    ledger = next(r for r in rows if r["name"] == "ledger")
    assert ledger["package"] == "constmig-ledger" and len(ledger["code_sha256"]) == 64


def test_ledger_logic_in_process():
    from constmig_ledger.app import Ledger

    from constmig.enclave.heap import Heap
    from constmig.errors import EnclaveError

    with Heap(4 << 20) as heap:
        app = Ledger(heap)
        app.setup(accounts=16)
        assert app.deposit("alice", 100) == 100
        assert app.deposit_many([["bob", 5], ["alice", 1]]) == 2
        assert app.transfer("alice", "bob", 30) == {"alice": 71, "bob": 35}
        with pytest.raises(EnclaveError, match="holds 35, less than 36"):
            app.transfer("bob", "alice", 36)
        with pytest.raises(EnclaveError, match="positive integer"):
            app.deposit("alice", "100")
        assert [row[:3] for row in app.history(2)] == [[-1, 0, 1], [0, 1, 30]]
        assert app.fill(0.5, 1)["journal"] >= app.journal.shape[0] // 2


@pytest.mark.e2e
def test_the_command_line_walkthrough_with_the_example_app():
    """docs/apps.md's commands: run it, call it with typed arguments, migrate it, find it moved."""
    from constmig.host.cluster import LocalCluster

    with LocalCluster(2) as c:
        a, b = c.addrs
        assert cm("run", "ledger", "--agent", a, "--heap", "16M", "--name", "l1").returncode == 0
        p = cm("call", "l1", "--agent", a, "deposit", "alice", "100")
        assert p.returncode == 0 and p.stdout.strip() == "100", p.stderr  # 100 arrived as an int
        p = cm("call", "l1", "--agent", a, "deposit_many", '[["bob", 5], ["carol", 7]]')
        assert p.returncode == 0 and p.stdout.strip() == "2", p.stderr
        p = cm("call", "l1", "--agent", a, "--raw", "deposit", "alice", "100")
        assert p.returncode != 0 and "an amount is a positive integer, not '100'" in p.stderr
        p = cm("migrate", "l1", "--from", a, "--to", b, "--strategy", "stopcopy", "--verify")
        assert p.returncode == 0, p.stderr
        p = cm("call", "l1", "--agent", a, "transfer", "alice", "bob", "30")
        assert p.returncode == 0 and json.loads(p.stdout) == {"alice": 70, "bob": 35}, p.stderr


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_example_app_migrates_with_every_strategy_and_tracker():
    from constmig.testing import check_migrates

    problem = preflight()
    variants = None if problem is None else ["stopcopy", "constmig-access"]
    report = check_migrates("ledger", heap="32M", fill=0.6, call=("balance", ["fill-3"]), strategies=variants)
    assert report.ok, report.problems
    assert report.calls > 20
    done = {m["variant"] for m in report.migrations}
    assert done == set(variants or ["stopcopy", "constmig-fault", "constmig-access", "precopy",
                                    "hybrid-fault", "hybrid-access", "auto-fault", "auto-access"])
    assert all(len([m for m in report.migrations if m["variant"] == v]) == 2 for v in done)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_readme_install_line_runs_as_written():
    """README: `pip install ./examples/ledger && constmig apps`, from the repository root, exactly."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (line,) = [x for x in (root / "README.md").read_text().splitlines() if x.startswith("pip install ./examples/")]
    p = subprocess.run(line, shell=True, cwd=root, capture_output=True, text=True, timeout=280,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-2000:]
    assert any(row.split()[:2] == ["ledger", "constmig-ledger"] for row in p.stdout.splitlines()), p.stdout
