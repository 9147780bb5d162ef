"""`migrate --data-plane native` through real agents and enclave processes: the source's bulk chunks go
through the native engine (docs/native.md, step 2a), and so does ConstMig's post-copy stream at both ends
(step 2b: the Fault Tracker's pager receives natively while the app faults); the enclave arrives whole
and its figures say so; a man in the middle who flips or drops a chunk record of a native batch is refused
as on the Python path (tests/e2e/test_attacks.py tampers the native post-copy stream)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mitm import MitmProxy, RecordTamper
from test_attacks import BEFORE_COMMIT, _chunk_attack, source_runs_on

from conftest import checksum, launch, running_at
from constmig.enclave.dirty import enclave_problem, kernel_problem
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import migrate
from constmig.native import engine

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")]


def test_the_cli_migrates_on_the_native_data_plane_and_back(cluster):
    a, b = cluster.addrs
    before = launch(a)
    p = subprocess.run([sys.executable, "-m", "constmig", "migrate", "kv", "--from", a, "--to", b, "--strategy",
                        "stopcopy", "--data-plane", "native", "--json", "-"], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    figures = json.loads(p.stdout)
    assert figures["data_plane"] == "native" and figures["strategy"] == "stopcopy", figures
    assert figures["wire_bytes"] > figures["state_bytes"] > 0, figures
    assert checksum(b) == before and running_at(b)
    assert "kv" not in request(a, {"op": "status"})["enclaves"]
    if kernel_problem() is None or enclave_problem() is None:  # the rounds need one way to track writes
        back = migrate("kv", b, a, "precopy", data_plane="native", max_rounds=3)  # the rounds, natively too
        assert back["data_plane"] == "native" and back["rounds"] >= 1, back
    else:
        back = migrate("kv", b, a, "stopcopy", data_plane="native")
    assert checksum(a) == before and running_at(a)
    assert migrate("kv", a, b, "stopcopy")["data_plane"] == "python"  # the default


def test_constmig_with_the_fault_tracker_streams_natively_while_the_app_faults(cluster):
    a, b = cluster.addrs
    before = launch(a)
    cli = subprocess.Popen([sys.executable, "-m", "constmig", "migrate", "kv", "--from", a, "--to", b, "--strategy",
                            "constmig", "--tracker", "fault", "--data-plane", "native", "--max-bandwidth", "16M",
                            "--json", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not running_at(b) and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        during = checksum(b)  # every page of the heap, most still on their way: the app faults for them
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, err
    figures = json.loads(out)
    assert during == before and checksum(b) == before
    assert figures["strategy"] == "constmig" and figures["tracker"] == "fault", figures
    assert figures["data_plane"] == "native" and figures["recv_data_plane"] == "native", figures
    assert figures["faults"] > 0 and figures["demand_chunks"] > 0 and figures["background_chunks"] > 0, figures


@pytest.mark.adversarial
@pytest.mark.parametrize("kind", ["flip", "drop"])
def test_a_tampered_native_chunk_aborts_and_the_source_runs_on(cluster, kind):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    proxy = MitmProxy(b, RecordTamper(_chunk_attack(kind)))
    try:
        with pytest.raises(AgentError, match=BEFORE_COMMIT):
            migrate("kv", a, proxy.addr, "stopcopy", data_plane="native", timeout=20)
    finally:
        proxy.close()
    source_runs_on(a, b, before)
