"""The sim platform's monotonic counters: values only go up, and the host cannot edit them unnoticed."""

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from constmig.errors import ConfigError, EnclaveError, LineageHeld
from constmig.tee.counters import CounterStore, Owner


def test_create_increment_read_destroy(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    cid = store.create(5)
    assert store.read(cid) == 5
    assert store.increment(cid) == 6 and store.read(cid) == 6
    other = store.create()
    assert other != cid and store.read(other) == 0
    store.destroy(cid)
    with pytest.raises(EnclaveError, match="migrated away"):
        store.read(cid)
    with pytest.raises(EnclaveError, match="does not exist"):
        store.increment(cid)
    assert CounterStore(tmp_path / "c.json", b"k" * 32).read(other) == 0  # persisted


@pytest.mark.adversarial
def test_edited_counter_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    store = CounterStore(path, b"k" * 32)
    cid = store.create(3)
    doc = json.loads(path.read_text())
    doc["counters"] = json.dumps({cid: 1})  # the host winds the counter back
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="changed outside the platform"):
        store.read(cid)
    with pytest.raises(ConfigError, match="changed outside the platform"):
        CounterStore(path, b"other key" * 4).read(cid)


def test_bad_values_and_garbage(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    with pytest.raises(EnclaveError):
        store.create(-1)
    (tmp_path / "c.json").write_text("not json")
    with pytest.raises(ConfigError, match="not a counter file"):
        store.read("x")


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------


def test_at_most_max_counters_per_platform(tmp_path):
    from constmig.tee.counters import MAX_COUNTERS, _entry

    assert MAX_COUNTERS == 4096
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    store._save({f"{i:032x}": _entry(0, "") for i in range(MAX_COUNTERS - 1)})  # a platform one short of full
    last = store.create(7)
    assert store.read(last) == 7
    with pytest.raises(EnclaveError, match=f"already holds {MAX_COUNTERS} counters"):
        store.create()
    store.destroy(last)
    store.create()  # room again


@pytest.mark.parametrize("counters", [{"a": "1"}, {"a": 1.5}, [1, 2], 3, {"a": 1},
                                      {"a": {"value": 1, "owner": ""}},
                                      {"a": {"value": -1, "owner": "", "pending": ""}},
                                      {"a": {"value": True, "owner": "", "pending": ""}},
                                      {"a": {"value": 1, "owner": 3, "pending": ""}},
                                      {"a": {"value": 1, "owner": "", "pending": None}},
                                      {"a": {"value": 1, "owner": "", "pending": "", "x": 0}}])
def test_authentic_but_malformed_counters_are_refused(tmp_path, counters):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    store._save(counters)  # MAC'd with the platform key: only the content is wrong
    with pytest.raises(ConfigError, match="malformed counters"):
        store.read("a")


def test_counter_file_folder_is_created_and_ids_are_128_bit(tmp_path):
    store = CounterStore(tmp_path / "platform" / "state" / "c.json", b"k" * 32)
    cid = store.create()
    assert len(bytes.fromhex(cid)) == 16
    assert store.read(cid) == 0


# --- one owner per counter, and one lock for every read-modify-write ----------------------------------------

def _in_child(body, *args, stop: bool = False):
    """Run `body(*args)` in a forked process that then waits (or stops itself with SIGSTOP, as a host that
    freezes an enclave would); returns the process and what `body` returned."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        child.send(body(*args))
        if stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        child.recv()  # until the test lets it go

    proc = ctx.Process(target=run, daemon=True)
    proc.start()
    return proc, parent, parent.recv()


def _finish(proc, pipe) -> None:
    os.kill(proc.pid, signal.SIGCONT)
    pipe.send(None)
    proc.join(10)
    assert proc.exitcode == 0


PENDING_HASH = b"\x07" * 32


def test_a_counter_is_owned_by_the_process_that_created_it(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    proc, pipe, cid = _in_child(lambda: store.create(3))
    try:
        assert store.read(cid) == 3  # anyone may read
        with pytest.raises(LineageHeld, match="cannot checkpoint: another instance"):
            store.increment(cid)
        with pytest.raises(LineageHeld, match="cannot give the lineage up"):
            store.destroy(cid)
        with pytest.raises(LineageHeld, match=f"still runs on this platform \\(pid {proc.pid}\\)"):
            store.claim(cid)
        assert store.read(cid) == 3
    finally:
        _finish(proc, pipe)
    assert store.claim(cid) == 3  # its owner stopped: a restore takes it over
    assert store.increment(cid) == 4
    store.destroy(cid)
    with pytest.raises(EnclaveError, match="does not exist"):
        store.claim(cid)


@pytest.mark.adversarial
def test_a_frozen_owner_still_holds_its_counter(tmp_path):
    """The host SIGSTOPs the instance that holds the lineage and restores beside it: refused."""
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    proc, pipe, cid = _in_child(lambda: store.create(1), stop=True)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "T":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(LineageHeld, match="still runs"):
            store.claim(cid)
    finally:
        _finish(proc, pipe)


def test_owner_names_the_process_instance():
    me = Owner.me()
    assert me.alive() and Owner.parse(str(me)) == me
    assert not Owner(me.boot, me.pid, me.start + 1).alive()  # a reused pid is another process
    assert not Owner("another boot", me.pid, me.start).alive()
    assert Owner.parse("") is None and Owner.parse("b/x/1") is None and Owner.of(2**22 + 7) is None


def test_a_pending_counter_is_taken_only_with_its_code(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    proc, pipe, cid = _in_child(lambda: store.create(5, PENDING_HASH))
    _finish(proc, pipe)  # the incoming instance died before it handled COMMIT
    assert store.pending(cid) == PENDING_HASH
    with pytest.raises(EnclaveError, match="pending"):
        store.claim(cid)
    with pytest.raises(ConfigError, match="does not match"):
        store.claim(cid, b"\x08" * 32)
    assert store.claim(cid, PENDING_HASH) == 5
    assert store.pending(cid) == b"" and store.claim(cid) == 5  # confirmed: no code needed any more


def test_a_pending_counter_is_confirmed_only_by_its_owner_and_checkpoints_only_then(tmp_path):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    cid = store.create(2, PENDING_HASH)
    with pytest.raises(EnclaveError, match="still pending"):
        store.increment(cid)
    store.confirm(cid)
    assert store.pending(cid) == b"" and store.increment(cid) == 3
    proc, pipe, other = _in_child(lambda: store.create(0, PENDING_HASH))
    try:
        with pytest.raises(LineageHeld, match="cannot confirm"):
            store.confirm(other)
        assert store.pending(other) == PENDING_HASH
    finally:
        _finish(proc, pipe)


@pytest.mark.adversarial
def test_give_up_and_restore_with_the_code_are_one_compare_and_set(tmp_path):
    """Every order of the incoming instance's give-up and the host's restore with the release code: exactly
    one of them wins, and the other learns it lost."""
    store = CounterStore(tmp_path / "c.json", b"k" * 32)

    # 1. The incoming instance gives up first (it lives): the restore then finds no counter.
    proc, pipe, cid = _in_child(lambda: (c := store.create(4, PENDING_HASH), store.destroy(c))[0])
    _finish(proc, pipe)
    with pytest.raises(EnclaveError, match="does not exist"):
        store.claim(cid, PENDING_HASH)
    # 2. The restore comes while the incoming instance lives: refused, and its give-up then wins.
    ctx = multiprocessing.get_context("fork")
    go, back = ctx.Pipe()

    def incoming() -> None:
        c = store.create(4, PENDING_HASH)
        back.send(c)
        back.recv()
        try:
            store.destroy(c)
            back.send("gave up")
        except LineageHeld:
            back.send("lost")

    p = ctx.Process(target=incoming, daemon=True)
    p.start()
    cid = go.recv()
    with pytest.raises(LineageHeld):
        store.claim(cid, PENDING_HASH)
    go.send(None)
    assert go.recv() == "gave up"
    p.join(10)
    with pytest.raises(EnclaveError, match="does not exist"):
        store.claim(cid, PENDING_HASH)
    # 3. The incoming instance died holding it: the restore wins, and a give-up by anyone else is refused.
    proc, pipe, cid = _in_child(lambda: store.create(4, PENDING_HASH))
    _finish(proc, pipe)
    proc2, pipe2, took = _in_child(lambda: store.claim(cid, PENDING_HASH))
    try:
        assert took == 4
        with pytest.raises(LineageHeld):
            store.destroy(cid)
        with pytest.raises(LineageHeld):
            store.confirm(cid)
    finally:
        _finish(proc2, pipe2)


def _hammer(path: Path, rounds: int, seed: int, out) -> None:
    """One enclave process: its own counters, created, incremented and destroyed many times."""
    store = CounterStore(path, b"k" * 32)
    rng = random.Random(seed)
    mine: dict[str, int] = {}
    for _ in range(rounds):
        op = rng.random()
        if op < 0.3 or not mine:
            mine[store.create(rng.randrange(5))] = -1
            cid = next(reversed(mine))
            mine[cid] = store.read(cid)
        elif op < 0.85:
            cid = rng.choice(list(mine))
            mine[cid] = store.increment(cid)
        else:
            cid = rng.choice(list(mine))
            store.destroy(cid)
            del mine[cid]
    out.put(mine)


@pytest.mark.adversarial
def test_counters_survive_concurrent_enclaves(tmp_path):
    """N processes read-modify-write the one counter file at once. Every value is
    accounted for, no destroyed counter comes back, and the file stays readable."""
    path = tmp_path / "platform" / "counters.json"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, 60, seed, out)) for seed in range(6)]
    for p in procs:
        p.start()
    expected: dict[str, int] = {}
    for _ in procs:
        expected.update(out.get(timeout=120))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = CounterStore(path, b"k" * 32)
    assert {cid: e["value"] for cid, e in store._load().items()} == expected
    assert not list(path.parent.glob("*.tmp"))  # every writer's temp file was its own, and renamed


def test_stat_lines_are_read_past_the_command_name():
    from constmig.tee.counters import parse_stat

    tail = " ".join(str(n) for n in range(4, 22)) + " 987654 23 24"  # fields 4..21, starttime, more
    assert parse_stat(f"42 (a) b) (c) S {tail}\n") == ("S", 987654)
    assert parse_stat(f"7 (x) Z {tail}") == ("Z", 987654)
    state, start = parse_stat(Path("/proc/self/stat").read_text())
    assert state == "R" and start == Owner.me().start > 0


def test_a_zombie_or_a_finished_process_owns_nothing():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":  # exited, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert Owner.of(pid) is None
    os.waitpid(pid, 0)
    assert Owner.of(pid) is None


def test_an_owner_cannot_be_changed_in_place():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        Owner.me().pid = 1  # type: ignore[misc]


def test_a_failed_write_leaves_the_file_and_no_temp_file(tmp_path, monkeypatch):
    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    cid = store.create(1)

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        store.increment(cid)
    monkeypatch.undo()
    assert store.read(cid) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.lock"]


@pytest.mark.adversarial
def test_a_host_that_holds_the_counter_lock_gets_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    import fcntl

    from constmig.tee import counters

    store = CounterStore(tmp_path / "c.json", b"k" * 32)
    cid = store.create(1)
    monkeypatch.setattr(counters, "LOCK_WAIT_S", 0.3)
    with open(tmp_path / "c.json.lock", "a+b") as held:  # the host takes the platform's lock and keeps it
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(EnclaveError, match="stayed locked by another process for 0.3 s"):
            store.increment(cid)
        assert time.monotonic() - t0 < 5
    assert store.increment(cid) == 2
