import pytest

from constmig.host.cluster import LocalCluster
from constmig.migration.orchestrate import app_checksum, launch_filled


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
