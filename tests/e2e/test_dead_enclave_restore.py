"""An enclave that dies while its agent lives (killed, or crashed after COMMIT) comes back from its
checkpoint with the restore command the agents print, run exactly as printed: the dead copy the agent
still lists (status "exited") gives its name to the restored one instead of refusing it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from conftest import launch
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import app_checksum, migrate

pytestmark = pytest.mark.e2e


def status_of(addr: str, name: str = "kv") -> dict[str, Any]:
    return request(addr, {"op": "status"})["enclaves"].get(name, {})


def wait_for(what: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def run_as_printed(command: str) -> subprocess.CompletedProcess:
    """The line exactly as the agent printed it: `constmig` is the installed command."""
    assert command.startswith("constmig restore "), command
    return subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(180)
def test_a_killed_enclave_restores_with_the_command_its_agent_serves(cluster):
    a, _ = cluster.addrs
    before = launch(a, heap=16 << 20)
    ckpt = request(a, {"op": "checkpoint", "name": "kv"})["path"]
    os.kill(status_of(a)["pid"], signal.SIGKILL)
    wait_for(lambda: status_of(a)["status"] == "exited")
    command = status_of(a)["restore"]
    assert command == f"constmig restore {ckpt} --agent {a} --name kv"
    log = (cluster.base / "agent-a.log").read_text()
    assert "enclave kv" in log and "died: killed by SIGKILL" in log and command in log  # logged with its signal
    p = run_as_printed(command)
    assert p.returncode == 0, p.stderr
    assert status_of(a)["status"] == "running"
    assert app_checksum(a, "kv") == before  # the data is there


@pytest.mark.timeout(180)
def test_a_destination_that_dies_after_commit_restores_with_the_command_the_source_prints(cluster):
    """The issue's case: the destination enclave dies after COMMIT while its agent lives on; the source
    strands the enclave and prints the restore command for the destination host, which works as printed."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    request(a, {"op": "checkpoint", "name": "kv"})
    box: dict[str, str] = {}

    def run() -> None:
        try:
            migrate("kv", a, b, "constmig", tracker="access", max_bandwidth=2 << 20, timeout=10, resume_deadline=30)
        except AgentError as e:
            box["error"] = str(e)

    th = threading.Thread(target=run)
    th.start()
    wait_for(lambda: status_of(a).get("status") == "handed-off" and status_of(b).get("status") == "running")
    os.kill(status_of(b)["pid"], signal.SIGKILL)  # past COMMIT, chunks still missing there
    th.join(60)
    error = box.get("error", "")
    assert "The enclave is stranded" in error, error
    command = error.split("restores on the destination host (the lineage moved there at the commit point): ")[1]
    command = command.split(" (copy the file there first")[0]
    assert command.startswith("constmig restore ") and f"--agent {b} --name kv" in command, error
    p = run_as_printed(command)
    assert p.returncode == 0, p.stderr
    assert app_checksum(b, "kv") == before
