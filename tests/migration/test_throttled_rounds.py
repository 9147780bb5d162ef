"""Pre-copy rounds that do not converge, throttled: real `source.run` and `destination.run` in-process
over a socketpair, the source's app written all over by a client thread through the runtime's ECALL
path (where the write limit applies) faster than a paced link carries it."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from scripted import TIMEOUT, Enclaves, Runner

from constmig.enclave.dirty import EnclaveWriteTracker, enclave_problem, kernel_problem
from constmig.migration import destination, source

_ENCLAVE = enclave_problem()
pytestmark = pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")


class Writer(threading.Thread):
    """Overwrites the filled keys all over the table, one call at a time, as a client would (the table is
    full: new keys would not fit); remembers what it wrote."""

    def __init__(self, enclave: Any) -> None:
        super().__init__(daemon=True)
        self.enclave, self.stop, self.acked, self.calls = enclave, threading.Event(), {}, 0
        self.slowest = 0.0
        self.keys = int(enclave.app.count)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key, value = f"fill-{(i * 7919) % self.keys}", os.urandom(16)
            t0 = time.monotonic()
            try:
                self.enclave.ecall("put", [key, value], {})
            except Exception:  # the enclave stopped: the migration's commit point came
                return
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.acked[key] = value
            self.calls += 1
            i += 1


def _migrate(enclaves: Enclaves, pair, **options: Any) -> tuple[dict, Writer, Any]:
    src = enclaves.filled("host-a")
    dst = enclaves.build("host-b", incoming=True)
    writer = Writer(src)
    receiving = Runner(destination.run, dst, [pair[0]], {"timeout": TIMEOUT}, lambda info: None)
    frames: list[dict] = []
    writer.start()
    time.sleep(0.2)  # the writer is going before the rounds begin
    req = {"strategy": "precopy", "timeout": TIMEOUT, "max_bandwidth": 4 << 20, "max_downtime": 0.6,
           "max_rounds": 20, **options}
    try:
        figures = Runner(source.run, src, [pair[1]], req, frames.append).value()
    finally:
        writer.stop.set()
        writer.join(10)
    receiving.value()
    figures["frames"] = frames
    return figures, writer, dst


@pytest.mark.timeout(120)
def test_a_throttled_writer_lets_the_rounds_converge_and_loses_no_write(enclaves: Enclaves, pair) -> None:
    figures, writer, dst = _migrate(enclaves, pair, max_throttle=0.9)
    throttle = figures["throttle"]
    assert figures["write_tracking"] == "enclave", figures  # the one that counts each call's writes
    # a writer this far ahead of the link is seen by the first round's probe: throttled from there on
    assert figures["throttle_from"] == "probe" and throttle[0] >= 0.2 and throttle == sorted(throttle), figures
    assert figures["rounds_ended"] == "fits" and figures["held_calls"] > 0 and figures["held_s"] > 0, figures
    assert figures["unthrottled_dirty_rate"] > 0, figures
    ends = [f for f in figures["frames"] if f.get("phase") == "round_end"]
    assert ends and all(f["left"] >= 0 and f["left"] % (1 << 20) == 0 and f["rate"] > 0 for f in ends), ends
    # bytes a second: what the round left over its time, which took between 10 ms and 10 s
    assert all(f["left"] / 10 <= f["dirty_rate"] <= f["left"] * 100 for f in ends), ends
    assert [f["throttle"] for f in ends] == throttle[1:], (ends, throttle)  # what the next round ran at
    assert writer.slowest < 1.5, "a held call waits at most about a second"
    assert writer.calls > 0 and dst.app is not None
    for key, value in writer.acked.items():  # every acknowledged write is at the destination
        assert dst.app.get(key) == value, key


@pytest.mark.timeout(120)
def test_unthrottled_the_same_writer_ends_the_rounds_unconverged(enclaves: Enclaves, pair) -> None:
    figures, writer, dst = _migrate(enclaves, pair)
    assert figures["rounds_ended"] == "not-shrinking" and set(figures["throttle"]) == {0.0}, figures
    assert "held_calls" not in figures and "unthrottled_dirty_rate" not in figures, figures
    for key, value in writer.acked.items():
        assert dst.app.get(key) == value, key


@pytest.mark.timeout(120)
@pytest.mark.skipif(kernel_problem() is not None, reason=f"kernel write tracking: {kernel_problem()}")
def test_where_the_enclave_tracker_cannot_hold_the_heap_the_rounds_go_on_unthrottled(enclaves: Enclaves, pair,
                                                                                   monkeypatch) -> None:
    """The throttle needs the enclave's write tracker; where the mapping budget cannot hold the heap's
    chunks, a throttle the operator did not pin to a tracker gives way: the kernel's tracks the rounds,
    the figures say why nothing was throttled, and the migration completes."""
    monkeypatch.setattr(EnclaveWriteTracker, "budget_problem", lambda self: "write tracking is unavailable: test")
    figures, writer, dst = _migrate(enclaves, pair, max_throttle=0.9, max_rounds=3)
    assert figures["write_tracking"] == "kernel" and figures["throttle_unavailable"].endswith(": test"), figures
    assert set(figures["throttle"]) == {0.0}, figures
    for key, value in writer.acked.items():
        assert dst.app.get(key) == value, key
