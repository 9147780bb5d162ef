"""The link breaks with COMMIT in flight (docs/reliability.md, hostile-host sequence 3).

The source records HANDED_OFF and then sends COMMIT; a proxy between the agents cuts the connection at
exactly that record. A destination that aborted and wiped at the end of the stream, with the source
handed off and its reconnects refused, would leave no copy that could run. So the destination keeps
waiting, and:
- a reconnect from the source (keyed with the migration's resume secret, which only a handed-off source
  uses) stands for the lost COMMIT: the destination runs the enclave and the move completes;
- if no reconnect comes before the destination's commit deadline, it gives up, wipes, and answers the
  source's later reconnect with an authenticated ABORT: the source runs the enclave again.
Either way exactly one copy runs, with every acknowledged write.

With a sealed checkpoint, the lineage (counter and key) changes hosts across the same gap: the
destination holds it pending from READY, and the source's host gets the release code that completes it
once the source let go. A destination killed before it handled COMMIT restores there with that code; one
that gave up (and destroyed its pending counter before its ABORT) makes the code worthless.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from mitm import MitmProxy, RecordTamper
from test_live_postcopy import VARIANTS

from conftest import checksum, launch
from constmig.client import EnclaveClient
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import migrate, resume
from constmig.wire.records import Kind

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]

COMMIT = 3  # the third CONTROL record from the source on the main channel: STATE, HEAP_END, COMMIT


class CommitCutter:
    """Cut the main data connection at the COMMIT record (once); while `blocked`, cut every data
    connection at its first record (the link stays down for reconnects)."""

    def __init__(self, on_cut: Callable[[], None] | None = None) -> None:
        self.controls = 0
        self.cut = False
        self.blocked = False
        self.on_cut = on_cut  # what the host does at that moment
        self._lock = threading.Lock()

    def __call__(self, channel: str, n: int, header, record: bytes) -> list[bytes] | None:
        with self._lock:
            if self.blocked and self.cut:
                return None
            if channel == "main" and header.kind == Kind.CONTROL and not self.cut:
                self.controls += 1
                if self.controls == COMMIT:
                    if self.on_cut is not None:
                        self.on_cut()
                    self.cut = True
                    return None
        return [record]


def status(addr: str, name: str = "kv") -> dict:
    return request(addr, {"op": "status"})["enclaves"].get(name, {})


def written_keys(addr: str) -> dict[str, bytes]:
    c = EnclaveClient(addr, "kv")
    try:
        return {f"client-{i}": c.call("get", f"client-{i}") for i in range(32)}
    finally:
        c.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_lost_commit_is_stood_for_by_the_reconnect(cluster, variant) -> None:
    strategy, tracker = variant
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    keys = written_keys(a)
    cutter = CommitCutter()
    proxy = MitmProxy(b, RecordTamper(cutter))
    try:
        figures = migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=20, resume_deadline=20)
        assert cutter.cut, "the proxy never saw COMMIT"
        assert figures["resumes"] >= 1
        assert status(b).get("state") == "running" and "kv" not in request(a, {"op": "status"})["enclaves"]
        assert checksum(b) == before
        assert written_keys(b) == keys
    finally:
        proxy.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_destination_that_gave_up_gives_the_enclave_back(cluster, variant) -> None:
    strategy, tracker = variant
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    keys = written_keys(a)
    ckpt = request(a, {"op": "checkpoint", "name": "kv"})["path"]
    keys_b = cluster.base / "host-b" / "platform" / "enclaves"
    kept: dict[str, bytes] = {}

    def keep_key_files() -> None:  # the host copies B's pending key file while B waits for COMMIT
        kept.update({f.name: f.read_bytes() for f in keys_b.glob("*.key")})

    cutter = CommitCutter(keep_key_files)
    cutter.blocked = True  # after the cut at COMMIT, nothing gets through
    proxy = MitmProxy(b, RecordTamper(cutter))
    try:
        with pytest.raises(AgentError, match="could not be resumed") as failed:
            migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=4, resume_deadline=2)
        assert cutter.cut
        assert status(a).get("status") == "failed"  # handed off: it may not run, and keeps everything
        deadline = time.monotonic() + 30
        while status(b).get("status") != "aborted":  # B's wait for COMMIT ends: it wipes, keeps answering
            assert time.monotonic() < deadline, status(b)
            time.sleep(0.1)
        assert status(b).get("state") is None  # not running
        cutter.blocked = False
        with pytest.raises(AgentError, match="gave the migration up before resuming"):
            resume("kv", a, timeout=10, resume_deadline=10)
        assert status(a).get("status") == "running" and status(a).get("state") == "running"
        assert checksum(a) == before
        assert written_keys(a) == keys
        assert status(b).get("status") == "aborted"
        # The host read the release code in the error, puts back the pending key file it copied, and tries
        # the code on it: B destroyed the counter it names before its ABORT. No second copy.
        code = re.search(r"--release ([0-9a-f]{64})", str(failed.value))
        assert code is not None, failed.value
        assert len(kept) == 1, kept
        for name, blob in kept.items():
            (keys_b / name).write_bytes(blob)
        with pytest.raises(AgentError, match="monotonic counter does not exist on this platform"):
            request(b, {"op": "restore", "path": ckpt, "name": "kv2", "release": code.group(1)})
        request(b, {"op": "stop", "name": "kv"})
        assert "kv" not in request(b, {"op": "status"})["enclaves"]
    finally:
        proxy.close()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *argv], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("variant", [("stopcopy", "fault"), ("constmig", "access")])
def test_the_release_code_cannot_fork_an_enclave_whose_destination_still_waits(cluster, variant) -> None:
    """As the host plays it with the stock CLI: it drops COMMIT and every reconnect, reads
    the release code in the source's status, and restores the checkpoint on the destination host while the
    incoming instance still waits for COMMIT. The incoming instance holds the pending lineage while it
    lives, so the restore is refused; when it gives up, its ABORT gives the enclave back to the source, and
    the code is worthless from then on. Exactly one copy runs, and it has every acknowledged write."""
    strategy, tracker = variant
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    keys = written_keys(a)
    ckpt = request(a, {"op": "checkpoint", "name": "kv"})["path"]
    cutter = CommitCutter()
    cutter.blocked = True
    proxy = MitmProxy(b, RecordTamper(cutter))
    try:
        with pytest.raises(AgentError, match="could not be resumed"):
            # B waits up to 15 s for COMMIT: the window in which the host tries the code
            migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=15, resume_deadline=2)
        recovery = status(a).get("recovery", "")
        code = re.search(r"--release ([0-9a-f]{64})", recovery)
        assert code is not None, status(a)
        assert status(b).get("status") not in (None, "aborted"), status(b)  # the incoming instance still waits
        forked = _cli("restore", ckpt, "--agent", b, "--name", "kv2", "--release", code.group(1))
        assert forked.returncode != 0, "the host restored a second copy while the incoming instance waits"
        assert "Traceback" not in forked.stderr and len(forked.stderr.strip().splitlines()) == 1, forked.stderr
        assert "still runs on this platform" in forked.stderr, forked.stderr
        deadline = time.monotonic() + 30
        while status(b).get("status") != "aborted":  # B's wait for COMMIT ends: it gives up
            assert time.monotonic() < deadline, status(b)
            time.sleep(0.1)
        cutter.blocked = False
        with pytest.raises(AgentError, match="gave the migration up before resuming"):
            resume("kv", a, timeout=10, resume_deadline=10)
        assert status(a).get("state") == "running"
        assert checksum(a) == before and written_keys(a) == keys
        late = _cli("restore", ckpt, "--agent", b, "--name", "kv2", "--release", code.group(1))
        assert late.returncode != 0 and "no persistent state on this platform" in late.stderr, late.stderr
        assert "kv2" not in request(b, {"op": "status"})["enclaves"]
    finally:
        proxy.close()


def test_a_destination_killed_before_it_handled_commit_restores_with_the_release_code(cluster, tmp_path) -> None:
    """The gap of one message: the source sent COMMIT (and let go of the lineage), the destination died
    holding it pending. The source's error names the checkpoint and the release code; the restore it
    prints works on the destination host, and without the code it is refused in one line."""
    import os

    from constmig.host.pki import issue

    a, b = cluster.addrs
    # The printed command names the destination as the source reached it (here through the proxy, which
    # no local socket serves): an operator's certificate from the fleet's CA administers it over the network.
    operator = {**os.environ, "CONSTMIG_ADMIN_CERT": str(issue(cluster.ca_dir, "operator", "ops", tmp_path / "op").folder)}
    launch(a, heap=32 << 20)
    ckpt = request(a, {"op": "checkpoint", "name": "kv"})["path"]
    at_ckpt = checksum(a)
    cutter = CommitCutter()
    cutter.blocked = True
    proxy = MitmProxy(b, RecordTamper(cutter))
    box: dict[str, str] = {}

    def run() -> None:
        try:
            migrate("kv", a, proxy.addr, "stopcopy", timeout=4, resume_deadline=30)
        except AgentError as e:
            box["error"] = str(e)

    th = threading.Thread(target=run)
    try:
        th.start()
        deadline = time.monotonic() + 30
        while not cutter.cut:  # COMMIT left the source and never reached the destination
            assert time.monotonic() < deadline and th.is_alive(), box
            time.sleep(0.02)
        cluster.kill_agent(1)
        cluster.start_agent(1, b)
        cutter.blocked = False
        th.join(60)
        error = box.get("error", "")
        assert "The enclave is stranded" in error, error
        printed = re.search(r"constmig restore \S+ --agent \S+ --name kv --release [0-9a-f]{64}", error)
        assert printed is not None, error
        assert "--release" in status(a).get("recovery", ""), status(a)  # also there for the operator later
        argv = shlex.split(printed.group(0))[1:]
        without = subprocess.run([sys.executable, "-m", "constmig", *argv[:-2]], capture_output=True, text=True,
                                 timeout=120, stdin=subprocess.DEVNULL, env=operator)
        assert without.returncode != 0 and "Traceback" not in without.stderr
        assert "lineage on this platform is pending" in without.stderr and len(without.stderr.splitlines()) == 1
        done = subprocess.run([sys.executable, "-m", "constmig", *argv], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, env=operator)
        assert done.returncode == 0, done.stderr
        assert argv[1] == ckpt
        assert checksum(b) == at_ckpt
        assert status(a).get("status") == "failed"  # the source still may not run it: one copy
    finally:
        proxy.close()
