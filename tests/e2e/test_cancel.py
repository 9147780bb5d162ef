"""Cancelling a migration: `migrate --cancel`, Ctrl-C, and a CLI that dies. Before the commit
point the source runs on with all its data and the destination holds nothing; past it, a cancel is
refused and the migration goes on. Real agents, real CLI processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import checksum, launch, running_at, wait_gone
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.launcher import LaunchSpec

pytestmark = pytest.mark.e2e


def cm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def start_migrate(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "constmig", "migrate", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_status(addr: str, wanted: str, name: str = "kv", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (st := request(addr, {"op": "status"})["enclaves"].get(name, {}).get("status")) != wanted:
        assert time.monotonic() < deadline, f"{name} at {addr} is {st}, not {wanted}"
        time.sleep(0.05)


def slow_precopy(a: str, b: str) -> subprocess.Popen:
    """A pre-copy whose first round takes ~16 s (64 MiB at 4 MB/s): a long time before the commit point."""
    p = start_migrate("kv", "--from", a, "--to", b, "--strategy", "precopy", "--max-bandwidth", "4M", "--json", "-")
    wait_status(a, "migrating-out")
    time.sleep(0.5)  # into the round
    return p


def rolled_back(a: str, b: str, before: str) -> None:
    wait_status(a, "running", timeout=10)
    assert running_at(a) and checksum(a) == before
    wait_gone(b)


def test_cancel_during_the_rounds_rolls_back_and_the_next_migration_works(cluster) -> None:
    a, b = cluster.addrs
    before = launch(a)
    p = slow_precopy(a, b)
    t0 = time.monotonic()
    c = cm("migrate", "--cancel", "kv", "--from", a)
    assert c.returncode == 0, c.stderr
    assert f"cancelled the migration of kv before its commit point: it keeps running on {a}" in c.stdout
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert p.returncode == 1 and "Traceback" not in err
    assert "cancelled before its commit point (cancelled by the operator)" in err, err
    rolled_back(a, b, before)
    again = cm("migrate", "kv", "--from", a, "--to", b, "--strategy", "stopcopy", "--json", "-")
    assert again.returncode == 0, again.stderr
    assert checksum(b) == before


def test_ctrl_c_with_nobody_to_ask_cancels(cluster) -> None:
    a, b = cluster.addrs
    before = launch(a)
    p = slow_precopy(a, b)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "Traceback" not in err
    assert "interrupted: cancelling the migration" in err and "cancelled before its commit point" in err, err
    rolled_back(a, b, before)


def test_a_killed_cli_leaves_no_enclave_blocked(cluster) -> None:
    a, b = cluster.addrs
    before = launch(a)
    p = slow_precopy(a, b)
    p.kill()
    p.wait()
    rolled_back(a, b, before)  # the agent saw its requester go and cancelled


@pytest.mark.parametrize("how", ["cancel", "kill the CLI"])
def test_a_destination_that_never_answers_blocks_nothing(cluster, how) -> None:
    """A destination that accepts TCP and says nothing: the prepare step waits. `--cancel` ends it at once,
    and so does a CLI that is killed (before, the source kept the enclave preparing-out ~120 s)."""
    a, _ = cluster.addrs
    before = launch(a)
    mute = socket.create_server(("127.0.0.1", 0))
    try:
        p = start_migrate("kv", "--from", a, "--to", f"127.0.0.1:{mute.getsockname()[1]}", "--json", "-")
        wait_status(a, "preparing-out")
        t0 = time.monotonic()
        if how == "cancel":
            c = cm("migrate", "--cancel", "kv", "--from", a)
            assert c.returncode == 0, c.stderr
            out, err = p.communicate(timeout=30)
            assert "cancelled before its commit point" in err, err
        else:
            p.kill()
            p.wait()
            wait_status(a, "running", timeout=5)
        assert time.monotonic() - t0 < 5
        assert running_at(a) and checksum(a) == before
    finally:
        mute.close()


def test_cancel_past_the_commit_point_is_refused_and_the_migration_finishes(cluster) -> None:
    a, b = cluster.addrs
    before = launch(a)
    p = start_migrate("kv", "--from", a, "--to", b, "--strategy", "constmig", "--tracker", "access",
                      "--max-bandwidth", "8M", "--json", "-")
    wait_status(a, "handed-off")
    c = cm("migrate", "--cancel", "kv", "--from", a)
    assert c.returncode == 1 and "Traceback" not in c.stderr
    assert "passed its commit point (the destination runs it); it cannot be undone and goes on" in c.stderr
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert checksum(b) == before


def test_cancel_with_nothing_to_cancel(cluster) -> None:
    a, _ = cluster.addrs
    launch(a)
    c = cm("migrate", "--cancel", "kv", "--from", a)
    assert c.returncode == 1 and "no migration of 'kv' is in progress on this agent (it is running)" in c.stderr
    c = cm("migrate", "--cancel", "nope", "--from", a)
    assert c.returncode == 1 and "no enclave named 'nope' on this agent" in c.stderr
    c = cm("migrate", "--cancel", "kv", "--from", a, "--to", a)
    assert c.returncode == 1 and "drop --to and --resume" in c.stderr


def test_a_prepared_destination_nobody_connects_to_frees_its_name(cluster) -> None:
    """A source that prepared a destination and vanished: the empty instance drops itself after the
    migration's timeout, so the name is free again (and `drop_in` frees it at once)."""
    _, b = cluster.addrs
    spec = LaunchSpec("kv", "kvstore", 16 << 20).to_wire()
    request(b, {"op": "prepare_in", "spec": spec, "strategy": "stopcopy", "timeout": 1.0})
    assert request(b, {"op": "status"})["enclaves"]["kv"]["status"] == "incoming"
    wait_gone(b, timeout=10)
    request(b, {"op": "prepare_in", "spec": spec, "strategy": "stopcopy", "timeout": 60.0})
    assert request(b, {"op": "drop_in", "name": "kv"}) == "dropped"
    wait_gone(b, timeout=5)
    with pytest.raises(AgentError, match="no prepared, unconnected incoming enclave named 'kv' here"):
        request(b, {"op": "drop_in", "name": "kv"})
