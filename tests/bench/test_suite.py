"""`constmig bench suite`: the pure parts (fits, phases, histograms, config, report) and one quick e2e run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constmig.bench.report import slopes, write_report
from constmig.bench.results import VARIANT_OPTIONS, split_variant, summarize, variant_options
from constmig.bench.suite import VARIANTS, derive_phases, gap_phase, make_config, summarize_all
from constmig.errors import ConfigError
from constmig.kernel.uffd import preflight
from constmig.migration.receiver import latency_histogram

GiB, MiB = 1 << 30, 1 << 20
LATENCY_KEYS = {"fault_latency_hist", "fault_latency_us_p50", "fault_latency_us_p99"}
RECORD_KEYS = {"strategy", "tracker", "variant", "workload", "heap_bytes", "state_bytes", "downtime_ms", "total_s",
               "migrate_s", "prepare_s", "attest_ms", "wire_bytes", "client_calls", "client_errors", "client_wrong",
               "client_gap_ms", "client_ops", "verified", "verify_detail", "timeline", "phases", "events", "repeat"}
POSTCOPY_KEYS = {"faults", "fault_latency_us_p50", "fault_latency_us_p99", "fault_latency_hist", "stream_s",
                 "demand_chunks", "background_chunks"}


# -- numbers ------------------------------------------------------------------------------------------


def test_phases_anchor_on_handed_off():
    fig = {"downtime_ms": 4.0, "attest_ms": 30.0, "migrate_s": 1.0, "total_s": 1.6, "prepare_s": 0.5,
           "stream_s": 0.9}
    ph = derive_phases(fig, [[0.2, "copy", 1], [0.6, "handed_off", None]], returned=1.7)
    assert ph["anchor"] == "handed_off event"
    assert ph["resumed"] == pytest.approx(0.6) and ph["stop"] == pytest.approx(0.596)
    assert ph["attest"] == pytest.approx(0.566) and ph["done"] == pytest.approx(1.566)
    assert ph["stream_end"] == pytest.approx(1.5) and ph["prepared"] == 0.5 and ph["returned"] == 1.7
    no_event = derive_phases(fig, [], returned=1.7)
    assert no_event["anchor"] == "agent total" and no_event["done"] == pytest.approx(1.6)


# -- config -------------------------------------------------------------------------------------------


def test_config_defaults_and_cells(tmp_path):
    full = make_config(str(tmp_path / "full"))
    assert full.sizes == [256 * MiB, GiB, 4 * GiB] and full.repeat == 3 and full.sweep == ["kvstore"]
    assert len(full.workloads) == 7 and full.workload_size == GiB
    cells = full.cells()
    assert cells[:3] == [("kvstore", 256 * MiB), ("kvstore", GiB), ("kvstore", 4 * GiB)]
    assert len(cells) == 3 + 6 and all(s == GiB for _, s in cells[3:])
    quick = make_config(str(tmp_path / "q"), quick=True)
    assert quick.repeat == 1 and max(quick.sizes) <= 64 * MiB and len(quick.workloads) <= 3
    assert "--quick" in quick.command()
    grid = make_config(str(tmp_path / "g"), sizes="32M,64M", workloads="btree,matrix", sweep="all",
                       workload_size="64M", variants="stopcopy", repeat="2")
    assert grid.cells() == [("btree", 32 * MiB), ("btree", 64 * MiB), ("matrix", 32 * MiB), ("matrix", 64 * MiB)]
    assert make_config(str(tmp_path / "d"), workloads="btree").sweep == ["btree"]  # default sweep follows


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"workloads": "kvstore,nosuch"}, "unknown workload 'nosuch'"),
    ({"variants": "constmig-psychic"}, "unknown variant 'constmig-psychic'"),
    ({"variants": "precopy+turbo"}, "unknown variant option '+turbo' in 'precopy+turbo'; known: +throttle"),
    ({"variants": "stopcopy+throttle"}, "which stopcopy does not run (those that do: precopy, hybrid, auto)"),
    ({"variants": "teleport+throttle"}, "unknown variant 'teleport'"),
    ({"sizes": "12Q"}, "malformed size"),
    ({"sizes": "1M"}, "at least"),
    ({"workload_size": "1000K"}, "whole number of MiB"),
    ({"repeat": "x"}, "--repeat"),
    ({"repeat": "0"}, "--repeat"),
    ({"sweep": "btree", "workloads": "kvstore"}, "not among --workloads"),
    ({"sizes": "100T"}, "memory"),
])
def test_config_rejects_bad_input(tmp_path, kw, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        make_config(str(tmp_path / "o"), **kw)


def test_a_variant_suffix_names_request_options(tmp_path):
    assert split_variant("precopy+throttle") == ("precopy", "auto")
    assert split_variant("hybrid-fault+throttle") == ("hybrid", "fault")
    assert variant_options("precopy+throttle") == {"max_throttle": 0.9} == VARIANT_OPTIONS["throttle"]
    assert variant_options("precopy") == {} and variant_options("stopcopy") == {}
    # the native data plane moves the post-copy stream too (docs/native.md step 2b): constmig takes it
    assert variant_options("constmig-fault+native") == {"data_plane": "native"} == VARIANT_OPTIONS["native"]
    assert split_variant("constmig-fault+native") == ("constmig", "fault")
    cfg = make_config(str(tmp_path / "o"), variants="stopcopy,precopy,precopy+throttle,hybrid-fault+throttle")
    assert cfg.variants == ["stopcopy", "precopy", "precopy+throttle", "hybrid-fault+throttle"]
    assert "precopy+throttle" not in make_config(str(tmp_path / "d")).variants  # not in the default suite
    # the summary keeps the variant's name and the base strategy
    recs = [{"variant": "precopy+throttle", "strategy": "precopy", "heap_bytes": GiB, "downtime_ms": 5.0,
             "total_s": 1.0, "verified": True}]
    assert [(r["variant"], r["strategy"]) for r in summarize(recs)] == [("precopy+throttle", "precopy")]


def test_cli_help_lists_the_throttled_variant():
    p = _cm("bench", "suite", "--help")
    assert p.returncode == 0 and "precopy+throttle" in p.stdout and "max_throttle 0.9" in p.stdout


def test_config_rejects_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write to --out"):
        make_config(str(tmp_path / "file" / "sub"))
    with pytest.raises(ConfigError, match="missing --out"):
        make_config(None)


def _cm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--workloads", "nosuch"], "unknown workload"),
    (["--variants", "stopcopy,teleport"], "unknown variant 'teleport'"),
    (["--variants", "stopcopy,precopy+turbo"], "unknown variant option '+turbo'"),
    (["--sizes", "1X"], "malformed size"),
    (["--repeat", "many"], "--repeat"),
    ([], "missing --out"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, fragment):
    out = [] if not args else ["--out", str(tmp_path / "o")]
    p = _cm("bench", "suite", *args, *out)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and fragment in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("x")
    p = _cm("bench", "suite", "--quick", "--out", str(tmp_path / "file" / "o"))
    assert p.returncode == 1 and "cannot write to --out" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# -- report from a synthetic run ----------------------------------------------------------------------


def _record(workload: str, heap: int, variant: str, rep: int, downtime: float, verified: bool = True,
            **figures: object) -> dict:
    strategy = split_variant(variant)[0]
    post = strategy in ("constmig", "hybrid")
    r = {"variant": variant, "strategy": strategy,
         "tracker": variant.split("-")[1] if post else "none", "workload": workload, "heap_bytes": heap,
         "repeat": rep, "downtime_ms": downtime, "total_s": 0.5 + heap / GiB * (1.2 if post else 1.0),
         "client_gap_ms": downtime + 30, "verified": verified, "verify_detail": "synthetic", "load_avg": 0.5,
         "timeline": [[t / 10, 1000.0 if not 5 <= t <= 7 else 200.0] for t in range(-5, 15)],
         "phases": {"prepared": 0.3, "stop": 0.5, "resumed": 0.5 + downtime / 1e3, "done": 0.9, "returned": 1.0},
         "ops_s_before": 1000.0, "ops_s_during": 400.0}
    if post:
        r.update({"faults": 20, "fault_latency_us_p50": 1200.0, "fault_latency_us_p99": 5000.0,
                  "fault_latency_hist": latency_histogram([0.0012] * 15 + [0.005] * 5), "stream_s": 0.4,
                  "demand_queued_hist": latency_histogram([0.0002] * 20),
                  "demand_round_trip_hist": latency_histogram([0.0008] * 20),
                  "source_service_hist": latency_histogram([0.0004] * 20),
                  "demand_install_hist": latency_histogram([0.0002] * 20)})
    return {**r, **figures}


def _rounds(rounds: list[int], throttle: list[float], ended: str, **more: object) -> dict:
    """A run's pre-copy figures (converge.py's names), with the client's throughput through the rounds."""
    return {"rounds": len(rounds), "round_chunks": rounds, "throttle": throttle, "rounds_ended": ended,
            "ops_s_rounds": 500.0, **more}


def _doc(tmp_path: Path) -> dict:
    cfg = make_config(str(tmp_path), sizes="256M,1G,4G", workloads="kvstore,btree", workload_size="1G",
                      repeat="2", variants=",".join((*VARIANTS, "precopy+throttle")))
    results = []
    for heap in cfg.sizes:
        for rep in range(2):
            results.append(_record("kvstore", heap, "stopcopy", rep, 100 + 350 * heap / GiB + rep))
            results.append(_record("kvstore", heap, "constmig-fault", rep, 3.0 + rep * 0.2))
            results.append(_record("kvstore", heap, "constmig-access", rep, 2.5 + rep * 0.1))
    for rep in range(2):
        results.append(_record("btree", GiB, "stopcopy", rep, 400.0))
        results.append(_record("btree", GiB, "constmig-fault", rep, 4.0, verified=rep == 0))
        results.append(_record("btree", GiB, "constmig-access", rep, 3.0))
        # rounds: pre-copy does not converge; throttled it does (the median-downtime run is #1 of 2: a tie)
        results.append(_record("btree", GiB, "precopy", rep, 300.0,
                               **_rounds([1024], [0.0], "not-shrinking", final_chunks=800, dirty_rate=750.0)))
        results.append(_record("btree", GiB, "precopy+throttle", rep, 20.0 + 2 * rep, variant_options={"max_throttle": 0.9},
                               **_rounds([[1024, 800, 200], [1024, 800, 300, 150, 60]][rep],
                                         [[0.0, 0.2, 0.3], [0.0, 0.2, 0.3, 0.4, 0.5]][rep], "fits", final_chunks=60,
                                         held_calls=20 + 4 * rep, held_s=0.3 + 0.1 * rep,
                                         unthrottled_dirty_rate=800.0, dirty_rate=400.0)))
        left = {"final_chunks": 30} if rep == 0 else {"missing_at_switch": 90}
        results.append(_record("btree", GiB, "auto-fault", rep, 10.0 + rep,
                               **_rounds([1024, 100], [0.0, 0.1], ["fits", "budget"][rep], held_calls=5 + 2 * rep,
                                         held_s=0.05 + 0.02 * rep, unthrottled_dirty_rate=500.0, dirty_rate=100.0,
                                         decision=["converged", "switched"][rep], decision_why=f"synthetic why {rep}",
                                         **left)))
    results.append({"variant": "constmig-access", "strategy": "constmig", "workload": "btree", "heap_bytes": GiB,
                    "repeat": 2, "error": "synthetic failure", "verified": False})
    ov_modes = {m: {"ops_s": [1.0], "median": 100.0, "min": 90.0, "max": 110.0, "relative": rel,
                    "relative_min": rel - 0.05, "relative_max": rel + 0.05}
                for m, rel in (("plain", 1.0), ("access", 0.9), ("access-stream", 0.5), ("fault", 1.0))}
    overhead = {"heap_bytes": 256 * MiB, "rounds": 3, "round_s": 0.1, "modes": list(ov_modes),
                "mode_labels": {m: m for m in ov_modes},
                "workloads": [{"workload": w, "answers_match": True, "uffd_faults": 0, "modes": ov_modes}
                              for w in ("kvstore", "btree")]}
    return {"command": cfg.command(), "given": "constmig bench suite --out x", "config": cfg.to_json(),
            "machine": {"cores": 2, "memory_bytes": 8 * GiB, "kernel": "k", "python": "3.11", "machine": "x86_64",
                        "cpu_model": "Test CPU", "cpu_flags": ["aes"]},
            "uffd_problem": None, "load_avg_start": [0.1, 0.1, 0.1], "load_avg_end": [0.2, 0.2, 0.2],
            "results": results, "summary": summarize_all(results), "overhead": overhead,
            "migrations_s": 60.0, "duration_s": 70.0}


def test_report_from_synthetic_results(tmp_path):
    doc = _doc(tmp_path)
    fits = {(f["variant"], f["measure"]): f for f in slopes(doc)}
    sc = fits["stopcopy", "downtime_ms"]
    assert sc["slope"] == pytest.approx(350, rel=0.01) and sc["r2"] > 0.99
    assert abs(fits["constmig-fault", "downtime_ms"]["slope"]) < 0.01
    analysis = write_report(doc, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| heap | variant | downtime ms, median [min-max] | reduction vs stop-and-copy |" in md
    assert "Test CPU" in md and "constmig bench suite --out x" in md
    # 1 GiB kvstore: stop-and-copy median 450.5 ms, fault 3.1 ms -> reduction 99.3%
    assert "| 1.0 GiB | stopcopy | 450 [450-451] |" in md and "99.3%" in md
    assert "350 ± " in md  # the stop-and-copy downtime slope
    assert "FAILED: btree 1.0 GiB constmig-access #3: synthetic failure" in md
    assert "NOT VERIFIED: btree 1.0 GiB constmig-fault #2" in md
    # where a demand fault's time goes: each segment's p50 from the merged histograms (bin upper edges)
    assert "| fault | out and back | 160 | 1.000 |" in md and "| access | queued | 160 | 0.251 |" in md
    # rounds and throttle: a row per (workload, heap, variant) that ran rounds; per-round figures of the run with
    # the median downtime, the rest over the repeats
    rounds = md.split("## Rounds and throttle\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in rounds.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| btree | 1.0 GiB | precopy | 1 [1-1] | 1024 | 0% | not-shrinking | 800 sent | 750 | - | - |",
        "|  | 1.0 GiB | auto-fault | 2 [2-2] | 1024 → 100 | 0% → 10% | fits (1), budget (1) | 30 sent | 500 → 100 "
        "| 6 / 0.06 | converged (1), switched (1) |",
        "|  | 1.0 GiB | precopy+throttle | 4 [3-5] | 1024 → 800 → 200 | 0% → 20% → 30% | fits | 60 sent | 800 → 400 "
        "| 22 / 0.35 | - |"]
    assert "* btree 1.0 GiB auto-fault: converged: synthetic why 0" in rounds
    # the summary: what the throttle cost and what came of it, against the same variant without it
    line = next(x for x in md.splitlines() if x.startswith("* The throttle: "))
    assert "precopy+throttle throttled at 1 of 1 workload/size points (up to 50%); cost: the writing calls held " \
           "0.35 s per migration (22 calls), clients at 50% of their throughput in the rounds; what came of it " \
           "(medians): btree 1.0 GiB: dirty rate 800 → 400 chunks/s, downtime 21 (precopy 300) ms, longest gap 51 " \
           "(precopy 330) ms" in line
    assert "auto-fault throttled at 1 of 1 workload/size points (up to 10%)" in line
    assert "precopy throttled" not in line  # it never did
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) >= 7
    for name in images:
        assert (tmp_path / name).stat().st_size > 1000, name
    assert set(analysis["plots"].values()) == set(images)


def test_report_without_sweep_or_overhead(tmp_path):
    doc = _doc(tmp_path)
    doc["config"]["sweep"] = []
    doc["results"] = [r for r in doc["results"] if r["heap_bytes"] == GiB]
    doc["summary"] = summarize_all(doc["results"])
    del doc["overhead"]
    write_report(doc, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No size sweep in this run" in md and "`--no-overhead`" in md


# -- overhead, in process -----------------------------------------------------------------------------


def test_overhead_modes_agree_and_armed_heap_never_faults():
    from constmig.bench.overhead import measure

    problem = preflight()
    doc = measure(["btree"], 16 * MiB, rounds=1, round_s=0.01, fault_problem=problem)
    w = doc["workloads"][0]
    assert w["answers_match"]
    assert set(w["modes"]) == ({"plain", "access", "access-stream"} | ({"fault"} if problem is None else set()))
    assert w["modes"]["plain"]["relative"] == 1.0
    if problem is None:
        assert w["uffd_faults"] == 0
    else:
        assert "fault_skipped" in doc


# -- the whole thing, quick ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_quick_suite_end_to_end(tmp_path):
    out = tmp_path / "suite"
    t0 = time.monotonic()
    p = _cm("bench", "suite", "--quick", "--out", str(out), timeout=220)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert elapsed < 180, f"--quick took {elapsed:.0f} s"
    doc = json.loads((out / "results.json").read_text())
    results = doc["results"]
    variants = {r["variant"] for r in results}
    want = {v for v in VARIANTS if preflight() is None or not v.endswith("-fault")}
    assert variants == want
    assert len({r["workload"] for r in results}) >= 2
    for r in results:
        assert "error" not in r, r.get("error")
        assert set(r) >= RECORD_KEYS, RECORD_KEYS - set(r)
        if r["strategy"] in ("constmig", "hybrid"):
            # hybrid under a read-only client has nothing missing at the switch: no fault, no latency
            want = POSTCOPY_KEYS if r["strategy"] == "constmig" or r.get("faults") else POSTCOPY_KEYS - LATENCY_KEYS
            assert set(r) >= want, want - set(r)
            assert r["tracker"] == r["variant"].split("-")[1]
        if r["strategy"] in ("precopy", "hybrid"):
            assert r["rounds"] >= 1 and 0 < r["phases"]["rounds"] < r["phases"]["stop"], r["phases"]
            assert r["ops_s_migration"] > 0
        assert r["verified"] is True, r["verify_detail"]
        assert r["client_errors"] == 0 and r["client_calls"] > 0 and r["timeline"]
        assert isinstance(r["machine_stalls"], list) and r["client_gap_unfrozen_ms"] <= r["client_gap_ms"]
        ph = r["phases"]
        assert ph["anchor"] == "handed_off event"
        assert 0 < ph["prepared"] <= ph["stop"] + 0.005 and ph["stop"] < ph["resumed"] <= ph["done"] + 0.005
    for key in ("cores", "memory_bytes", "kernel", "cpu_flags"):
        assert key in doc["machine"]
    assert doc["summary"] and doc["overhead"]["workloads"] and doc["analysis"]["slopes"]
    assert doc["raw"]["raw_gbps"] > 0  # the stream bound, measured in the same run
    streamed = [r for r in results if r.get("stream_gbps")]
    assert streamed and all(r["stream_vs_raw"] > 0 for r in streamed)
    md = (out / "report.md").read_text()
    assert "## The stream against the machine's bound" in md
    assert any(r.get("demand_round_trip_hist") for r in results if r["strategy"] == "constmig")
    assert "### Where a demand fault's time goes" in md
    assert "gap, machine stops out ms" in md
    assert "## Headline" in md and "| heap | variant | downtime ms, median [min-max]" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) >= 7
    for name in images:
        assert (out / name).stat().st_size > 1000, name


def test_gap_phase_names_the_phase_a_gap_overlaps_most():
    ph = {"prepared": 1.0, "attest": 1.01, "rounds": 1.02, "stop": 3.0, "resumed": 3.01, "done": 4.0}
    assert gap_phase(ph, 0.5, 0.2) == "preparing the destination"
    assert gap_phase(ph, 2.0, 0.1) == "pre-copy rounds"
    assert gap_phase(ph, 2.999, 0.012) == "downtime"
    assert gap_phase(ph, 2.99, 0.5) == "heap streaming"
    assert gap_phase(ph, 4.5, 0.1) == "after DONE"
    assert gap_phase({k: v for k, v in ph.items() if k != "rounds"}, 1.5, 0.1) == "attestation"
