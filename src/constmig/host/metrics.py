"""An agent's metrics for Prometheus (`constmig agent --metrics-listen HOST:PORT`, served at /metrics).

They name this host's enclaves, so they are served on loopback unless `--metrics-public` says to expose
them (a scraper elsewhere then reaches them; put them behind the network's own access control).

What a fleet operator watches per host: enclaves by state and their heap bytes (read at scrape time
from the agent's table), each migration out while it runs (what is left, the rates, the throttle, the
round and how long it has run, read at scrape time from its latest progress), migrations in flight and
by direction, strategy and outcome, their downtime by direction, the demand-fault latency an incoming
post-copy migration's app waited, the bytes migrations moved, enclave deaths, checkpoint ages and the
host's memory. The Prometheus client library writes the format; a registry of its own keeps agents in
one process apart.

Alerts need series that exist before their first event: `increase()` of a series born at 1 is 0, so
every label set known in advance (directions, strategies, outcomes, trackers, states) is created at 0
when the agent starts, and the gauges read 0 rather than vanish. docs/metrics.md lists every series.
"""

from __future__ import annotations

import ipaddress
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from constmig.errors import ConfigError
from constmig.host.address import parse_addr
from constmig.host.status import Status
from constmig.migration.constants import STRATEGIES, TRACKERS
from constmig.migration.receiver import parse_histogram

DOWNTIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
FAULT_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)

DIRECTIONS = ("in", "out")
# How a migration ends, one word each, the same in the metrics, the log and the agent's history (status):
# done; rolled-back (before its commit point: the enclave runs on at the source with all its data);
# cancelled (rolled back because someone asked); failed (it never runs at the source again: past its
# commit point with no way to resume, its process gone, or an incoming one given up); stranded (past its
# commit point and the destination keeps saying it has no copy: restore it from a checkpoint).
OUTCOMES = ("done", "rolled-back", "cancelled", "failed", "stranded")
DEATH_REASONS = ("SIGKILL", "exit", "with-agent")  # created at 0; another signal's name appears when one kills


def metrics_address(listen: str, public: bool = False) -> tuple[str, int]:
    """`--metrics-listen`: PORT (on 127.0.0.1) or HOST:PORT; a host beyond loopback only with `public`."""
    text = listen.strip()
    host, port = parse_addr(f"127.0.0.1:{text}" if text.isdigit() else text)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not public:
        raise ConfigError(f"metrics on {listen} would show this host's enclave names to anyone who reaches it: "
                          "serve them on 127.0.0.1 (--metrics-listen PORT), or add --metrics-public")
    return host, port


class CallRate:
    """Calls per second into one enclave over the last WINDOW seconds (per-second buckets): the load a
    drain's placement spreads."""

    WINDOW = 10

    def __init__(self) -> None:
        self._buckets = [0] * (self.WINDOW + 1)
        self._second = [0] * (self.WINDOW + 1)

    def record(self, now: float | None = None) -> None:
        sec = int(time.time() if now is None else now)
        i = sec % len(self._buckets)
        if self._second[i] != sec:
            self._second[i], self._buckets[i] = sec, 0
        self._buckets[i] += 1

    def per_second(self, now: float | None = None) -> float:
        """Over the last WINDOW whole seconds (the current one is still filling)."""
        sec = int(time.time() if now is None else now)
        return sum(n for n, s in zip(self._buckets, self._second, strict=True) if sec - self.WINDOW <= s < sec) \
            / self.WINDOW


class _Enclaves(Collector):
    """Gauges read from the agent's table when scraped (never stale, nothing to keep in step)."""

    def __init__(self, table: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._table = table  # -> (name, status, heap bytes) per enclave

    def collect(self) -> Iterable[GaugeMetricFamily]:
        rows = list(self._table())
        by_state = GaugeMetricFamily("constmig_enclaves", "Enclaves on this agent, by state", labels=["state"])
        counts = {status.value: 0 for status in Status}  # a state with no enclave reads 0
        for _, status, _ in rows:
            counts[status] = counts.get(status, 0) + 1
        for status, n in sorted(counts.items()):
            by_state.add_metric([status], n)
        heap = GaugeMetricFamily("constmig_enclave_heap_bytes", "Heap size of each enclave on this agent",
                                 labels=["enclave", "state"])
        for name, status, size in rows:
            heap.add_metric([name, status], size)
        yield by_state
        yield heap


# A migration out while it runs: (gauge, help, its figure in control.OutgoingProgress). A figure no frame
# gave yet has no sample; a migration that ended has none (read at scrape time, like the enclaves' gauges).
MIGRATION_GAUGES = (
    ("constmig_migration_remaining_bytes", "Bytes a migration out of here still has to send: of the pre-copy "
     "round or phase running, or what the last round left", "left_bytes"),
    ("constmig_migration_dirty_rate_bytes_per_second", "How fast the app of a migration out of here newly wrote "
     "chunks in its last pre-copy round", "dirty_bytes_per_s"),
    ("constmig_migration_ack_rate_bytes_per_second", "How fast the destination acknowledged the last pre-copy "
     "round of a migration out of here", "ack_bytes_per_s"),
    ("constmig_migration_throttle_ratio", "Share of the writers' pace a migration out of here holds back "
     "(0 to --max-throttle)", "throttle"),
    ("constmig_migration_round", "The pre-copy round a migration out of here runs (or last ended)", "round"),
    ("constmig_migration_elapsed_seconds", "How long a migration out of here has run (from its start; a "
     "stuck one keeps growing)", "elapsed_s"),
)


class _Migrations(Collector):
    """Gauges of each migration out while it runs, from the latest progress its enclave reported."""

    def __init__(self, moving: Callable[[], dict[str, Any]]) -> None:
        self._moving = moving  # -> enclave name -> control.OutgoingProgress

    def collect(self) -> Iterable[GaugeMetricFamily]:
        moving = sorted(self._moving().items())
        for name, help_text, figure in MIGRATION_GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=["enclave"])
            for enclave, progress in moving:
                value = getattr(progress, figure)
                if value is not None:
                    gauge.add_metric([enclave], float(value))
            yield gauge


@dataclass
class HostFigures:
    """What the agent's table says at a scrape, beyond the enclaves' rows (Roster.figures)."""

    in_flight: dict[str, int] = field(default_factory=dict)  # direction -> migrations under way
    memory_available: int = 0
    memory_promised: int = 0  # heap its enclaves may still claim
    checkpoint_age: dict[str, float] = field(default_factory=dict)  # enclave -> seconds since its newest
    exited: dict[str, int] = field(default_factory=dict)  # a key per dead enclave -> its returncode
    died_with_agent: int = 0  # enclaves the previous agent on this state folder ran
    directory: tuple[bool, int] | None = None  # the store answered the last refresh, entries to fix; None: none


def death_reason(returncode: int) -> str:
    """A dead enclave's reason label: the signal's name, or `exit`."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal-{-returncode}"
    return "exit"


class _Host(Collector):
    """Migrations in flight, memory, checkpoint ages and enclave deaths, read from the agent's table when
    scraped. A death is counted at the first scrape that sees the enclave's process gone."""

    def __init__(self, figures: Callable[[], HostFigures]) -> None:
        self._figures = figures
        self._seen: set[str] = set()
        self._deaths = dict.fromkeys(DEATH_REASONS, 0)
        self._with_agent: int | None = None

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        f = self._figures()
        if self._with_agent is None:  # once: they died before this agent started
            self._with_agent = f.died_with_agent
            self._deaths["with-agent"] += f.died_with_agent
        for key, code in f.exited.items():
            if key not in self._seen:
                self._seen.add(key)
                reason = death_reason(code)
                self._deaths[reason] = self._deaths.get(reason, 0) + 1
        flight = GaugeMetricFamily("constmig_migrations_in_flight", "Migrations under way here (in: prepared or "
                                   "receiving; out: from its start until it ends)", labels=["direction"])
        for direction in DIRECTIONS:
            flight.add_metric([direction], f.in_flight.get(direction, 0))
        yield flight
        yield GaugeMetricFamily("constmig_host_memory_available_bytes", "This host's available memory",
                                value=f.memory_available)
        yield GaugeMetricFamily("constmig_host_memory_promised_bytes", "Heap the enclaves here may still claim "
                                "(each heap less what its process holds)", value=f.memory_promised)
        age = GaugeMetricFamily("constmig_checkpoint_age_seconds", "Seconds since the newest checkpoint of each "
                                "enclave here (none: it has no checkpoint)", labels=["enclave"])
        for name, seconds in sorted(f.checkpoint_age.items()):
            age.add_metric([name], seconds)
        yield age
        if f.directory is not None:  # an agent without a directory has no such series
            up, unsynced = f.directory
            yield GaugeMetricFamily("constmig_directory_up", "1 if the fleet directory (etcd) answered this "
                                    "agent's last lease refresh, else 0", value=int(up))
            yield GaugeMetricFamily("constmig_directory_unsynced_enclaves", "Enclaves here whose directory entry "
                                    "may be wrong until the store answers again", value=unsynced)
        deaths = CounterMetricFamily("constmig_enclave_deaths", "Enclaves whose process died while this agent "
                                     "ran them (by signal, or exit), or that died with the previous agent "
                                     "(with-agent)", labels=["reason"])
        for reason, n in sorted(self._deaths.items()):
            deaths.add_metric([reason], n)
        yield deaths


class _Sessions(Collector):
    """Open client sessions per running enclave, asked of the enclaves at scrape time."""

    def __init__(self, sessions: Callable[[], dict[str, int]]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("constmig_enclave_sessions", "Client sessions open in each running enclave "
                                  "here (its own table; asked at scrape time)", labels=["enclave"])
        for name, n in sorted(self._sessions().items()):
            gauge.add_metric([name], n)
        yield gauge


class AgentMetrics:
    """The agent's registry, its instruments, and the HTTP endpoint once served."""

    def __init__(self, table: Callable[[], Iterable[tuple[str, str, int]]],
                 moving: Callable[[], dict[str, Any]] = dict, figures: Callable[[], HostFigures] = HostFigures,
                 info: dict[str, str] | None = None, sessions: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Sessions(sessions))  # `sessions`: Agent._sessions
        self.registry.register(_Enclaves(table))
        self.registry.register(_Migrations(moving))  # `moving`: Roster.outgoing
        self.registry.register(_Host(figures))  # `figures`: Roster.figures
        self.migrations = Counter("constmig_migrations", "Migrations this agent took part in",
                                  ["direction", "strategy", "outcome"], registry=self.registry)
        self.downtime = Histogram("constmig_downtime_seconds", "Downtime of finished migrations (timed inside "
                                  "the enclaves; both ends record it: sum one direction for a fleet)",
                                  ["direction", "strategy"], buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.fault_latency = Histogram("constmig_demand_fault_seconds", "How long the app of a post-copy "
                                       "migration out of here waited for a missing chunk at its destination "
                                       "(reported at DONE; bin upper edges)", ["tracker"],
                                       buckets=FAULT_BUCKETS, registry=self.registry)
        self.call_wait = Histogram("constmig_call_seconds", "How long each client call through this agent "
                                   "waited for its answer, by whether its enclave was moving when the call came "
                                   "(a client's gap across a migration is the longest of these)", ["moving"],
                                   buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.moved_bytes = Counter("constmig_migrated_bytes", "Heap bytes moved by finished migrations out of "
                                   "here", ["direction"], registry=self.registry)
        info = {"host_id": "", "version": "", "tee": "sim", **(info or {})}
        Gauge("constmig_agent_info", "This agent: its host id, constmig version and TEE (always 1)",
              sorted(info), registry=self.registry).labels(**info).set(1)
        self._zeros()
        self.url: str | None = None
        self._server: Any = None

    def _zeros(self) -> None:
        """Every label set known in advance, at 0, so that rate() and increase() see the first event."""
        for direction in DIRECTIONS:
            self.moved_bytes.labels(direction)
            for strategy in STRATEGIES:
                self.downtime.labels(direction, strategy)
                for outcome in OUTCOMES:
                    self.migrations.labels(direction, strategy, outcome)
        for tracker in (*TRACKERS, "none"):
            self.fault_latency.labels(tracker)
        for moving in ("yes", "no"):
            self.call_wait.labels(moving)

    def serve(self, listen: str, public: bool = False) -> str:
        """Serve /metrics on HOST:PORT or PORT (port 0: a free one); returns the URL."""
        host, port = metrics_address(listen, public)
        self._server, _ = start_http_server(port, host, registry=self.registry)
        self.url = f"http://{host}:{self._server.server_port}/metrics"
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def finished(self, direction: str, figures: dict[str, Any]) -> None:
        """A migration in or out finished (DONE): its outcome, downtime, bytes and waits."""
        strategy = str(figures.get("strategy") or "unknown")
        self.migrations.labels(direction, strategy, "done").inc()
        if figures.get("downtime_ms") is not None:
            self.downtime.labels(direction, strategy).observe(float(figures["downtime_ms"]) / 1e3)
        if figures.get("state_bytes"):
            self.moved_bytes.labels(direction).inc(int(figures["state_bytes"]))
        if direction == "out":  # the destination reports its app's waits to the source at DONE
            self._faults(str(figures.get("tracker") or "none"), figures.get("fault_latency_hist"))

    def ended(self, direction: str, strategy: str, outcome: str) -> None:
        """A migration that did not finish: rolled-back, cancelled, failed or stranded (OUTCOMES)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown migration outcome {outcome!r}; known: {', '.join(OUTCOMES)}")
        self.migrations.labels(direction, strategy or "unknown", outcome).inc()

    def _faults(self, tracker: str, hist: Any) -> None:
        """The destination's log-binned histogram (receiver.latency_histogram), each fault at its bin's
        upper edge."""
        parsed = parse_histogram(hist) if isinstance(hist, str) else None
        if parsed is None:
            return
        per_decade, counts = parsed
        child = self.fault_latency.labels(tracker)
        for i in np.flatnonzero(counts).tolist():
            edge = 10 ** ((i + 1) / per_decade) / 1e6  # seconds
            for _ in range(min(int(counts[i]), 100_000)):
                child.observe(edge)
