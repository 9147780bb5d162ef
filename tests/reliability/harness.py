"""Driving one fault scenario on the namespace testbed: inject the fault at an exact protocol point,
restore, wait for the outcome, and observe it (who runs, what the migration said, which writes survive).

Why a proxy: a record-level trigger makes the fault window deterministic. The proxy runs in the root
namespace on the testbed's controller address and relays to the destination's testbed address, so
migration traffic still crosses both hosts' shaped links; it watches the main data channel record by
record (tests/e2e/mitm.py) and fires the fault while it holds the triggering record.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1]
for _sub in ("e2e", "testbed"):
    if str(_TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(_TESTS / _sub))

from mitm import MitmProxy, RecordTamper  # noqa: E402

from constmig.bench.loadgen import KVHammer  # noqa: E402
from constmig.client import EnclaveClient  # noqa: E402
from constmig.errors import ConstmigError  # noqa: E402
from constmig.host import client  # noqa: E402
from constmig.host.orchestrate import launch_filled, migrate  # noqa: E402
from constmig.testbed import Testbed  # noqa: E402
from constmig.testbed.bed import _alive  # noqa: E402
from constmig.wire.records import Header, Kind  # noqa: E402

NAME = "kv"
HEAP = 32 << 20


# ----- where the fault fires ------------------------------------------------------------------------

@dataclass(frozen=True)
class At:
    """The n-th record (1-based) of `kind` on the main data channel (or any channel), in `direction`:
    c2s = source to destination, s2c = destination to source. Handshake records come first (M1, M3
    c2s; M2, M4 s2c); then CONTROL c2s: STATE, HEAP_END, COMMIT; CONTROL s2c: READY, RESUMED, DONE.
    Counts run on across reconnects, but only a fault makes one and a run fires once, at its first match."""

    direction: str
    kind: Kind
    n: int
    channel: str = "main"  # "any": chunks count on the demand channel too (post-copy); "demand": only there
    # Only records whose wire length (ciphertext and tag) is in this range count: how the host tells
    # control messages apart when their number varies (pre-copy's round ends); lengths are visible to it.
    min_len: int = 0
    max_len: int = 1 << 62

    def describe(self) -> str:
        return f"{self.direction} {self.kind.name} #{self.n}"


HANDSHAKE_M1 = At("c2s", Kind.HANDSHAKE, 1)  # before the stop: attestation under way
STATE = At("c2s", Kind.CONTROL, 1)  # the stop: the small state is on its way
READY = At("s2c", Kind.CONTROL, 1)  # the destination is ready; the source has not committed yet
COMMIT = At("c2s", Kind.CONTROL, 3)  # the source is past its commit point; the destination waits for this
DONE = At("s2c", Kind.CONTROL, 3)  # just before DONE (READY, RESUMED, DONE)
# With pre-copy rounds in front (ROUND_END c2s and ROUND_ACK s2c, a number that depends on the writes),
# by length: READY (53-byte message) and DONE (81+) are the only s2c controls of 50 bytes or more, and
# COMMIT (13) is the only c2s control under 20.
TAG = 16
READY_BY_LEN = At("s2c", Kind.CONTROL, 1, min_len=50 + TAG)
DONE_BY_LEN = At("s2c", Kind.CONTROL, 2, min_len=50 + TAG)
COMMIT_BY_LEN = At("c2s", Kind.CONTROL, 1, max_len=20 + TAG)


def chunk(n: int, channel: str = "main") -> At:
    """The n-th chunk record: stop-and-copy's copy phase, or (channel "any") post-copy's stream, where
    the client's demands may bring most chunks on the demand channel."""
    return At("c2s", Kind.CHUNK, n, channel)


# ----- what fires -----------------------------------------------------------------------------------

@dataclass
class Fault:
    """One fault, fired once from inside the proxy while it holds the triggering record."""

    kind: str  # link | kill-agent | kill-enclave | loss
    host: str = "b"  # a = source host, b = destination host
    seconds: float = 0.0  # link: how long the cable stays unplugged
    loss_pct: float = 0.0
    restart_after: float = 0.0  # kill-agent: restart the agent this long after the kill
    drop: bool = False  # the triggering record dies with its sender: it was never sent (kill just before it)

    def describe(self) -> str:
        who = {"a": "source", "b": "destination"}[self.host]
        if self.kind == "link":
            return f"{who} link down {self.seconds:g} s"
        if self.kind == "kill-agent":
            return f"{who} agent SIGKILL, restarted"
        if self.kind == "kill-enclave":
            return f"{who} enclave process SIGKILL"
        return f"{self.loss_pct:g}% loss on both links, whole migration"


class Injector:
    """Fires a Fault on the testbed and undoes it (link up, agent restarted) on schedule."""

    def __init__(self, tb: Testbed, fault: Fault) -> None:
        self.tb, self.fault = tb, fault
        self.fired = threading.Event()  # set as the fault starts: the test may see its effect at once
        self.restored = threading.Event()
        self.t_fired = 0.0
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def fire(self) -> None:
        f, tb = self.fault, self.tb
        self.t_fired = time.monotonic()
        self.fired.set()
        try:
            if f.kind == "link":
                tb.link_down(f.host)
                self._later(f.seconds, lambda: tb.link_up(f.host))
            elif f.kind == "kill-agent":
                tb.kill_agent(f.host)
                self._later(f.restart_after, lambda: tb.restart_agent(f.host))
            elif f.kind == "kill-enclave":
                kill_enclave(tb, f.host, NAME)
                self.restored.set()
            else:
                raise AssertionError(f"fault {f.kind!r} does not fire at a record")
        except BaseException as e:  # the proxy thread must not die silently: the test re-raises it
            self.error = e
            self.restored.set()

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        def run() -> None:
            time.sleep(delay)
            try:
                action()
            except BaseException as e:
                self.error = self.error or e
            finally:
                self.restored.set()

        t = threading.Thread(target=run, name="fault-restore", daemon=True)
        t.start()
        self._threads.append(t)

    def hold_until_restored(self, direction: str) -> bool:
        """A record that the proxy already holds and whose way on does not cross the cut link would
        slip through the outage; hold it as the network would (it was in flight) until the link is back."""
        f = self.fault
        crosses = (direction == "c2s" and f.host == "b") or (direction == "s2c" and f.host == "a")
        return f.kind == "link" and not crosses

    def wait(self, timeout: float) -> None:
        if self.fired.is_set():
            assert self.restored.wait(timeout), f"fault {self.fault.describe()} was not undone in {timeout:g} s"
        if self.error is not None:
            raise self.error


def enclave_pids(tb: Testbed, host: str, name: str) -> list[int]:
    """Enclave processes (and forked pagers) of `name` in `host`'s namespace."""
    out = []
    for pid_s in os.popen(f"ip netns pids {tb.host(host).ns}").read().split():
        try:
            argv = Path(f"/proc/{pid_s}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"constmig.enclave.runtime" in argv and any(a.endswith(f"/{name}.sock".encode()) for a in argv) \
                and _alive(int(pid_s)):
            out.append(int(pid_s))
    return out


def kill_enclave(tb: Testbed, host: str, name: str) -> int:
    """SIGKILL the enclave process of `name` in `host`'s namespace (its pager dies with it: PDEATHSIG)."""
    pids = sorted(enclave_pids(tb, host, name))
    if not pids:
        raise AssertionError(f"no enclave process for {name!r} on host {host}")
    os.kill(pids[0], signal.SIGKILL)  # the oldest: the enclave, not the pager it forked
    deadline = time.monotonic() + 5
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pids[0]


class Trigger:
    """The proxy's record callbacks: count records on the data channels, fire once at `at`."""

    def __init__(self, at: At | None, injector: Injector | None) -> None:
        self.at, self.injector = at, injector
        self.counts: dict[tuple[str, Kind], int] = {}
        self.conns: dict[str, int] = {"c2s": 0, "s2c": 0}
        self._lock = threading.Lock()
        self.forward = RecordTamper(self._cb("c2s"))
        self.back = RecordTamper(self._cb("s2c"))

    def _cb(self, direction: str) -> Callable[[str, int, Header, bytes], list[bytes] | None]:
        def on_record(channel: str, n: int, header: Header, record: bytes) -> list[bytes] | None:
            # Counts run across reconnects, but only faults make reconnects, and each run fires once.
            if self.at is None or self.injector is None or channel not in ("main", "demand"):
                return [record]
            if self.at.channel not in ("any", channel):  # "main", "demand" or "any"
                return [record]
            if not self.at.min_len <= header.length <= self.at.max_len:
                return [record]
            with self._lock:
                key = (direction, header.kind)
                self.counts[key] = self.counts.get(key, 0) + 1
                hit = (self.at.direction == direction and self.at.kind == header.kind
                       and self.counts[key] == self.at.n and not self.injector.fired.is_set())
            if hit:
                self.injector.fire()
                if self.injector.fault.drop:
                    return []
                if self.injector.hold_until_restored(direction):
                    self.injector.restored.wait(60)
            return [record]

        return on_record


# ----- one run --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a scenario ended in, observed from outside."""

    runs: list[str]  # hosts whose agent lists the enclave and whose enclave says it is running
    held: list[str]  # hosts that list it but do not run it (handed off, failed)
    figures: dict[str, Any] | None
    error: str | None
    phases: list[str]
    fired: bool
    acked: dict[str, bytes]
    uncertain: set[str]
    calls: int
    wrong: int
    client_errors: list[str]
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)


def status(addr: str, timeout: float = 10.0) -> dict[str, Any]:
    return client.request(addr, {"op": "status"}, timeout=timeout)


def where(tb: Testbed) -> tuple[list[str], list[str]]:
    """Hosts that run the enclave (its agent serves it: running, or paused waiting for heap data), and
    hosts that only hold it (a source past its commit point, or an agent whose enclave process died)."""
    runs, held = [], []
    for h in ("a", "b"):
        info = status(tb.addr(h))["enclaves"].get(NAME)
        if info is None:
            continue
        serving = (info.get("status") == "running" and info.get("state") == "running") or info.get("status") == "paused"
        (runs if serving else held).append(h)
    return runs, held


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return True
        except ConstmigError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def read_back(addr: str, acked: dict[str, bytes], timeout: float = 60.0, name: str = NAME) -> int:
    """Read every acknowledged write from the copy at `addr`: how many are missing or wrong. Raises the
    enclave's or agent's error if a read fails."""
    c = EnclaveClient(addr, name, timeout=timeout)
    try:
        keys = list(acked)
        bad = 0
        for i in range(0, len(keys), 256):
            part = keys[i:i + 256]
            got = c.call("get_many", part)
            bad += sum(1 for k, v in zip(part, got, strict=True) if v != acked[k])
        return bad
    finally:
        c.close()


@dataclass
class Params:
    """How one run migrates."""

    strategy: str
    tracker: str = "access"
    timeout: float = 3.0  # the migration's I/O timeout (a silent peer is given up after this)
    resume_deadline: float = 8.0
    max_bandwidth: float = 0.0  # bytes/s for the post-copy background stream (0 = unlimited)
    heap: int = HEAP
    keys: int = 200
    write_ratio: float = 0.5
    checkpoint: bool = False  # seal a checkpoint before migrating (for the mitigation checks)


def reset(tb: Testbed) -> None:
    """Back to a clean bed between scenarios: links up, no loss, both agents alive and empty."""
    for h in ("a", "b"):
        tb.link_up(h)  # idempotent
        if tb.host(h).link.loss_pct:
            tb.set_loss(h, 0)
    for h in ("a", "b"):
        pid = tb.record["procs"][h].get("agent_pid")
        try:
            st = status(tb.addr(h), timeout=5) if _alive(pid) else None
        except ConstmigError:
            st = None
        if st is None or st["enclaves"]:
            tb.restart_agent(h)  # kills whatever enclave was left, in whatever state


def run(tb: Testbed, p: Params, at: At | None, fault: Fault | None) -> Outcome:
    """Migrate a hammered kvstore from a to b through the trigger proxy, fire `fault` at `at`, wait for
    the migration to conclude and the fault to be undone, and observe the outcome."""
    t0 = time.monotonic()
    reset(tb)
    a, b = tb.addr("a"), tb.addr("b")
    launch_filled(a, NAME, "kvstore", p.heap, 0.9, seed=11)
    hammer = KVHammer(a, NAME, keys=p.keys, write_ratio=p.write_ratio, seed=5)
    # Longer than any outage here: a call that times out desynchronizes the client (test_client_timeout.py).
    hammer.client.timeout = 120.0
    hammer.preload()
    notes: dict[str, Any] = {}
    if p.checkpoint:  # the hammer's first writes are in it; what it writes from now on is not
        notes["checkpoint"] = client.request(a, {"op": "checkpoint", "name": NAME})
        notes["acked_at_checkpoint"] = dict(hammer.acked)
    injector = Injector(tb, fault) if fault is not None and fault.kind != "loss" else None
    trigger = Trigger(at, injector)
    proxy = MitmProxy(b, trigger.forward, back=trigger.back, listen=tb.record["root_ip"])
    phases: list[str] = []
    figures: dict[str, Any] | None = None
    error: str | None = None
    try:
        if fault is not None and fault.kind == "loss":
            for h in ("a", "b"):
                tb.set_loss(h, fault.loss_pct)
        hammer.start()
        time.sleep(0.3)
        try:
            figures = migrate(NAME, a, proxy.addr, p.strategy, timeout=p.timeout, tracker=p.tracker,
                              max_bandwidth=p.max_bandwidth, resume_deadline=p.resume_deadline,
                              on_progress=lambda info: _phase(phases, info))
        except ConstmigError as e:
            error = str(e)
        if injector is not None:
            injector.wait(60)
        if fault is not None and fault.kind == "loss":
            for h in ("a", "b"):
                tb.set_loss(h, 0)
        report = hammer.stop()
        runs, held = where(tb)
    finally:
        hammer.close()
        proxy.close()
    return Outcome(runs, held, figures, error, phases, injector.fired.is_set() if injector else fault is not None,
                   dict(hammer.acked), set(hammer.uncertain), report.calls, report.wrong, list(report.errors),
                   time.monotonic() - t0, notes)


def _phase(phases: list[str], info: dict[str, Any]) -> None:
    ph = str(info.get("phase"))
    if not phases or phases[-1] != ph:
        phases.append(ph)

