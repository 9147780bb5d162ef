"""Sealed checkpoints and monotonic counters, attacked by the host (Alder et al.'s properties).

A checkpoint is bound to the next value of a platform counter, so the host cannot restore an older
one (rollback); the counter and the sealing key move with the enclave, so after a migration no
checkpoint restores on the host it left (no fork through old sealed state), while the newest one
restores on the host it went to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import checksum, launch, running_at
from constmig.client import EnclaveClient
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.orchestrate import migrate

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]


def ckpt(addr: str, name: str = "kv") -> dict:
    return request(addr, {"op": "checkpoint", "name": name})


def restore(addr: str, path: str, name: str = "kv") -> dict:
    return request(addr, {"op": "restore", "path": path, "name": name})


def put(addr: str, key: str, value: str) -> None:
    c = EnclaveClient(addr, "kv")
    try:
        c.call("put", key, value)
    finally:
        c.close()


def test_checkpoint_restores_and_an_older_one_is_refused(cluster):
    a, _ = cluster.addrs
    launch(a, heap=32 << 20)
    old = ckpt(a)
    put(a, "acked", "after the first checkpoint")
    newest_sum = checksum(a)
    new = ckpt(a)
    assert (old["version"], new["version"]) == (1, 2) and new["chunks"] > 0
    request(a, {"op": "stop", "name": "kv"})

    with pytest.raises(AgentError, match="rollback refused: kv.v1.ckpt is checkpoint version 1, but this "
                                         "enclave's counter is at 2"):
        restore(a, old["path"])
    assert not running_at(a)
    restore(a, new["path"])
    assert running_at(a) and checksum(a) == newest_sum


@pytest.mark.parametrize("where", ["header", "state", "chunk", "truncate"])
def test_tampered_checkpoint_is_refused(cluster, tmp_path, where):
    a, _ = cluster.addrs
    launch(a, heap=32 << 20)
    path = ckpt(a)["path"]
    request(a, {"op": "stop", "name": "kv"})
    bad = tmp_path / "kv.v1.ckpt"
    data = bytearray(Path(path).read_bytes())
    if where == "truncate":
        data = data[: len(data) - 4096]
    else:
        data[{"header": 40, "state": 300, "chunk": len(data) // 2}[where]] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(AgentError, match="failed authentication|truncated|malformed|does not open|rollback"):
        restore(a, str(bad))
    assert not running_at(a)
    restore(a, path)  # the untouched file still restores
    assert running_at(a)


@pytest.mark.parametrize("strategy", ["stopcopy", "constmig"])
def test_sealed_state_moves_with_the_enclave(cluster, strategy):
    """After a migration no checkpoint restores on the source host; the newest restores on the
    destination host (its counter continued there), an older one does not."""
    a, b = cluster.addrs
    launch(a, heap=32 << 20)
    older = ckpt(a)
    put(a, "acked", "v2")
    newest = ckpt(a)
    migrate("kv", a, b, strategy, tracker="access" if strategy == "constmig" else "auto")
    assert running_at(b)

    # the source host keeps the files, but its counter and sealed key are gone
    for c in (older, newest):
        with pytest.raises(AgentError, match="no persistent state on this platform|migrated away"):
            restore(a, c["path"])
    assert not running_at(a)

    # the enclave's own counter continued at the destination: a checkpoint there is version 3
    put(b, "acked", "v3")
    here = ckpt(b)
    assert here["version"] == 3
    after_sum = checksum(b)
    request(b, {"op": "stop", "name": "kv"})
    moved = shutil.copy(newest["path"], cluster.base / "carried.v2.ckpt")
    with pytest.raises(AgentError, match="rollback refused"):
        restore(b, str(moved))  # sealed data carried over, but a newer checkpoint exists
    restore(b, here["path"])
    assert checksum(b) == after_sum


def test_checkpoint_of_a_moved_enclave_is_refused_at_the_old_host(cluster):
    a, b = cluster.addrs
    launch(a, heap=32 << 20)
    migrate("kv", a, b, "stopcopy")
    with pytest.raises(AgentError, match="moved to|no enclave"):
        ckpt(a)
