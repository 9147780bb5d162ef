"""Scheduling for post-copy's demand path: a waiting access outranks the background stream.

On a small machine the background stream keeps every core busy (encrypting, copying), so the few
threads that serve a fault (the pager's fault reader, both ends of the demand channel) would queue
behind it twice: for a CPU, and for the GIL, which CPython hands over only every 5 ms by default.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

SWITCH_INTERVAL = 0.0002  # seconds a thread may keep the GIL while another waits for it
DEMAND_NICE = -10  # nice value of demand-path threads (needs CAP_SYS_NICE; skipped without it)


def quick_gil_handoff() -> None:
    """Make this process hand the GIL over quickly (call in processes that stream)."""
    sys.setswitchinterval(SWITCH_INTERVAL)


def boost_this_thread() -> None:
    """Give the calling thread a higher CPU weight than the background stream's threads."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DEMAND_NICE)
