"""`constmig bench suite`: every workload, strategy and tracker, migrated under load, in one run.

Why one run: the machines are shared and noisy, so the variants are compared back to back on the same
two agents, interleaved within each repeat, and every figure is a median with its min and max. Each
migration has the workload's own client driver (loadgen.driver_for) calling from before the stop until
after the last chunk arrived, and is checked end to end:

* kvstore: a read-only hammer over keys it wrote first, so the state checksum must come out equal and
  every answer must be the value written (what `bench sizes` checks);
* the step-driven workloads change their state with every step, so a twin of the app in this process
  (same heap geometry, same fill seed; its checksum must equal the enclave's before the migration)
  replays the acknowledged steps afterwards: every step must answer the same on the twin, and the
  migrated app's checksum must equal the twin's.

Size sweep and workload matrix: all workloads at every size does not fit in half an hour on a 2-vCPU
machine, so the `--sweep` workloads (kvstore by default) run at every `--sizes` size (that is what
the slope of downtime against heap size comes from), and every workload runs at `--workload-size`
(the per-workload comparison). `--sweep all` runs the full grid.

Output: results.json (one object per migration, with the driver's ops/s timeline and the phase
timestamps), plots next to it, and report.md (see report.py), all generated from this run.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from constmig.apps import APPS, load_app
from constmig.bench.harness import Move, Moved, launched, run_migration, two_agents
from constmig.bench.loadgen import LONG_GAP_MS, KVHammer, LoadReport, StepDriver, driver_for
from constmig.bench.results import (
    OPTION_VARIANTS,
    SUMMARY_KEYS,
    base_variant,
    dumps,
    machine_info,
    split_variant,
    summarize,
    variant_options,
)
from constmig.bench.stalls import StallWatch, frozen_overlap
from constmig.bench.stats import window_rate
from constmig.errors import ConfigError, ConstmigError
from constmig.host.orchestrate import app_checksum
from constmig.migration import strategies
from constmig.progress import console
from constmig.units import available_memory, check_writable, format_size, parse_size

VARIANTS = tuple(strategies.variants(auto=False))  # the default: stopcopy, constmig-*, precopy, hybrid-*, auto-*
# also runnable, not by default (each adds a migration per cell and repeat: 27 more in a full suite): any of
# those with pre-copy rounds plus a "+name" of results.VARIANT_OPTIONS, e.g. OPTION_VARIANTS' precopy+throttle
MIN_HEAP = 16 << 20
CHUNK = 1 << 20  # launch_filled's chunk size; the twin uses the same geometry
SUITE_KEYS = (*SUMMARY_KEYS, "faults", "ops_s_before", "ops_s_during", "ops_s_migration", "ops_s_rounds",
              "fault_latency_us_max", "client_gap_unfrozen_ms")

FULL = {"sizes": "256M,1G,4G", "workloads": ",".join(APPS), "sweep": "kvstore", "workload_size": "1G",
        "variants": ",".join(VARIANTS), "repeat": "3"}
QUICK = {"sizes": "32M,64M", "workloads": "kvstore,btree,xsbench", "sweep": "kvstore", "workload_size": "64M",
         "variants": ",".join(VARIANTS), "repeat": "1"}


@dataclass
class SuiteConfig:
    sizes: list[int]  # sweep sizes, ascending
    workloads: list[str]
    sweep: list[str]  # workloads run at every size
    workload_size: int  # every workload runs at this size
    variants: list[str]
    repeat: int
    out: Path
    quick: bool = False
    fill: float = 0.9
    settle_s: float = 0.5  # the driver runs this long before the migrate request and after it returns
    overhead: bool = True
    overhead_heap: int = 256 << 20
    overhead_rounds: int = 15
    overhead_round_s: float = 0.15
    timeout: float = 120.0
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it was left out

    def cells(self) -> list[tuple[str, int]]:
        """(workload, heap) pairs to migrate: the sweep at every size, then the rest at workload_size."""
        out = [(w, s) for w in self.sweep for s in self.sizes]
        out += [(w, self.workload_size) for w in self.workloads if (w, self.workload_size) not in out]
        return out

    def command(self) -> str:
        """The equivalent command with every setting spelled out (what reproduces this run)."""
        args = ["constmig", "bench", "suite", "--sizes", ",".join(_size_arg(s) for s in self.sizes),
                "--workloads", ",".join(self.workloads), "--sweep", ",".join(self.sweep) or "none",
                "--workload-size", _size_arg(self.workload_size), "--variants", ",".join(self.variants),
                "--repeat", str(self.repeat)]
        if self.quick:
            args.append("--quick")
        if not self.overhead:
            args.append("--no-overhead")
        return shlex.join([*args, "--out", str(self.out)])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def _size_arg(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _names(text: str, what: str, known: tuple[str, ...] | list[str]) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"--{what} needs at least one name")
    for s in items:
        base = base_variant(s) if what == "variants" else s
        if base not in known:
            raise ConfigError(f"unknown {what[:-1]} {base!r}; known: {', '.join(known)}")
        if base != s:
            variant_options(s)  # a known option set, on a strategy with rounds
    return list(dict.fromkeys(items))


def make_config(out: str | None, *, sizes: str | None = None, workloads: str | None = None,
                sweep: str | None = None, workload_size: str | None = None, variants: str | None = None,
                repeat: str | int | None = None, quick: bool = False, overhead: bool = True) -> SuiteConfig:
    """Check the user's settings (unset ones take the full or --quick defaults); ConfigError on bad input."""
    d = QUICK if quick else FULL
    if not out:
        raise ConfigError("missing --out DIR (the folder for results.json, report.md and the plots)")
    size_list = sorted({parse_size(s.strip()) for s in (sizes or d["sizes"]).split(",") if s.strip()})
    if not size_list:
        raise ConfigError("--sizes needs at least one size")
    ws = parse_size(workload_size or d["workload_size"])
    for s in (*size_list, ws):
        if s < MIN_HEAP or s % CHUNK:
            raise ConfigError(f"heap size {s} bytes is not a whole number of MiB of at least "
                              f"{format_size(MIN_HEAP)}")
    wl = ["kvstore", *[w for w in APPS if w != "kvstore"]] if (workloads or "") == "all" else \
        _names(workloads or d["workloads"], "workloads", tuple(APPS))
    sweep_text = sweep if sweep is not None else d["sweep"]
    if sweep_text == "all":
        sw = list(wl)
    elif sweep_text == "none":
        sw = []
    else:
        sw = _names(sweep_text, "workloads", tuple(APPS))
        missing = [w for w in sw if w not in wl]
        if missing and sweep is not None:
            raise ConfigError(f"--sweep {','.join(missing)} is not among --workloads {','.join(wl)}")
        sw = [w for w in sw if w in wl] or wl[:1]  # the default sweep follows --workloads
    var = _names(variants or d["variants"], "variants", (*VARIANTS, *OPTION_VARIANTS))
    try:
        rep = int(repeat if repeat is not None else d["repeat"])
    except ValueError:
        raise ConfigError(f"--repeat must be a whole number, not {repeat!r}") from None
    if not 1 <= rep <= 20:
        raise ConfigError(f"--repeat must be from 1 to 20, not {rep}")
    cfg = SuiteConfig(sizes=size_list, workloads=wl, sweep=sw, workload_size=ws, variants=var, repeat=rep,
                      out=Path(out), quick=quick, overhead=overhead)
    if quick:
        cfg.settle_s, cfg.overhead_heap, cfg.overhead_rounds, cfg.overhead_round_s = 0.3, 32 << 20, 5, 0.05
    biggest = max(s for _, s in cfg.cells())
    need = 3 * biggest  # source, destination, and (step workloads) the twin that checks the result
    avail = available_memory()
    if need > avail:
        raise ConfigError(f"a {format_size(biggest)} heap needs about {format_size(need)} of memory here "
                          f"(source, destination and a checking twin); {format_size(avail)} is available")
    check_writable(cfg.out, "--out", folder=True)
    return cfg


# -- one migration ------------------------------------------------------------------------------------


def derive_phases(figures: dict[str, Any], events: list[list[Any]], returned: float) -> dict[str, Any]:
    """Phase timestamps, seconds since the migrate request, from the figures and the progress events.

    The anchor is the `handed_off` progress event: the source emits it on the destination's READY, one
    message before the destination resumes the app, so its arrival here marks the resume (within a
    millisecond or two on loopback). The stop is the resume minus the downtime (timed inside the two
    enclaves); attestation starts `attest_ms` before the stop; DONE is `migrate_s` after that.
    Without the event (it is always sent), the agent's total is used instead (it also counts the
    source's heap wipe after DONE, so it is a little late).
    """
    down = figures["downtime_ms"] / 1e3
    attest = figures.get("attest_ms", 0.0) / 1e3
    migrate_s = figures.get("migrate_s", figures["total_s"])
    handed = next((e[0] for e in events if e[1] == "handed_off"), None)
    if handed is not None:
        resumed = float(handed)
        anchor = "handed_off event"
    else:
        resumed = figures["total_s"] - migrate_s + attest + down
        anchor = "agent total"
    stop = resumed - down
    phases = {"request": 0.0, "prepared": figures.get("prepare_s", 0.0), "attest": stop - attest, "stop": stop,
              "resumed": resumed, "done": stop - attest + migrate_s, "returned": returned}
    if figures.get("stream_s") is not None:
        phases["stream_end"] = resumed + figures["stream_s"]
    if figures.get("precopy_s") is not None:  # pre-copy rounds end at the stop
        phases["rounds"] = stop - figures["precopy_s"]
    return {**{k: round(v, 4) for k, v in phases.items()}, "anchor": anchor}


def gap_phase(phases: dict[str, Any], start: float, length: float) -> str:
    """Which phase the longest client gap overlapped most: where a reader should look for its cause."""
    marks = [("before the migration", float("-inf"), 0.0), ("preparing the destination", 0.0, phases["prepared"]),
             ("attestation", phases["prepared"], phases.get("rounds", phases["stop"])),
             ("pre-copy rounds", phases.get("rounds", phases["stop"]), phases["stop"]),
             ("downtime", phases["stop"], phases["resumed"]), ("heap streaming", phases["resumed"], phases["done"]),
             ("after DONE", phases["done"], float("inf"))]
    end = start + length
    overlap = [(min(end, b) - max(start, a), name) for name, a, b in marks]
    return max(overlap)[1]


def _twin_check(workload: str, heap: int, fill: float, seed: int, before: str, after: str,
                log: list[tuple[int, Any]]) -> tuple[bool, str]:
    """Replay the acknowledged steps on an in-process twin; (ok, why not)."""
    from constmig.enclave.heap import Heap

    twin = load_app(workload)(Heap(heap, chunk_size=CHUNK))
    try:
        twin.setup()
        twin.fill(fill, seed)
        if twin.checksum() != before:
            return False, "the twin does not start from the enclave's state (cannot check)"
        for step_seed, result in log:
            if twin.step(seed=step_seed) != result:  # type: ignore[attr-defined]
                return False, f"step with seed {step_seed} answered differently at the destination"
        if twin.checksum() != after:
            return False, "the migrated state differs from the twin's"
        return True, f"{len(log)} steps replayed on a twin"
    finally:
        twin.heap.close()


def one_run(addrs: list[str], workload: str, heap: int, variant: str, seed: int, cfg: SuiteConfig,
            name: str, on_progress: Any = None, watch: StallWatch | None = None) -> dict[str, Any]:
    """Launch and fill, start the driver, migrate a->b, stop the driver, check; one record."""
    a, b = addrs[0], addrs[1]
    rec: dict[str, Any] = {"variant": variant, "strategy": split_variant(variant)[0], "workload": workload,
                           "heap_bytes": heap, "seed": seed, "load_avg": round(os.getloadavg()[0], 2)}
    if options := variant_options(variant):  # what a "+name" suffix asked of the request (strategy stays the base one)
        rec["variant_options"] = options
    t_cycle = time.perf_counter()
    kw: dict[str, Any] = {"keys": 2000, "write_ratio": 0.0, "seed": seed} if workload == "kvstore" else \
        {"seed": seed + 1, "record": True}
    try:
        with launched(addrs, name, workload, heap, cfg.fill, seed, chunk_size=CHUNK) as trust, \
                driver_for(workload, a, name, trust=trust, **kw) as driver:
            if isinstance(driver, KVHammer):
                driver.preload()
            before = app_checksum(a, name, trust)
            moved = run_migration(Move.of(variant, name, a, b, timeout=cfg.timeout), driver, before_s=cfg.settle_s,
                                  after_s=cfg.settle_s, on_progress=on_progress).raise_error()
            rec.update(moved.figures)
            rec["variant"], rec["strategy"], rec["seed"] = variant, split_variant(variant)[0], seed
            rec.update(check(moved, before, app_checksum(b, name, trust), driver, workload, heap, seed, cfg))
            if watch is not None:
                rec.update(stalled(watch, moved, cfg.settle_s))
    except ConstmigError as e:
        rec["error"] = str(e)
        rec["verified"] = False
    rec["cycle_s"] = round(time.perf_counter() - t_cycle, 2)
    return rec


def stalled(watch: StallWatch, moved: Moved, settle_s: float) -> dict[str, Any]:
    """The machine's stops during the run (bench/stalls.py), and the longest client gap with the time the
    hypervisor stopped the machine taken out of each gap (the gap itself stays `client_gap_ms`)."""
    t_req, report = moved.requested, moved.report
    stalls = watch.within(t_req - settle_s, moved.returned + settle_s)
    out: dict[str, Any] = {"machine_stalls": [[round(s.at - t_req, 4), round(s.seconds * 1e3, 1),
                                               round(s.steal_s * 1e3, 1)] for s in stalls]}
    if report.max_gap_ms:
        out["client_gap_frozen_ms"] = round(frozen_overlap(stalls, report.gap_at, report.max_gap_ms / 1e3) * 1e3, 1)
        # every gap of LONG_GAP_MS or more less its stopped time; the shorter ones stay under LONG_GAP_MS
        left = [ms - frozen_overlap(stalls, at, ms / 1e3) * 1e3 for at, ms in report.long_gaps]
        out["client_gap_unfrozen_ms"] = round(max(left + [LONG_GAP_MS]) if left else report.max_gap_ms, 2)
    return out


def check(moved: Moved, before: str, after: str, driver: KVHammer | StepDriver, workload: str, heap: int, seed: int,
          cfg: SuiteConfig) -> dict[str, Any]:
    """The driver's figures, the timeline and phases (seconds since the migrate request), and the verdict."""
    report: LoadReport = moved.report
    t_req = moved.requested
    timeline = [[round(t - t_req, 4), round(r, 1)] for t, r in report.ops_timeline]
    phases = derive_phases(moved.figures, moved.events, moved.took)
    rec: dict[str, Any] = {**report.figures(), "client_error_sample": report.errors[:3], "timeline": timeline,
                           "events": moved.events, "phases": phases,
                           "ops_s_before": window_rate(timeline, -cfg.settle_s, 0.0),
                           "ops_s_during": window_rate(timeline, phases["stop"], phases["done"]),
                           "ops_s_migration": window_rate(timeline, phases["attest"], phases["done"])}  # start to DONE
    if "rounds" in phases:  # what the app keeps while its heap streams beside it
        rec["ops_s_rounds"] = window_rate(timeline, phases["rounds"], phases["stop"])
    if report.max_gap_ms:
        rec["client_gap_at_s"] = round(report.gap_at - t_req, 4)
        rec["client_gap_phase"] = gap_phase(phases, rec["client_gap_at_s"], report.max_gap_ms / 1e3)
    if isinstance(driver, KVHammer):
        ok = after == before
        why = "state checksum equal before and after (read-only client)" if ok else "state checksum changed"
    else:
        ok, why = _twin_check(workload, heap, cfg.fill, seed, before, after, driver.log)
    if not report.clean:
        why = f"client saw {len(report.errors)} failed and {report.wrong} wrong calls; " + why
    return {**rec, "verified": bool(ok and report.clean), "verify_detail": why}


# -- the whole suite ----------------------------------------------------------------------------------


def summarize_all(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bench.summarize per workload (it groups by variant and heap only); failed runs left out."""
    rows: list[dict[str, Any]] = []
    ok = [r for r in results if "error" not in r]
    for w in dict.fromkeys(r["workload"] for r in ok):
        for row in summarize([r for r in ok if r["workload"] == w], SUITE_KEYS):
            rows.append({"workload": w, **row})
    return rows


def _write(doc: dict[str, Any], out: Path) -> None:
    """Rewritten after every migration (an interrupted run keeps what it measured), atomically."""
    tmp = out / "results.json.tmp"
    tmp.write_text(dumps(doc))
    tmp.replace(out / "results.json")


def run_suite(cfg: SuiteConfig, given: str | None = None) -> dict[str, Any]:
    """Run every migration and the overhead measurement; write results.json, the plots and report.md."""
    from constmig.enclave.dirty import preflight as wp_preflight
    from constmig.kernel.uffd import preflight

    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    problem = preflight()
    wp_problem = wp_preflight()
    for v in list(cfg.variants):
        strategy, tracker = split_variant(v)
        why = (f"userfaultfd unusable here: {problem}" if problem is not None and tracker == "fault" else
               f"write tracking unusable here: {wp_problem}" if wp_problem is not None and
               strategy in strategies.ROUNDS else None)
        if why:
            cfg.variants.remove(v)
            cfg.skipped[v] = why
            console.print(f"[yellow]skipping {v}: {why}[/]")
    if not cfg.variants:
        raise ConfigError("no variant left to run")
    results: list[dict[str, Any]] = []
    t0 = time.time()
    doc: dict[str, Any] = {"suite_version": 1, "command": cfg.command(), "given": given or cfg.command(),
                           "config": cfg.to_json(), "machine": machine_info(detail=True), "uffd_problem": problem,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg_start": os.getloadavg(),
                           "results": results}
    cells = cfg.cells()
    total = len(cells) * cfg.repeat * len(cfg.variants)
    console.print(f"bench suite: {total} migrations ({len(cells)} workload/size cells x {cfg.repeat} repeats x "
                  f"{len(cfg.variants)} variants){', then tracker overhead' if cfg.overhead else ''}; out {out}")
    t_mig = time.time()
    with two_agents() as addrs, StallWatch() as watch, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True) as bar:
        task = bar.add_task("migrations", total=total)
        n = 0
        for workload, heap in cells:
            for rep in range(cfg.repeat):
                for variant in cfg.variants:
                    n += 1
                    label = f"[{n}/{total}] {workload} {format_size(heap)} {variant} #{rep + 1}"
                    bar.update(task, description=label)

                    def on_progress(info: dict[str, Any], label: str = label) -> None:
                        if info.get("total"):
                            bar.update(task, description=f"{label} {info.get('phase')} "
                                       f"{info.get('done', 0) / info['total']:.0%}")

                    rec = one_run(addrs, workload, heap, variant, rep, cfg, f"s{n}-{workload}", on_progress, watch)
                    rec["repeat"] = rep
                    results.append(rec)
                    bar.advance(task)
                    console.print(_line(label, rec))
                    _write(doc, out)
    doc["migrations_s"] = round(time.time() - t_mig, 1)
    from constmig.bench.raw import run_raw, stream_vs_raw

    console.print("the machine's stream bound (bench raw), to judge each stream by")
    doc["raw"] = run_raw(min(cfg.workload_size, 1 << 30), 1 if cfg.quick else 3, quiet=True,
                         floor_faults=100 if cfg.quick else 400)
    for rec in results:
        rec["stream_vs_raw"] = stream_vs_raw(rec, doc["raw"])
    if cfg.overhead:
        from constmig.bench.overhead import measure

        t_ov = time.time()
        console.print(f"tracker overhead outside migration: {len(cfg.workloads)} workloads in process, "
                      f"{format_size(cfg.overhead_heap)} heaps")
        doc["overhead"] = measure(cfg.workloads, cfg.overhead_heap, cfg.overhead_rounds, cfg.overhead_round_s,
                                  fault_problem=problem,
                                  progress=lambda w: console.print(f"  overhead: {w}"))
        doc["overhead_s"] = round(time.time() - t_ov, 1)
    doc["summary"] = summarize_all(results)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["load_avg_end"] = os.getloadavg()
    doc["duration_s"] = round(time.time() - t0, 1)
    from constmig.bench.report import write_report

    doc["analysis"] = write_report(doc, out)  # plots, report.md; slopes etc. kept in the JSON too
    doc["duration_s"] = round(time.time() - t0, 1)
    _write(doc, out)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots in {out} "
                  f"({doc['duration_s']:.0f} s)")
    bad = [r for r in results if not r.get("verified")]
    if bad:
        raise ConstmigError(f"{len(bad)} of {len(results)} migrations failed or were not verified; "
                            f"see {out / 'report.md'}")
    return doc


def _line(label: str, rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"{label}: [red]failed[/]: {rec['error']}"
    extra = ""
    if rec.get("fault_latency_us_p50") is not None:
        extra = f", {rec.get('faults', 0)} faults p50 {rec['fault_latency_us_p50'] / 1e3:.1f} ms"
    ok = "[green]verified[/]" if rec["verified"] else f"[red]NOT verified[/] ({rec.get('verify_detail')})"
    return (f"{label}: down {rec['downtime_ms']:.1f} ms, total {rec['total_s']:.2f} s, "
            f"gap {rec.get('client_gap_ms', 0):.0f} ms{extra}, {ok}")
