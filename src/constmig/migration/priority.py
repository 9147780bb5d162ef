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
    """Give the calling thread a higher CPU weight than the background stream's threads."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DEMAND_NICE)


def shallow_queue(sock: socket.socket, option: int, chunk_size: int) -> None:
    """Keep few background chunks queued in the kernel (SO_SNDBUF at the source, SO_RCVBUF at the
    destination): a demanded chunk the source already sent on the background path arrives only after
    everything queued before it, and post-copy is CPU-bound here, so deep buffers buy no bandwidth."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, option, chunk_size * BACKGROUND_QUEUE_CHUNKS)
