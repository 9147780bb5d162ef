"""`constmig bench ...`: the benchmarks from the shell (registered by cli.py, whose Main group turns a
ConstmigError into one `error:` line). Each command checks its outputs before it starts, runs its bench
module (imported only then: numpy and matplotlib load only for a bench) and prints a few lines unless
the JSON goes to stdout."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from constmig.bench.results import OPTION_VARIANTS, VARIANT_OPTIONS
from constmig.errors import ConfigError, ConstmigError
from constmig.migration import strategies
from constmig.options import DEFAULT_STRATEGY, STRATEGY_CHOICES, Size, etcd_option, write_json
from constmig.units import check_writable, parse_size

# bench variants: a strategy, with the tracker after a dash where it needs one
VARIANT_CHOICES = click.Choice(strategies.variants())


def _option_sets() -> str:
    """"+throttle: max_throttle 0.9", ... (the request options each variant suffix carries)."""
    return "; ".join(f"+{name}: " + ", ".join(f"{k} {v}" for k, v in opts.items())
                     for name, opts in VARIANT_OPTIONS.items())


def json_option(help_text: str = "Write the figures as JSON (FILE, or - for stdout).") -> Any:
    return click.option("--json", "json_path", default=None, help=help_text)


def whole_mib(heap: int, chunk: int) -> None:
    if heap < chunk or heap % chunk:
        raise ConfigError(f"--heap must be a whole number of MiB, not {heap} bytes")


def emit(doc: dict[str, Any], json_path: str | None, lines: Callable[[dict[str, Any]], Iterable[str]]) -> None:
    """The JSON where --json says; the summary lines too, unless the JSON went to stdout."""
    write_json(doc, json_path)
    if json_path != "-":
        for line in lines(doc):
            click.echo(line)


@click.group()
def bench() -> None:
    """Benchmarks (JSON out, plots next to it)."""


@bench.command("sizes")
@click.option("--strategy", "strategies", type=VARIANT_CHOICES, multiple=True,
              default=strategies.variants(auto=False), show_default=True)
@click.option("--sizes", default="256M,1G,4G", show_default=True, help="Comma-separated heap sizes.")
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--app", default="kvstore", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
def bench_sizes(strategies: tuple[str, ...], sizes: str, repeat: int, app: str, out: Path) -> None:
    """Downtime and total time against heap size, per strategy."""
    from constmig.bench.sizes import run_sizes

    size_list = [parse_size(s) for s in sizes.split(",") if s.strip()]
    if not size_list:
        raise ConfigError("--sizes needs at least one size")
    check_writable(out, "--out", folder=True)
    run_sizes(list(strategies), size_list, repeat, app, out)


@bench.command("calls")
@click.option("--rounds", type=click.IntRange(1, 100), default=7, show_default=True,
              help="Rounds per path; the paths alternate round by round.")
@click.option("--calls", type=click.IntRange(10, 1_000_000), default=2000, show_default=True,
              help="Sequential kvstore gets per round.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for calls.json and the plot.")
@json_option("Also write the figures as JSON (FILE, or - for stdout).")
def bench_calls(rounds: int, calls: int, out: Path, json_path: str | None) -> None:
    """What a sealed client session costs: calls/s and p99 of kvstore get, sealed vs plain, same run."""
    from constmig.bench.calls import run_calls

    check_writable(out, "--out", folder=True)
    check_writable(json_path, "--json")

    def lines(doc: dict[str, Any]) -> Iterable[str]:
        sealed, plain, r = doc["sealed"], doc["plain"], doc["sealed_over_plain_calls_per_s"]
        yield (f"sealed {sealed['calls_per_s_median']:.0f} calls/s, plain {plain['calls_per_s_median']:.0f} calls/s: "
               f"sealed/plain {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]; p99 {sealed['latency_us_p99']:.0f} "
               f"vs {plain['latency_us_p99']:.0f} µs ({out / 'calls.json'})")

    emit(run_calls(rounds, calls, out, quiet=json_path == "-"), json_path, lines)


@bench.command("raw")
@click.option("--heap", type=Size(), default="1G", show_default=True, help="Bytes to stream (whole MiB).")
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True, help="Streams per mode.")
@json_option()
def bench_raw(heap: int, repeat: int, json_path: str | None) -> None:
    """This machine's bound for a heap stream: sealed 1 MiB chunks between two processes into a fresh heap."""
    from constmig.bench.raw import CHUNK, MODES, run_raw

    whole_mib(heap, CHUNK)
    check_writable(json_path, "--json")

    def lines(doc: dict[str, Any]) -> Iterable[str]:
        for mode in MODES:
            f = doc.get(mode)
            yield (f"{mode:6} {f['raw_gbps']:.2f} GB/s [{f['min']:.2f}, {f['max']:.2f}]" if f else
                   f"{mode:6} skipped: {doc['skipped'][mode]}")
        fl = doc["floor"]
        yield f"floor  TCP round trip p50 {fl['tcp_pingpong_us']['p50']:.0f} µs; " + (
            f"demand fault with nothing else running p50 {fl['demand_fault_us']['p50']:.0f} µs, p99 "
            f"{fl['demand_fault_us']['p99']:.0f} µs" if "demand_fault_us" in fl else fl["skipped"])

    emit(run_raw(heap, repeat, quiet=json_path == "-"), json_path, lines)


@bench.command("writes")
@click.option("--heap", type=Size(), default="1G", show_default=True, help="Heap size (whole MiB).")
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True, help="Repeats per mechanism.")
@json_option()
def bench_writes(heap: int, repeat: int, json_path: str | None) -> None:
    """What write tracking for pre-copy costs: the kernel's and the enclave's own, same run."""
    from constmig.bench.writes import CHUNK, run_writes

    whole_mib(heap, CHUNK)
    check_writable(json_path, "--json")

    def lines(doc: dict[str, Any]) -> Iterable[str]:
        for mech in ("kernel", "enclave"):
            f = {k: v["median"] for k, v in doc[mech].items()} if mech in doc else None
            yield (f"{mech:8} arm {f['arm_ms']:.1f} ms, first write {f['first_write_per_chunk_us']:.1f} µs/chunk, "
                   f"every page {f['every_page_once_ms']:.1f} ms, scan {f['scan_all_written_ms']:.1f} ms, close "
                   f"{f['close_ms']:.1f} ms" if f else f"{mech:8} skipped: {doc['skipped'][mech]}")

    emit(run_writes(heap, repeat, quiet=json_path == "-"), json_path, lines)


@bench.command("directory")
@etcd_option("Measure this etcd (under a private key prefix, removed after) [default: start one on loopback; "
             "env: CONSTMIG_ETCD].")
@click.option("--ops", type=click.IntRange(20, 100_000), default=500, show_default=True,
              help="Requests per measurement per round.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Writers at once for the move rate.")
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True, help="Rounds.")
@json_option()
def bench_directory(etcd: str | None, ops: int, concurrency: int, repeat: int, json_path: str | None) -> None:
    """What the fleet directory asks of etcd: lookup, move, lease refresh and registration latency, and
    the moves per second one store takes from many writers."""
    from constmig.bench.directory import run_directory_bench

    check_writable(json_path, "--json")
    if etcd is not None:
        from constmig.host.directory import parse_etcd_url

        parse_etcd_url(etcd)

    def lines(doc: dict[str, Any]) -> Iterable[str]:
        for key in ("lookup", "move", "refresh", "register"):
            f = doc[key]["p50_ms"]
            yield (f"{key:9} p50 {f['median']:.2f} ms [{f['min']:.2f}, {f['max']:.2f}], p99 "
                   f"{doc[key]['p99_ms']['median']:.2f} ms")
        m = doc["moves_per_s"]
        yield f"moves/s  {m['median']:.0f} [{m['min']:.0f}, {m['max']:.0f}] with {m['concurrency']} writers"

    emit(run_directory_bench(etcd, ops, concurrency, repeat), json_path, lines)


@bench.command("drain")
@click.option("--enclaves", type=click.IntRange(1, 64), default=6, show_default=True, help="Enclaves on host a.")
@click.option("--heap", type=Size(), default="128M", show_default=True, help="Heap of each (filled 90%).")
@click.option("--loaded", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Enclaves with a client reading and writing throughout.")
@click.option("--link", default="1gbit", show_default=True, help="Each host's link rate.")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--max-bandwidth", type=Size(), default="0", show_default=True, help="Shared cap; 0 = none.")
@click.option("--strategy", type=STRATEGY_CHOICES, default=DEFAULT_STRATEGY, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True)
@json_option()
def bench_drain(enclaves: int, heap: int, loaded: int, link: str, parallel: int, max_bandwidth: int, strategy: str,
                repeat: int, json_path: str | None) -> None:
    """A maintenance drain on a three-host netns testbed with etcd (root): wall time, bytes, downtimes,
    the worst client gap, lost and wrong calls."""
    from constmig.bench.drain import run_drain_bench

    if loaded > enclaves:
        raise ConfigError(f"--loaded {loaded} is more than --enclaves {enclaves}")
    check_writable(json_path, "--json")
    doc = run_drain_bench(enclaves, heap, loaded, link, parallel, float(max_bandwidth), strategy, repeat,
                          quiet=json_path == "-")
    emit(doc, json_path, lambda doc: [
        f"median over {repeat}: {doc['wall_s']['median']:.2f} s wall, {doc['gbps']:.3f} GB/s, worst downtime "
        f"{doc['downtime_ms_max']['median']:.1f} ms, worst client gap {doc['client_gap_ms_max']['median']:.1f} ms; "
        f"{'all calls right, nothing lost' if doc['all_ok'] else 'PROBLEMS: see runs'}"])
    if not doc["all_ok"]:
        raise ConstmigError("a drain lost or got wrong a client's call, or left the directory wrong (see the JSON)")


@bench.command("suite")
@click.option("--sizes", default=None, help="Heap sizes of the size sweep [default: 256M,1G,4G; --quick: 32M,64M].")
@click.option("--workloads", default=None, help="Workloads, comma-separated, or all [default: all; --quick: "
              "kvstore,btree,xsbench].")
@click.option("--sweep", default=None, help="Workloads run at every --sizes size (all, none, or names) "
              "[default: kvstore].")
@click.option("--workload-size", default=None, help="Heap size every workload runs at [default: 1G; --quick: 64M].")
@click.option("--variants", default=None, help="Comma-separated, from: "
              f"{', '.join((*strategies.variants(auto=False), *OPTION_VARIANTS))}; a variant with pre-copy rounds "
              f"takes a suffix ({_option_sets()}) [default: every one without a +; "
              "the -fault ones are skipped, with the reason, where userfaultfd does not work].")
@click.option("--repeat", default=None, help="Repeats per point [default: 3; --quick: 1].")
@click.option("--quick", is_flag=True, help="A CI smoke run (small heaps, 3 workloads, 1 repeat; under 3 minutes).")
@click.option("--no-overhead", is_flag=True, help="Skip the in-process tracker overhead measurement.")
@click.option("--out", default=None, help="Folder for results.json, report.md and the plots (required).")
def bench_suite(sizes: str | None, workloads: str | None, sweep: str | None, workload_size: str | None,
                variants: str | None, repeat: str | None, quick: bool, no_overhead: bool, out: str | None) -> None:
    """Every workload, strategy and tracker under load in one run: results.json, plots and report.md."""
    from constmig.bench.suite import make_config, run_suite

    cfg = make_config(out, sizes=sizes, workloads=workloads, sweep=sweep, workload_size=workload_size,
                      variants=variants, repeat=repeat, quick=quick, overhead=not no_overhead)
    ctx = click.get_current_context()
    given = ["constmig", "bench", "suite"]
    for p in ctx.command.params:
        if ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE:
            value = ctx.params[p.name]
            given += [p.opts[0]] if isinstance(value, bool) else [p.opts[0], str(value)]
    run_suite(cfg, given=shlex.join(given))


@bench.command("load")
@click.option("--clients", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Client threads, each with its own connection.")
@click.option("--rate", type=click.FloatRange(min=1.0, max=100_000.0), default=400.0, show_default=True,
              help="Aggregate calls per second, fixed (open loop: latency counts from the scheduled send).")
@click.option("--duration", type=click.FloatRange(min=1.0, max=3600.0), default=20.0, show_default=True,
              help="Seconds of load per variant; the migration starts midway.")
@click.option("--heap", type=Size(), default="256M", show_default=True)
@click.option("--strategy", "variants", type=VARIANT_CHOICES, multiple=True,
              help="Variant to run (repeatable) [default: stopcopy, constmig-fault where userfaultfd works, "
              "constmig-access].")
@click.option("--write-ratio", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True)
@click.option("--testbed", default=None, help="Use the first two hosts of this running testbed "
              "(`constmig testbed up`) instead of two agents on loopback.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for load.json and the plot.")
def bench_load(clients: int, rate: float, duration: float, heap: int, variants: tuple[str, ...],
               write_ratio: float, testbed: str | None, out: Path) -> None:
    """A client fleet at a fixed rate through a migration: lost, failed, retried calls and p99 per phase."""
    from constmig.bench.load import run_load

    check_writable(out, "--out", folder=True)
    doc = run_load(out, list(variants) or None, clients=clients, rate=rate, duration=duration, heap=heap,
                   write_ratio=write_ratio, testbed=testbed)
    bad = [r["variant"] for r in doc["runs"] if not r["ok"]]
    if bad:
        raise ConstmigError(f"lost or wrong answers, unread keys or a failed migration in {', '.join(bad)}: "
                            f"see {out / 'load.json'}")


@bench.command("soak")
@click.option("--migrations", type=click.IntRange(1, 10_000), default=None,
              help="Migrations back and forth [default: 50, or 6 with --quick].")
@click.option("--heap", type=Size(), default=None, help="Heap size [default: 1G, or 64M with --quick].")
@click.option("--strategy", "variants", type=VARIANT_CHOICES, multiple=True,
              help="Variants to alternate (repeatable) [default: stopcopy, constmig-fault where userfaultfd "
              "works, constmig-access].")
@click.option("--quick", is_flag=True, help="A short soak for CI: 6 migrations of 64M.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for soak.json and the plot.")
def bench_soak(migrations: int | None, heap: int | None, variants: tuple[str, ...], quick: bool, out: Path) -> None:
    """Many migrations back and forth under load: state checked every time, agents checked for leaks."""
    from constmig.bench.soak import run_soak

    check_writable(out, "--out", folder=True)
    doc = run_soak(out, migrations or (6 if quick else 50), heap or ((64 if quick else 1024) << 20),
                   variants=list(variants) or None)
    if not doc["ok"]:
        first = doc["problems"][0]
        raise ConstmigError(f"soak found {len(doc['problems'])} problem(s), first: {first['kind']}: "
                            f"{first['detail']} (see {out / 'soak.json'})")
