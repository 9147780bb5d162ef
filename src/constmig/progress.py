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

    def __enter__(self) -> MigrationProgress:
        if not self.quiet:
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def update(self, info: dict[str, Any]) -> None:
        if self._task is None:
            return
        phase = info.get("phase", "")
        self._progress.update(self._task, completed=info.get("done", 0), total=info.get("total") or None,
                              description=f"{self.label} [{phase}]")

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self._progress.stop()


FIGURE_LABELS = [
    ("strategy", "strategy", "{}"),
    ("workload", "workload", "{}"),
    ("heap_bytes", "heap", "{:,} B"),
    ("state_bytes", "state moved", "{:,} B"),
    ("downtime_ms", "downtime", "{:.1f} ms"),
    ("total_s", "total time", "{:.3f} s"),
    ("wire_bytes", "bytes on the wire", "{:,}"),
    ("throughput_gbps", "throughput", "{:.2f} GB/s"),
    ("verified", "verified", "{}"),
]


def print_figures(figures: dict[str, Any]) -> None:
    table = Table(title="migration figures", show_header=False)
    for key, label, fmt in FIGURE_LABELS:
        if key in figures:
            table.add_row(label, fmt.format(figures[key]))
    console.print(table)
