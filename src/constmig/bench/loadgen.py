"""Clients that keep calling an enclave while it migrates: what users of the enclave observe.

`KVHammer` puts and gets random keys (uniform or zipfian) in a loop through the agents (following
redirects), remembers every write the enclave acknowledged, and records when each call succeeded. The
longest gap between two successful calls is the client-observed unavailability (`client_gap_ms`);
afterwards `verify` reads back every acknowledged write, so a lost or wrong answer is counted, not
assumed away. `StepDriver` does the same for the other workloads: it calls their `step` ECALL (one
bounded unit of work, deterministic given its seed) and counts the operations each step reports.

`Fleet` is the many-users view: N clients at a fixed aggregate rate, open loop (latency counted from
each call's scheduled send time, so queueing behind a stall is measured), failed calls retried and
counted, every acknowledged write read back afterwards, and latency percentiles per phase (before,
during and after a migration).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from constmig.bench.stats import percentiles
from constmig.client import EnclaveClient, Trust
from constmig.errors import ConstmigError

LONG_GAP_MS = 20.0  # gaps kept one by one (bench/stalls.py: which of them the machine stood still for)


@dataclass
class LoadReport:
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: int = 0  # a get that returned something other than the last acknowledged write
    max_gap_ms: float = 0.0
    gap_at: float = 0.0  # wall time the longest gap started
    long_gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, ms) of every gap >= LONG_GAP_MS
    ops_timeline: list[tuple[float, float]] = field(default_factory=list)  # (time, ops/s) per 100 ms
    ops: int = 0  # application operations done by the answered calls (a kvstore call is one)

    @property
    def clean(self) -> bool:
        """No call failed and no answer was wrong."""
        return self.wrong == 0 and not self.errors

    def figures(self) -> dict[str, Any]:
        return {"client_calls": self.calls, "client_errors": len(self.errors), "client_wrong": self.wrong,
                "client_gap_ms": round(self.max_gap_ms, 2), "client_ops": self.ops}


class _Loop:
    """The timing loop shared by the drivers: one call at a time in a thread, gaps and ops/s recorded.

    After `give_up_after` failed calls more it stops calling (the report keeps every error)."""

    started = 0.0  # time.time() at start: the clock of the report's times

    def __init__(self, addr: str, name: str, trust: Trust | None, timeout: float = 60.0,
                 give_up_after: int = 100) -> None:
        self.client = EnclaveClient(addr, name, timeout=timeout, trust=trust)
        self.report = LoadReport()
        self.give_up_after = give_up_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()

    def now(self) -> float:
        return time.time()

    def start(self) -> Self:
        self.started = time.time()
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120.0)
        return self.report

    def close(self) -> None:
        self.client.close()

    def _one(self, seq: int) -> int:
        """One call; returns the operations it did. Raises ConstmigError if the call failed."""
        raise NotImplementedError

    def _run(self) -> None:
        last = time.time()
        bucket_start, bucket_ops = last, 0
        seq = 0
        while not self._stop.is_set():
            seq += 1
            try:
                ops = self._one(seq)
            except ConstmigError as e:
                self.report.errors.append(str(e))
                if len(self.report.errors) > self.give_up_after:
                    break
                time.sleep(0.01)
                continue
            now = time.time()
            self.report.calls += 1
            self.report.ops += ops
            gap = (now - last) * 1e3
            if gap >= LONG_GAP_MS:
                self.report.long_gaps.append((last, gap))
            if gap > self.report.max_gap_ms:
                self.report.max_gap_ms, self.report.gap_at = gap, last
            last = now
            bucket_ops += ops
            if now - bucket_start >= 0.1:
                self.report.ops_timeline.append((bucket_start, bucket_ops / (now - bucket_start)))
                bucket_start, bucket_ops = now, 0


def write_many(client: Any, items: list[list[Any]]) -> None:
    """Put (key, value) pairs in batches of 256 (one call each)."""
    for i in range(0, len(items), 256):
        client.call("put_many", items[i:i + 256])


def read_back(client: Any, acked: dict[str, bytes]) -> int:
    """Read back every acknowledged write, in batches; returns how many are missing or wrong."""
    keys = list(acked)
    bad = 0
    for i in range(0, len(keys), 256):
        part = keys[i:i + 256]
        got = client.call("get_many", part)
        bad += sum(1 for k, v in zip(part, got, strict=True) if v != acked[k])
    return bad


class KVHammer(_Loop):
    """Random put/get on a kvstore, one call at a time, in a background thread.

    `write_ratio` 0.1 or 0.5 gives the usual 90/10 and 50/50 read/write mixes; `zipf` (e.g. 0.99)
    picks keys by a zipfian law over their order instead of uniformly, so a few keys are hot.
    """

    def __init__(self, addr: str, name: str, keys: int = 2000, write_ratio: float = 0.5, seed: int = 1,
                 value_size: int = 200, zipf: float | None = None, trust: Trust | None = None) -> None:
        if zipf is not None and not zipf > 0:
            raise ValueError(f"zipf exponent must be positive, not {zipf!r}")
        super().__init__(addr, name, trust)
        self.keys = [f"hammer-{i}" for i in range(keys)]
        self.write_ratio = write_ratio
        self.rng = random.Random(seed)
        # Cumulative zipf weights of key ranks 1..keys: one bisect per draw.
        self._cdf = list(itertools.accumulate((i + 1) ** -zipf for i in range(keys))) if zipf else None
        self.value_size = value_size
        self.acked: dict[str, bytes] = {}
        self.uncertain: set[str] = set()  # a put failed: it may or may not have been applied

    def preload(self) -> None:
        """Write every key once (so a read-only hammer has known answers), in a few batched calls."""
        items = [[k, f"{k}:preload".encode()] for k in self.keys]
        write_many(self.client, items)
        self.acked.update(items)

    def _key(self) -> str:
        if self._cdf is None:
            return self.rng.choice(self.keys)
        i = bisect.bisect_right(self._cdf, self.rng.random() * self._cdf[-1])
        return self.keys[min(i, len(self.keys) - 1)]

    def _one(self, seq: int) -> int:
        key = self._key()
        if self.rng.random() < self.write_ratio:
            value = f"{key}:{seq}:".encode().ljust(self.rng.randint(1, self.value_size), b"v")
            try:
                self.client.call("put", key, value)
            except ConstmigError:
                self.acked.pop(key, None)
                self.uncertain.add(key)
                raise
            self.acked[key] = value  # only once the enclave answered
            self.uncertain.discard(key)
        else:
            got = self.client.call("get", key)
            if key not in self.uncertain and got != self.acked.get(key):
                self.report.wrong += 1
        return 1

    def verify(self) -> int:
        """Read back every acknowledged write; returns how many are missing or wrong."""
        return read_back(self.client, self.acked)


class StepDriver(_Loop):
    """Calls a workload's `step` ECALL in a loop, in a background thread, and counts the ops it reports.

    Step i gets seed `seed * 2**32 + i`, so a run is reproducible. With `record`, every answered step's
    (seed, result) is kept in `log`: replaying those seeds on a twin that never migrated must give the
    same results and the same final state, which is how a test checks that nothing was lost or misread.
    """

    def __init__(self, addr: str, name: str, n: int | None = None, seed: int = 1, record: bool = False,
                 method: str = "step", trust: Trust | None = None) -> None:
        super().__init__(addr, name, trust)
        self.n = n
        self.seed = seed
        self.method = method
        self.record = record
        self.log: list[tuple[int, Any]] = []

    def seed_of(self, seq: int) -> int:
        return (self.seed << 32) + seq

    def _one(self, seq: int) -> int:
        seed = self.seed_of(seq)
        kwargs: dict[str, Any] = {"seed": seed} if self.n is None else {"n": self.n, "seed": seed}
        result = self.client.call(self.method, **kwargs)
        if self.record:
            self.log.append((seed, result))
        ops = result.get("ops", 1) if isinstance(result, dict) else 1
        return int(ops) if isinstance(ops, int) and not isinstance(ops, bool) else 1


class Caller(_Loop):
    """One ECALL with the same arguments in a loop; stops at the first call that fails (check_migrates)."""

    def __init__(self, addr: str, name: str, method: str, args: list[Any], trust: Trust | None,
                 timeout: float) -> None:
        super().__init__(addr, name, trust, timeout, give_up_after=0)
        self.method, self.args = method, args

    def _one(self, seq: int) -> int:
        self.client.call(self.method, *self.args)
        return 1


def driver_for(app: str, addr: str, name: str, **kw: Any) -> KVHammer | StepDriver:
    """The client load for `app`: KVHammer for kvstore, StepDriver (its `step` ECALL) for the others."""
    if app == "kvstore":
        return KVHammer(addr, name, **kw)
    return StepDriver(addr, name, **kw)


# ---------------------------------------------------------------------------------------------------
# Fleet: many clients at a fixed aggregate rate, open loop, for latency percentiles around a migration.
# ---------------------------------------------------------------------------------------------------

PHASES = ("before", "during", "after")


class GaveUp(ConstmigError):
    """A fleet call that still failed after its retries."""

    def __init__(self, message: str, retries: int) -> None:
        super().__init__(message)
        self.retries = retries


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One scheduled call. Times are seconds since the fleet's start; latency runs from `scheduled`
    (not from the send), so a call that queued behind a slow one is charged for the wait."""

    client: int
    op: str  # put | get
    scheduled: float
    sent: float  # when the first attempt went out (sent - scheduled = time queued in the client)
    latency: float  # scheduled to the answer (or to giving up, for a failed call)
    ok: bool
    retries: int = 0
    error: str = ""


def fleet_schedule(rate: float, duration: float, clients: int) -> list[list[float]]:
    """Send times per client: slot j of the aggregate schedule (j / rate) goes to client j mod N.

    Interleaving the clients keeps the aggregate rate even, instead of N bursts at every client tick.
    """
    if rate <= 0 or duration <= 0 or clients < 1:
        raise ValueError("rate, duration and clients must be positive")
    slots = int(round(rate * duration))
    out: list[list[float]] = [[] for _ in range(clients)]
    for j in range(slots):
        out[j % clients].append(j / rate)
    return out


def phase_of(t: float, window: tuple[float, float] | None) -> str:
    """before / during / after the migration window [start, end), by the call's scheduled time."""
    if window is None or t < window[0]:
        return "before"
    return "during" if t < window[1] else "after"


LATENCIES = {"p50_ms": 50, "p99_ms": 99, "max_ms": 100}


def call_stats(records: list[CallRecord], span_s: float | None = None) -> dict[str, Any]:
    """Counts and latency percentiles (ms, answered calls only) of a set of calls."""
    lat = [r.latency * 1e3 for r in records if r.ok]
    out: dict[str, Any] = {
        "calls": len(records), "ok": sum(r.ok for r in records), "failed": sum(not r.ok for r in records),
        "retried": sum(r.retries > 0 for r in records), "retries": sum(r.retries for r in records),
        "puts": sum(r.op == "put" for r in records), "gets": sum(r.op == "get" for r in records),
        **percentiles(lat, LATENCIES, digits=3)}
    out["mean_ms"] = round(statistics.fmean(lat), 3) if lat else None
    out["queued_p99_ms"] = percentiles([(r.sent - r.scheduled) * 1e3 for r in records], {"p": 99}, digits=3)["p"]
    if span_s is not None:
        out["span_s"] = round(span_s, 3)
        out["rate"] = round(len(records) / span_s, 1) if span_s > 0 else None
    return out


def phase_stats(records: list[CallRecord], window: tuple[float, float] | None,
                duration: float) -> dict[str, dict[str, Any]]:
    """call_stats per phase (before / during / after the migration), split by scheduled time."""
    groups: dict[str, list[CallRecord]] = {p: [] for p in PHASES}
    for r in records:
        groups[phase_of(r.scheduled, window)].append(r)
    if window is None:
        spans = {"before": duration, "during": 0.0, "after": 0.0}
    else:
        start, end = window
        spans = {"before": max(0.0, start), "during": max(0.0, min(end, duration) - start),
                 "after": max(0.0, duration - end)}
    return {p: call_stats(groups[p], spans[p]) for p in PHASES}


def latency_timeline(records: list[CallRecord], bucket_s: float = 0.25) -> list[dict[str, Any]]:
    """Per bucket of scheduled time: calls, failures and latency p50/p99/max (ms), for plots."""
    buckets: dict[int, list[CallRecord]] = {}
    for r in records:
        buckets.setdefault(int(r.scheduled // bucket_s), []).append(r)
    return [{"t": round(k * bucket_s, 3), "calls": len(rs), "failed": sum(not r.ok for r in rs),
             **percentiles([r.latency * 1e3 for r in rs if r.ok], LATENCIES, digits=3)}
            for k, rs in sorted(buckets.items())]


class WriteBook:
    """What one client knows about its own keys, to judge every answer it gets.

    Each client owns its keys, so it alone writes them and knows what a read must return: the last
    acknowledged value, or the value of a put that failed after it (that put may or may not have been
    applied). Values are unique per put, so a read of an older value (or of nothing) is a lost
    acknowledged write, and anything never written to the key is wrong.
    """

    def __init__(self) -> None:
        self.acked: dict[str, bytes] = {}
        self.maybe: dict[str, set[bytes]] = {}
        self.written: dict[str, set[bytes]] = {}  # every value ever sent for the key

    def sending(self, key: str, value: bytes) -> None:
        self.written.setdefault(key, set()).add(value)

    def acknowledged(self, key: str, value: bytes) -> None:
        self.acked[key] = value
        self.maybe.pop(key, None)

    def failed(self, key: str, value: bytes) -> None:
        self.maybe.setdefault(key, set()).add(value)

    def judge(self, key: str, got: Any) -> str:
        """"ok", "lost" (nothing, or a value an acknowledged write replaced) or "wrong"."""
        if got == self.acked.get(key) or got in self.maybe.get(key, ()):
            return "ok"
        if got is None or got in self.written.get(key, ()):
            return "lost"
        return "wrong"


@dataclass
class FleetReport:
    """Everything a fleet run measured; `summary` turns it into JSON-ready figures."""

    records: list[CallRecord]
    duration: float
    clients: int
    rate: float
    unsent: int = 0  # scheduled calls never sent (the run overran its drain time)
    stale_reads: int = 0  # a get answered with an older value than the last acknowledged write
    wrong_reads: int = 0  # a get answered with something never written
    lost: int = 0  # read-back after the run: acknowledged writes missing or rolled back
    wrong_final: int = 0  # read-back after the run: values never written
    unverified: int = 0  # keys the read-back could not read (call failed after retries)
    verified_keys: int = 0
    errors: list[str] = field(default_factory=list)  # first few distinct failure messages

    @property
    def wrong(self) -> int:
        return self.wrong_reads + self.stale_reads + self.wrong_final

    def totals(self) -> dict[str, Any]:
        t = call_stats(self.records, self.duration)
        t.update({"scheduled": len(self.records) + self.unsent, "unsent": self.unsent, "lost": self.lost,
                  "wrong": self.wrong, "stale_reads": self.stale_reads, "wrong_reads": self.wrong_reads,
                  "wrong_final": self.wrong_final, "unverified": self.unverified,
                  "verified_keys": self.verified_keys, "errors": self.errors[:10]})
        return t

    def summary(self, window: tuple[float, float] | None) -> dict[str, Any]:
        return {"totals": self.totals(), "phases": phase_stats(self.records, window, self.duration),
                "timeline": latency_timeline(self.records)}


class Fleet:
    """N clients, each with its own connection, sending at a fixed aggregate rate for a bounded time.

    Open loop: every call has a scheduled send time fixed in advance, and its latency is measured
    from that time, so a stall (a migration's downtime) is charged to every call it delayed, not just
    to the one that was waiting (no coordinated omission). Each client owns a disjoint set of keys
    and puts or gets them; a failed call is retried with backoff up to `retries` times. After the run
    `verify` reads every key back and judges it against what was acknowledged.

    `client_factory(i)` makes client i's connection (an object with `call` and `close`), so the
    accounting can be tested without agents.
    """

    started = 0.0  # its clock (now()) reads 0 at the first slot

    def __init__(self, addr: str, name: str, clients: int = 8, rate: float = 400.0, duration: float = 20.0,
                 keys_per_client: int = 200, write_ratio: float = 0.5, value_size: int = 200, seed: int = 1,
                 retries: int = 5, backoff: float = 0.05, call_timeout: float = 30.0, drain: float = 30.0,
                 client_factory: Callable[[int], Any] | None = None, trust: Trust | None = None) -> None:
        if clients < 1 or keys_per_client < 1:
            raise ValueError("a fleet needs at least one client and one key per client")
        self.clients, self.rate, self.duration = clients, rate, duration
        self.write_ratio, self.value_size = write_ratio, value_size
        self.retries, self.backoff, self.drain = retries, backoff, drain
        self.schedule = fleet_schedule(rate, duration, clients)
        factory = client_factory or (lambda i: EnclaveClient(addr, name, timeout=call_timeout, trust=trust))
        self.conns = [factory(i) for i in range(clients)]
        self.keys = [[f"fleet-{i}-{k}" for k in range(keys_per_client)] for i in range(clients)]
        self.books = [WriteBook() for _ in range(clients)]
        self.rngs = [random.Random(seed * 1_000_003 + i) for i in range(clients)]
        self._records: list[list[CallRecord]] = [[] for _ in range(clients)]
        self._unsent = [0] * clients
        self._reads = [{"stale": 0, "wrong": 0} for _ in range(clients)]
        self._errors: list[str] = []
        self._abort = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"fleet-{i}", daemon=True)
                         for i in range(clients)]
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since the fleet's start (the clock of every record)."""
        return time.monotonic() - self.t0

    def preload(self) -> None:
        """Give every key a known value first, so every get from the start has one right answer."""
        for conn, keys, book in zip(self.conns, self.keys, self.books, strict=True):
            for j in range(0, len(keys), 256):
                items = [[k, f"{k}:preload".encode()] for k in keys[j:j + 256]]
                for k, v in items:
                    book.sending(k, v)
                self._with_retries(lambda c=conn, it=items: c.call("put_many", it))
                for k, v in items:
                    book.acknowledged(k, v)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Self:
        self.t0 = time.monotonic() + 0.05  # every thread is up before the first slot
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> FleetReport:
        """The schedule runs to its end: a fleet is stopped by waiting for it (join)."""
        return self.join()

    def join(self, timeout: float | None = None) -> FleetReport:
        """Wait for the schedule to finish (at most duration + drain, or `timeout`)."""
        limit = self.duration + self.drain + 5.0 if timeout is None else timeout
        end = time.monotonic() + limit
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self._abort.set()
        for t in self._threads:
            t.join(5.0)
        return self.report()

    def report(self) -> FleetReport:
        records = sorted((r for rs in self._records for r in rs), key=lambda r: r.scheduled)
        return FleetReport(records, self.duration, self.clients, self.rate, unsent=sum(self._unsent),
                           stale_reads=sum(r["stale"] for r in self._reads),
                           wrong_reads=sum(r["wrong"] for r in self._reads), errors=list(self._errors))

    def verify(self, report: FleetReport) -> FleetReport:
        """Read back every key of every client (batched, retried) and count lost and wrong values."""
        for i, conn in enumerate(self.conns):
            book = self.books[i]
            keys = self.keys[i]
            for j in range(0, len(keys), 256):
                part = keys[j:j + 256]
                try:
                    got = self._with_retries(lambda c=conn, p=part: c.call("get_many", p))[0]
                except ConstmigError as e:
                    report.unverified += len(part)
                    self._note(report.errors, f"read-back: {e}")
                    continue
                for k, v in zip(part, got, strict=True):
                    verdict = book.judge(k, v)
                    report.verified_keys += 1
                    report.lost += verdict == "lost"
                    report.wrong_final += verdict == "wrong"
        return report

    def close(self) -> None:
        self._abort.set()
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()

    # ---- inside a client thread ----
    def _with_retries(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        """fn(), retried on ConstmigError with exponential backoff; returns (result, retries).

        Raises GaveUp (a ConstmigError that says how many retries were made) once they run out."""
        delay = self.backoff
        attempt = 0
        while True:
            try:
                return fn(), attempt
            except ConstmigError as e:
                if attempt >= self.retries or self._abort.is_set():
                    raise GaveUp(str(e), attempt) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                attempt += 1

    def _note(self, errors: list[str], msg: str) -> None:
        if len(errors) < 10 and msg not in errors:
            errors.append(msg)

    def _client(self, i: int) -> None:
        conn, book, rng, keys = self.conns[i], self.books[i], self.rngs[i], self.keys[i]
        records, reads = self._records[i], self._reads[i]
        times = self.schedule[i]
        for n, due in enumerate(times):
            if self._abort.is_set() or self.now() > self.duration + self.drain:
                self._unsent[i] += len(times) - n
                return
            wait = due - self.now()
            if wait > 0:
                time.sleep(wait)
            key = rng.choice(keys)
            is_put = rng.random() < self.write_ratio
            sent = self.now()
            if is_put:
                value = f"{key}:{n}:".encode().ljust(rng.randint(16, max(16, self.value_size)), b"v")
                book.sending(key, value)
                fn: Callable[[], Any] = lambda k=key, v=value: conn.call("put", k, v)  # noqa: E731
            else:
                fn = lambda k=key: conn.call("get", k)  # noqa: E731
            try:
                got, retries = self._with_retries(fn)
            except GaveUp as e:
                if is_put:
                    book.failed(key, value)
                self._note(self._errors, str(e))
                records.append(CallRecord(i, "put" if is_put else "get", due, sent, self.now() - due, False,
                                          e.retries, str(e)[:200]))
                continue
            done = self.now()
            if is_put:
                book.acknowledged(key, value)
            else:
                verdict = book.judge(key, got)
                if verdict == "lost":
                    reads["stale"] += 1
                elif verdict == "wrong":
                    reads["wrong"] += 1
            records.append(CallRecord(i, "put" if is_put else "get", due, sent, done - due, True, retries))
