import pytest

from constmig.host.client import EnclaveClient, request
from constmig.host.cluster import LocalCluster


@pytest.fixture
def cluster():
    with LocalCluster(2) as c:
        yield c


def launch(addr: str, name: str = "kv", app: str = "kvstore", heap: int = 64 << 20, fill: float = 0.9) -> str:
    """Start an app, fill it, write a few client keys; return its checksum."""
    request(addr, {"op": "run", "name": name, "app": app, "heap": heap, "config": {}})
    c = EnclaveClient(addr, name)
    try:
        c.call("fill", fill, 3)
        if app == "kvstore":
            for i in range(32):
                c.call("put", f"k{i}", f"v{i}")
        return c.call("checksum")
    finally:
        c.close()


def checksum(addr: str, name: str = "kv") -> str:
    c = EnclaveClient(addr, name)
    try:
        return c.call("checksum")
    finally:
        c.close()
