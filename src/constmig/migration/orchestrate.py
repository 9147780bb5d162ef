"""Driving one migration from the outside: ask the source agent, show progress, check the result."""

from __future__ import annotations

from typing import Any

from constmig.host.client import EnclaveClient, request
from constmig.progress import MigrationProgress


def migrate(name: str, src: str, dst: str, strategy: str, timeout: float = 120.0,
            on_progress: Any = None) -> dict[str, Any]:
    """One migration; returns the source's figures plus throughput."""
    figures = request(src, {"op": "migrate", "name": name, "to": dst, "strategy": strategy, "timeout": timeout},
                      on_progress=on_progress, timeout=None)
    if figures.get("total_s"):
        figures["throughput_gbps"] = figures["state_bytes"] / figures["total_s"] / 1e9
    return figures


def migrate_with_progress(name: str, src: str, dst: str, strategy: str, timeout: float = 120.0,
                          verify: bool = False, quiet: bool = False) -> dict[str, Any]:
    """migrate(), with a progress bar and an optional checksum comparison before/after."""
    before = EnclaveClient(src, name).call("checksum") if verify else None
    with MigrationProgress(f"migrating {name} ({strategy})", quiet=quiet) as bar:
        figures = migrate(name, src, dst, strategy, timeout, on_progress=bar.update)
    if verify:
        after_client = EnclaveClient(dst, name)
        try:
            figures["verified"] = after_client.call("checksum") == before
        finally:
            after_client.close()
    return figures
