"""The background stream's cores: all of them while no access waits, all but the demand path's while
one does; set per thread, and only when that changes. The demand connection's congestion control."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from constmig.migration.priority import DEMAND_CONGESTION, BackgroundCores, unpaced


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two or more allowed CPUs")
def test_the_background_leaves_the_demand_core_only_while_an_access_waits():
    cpus = sorted(os.sched_getaffinity(0))
    seen: list[set[int]] = []

    def background() -> None:  # affinity is per thread: never touch the test runner's own
        cores = BackgroundCores()
        cores.update(False)
        seen.append(os.sched_getaffinity(0))
        cores.update(True)
        seen.append(os.sched_getaffinity(0))
        cores.update(True)  # no change, no syscall needed; still narrowed
        seen.append(os.sched_getaffinity(0))
        cores.update(False)
        seen.append(os.sched_getaffinity(0))

    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen == [set(cpus), set(cpus[:-1]), set(cpus[:-1]), set(cpus)]
    assert os.sched_getaffinity(0) == set(cpus)  # the calling thread was never moved


def _available() -> list[str]:
    p = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
    return p.read_text().split() if p.exists() else []


@pytest.mark.skipif(DEMAND_CONGESTION.decode() not in _available(), reason="the kernel offers no cubic here")
def test_the_demand_connection_is_not_paced_by_bbr():
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as s:
        unpaced(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == DEMAND_CONGESTION
