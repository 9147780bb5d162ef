"""Scheduling for post-copy's demand path: a waiting access outranks the background stream.

On a small machine the background stream keeps every core busy (encrypting, copying), so the few
threads that serve a fault (the pager's fault reader, both ends of the demand channel) would queue
behind it three times: for a CPU, for the GIL, which CPython hands over only every 5 ms by default,
and behind background chunks already queued in the kernel's socket buffers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

SWITCH_INTERVAL = 0.0002  # seconds a thread may keep the GIL while another waits for it
DEMAND_NICE = -10  # nice value of demand-path threads (needs CAP_SYS_NICE; skipped without it)
BACKGROUND_QUEUE_CHUNKS = 1  # socket buffer per side, in chunks (the kernel doubles it for bookkeeping)


def quick_gil_handoff() -> None:
    """Make this process hand the GIL over quickly (call in processes that stream)."""
    sys.setswitchinterval(SWITCH_INTERVAL)


def boost_this_thread() -> None:
    """Demand path: a higher CPU weight than the background stream, on the core kept for it."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DEMAND_NICE)
    _pin(demand=True)


DEMAND_QUIET_S = 0.005  # the background takes every core back once no demand was seen for this long


class BackgroundCores:
    """The background stream's cores, set by the thread itself before each chunk: all of them while no
    access waits, all but the demand path's core while one does (or did within DEMAND_QUIET_S).

    Measured on 2 vCPUs, 1 GiB kvstore: kept off the demand core all the time, the background ran at half
    its rate with no access waiting (its sender and receiver shared one core: 0.38-0.74 GB/s with the
    Fault Tracker and 0.83-0.95 with the Access Tracker, against 0.90-1.53 and 1.61-1.81 this way);
    sharing the core while accesses wait doubled the fault p99 (Access Tracker, a client calling
    throughout: 3.9-5.5 ms kept off, 9-12 ms shared). One sched_setaffinity per change."""

    def __init__(self) -> None:
        self._narrow: bool | None = None
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (OSError, AttributeError):
            cpus = []
        self._all, self._rest = set(cpus), set(cpus[:-1])

    def update(self, demand_busy: bool) -> None:
        if demand_busy == self._narrow or len(self._all) < 2:
            return
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, self._rest if demand_busy else self._all)
        self._narrow = demand_busy


def _pin(demand: bool) -> None:
    """Keep the last allowed core for the demand path: the demand threads run there (and only there)."""
    with contextlib.suppress(OSError, AttributeError):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[-1]} if demand else set(cpus[:-1]))


def shallow_queue(sock: socket.socket, option: int, chunk_size: int) -> None:
    """Keep few background chunks queued in the kernel (SO_SNDBUF at the source, SO_RCVBUF at the
    destination): a demanded chunk the source already sent on the background path arrives only after
    everything queued before it, and post-copy is CPU-bound here, so deep buffers buy no bandwidth."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, option, chunk_size * BACKGROUND_QUEUE_CHUNKS)


DEMAND_CONGESTION = b"cubic"


def unpaced(sock: socket.socket) -> None:
    """The source's demand connection: a window-based congestion control (cubic), not BBR where that is the
    host's default. BBR paces a flow at the bandwidth it measured, and the demand flow idles between bursts,
    so it measures little: on the 1 Gbit testbed a demanded 1 MiB chunk went out at 300-500 Mbit/s beside
    the background stream, and a demand fault took 12 ms at the median (7-9 ms with cubic; docs/
    architecture.md). Left as it is where cubic is not available (the kernel's default then)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, DEMAND_CONGESTION)
