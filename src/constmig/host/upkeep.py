"""The agent's entries in the fleet directory (host/directory.py, on etcd): its lease, and where each of
its enclaves runs.

Routing only: clients that find an enclave by name ask the directory, but nothing an enclave does waits
for it. So every failure here is logged, never fatal, and what could not be written is retried by the
upkeep loop (the store was away, or the lease ran out); the one exception is joining at start, where a
mistyped address must not leave an agent silently outside its fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from constmig.errors import AgentError, ConfigError, DirectoryError
from constmig.host.address import parse_addr
from constmig.host.directory import Directory
from constmig.host.roster import Hosted, Roster
from constmig.host.status import Status as S

log = logging.getLogger("constmig.agent")


class Upkeep:
    """This agent in the fleet directory at `etcd` (None: the agent has no directory; every method is a
    no-op then)."""

    def __init__(self, etcd: str | None, ttl: int, listen: str, roster: Roster,
                 info: Callable[[], dict[str, Any]]) -> None:
        self.etcd, self.ttl, self.listen, self.roster, self.info = etcd, ttl, listen, roster, info
        self.directory: Directory | None = None
        self._lease: int | None = None
        self._unsynced: set[str] = set()  # enclaves here whose directory entry may be wrong (the store was away)
        self._task: asyncio.Task[None] | None = None
        self.away = False  # the store did not answer the last refresh (a scrape reads it: constmig_directory_up)

    async def join(self) -> None:
        """Register under a lease (refused start if the store cannot be reached); then keep the lease and
        the entries fresh."""
        if self.etcd is None:
            return
        self.directory = Directory(self.etcd)
        try:
            self._lease = await self.directory.register(self.listen, self.info(), self.ttl)
        except DirectoryError as e:
            await self.directory.close()
            self.directory = None
            raise ConfigError(f"cannot join the fleet directory: {e}") from None
        log.info("joined the fleet directory at %s (lease %x, %d s)", self.etcd, self._lease, self.ttl)
        self._task = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        assert self.directory is not None
        away = False
        while True:
            await asyncio.sleep(max(self.ttl / 3, 0.2))
            try:
                if self._lease is None or not await self.directory.refresh(self._lease):
                    self._lease = await self.directory.register(self.listen, self.info(), self.ttl)
                    log.warning("registered again in the fleet directory (the old lease had run out)")
                    self._unsynced.update(n for n, h in self.roster.enclaves.items() if h.status is S.RUNNING)
                for name in list(self._unsynced):
                    await self.claim(name)
                if away:
                    log.info("the fleet directory at %s answers again", self.etcd)
                away = self.away = False
            except DirectoryError as e:
                if not away:
                    log.warning("%s; retrying every %g s", e, max(self.ttl / 3, 0.2))
                away = self.away = True
            except Exception as e:  # noqa: BLE001 (routing must never stop for good: log it and go on)
                log.error("fleet directory upkeep failed unexpectedly (%s: %s); retrying", type(e).__name__, e)
                away = self.away = True

    def health(self) -> tuple[bool, int] | None:
        """For a scrape: whether the store answered the last refresh, and how many enclaves' entries may
        be wrong until it answers again; None without a directory."""
        if self.etcd is None:
            return None
        return not self.away, len(self._unsynced)

    async def check_free(self, name: str) -> None:
        """Names are fleet-wide with a directory: refuse one that a live agent elsewhere holds."""
        if self.directory is None:
            return
        try:
            at = await self.directory.where(name)
            if at and parse_addr(at) != parse_addr(self.listen) and await self.directory.alive(at):
                raise AgentError(f"the fleet directory says an enclave named {name!r} runs at {at}; names are "
                                 "fleet-wide: pick another name, or stop or move that one first")
        except (DirectoryError, ConfigError) as e:
            log.warning("cannot check the name %s in the fleet directory: %s", name, e)

    async def claim(self, name: str) -> None:
        """Make the directory say `name` runs here (it does): take the entry over if it names nobody, an
        agent that is gone, or the agent this enclave migrated from (its update was lost); leave it if it
        names another live agent. After a migration in, usually the source's update is there already
        (one read)."""
        if self.directory is None:
            return
        hosted = self.roster.enclaves.get(name)
        if hosted is None or hosted.status is not S.RUNNING:
            self._unsynced.discard(name)
            return
        try:
            other = await self.directory.claim(name, self.listen)
            if other is not None and other == hosted.came_from and \
                    await self.directory.move(name, other, self.listen):
                other = None
            self._unsynced.discard(name)
            if other is not None:
                log.warning("the fleet directory says %s runs at %s, a live agent; it runs here: entry left as it "
                            "is (clients that follow it get an error there)", name, other)
        except DirectoryError as e:
            self._unsynced.add(name)
            log.warning("cannot record %s in the fleet directory (retrying): %s", name, e)

    async def moved(self, hosted: Hosted, to: str) -> None:
        """The handoff (source side): the entry goes from here to `to`, only if it still says here."""
        if self.directory is None or hosted.listed_at:
            return
        try:
            if await self.directory.move(hosted.name, self.listen, to):
                hosted.listed_at = to
        except DirectoryError as e:
            log.warning("cannot record the move of %s to %s in the fleet directory: %s", hosted.name, to, e)

    async def sealed(self, name: str, checkpoint: str) -> None:
        """A checkpoint of `name` was sealed here: the entry says so, for `ls` to name should this agent die."""
        if self.directory is None:
            return
        try:
            await self.directory.sealed(name, self.listen, checkpoint)
        except DirectoryError as e:
            log.warning("cannot record the checkpoint of %s in the fleet directory: %s", name, e)

    async def release(self, name: str) -> None:
        self._unsynced.discard(name)
        if self.directory is None:
            return
        try:
            await self.directory.release(name, self.listen)
        except DirectoryError as e:
            log.warning("cannot drop %s from the fleet directory: %s", name, e)

    async def leave(self) -> None:
        """Drop out of the fleet at once, not when the lease runs out."""
        if self._task is not None:
            self._task.cancel()
        if self.directory is not None:
            if self._lease is not None:
                with contextlib.suppress(DirectoryError):
                    await self.directory.deregister(self._lease)
            await self.directory.close()
            self.directory = None

