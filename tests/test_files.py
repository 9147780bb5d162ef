"""constmig/files.py's checkpoint names: one spelling, for the enclave that seals a checkpoint
(enclave/persist.py) and the agent that finds the newest one (host/roster.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from constmig.enclave.heap import Heap
from constmig.enclave.persist import Persistence
from constmig.files import checkpoint_owner, checkpoint_path, checkpoint_version, newest_checkpoint
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca

MiB = 1 << 20


def test_a_name_and_version_round_trip(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, "kv-1_a", 12)
    assert path == tmp_path / "kv-1_a.v12.ckpt"
    assert (checkpoint_owner(path), checkpoint_version(path)) == ("kv-1_a", 12)


def test_a_file_without_a_version_sorts_first() -> None:
    assert checkpoint_version(Path("kv.ckpt")) == -1 and checkpoint_version(Path("kv.vx.ckpt")) == -1
    assert checkpoint_owner(Path("/any/where/kv.backup")) == "kv"


def test_the_newest_is_the_highest_version_not_the_last_in_text_order(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path, "kv") is None
    assert newest_checkpoint(tmp_path / "missing", "kv") is None
    for name in ("kv.v2.ckpt", "kv.v10.ckpt", "kv.v9.ckpt", "kv2.v99.ckpt", "kv.v11.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path, "kv") == tmp_path / "kv.v10.ckpt"
    assert newest_checkpoint(tmp_path, "kv2") == tmp_path / "kv2.v99.ckpt"


def test_it_is_the_name_the_enclave_seals_to(tmp_path: Path) -> None:
    """persist.py writes the same name (it could take it from here: one line there)."""
    create_root_ca(tmp_path / "ca")
    platform = SimPlatform.provision(tmp_path / "host", tmp_path / "ca", "host")
    app = Identity(measurement=measure(b"kv app"), signer=bytes(32), product_id=1, svn=1)
    persistence = Persistence(platform, app, tmp_path / "host" / "enclaves")
    spec = {"app": "kvstore", "heap": 2 * MiB, "chunk_size": MiB, "config": {}, "svn": 1}
    folder = tmp_path / "checkpoints"
    for version in (1, 2):
        fig = persistence.checkpoint(folder, "kv", spec, Heap(2 * MiB, MiB), b"state", np.array([0], dtype=np.int64))
        assert Path(fig["path"]) == checkpoint_path(folder, "kv", version) == newest_checkpoint(folder, "kv")
