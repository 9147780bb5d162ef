"""When the machine stood still under everything: a virtual machine whose hypervisor took a vCPU away.

On a VM with less host CPU than vCPUs (a CFS quota on the host's vCPU threads, "burstable" cloud
instances, the 2-vCPU machines these benches run on), a vCPU runs until its quota for the host's period is
spent, and every process queued on it then waits until the next period: here ~100 ms, whenever both vCPUs
are busy for long enough (two busy loops for 3 s: two 101 ms stops). A client call whose path crosses such
a vCPU waits for it, in every variant, stop-and-copy included: the machine's doing, not the migration's.
The guest counts it as steal time (/proc/stat, per CPU), which tells it from a process that merely waited
for a core (measured here: a 106 ms stop with 100 ms of steal on one vCPU, none on the other).

A small separate process (no GIL shared with the drivers) sleeps 1 ms at a time and notes every wake-up
later than `STALL_S` with the steal counted meanwhile, and every jump of another vCPU's steal by more
than that (its processes stood still; the probe ran on). The suite keeps each run's stops and says how much
of the longest client gap the machine was stopped for; the gap itself stays as measured.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass

STALL_S = 0.03  # a wake-up this late is a stop worth noting (the probe sleeps 1 ms)
STOLEN = 0.5  # a stop counts as the hypervisor's when steal covers at least this share of it

# The probe: one line per stop, "wall_start seconds steal_seconds". It sees a stop two ways: its own
# wake-up came late (it was queued on the stopped vCPU, or waited for a core: the steal tells which), or
# the other vCPU's steal jumped, which the guest counts in one go when that vCPU runs again.
_PROBE = r"""
import os, sys, time
hz = os.sysconf("SC_CLK_TCK")
def steal():
    try:
        with open("/proc/stat") as f:
            return [int(line.split()[8]) / hz for line in f if line.startswith("cpu") and line[3].isdigit()]
    except (OSError, IndexError, ValueError):
        return []
last, s0 = time.time(), steal()
while True:
    time.sleep(0.001)
    now, s = time.time(), steal()
    took = max((b - a for a, b in zip(s0, s)), default=0.0)
    if now - last > %(stall)r:
        print(f"{last:.4f} {now - last:.4f} {took:.4f}", flush=True)
    elif took > %(stall)r:
        print(f"{now - took:.4f} {took:.4f} {took:.4f}", flush=True)
    last, s0 = now, s
"""


@dataclass(frozen=True)
class Stall:
    at: float  # wall time (time.time()) the stop began
    seconds: float
    steal_s: float  # the most time the hypervisor took from one vCPU meanwhile

    @property
    def frozen(self) -> bool:
        """The hypervisor's doing (steal covers most of it), not a wait for a core inside the guest."""
        return self.steal_s >= STOLEN * self.seconds


class StallWatch:
    """The probe, for a block: `within(t0, t1)` gives the stops in a window of wall time."""

    def __init__(self) -> None:
        self.stalls: list[Stall] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> StallWatch:
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE % {"stall": STALL_S}], stdout=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                at, seconds, steal = (float(x) for x in line.split())
            except ValueError:
                continue
            self.stalls.append(Stall(at, seconds, steal))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(1.0)

    def within(self, t0: float, t1: float) -> list[Stall]:
        """The stops that overlap [t0, t1] (wall time); a stop is noted when it ends, so wait for it."""
        time.sleep(2 * STALL_S)
        return [s for s in list(self.stalls) if s.at < t1 and s.at + s.seconds > t0]


def frozen_overlap(stalls: list[Stall], start: float, seconds: float) -> float:
    """Seconds of [start, start + seconds] the machine was stopped by the hypervisor."""
    end = start + seconds
    return sum(max(0.0, min(end, s.at + s.seconds) - max(start, s.at)) for s in stalls if s.frozen)
