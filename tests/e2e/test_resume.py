"""Post-copy recovery: the link breaks after the handoff, the agents reconnect, and the migration finishes.

A proxy between the agents cuts the migration's connection once, at a chosen point; the reconnect goes
through the same proxy and is left alone. Every acknowledged write must be readable afterwards and the
state checksum must be the one the source had. A link that keeps breaking ends, after the resume
deadline, with a clear error and a source that still holds everything.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time

import pytest
from mitm import MitmProxy, RecordTamper
from test_live_postcopy import TRACKERS, Migration

from conftest import launch
from constmig.bench.loadgen import KVHammer
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import app_checksum, migrate, resume
from constmig.wire.records import Kind

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def cut_once(after_chunks: int):
    """Forward until `after_chunks` chunk records (either channel) went through, then cut the connection
    carrying the next one, once."""
    state = {"chunks": 0, "cut": False}
    lock = threading.Lock()

    def on_record(channel, n, header, record):
        if header.kind != Kind.CHUNK:
            return [record]
        with lock:
            state["chunks"] += 1
            if not state["cut"] and state["chunks"] > after_chunks:
                state["cut"] = True
                return None
        return [record]

    return RecordTamper(on_record)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_stream_cut_midway_resumes_and_keeps_every_acknowledged_write(cluster, tracker):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    hammer = KVHammer(a, "kv", keys=300, write_ratio=0.3, seed=7)
    hammer.preload()
    proxy = MitmProxy(b, cut_once(after_chunks=1))
    try:
        hammer.start()
        figures = migrate("kv", a, proxy.addr, "constmig", tracker=tracker, max_bandwidth=4 << 20, timeout=30)
        report = hammer.stop()
        assert figures["resumes"] >= 1 and proxy.connections >= 4  # two channels, twice
        assert report.wrong == 0, report.errors[:3]
        assert hammer.verify() == 0  # every acknowledged write is there
        assert report.calls > 0
    finally:
        hammer.close()
        proxy.close()
    assert "kv" not in request(a, {"op": "status"})["enclaves"]  # the source finished and went away
    assert before  # (written before the hammer: covered by its verify and the next check)
    hist = request(b, {"op": "status"})["enclaves"]["kv"]
    assert hist["status"] == "running"


@pytest.mark.parametrize("tracker", TRACKERS)
def test_cut_then_resume_gives_the_source_state_exactly(cluster, tracker):
    """No concurrent writer: the destination's checksum must equal the source's at the stop."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    proxy = MitmProxy(b, cut_once(after_chunks=3))
    try:
        figures = migrate("kv", a, proxy.addr, "constmig", tracker=tracker, max_bandwidth=16 << 20, timeout=30)
    finally:
        proxy.close()
    assert figures["resumes"] >= 1
    assert app_checksum(b, "kv") == before


def test_stopcopy_done_lost_is_fetched_by_a_reconnect(cluster):
    """Stop-and-copy: the destination runs, but its RESUMED and DONE never reach the source."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    seen = {"controls": 0}

    def back(channel, n, header, record):
        if channel == "main" and header.kind == Kind.CONTROL:
            seen["controls"] += 1
            if seen["controls"] == 2:  # READY went through; RESUMED (and DONE after it) do not
                return None
        return [record]

    proxy = MitmProxy(b, back=RecordTamper(back))
    try:
        figures = migrate("kv", a, proxy.addr, "stopcopy", timeout=30)
    finally:
        proxy.close()
    assert figures["resumes"] == 1
    assert app_checksum(b, "kv") == before
    assert "kv" not in request(a, {"op": "status"})["enclaves"]


def test_link_that_keeps_breaking_fails_at_the_deadline_and_can_be_resumed_later(cluster):
    """Every connection is cut after a few chunks: the migration gives up at its resume deadline with a
    clear error, the source holds everything; once the link is healthy, `--resume` finishes it."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    broken = {"on": True}

    def on_record(channel, n, header, record):
        if broken["on"] and channel == "main" and header.kind == Kind.CHUNK and n % 50 >= 4:
            return None
        return [record]

    proxy = MitmProxy(b, RecordTamper(on_record))
    try:
        with pytest.raises(AgentError, match="could not be resumed within 2 s"):
            migrate("kv", a, proxy.addr, "constmig", tracker="access", max_bandwidth=8 << 20, timeout=30,
                    resume_deadline=2)
        st = request(a, {"op": "status"})
        assert st["enclaves"]["kv"]["status"] == "failed" and st["moved"]["kv"] == proxy.addr
        broken["on"] = False
        figures = resume("kv", a, timeout=30, resume_deadline=10)
    finally:
        proxy.close()
    assert figures["resumes"] >= 2
    assert app_checksum(b, "kv") == before
    assert "kv" not in request(a, {"op": "status"})["enclaves"]


@pytest.mark.parametrize("tracker", TRACKERS)
def test_calls_that_need_a_missing_chunk_wait_through_the_pause(cluster, tracker):
    """While the link is down, a call that needs a chunk not yet moved waits and then answers right."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    proxy = MitmProxy(b, cut_once(after_chunks=2))
    mig = Migration(a, proxy.addr, tracker, max_bandwidth=4 << 20)
    try:
        assert app_checksum(a, "kv") == before  # redirected to the destination; touches every chunk
        figures = mig.result()
    finally:
        proxy.close()
    assert figures["resumes"] >= 1


def test_a_destination_that_lost_its_copy_strands_the_enclave_at_once_and_says_how_to_restore(cluster):
    """The destination agent dies mid-stream and comes back without the enclave. The source
    stops reconnecting once the destination says so (not after its whole deadline), says the enclave is
    stranded and names the checkpoint that restores it there; `--resume` later says the same at once."""
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    ckpt = request(a, {"op": "checkpoint", "name": "kv"})["path"]
    box: dict = {}

    def run() -> None:
        try:
            migrate("kv", a, b, "constmig", tracker="access", max_bandwidth=4 << 20, timeout=10,
                    resume_deadline=30)
        except AgentError as e:
            box["error"] = str(e)

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 30
    # Mid-stream: the destination runs the enclave (it confirmed the checkpoints' lineage when it resumed).
    # Killed earlier, between READY and its handling of COMMIT, the restore also needs the release code
    # (test_commit_cut.py covers that case).
    while (request(a, {"op": "status"})["enclaves"].get("kv", {}).get("status") != "handed-off"
           or request(b, {"op": "status"})["enclaves"].get("kv", {}).get("status") != "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cluster.kill_agent(1)
    t0 = time.monotonic()
    cluster.start_agent(1, b)
    th.join(60)
    took = time.monotonic() - t0
    error = box.get("error", "")
    assert took < 15, took  # well inside the 30 s resume deadline
    assert "cannot be resumed: the destination answers \"no enclave named 'kv' here takes a reconnect\"" in error
    assert "The enclave is stranded: this source keeps every chunk but may not run it" in error
    restore = f"constmig restore {ckpt} --agent {b} --name kv"
    assert restore in error, error
    assert request(a, {"op": "status"})["enclaves"]["kv"]["status"] == "failed"
    t0 = time.monotonic()
    with pytest.raises(AgentError, match="The enclave is stranded"):
        resume("kv", a, timeout=10, resume_deadline=30)
    assert time.monotonic() - t0 < 10
    p = subprocess.run([sys.executable, "-m", "constmig", *shlex.split(restore)[1:]], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr  # the command it printed works, on the destination host
    assert app_checksum(b, "kv") == before
