"""What every benchmark's results file shares: the machine it ran on, variant names, the
median/min/max summary with ratios to stop-and-copy, and the JSON layout."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from constmig.bench.stats import spread
from constmig.errors import ConfigError
from constmig.migration.strategies import ROUNDS
from constmig.migration.strategies.auto import AUTO_MAX_THROTTLE

CPU_FLAGS = ("aes", "avx", "avx2", "avx512f", "sha_ni", "vaes", "pclmulqdq", "hypervisor", "sgx", "sev",
             "tdx_guest", "pdpe1gb")  # what a reader of the suite's numbers needs to place them


def machine_info(detail: bool = False) -> dict[str, Any]:
    """Cores, kernel, Python, memory, AES-NI; with `detail` (the suite) also the CPU model, a few of its
    flags and transparent huge pages."""
    model, flags = "", ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    info = {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "aes_ni": " aes " in f" {flags} ", "machine": platform.machine()}
    if detail:
        info["cpu_model"] = model
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags.split()]
        with contextlib.suppress(OSError):
            info["thp"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    return info


# Named sets of request options a variant can carry after a "+": "precopy+throttle" is pre-copy whose rounds
# may slow the writing calls up to auto's cap (strategies/auto.py AUTO_MAX_THROTTLE), so it needs a strategy
# that runs them; "+native" moves the heap's chunks through the native engine (docs/native.md): the bulk sends
# (the copy at the stop, the rounds) and the post-copy stream at both ends, so every strategy takes it.
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {"throttle": {"max_throttle": AUTO_MAX_THROTTLE},
                                              "native": {"data_plane": "native"}}
BULK_OPTIONS = ("native",)  # option sets that need chunks sent in bulk, not rounds
# the ones `bench suite --help` lists (any variant takes a suffix its strategy fits)
OPTION_VARIANTS = ("precopy+throttle", "stopcopy+native", "auto-fault+native", "constmig-fault+native")


def split_variant(variant: str) -> tuple[str, str]:
    """"constmig-fault" -> ("constmig", "fault"); "stopcopy" -> ("stopcopy", "auto") (no tracker is used);
    "hybrid-fault+throttle" -> ("hybrid", "fault") (the options after "+" are variant_options')."""
    strategy, _, tracker = variant.partition("+")[0].partition("-")
    return strategy, tracker or "auto"


def variant_options(variant: str) -> dict[str, Any]:
    """The request options a variant's "+name" suffixes carry (VARIANT_OPTIONS), merged in order; {} without
    one. ConfigError (one line) for an unknown name, or a strategy without the rounds (or bulk sends) it steers."""
    base, *names = variant.split("+")
    options: dict[str, Any] = {}
    for name in names:
        if name not in VARIANT_OPTIONS:
            raise ConfigError(f"unknown variant option {'+' + name!r} in {variant!r}; known: "
                              f"{', '.join('+' + k for k in VARIANT_OPTIONS)}")
        options.update(VARIANT_OPTIONS[name])
    strategy = split_variant(base)[0]
    rounds = [n for n in names if n not in BULK_OPTIONS]
    if rounds and strategy not in ROUNDS:
        raise ConfigError(f"{variant!r}: {'+'.join(rounds)} steers pre-copy rounds, which "
                          f"{strategy} does not run (those that do: {', '.join(ROUNDS)})")
    return options


def base_variant(variant: str) -> str:
    """The variant without its option suffixes: "precopy+throttle" -> "precopy"."""
    return variant.partition("+")[0]


SUMMARY_KEYS = ("downtime_ms", "total_s", "stream_s", "client_gap_ms", "fault_latency_us_p50",
                "fault_latency_us_p99", "demand_chunks")


def summarize(results: list[dict[str, Any]], keys: tuple[str, ...] = SUMMARY_KEYS) -> list[dict[str, Any]]:
    """Median [min, max] per (variant, heap), and each variant's ratios to stop-and-copy's medians."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r.get("variant", r["strategy"]), r["heap_bytes"]), []).append(r)
    rows = []
    for (variant, heap), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {"variant": variant, "strategy": rs[0]["strategy"], "tracker": rs[0].get("tracker"),
                               "heap_bytes": heap, "n": len(rs), "all_verified": all(r.get("verified") for r in rs)}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                row[k] = spread(vals)
        rows.append(row)
    base = {r["heap_bytes"]: r for r in rows if r["variant"] == "stopcopy"}
    for r in rows:
        b = base.get(r["heap_bytes"])
        if b is not None and r is not b:
            r["downtime_vs_stopcopy"] = r["downtime_ms"]["median"] / b["downtime_ms"]["median"]
            r["total_vs_stopcopy"] = r["total_s"]["median"] / b["total_s"]["median"]
    return rows


_INNER_LIST = re.compile(r"\[\n\s*([^\[\]{}]*?)\n\s*\]")  # raw newlines only occur between JSON tokens


def dumps(doc: dict[str, Any]) -> str:
    """Indented JSON with innermost lists on one line (a timeline is one [t, ops/s] pair per line)."""
    return _INNER_LIST.sub(lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]",
                           json.dumps(doc, indent=1)) + "\n"
