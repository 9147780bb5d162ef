"""Driving one migration from the outside: ask the source agent, show progress, check the result."""

from __future__ import annotations

from typing import Any

from constmig.client import EnclaveClient, Trust, pin_now
from constmig.host.client import request
from constmig.progress import MigrationProgress
from constmig.wire import control


def migrate(name: str, src: str, dst: str, strategy: str = control.DEFAULT_STRATEGY,
            timeout: float = control.DEFAULT_TIMEOUT_S, on_progress: Any = None, tracker: str = control.DEFAULT_TRACKER,
            max_bandwidth: float = 0.0, resume_deadline: float | None = None, **options: Any) -> dict[str, Any]:
    """One migration; returns the source's figures plus throughput. `options`: the request's others
    (control.Migrate: max_downtime, max_rounds, write_tracking, max_throttle, completion_timeout for the
    rounds, data_plane for who sends the bulk chunks; None leaves one at its default).

    `resume_deadline` (seconds; the default if None, 0 = never) bounds how long a migration that broke
    after its handoff keeps reconnecting before it fails (the source keeps its state)."""
    if resume_deadline is not None:
        options["resume_deadline"] = resume_deadline
    req = control.Migrate(name=name, to=dst, strategy=strategy, tracker=tracker, timeout=timeout,
                          max_bandwidth=max_bandwidth, **{k: v for k, v in options.items() if v is not None})
    figures = request(src, req, on_progress=on_progress, timeout=None)
    if figures.get("migrate_s"):  # attestation to DONE: the enclaves' own transfer rate
        figures["throughput_gbps"] = figures["state_bytes"] / figures["migrate_s"] / 1e9
    return figures


def migrate_with_progress(name: str, src: str, dst: str, strategy: str = control.DEFAULT_STRATEGY,
                          timeout: float = control.DEFAULT_TIMEOUT_S,
                          verify: bool = False, quiet: bool = False, tracker: str = control.DEFAULT_TRACKER,
                          max_bandwidth: float = 0.0, resume_deadline: float | None = None,
                          trust: Trust | None = None, **options: Any) -> dict[str, Any]:
    """migrate(), with a progress bar and an optional checksum comparison before/after. Both checksums are
    read from the instance `trust` pins (default: the user's pins, pinned on first use): a copy the host
    runs under the name cannot stand in for the enclave on either side."""
    trust = trust if trust is not None else Trust.default() if verify else None
    before = app_checksum(src, name, trust) if verify else None
    with MigrationProgress(f"migrating {name} ({strategy})", quiet=quiet) as bar:
        figures = migrate(name, src, dst, strategy, timeout, on_progress=bar.update, tracker=tracker,
                          max_bandwidth=max_bandwidth, resume_deadline=resume_deadline, **options)
    if verify:
        figures["verified"] = app_checksum(dst, name, trust) == before
    return figures


def resume(name: str, src: str, timeout: float = control.DEFAULT_TIMEOUT_S,
           resume_deadline: float = control.RESUME_DEADLINE_S, on_progress: Any = None) -> dict[str, Any]:
    """Resume a migration out of `src` that paused after its handoff and gave up reconnecting."""
    return request(src, control.Resume(name=name, timeout=timeout, resume_deadline=resume_deadline),
                   on_progress=on_progress, timeout=None)


def app_checksum(addr: str, name: str, trust: Trust | None = None) -> str:
    """The app's own state digest, asked through an agent (redirects followed), of the instance `trust`
    pins (default: the user's pins)."""
    c = EnclaveClient(addr, name, trust=trust)
    try:
        return c.call("checksum")
    finally:
        c.close()


def launch_filled(addr: str, name: str, app: str, heap: int, fill: float, seed: int = 0,
                  client_keys: int = 0, chunk_size: int = 1 << 20, trust: Trust | None = None) -> dict[str, bytes]:
    """Start an app on an agent, pin the new instance in `trust` (as `run` then `trust` would; default: the
    user's pins), fill its heap inside the enclave, and (kvstore) write client keys.

    Returns the client-written keys and values, for checking after a migration.
    """
    request(addr, control.Run(name=name, app=app, heap=heap, chunk_size=chunk_size))
    trust = trust if trust is not None else Trust.default()
    pin_now(addr, name, trust)
    c = EnclaveClient(addr, name, trust=trust)
    written: dict[str, bytes] = {}
    try:
        c.call("fill", fill, seed)
        if app == "kvstore":
            for i in range(client_keys):
                key, value = f"client-{i}", f"value-{i}-{'x' * (i % 50)}"
                c.call("put", key, value)
                written[key] = value.encode()
    finally:
        c.close()
    return written
