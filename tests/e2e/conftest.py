import time

import pytest

from constmig.bench.loadgen import KVHammer
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import app_checksum, launch_filled


@pytest.fixture
def cluster():
    with LocalCluster(2) as c:
        yield c


def launch(addr: str, name: str = "kv", app: str = "kvstore", heap: int = 64 << 20, fill: float = 0.9) -> str:
    """Start an app, fill it, write a few client keys; return its checksum."""
    launch_filled(addr, name, app, heap, fill, seed=3, client_keys=32)
    return app_checksum(addr, name)


def checksum(addr: str, name: str = "kv") -> str:
    return app_checksum(addr, name)


def running_at(addr: str, name: str = "kv") -> bool:
    st = request(addr, {"op": "status"})
    return st["enclaves"].get(name, {}).get("state") == "running"


def wait_gone(addr: str, name: str = "kv", timeout: float = 15.0) -> None:
    """Until the agent at `addr` no longer lists `name`, or lists it only as "aborted" (a half-built copy
    wipes on its own schedule; one that gave up after READY stays as a wiped tombstone that answers the
    source's reconnects with ABORT)."""
    deadline = time.monotonic() + timeout
    while (st := request(addr, {"op": "status"})["enclaves"].get(name)) is not None and st["status"] != "aborted":
        assert time.monotonic() < deadline, f"{name} still listed at {addr}: {st}"
        time.sleep(0.05)
    assert st is None or "state" not in st, f"a tombstone of {name} runs: {st}"


class TimedHammer(KVHammer):
    """A KVHammer that notes when each of its calls was answered, for a client's pace over a window."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answered: list[float] = []  # time.monotonic() of each answered call

    def _one(self, seq: int) -> int:
        ops = super()._one(seq)
        self.answered.append(time.monotonic())
        return ops

    def rate(self, start: float, end: float) -> float:
        """Calls answered per second in [start, end)."""
        return sum(start <= t < end for t in self.answered) / (end - start)
