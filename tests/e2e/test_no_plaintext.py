"""No plaintext leaves the enclave: not onto the network, not into the agents.

An enclave's heap is filled with known secrets (canaries): values `fill` generates inside the enclave,
which this test reproduces offline from the same generator without ever reading them through an agent,
and values a client wrote. Every byte that crosses between the two agents during a migration is
recorded by a man in the middle in front of the destination, in both directions, and searched for every
canary; afterwards the memory of both agent processes is searched too. Positive controls (a planted
canary, a client call through a recording proxy, the destination enclave's own memory) show the searches
find plaintext when it is there, so none of these tests can pass by looking at the wrong bytes.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from mitm import MitmProxy

from constmig.client import EnclaveClient
from constmig.host.client import PlainEnclaveClient, request
from constmig.host.orchestrate import app_checksum, migrate
from constmig.kernel.uffd import preflight

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]

HEAP = 32 << 20
VALUE_SIZE = 1024  # kvstore's default value_size, which fill's values are generated for
CLIENT_CANARIES = 400
WINDOWS = 200
WINDOW = 32

_UFFD_PROBLEM = preflight()
CASES = [
    pytest.param("stopcopy", "auto", id="stopcopy"),
    pytest.param("constmig", "fault", id="constmig-fault",
                 marks=pytest.mark.skipif(_UFFD_PROBLEM is not None,
                                          reason=f"fault tracker cannot run here: {_UFFD_PROBLEM}")),
    pytest.param("constmig", "access", id="constmig-access"),
]


# -- searching ---------------------------------------------------------------------------------------

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
_TABLE_BITS = 25
_SHIFT = np.uint64(64 - _TABLE_BITS)


def _slot(w: np.ndarray) -> np.ndarray:
    return (w * _GOLD) >> _SHIFT


def _pair_hash(w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    return (w1 * _GOLD) ^ ((w2 ^ (w2 >> np.uint64(29))) * _MIX)


class NeedleIndex:
    """Finds, anywhere in a haystack and at any alignment, any 16 bytes that sit at the same 8-byte grid
    position in a needle; so any run of 23 or more bytes of a needle is found.

    Needles are the rows of (n, 8k) uint8 arrays, one array per group. Every consecutive pair of 8-byte
    words of every row is indexed; a haystack is read as 8-byte words at each of its 8 alignments, a table
    lookup keeps the few words that may be needle words, and candidate pairs are compared word by word
    with the needle pair they hash to, so a reported hit is an exact 16-byte match, never a collision.
    """

    def __init__(self, groups: list[np.ndarray]) -> None:
        h, w1, w2, row_of, self.starts = [], [], [], [], [0]
        self.table = np.zeros(1 << _TABLE_BITS, dtype=bool)
        for rows in groups:
            assert rows.dtype == np.uint8 and rows.ndim == 2 and rows.shape[1] % 8 == 0 and rows.shape[1] >= 16
            words = np.ascontiguousarray(rows).view("<u8")  # (n, k)
            k = words.shape[1]
            w1.append(words[:, :-1].ravel())
            w2.append(words[:, 1:].ravel())
            h.append(_pair_hash(w1[-1], w2[-1]))
            row_of.append(np.repeat(np.arange(len(rows)) + self.starts[-1], k - 1))
            self.starts.append(self.starts[-1] + len(rows))
            self.table[_slot(words.ravel())] = True
        hs = np.concatenate(h)
        order = np.argsort(hs, kind="stable")
        self.h = hs[order]
        self.w1, self.w2 = np.concatenate(w1)[order], np.concatenate(w2)[order]
        self.row_of = np.concatenate(row_of)[order]

    def scan(self, hay: bytes | bytearray | memoryview) -> list[np.ndarray]:
        """Per group, the rows with a 16-byte run in `hay` (sorted, distinct)."""
        buf = memoryview(hay).cast("B")
        found: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        for a in range(8):
            count = (len(buf) - a) // 8
            if count < 2:
                continue
            w = np.frombuffer(buf, dtype="<u8", count=count, offset=a)
            t = self.table[_slot(w)]
            idx = np.flatnonzero(t[:-1] & t[1:])
            if not idx.size:
                continue
            x1, x2 = w[idx], w[idx + 1]
            h = _pair_hash(x1, x2)
            order = np.argsort(h)  # sorted keys make searchsorted several times faster
            pos = np.empty(len(h), dtype=np.int64)
            pos[order] = np.minimum(np.searchsorted(self.h, h[order]), len(self.h) - 1)
            same = self.h[pos] == h
            exact = same & (self.w1[pos] == x1) & (self.w2[pos] == x2)
            for i in np.flatnonzero(same & ~exact):  # equal hashes, other pair: walk the run (rare)
                j = pos[i]
                while j < len(self.h) and self.h[j] == h[i]:
                    if self.w1[j] == x1[i] and self.w2[j] == x2[i]:
                        exact[i], pos[i] = True, j
                        break
                    j += 1
            found.append(self.row_of[pos[exact]])
        rows = np.unique(np.concatenate(found))
        return [rows[(rows >= lo) & (rows < hi)] - lo for lo, hi in zip(self.starts, self.starts[1:], strict=False)]


def find_windows(hay: bytes, windows: list[bytes]) -> list[int]:
    """Indexes of the windows that occur in `hay`: plain bytes.find, independent of NeedleIndex."""
    return [i for i, w in enumerate(windows) if hay.find(w) >= 0]


# -- canaries ----------------------------------------------------------------------------------------

def fill_values(count: int, seed: int, fill_next: int) -> np.ndarray:
    """The (count, VALUE_SIZE) value rows KVStore.fill writes into a fresh table, in slot order.

    fill draws all its values from one PCG64([seed, fill_next]) stream, row after row (in batches, which
    does not change the stream), after placing `count` keys with ids 0..fill_next-1.
    """
    rng = np.random.Generator(np.random.PCG64([seed, fill_next]))
    words = -(-VALUE_SIZE // 8)
    raw = rng.bit_generator.random_raw((count, words))
    return raw.view(np.uint8).reshape(count, words * 8)[:, :VALUE_SIZE]


@dataclass
class Canaries:
    fill_rows: np.ndarray  # heap plaintext generated inside the enclave; never read through an agent
    client: dict[str, bytes]  # values a client wrote through the source agent
    windows: list[bytes]  # WINDOWS 32-byte windows of fill_rows at random offsets
    _index: NeedleIndex | None = None

    @property
    def index(self) -> NeedleIndex:
        """Group 0: fill values; group 1: client values (zero-padded, as they sit in their slots)."""
        if self._index is None:
            width = -(-max(len(v) for v in self.client.values()) // 8) * 8
            rows = np.zeros((len(self.client), width), dtype=np.uint8)
            for i, v in enumerate(self.client.values()):
                rows[i, : len(v)] = np.frombuffer(v, dtype=np.uint8)
            self._index = NeedleIndex([self.fill_rows, rows])
        return self._index


def client_value(i: int) -> bytes:
    return f"canary-{i:04d}:{secrets.token_hex(64)}".encode()  # 140 bytes, 128 of them random hex


def launch_canaries(addr: str, name: str, seed: int) -> tuple[Canaries, dict]:
    request(addr, {"op": "run", "name": name, "app": "kvstore", "heap": HEAP, "config": {}})
    c = EnclaveClient(addr, name)
    try:
        filled = c.call("fill", 0.9, seed)
        client = {f"client-{i}": client_value(i) for i in range(CLIENT_CANARIES)}
        items = list(client.items())
        for i in range(0, len(items), 100):
            assert c.call("put_many", [[k, v] for k, v in items[i:i + 100]]) == len(items[i:i + 100])
        stats = c.call("stats")
    finally:
        c.close()
    assert filled["inserted"] == filled["count"] > 20000, filled  # a fresh table: ids 0..count-1, no reuse
    assert stats["value_size"] == VALUE_SIZE
    rows = fill_values(filled["count"], seed, filled["count"])
    pick = np.random.default_rng(seed).integers(0, [len(rows), VALUE_SIZE - WINDOW], size=(WINDOWS, 2))
    windows = [rows[r, o:o + WINDOW].tobytes() for r, o in pick]
    return Canaries(rows, client, windows), stats


# -- capturing ---------------------------------------------------------------------------------------

class Capture:
    """Every byte through a MitmProxy, kept per connection and direction, in stream order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.parts: dict[tuple[int, str, str], list[bytes]] = defaultdict(list)

    def __call__(self, conn: int, channel: str, direction: str, data: bytes) -> None:
        with self._lock:
            self.parts[(conn, channel, direction)].append(bytes(data))

    def streams(self) -> dict[tuple[int, str, str], bytes]:
        with self._lock:
            return {k: b"".join(v) for k, v in self.parts.items()}


def drain(proxy: MitmProxy, timeout: float = 10.0) -> None:
    """Let the proxied connections end on their own (every byte recorded), then close the proxy."""
    deadline = time.monotonic() + timeout
    for t in list(proxy._threads):
        t.join(max(0.0, deadline - time.monotonic()))
    proxy.close()


# -- process memory ----------------------------------------------------------------------------------

_SKIP_MAPS = ("[vvar]", "[vvar_vclock]", "[vsyscall]")
BLOCK = 32 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
SEAM = 64  # bytes kept on each side of a block or of a run of non-zero pages, so no run is cut short


def _wanted(perms: str, path: str) -> bool:
    """Mappings whose bytes the process itself may have written: writable, anonymous, or shared ones.

    Left out: private mappings of files that are not writable (code and read-only data of python and
    its libraries): their bytes are the file's, the process cannot write through them.
    """
    if perms[0] != "r" or path in _SKIP_MAPS:
        return False
    if path.startswith("/dev/") and not path.startswith(("/dev/zero", "/dev/shm/")):
        return False
    return "w" in perms or perms[3] == "s" or not path.startswith("/")


def _nonzero_runs(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the runs of non-zero pages in `data` (widened by SEAM): zero pages hold no canary."""
    full = len(data) // PAGE
    mask = np.frombuffer(data, dtype=np.uint8, count=full * PAGE).reshape(full, PAGE).any(axis=1)
    if len(data) % PAGE:
        mask = np.append(mask, any(data[full * PAGE:]))
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(max(0, a * PAGE - SEAM), min(len(data), b * PAGE + SEAM)) for a, b in edges.reshape(-1, 2)]


def read_memory(pid: int) -> Iterator[tuple[str, int, memoryview]]:
    """(mapping, address, bytes) of every run of non-zero pages in the mappings `_wanted` picks."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in maps:
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) > 5 else ""
            if not _wanted(parts[1], path):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            for pos in range(start, end, BLOCK):
                try:
                    data = os.pread(fd, min(BLOCK + SEAM, end - pos), pos)
                except OSError:
                    break
                view = memoryview(data)
                for a, b in _nonzero_runs(data):
                    yield path, pos + a, view[a:b]
                if len(data) < min(BLOCK, end - pos):
                    break
    finally:
        os.close(fd)


@dataclass
class MemoryScan:
    pid: int
    scanned: int = 0  # non-zero bytes searched
    fill_rows: set[int] = field(default_factory=set)
    client_rows: set[int] = field(default_factory=set)
    where: list[str] = field(default_factory=list)


def scan_process(pid: int, canaries: Canaries) -> MemoryScan:
    out = MemoryScan(pid)
    for path, addr, data in read_memory(pid):
        out.scanned += len(data)
        for attr, rows in zip(("fill_rows", "client_rows"), canaries.index.scan(data), strict=True):
            if rows.size:
                getattr(out, attr).update(rows.tolist())
                out.where.append(f"{rows.size} {attr} in {path or '[anon]'} at {addr:#x}")
    return out


def enclave_pid(agent_pid: int) -> int:
    """The enclave process an agent started (its child running constmig.enclave.runtime)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and b"constmig.enclave.runtime" in cmd:
            found.append(int(d.name))
    assert len(found) == 1, f"expected one enclave under agent {agent_pid}, found {found}"
    return found[0]


def memory_readable(pid: int) -> str | None:
    try:
        next(read_memory(pid))
    except OSError as e:
        return f"cannot read agent memory through /proc/{pid}/mem (needs root or ptrace rights): {e}"
    except StopIteration:
        return f"/proc/{pid}/mem gave no readable bytes"
    return None


# -- tests -------------------------------------------------------------------------------------------

def test_searches_find_a_planted_canary():
    """The searches are not vacuous: a canary anywhere in random bytes, at any alignment, is found."""
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(500, VALUE_SIZE), dtype=np.uint8)
    other = rng.integers(0, 256, size=(50, 144), dtype=np.uint8)
    index = NeedleIndex([rows, other])
    hay = bytearray(rng.integers(0, 256, size=8 << 20, dtype=np.uint8).tobytes())
    assert [g.size for g in index.scan(hay)] == [0, 0]
    assert find_windows(bytes(hay), [rows[0, :32].tobytes()]) == []
    planted = [(7, 0, 1024, 3), (42, 101, 23, 1 << 20), (499, 1000, 24, 5 << 20), (3, 5, 40, len(hay) - 40)]
    for n, (row, start, length, at) in enumerate(planted):
        hay[at:at + length] = rows[row, start:start + length].tobytes()
        assert index.scan(hay)[0].tolist() == sorted(r for r, *_ in planted[:n + 1])
    hay[77:77 + 30] = other[49, 60:90].tobytes()
    assert [g.tolist() for g in index.scan(hay)] == [[3, 7, 42, 499], [49]]
    assert find_windows(bytes(hay), [rows[7, 500:532].tobytes(), rows[8, :32].tobytes()]) == [0]
    # 22 bytes of a needle do not always hold a whole pair of its words: the documented limit.
    assert index.scan(rows[9, 1:23].tobytes())[0].size == 0
    # Process memory: runs of non-zero pages, with the bytes next to them, are what gets searched.
    data = bytes(5 * PAGE)[:-10] + rows[11, :10].tobytes() + rows[11, 10:40].tobytes() + bytes(3 * PAGE)
    assert index.scan(b"".join(data[a:b] for a, b in _nonzero_runs(data)))[0].tolist() == [11]


@pytest.mark.parametrize("strategy,tracker", CASES)
def test_no_plaintext_on_the_wire_or_in_the_agents(cluster, strategy, tracker):
    a, b = cluster.addrs
    seed = secrets.randbits(32)
    canaries, stats = launch_canaries(a, "kv", seed)

    # A client's own calls cross agent A sealed: a value put and read back through a recording
    # proxy in front of A is in neither direction. Positive control for the recorder: the same calls,
    # unsealed, to an enclave launched to take plain calls, are seen both ways.
    control, plain_value, sealed_value = Capture(), client_value(9998), client_value(9999)
    request(a, {"op": "run", "name": "plainkv", "app": "kvstore", "heap": 8 << 20, "config": {}, "plain_calls": True})
    probe = MitmProxy(a, record=control)
    pc, c = PlainEnclaveClient(probe.addr, "plainkv"), EnclaveClient(probe.addr, "kv")
    try:
        pc.call("put", "control", plain_value)
        assert pc.call("get", "control") == plain_value
        c.call("put", "control", sealed_value)
        assert c.call("get", "control") == sealed_value
    finally:
        pc.close()
        c.close()
        drain(probe)
    request(a, {"op": "stop", "name": "plainkv"})
    sent = b"".join(v for (_, _, d), v in control.streams().items() if d == "c2s")
    received = b"".join(v for (_, _, d), v in control.streams().items() if d == "s2c")
    assert plain_value in sent and plain_value in received, "the recorder misses bytes"
    assert sealed_value not in sent and sealed_value not in received, "a sealed call crossed the host in the clear"
    canaries.client["control"] = sealed_value  # in the heap now, like the other client values
    before = app_checksum(a, "kv")

    capture = Capture()
    proxy = MitmProxy(b, record=capture)
    try:
        figures = migrate("kv", a, proxy.addr, strategy, tracker=tracker, timeout=60)
    finally:
        drain(proxy)
    assert app_checksum(b, "kv") == before  # straight to B: no client byte ever goes through the proxy
    if strategy == "constmig":
        assert figures["tracker"] == tracker

    streams = capture.streams()
    channels = sorted({ch for _, ch, _ in streams})
    assert channels == (["", "main"] if strategy == "stopcopy" else ["", "demand", "main"]), channels
    data = sum(len(v) for (_, ch, _), v in streams.items() if ch)
    total = sum(len(v) for v in streams.values())
    assert data >= stats["used_bytes"] >= 0.9 * HEAP, (data, stats["used_bytes"])
    assert data >= figures["state_bytes"], (data, figures["state_bytes"])

    # The wire: every stream, whole, for every window (bytes.find) and every 23-byte run of every canary.
    leaks = []
    for key, stream in streams.items():
        if hit := find_windows(stream, canaries.windows):
            leaks.append(f"{key}: {len(hit)} fill windows, e.g. #{hit[0]}")
        fill_rows, client_rows = canaries.index.scan(stream)
        if fill_rows.size or client_rows.size:
            leaks.append(f"{key}: {fill_rows.size} fill values {fill_rows[:3]}, "
                         f"{client_rows.size} client values {client_rows[:3]}")
    assert not leaks, f"plaintext on the wire ({total} bytes captured, fill seed {seed}): {leaks}"

    # The same searches on the same bytes with canaries planted: found (they are not vacuous).
    main = max((v for (_, ch, _), v in streams.items() if ch == "main"), key=len)
    at = len(main) // 2 + 5
    assert find_windows(main[:at] + canaries.windows[17] + main[at:], canaries.windows) == [17]
    row = len(canaries.fill_rows) // 3
    planted = main[:at] + canaries.fill_rows[row, 200:240].tobytes() + main[at + 40:-150] + sealed_value
    assert [g.tolist() for g in canaries.index.scan(planted)] == [[row], [len(canaries.client) - 1]]

    # The agents' memory, after the migration.
    agents = [p.pid for p in cluster.procs]
    if problem := memory_readable(agents[0]):
        pytest.skip(problem)
    scans = [scan_process(pid, canaries) for pid in agents]
    for name, s in zip("AB", scans, strict=True):
        assert s.scanned > 8 << 20, f"agent {name}: only {s.scanned} bytes of memory searched"
    # Fill values never left an enclave in plaintext: no agent may hold any of them; nor client values,
    # which crossed agent A only sealed in their clients' sessions.
    assert not scans[0].fill_rows and not scans[0].client_rows, \
        f"agent A holds enclave or client plaintext (seed {seed}): {scans[0].where[:5]}"
    assert not scans[1].fill_rows and not scans[1].client_rows, \
        f"agent B holds enclave heap plaintext (seed {seed}): {scans[1].where[:5]}"

    # Positive control: the same scan of the destination enclave's memory finds the whole heap.
    inside = scan_process(enclave_pid(agents[1]), canaries)
    assert len(inside.fill_rows) == len(canaries.fill_rows), (len(inside.fill_rows), len(canaries.fill_rows))
    assert len(inside.client_rows) == len(canaries.client), (len(inside.client_rows), len(canaries.client))

    # And the reproduced values are the real ones: read a few through B, now that the scans are done.
    e = EnclaveClient(b, "kv")
    try:
        got = e.call("get_many", [f"fill-{i}" for i in range(0, len(canaries.fill_rows), 997)])
    finally:
        e.close()
    real = {r.tobytes() for r in canaries.fill_rows}
    assert len(got) > 20 and all(v in real for v in got)
