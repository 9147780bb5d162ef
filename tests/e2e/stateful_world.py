"""The world the stateful test drives: three real agents, link cuts, background migrations, and a model.

`test_stateful.py` holds the hypothesis state machine; this module holds what it stands on:

* `CutProxy`: a TCP proxy in front of a destination agent that cuts a migration's data connection once,
  at one protocol record (STATE, READY, COMMIT, the 2nd chunk, DONE), and then lets the reconnect through;
* `Migration`: one migration driven through the source agent, in a thread, so a throttled post-copy
  migration can go on while the next rules run (the heap is still arriving at its destination);
* `Model`: what one enclave must hold: every acknowledged write, the writes whose outcome is unknown, the
  checkpoints with what each must restore, and a local copy of the app (same heap layout, same ops)
  whose checksum the enclave's must equal: the kvstore (`LocalKV`), or the test app that frees and
  allocates again (`LocalRecycler`, tests/e2e/recycle_app.py);
* `World`: the cluster's addresses and the observations (who runs what, settling after transitions).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mitm import MitmProxy, RecordTamper
from recycle_app import Recycler

from constmig.apps.kvstore import KVStore
from constmig.client import EnclaveClient
from constmig.enclave.app import EnclaveApp
from constmig.enclave.heap import Heap
from constmig.errors import ConstmigError
from constmig.host.client import request
from constmig.wire.records import Header, Kind

HEAP = 16 << 20
CHUNK = 256 << 10
CONFIG = {"capacity": 4096}  # 4.3 MB of table: 17 chunks of 256 KiB, 1-4 s of stream at 1-4 MB/s
FILL = 0.5
RESUME_DEADLINE = 3.0  # how long a migration broken after its handoff keeps reconnecting
TIMEOUT = 10.0  # a migration's I/O timeout (also how long an Access Tracker access waits for a chunk, and how
# long a destination that sent READY and lost the link may wait for the source's reconnect)
CALL_TIMEOUT = 30.0  # a client call (the agent fails a call held by a paused stream after RESUME_DEADLINE)
SETTLE_S = TIMEOUT + RESUME_DEADLINE + 4.0  # transitional states must end within this
RECYCLER = "recycle_app:Recycler"  # the agents' enclaves import it from this folder (PYTHONPATH)
# Its arrays at launch, (name, bytes, fill byte): 8 chunks for the rounds to send before the app frees.
RECYCLER_ARRAYS = (("r0", 1 << 20, 0x51), ("r1", 512 << 10, 0x52), ("r2", (256 << 10) + 4096, 0x53))
# Agent-level statuses that are on the way to something else (agent.py's Hosted.status).
TRANSITIONAL = frozenset({"preparing-out", "migrating-out", "incoming", "handed-off", "paused", "resuming"})
HEAP_ARRIVING = r"heap (is )?still arriving"  # the refusal an op on an incomplete heap must give
# Refusals before anything started (the destination still lists the name, the enclave is mid-migration):
# legitimate for a migrate-out of an arriving heap too, as long as nothing changed.
PREFLIGHT_REFUSAL = r"already exists on agent|cannot migrate it now|cannot reach agent"

# Where a cut fires: (direction, record kind, n-th record of that kind on the main data channel).
# c2s CONTROL: STATE, HEAP_END, COMMIT; s2c CONTROL: READY, RESUMED, DONE (tests/reliability/harness.py).
CUT_POINTS: dict[str, tuple[str, Kind, int]] = {
    "state": ("c2s", Kind.CONTROL, 1),
    "ready": ("s2c", Kind.CONTROL, 1),
    "commit": ("c2s", Kind.CONTROL, 3),
    "chunk": ("c2s", Kind.CHUNK, 2),
    "done": ("s2c", Kind.CONTROL, 3),
}


class AgentFailed(AssertionError):
    """An agent did not answer a request every agent must always answer (status); the message carries
    the end of its log."""


class CutProxy:
    """A proxy in front of agent `target` that cuts the migration's connection once, at `point`.

    The cut closes the connection both ways while the proxy holds the triggering record (so that record
    is lost with the link); the source agent's reconnects come through the same proxy and pass."""

    def __init__(self, target: str, point: str) -> None:
        self.point = point
        self.direction, self.kind, self.n = CUT_POINTS[point]
        self.counts: dict[tuple[str, Kind], int] = {}
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self.proxy = MitmProxy(target, RecordTamper(self._on("c2s")), back=RecordTamper(self._on("s2c")))
        self.addr = self.proxy.addr

    def _on(self, direction: str):
        def on_record(channel: str, n: int, header: Header, record: bytes) -> list[bytes] | None:
            if channel != "main":
                return [record]
            with self._lock:
                key = (direction, header.kind)
                self.counts[key] = self.counts.get(key, 0) + 1
                hit = (not self.fired.is_set() and direction == self.direction and header.kind == self.kind
                       and self.counts[key] == self.n)
                if hit:
                    self.fired.set()
            return None if hit else [record]

        return on_record

    def close(self) -> None:
        self.proxy.close()


class Migration(threading.Thread):
    """One `migrate` request to the source agent, in a thread; `handed_off` is set at the commit point."""

    def __init__(self, name: str, src: int, dst: int, addrs: list[str], strategy: str, tracker: str,
                 bandwidth: float, cut: str | None, options: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True, name=f"migrate-{name}")
        self.name_, self.src, self.dst, self.strategy, self.tracker = name, src, dst, strategy, tracker
        self.bandwidth, self.cut = bandwidth, cut
        self.options = dict(options or {})  # more of the request (max_rounds)
        self.round_sent = (0, 0, 0)  # (round, bytes of it sent, of how many), as the last progress said
        self.src_addr = addrs[src]
        self.proxy = CutProxy(addrs[dst], cut) if cut else None
        self.to = self.proxy.addr if self.proxy else addrs[dst]
        self.handed_off = threading.Event()
        self.arriving = False  # issued while the enclave's own incoming heap was still arriving
        self.need = 0  # chunks holding its data when issued: a success must carry at least these
        self.figures: dict[str, Any] | None = None
        self.error: str | None = None
        self.t_start = time.monotonic()
        self.ended_at: float | None = None

    def run(self) -> None:
        req = {"op": "migrate", "name": self.name_, "to": self.to, "strategy": self.strategy,
               "tracker": self.tracker, "timeout": TIMEOUT, "max_bandwidth": self.bandwidth,
               "resume_deadline": RESUME_DEADLINE, **self.options}
        try:
            self.figures = request(self.src_addr, req, on_progress=self._progress,
                                   timeout=TIMEOUT + RESUME_DEADLINE + 30)
        except ConstmigError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 (reported as the migration's outcome, never swallowed)
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ended_at = time.monotonic()

    def _progress(self, info: dict) -> None:
        if info.get("phase") == "handed_off":
            self.handed_off.set()
        elif info.get("phase") == "round":
            self.round_sent = (int(info.get("round", 0)), int(info.get("done", 0)), int(info.get("total", 0)))

    @property
    def cut_fired(self) -> bool:
        return self.proxy is not None and self.proxy.fired.is_set()

    def outcome(self) -> str:
        how = f"{self.strategy}{'/' + self.tracker if self.strategy != 'stopcopy' else ''}"
        if self.bandwidth:
            how += f" @{self.bandwidth / 1e6:g}MB/s"
        if self.cut:
            how += f" cut@{self.cut}{'(fired)' if self.cut_fired else '(not reached)'}"
        if self.is_alive():
            return f"{how}: in flight"
        took = f"{self.ended_at - self.t_start:.1f}s" if self.ended_at is not None else "?"
        if self.figures is not None:
            f = self.figures
            return f"{how}: ok in {took}, chunks={f.get('chunks')}, resumes={f.get('resumes', 0)}"
        return f"{how}: error after {took}: {self.error}"


class LocalKV:
    """The kvstore run locally on a heap of the same layout: replaying the acknowledged operations gives
    the checksum the enclave must have (the app is deterministic: fixed hash seed, seeded fill)."""

    app_cls: type[EnclaveApp] = KVStore
    config: dict[str, Any] = CONFIG

    def __init__(self, ops: list[tuple]) -> None:
        self.heap = Heap(HEAP, CHUNK)
        self.app = self.app_cls(self.heap)
        self.app.setup(**self.config)
        for op in ops:
            self.apply(op)

    def apply(self, op: tuple) -> None:
        getattr(self.app, op[0])(*op[1:])

    def checksum(self) -> str:
        return self.app.checksum()

    def data_chunks(self) -> int:
        """Chunks holding any non-zero byte: a complete migration or checkpoint carries at least these."""
        return sum(1 for i in range(self.heap.n_chunks) if np.frombuffer(self.heap.chunk_view(i), np.uint64).any())

    def close(self) -> None:
        self.app = None  # type: ignore[assignment]
        self.heap.close()


class LocalRecycler(LocalKV):
    """The test app that frees and allocates again, run locally the same way: its allocator is
    deterministic, so the same operations give the same offsets and bytes as in the enclave."""

    app_cls = Recycler
    config: dict[str, Any] = {}

    def fits(self, nbytes: int) -> bool:
        """Would an allocation of `nbytes` fit now (the bump allocator only reuses space at its top)?"""
        return self.heap.free_bytes >= nbytes

    def has(self, name: str) -> bool:
        return name in self.heap.names()


def local_app(kind: str, ops: list[tuple]) -> LocalKV:
    """The local copy of an enclave of app `kind`, replaying `ops`."""
    return LocalRecycler(ops) if kind == RECYCLER else LocalKV(ops)


@dataclass
class Checkpoint:
    path: str
    version: int
    kv: dict[str, bytes | None]
    maybe: dict[str, set[bytes | None]]
    ops: list[tuple] | None  # None: some write's outcome was unknown, no checksum model
    host: int
    while_arriving: bool
    chunks: int


@dataclass
class Model:
    """One enclave as the test knows it."""

    name: str
    host: int | None  # the agent it runs on, as last observed
    kind: str = "kvstore"  # its app: the kvstore, or RECYCLER (frees and allocates again; no keys)
    kv: dict[str, bytes | None] = field(default_factory=dict)  # acknowledged: value, or None (deleted)
    maybe: dict[str, set[bytes | None]] = field(default_factory=dict)  # unknown outcome: any of these
    ops: list[tuple] | None = field(default_factory=list)
    local: LocalKV | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    version: int = 0  # its lineage counter: the newest checkpoint's version
    seen_chunks: int = 0  # the most chunks a migration or checkpoint of it carried
    visited: set[int] = field(default_factory=set)  # agents it ran on (they redirect to it)
    migrations: list[Migration] = field(default_factory=list)  # in flight
    latest: Migration | None = None  # the last one started: only its end says where it runs now
    finished: list[Migration] = field(default_factory=list)
    lost: str = ""  # why it legitimately no longer runs (nothing in this test loses one legitimately)

    # -- writes ------------------------------------------------------------------------------------
    def acked(self, op: tuple) -> None:
        if self.kind == "kvstore":
            key = op[1]
            self.kv[key] = op[2].encode() if op[0] == "put" else None
            self.maybe.pop(key, None)
        if self.ops is not None:
            self.ops.append(op)
            if self.local is not None:
                self.local.apply(op)

    def unknown(self, op: tuple) -> None:
        """A write that failed: it may or may not have happened (and may still happen)."""
        if self.kind == "kvstore":
            key = op[1]
            self.maybe.setdefault(key, set()).add(op[2].encode() if op[0] == "put" else None)
        self.ops = None
        if self.local is not None:
            self.local.close()
            self.local = None

    def min_chunks(self) -> int:
        """Chunks any successful migration or checkpoint of it must carry: those holding data in the local
        replay (while every write's outcome is known), else the most seen so far (a kvstore's heap only
        grows; the recycler's shrinks when it frees, so only its replay says)."""
        data = self.local.data_chunks() if self.local is not None else 0
        return data if self.kind != "kvstore" else max(self.seen_chunks, data)

    def expected(self, key: str) -> set[bytes | None]:
        return {self.kv.get(key)} | self.maybe.get(key, set())

    def snapshot(self, path: str, version: int, host: int, arriving: bool, chunks: int) -> Checkpoint:
        return Checkpoint(path, version, dict(self.kv), {k: set(v) for k, v in self.maybe.items()},
                          None if self.ops is None else list(self.ops), host, arriving, chunks)

    def restored(self, ck: Checkpoint) -> None:
        self.kv, self.maybe = dict(ck.kv), {k: set(v) for k, v in ck.maybe.items()}
        self.ops = None if ck.ops is None else list(ck.ops)
        if self.local is not None:
            self.local.close()
        self.local = local_app(self.kind, self.ops) if self.ops is not None else None

    # -- migrations --------------------------------------------------------------------------------
    def arriving(self) -> bool:
        """A migration into it is past its handoff and not finished: its heap may still be arriving."""
        return any(m.is_alive() and m.handed_off.is_set() for m in self.migrations)

    def arriving_at(self, host: int, within: float = 2.0) -> bool:
        """Could a heap be arriving on `host`: a migration into it in flight, or one that ended just now (the
        destination learns it is complete a moment before the source's reply comes back)?"""
        now = time.monotonic()
        return any(m.dst == host and (m.is_alive() or (m.ended_at is not None and now - m.ended_at < within))
                   for m in self.migrations + self.finished)

    def reap(self) -> list[Migration]:
        done = [m for m in self.migrations if not m.is_alive()]
        self.migrations = [m for m in self.migrations if m.is_alive()]
        self.finished += done
        return done

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None


class World:
    """The agents, seen from outside."""

    def __init__(self, addrs: list[str], base: Path) -> None:
        self.addrs = addrs
        self.base = base
        self.notes: list[str] = []  # what happened, with observed outcomes, for failure messages
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        self.notes.append(f"{time.monotonic() - self.t0:5.1f}s {text}")

    def recent(self, n: int = 14) -> str:
        return "\n  ".join(self.notes[-n:])

    def status(self, i: int) -> dict[str, Any]:
        try:
            return request(self.addrs[i], {"op": "status"}, timeout=CALL_TIMEOUT)
        except ConstmigError as e:
            error = str(e)
        time.sleep(0.3)  # the agent logs what went wrong just after the connection closes
        raise AgentFailed(f"agent {'abc'[i]} failed a status request: {error}\n  its log ends:\n"
                          + self.log_tail(i) + f"\n  recent steps:\n  {self.recent()}")

    def log_tail(self, i: int, lines: int = 12) -> str:
        try:
            text = (self.base / f"agent-{'abc'[i]}.log").read_text(errors="replace")
        except OSError as e:
            return f"    (no log: {e})"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def where(self, name: str) -> dict[int, dict[str, Any]]:
        """Per agent that lists `name`: its entry (agent status, and the enclave's own state if running)."""
        out = {}
        for i in range(len(self.addrs)):
            info = self.status(i)["enclaves"].get(name)
            if info is not None:
                out[i] = info
        return out

    def describe(self, seen: dict[int, dict[str, Any]]) -> str:
        return ", ".join(f"{'abc'[i]}:{info['status']}" + (f"/{info['state']}" if "state" in info else "")
                         for i, info in sorted(seen.items())) or "listed nowhere"

    def settle(self, name: str, full: bool = True, bound: float = SETTLE_S) -> dict[int, dict[str, Any]]:
        """Poll until no agent lists `name` in a transitional state (or `bound` seconds pass).

        Not `full`: also stop once exactly one copy runs and the only transitional copies left are
        "incoming" (a destination whose migration rolled back, waiting out its timeout for a reconnect
        that will not come). Such a copy can only wipe itself; if it ever ran, that would be a second
        copy, which the check after every step and teardown's full settle catch."""
        deadline = time.monotonic() + bound
        while True:
            seen = self.where(name)
            moving = {info["status"] for info in seen.values()} & TRANSITIONAL
            running = sum(info["status"] == "running" for info in seen.values())
            if not moving or (not full and moving == {"incoming"} and running == 1) or time.monotonic() > deadline:
                return seen
            time.sleep(0.1)

    def call(self, host: int, name: str, method: str, *args: Any) -> Any:
        c = EnclaveClient(self.addrs[host], name, timeout=CALL_TIMEOUT)
        try:
            return c.call(method, *args)
        finally:
            c.close()

    def stop_everywhere(self, name: str) -> None:
        for addr in self.addrs:
            with contextlib.suppress(ConstmigError):
                request(addr, {"op": "stop", "name": name, "force": True}, timeout=CALL_TIMEOUT)

    def checkpoint_files(self, name: str) -> list[Path]:
        return sorted(self.base.glob(f"host-*/checkpoints/{name}.v*.ckpt"))
