"""Operations over many agents: what runs where (`constmig ls`), emptying a host (`constmig drain`) and
evening out memory use (`constmig rebalance`).

The fleet is a list of agent addresses (`--hosts`), or every agent alive in the fleet directory
(`--etcd`, host/directory.py). Each migration of a drain is the ordinary one,
with its commit point: interrupted anywhere (Ctrl-C, an agent killed, a link cut), every enclave is in
exactly one place (a migration whose requester vanishes before its commit point is cancelled by the
source agent), and the same drain run again moves what is left.

Placement: the largest heap first, each to the host that scores best on room and load: its share of
the most room any host has left (available memory less what its enclaves may still claim, less what
this drain already sent there) minus its share of the fleet's client calls per second (what its
enclaves serve, plus the moved enclaves' own calls). An idle fleet is placed by room alone; a busy
enclave goes where the calls are fewest. A drain that the rest of the fleet cannot hold is refused
before anything moves.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from constmig.errors import ConfigError, ConstmigError, PastCommitPoint
from constmig.host.address import parse_addr
from constmig.host.client import request
from constmig.host.orchestrate import migrate
from constmig.host.recovery import restore_command
from constmig.units import format_size
from constmig.wire import control

STATUS_TIMEOUT_S = 10.0
CANCEL_RETRY_S = 10.0  # an interrupted drain asks a just-started move's agent to cancel it for this long
HEADROOM = 64 << 20  # left free on a destination beyond the heaps it takes


@dataclass
class HostView:
    """One agent as `status` showed it (or why it could not)."""

    addr: str
    host_id: str = ""
    enclaves: dict[str, dict[str, Any]] = field(default_factory=dict)
    free: int = 0  # bytes a new heap may still claim there
    error: str | None = None
    load: float | None = None  # calls per second as published in the store (host/fleetwork.py), if not from status

    @property
    def calls_per_s(self) -> float:
        """Client calls per second into its running enclaves (the agents' 10 s window)."""
        if self.load is not None:
            return self.load
        return sum(float(e.get("calls_per_s") or 0.0) for e in self.enclaves.values() if e.get("status") == "running")


def look(hosts: list[str], timeout: float = STATUS_TIMEOUT_S) -> list[HostView]:
    """Every host's status, asked at once; an unreachable one is listed with its error."""
    views = [HostView(h) for h in hosts]

    def one(v: HostView) -> None:
        try:
            st = request(v.addr, control.Status(), timeout=timeout)
        except ConstmigError as e:
            v.error = str(e)
            return
        v.host_id = str(st.get("host_id", ""))
        v.enclaves = dict(st.get("enclaves") or {})
        mem = st.get("memory") or {}
        v.free = max(int(mem.get("available", 0)) - int(mem.get("promised", 0)), 0)

    threads = [threading.Thread(target=one, args=(v,)) for v in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return views


def hosts_arg(text: str) -> list[str]:
    """`--hosts A,B,...`: addresses, each checked, no repeats."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise ConfigError("--hosts needs at least one HOST:PORT")
    seen: set[tuple[str, int]] = set()
    for h in hosts:
        key = parse_addr(h)
        if key in seen:
            raise ConfigError(f"--hosts names {h} twice")
        seen.add(key)
    return hosts


@dataclass
class Listing:
    """What the fleet directory says: live agents (address -> entry), where each enclave was last, each
    enclave's whole entry (its newest checkpoint there) and every agent's last registration, dead or alive."""

    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    enclaves: dict[str, str] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)


def fleet_hosts(hosts: str | None, etcd: str | None) -> tuple[list[str], Listing | None]:
    """The agents a fleet command works on: `--hosts` if given, else every live agent in the directory;
    and the directory's listing (None without one)."""
    if hosts is None and etcd is None:
        raise ConfigError("name the fleet: --hosts HOST:PORT,... or --etcd URL (or set CONSTMIG_ETCD)")
    listing = None
    if etcd is not None:
        from constmig.host.directory import blocking

        async def read(d: Any) -> Listing:
            entries = await d.entries()
            return Listing(await d.hosts(), {n: str(e.get("at") or "") for n, e in entries.items()}, entries,
                           await d.agents())

        listing = blocking(etcd, read)
    if hosts is not None:
        return hosts_arg(hosts), listing
    assert listing is not None
    if not listing.hosts:
        raise ConfigError(f"the fleet directory at {etcd} lists no live agent (start agents with --etcd {etcd})")
    return sorted(listing.hosts), listing


def source_addr(source: str, listing: Listing | None) -> str:
    """A drain's SOURCE: HOST:PORT, or with a directory also a host id it lists."""
    if listing is not None:
        named = [addr for addr, e in listing.hosts.items() if e.get("host_id") == source]
        if len(named) == 1:
            return named[0]
    parse_addr(source)
    return source


@dataclass
class Stray:
    """An enclave the directory lists at an agent that does not answer: `dead` (the agent's lease is gone:
    killed, stopped, or cut off from the store) or `unknown` (registered, but its status did not come)."""

    name: str
    at: str
    state: str
    checkpoint: str | None = None  # the newest sealed there, as its agent recorded it
    agent: dict[str, Any] = field(default_factory=dict)  # that agent's last registration (host id, folders)


def strays(listing: Listing | None, views: list[HostView]) -> list[Stray]:
    """The directory's enclaves whose agent is gone (dead) or did not answer (unknown), by name."""
    if listing is None:
        return []

    def key(addr: str) -> tuple[str, int] | None:
        try:
            return parse_addr(addr)
        except ConfigError:
            return None

    alive = {key(h) for h in listing.hosts}
    silent = {key(v.addr) for v in views if v.error is not None}
    out = []
    for name, at in sorted(listing.enclaves.items()):
        state = "dead" if key(at) not in alive or key(at) is None else "unknown" if key(at) in silent else ""
        if state:
            ckpt = listing.entries.get(name, {}).get("checkpoint")
            out.append(Stray(name, at, state, str(ckpt) if ckpt else None, listing.agents.get(at, {})))
    return out


def revival(dead: list[Stray], etcd: str) -> list[str]:
    """What brings dead enclaves back, as lines of commands: a checkpoint restores only on the platform
    that holds its lineage, the host it died on, so its agent starts again there on its own state folder
    (which also lists the enclaves that died with it), and then each restores from its newest checkpoint."""
    lines: list[str] = []
    hosts: dict[str, list[Stray]] = {}
    for s in dead:
        hosts.setdefault(s.at, []).append(s)
    for at, group in hosts.items():
        agent = group[0].agent
        host_id = str(agent.get("host_id") or "")
        if agent.get("state_dir") and host_id:
            tls = " (and the CONSTMIG_ETCD_* settings this store needs)" if etcd.startswith("https://") else ""
            lines.append(f"host {host_id} ({at}) is gone; its enclaves' checkpoints restore only there. Start its "
                         f"agent again on that host, with its state folder{tls}:")
            args = ["constmig", "agent", "--listen", at, "--state-dir", str(agent["state_dir"]), "--host-id", host_id,
                    *(["--ca-dir", str(agent["ca_dir"])] if agent.get("ca_dir") else []), "--etcd", etcd]
            lines.append(f"  {shlex.join(args)}")
        else:
            lines.append(f"the agent at {at} is gone (the directory has no record of its state folder); its "
                         "enclaves' checkpoints restore only on that host: start its agent again there with the "
                         "--state-dir it had")
        for s in group:
            if s.checkpoint:
                lines.append(f"  then: {restore_command(s.checkpoint, at, s.name)}")
            else:
                lines.append(f"  {s.name}: no checkpoint of it there is recorded; once that agent runs, `constmig "
                             f"status --agent {at}` names any it finds, else its data is lost")
    if lines:
        lines.append(f"or give a name up (then any agent may take it, as a new instance): constmig forget NAME "
                     f"--etcd {etcd}")
    return lines


@dataclass
class Move:
    name: str
    heap: int
    to: str
    src: str = ""


def plan_drain(source: HostView, others: list[HostView]) -> tuple[list[Move], list[str]]:
    """Where each running enclave of `source` goes; and the enclaves left alone (not running), with why.
    Refuses (ConfigError) when the others cannot hold them all."""
    live = [v for v in others if v.error is None]
    room = {v.addr: v.free - HEADROOM for v in live}
    if not room:
        raise ConfigError("no other reachable host to drain to")
    load = {v.addr: v.calls_per_s for v in live}
    moves: list[Move] = []
    skipped: list[str] = []
    running = sorted(((n, int(e.get("heap_bytes") or 0), float(e.get("calls_per_s") or 0.0))
                      for n, e in source.enclaves.items() if e.get("status") == "running"),
                     key=lambda x: (-x[1], x[0]))
    for name, e in sorted(source.enclaves.items()):
        if e.get("status") != "running":
            skipped.append(f"{name} ({e.get('status')})")
    total_load = sum(load.values()) + sum(c for _, _, c in running)
    for name, heap, calls in running:
        fits = [a for a in room if room[a] >= heap]
        if not fits:
            most = max(room, key=lambda a: room[a])
            need = sum(h for _, h, _ in running)
            raise ConfigError(f"the rest of the fleet cannot hold what must leave {source.addr}: {name} needs "
                              f"{format_size(heap)}, the most room left is {format_size(max(room[most], 0))} on "
                              f"{most} (all of it: {format_size(need)} in {len(running)} enclaves)")
        top = max(max(room.values()), 1)
        best = max(fits, key=lambda a: (room[a] / top - (load[a] / total_load if total_load else 0.0), a))
        room[best] -= heap
        load[best] += calls
        moves.append(Move(name, heap, best, source.addr))
    return moves, skipped


def look_and_plan_drain(source: str, hosts: str | None, etcd: str | None
                        ) -> tuple[list[HostView], list[Move], list[str]]:
    """What `constmig drain SOURCE` sees and would do: SOURCE (HOST:PORT, or a host id the directory
    lists) first, then every other host of the fleet; its moves; the enclaves it leaves alone. ConfigError
    if SOURCE does not answer."""
    addrs, listing = fleet_hosts(hosts, etcd)
    source = source_addr(source, listing)
    key = parse_addr(source)
    views = look([source, *(h for h in addrs if parse_addr(h) != key)])
    if views[0].error:
        raise ConfigError(f"cannot drain {source}: {views[0].error}")
    moves, skipped = plan_drain(views[0], views[1:])
    return views, moves, skipped


def plan_rebalance(views: list[HostView], max_moves: int) -> list[Move]:
    """Moves that even out the running heap bytes across the hosts: each takes, from the fullest host that
    can give one to the emptiest, the enclave whose heap comes closest to half their difference, and only
    if that narrows the gap between them and the emptiest host has room. At most `max_moves`."""
    live = [v for v in views if v.error is None]
    used = {v.addr: 0 for v in live}
    room = {v.addr: v.free - HEADROOM for v in live}
    where: dict[str, tuple[str, int]] = {}
    for v in live:
        for name, e in v.enclaves.items():
            if e.get("status") == "running":
                heap = int(e.get("heap_bytes") or 0)
                used[v.addr] += heap
                where[name] = (v.addr, heap)
    moves: list[Move] = []
    while len(moves) < max_moves and len(used) > 1:
        low = min(used, key=lambda a: (used[a], a))
        best = None
        for high in sorted(used, key=lambda a: (-used[a], a)):  # the fullest host that has a move that helps
            gap = used[high] - used[low]
            fits = [(abs(heap - gap / 2), name, heap) for name, (at, heap) in where.items()
                    if at == high and 0 < heap < gap and heap <= room[low]]
            if fits:
                best = (high, *min(fits)[1:])
                break
        if best is None:
            break
        high, name, heap = best
        moves.append(Move(name, heap, low, high))
        used[high] -= heap
        used[low] += heap
        room[low] -= heap
        where[name] = (low, heap)
    return moves


def _cancel_move(fut: Future, mv: Move) -> None:
    """Cancel a running move at its source agent. A move that has just started may not be known there
    yet ("no migration ... in progress"): ask again until it is, or its thread ends."""
    deadline = time.monotonic() + CANCEL_RETRY_S
    while not fut.done() and time.monotonic() < deadline:
        try:
            request(mv.src, control.Cancel(name=mv.name, reason="interrupted"), timeout=STATUS_TIMEOUT_S)
            return
        except PastCommitPoint:  # past it: the move goes on, and finishes
            return
        except ConstmigError:
            pass  # not known there yet (or not reachable this once): ask again
        time.sleep(0.1)


@dataclass
class Outcome:
    name: str
    to: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def run_moves(moves: list[Move], *, parallel: int, max_bandwidth: float, strategy: str, tracker: str,
              timeout: float, on_event: Callable[[str, str, dict[str, Any]], None] | None = None) -> list[Outcome]:
    """Run the moves (a drain's or a rebalance's), at most `parallel` at once, sharing `max_bandwidth`
    (bytes/s, 0 = no cap) among them. One failure does not stop the others; each outcome says what
    happened."""
    share = max_bandwidth / parallel if max_bandwidth else 0.0
    stopping = threading.Event()

    def one(mv: Move) -> Outcome:
        if stopping.is_set():  # a worker that took it up as the interrupt came
            return Outcome(mv.name, mv.to, False, error="not started: interrupted")
        def progress(info: dict[str, Any]) -> None:
            if on_event is not None:
                on_event(mv.name, "progress", info)

        if on_event is not None:
            on_event(mv.name, "start", {"to": mv.to, "heap": mv.heap})
        try:
            fig = migrate(mv.name, mv.src, mv.to, strategy, timeout, on_progress=progress, tracker=tracker,
                          max_bandwidth=share)
            out = Outcome(mv.name, mv.to, True, fig)
        except ConstmigError as e:
            out = Outcome(mv.name, mv.to, False, error=str(e))
        if on_event is not None:
            on_event(mv.name, "end", {"ok": out.ok, "error": out.error})
        return out

    results: list[Outcome] = []
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="drain")
    futures = {pool.submit(one, mv): mv for mv in moves}
    try:
        for fut in as_completed(futures):
            results.append(fut.result())
    except KeyboardInterrupt:
        # Stop what has not started (all of it first, so no worker starts another meanwhile); cancel what
        # has not reached its commit point (the rest finishes): every enclave ends up in exactly one
        # place, and the same drain run again moves what is left.
        stopping.set()
        for fut in futures:
            fut.cancel()
        for fut, mv in futures.items():
            _cancel_move(fut, mv)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(results, key=lambda o: o.name)
