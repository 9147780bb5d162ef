"""What the CLI writes into the fleet's store and reads back: drain marks (`constmig drain/undrain
--etcd`), cancels of migration records (`constmig migrations cancel`), and a drain followed to its end.

Each write is signed (host/signing.py) by the host's own certificate when that agent runs on this
machine, as the CLI uses its local socket, else by this user's operator certificate; the agents act on
nothing else. The CLI may die at any time after the mark is written: the host's agent carries the drain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from constmig.errors import ConfigError, ConstmigError
from constmig.host import records
from constmig.host.address import parse_addr
from constmig.host.directory import Directory, blocking
from constmig.host.fleetwork import abort_payload
from constmig.host.record_store import RecordStore, Stored
from constmig.host.signing import sign, signing_identity

FOLLOW_EVERY_S = 0.3


@dataclass
class Target:
    """A host named on the command line: its id, and its address if its agent is in the directory."""

    host_id: str
    addr: str | None


def find_host(d: Directory, text: str) -> Any:
    async def work() -> Target:
        hosts = await d.hosts()
        for addr, entry in hosts.items():
            if entry.get("host_id") == text:
                return Target(text, addr)
        try:
            key = parse_addr(text)
        except ConfigError:
            key = None
        for addr, entry in hosts.items():
            if key is not None and parse_addr(addr) == key:
                return Target(str(entry.get("host_id")), addr)
        if key is not None:
            raise ConfigError(f"no agent at {text} in the fleet directory at {d.url}: name a host that left it by "
                              "its host id")
        if not any(e.get("host_id") == text for e in (await d.agents()).values()):
            raise ConfigError(f"no host {text!r} has ever joined the fleet directory at {d.url}")
        return Target(text, None)  # a host that left the directory: by its id
    return work()


def resolve(url: str, text: str) -> Target:
    return blocking(url, lambda d: find_host(d, text))


def write_mark(url: str, target: Target, parallel: int, strategy: str, options: dict[str, Any]) -> records.MarkSpec:
    """Sign and write the drain mark on `target` (replacing an older one); returns it."""
    ident = signing_identity(target.addr)
    spec = records.MarkSpec(os.urandom(6).hex(), target.host_id, parallel, strategy, options,
                            f"{ident.role} {ident.name}", time.time())
    value = {"spec": spec.as_dict(), "signature": sign(ident, spec.as_dict()), "status": {"state": "written"}}
    blocking(url, lambda d: RecordStore(d).put(RecordStore.mark_key(target.host_id), value))
    return spec


def clear_mark(url: str, host_id: str) -> bool:
    """Delete the drain mark on `host_id` (its agent cancels the moves not started); False if none."""
    return blocking(url, lambda d: RecordStore(d).delete(RecordStore.mark_key(host_id)))


def marks(url: str) -> dict[str, dict[str, Any]]:
    """Every drain mark: host id -> {"spec", "status"}."""
    async def work(d: Directory) -> dict[str, dict[str, Any]]:
        return {k: s.value for k, s in (await RecordStore(d).marks()).items()}
    return blocking(url, work)


def all_records(url: str, prefix: str = "") -> list[dict[str, Any]]:
    async def work(d: Directory) -> list[Stored]:
        return await RecordStore(d).records(prefix)
    return [s.value for s in blocking(url, work)]


def one_record(url: str, rid: str) -> dict[str, Any]:
    _plain(rid)
    got = blocking(url, lambda d: RecordStore(d).get(RecordStore.record_key(rid)))
    if got is None:
        raise ConfigError(f"no migration record {rid!r} in the fleet directory at {url}")
    return got.value


def _plain(rid: str) -> bool:
    try:
        records.check_id(rid)
    except ValueError:
        raise ConfigError(f"bad migration id {rid!r}") from None
    return True


def cancel(url: str, rid: str) -> dict[str, Any]:
    """Sign and write `abort` on record `rid`; the source agent acts on it. Returns the record."""
    rec = one_record(url, rid)
    spec = rec.get("spec") or {}
    if records.phase_of(rec.get("status") or {}) in records.FINAL:
        raise ConfigError(f"migration {rid} is over ({records.phase_of(rec['status']).value}): nothing to cancel")
    source = resolve(url, str(spec.get("source", "")))
    ident = signing_identity(source.addr)
    at = time.time()
    abort = {"at": at, "by": f"{ident.role} {ident.name}", "signature": sign(ident, abort_payload(rid, at))}

    async def work(d: Directory) -> Any:
        return await RecordStore(d).update(RecordStore.record_key(rid), lambda v: {**v, "abort": abort})
    blocking(url, work)
    return one_record(url, rid)


@dataclass
class DrainFollow:
    """What `drain --wait` saw: the mark's last status, and each enclave's newest record of this drain."""

    state: str = ""
    reason: str = ""
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)


def follow(url: str, host_id: str, mark_id: str, on_record: Callable[[dict[str, Any]], None],
           timeout: float | None = None) -> DrainFollow:
    """Read the mark and its records until the host is drained (or stuck, refused, cleared)."""
    seen = DrainFollow()
    deadline = None if timeout is None else time.monotonic() + timeout

    async def look(d: Directory) -> tuple[Stored | None, list[Stored]]:
        store = RecordStore(d)
        return await store.get(RecordStore.mark_key(host_id)), await store.records(f"{host_id}.")

    while True:
        mark, recs = blocking(url, look)
        for s in recs:
            spec = s.value.get("spec") or {}
            if spec.get("drain") == mark_id:
                name = str(spec.get("enclave"))
                old = seen.latest.get(name)
                if old is None or (old.get("spec") or {}).get("created", 0) <= spec.get("created", 0):
                    seen.latest[name] = s.value
                    on_record(s.value)
        if mark is None or (mark.value.get("spec") or {}).get("id") != mark_id:
            seen.state, seen.reason = "cleared", "the drain mark was cleared or replaced"
            return seen
        st = mark.value.get("status") or {}
        seen.state, seen.reason = str(st.get("state", "")), str(st.get("reason", ""))
        if seen.state in ("drained", "stuck", "refused"):
            return seen
        if deadline is not None and time.monotonic() > deadline:
            raise ConstmigError(f"host {host_id} is still draining ({seen.reason or seen.state}); follow it with "
                                f"`constmig migrations ls`")
        time.sleep(FOLLOW_EVERY_S)
