"""Pre-copy when the enclave's write tracker loses track: a write fault whose chunk
cannot be opened again (mprotect fails with ENOMEM once vm.max_map_count is reached), or a scan that
cannot re-protect what it found, must neither kill the app nor lose a write. The tracker says tracking
is lost, every chunk counts as written, the rounds end at once with the reason in the figures, and the
stop sends the rest: the destination runs with every byte, including a write made during the round.

Real `source.run` and `destination.run` in-process over a socketpair; the loss is injected at the
mprotect level (tests/enclave/test_dirty.py provokes the handler's for real, in a child process)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from scripted import TIMEOUT, Enclaves, Runner

from constmig.enclave import dirty
from constmig.errors import MigrationError
from constmig.migration import destination, source

_ENCLAVE = dirty.enclave_problem()
pytestmark = pytest.mark.skipif(_ENCLAVE is not None, reason=f"enclave handler: {_ENCLAVE}")


class _LosingHandler:
    """The real handler module, except that its flag says a chunk could not be opened once `lose` is set."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.losing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def lost(self, base: int) -> tuple[int, int]:
        return (errno.ENOMEM, 0) if self.losing else self._real.lost(base)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["handler", "re-protect"])
def test_tracking_lost_ends_the_rounds_and_the_stop_sends_everything(enclaves: Enclaves, pair, monkeypatch,
                                                                      where) -> None:
    src = enclaves.filled("host-a")
    dst = enclaves.build("host-b", incoming=True)
    assert src.app is not None
    everything = len(src.heap.export_chunks())
    handler = _LosingHandler(dirty._wtrack)
    monkeypatch.setattr(dirty, "_wtrack", handler)
    real_protect = dirty.protect_chunks
    written: dict[str, Any] = {}

    def protect(heap, chunks, prot):
        if handler.losing and where == "re-protect" and prot == dirty.EnclaveWriteTracker.protection:
            raise MigrationError("mprotect of heap chunks 3..3 failed: Cannot allocate memory")
        return real_protect(heap, chunks, prot)

    monkeypatch.setattr(dirty, "protect_chunks", protect)

    def progress(info: dict) -> None:
        # The end of round 1: every chunk went once; the app writes into one already sent, then loses track.
        if info.get("phase") == "round" and info.get("done") == info.get("total") and not written:
            src.app.put("fill-0", b"written during round 1")
            written["checksum"] = src.app.checksum()
            handler.losing = True

    receiving = Runner(destination.run, dst, [pair[0]], {"timeout": TIMEOUT}, lambda info: None)
    # without a loss these rounds would go on: a tiny downtime budget, several rounds allowed
    req = {"strategy": "precopy", "timeout": TIMEOUT, "write_tracking": "enclave", "max_downtime": 0.0,
           "max_rounds": 5}
    figures = Runner(source.run, src, [pair[1]], req, progress).value()
    receiving.value()
    assert written, "round 1 never reported its end"
    assert figures["rounds"] == 1 and figures["rounds_ended"] == "tracking-lost", figures
    assert 0 < figures["precopy_s"] < TIMEOUT and figures["precopy_rate_gbps"] > 0, figures
    assert "tracking_lost" in figures and "Cannot allocate memory" in figures["tracking_lost"], figures
    assert figures["final_chunks"] == everything, figures  # no round's version counted: all went at the stop
    assert dst.app is not None and dst.app.checksum() == written["checksum"]
    assert dst.app.get("fill-0") == b"written during round 1"
