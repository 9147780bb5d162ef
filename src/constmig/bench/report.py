"""The bench suite's report: analysis of results.json (tables, slope fits), the plots, and report.md.

Everything here is a pure function of the results document, so a report can be regenerated (or
tested) without running a migration: `write_report(json.load(open("results.json")), out_dir)`.
Numbers in the text all come from the document; nothing is hard-coded.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from constmig.bench.raw import MODES
from constmig.bench.results import base_variant, dumps
from constmig.bench.stalls import Stall
from constmig.bench.stats import Band, band, fit_line, hist_quantile, merge_hists, show, spread
from constmig.units import format_size

MEASURES = {"downtime_ms": "downtime (ms)", "total_s": "total migration time (s)",
            "client_gap_ms": "longest client gap (ms)"}
PLOTS = {
    "downtime": "downtime_vs_heap.png",
    "workloads": "downtime_per_workload.png",
    "total": "total_time.png",
    "timeline": "timeline.png",
    "faults": "fault_latency_cdf.png",
    "segments": "demand_segments_cdf.png",
    "overhead": "tracker_overhead.png",
    "growth": "growth_vs_heap.png",
}


def _ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "error" not in r]


def headline_workload(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    sweep = cfg.get("sweep") or []
    if "kvstore" in sweep:
        return "kvstore"
    return sweep[0] if sweep else cfg["workloads"][0]


def rows_for(doc: dict[str, Any], workload: str, heap: int | None = None) -> list[dict[str, Any]]:
    return [r for r in doc.get("summary", []) if r["workload"] == workload and (heap is None or r["heap_bytes"] == heap)]


def reductions(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """variant -> heap -> downtime reduction against stop-and-copy's median at that size, in %."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if "downtime_vs_stopcopy" in r:
            out[r["variant"]][r["heap_bytes"]] = (1 - r["downtime_vs_stopcopy"]) * 100
    return dict(out)


def slopes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per sweep workload, variant and measure: a line through every run's (heap GiB, value)."""
    out = []
    ok = _ok(doc["results"])
    for w in doc["config"].get("sweep") or []:
        for variant in doc["config"]["variants"]:
            runs = [r for r in ok if r["workload"] == w and r["variant"] == variant]
            for key in MEASURES:
                pts = [(r["heap_bytes"] / 2**30, r[key]) for r in runs if r.get(key) is not None]
                row: dict[str, Any] = {"workload": w, "variant": variant, "measure": key, "n": len(pts)}
                if len({x for x, _ in pts}) >= 2:
                    row.update(fit_line([x for x, _ in pts], [y for _, y in pts]))
                out.append(row)
    return out


def representative(results: list[dict[str, Any]], workload: str, heap: int, variant: str) -> dict[str, Any] | None:
    """The run of a group whose downtime is closest to the group's median (for a timeline)."""
    runs = [r for r in _ok(results) if r["workload"] == workload and r["heap_bytes"] == heap
            and r["variant"] == variant and r.get("timeline")]
    if not runs:
        return None
    med = statistics.median(r["downtime_ms"] for r in runs)
    return min(runs, key=lambda r: abs(r["downtime_ms"] - med))


def anomalies(doc: dict[str, Any]) -> list[str]:
    """What looked wrong or suspicious in this run, one line each (the report lists them all)."""
    out: list[str] = []
    results = doc["results"]
    for v, why in (doc["config"].get("skipped") or {}).items():
        out.append(f"variant {v} was not run: {why}")
    for r in results:
        where = f"{r['workload']} {format_size(r['heap_bytes'])} {r['variant']} #{r.get('repeat', 0) + 1}"
        if "error" in r:
            out.append(f"FAILED: {where}: {r['error']}")
            continue
        if not r.get("verified"):
            out.append(f"NOT VERIFIED: {where}: {r.get('verify_detail')}")
        if r.get("client_errors") or r.get("client_wrong"):
            out.append(f"client errors in {where}: {r.get('client_errors')} failed, {r.get('client_wrong')} wrong; "
                       f"first: {(r.get('client_error_sample') or [''])[0]}")
        if r.get("strategy") == "constmig" and not r.get("faults"):
            out.append(f"{where}: no demand fault at all (the driver never touched a chunk before it arrived)")
        ph = r.get("phases") or {}
        if ph and (ph.get("stop", 0) < ph.get("prepared", 0) - 0.005 or ph.get("done", 0) > ph.get("returned", 0) + 0.05):
            out.append(f"{where}: phase timestamps inconsistent ({ph})")
        gap, down = r.get("client_gap_ms") or 0, r.get("downtime_ms") or 0
        if gap > 1000 and gap - down > 500:  # a wait the stop does not explain
            out.append(f"{where}: the client waited {gap / 1e3:.1f} s between two answers although the app was "
                       f"stopped for only {down:.0f} ms")
        if r.get("resumes"):
            out.append(f"{where}: the stream had to reconnect {r['resumes']} time(s)")
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(results):
        groups[(r["workload"], r["heap_bytes"], r["variant"])].append(r)
    for (w, h, v), rs in groups.items():
        if len(rs) < 2:
            continue
        for r, med in _slow_stops(rs):
            out.append(f"outlier: {w} {format_size(h)} {v} #{r.get('repeat', 0) + 1}: downtime "
                       f"{r['downtime_ms']:.1f} ms against a median of {med:.1f} ms (load average "
                       f"{r.get('load_avg')})")
        totals = [r["total_s"] for r in rs]
        if min(totals) > 0 and max(totals) / min(totals) > 2.5:
            parts = [f"{label} {_spread(rs, key)} s" for key, label in (("prepare_s", "preparing the destination"),
                                                                        ("stream_s", "streaming"))
                     if _spread(rs, key) != "-"]
            out.append(f"{w} {format_size(h)} {v}: total time varies {max(totals) / min(totals):.1f}x across repeats "
                       f"({min(totals):.2f}-{max(totals):.2f} s; {', '.join(parts)})")
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(results):
        if r.get("strategy") in ("constmig", "hybrid"):  # the switch moves only the small state
            by_variant[r["variant"]].append(r)
    for v, rs in by_variant.items():  # a post-copy stop far slower than the variant's usual one
        for r, med in _slow_stops(rs):
            out.append(f"slow post-copy stop: {r['workload']} {format_size(r['heap_bytes'])} {v} "
                       f"#{r.get('repeat', 0) + 1}: {r['downtime_ms']:.1f} ms, against {med:.1f} ms for {v} "
                       f"over the whole run (load average {r.get('load_avg')})")
    cores = doc["machine"].get("cores") or 1
    loads = [r.get("load_avg") for r in results if r.get("load_avg") is not None]
    busy = [x for x in loads if x > cores]
    if busy:
        out.append(f"the machine was busy during {len(busy)} of {len(loads)} migrations (1-min load average "
                   f"above {cores} cores, up to {max(busy):.1f}): other processes shared the CPUs")
    ov = doc.get("overhead") or {}
    for w in ov.get("workloads", []):
        if not w.get("answers_match"):
            out.append(f"overhead {w['workload']}: the modes answered differently (a tracker changed a result)")
        if w.get("uffd_faults"):
            out.append(f"overhead {w['workload']}: the armed heap took {w['uffd_faults']} userfaultfd faults")
        for mode, m in w.get("modes", {}).items():
            if mode != "plain" and m["relative"] > 1.1:
                out.append(f"overhead {w['workload']} {mode}: {m['relative']:.0%} of plain (faster than without "
                           "the tracker: measurement noise of this size is in every overhead figure)")
    return out


def _slow_stops(rs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """The runs whose downtime is over 3 times the group's median and 5 ms more, with that median."""
    med = statistics.median(r["downtime_ms"] for r in rs)
    return [(r, med) for r in rs if r["downtime_ms"] > 3 * med and r["downtime_ms"] - med > 5]


def _spread(rs: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return f"{min(vals):.1f}-{max(vals):.1f}" if vals else "-"


# -- formatting ---------------------------------------------------------------------------------------


def _n(v: float | None, digits: int | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}"


def cell(row: dict[str, Any], key: str, digits: int | None = None) -> str:
    return show(row.get(key), lambda v: _n(v, digits))


def _med(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return v["median"] if v else None


def _verified(doc: dict[str, Any], workload: str, heap: int, variant: str) -> str:
    rs = [r for r in doc["results"] if r["workload"] == workload and r["heap_bytes"] == heap
          and r["variant"] == variant]
    return f"{sum(1 for r in rs if r.get('verified'))}/{len(rs)}"


def _gap_phase(doc: dict[str, Any], workload: str, heap: int, variant: str) -> str:
    """Where the longest client gap fell, most often over the repeats (suite.gap_phase); between phases as
    often, the one of the run whose gap is nearest the median (the gap the table shows)."""
    runs = [r for r in doc["results"] if r["workload"] == workload and r["heap_bytes"] == heap
            and r["variant"] == variant and r.get("client_gap_phase")]
    if not runs:
        return "-"
    med = statistics.median(r.get("client_gap_ms") or 0.0 for r in runs)
    phases = [r["client_gap_phase"] for r in sorted(runs, key=lambda r: abs((r.get("client_gap_ms") or 0.0) - med))]
    return max(dict.fromkeys(phases), key=phases.count)


def _faults(row: dict[str, Any]) -> str:
    p50, p99 = _med(row, "fault_latency_us_p50"), _med(row, "fault_latency_us_p99")
    if p50 is None:
        return "-"
    return f"{p50:.0f} / {p99:.0f}" if p99 is not None else f"{p50:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def headline_table(doc: dict[str, Any], workload: str) -> str:
    rows = []
    last_heap = None
    for r in sorted(rows_for(doc, workload), key=lambda r: (r["heap_bytes"], _variant_order(doc, r["variant"]))):
        heap = format_size(r["heap_bytes"]) if r["heap_bytes"] != last_heap else ""
        last_heap = r["heap_bytes"]
        red, ratio = _vs_stopcopy(r)
        rows.append([heap, r["variant"], cell(r, "downtime_ms"), red, cell(r, "total_s", 2), ratio,
                     cell(r, "client_gap_ms"), _faults(r), _n(_med(r, "faults"), 0),
                     _verified(doc, workload, r["heap_bytes"], r["variant"])])
    return table(["heap", "variant", "downtime ms, median [min-max]", "reduction vs stop-and-copy", "total s",
                  "total vs stop-and-copy", "client gap ms", "fault latency p50 / p99 µs", "faults",
                  "verified"], rows)


def _vs_stopcopy(row: dict[str, Any]) -> tuple[str, str]:
    """The downtime's reduction and the total time's ratio against stop-and-copy's, as the tables print them."""
    return (f"{(1 - row['downtime_vs_stopcopy']) * 100:.1f}%" if "downtime_vs_stopcopy" in row else "",
            f"{row['total_vs_stopcopy']:.2f}x" if "total_vs_stopcopy" in row else "")


def _variant_order(doc: dict[str, Any], v: str) -> int:
    order = list(doc["config"]["variants"])
    return order.index(v) if v in order else len(order)


def machine_stops(doc: dict[str, Any]) -> str:
    """How often the machine stood still under the runs, and how much of it was the hypervisor's."""
    runs = [r for r in doc["results"] if "machine_stalls" in r]
    if not runs:
        return ""
    stalls = [s for r in runs for s in r["machine_stalls"]]
    frozen = [s for s in stalls if Stall(*s).frozen]  # [at, ms, steal ms]: the rule reads a ratio
    hit = sum(1 for r in runs if r.get("client_gap_frozen_ms"))
    text = f"{len(stalls)} over {len(runs)} runs, {len(frozen)} with the vCPU stolen by the hypervisor"
    if frozen:
        text += f" ({_range([s[1] for s in frozen], '{:.0f}')} ms each)"
    return text + f"; {hit} runs' longest client gap spanned one"


def workload_table(doc: dict[str, Any], heap: int) -> str:
    rows = []
    for w in doc["config"]["workloads"]:
        first = True
        for r in sorted(rows_for(doc, w, heap), key=lambda r: _variant_order(doc, r["variant"])):
            red, ratio = _vs_stopcopy(r)
            before, during = _med(r, "ops_s_before"), _med(r, "ops_s_migration")
            tput = f"{_n(before, 0)} → {_n(during, 0)}" if before else "-"
            if before and during is not None:
                tput += f" ({during / before:.0%})"
            rows.append([w if first else "", r["variant"], cell(r, "downtime_ms"), red, cell(r, "total_s", 2), ratio,
                         cell(r, "client_gap_ms"), cell(r, "client_gap_unfrozen_ms"), _gap_phase(doc, w, heap, r["variant"]),
                         tput, _faults(r),
                         _verified(doc, w, heap, r["variant"])])
            first = False
    return table(["workload", "variant", "downtime ms", "reduction", "total s", "vs stop-and-copy",
                  "client gap ms", "gap, machine stops out ms", "longest gap during", "client ops/s before → start..DONE",
                  "fault p50 / p99 µs",
                  "verified"], rows)


def _tally(values: list[Any]) -> str:
    """"fits" when every run says the same, else each answer with its count, the commonest first."""
    vals = [str(v) for v in values if v is not None]
    if not vals:
        return "-"
    counts = sorted(((vals.count(v), v) for v in dict.fromkeys(vals)), key=lambda cv: -cv[0])
    return vals[0] if len(counts) == 1 else ", ".join(f"{v} ({c})" for c, v in counts)


def _per_round(values: list[float] | None, f: Any, keep: int = 8) -> str:
    """A figure per round as "a → b → c" (the first and last few when there are many rounds)."""
    if not values:
        return "-"
    shown = [f(v) for v in values]
    if len(shown) > keep:
        shown = [*shown[:keep // 2], f"… ({len(values) - keep + 2} more) …", *shown[-(keep // 2 - 1):]]
    return " → ".join(shown)


def _throttled(r: dict[str, Any]) -> bool:
    return bool(max(r.get("throttle") or [0.0]) > 0 or r.get("held_calls"))


def round_groups(doc: dict[str, Any]) -> list[tuple[str, int, str, list[dict[str, Any]]]]:
    """(workload, heap, variant, its verified-or-not runs that ran pre-copy rounds), in the tables' order."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(doc["results"]):
        if r.get("rounds"):
            groups[(r["workload"], r["heap_bytes"], r["variant"])].append(r)
    order = list(doc["config"]["workloads"])
    return [(w, h, v, rs) for (w, h, v), rs in sorted(groups.items(), key=lambda kv: (
        order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0][1], _variant_order(doc, kv[0][2])))]


def rounds_table(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """One row per (workload, heap, variant) that ran pre-copy rounds, and auto's reasons (the median run's)."""
    rows, whys = [], []
    last = None
    for w, h, v, rs in round_groups(doc):
        med = representative(rs, w, h, v) or rs[0]  # the run with the median downtime
        held = [(r.get("held_calls") or 0, r.get("held_s") or 0.0) for r in rs]
        held_text = "-" if not any(r.get("held_calls") is not None for r in rs) else \
            f"{_n(statistics.median(c for c, _ in held), 0)} / {statistics.median(s for _, s in held):.2f}"
        left = ("-" if med.get("final_chunks") is None and med.get("missing_at_switch") is None else
                f"{med['final_chunks']} sent" if med.get("final_chunks") is not None else
                f"{med['missing_at_switch']} missing")
        rate = _n(med.get("dirty_rate"), 0)
        if med.get("unthrottled_dirty_rate") is not None:
            rate = f"{_n(med['unthrottled_dirty_rate'], 0)} → {rate}"
        decision = _tally([r.get("decision") for r in rs])
        rows.append([w if w != last else "", format_size(h), v, show(spread(r["rounds"] for r in rs), lambda x: _n(x, 0)),
                     _per_round(med.get("round_chunks"), lambda x: str(int(x))),
                     _per_round(med.get("throttle"), lambda x: f"{x:.0%}"), _tally([r.get("rounds_ended") for r in rs]),
                     left, rate, held_text, decision])
        last = w
        if med.get("decision_why"):
            whys.append(f"{w} {format_size(h)} {v}: {med['decision']}: {med['decision_why']}")
    header = ["workload", "heap", "variant", "rounds, median [min-max]", "chunks sent per round", "throttle per round",
              "rounds ended", "left at the stop", "dirty chunks/s unthrottled → last round",
              "held calls / held s, median", "decision (auto)"]
    return (table(header, rows) if rows else ""), whys


def throttle_bullet(doc: dict[str, Any]) -> str | None:
    """What the throttle cost (the writing calls' held time, the clients' throughput in the rounds) and what it
    bought (the dirty rate it cut; the downtime against the same variant without "+throttle"), one line."""
    parts = []
    summary = {(r["workload"], r["heap_bytes"], r["variant"]): r for r in doc.get("summary", [])}
    by_variant: dict[str, list[tuple[str, int, list[dict[str, Any]]]]] = defaultdict(list)
    for w, h, v, rs in round_groups(doc):
        by_variant[v].append((w, h, rs))
    if not by_variant:
        return None
    for v, points in by_variant.items():
        acted = [(w, h, rs) for w, h, rs in points if any(_throttled(r) for r in rs)]
        if not acted:
            continue
        top = max(max(r.get("throttle") or [0.0]) for _, _, rs in acted for r in rs)
        held = [statistics.median(r.get("held_s") or 0.0 for r in rs) for _, _, rs in acted]
        calls = [statistics.median(r.get("held_calls") or 0 for r in rs) for _, _, rs in acted]
        text = (f"{v} throttled at {len(acted)} of {len(points)} workload/size points (up to {top:.0%}); cost: "
                f"the writing calls held {_range(held, '{:.2f}', collapse=True)} s per migration ({_range(calls, '{:.0f}', collapse=True)} calls)")
        rounds_tp = [x for w, h, _ in acted if (x := _ratio(summary.get((w, h, v)), "ops_s_rounds")) is not None]
        if rounds_tp:
            text += f", clients at {_range([x * 100 for x in rounds_tp], '{:.0f}', collapse=True)}% of their throughput in the rounds"
        base = base_variant(v)  # the same variant without its option suffixes, if it ran
        bought = []
        for w, h, rs in acted:
            what = [f"{w} {format_size(h)}"]
            rated = [r for r in rs if r.get("unthrottled_dirty_rate") and r.get("dirty_rate") is not None]
            if rated:
                what.append(f"dirty rate {_n(statistics.median(r['unthrottled_dirty_rate'] for r in rated), 0)} → "
                            f"{_n(statistics.median(r['dirty_rate'] for r in rated), 0)} chunks/s")
            mine, other = summary.get((w, h, v)) or {}, summary.get((w, h, base)) if base != v else None
            for key, label in (("downtime_ms", "downtime"), ("client_gap_ms", "longest gap")):
                if mine.get(key):
                    vs = f" ({base} {_n(other[key]['median'])})" if other and other.get(key) else ""
                    what.append(f"{label} {_n(mine[key]['median'])}{vs} ms")
            bought.append(" ".join(what[:1]) + ": " + ", ".join(what[1:]))
        text += "; what came of it (medians): " + "; ".join(bought)
        parts.append(text)
    if not parts:
        return "The throttle never acted: every run with pre-copy rounds converged (or ended) without it."
    return "The throttle: " + "; ".join(parts) + "."


def _range(vals: list[float], fmt: str, collapse: bool = False) -> str:
    """"lo-hi" of `vals` in `fmt` ("-" for none); `collapse`: one figure where both read the same."""
    if not vals:
        return "-"
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return lo if collapse and lo == hi else f"{lo}-{hi}"


def _ratio(row: dict[str, Any] | None, key: str) -> float | None:
    """A summary row's median `key` over its median ops_s_before."""
    if not row or not row.get(key) or not row.get("ops_s_before") or not row["ops_s_before"]["median"]:
        return None
    return row[key]["median"] / row["ops_s_before"]["median"]


def slope_table(fits: list[dict[str, Any]]) -> str:
    rows = []
    for f in fits:
        if "slope" not in f:
            rows.append([f["workload"], f["variant"], MEASURES[f["measure"]], "-", "-", "-", str(f["n"])])
            continue
        se = f" ± {_g(f['slope_se'])}" if f.get("slope_se") is not None else ""
        rows.append([f["workload"], f["variant"], MEASURES[f["measure"]], f"{_g(f['slope'])}{se}",
                     _g(f["intercept"]), _n(f["r2"], 3) if f["r2"] is not None else "-", str(f["n"])])
    return table(["workload", "variant", "measure", "slope per GiB (± std. error)", "intercept", "R²", "runs"], rows)


def _g(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}"


def overhead_table(ov: dict[str, Any]) -> str:
    modes = [m for m in ov["modes"] if m != "plain"]
    rows = []
    for w in ov["workloads"]:
        plain = w["modes"]["plain"]
        row = [w["workload"], f"{plain['median']:,.0f}"]
        for m in modes:
            x = w["modes"].get(m)
            row.append(f"{x['relative']:.1%} [{x['relative_min']:.0%}-{x['relative_max']:.0%}]" if x else "-")
        row += ["yes" if w["answers_match"] else "**no**", "-" if w.get("uffd_faults") is None else str(w["uffd_faults"])]
        rows.append(row)
    return table(["workload", "plain ops/s", *[ov["mode_labels"][m] for m in modes], "same answers",
                  "uffd faults"], rows)


# -- plots and the document ---------------------------------------------------------------------------


def _series(doc: dict[str, Any], workload: str, key: str) -> dict[str, list[tuple[int, Band]]]:
    out: dict[str, list] = {v: [] for v in doc["config"]["variants"]}
    for r in sorted(rows_for(doc, workload), key=lambda r: r["heap_bytes"]):
        if r.get(key):
            out.setdefault(r["variant"], []).append((r["heap_bytes"], band(r[key])))
    return out


def _by_workload(doc: dict[str, Any], heap: int, key: str) -> dict[str, dict[str, Band]]:
    out: dict[str, dict] = {}
    for w in doc["config"]["workloads"]:
        for r in rows_for(doc, w, heap):
            if r.get(key):
                out.setdefault(w, {})[r["variant"]] = band(r[key])
    return out


def make_plots(doc: dict[str, Any], out: Path, fits: list[dict[str, Any]]) -> dict[str, str]:
    """Draw every plot the data allows; returns name -> file name (relative to out)."""
    from constmig.bench import plots

    made: dict[str, str] = {}
    cfg = doc["config"]
    hw = headline_workload(doc)
    variants = list(cfg["variants"])
    ws = cfg["workload_size"]
    sweep_rows = rows_for(doc, hw)
    if sweep_rows:
        plots.plot_suite_downtime(_series(doc, hw, "downtime_ms"), reductions(sweep_rows), out / PLOTS["downtime"],
                                  f"{hw}: downtime against heap size (labels: reduction vs stop-and-copy)")
        made["downtime"] = PLOTS["downtime"]
    by_w = _by_workload(doc, ws, "downtime_ms")
    if by_w:
        plots.plot_workload_bars(by_w, variants, out / PLOTS["workloads"], "downtime (ms), log scale",
                                 f"downtime per workload at {format_size(ws)} (median, min-max)")
        made["workloads"] = PLOTS["workloads"]
        plots.plot_suite_total(_series(doc, hw, "total_s"), _by_workload(doc, ws, "total_s"), variants,
                               out / PLOTS["total"], f"{hw}: against heap size",
                               f"per workload at {format_size(ws)}")
        made["total"] = PLOTS["total"]
    sizes = sorted({r["heap_bytes"] for r in sweep_rows}) or [ws]
    runs = [r for r in (representative(doc["results"], hw, sizes[-1], v) for v in variants) if r]
    if runs:
        plots.plot_timelines(runs, out / PLOTS["timeline"],
                             f"{hw}, {format_size(sizes[-1])}: client ops/s through one migration per variant "
                             "(the run with the median downtime)")
        made["timeline"] = PLOTS["timeline"]
    for w in cfg["workloads"]:
        runs = [r for r in (representative(doc["results"], w, ws, v) for v in variants) if r]
        if runs:
            name = f"timeline_{w}.png"
            plots.plot_timelines(runs, out / name, f"{w}, {format_size(ws)}: client ops/s through one migration "
                                 "per variant")
            made[f"timeline_{w}"] = name
    panels = fault_panels(doc)
    if panels:
        plots.plot_fault_cdf(panels, out / PLOTS["faults"], "demand-fault latency distribution (all repeats)")
        made["faults"] = PLOTS["faults"]
    seg = segment_panels(doc)
    if seg:
        plots.plot_fault_cdf(seg, out / PLOTS["segments"], "where a demand fault's time goes, per segment (all "
                             "post-copy runs)", xlabel="milliseconds")
        made["segments"] = PLOTS["segments"]
    ov = doc.get("overhead")
    if ov and ov.get("workloads"):
        data = {w["workload"]: {m: (x["relative"], x["relative_min"], x["relative_max"]) for m, x in w["modes"].items()}
                for w in ov["workloads"]}
        plots.plot_overhead(data, ov["mode_labels"], out / PLOTS["overhead"],
                            f"tracker cost outside migration, in process, {format_size(ov['heap_bytes'])} heaps")
        made["overhead"] = PLOTS["overhead"]
    pts: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    fit_map: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for f in fits:
        if f["workload"] != hw:
            continue
        runs = [r for r in _ok(doc["results"]) if r["workload"] == hw and r["variant"] == f["variant"]
                and r.get(f["measure"]) is not None]
        pts.setdefault(f["measure"], {})[f["variant"]] = ([r["heap_bytes"] / 2**30 for r in runs],
                                                          [r[f["measure"]] for r in runs])
        if "slope" in f:
            fit_map[f["measure"]][f["variant"]] = f
    if pts and any(fit_map.values()):
        plots.plot_growth(pts, fit_map, MEASURES, out / PLOTS["growth"], f"{hw}: growth with heap size "
                          "(every run a dot; least-squares lines)")
        made["growth"] = PLOTS["growth"]
    return made


def fault_panels(doc: dict[str, Any]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """tracker -> {workload at workload size, "all runs"} -> merged histogram."""
    ws = doc["config"]["workload_size"]
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    ok = [r for r in _ok(doc["results"]) if r.get("strategy") == "constmig"]
    for tracker in dict.fromkeys(r.get("tracker") for r in ok):
        mine = [r for r in ok if r.get("tracker") == tracker]
        lines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for w in doc["config"]["workloads"]:
            h = merge_hists([r.get("fault_latency_hist") for r in mine if r["workload"] == w and r["heap_bytes"] == ws])
            if h is not None:
                lines[f"{w} {format_size(ws)}"] = h
        h = merge_hists([r.get("fault_latency_hist") for r in mine])
        if h is not None:
            lines["all runs"] = h
        if lines:
            panels[str(tracker)] = lines
    return panels


def _img(made: dict[str, str], key: str, alt: str) -> str:
    return f"![{alt}]({made[key]})\n" if key in made else f"*({alt}: no data in this run)*\n"


def render(doc: dict[str, Any], made: dict[str, str], fits: list[dict[str, Any]]) -> str:
    """report.md from the results document, the plots made and the slope fits."""
    cfg, m = doc["config"], doc["machine"]
    hw = headline_workload(doc)
    ws = cfg["workload_size"]
    results = doc["results"]
    n_ok = sum(1 for r in results if r.get("verified"))
    mem = f"{m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else "?"
    L: list[str] = []
    L.append("# constmig bench suite\n\n")
    L.append(f"Generated by `constmig bench suite` on {doc.get('finished', doc.get('started'))}: "
             f"{len(results)} migrations ({n_ok} verified) in {doc.get('migrations_s', 0) / 60:.1f} min, "
             f"whole run {doc.get('duration_s', 0) / 60:.1f} min. Every number and plot below comes from "
             "`results.json` next to this file.\n")
    L.append("\n## Summary\n\n")
    L.append("".join(f"* {b}\n" for b in summary_bullets(doc, fits)))
    L.append("\n## Command\n\n")
    L.append(f"```\n{doc.get('given') or doc['command']}\n```\n\n")
    if doc.get("given") and doc["given"] != doc["command"]:
        L.append(f"with every setting spelled out:\n\n```\n{doc['command']}\n```\n\n")
    L.append("## Machine\n\n")
    flags = ", ".join(m.get("cpu_flags") or []) or "-"
    la0 = doc.get("load_avg_start") or []
    la1 = doc.get("load_avg_end") or []
    L.append(table(["", ""], [
        ["CPU", f"{m.get('cpu_model') or '?'} ({m.get('machine')}), {m.get('cores')} cores"],
        ["memory", mem], ["kernel", str(m.get("kernel"))], ["Python", str(m.get("python"))],
        ["CPU flags (subset)", flags], ["transparent huge pages", str(m.get("thp", "?"))],
        ["userfaultfd", "usable" if not doc.get("uffd_problem") else f"unusable: {doc['uffd_problem']}"],
        ["load average (1/5/15 min) at start / end",
         f"{' '.join(f'{x:.2f}' for x in la0)} / {' '.join(f'{x:.2f}' for x in la1)}"],
        *([["machine stops during the runs (bench/stalls.py)", stops]] if (stops := machine_stops(doc)) else []),
    ]) + "\n")
    L.append("\n## What ran\n\n")
    sweep = ", ".join(cfg.get("sweep") or []) or "none"
    sizes = ", ".join(format_size(s) for s in cfg["sizes"])
    L.append(
        f"* Two agents on this machine (a LocalCluster, loopback). Each migration: launch the app on agent a, "
        f"fill {cfg['fill']:.0%} of its heap inside the enclave, start the workload's client driver, wait "
        f"{cfg['settle_s']:g} s, migrate to agent b, wait {cfg['settle_s']:g} s, stop the driver, check, stop the enclave.\n"
        f"* Variants {', '.join(cfg['variants'])}, interleaved within each repeat; {cfg['repeat']} repeat(s) per point; "
        "tables give the median [min-max] over repeats.\n"
        f"* Size sweep: {sweep} at {sizes} (the slopes come from these). Workload matrix: every workload "
        f"({', '.join(cfg['workloads'])}) at {format_size(ws)}. Why not every workload at every size: on this "
        "2-vCPU machine one migration cycle (launch, fill, migrate, check) takes 5-30 s, so the full grid "
        "would not fit in the half hour the suite is meant to take; `--sweep all` runs it anyway.\n"
        "* Client drivers: kvstore is read by a hammer (one `get` per call over 2000 keys it wrote first); the "
        "other workloads have their `step` ECALL called in a loop (loadgen.StepDriver). `client gap` is the "
        "longest wait between two answered calls; client ops/s counts the operations the answered calls did.\n"
        "* Machine stops: on this VM the hypervisor stops a vCPU for ~100 ms whenever both are busy long enough "
        "(steal time), and every process queued on it waits, whatever the variant. A probe process notes each "
        "stop with its steal (bench/stalls.py; `machine_stalls` per run in results.json); `gap, machine stops "
        "out` is the longest client gap with the stopped time taken out of every gap (gaps under 20 ms are "
        "not kept one by one, so it reads 20 at least once a longer gap shrinks). The gap as measured stays "
        "`client gap`.\n"
        "* Verified: kvstore's state checksum is the same after the migration and every answer was the value "
        "written; the step workloads change state with every step, so an in-process twin (same heap geometry and "
        "fill seed, checked equal to the enclave before) replays every acknowledged step: each must answer the same, "
        "and the migrated state's checksum must equal the twin's. No client call may fail.\n"
        "* Phase timestamps (timeline plots, `phases` in results.json) are seconds since the migrate request: "
        "`prepared` from the agent's prepare time, `resumed` at the source's `handed_off` progress event "
        "(sent on the destination's READY, one message before it resumes), `stop` = resumed - downtime (timed "
        "inside the enclaves), `done` = attestation start + the enclaves' migrate time.\n")
    if cfg.get("skipped"):
        for v, why in cfg["skipped"].items():
            L.append(f"* **{v} was not run**: {why}\n")
    L.append(stream_section(doc))
    L.append(f"\n## Headline: {hw} across heap sizes\n\n")
    L.append(headline_table(doc, hw) + "\n")
    dt_fits = {f["variant"]: f for f in fits if f["workload"] == hw and f["measure"] == "downtime_ms" and "slope" in f}
    if dt_fits:
        parts = []
        for v, f in dt_fits.items():
            se = f" ± {f['slope_se']:.2g}" if f.get("slope_se") is not None else ""
            parts.append(f"{v} {f['slope']:.3g}{se} ms/GiB")
        L.append("\nDowntime slope against heap size (least squares over every run): " + "; ".join(parts) + ".\n")
    L.append("\n" + _img(made, "downtime", "downtime against heap size"))
    L.append(_img(made, "total", "total migration time"))
    L.append(f"\n## Per workload at {format_size(ws)}\n\n")
    L.append(workload_table(doc, ws) + "\n")
    L.append("\n" + _img(made, "workloads", "downtime per workload"))
    rounds, whys = rounds_table(doc)
    if rounds:
        L.append("\n## Rounds and throttle\n\n")
        L.append("Every (workload, size, variant) that sent pre-copy rounds. The chunks and throttle per round, what "
                 "was left at the stop (sent with the small state, or missing at a post-copy switch) and the dirty "
                 "rate are the run with the median downtime (the figure the rounds aim at); rounds, why they ended, "
                 "the calls the throttle held and auto's decision are over every repeat (a count per answer where "
                 "they differ). The throttle is the share by which the enclave cut the app's rate of newly written "
                 "chunks in that round (it holds the calls that write; reads keep their pace; held calls / held s "
                 "are those waits, per migration); the dirty rate is chunks the app wrote again per second, "
                 "unthrottled (measured in the first round that did not shrink) and in the last round.\n\n")
        L.append(rounds + "\n")
        if whys:
            L.append("\n<details><summary>auto's reasons (the median run)</summary>\n\n")
            L.append("".join(f"* {x}\n" for x in whys))
            L.append("\n</details>\n")
    L.append("\n## Throughput through a migration\n\n")
    L.append("The client driver's operations per second in buckets of at least 100 ms (a bucket closes at the "
             "first answered call after 100 ms, so a long wait shows as one long, low bucket); red band and line: "
             "the stop and the downtime (a few ms for post-copy, so mostly a line); green band: the heap streaming "
             "behind the resumed app; grey dashed: destination ready.\n\n")
    L.append(_img(made, "timeline", "throughput timeline"))
    extra = [k for k in made if k.startswith("timeline_")]
    if extra:
        L.append("\n<details><summary>every workload</summary>\n\n")
        for k in extra:
            L.append(_img(made, k, k.replace("timeline_", "timeline ")))
        L.append("\n</details>\n")
    L.append("\n## Demand-fault latency\n\n")
    L.append("From the first access that needed a missing chunk until its bytes were in place (Fault Tracker: "
             "until the awaited piece was installed; Access Tracker: until the whole chunk was), per tracker. "
             "The destination sends a histogram (10 log bins per decade) with its figures, so the curves carry "
             "every fault, not only p50/p99.\n\n")
    L.append(fault_summary(doc) + "\n\n")
    L.append(_img(made, "faults", "fault latency CDF"))
    L.append("\n### Where a demand fault's time goes\n\n")
    L.append("Each waited-for chunk's time cut into segments, timed where they happen: *queued* at the destination "
             "from the access's first wait until its demand went out; *out and back* from then until the chunk's "
             "first record came back on the demand channel (the wire both ways plus the source's service); the "
             "source's *service* from a demand's arrival to its first record sent (timed at the source, so the "
             "wire is roughly out-and-back minus service); *installed* from the first record's arrival until "
             "the access could go on (verify, copy into place, wake). Every post-copy run (ConstMig and hybrid), "
             "all repeats; p50/p99 are histogram bin upper edges.\n\n")
    L.append(segment_summary(doc) + "\n\n")
    floor = (doc.get("raw") or {}).get("floor") or {}
    if "demand_fault_us" in floor:
        f, t = floor["demand_fault_us"], floor["tcp_pingpong_us"]
        L.append(f"The floor (`constmig bench raw`, same run): the same hops with nothing else running (an app "
                 f"faulting, a pager asking a source over TCP for a sealed 64 KiB piece and installing it) took "
                 f"p50 {f['p50'] / 1e3:.2f} ms, p99 {f['p99'] / 1e3:.2f} ms; one bare TCP round trip between two "
                 f"processes p50 {t['p50'] / 1e3:.3f} ms. What a migration's faults take beyond the floor is "
                 "contention: the background stream, the app and the clients on the same cores.\n\n")
    L.append(_img(made, "segments", "demand segments CDF"))
    L.append("\n## Growth with heap size\n\n")
    L.append(slope_table(fits) + "\n\n" if fits else "No size sweep in this run.\n\n")
    L.append(_img(made, "growth", "growth with heap size"))
    L.append("\n## Tracker overhead outside migration\n\n")
    ov = doc.get("overhead")
    if ov:
        L.append(
            f"In-process, on copies of one filled app ({format_size(ov['heap_bytes'])} heap) that differ only in the "
            f"tracker; round-robin over the modes, {ov['rounds']} timed rounds of about {ov['round_s']:g} s each after a "
            "warm-up round; each cell is the median over rounds of the mode's throughput divided by plain's in the "
            "same round, [min-max]. The copies run the same units of work (kvstore: 100 `get` and 10 `put` calls; "
            "others: one `step`) with the same seeds, and must give the same answers. Modes: "
            "*Access Tracker armed (complete)* = TrackedArrays with every chunk present (what the app would pay "
            "if the runtime did not untrack it after the stream; it does); *streaming path* = the tracker held in "
            "its streaming state with every chunk present (the per-access tax while a heap streams in, without "
            "waiting); *Fault Tracker armed* = a populated heap registered with userfaultfd (MISSING) and a pager "
            "standing by (the kernel only involves userfaultfd on a missing page).\n\n")
        if ov.get("fault_skipped"):
            L.append(f"Fault Tracker overhead not measured: {ov['fault_skipped']}.\n\n")
        L.append(overhead_table(ov) + "\n\n")
        L.append(_img(made, "overhead", "tracker overhead"))
    else:
        L.append("Not measured in this run (`--no-overhead`).\n")
    L.append("\n## What looked wrong\n\n")
    found = anomalies(doc)
    L.append("\n".join(f"* {a}" for a in found) + "\n" if found else "Nothing: every migration verified, no client "
             "error, no outlier.\n")
    return "".join(L)


def summary_bullets(doc: dict[str, Any], fits: list[dict[str, Any]]) -> list[str]:
    """The run in a few computed sentences (ranges over the (workload, size) groups' medians)."""
    out: list[str] = []
    rows = doc.get("summary", [])
    variants = list(doc["config"]["variants"])

    results = doc["results"]
    n_ok = sum(1 for r in results if r.get("verified"))
    n_err = sum(1 for r in results if "error" in r)
    out.append(f"{len(results)} migrations, {n_ok} verified end to end, {n_err} failed.")
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        downs = [r["downtime_ms"]["median"] for r in mine if r.get("downtime_ms")]
        if not downs:
            continue
        text = f"{v}: median downtime {_range(downs, '{:.1f}')} ms over the {len(downs)} workload/size points"
        ratios = [r["total_vs_stopcopy"] for r in mine if "total_vs_stopcopy" in r]
        if ratios:
            text += f", total time {_range(ratios, '{:.2f}')}x stop-and-copy's"
        gaps = [r["client_gap_ms"]["median"] for r in mine if r.get("client_gap_ms")]
        if gaps:
            text += f", longest client gap {_range(gaps, '{:.0f}')} ms"
            unfrozen = [r["client_gap_unfrozen_ms"]["median"] for r in mine if r.get("client_gap_unfrozen_ms")]
            if unfrozen and unfrozen != gaps:
                text += f" ({_range(unfrozen, '{:.0f}')} ms with the machine's stops taken out)"
        dips = [r["ops_s_migration"]["median"] / r["ops_s_before"]["median"] for r in mine
                if r.get("ops_s_migration") and r.get("ops_s_before") and r["ops_s_before"]["median"]]
        if dips:
            text += (f"; client throughput from the migration's start until DONE {_range([d * 100 for d in dips], '{:.0f}')}%"
                     " of before")
        during = [r["ops_s_rounds"]["median"] / r["ops_s_before"]["median"] for r in mine
                  if r.get("ops_s_rounds") and r.get("ops_s_before") and r["ops_s_before"]["median"]]
        if during:
            text += f", during the pre-copy rounds {_range([d * 100 for d in during], '{:.0f}')}%"
        out.append(text + ".")
    throttle = throttle_bullet(doc)
    if throttle:
        out.append(throttle)
    hw = headline_workload(doc)
    dt = [f for f in fits if f["workload"] == hw and f["measure"] == "downtime_ms" and "slope" in f]
    if dt:
        out.append(f"Downtime against heap size ({hw}): " + "; ".join(
            f"{f['variant']} {f['slope']:.3g}" + (f" ± {f['slope_se']:.2g}" if f.get("slope_se") is not None else "")
            + " ms/GiB" for f in dt) + ".")
    for tracker, lines in fault_panels(doc).items():
        if "all runs" in lines:
            upper, counts = lines["all runs"]
            p50, p99 = hist_quantile(upper, counts, 0.5), hist_quantile(upper, counts, 0.99)
            out.append(f"{tracker} tracker: {int(counts.sum())} demand faults, p50 under {_n((p50 or 0) / 1e3, 2)} ms, "
                       f"p99 under {_n((p99 or 0) / 1e3, 2)} ms (all runs).")
    ov = doc.get("overhead")
    if ov and ov.get("workloads"):
        for mode in ov["modes"]:
            if mode == "plain":
                continue
            rel = [w["modes"][mode]["relative"] * 100 for w in ov["workloads"] if mode in w["modes"]]
            out.append(f"Outside migration, {ov['mode_labels'][mode]}: {_range(rel, '{:.0f}')}% of plain throughput "
                       "across workloads (median of rounds).")
    return out


def _hist_rows(panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], qs: tuple[float, ...],
               digits: int) -> list[list[str]]:
    """tracker, line, samples and each quantile in ms (histogram bin upper edges), one row per line."""
    return [[tracker, label, str(int(counts.sum())),
             *[_n(v / 1e3, digits) if v else "-" for v in (hist_quantile(upper, counts, q) for q in qs)]]
            for tracker, lines in panels.items() for label, (upper, counts) in lines.items()]


def fault_summary(doc: dict[str, Any]) -> str:
    rows = _hist_rows(fault_panels(doc), (0.5, 0.9, 0.99), 2)
    if not rows:
        return "No demand fault in this run."
    return table(["tracker", "runs", "faults", "p50 ms (bin upper edge)", "p90 ms", "p99 ms"], rows)


SEGMENTS = (("fault_latency_hist", "whole fault"), ("demand_queued_hist", "queued"),
            ("demand_round_trip_hist", "out and back"), ("source_service_hist", "source service"),
            ("demand_install_hist", "installed"))


def segment_panels(doc: dict[str, Any]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """tracker -> {segment -> merged histogram over every post-copy run with that tracker}."""
    ok = [r for r in _ok(doc["results"]) if r.get("strategy") in ("constmig", "hybrid")]
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for tracker in dict.fromkeys(r.get("tracker") for r in ok):
        mine = [r for r in ok if r.get("tracker") == tracker]
        lines = {label: h for key, label in SEGMENTS if (h := merge_hists([r.get(key) for r in mine])) is not None}
        if len(lines) > 1:
            panels[str(tracker)] = lines
    return panels


def segment_summary(doc: dict[str, Any]) -> str:
    rows = _hist_rows(segment_panels(doc), (0.5, 0.99), 3)
    if not rows:
        return "No demand fault with its segments in this run."
    return table(["tracker", "segment", "samples", "p50 ms", "p99 ms"], rows)


def stream_section(doc: dict[str, Any]) -> str:
    """The post-copy streams against this machine's bound (bench raw, same run): median per variant."""
    raw = doc.get("raw")
    if not raw:
        return ""
    bounds = ", ".join(f"{mode} {raw[mode]['raw_gbps']:.2f} GB/s" for mode in MODES if mode in raw)
    rows = []
    for variant in doc.get("config", {}).get("variants", []):
        got = [r["stream_vs_raw"] for r in doc.get("results", [])
               if r.get("variant") == variant and r.get("stream_vs_raw") is not None]
        rates = [r["stream_gbps"] for r in doc.get("results", [])
                 if r.get("variant") == variant and r.get("stream_gbps") is not None]
        if got:
            share = spread(got)
            rows.append([variant, f"{statistics.median(rates):.2f}", f"{share['median']:.0%}",
                         f"{share['min']:.0%}-{share['max']:.0%}"])
    text = (f"\n## The stream against the machine's bound\n\nBound (`constmig bench raw`, same run, "
            f"{format_size(raw['heap_bytes'])}): {bounds}. `stream_gbps` is what a post-copy stream moved "
            "(demanded and background chunks) over its time from the resume to its last chunk, beside an app "
            "that runs and a client that calls; `stream_vs_raw` divides it by the bound of the same way into "
            "the heap (uffd for the Fault Tracker, plain otherwise).\n\n")
    if rows:
        text += table(["variant", "stream GB/s (median)", "stream_vs_raw (median)", "range"], rows) + "\n"
    return text


def write_report(doc: dict[str, Any], out: Path) -> dict[str, Any]:
    """Plots and report.md in `out`; returns the analysis (slopes, plots, anomalies) for results.json."""
    fits = slopes(doc)
    made = make_plots(doc, out, fits)
    (out / "report.md").write_text(render(doc, made, fits))
    return {"slopes": fits, "plots": made, "anomalies": anomalies(doc)}


def main(argv: list[str] | None = None) -> None:
    """`python -m constmig.bench.report DIR`: redraw the plots and report.md from DIR/results.json."""
    import json
    import sys


    out = Path((argv or sys.argv[1:] or ["."])[0])
    doc = json.loads((out / "results.json").read_text())
    doc["analysis"] = write_report(doc, out)
    (out / "results.json").write_text(dumps(doc))
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
