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


def background_thread() -> None:
    """Background stream: every allowed core but the one kept for the demand path."""
    _pin(demand=False)


def _pin(demand: bool) -> None:
    """Keep the last allowed core for the demand path (measured on 2 vCPUs: fault p99 roughly halves, as
    the background's encryption and page copies no longer share a core with a waiting access)."""
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
