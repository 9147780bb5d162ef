"""Migration records and drain marks in etcd (host/records.py says what they hold): written once by
who asks, then changed only by compare-and-set on the key's mod revision, so two writers never
overwrite each other and a phase never goes back.

Keys under the fleet's prefix: `migrations/{id}`, `drains/{host_id}`, `room/{host_id}` (each agent's
free memory and load, under a lease, for the placement), `settings` (fleet-wide: outbound_per_host).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from constmig.errors import DirectoryError
from constmig.host.directory import Directory, decode_value
from constmig.host.records import Settings
from constmig.host.signing import canonical

CAS_TRIES = 8


@dataclass
class Stored:
    """A record or mark as read: its JSON, and the mod revision a write must compare."""

    key: str
    value: dict[str, Any]
    mod: int


class RecordStore:
    def __init__(self, directory: Directory) -> None:
        self.d = directory

    @staticmethod
    def record_key(rid: str) -> str:
        return f"migrations/{rid}"

    @staticmethod
    def mark_key(host_id: str) -> str:
        return f"drains/{host_id}"

    async def get(self, key: str) -> Stored | None:
        got = await self.d.read(key)
        return None if got is None else Stored(key, decode_value(got[0]), got[1])

    async def create(self, key: str, value: dict[str, Any]) -> bool:
        """Write a new record or mark; False if the key exists."""
        return await self.d.write_if(key, canonical(value), 0)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        """Write a mark whatever was there (a new drain of the same host replaces the old mark)."""
        await self.d.write(key, canonical(value))

    async def update(self, key: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Stored | None:
        """Apply `change` to the stored value by compare-and-set, reading again when another writer came
        first. `change` returns the new value, or None to leave it. None if the key is gone."""
        for _ in range(CAS_TRIES):
            now = await self.get(key)
            if now is None:
                return None
            new = change(now.value)
            if new is None:
                return now
            if await self.d.write_if(key, canonical(new), now.mod):
                return await self.get(key)
        raise DirectoryError(f"{key} kept changing under {CAS_TRIES} writes in a row; giving up this once")

    async def delete(self, key: str) -> bool:
        now = await self.get(key)
        return now is not None and await self.d.delete_if(key, now.mod)

    async def records(self, prefix: str = "") -> list[Stored]:
        """Every record whose id starts with `prefix` (a source host's: `"{host_id}."`)."""
        found = await self.d.read_prefix(f"migrations/{prefix}")
        return [Stored(self.record_key(prefix + k), decode_value(v), mod) for k, (v, mod) in sorted(found.items())]

    async def marks(self) -> dict[str, Stored]:
        found = await self.d.read_prefix("drains/")
        return {k: Stored(self.mark_key(k), decode_value(v), mod) for k, (v, mod) in found.items()}

    async def rooms(self) -> dict[str, dict[str, Any]]:
        return {k: decode_value(v) for k, (v, _) in (await self.d.read_prefix("room/")).items()}

    async def settings(self) -> Settings:
        got = await self.d.read("settings")
        return Settings.from_obj({} if got is None else decode_value(got[0]))
