"""What a person watching a migration sees: a rich progress bar while it runs, a table after."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

console = Console(stderr=True)


class MigrationProgress:
    """Feeds agent progress frames into a rich bar; a no-op when quiet."""

    def __init__(self, label: str, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeElapsedColumn(), console=console, transient=False,
        )
        self._task = None
        self.label = label
        self._rounds = ""  # what the last round left, while the next one runs

    def __enter__(self) -> MigrationProgress:
        if not self.quiet:
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def update(self, info: dict[str, Any]) -> None:
        if self._task is None:
            return
        phase = info.get("phase", "")
        if phase == "handed_off":  # a marker, not a byte count: keep the bar where it is
            self._progress.update(self._task, description=f"{self.label} [resumed at destination]")
            return
        if phase == "round_end":  # what the round left: the bar stays, the line says how it converges
            self._rounds = round_line(info)
            self._progress.update(self._task, description=f"{self.label} [{self._rounds}]")
            return
        detail = phase
        if phase == "round":
            detail = f"round {info.get('round')} while running" + (f"; {self._rounds}" if self._rounds else "")
        elif phase == "stream":
            detail = f"stream: {info.get('background', 0)} background, {info.get('demand', 0)} on demand"
        self._progress.update(self._task, completed=info.get("done", 0), total=info.get("total") or None,
                              description=f"{self.label} [{detail}]")

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self._progress.stop()


def round_line(info: dict[str, Any]) -> str:
    """A round's end in one line: what is left, how fast the app writes it, how fast the link takes it."""
    mib = 1 << 20
    line = (f"round {info.get('round')}: {info.get('left', 0) / mib:.1f} MiB left, written at "
            f"{info.get('dirty_rate', 0) / mib:.1f} MiB/s, sent at {info.get('rate', 0) / mib:.1f} MiB/s")
    throttle = info.get("throttle") or 0
    return line + (f", writers held to {1 - throttle:.0%} of their pace" if throttle else "")


FIGURE_LABELS = [
    ("strategy", "strategy", "{}"),
    ("tracker", "tracker", "{}"),
    ("tracker_reason", "tracker chosen", "{}"),
    ("workload", "workload", "{}"),
    ("heap_bytes", "heap", "{:,} B"),
    ("state_bytes", "state moved", "{:,} B"),
    ("downtime_ms", "downtime", "{:.1f} ms"),
    ("total_s", "total time", "{:.3f} s"),
    ("stream_s", "streaming after resume", "{:.3f} s"),
    ("rounds", "pre-copy rounds", "{}"),
    ("precopy_s", "pre-copy while running", "{:.3f} s"),
    ("rounds_ended", "rounds ended", "{}"),
    ("final_chunks", "chunks sent at the stop", "{:,}"),
    ("missing_at_switch", "chunks missing at the switch", "{:,}"),
    ("background_chunks", "chunks by background", "{:,}"),
    ("demand_chunks", "chunks on demand", "{:,}"),
    ("fault_latency_us_p50", "fault latency p50", "{:.0f} us"),
    ("fault_latency_us_p99", "fault latency p99", "{:.0f} us"),
    ("client_gap_ms", "longest client gap", "{:.1f} ms"),
    ("wire_bytes", "bytes on the wire", "{:,}"),
    ("throughput_gbps", "throughput", "{:.2f} GB/s"),
    ("verified", "verified", "{}"),
]


# Names and addresses are never cut short with "…": an enclave's name folds over lines if it must; an
# address column stays on one line, as wide as its longest address, while the address columns take at
# most ADDRESS_SHARE of the console's width (the other columns wrap to make room), and folds beyond that.
FOLD: dict[str, Any] = {"overflow": "fold"}
ADDRESS_SHARE = 0.6


def whole(values: Any, header: str, columns: int = 1, width: int | None = None) -> dict[str, Any]:
    """Column settings for one of `columns` address columns (of `values`) on a console `width` wide."""
    longest = max([len(header), *(len(str(v)) for v in values)])
    room = (width or Console().width) * ADDRESS_SHARE / columns
    return {"no_wrap": True, "overflow": "fold"} if longest <= room else FOLD


def print_figures(figures: dict[str, Any]) -> None:
    table = Table(title="migration figures", show_header=False)
    for key, label, fmt in FIGURE_LABELS:
        if key in figures:
            table.add_row(label, fmt.format(figures[key]))
    console.print(table)


def print_status(st: dict[str, Any]) -> None:
    """An agent's status for people: its enclaves, where the moved ones went, its last migrations."""
    import time

    from constmig.units import format_size

    out = Console()  # the answer to `status` goes to stdout
    table = Table(title=f"agent {st.get('host_id')} at {st.get('listen')}")
    for col in ("enclave", "state", "app", "heap", "used", "tracker", "sessions", "platform"):
        table.add_column(col, **(FOLD if col in ("enclave", "platform") else {}))
    for name, e in sorted(st.get("enclaves", {}).items()):
        state = e.get("state") or e.get("status", "?")
        if e.get("heap_arriving"):
            got, of = e["heap_arriving"]
            state += f" (heap arriving {got}/{of})"
        table.add_row(name, state, str(e.get("app", "")), format_size(int(e.get("heap_bytes") or 0)),
                      format_size(int(e["used_bytes"])) if e.get("used_bytes") is not None else "",
                      str(e.get("tracker", "")), str(e.get("sessions", "")), str(e.get("platform", "")))
    moved = sorted(st.get("moved", {}).items())
    for name, _ in moved:
        table.add_row(name, "moved", "", "", "", "", "", "")
    died = st.get("died") or {}
    for name, d in sorted(died.items()):
        table.add_row(name, "died", str(d.get("app", "")),
                      format_size(int(d.get("heap_bytes") or 0)), "", "", "", "")
    out.print(table)
    for name, where in moved:  # an address on a line of its own: never cut by the table's width
        out.print(f"{name}: moved to {where}", soft_wrap=True)
    for name, d in sorted(died.items()):
        out.print(f"{name}: restore with `{d['restore']}`" if d.get("restore") else
                  f"{name}: no checkpoint of it here; its state is gone", soft_wrap=True)
    for name, e in sorted(st.get("enclaves", {}).items()):
        if e.get("recovery"):  # a migration out stuck past its commit point
            out.print(f"{name}: if its destination lost its copy, {e['recovery']}", soft_wrap=True)
    for name, p in sorted((st.get("outgoing") or {}).items()):  # a line each: the table stays narrow
        out.print(f"{name}: {outgoing_line(p)}", soft_wrap=True)
    migrations = st.get("migrations") or []
    if migrations:
        hist = Table(title="recent migrations")
        for col in ("when", "enclave", "direction", "strategy", "outcome", "downtime", "total"):
            hist.add_column(col, **(FOLD if col == "enclave" else {}))
        for m in migrations[-10:]:
            when = m.get("resume_time") or m.get("stop_time") or m.get("ended")
            hist.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "",
                         str(m.get("name", "")), str(m.get("direction", "")), str(m.get("strategy", "")),
                         str(m.get("outcome", "")),
                         f"{m['downtime_ms']:.1f} ms" if m.get("downtime_ms") is not None else "",
                         f"{m['total_s']:.2f} s" if m.get("total_s") is not None else "")
        out.print(hist)


def outgoing_line(p: dict[str, Any]) -> str:
    """A migration out while it runs, in one line (status's `outgoing` entry): how long, where it is, what
    is left and how fast it goes."""
    mib = 1 << 20
    parts = [f"migrating to {p.get('to')} ({p.get('strategy')}) for {float(p.get('elapsed_s') or 0):.1f} s"]
    if p.get("round") is not None:
        parts.append(f"round {p['round']}")
    elif p.get("phase"):
        parts.append(str(p["phase"]))
    if p.get("left_bytes") is not None:
        parts.append(f"{p['left_bytes'] / mib:.1f} MiB left")
    if p.get("dirty_bytes_per_s") is not None:
        parts.append(f"written at {p['dirty_bytes_per_s'] / mib:.1f} MiB/s")
    if p.get("ack_bytes_per_s") is not None:
        parts.append(f"acknowledged at {p['ack_bytes_per_s'] / mib:.1f} MiB/s")
    if p.get("throttle"):
        parts.append(f"throttle {p['throttle']:.0%}" + (f" ({p['held_calls']} calls held {p.get('held_s') or 0:.2f} s)"
                                                        if p.get("held_calls") else ""))
    if p.get("eta_s") is not None:
        parts.append(f"~{p['eta_s']:.1f} s to send what is left")
    return ", ".join(parts)


class DrainProgress:
    """A bar for the whole drain (bytes of all its enclaves) and one per enclave while it moves."""

    def __init__(self, title: str, moves: list[Any], quiet: bool = False) -> None:
        self.quiet = quiet
        self.title = title
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  DownloadColumn(binary_units=True), TimeElapsedColumn(), console=console)
        self._heap = {mv.name: mv.heap for mv in moves}
        self._total = sum(self._heap.values())
        self._done: dict[str, int] = {}
        self._tasks: dict[str, Any] = {}
        self._all: Any = None

    def __enter__(self) -> DrainProgress:
        if not self.quiet:
            self._progress.start()
            self._all = self._progress.add_task(f"{self.title}: {len(self._heap)} enclaves", total=self._total)
        return self

    def event(self, name: str, kind: str, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        if kind == "start":
            self._tasks[name] = self._progress.add_task(f"  {name} -> {info['to']}", total=None)
        elif kind == "progress" and info.get("total"):
            share = int(self._heap[name] * min(info.get("done", 0) / info["total"], 1.0))
            self._done[name] = max(self._done.get(name, 0), share)
            self._progress.update(self._tasks[name], completed=info.get("done", 0), total=info["total"])
        elif kind == "end":
            self._done[name] = self._heap[name]
            label = "done" if info.get("ok") else "FAILED"
            self._progress.update(self._tasks[name], description=f"  {name}: {label}", visible=True)
        self._progress.update(self._all, completed=sum(self._done.values()))

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self._progress.stop()


def print_drain(doc: dict[str, Any]) -> None:
    """A drain's or rebalance's final table: where each enclave went, its downtime and time; why each that
    stayed did not move, below it (in full: an error is no table cell). A drain's one source is in its
    title, a rebalance's sources in a column."""
    from constmig.units import format_size

    out = Console()
    table = Table(title=f"{doc['title']}: {doc['wall_s']:.1f} s")
    sources = len({m.get("from") for m in doc["moved"]}) > 1
    cols = ("enclave", *(("from",) if sources else ()), "to", "outcome", "downtime", "total", "moved")
    for col in cols:
        table.add_column(col, **(whole([m.get(col) or "" for m in doc["moved"]], col, 1 + sources, out.width)
                                 if col in ("from", "to") else FOLD if col == "enclave" else {}))
    for m in doc["moved"]:
        table.add_row(m["name"], *((str(m.get("from") or ""),) if sources else ()), m["to"],
                      "moved" if m["ok"] else "stayed",
                      f"{m['downtime_ms']:.1f} ms" if m.get("downtime_ms") is not None else "",
                      f"{m['total_s']:.2f} s" if m.get("total_s") is not None else "",
                      format_size(int(m["state_bytes"])) if m.get("state_bytes") else "")
    out.print(table)
    for m in doc["moved"]:
        if not m["ok"]:
            out.print(f"{m['name']} stayed: {m['error']}", soft_wrap=True)
