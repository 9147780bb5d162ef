"""`constmig bench soak`: many migrations back and forth under load, checked for drift and leaks.

One enclave moves between two agents again and again, cycling through stop-and-copy and both
post-copy trackers, while a client hammers it. A soak is about what a single migration cannot show:
state that slowly goes wrong, and resources that are not given back. So after every migration:

* the state must be exactly what it was at the stop. A client writes between migrations (so every
  migration moves a different state and an equal checksum means something) and only reads while the
  enclave moves; the checksum is taken at the source once the last write is answered and at the
  destination once the migration returns. Every acknowledged write is read back, and every read the
  client made is checked against what it last wrote;
* the agents must have given back what the enclave used: its processes (enclave runtime, pager) are
  gone from the host it left, the agents' open file descriptors and memory mappings come back to
  their level (within a small slack, after a warm-up), and the host it left holds no socket, pager
  status file, resume socket or checkpoint of it.

Counters come from /proc (descendants of each agent pid, /proc/PID/fd, /proc/PID/maps, VmRSS) and
the agents' state folders, so the soak needs agents on this machine: it starts a LocalCluster.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from constmig.bench.harness import Move, calling, move, usable_variants
from constmig.bench.load import wide_console
from constmig.bench.loadgen import KVHammer, read_back
from constmig.bench.results import machine_info, split_variant
from constmig.bench.stats import fit_line, show, spread
from constmig.client import EnclaveClient, Trust
from constmig.errors import ConfigError, ConstmigError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import app_checksum, launch_filled
from constmig.progress import console
from constmig.units import format_size, resident_bytes
from constmig.wire import control

NAME = "soak"
SLACK_FDS = 3  # a client connection or two being opened or closed as the counters are read
SLACK_MAPS = 24  # interpreter arenas and thread stacks come and go a little
SETTLE_S = 15.0  # how long a departed enclave's processes may take to go
FILES_GRACE_S = 1.0  # and its files, once its processes are gone
WRITE_S = 0.4  # writes between two migrations (so each one moves a new state)
ENCLAVE_FILES = (".sock", ".resume.sock", ".pager.json")


# ---- /proc readings ----

def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process, read once per snapshot."""
    out: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(d)] = (int(fields[1]), fields[0])
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]]) -> tuple[list[int], list[int]]:
    """Live descendants of `pid` (enclave runtimes, their pagers) and zombie ones, separately."""
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    live, zombies, stack = [], [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            (zombies if table[c][1] == "Z" else live).append(c)
            stack.append(c)
    return sorted(live), sorted(zombies)


def strays(marker: str, agents: list[int], table: dict[int, tuple[int, str]]) -> list[int]:
    """Processes that mention `marker` (the cluster folder) but hang under no agent: orphans."""
    owned = set(agents)
    for pid in agents:
        live, zombies = descendants(pid, table)
        owned.update(live, zombies)
    out = []
    for pid in table:
        if pid in owned or pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(pid)
        except OSError:
            continue
    return sorted(out)


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


@dataclass
class AgentProbe:
    """One agent to watch: its pid (for /proc) and its state folder."""

    host: str
    pid: int
    state_dir: Path

    def counters(self, table: dict[int, tuple[int, str]]) -> dict[str, Any]:
        live, zombies = descendants(self.pid, table)
        run_dir = self.state_dir / "run"
        ckpt = self.state_dir / "checkpoints"
        direct = [p for p in live if table[p][0] == self.pid]
        return {"procs": len(live), "children": len(direct), "zombies": len(zombies), "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
                "maps": _count_lines(f"/proc/{self.pid}/maps"), "rss_kb": resident_bytes(self.pid) // 1024,
                "run_files": sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else [],
                "checkpoints": sum(1 for p in ckpt.rglob("*") if p.is_file()) if ckpt.exists() else 0}


def snapshot(probes: list[AgentProbe], marker: str) -> dict[str, Any]:
    table = process_table()
    out: dict[str, Any] = {p.host: p.counters(table) for p in probes}
    out["strays"] = len(strays(marker, [p.pid for p in probes], table))
    return out


def enclave_files(files: list[str], name: str = NAME) -> list[str]:
    return [f for f in files if any(f == name + suffix for suffix in ENCLAVE_FILES)]


def departed_ok(c: dict[str, Any], name: str = NAME) -> bool:
    """The host an enclave left: none of its processes, files or checkpoints remain."""
    return c["procs"] == 0 and c["zombies"] == 0 and not enclave_files(c["run_files"], name) and c["checkpoints"] == 0


def hosting_ok(c: dict[str, Any]) -> bool:
    """The host an enclave runs on: the enclave process, and at most its pager (after a Fault Tracker
    migration the pager stays with the enclave, to answer a reconnect that fetches a lost DONE)."""
    return c["children"] == 1 and c["procs"] <= 2


# ---- the load ----

class SoakHammer(KVHammer):
    """A KVHammer that can be told to stop writing: `read_only` returns once no write is in flight."""

    def __init__(self, *args: Any, write_ratio: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, write_ratio=write_ratio, **kwargs)
        self._gate = threading.Lock()
        self._writes = write_ratio

    def _one(self, seq: int) -> int:
        with self._gate:
            return super()._one(seq)

    def read_only(self) -> None:
        self.write_ratio = 0.0
        with self._gate:  # the call in flight (maybe a put) has been answered
            pass

    def read_write(self) -> None:
        self.write_ratio = self._writes

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


# ---- checks ----

class Problems:
    """Problems found, merged by kind and place: a leak repeated 40 times is one line with a count."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, dict[str, Any]] = {}  # worth knowing, but bounded: not a leak

    def note(self, kind: str, detail: str, migration: int | None) -> None:
        self._count(self.notes, kind, detail, migration)

    def add(self, kind: str, detail: str, migration: int | None) -> None:
        self._count(self.items, kind, detail, migration)

    @staticmethod
    def _count(into: dict[str, dict[str, Any]], kind: str, detail: str, migration: int | None) -> None:
        entry = into.setdefault(f"{kind}: {detail}", {"kind": kind, "detail": detail, "first_migration": migration,
                                                       "count": 0})
        entry["count"] += 1

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.items.values())


def check_hosts(snap: dict[str, Any], src: str, dst: str, i: int, variant: str, problems: Problems,
                baseline: dict[tuple[str, str], dict[str, int]], warm: dict[str, int], warming: bool) -> None:
    """After migration i from src to dst: processes, files, fds and maps of both agents."""
    s, d = snap[src], snap[dst]
    if s["procs"] or s["zombies"]:
        problems.add("process", f"host {src}: {s['procs']} live and {s['zombies']} zombie processes left "
                     "after the enclave migrated out", i)
    for f in enclave_files(s["run_files"]):
        problems.add("disk", f"host {src}: run/{f} left after the enclave migrated out", i)
    if s["checkpoints"]:
        problems.add("disk", f"host {src}: {s['checkpoints']} checkpoint files", i)
    if not hosting_ok(d):
        problems.add("process", f"host {dst}: {d['procs']} live processes under the agent hosting the enclave "
                     "(expected the enclave and at most its pager)", i)
    if d["zombies"] > 1:
        problems.add("process", f"host {dst}: {d['zombies']} zombie processes under the agent hosting the "
                     "enclave", i)
    elif d["zombies"]:  # the Fault Tracker's finished pager, unreaped until the enclave exits
        problems.note("process", f"a zombie child (finished pager) under the enclave while it runs "
                      f"({split_variant(variant)[1]} tracker)", i)
    if snap["strays"]:
        problems.add("process", f"{snap['strays']} processes of this soak outside any agent (orphans)", i)
    for host, role in ((src, "left"), (dst, "hosting")):
        c = snap[host]
        base = baseline.setdefault((host, role), {"fds": c["fds"]})
        if c["fds"] > base["fds"] + SLACK_FDS:
            problems.add("fds", f"host {host} ({role}): {c['fds']} open fds, baseline {base['fds']} "
                         f"(+{SLACK_FDS} slack)", i)
        if warming:
            warm[host] = max(warm.get(host, 0), c["maps"])
        elif c["maps"] > warm.setdefault(host, c["maps"]) + SLACK_MAPS:
            problems.add("maps", f"host {host}: {c['maps']} mappings, {warm[host]} after warm-up "
                         f"(+{SLACK_MAPS} slack)", i)


def _settle(probes: list[AgentProbe], marker: str, done: Callable[[dict[str, Any]], bool],
            procs_gone: Callable[[dict[str, Any]], bool], timeout: float) -> tuple[dict[str, Any], float]:
    """Snapshot once `done` holds (or the timeout passes: then something leaked). Processes get `timeout`;
    files only FILES_GRACE_S more once `procs_gone` holds, since nobody removes a file after that (the agent
    unlinks the enclave's socket right after the process exits)."""
    t0 = time.monotonic()
    t_procs: float | None = None
    while True:
        snap = snapshot(probes, marker)
        now = time.monotonic()
        if done(snap):
            return snap, now - t0
        if t_procs is None and procs_gone(snap):
            t_procs = now
        if now - t0 > timeout or (t_procs is not None and now - t_procs > FILES_GRACE_S):
            return snap, now - t0
        time.sleep(0.05)


def _gone(c: dict[str, Any]) -> bool:
    return c["procs"] == 0 and c["zombies"] == 0


def settle(probes: list[AgentProbe], marker: str, src: str, dst: str, timeout: float = SETTLE_S
           ) -> tuple[dict[str, Any], float]:
    """Snapshot once the enclave's old host has let go of it."""
    return _settle(probes, marker, lambda s: departed_ok(s[src]) and hosting_ok(s[dst]),
                   lambda s: _gone(s[src]) and hosting_ok(s[dst]), timeout)


def settle_idle(probes: list[AgentProbe], marker: str, timeout: float = SETTLE_S) -> tuple[dict[str, Any], float]:
    """Snapshot once no agent has a child process left and run/ is empty."""
    return _settle(probes, marker, lambda s: all(_gone(s[p.host]) and not s[p.host]["run_files"] for p in probes),
                   lambda s: all(_gone(s[p.host]) for p in probes), timeout)


# ---- the soak ----

def run_soak(out: Path, migrations: int = 50, heap: int = 1 << 30, fill: float = 0.9,
             variants: list[str] | None = None, write_s: float = WRITE_S, seed: int = 0) -> dict[str, Any]:
    """Migrate back and forth `migrations` times under load; write soak.json and soak.png in `out`."""
    if migrations < 1:
        raise ConfigError("--migrations must be at least 1")
    cycle, skipped = usable_variants(variants, what="soak")
    out.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    records: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()),
        "config": {"migrations": migrations, "heap_bytes": heap, "fill": fill, "variants": cycle, "app": "kvstore",
                   "write_s": write_s, "slack": {"fds": SLACK_FDS, "maps": SLACK_MAPS}},
        "skipped": skipped, "migrations": records}
    warmup = max(1, min(2 * len(cycle), migrations // 2))  # every (host, variant, direction) seen once
    doc["config"]["warmup_migrations"] = warmup

    def save() -> None:
        doc["problems"] = problems.as_list()
        doc["notes"] = list(problems.notes.values())
        (out / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")

    t_start = time.monotonic()
    with LocalCluster(2) as cluster:
        probes = [AgentProbe(chr(ord("a") + k), p.pid, cluster.base / f"host-{chr(ord('a') + k)}")
                  for k, p in enumerate(cluster.procs)]
        addr = {p.host: cluster.addrs[k] for k, p in enumerate(probes)}
        marker = str(cluster.base)
        doc["idle_before"] = idle = snapshot(probes, marker)
        trust = Trust.in_memory()  # this run's own enclave: pinned at launch, never in the user's file
        launch_filled(addr["a"], NAME, "kvstore", heap, fill, seed, trust=trust)
        baseline: dict[tuple[str, str], dict[str, int]] = {}
        warm: dict[str, int] = {}
        with SoakHammer(addr["a"], NAME, keys=2000, write_ratio=0.5, seed=seed, trust=trust) as hammer:
            hammer.preload()
            with calling(hammer):
                here, prev_sum = "a", None
                for i, variant in zip(range(1, migrations + 1), itertools.cycle(cycle), strict=False):
                    there = "b" if here == "a" else "a"
                    rec = one_soak_migration(i, variant, here, there, addr, hammer, write_s, prev_sum, problems)
                    rec["wall_s"] = round(time.monotonic() - t_start, 2)
                    if rec.get("error"):
                        here = _where_now(addr) or here
                        records.append(rec)
                        save()
                        if _where_now(addr) is None:
                            problems.add("migration", "the enclave runs nowhere after a failed migration", i)
                            break
                        continue
                    snap, rec["settle_s"] = settle(probes, marker, here, there)
                    rec["settle_s"] = round(rec["settle_s"], 3)
                    rec["counters"] = snap
                    check_hosts(snap, here, there, i, variant, problems, baseline, warm, warming=i <= warmup)
                    records.append(rec)
                    save()
                    console.print(_line(rec))
                    here, prev_sum = there, rec["checksum_after"]
        if not hammer.report.calls:
            problems.add("load", "the client made no successful call", None)
        if hammer.report.errors:
            problems.add("load", f"{len(hammer.report.errors)} client calls failed; first: "
                         f"{hammer.report.errors[0]}", None)
        with_enclave = _where_now(addr)
        if with_enclave is not None:
            request(addr[with_enclave], control.Stop(name=NAME))
        final, _ = settle_idle(probes, marker)
        doc["idle_after"] = final
        check_idle(idle, final, warm, problems)
    doc["duration_s"] = round(time.monotonic() - t_start, 1)
    r = hammer.report  # (its gap figure is per migration, in each record)
    doc["client"] = {"client_calls": r.calls, "client_errors": len(r.errors), "client_wrong": r.wrong}
    doc["summary"] = soak_summary(records)
    doc["trend"] = counter_trend(records, warmup)
    doc["ok"] = not problems.items
    doc["loadavg_end"] = list(os.getloadavg())
    save()
    from constmig.bench.plots import plot_soak

    plot_soak(doc, out / "soak.png", enclave_files)
    wide_console().print(soak_table(doc))
    print_problems(doc)
    console.print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    return doc


def one_soak_migration(i: int, variant: str, src: str, dst: str, addr: dict[str, str], hammer: SoakHammer,
                       write_s: float, prev_sum: str | None, problems: Problems) -> dict[str, Any]:
    """Writes, a quiet checksum, the migration under read-only load, checks at the destination."""
    rec: dict[str, Any] = {"i": i, "variant": variant, "from": src, "to": dst}
    hammer.read_write()
    time.sleep(write_s)
    hammer.read_only()
    trust = hammer.client.trust  # every check reads the instance the run pinned at launch
    before = app_checksum(addr[src], NAME, trust)
    rec["state_changed"] = prev_sum is None or before != prev_sum
    if not rec["state_changed"]:
        problems.add("check", "no write changed the state between two migrations (a weak checksum check)", i)
    acked = dict(hammer.acked)
    time.sleep(0.1)  # the read held behind the checksum ECALL is answered before the gap clock restarts
    calls0, errors0, wrong0 = hammer.report.calls, len(hammer.report.errors), hammer.report.wrong
    hammer.report.max_gap_ms = 0.0
    moved = move(Move.of(variant, NAME, addr[src], addr[dst]))
    if moved.error is not None:
        rec["error"] = str(moved.error)
        problems.add("migration", f"{variant} {src}->{dst} failed: {moved.error}", i)
        return rec
    figures = moved.figures
    time.sleep(0.05)  # a few reads at the destination: the gap the migration caused is closed and counted
    gap, calls = hammer.report.max_gap_ms, hammer.report.calls - calls0
    after = app_checksum(addr[dst], NAME, trust)
    with EnclaveClient(addr[dst], NAME, timeout=60.0, trust=trust) as c:  # its own connection
        bad = read_back(c, acked)
    rec.update({"tracker": figures.get("tracker"), "downtime_ms": round(figures["downtime_ms"], 3),
                "total_s": round(figures["total_s"], 3), "migrate_s": round(figures.get("migrate_s") or 0, 3),
                "checksum_before": before, "checksum_after": after, "checksum_equal": before == after,
                "acked_keys": len(acked), "read_back_bad": bad, "client_calls": calls,
                "client_errors": len(hammer.report.errors) - errors0, "client_wrong": hammer.report.wrong - wrong0,
                "client_gap_ms": round(gap, 2), "resumes": figures.get("resumes", 0)})
    if before != after:
        problems.add("state", f"checksum changed across {variant} {src}->{dst}", i)
    if bad:
        problems.add("state", f"{bad} acknowledged writes read back wrong after {variant} {src}->{dst}", i)
    if rec["client_wrong"]:
        problems.add("state", f"{rec['client_wrong']} client reads answered wrongly during {variant}", i)
    if rec["client_errors"]:
        problems.add("load", f"{rec['client_errors']} client calls failed during {variant}", i)
    if not hammer.alive:
        problems.add("load", "the client stopped (too many errors)", i)
    return rec


def _where_now(addr: dict[str, str]) -> str | None:
    """The host whose agent runs the enclave, if any."""
    for host, a in addr.items():
        try:
            st = request(a, control.Status(), timeout=30)
        except ConstmigError:
            continue
        if st["enclaves"].get(NAME, {}).get("status") == "running":
            return host
    return None


def check_idle(before: dict[str, Any], after: dict[str, Any], warm: dict[str, int], problems: Problems) -> None:
    """With the enclave stopped, each agent must be back where it started (maps: where warm-up left it)."""
    for host in ("a", "b"):
        b, a = before[host], after[host]
        if a["procs"] or a["zombies"]:
            problems.add("process", f"host {host}: {a['procs']} live and {a['zombies']} zombie processes at the "
                         "end", None)
        if a["run_files"]:
            problems.add("disk", f"host {host}: run/ still holds {', '.join(a['run_files'])} at the end", None)
        if a["checkpoints"]:
            problems.add("disk", f"host {host}: {a['checkpoints']} checkpoint files at the end", None)
        if a["fds"] > b["fds"] + SLACK_FDS:
            problems.add("fds", f"host {host}: {a['fds']} open fds at the end, {b['fds']} before "
                         f"(+{SLACK_FDS} slack)", None)
        limit = max(warm.get(host, b["maps"]), b["maps"]) + SLACK_MAPS
        if a["maps"] > limit:
            problems.add("maps", f"host {host}: {a['maps']} mappings at the end, limit {limit}", None)
    if after["strays"]:
        problems.add("process", f"{after['strays']} processes of this soak outside any agent at the end", None)


def soak_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: how many, how many checked equal, downtime and total time (median, min, max)."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == variant and not r.get("error")]
        row: dict[str, Any] = {"variant": variant, "n": len(rs),
                               "errors": sum(1 for r in records if r["variant"] == variant and r.get("error")),
                               "checksums_equal": sum(1 for r in rs if r.get("checksum_equal"))}
        for key in ("downtime_ms", "total_s", "client_gap_ms", "settle_s"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = spread(vals, digits=3)
        rows.append(row)
    return rows


def counter_trend(records: list[dict[str, Any]], warmup: int) -> dict[str, dict[str, Any]]:
    """Per agent after warm-up: fds and maps first/last/max, and RSS growth per migration (least squares).

    Memory is not a pass/fail check (the interpreter's allocator is noisy), but a steady slope is worth
    seeing next to the counters that are."""
    recs = [r for r in records if "counters" in r and r["i"] > warmup]
    out: dict[str, dict[str, Any]] = {}
    for host in ("a", "b"):
        if len(recs) < 2:
            break
        ys = [float(r["counters"][host]["rss_kb"]) for r in recs]
        row: dict[str, Any] = {"rss_kib_per_migration": round(fit_line([r["i"] for r in recs], ys)["slope"], 2),
                               "rss_kb_first": int(ys[0]), "rss_kb_last": int(ys[-1])}
        for key in ("fds", "maps"):
            vals = [r["counters"][host][key] for r in recs]
            row[key] = {"first": vals[0], "last": vals[-1], "max": max(vals)}
        out[host] = row
    return out


def _line(rec: dict[str, Any]) -> str:
    c = rec["counters"]
    return (f"[{rec['i']}] {rec['variant']} {rec['from']}->{rec['to']}: down {rec['downtime_ms']:.1f} ms, "
            f"total {rec['total_s']:.2f} s, checksum {'equal' if rec['checksum_equal'] else 'DIFFERENT'}, "
            f"fds a/b {c['a']['fds']}/{c['b']['fds']}, maps a/b {c['a']['maps']}/{c['b']['maps']}, "
            f"procs a/b {c['a']['procs']}/{c['b']['procs']}")


def soak_table(doc: dict[str, Any]) -> Table:
    c = doc["config"]
    table = Table(title=escape(f"soak: {len(doc['migrations'])} migrations of {format_size(c['heap_bytes'])} "
                               f"in {doc['duration_s']:.0f} s"))
    for col in ("variant", "n", "checksums equal", "downtime ms med [max]", "total s med [max]",
                "client gap ms med [max]"):
        table.add_column(col)

    for row in doc["summary"]:
        table.add_row(row["variant"], str(row["n"]), f"{row['checksums_equal']}/{row['n']}",
                      *(show(row.get(key), spec, low=False) for key, spec in
                        (("downtime_ms", "{:.1f}"), ("total_s", "{:.2f}"), ("client_gap_ms", "{:.0f}"))))
    return table


def print_problems(doc: dict[str, Any]) -> None:
    for p in doc["problems"]:
        where = "at the end" if p["first_migration"] is None else f"first after migration {p['first_migration']}"
        console.print(f"[red]problem[/red] x{p['count']} ({where}): {escape(p['kind'])}: {escape(p['detail'])}")
    for p in doc["notes"]:
        console.print(f"note x{p['count']}: {escape(p['kind'])}: {escape(p['detail'])}")
