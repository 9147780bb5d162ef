"""Sealed checkpoints in-process: Persistence on the sim TEE with a small heap, no agent or enclave process.

tests/e2e/test_persistence.py attacks the same code through real agents; these are the fast checks of
each rule (rollback, tampering, layout, lineage moving between platforms) that mutation testing runs.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from constmig.enclave.heap import Heap
from constmig.enclave.persist import MAGIC, MAX_HEADER, Lineage, Persistence, read_header, release_hash
from constmig.errors import ConfigError, EnclaveError, IntegrityError, LineageHeld
from constmig.tee.backend import Identity
from constmig.tee.measure import measure
from constmig.tee.sim import SimPlatform, create_root_ca

MiB = 1 << 20
HEAP, CHUNK = 4 * MiB, 1 * MiB
APP = Identity(measurement=measure(b"kv app"), signer=bytes(range(32)), product_id=1, svn=1)
SPEC = {"app": "kvstore", "heap": HEAP, "chunk_size": CHUNK, "config": {}, "svn": 1}
STATE = b"small state \x00\x01 of the app"


@dataclass
class Host:
    platform: SimPlatform
    store: Path

    def persistence(self, identity: Identity = APP) -> Persistence:
        return Persistence(self.platform, identity, self.store)


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[Host, Host]:
    create_root_ca(tmp_path / "ca")
    out = []
    for name in ("host-a", "host-b"):
        platform = SimPlatform.provision(tmp_path / name, tmp_path / "ca", name)
        out.append(Host(platform, tmp_path / name / "enclaves"))
    return out[0], out[1]


def filled_heap(seed: int = 1) -> Heap:
    heap = Heap(HEAP, CHUNK)
    rng = np.random.default_rng(seed)
    for i in (0, 2, 3):
        view = np.frombuffer(heap.chunk_view(i), dtype=np.uint8)
        view[:] = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    return heap


CHUNKS = np.array([0, 2, 3], dtype=np.int64)


def checkpoint(p: Persistence, folder: Path, heap: Heap, state: bytes = STATE) -> Path:
    return Path(p.checkpoint(folder, "kv", SPEC, heap, state, CHUNKS)["path"])


def same_chunks(a: Heap, b: Heap) -> bool:
    return all(bytes(a.chunk_view(i)) == bytes(b.chunk_view(i)) for i in range(a.n_chunks))


def test_round_trip_and_figures(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    heap = filled_heap()
    p = a.persistence()
    fig = p.checkpoint(tmp_path / "ck", "kv", SPEC, heap, STATE, CHUNKS)
    assert fig["version"] == 1 and fig["chunks"] == 3 and fig["path"].endswith("kv.v1.ckpt")
    assert fig["bytes"] == Path(fig["path"]).stat().st_size > 3 * CHUNK
    assert not list((tmp_path / "ck").glob("*.tmp"))
    header = read_header(Path(fig["path"]))
    assert (header.version, header.app, header.heap, header.chunk_size, header.chunks) == (1, "kvstore", HEAP, CHUNK, 3)
    fresh = Heap(HEAP, CHUNK)
    assert a.persistence().restore(Path(fig["path"]), fresh) == STATE
    assert same_chunks(heap, fresh)


def test_empty_small_state_and_no_chunks(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    p = a.persistence()
    path = Path(p.checkpoint(tmp_path, "kv", SPEC, Heap(HEAP, CHUNK), b"", np.array([], dtype=np.int64))["path"])
    assert a.persistence().restore(path, Heap(HEAP, CHUNK)) == b""


def test_older_checkpoint_is_a_rollback(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    p = a.persistence()
    old = checkpoint(p, tmp_path, filled_heap(1), b"old")
    new = checkpoint(p, tmp_path, filled_heap(2), b"new")
    assert (old.name, new.name) == ("kv.v1.ckpt", "kv.v2.ckpt")
    with pytest.raises(EnclaveError, match=r"rollback refused: kv.v1.ckpt is checkpoint version 1, but this "
                                           r"enclave's counter is at 2 \(a newer checkpoint exists\)$"):
        a.persistence().restore(old, Heap(HEAP, CHUNK))
    assert a.persistence().restore(new, Heap(HEAP, CHUNK)) == b"new"


def test_checkpoint_newer_than_the_counter_is_refused(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """B adopted the lineage at version 1; a version 2 made on A afterwards is not B's to restore."""
    a, b = hosts
    src = a.persistence()
    checkpoint(src, tmp_path / "a", filled_heap())
    b.persistence().adopt(src.export())
    later = checkpoint(src, tmp_path / "a", filled_heap(3))
    assert later.name == "kv.v2.ckpt"
    with pytest.raises(EnclaveError, match=r"kv.v2.ckpt is checkpoint version 2, but this enclave's counter is at 1$"):
        b.persistence().restore(later, Heap(HEAP, CHUNK))


def test_other_heap_layout_is_refused(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    path = checkpoint(a.persistence(), tmp_path, filled_heap())
    for size, chunk in ((2 * HEAP, CHUNK), (HEAP, CHUNK // 2)):
        with pytest.raises(EnclaveError, match=f"is for a {HEAP}-byte heap in {CHUNK}-byte chunks"):
            a.persistence().restore(path, Heap(size, chunk))


def test_other_enclave_code_cannot_open_the_key(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    path = checkpoint(a.persistence(), tmp_path, filled_heap())
    other = replace(APP, measurement=measure(b"other code"))
    with pytest.raises(IntegrityError, match="sealed key on this platform does not open"):
        a.persistence(other).restore(path, Heap(HEAP, CHUNK))


def test_leave_then_reinstate(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """A source leaves before COMMIT (nothing restores here); a destination that never resumed gives the
    lineage back (reinstate): the newest checkpoint restores again, at the same version."""
    a, _ = hosts
    p = a.persistence()
    path = checkpoint(p, tmp_path, filled_heap())
    p.leave()
    assert p.counter == "" and p.export() is not None
    with pytest.raises(EnclaveError, match="no persistent state on this platform"):
        a.persistence().restore(path, Heap(HEAP, CHUNK))
    p.reinstate()
    assert p.counter
    assert a.persistence().restore(path, Heap(HEAP, CHUNK)) == STATE
    counter = p.counter
    p.reinstate()  # bound already: nothing changes
    assert p.counter == counter


def test_lineage_moves_to_another_platform(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    src = a.persistence()
    checkpoint(src, tmp_path / "a", filled_heap())
    lineage = src.export()
    assert isinstance(lineage, Lineage) and lineage.version == 1
    dst = b.persistence()
    dst.adopt(lineage)
    src.leave()
    assert b.platform.counters.read(dst.counter) == 1
    newer = checkpoint(dst, tmp_path / "b", filled_heap(5), b"on b")
    assert newer.name == "kv.v2.ckpt"
    assert b.persistence().restore(newer, Heap(HEAP, CHUNK)) == b"on b"
    with pytest.raises(EnclaveError, match="no persistent state on this platform"):
        a.persistence().restore(newer, Heap(HEAP, CHUNK))
    dst.forget()
    assert dst.export() is None
    with pytest.raises(EnclaveError, match="no persistent state on this platform"):
        b.persistence().restore(newer, Heap(HEAP, CHUNK))
    dst.adopt(None)  # nothing arrived: nothing bound
    assert dst.export() is None and dst.counter == ""


CODE = bytes(range(32))


def test_a_pending_lineage_restores_only_with_its_release_code(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """B held the lineage before READY and died before it handled COMMIT; A let go past its commit point.
    B's host restores the newest checkpoint only with the code A's host was given, and then for good."""
    a, b = hosts
    src = a.persistence()
    path = checkpoint(src, tmp_path / "a", filled_heap())
    b.persistence().adopt(src.export(), release_hash(CODE))
    src.leave()
    with pytest.raises(EnclaveError, match="pending: the migration that brought it here never handled its COMMIT"):
        b.persistence().restore(path, Heap(HEAP, CHUNK))
    with pytest.raises(ConfigError, match="release code does not match"):
        b.persistence().restore(path, Heap(HEAP, CHUNK), release=bytes(32))
    with pytest.raises(EnclaveError, match="no persistent state on this platform"):
        a.persistence().restore(path, Heap(HEAP, CHUNK), release=CODE)  # no fork back at the source
    assert b.persistence().restore(path, Heap(HEAP, CHUNK), release=CODE) == STATE
    assert b.persistence().restore(path, Heap(HEAP, CHUNK)) == STATE  # confirmed: no code needed any more


def test_commit_confirms_the_pending_lineage(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    src = a.persistence()
    checkpoint(src, tmp_path / "a", filled_heap())
    dst = b.persistence()
    dst.adopt(src.export(), release_hash(CODE))
    src.leave()
    dst.confirm()
    assert dst.pending == b""
    newer = checkpoint(dst, tmp_path / "b", filled_heap(4), b"on b")
    assert b.persistence().restore(newer, Heap(HEAP, CHUNK)) == b"on b"


def test_a_destination_that_gave_up_leaves_its_code_worthless(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """The host keeps a copy of B's pending key file and learns the code; B gives up (forget, then ABORT)
    and A runs on. Put back, the key file names a counter that no longer exists: no second copy."""
    a, b = hosts
    src = a.persistence()
    path = checkpoint(src, tmp_path / "a", filled_heap())
    dst = b.persistence()
    dst.adopt(src.export(), release_hash(CODE))
    keyfile = next(b.store.glob("*.key"))
    kept = keyfile.read_bytes()
    src.leave()
    dst.forget()
    src.reinstate()  # the authenticated ABORT: the lineage is A's again
    assert not keyfile.exists()
    keyfile.write_bytes(kept)
    with pytest.raises(EnclaveError, match="monotonic counter does not exist on this platform"):
        b.persistence().restore(path, Heap(HEAP, CHUNK), release=CODE)
    assert a.persistence().restore(path, Heap(HEAP, CHUNK)) == STATE


def test_leave_and_forget_without_a_lineage_do_nothing(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    p = a.persistence()
    p.leave()
    p.reinstate()
    p.forget()
    assert p.export() is None and p.counter == ""


# --- a host that edits the file -------------------------------------------------------------------------


def header_len(path: Path) -> int:
    return len(MAGIC) + 4 + int.from_bytes(path.read_bytes()[len(MAGIC):len(MAGIC) + 4], "little")


def edit(path: Path, at: int, data: bytes | None = None, *, cut: bool = False, append: bytes = b"") -> None:
    raw = bytearray(path.read_bytes())
    if cut:
        raw = raw[:at]
    elif data is not None:
        raw[at:at + len(data)] = data
    else:
        raw[at] ^= 0x01
    path.write_bytes(bytes(raw) + append)


REC = 12  # chunk index (8) and length (4) before each record's ciphertext
TAG = 16


@pytest.mark.adversarial
@pytest.mark.parametrize(("how", "exc", "match"), [
    ("state-bit", IntegrityError, "record 0 failed authentication"),
    ("chunk-bit", IntegrityError, "record 1 failed authentication"),
    ("last-chunk-bit", IntegrityError, "record 3 failed authentication"),
    ("header-bit", IntegrityError, "record 0 failed authentication"),
    ("chunk-index", IntegrityError, "record 1 failed authentication"),
    ("chunk-index-past-heap", IntegrityError, "record 1 is malformed"),
    ("state-index", IntegrityError, "record 0 is malformed"),
    ("chunk-index-as-state", IntegrityError, "record 1 is malformed"),
    ("chunk-length", IntegrityError, "record 1 is malformed"),
    ("state-length-huge", IntegrityError, "small state of .* bytes is implausible"),
    ("truncated-in-record", IntegrityError, "truncated in record 3"),
    ("truncated-between-records", IntegrityError, "truncated after 3 records"),
    ("trailing-byte", IntegrityError, "has bytes after its last record"),
    ("magic", ConfigError, "is not a constmig checkpoint"),
    ("header-length-huge", ConfigError, "implausible header"),
    ("header-garbage", ConfigError, "malformed header"),
])
def test_tampered_checkpoint_is_refused(hosts: tuple[Host, Host], tmp_path: Path, how: str, exc: type,
                                        match: str) -> None:
    a, _ = hosts
    path = checkpoint(a.persistence(), tmp_path, filled_heap())
    h = header_len(path)
    state_rec = h  # record 0: the small state
    chunk1 = state_rec + REC + len(STATE) + TAG
    size = path.stat().st_size
    last = size - (REC + CHUNK + TAG)
    {
        "state-bit": lambda: edit(path, state_rec + REC + 1),
        "chunk-bit": lambda: edit(path, chunk1 + REC + 100),
        "last-chunk-bit": lambda: edit(path, size - 1),
        "header-bit": lambda: edit(path, h - 16),  # inside `created` (then 13 bytes of plain_calls): still
        # decodes, but is every record's AAD
        "chunk-index": lambda: edit(path, chunk1, (1).to_bytes(8, "little")),
        "chunk-index-past-heap": lambda: edit(path, chunk1, (HEAP // CHUNK).to_bytes(8, "little")),
        "state-index": lambda: edit(path, state_rec, (0).to_bytes(8, "little")),
        "chunk-index-as-state": lambda: edit(path, chunk1, (2**64 - 1).to_bytes(8, "little")),
        "chunk-length": lambda: edit(path, chunk1 + 8, (CHUNK - 1).to_bytes(4, "little")),
        "state-length-huge": lambda: edit(path, state_rec + 8, ((64 << 20) + 1).to_bytes(4, "little")),
        "truncated-in-record": lambda: edit(path, size - 1, cut=True),
        "truncated-between-records": lambda: edit(path, last, cut=True),
        "trailing-byte": lambda: edit(path, 0, b"C", append=b"\x00"),
        "magic": lambda: edit(path, 0),
        "header-length-huge": lambda: edit(path, len(MAGIC), (MAX_HEADER + 1).to_bytes(4, "little")),
        "header-garbage": lambda: edit(path, len(MAGIC) + 4, b"\xc1"),
    }[how]()
    heap = Heap(HEAP, CHUNK)
    with pytest.raises(exc, match=match):
        a.persistence().restore(path, heap)


def test_read_header_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        read_header(tmp_path / "missing.ckpt")
    (tmp_path / "short.ckpt").write_bytes(MAGIC)
    with pytest.raises(ConfigError, match="is not a constmig checkpoint"):
        read_header(tmp_path / "short.ckpt")


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------


def test_header_lineage_and_figures(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    p = a.persistence()
    spec = {"app": "kvstore", "heap": HEAP, "chunk_size": CHUNK, "config": {"fill": 0.5}}  # no svn: 1
    fig = p.checkpoint(tmp_path, "kv", spec, filled_heap(), STATE, CHUNKS)
    header = read_header(Path(fig["path"]))
    assert header.config == {"fill": 0.5} and header.svn == 1
    lineage = p.export()
    assert lineage is not None and len(lineage.lineage) == 16 and len(lineage.key) == 32
    assert 0 <= fig["seconds"] < 60


def test_folders_are_created_as_needed(tmp_path: Path) -> None:
    create_root_ca(tmp_path / "ca")
    platform = SimPlatform.provision(tmp_path / "host-a", tmp_path / "ca", "host-a")
    p = Persistence(platform, APP, tmp_path / "deep" / "er" / "enclaves")
    path = checkpoint(p, tmp_path / "ck" / "pt" / "s", filled_heap())
    assert Persistence(platform, APP, tmp_path / "deep" / "er" / "enclaves").restore(path, Heap(HEAP, CHUNK)) == STATE


def test_leave_when_the_key_file_is_already_gone(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    p = a.persistence()
    checkpoint(p, tmp_path, filled_heap())
    for f in a.store.glob("*.key"):
        f.unlink()
    p.leave()  # must not raise: leaving is idempotent
    assert p.counter == ""


def test_persistent_records_are_immutable(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    from constmig.enclave import persist

    a, _ = hosts
    p = a.persistence()
    header = read_header(checkpoint(p, tmp_path, filled_heap()))
    lineage = p.export()
    assert lineage is not None
    for obj, field in ((header, "version"), (lineage, "version"), (persist._KeyFile(b"k", "c"), "counter")):
        with pytest.raises(AttributeError):
            setattr(obj, field, 0)


def _raw_checkpoint(path: Path, header: bytes) -> Path:
    path.write_bytes(MAGIC + len(header).to_bytes(4, "little") + header)
    return path


def test_header_size_bound_is_64_kib(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="malformed header"):
        read_header(_raw_checkpoint(tmp_path / "a.ckpt", b"\xc1" * MAX_HEADER))
    with pytest.raises(ConfigError, match="implausible header of 65537 bytes"):
        read_header(_raw_checkpoint(tmp_path / "b.ckpt", b"\xc1" * (MAX_HEADER + 1)))


def test_header_with_an_unknown_field_is_malformed(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    import msgspec

    a, _ = hosts
    header = read_header(checkpoint(a.persistence(), tmp_path, filled_heap()))
    extra = msgspec.msgpack.encode({**msgspec.structs.asdict(header), "extra": 1})
    with pytest.raises(ConfigError, match="malformed header"):
        read_header(_raw_checkpoint(tmp_path / "x.ckpt", extra))


@pytest.mark.parametrize(("length", "match"), [(64 << 20, "truncated in record 0"),
                                               ((64 << 20) + 1, "small state of 67108865 bytes is implausible")])
def test_small_state_bound_is_64_mib(hosts: tuple[Host, Host], tmp_path: Path, length: int, match: str) -> None:
    a, _ = hosts
    path = checkpoint(a.persistence(), tmp_path, filled_heap())
    edit(path, header_len(path) + 8, length.to_bytes(4, "little"))
    with pytest.raises(IntegrityError, match=match):
        a.persistence().restore(path, Heap(HEAP, CHUNK))


def test_read_header_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read checkpoint .*none\.ckpt: No such file or directory$"):
        read_header(tmp_path / "none.ckpt")


def test_zero_chunks_are_left_out_and_counted(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    heap = filled_heap()  # chunks 0, 2, 3 hold data; chunk 1 is zeros
    fig = a.persistence().checkpoint(tmp_path, "kv", SPEC, heap, STATE, np.array([0, 1, 2, 3]))
    assert (fig["chunks"], fig["zero_chunks"]) == (3, 1)
    fresh = Heap(HEAP, CHUNK)
    assert a.persistence().restore(Path(fig["path"]), fresh) == STATE
    assert same_chunks(heap, fresh)


# --- one live copy: the instance that holds the lineage -------------------------------------------------------

def _forked(body, *, keep: bool = True):
    """Run `body()` in a forked process (another enclave instance of the same platform); returns the process,
    a pipe that lets it finish, and what `body` returned. With keep=False it exits right away (died)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        child.send(body())
        if keep:
            child.recv()

    proc = ctx.Process(target=run, daemon=True)
    proc.start()
    out = parent.recv()
    if not keep:
        proc.join(10)
    return proc, parent, out


@pytest.mark.adversarial
def test_a_checkpoint_does_not_restore_beside_the_running_instance(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """The host restores the newest checkpoint under another name while the enclave runs: refused, until
    the running instance has stopped (docs/security.md, "One live copy")."""
    a, _ = hosts
    proc, pipe, path = _forked(lambda: checkpoint(a.persistence(), tmp_path / "a", filled_heap()))
    try:
        with pytest.raises(LineageHeld, match=f"still runs on this platform \\(pid {proc.pid}\\)"):
            a.persistence().restore(path, Heap(HEAP, CHUNK))
    finally:
        pipe.send(None)
        proc.join(10)
    assert a.persistence().restore(path, Heap(HEAP, CHUNK)) == STATE


@pytest.mark.adversarial
def test_the_release_code_is_refused_while_the_incoming_instance_lives(hosts: tuple[Host, Host],
                                                                      tmp_path: Path) -> None:
    """A let go; B's incoming instance holds the lineage pending and waits for COMMIT. The
    host restores with the code: refused. B gives up (its compare-and-set wins), so the code is worthless."""
    a, b = hosts
    src = a.persistence()
    path = checkpoint(src, tmp_path / "a", filled_heap())
    lineage = src.export()
    ctx = multiprocessing.get_context("fork")
    go, back = ctx.Pipe()

    def incoming() -> None:
        dst = b.persistence()
        dst.adopt(lineage, release_hash(CODE))
        back.send("held")
        back.recv()
        dst.forget()  # the wait for COMMIT ran out
        back.send("gave up")

    proc = ctx.Process(target=incoming, daemon=True)
    proc.start()
    assert go.recv() == "held"
    src.leave()
    with pytest.raises(LineageHeld, match="still runs on this platform"):
        b.persistence().restore(path, Heap(HEAP, CHUNK), release=CODE)
    go.send(None)
    assert go.recv() == "gave up"
    proc.join(10)
    with pytest.raises(EnclaveError, match="no persistent state on this platform"):
        b.persistence().restore(path, Heap(HEAP, CHUNK), release=CODE)


@pytest.mark.adversarial
def test_an_incoming_instance_that_died_holding_the_lineage_restores_with_the_code(hosts: tuple[Host, Host],
                                                                                  tmp_path: Path) -> None:
    """B died between the source's COMMIT and its own handling of it: the code restores there, once; and an
    instance that lost the lineage to that restore cannot give it up (no ABORT) nor confirm it (it stops)."""
    a, b = hosts
    src = a.persistence()
    path = checkpoint(src, tmp_path / "a", filled_heap())
    lineage = src.export()
    _forked(lambda: b.persistence().adopt(lineage, release_hash(CODE)), keep=False)
    src.leave()
    stale = b.persistence()
    stale.lineage, stale.counter, stale.pending = lineage, "", release_hash(CODE)
    proc, pipe, state = _forked(lambda: b.persistence().restore(path, Heap(HEAP, CHUNK), release=CODE))
    try:
        assert state == STATE
        with pytest.raises(LineageHeld, match="still runs"):
            b.persistence().restore(path, Heap(HEAP, CHUNK))  # the restored copy runs: no third one
        cid = next(iter(b.platform.counters._load()))
        stale.counter = cid  # the dead incoming instance's view, as if it still acted
        with pytest.raises(LineageHeld, match="cannot give the lineage up"):
            stale.forget()
        with pytest.raises(LineageHeld, match="cannot confirm"):
            stale.confirm()
    finally:
        pipe.send(None)
        proc.join(10)
