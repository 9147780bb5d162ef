"""The fleet directory on etcd: which agents are alive, and where each enclave runs.

Untrusted routing, never security. Whoever controls the store can misroute a client (it then gets a
clear error, and an attested session refuses an enclave it does not trust) but cannot make two copies
of an enclave run: only the migration protocol between two enclaves moves one, and nothing in it reads
the directory.

Keys, under a prefix (default /constmig/):
  hosts/<listen>     an agent: {"host_id", "listen", "metrics_url", "since"}, under the agent's lease,
                     so an agent that dies or loses the store drops out when the lease runs out
  agents/<listen>    the agent's last registration, with no lease: kept after it dies, so that its
                     enclaves' entries still say which host and state folder can bring them back
  enclaves/<name>    where it runs: {"at": <listen>, "checkpoint": <its newest there, once sealed>},
                     changed only by transactions that compare the entry's revision, so a late update can
                     never overwrite a newer one

An enclave's entry outlives its agent on purpose: "kv1 was last at B, whose agent is gone" tells a
client more than silence. Its checkpoints restore only on the platform that holds its lineage (that
host), so `constmig ls` lists it as dead with that host's restart and restore commands; `forget` drops
the entry of a dead agent's enclave, and then any agent may take the name (a new instance: pinned
clients tell it from the old one).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from constmig.errors import ConfigError, DirectoryError
from constmig.host import etcd_auth
from constmig.host.etcd_auth import EtcdCredentials

PREFIX = "/constmig/"
OP_TIMEOUT_S = 5.0  # one request to the store; an unreachable store fails within this
LEASE_TTL_S = 10  # an agent's registration lives this long without a refresh

T = TypeVar("T")


def parse_etcd_url(text: str) -> tuple[str, int]:
    """'http://10.0.0.1:2379' (or '10.0.0.1:2379', or 'https://...' for a store with TLS) -> ('10.0.0.1', 2379)."""
    raw = text.strip()
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"bad etcd address {text!r}: only http:// and https:// endpoints are supported")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ConfigError(f"bad port in etcd address {text!r}") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"bad etcd address {text!r}: expected http://HOST:PORT, e.g. http://127.0.0.1:2379")
    return parts.hostname, port


def _encode(obj: dict[str, Any]) -> bytes:
    """Canonical bytes (one layout for every writer here)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode_value(raw: bytes) -> dict[str, Any]:
    """A stored JSON object; {} for anything else (the store is the host's: a garbled value reads as empty)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


class Directory:
    """One connection to the store. Async: the agent keeps one in its event loop; synchronous callers
    (the CLI, clients) use `blocking`."""

    def __init__(self, url: str, prefix: str = PREFIX, timeout: float = OP_TIMEOUT_S,
                 credentials: EtcdCredentials | None = None) -> None:
        import aetcd

        self.url = url
        self.host, self.port = parse_etcd_url(url)
        self.prefix = prefix.rstrip("/") + "/"
        self._aetcd = aetcd
        # TLS and a user, for a store that asks for them (host/etcd_auth.py): from the environment by default
        self.credentials = EtcdCredentials.from_env() if credentials is None else credentials
        tls = url.strip().startswith("https://")
        self.credentials.check(tls, url)
        self._c = etcd_auth.client(self.host, self.port, timeout, self.credentials, tls)

    async def close(self) -> None:
        await self._c.close()

    async def __aenter__(self) -> Directory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _do(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except self._aetcd.ClientError as e:
            if "invalid auth token" in str(e):  # the store restarted, or the token expired: log in again next time
                await self._c.close()
            raise DirectoryError(etcd_auth.why(self.url, self.credentials, type(e).__name__, str(e))) from None

    def _host_key(self, listen: str) -> bytes:
        return f"{self.prefix}hosts/{listen}".encode()

    def _enclave_key(self, name: str) -> bytes:
        return f"{self.prefix}enclaves/{name}".encode()

    def _agent_key(self, listen: str) -> bytes:
        return f"{self.prefix}agents/{listen}".encode()

    # ---- agents ----
    async def register(self, listen: str, info: dict[str, Any], ttl: int = LEASE_TTL_S) -> int:
        """Put this agent's entry under a new lease; returns the lease id to refresh."""
        lease = await self._do(self._c.lease(ttl))
        entry, tx = _encode({**info, "listen": listen, "since": time.time()}), self._c.transactions
        await self._do(self._c.transaction(compare=[], failure=[], success=[
            tx.put(self._host_key(listen), entry, lease=lease.id), tx.put(self._agent_key(listen), entry)]))
        return int(lease.id)

    async def refresh(self, lease_id: int) -> bool:
        """Keep the lease alive; False when it has run out already (the entry is gone: register again)."""
        reply = await self._do(self._c.refresh_lease(lease_id))
        return reply is not None and int(reply.TTL) > 0

    async def deregister(self, lease_id: int) -> None:
        await self._do(self._c.revoke_lease(lease_id))

    async def hosts(self) -> dict[str, dict[str, Any]]:
        """Every live agent: listen address -> its entry."""
        found = await self._do(self._c.get_prefix(f"{self.prefix}hosts/".encode()))
        out = {}
        for kv in found:
            entry = decode_value(kv.value)
            out[str(entry.get("listen") or kv.key.decode().rsplit("/", 1)[-1])] = entry
        return out

    async def alive(self, listen: str) -> bool:
        return await self._do(self._c.get(self._host_key(listen))) is not None

    async def agents(self) -> dict[str, dict[str, Any]]:
        """Every agent that ever registered, alive or not: listen address -> its last registration (its
        host id and state folder: where a dead agent's enclaves can come back)."""
        found = await self._do(self._c.get_prefix(f"{self.prefix}agents/".encode()))
        return {kv.key.decode()[len(self.prefix) + len("agents/"):]: decode_value(kv.value) for kv in found}

    # ---- enclaves ----
    async def where(self, name: str) -> str | None:
        kv = await self._do(self._c.get(self._enclave_key(name)))
        return None if kv is None else str(decode_value(kv.value).get("at") or "") or None

    async def enclaves(self) -> dict[str, str]:
        """Every enclave the directory knows: name -> the agent it was last seen at."""
        found = await self._do(self._c.get_prefix(f"{self.prefix}enclaves/".encode()))
        return {kv.key.decode().rsplit("/", 1)[-1]: str(decode_value(kv.value).get("at") or "") for kv in found}

    async def entries(self) -> dict[str, dict[str, Any]]:
        """Every enclave's whole entry: name -> {"at", and "checkpoint" once one was sealed there}."""
        found = await self._do(self._c.get_prefix(f"{self.prefix}enclaves/".encode()))
        return {kv.key.decode().rsplit("/", 1)[-1]: decode_value(kv.value) for kv in found}

    async def claim(self, name: str, at: str) -> str | None:
        """Record that `name` runs at `at`, unless the entry names another agent that is alive: then
        change nothing and return that agent. (A new enclave, a restore, or a correction after the store
        was unreachable.)"""
        key, tx = self._enclave_key(name), self._c.transactions
        for _ in range(5):  # each round loses only to a concurrent change; then look again
            kv = await self._do(self._c.get(key))
            if kv is None:
                compare = [tx.version(key) == 0]
            else:
                old = str(decode_value(kv.value).get("at") or "")
                if old == at:
                    return None
                if old and await self.alive(old):
                    return old
                compare = [tx.value(key) == kv.value, tx.version(self._host_key(old)) == 0] if old \
                    else [tx.value(key) == kv.value]
            ok, _ = await self._do(self._c.transaction(
                compare=compare, success=[tx.put(key, _encode({"at": at}))], failure=[]))
            if ok:
                return None
        raise DirectoryError(f"fleet directory at {self.url}: the entry of {name!r} kept changing; try again")

    async def _swap(self, name: str, frm: str, op: Any) -> bool:
        """Apply `op` to `name`'s entry if it says `frm`, compared by revision (not by bytes: an entry
        written by another tool in another JSON layout still counts as saying what it says)."""
        key, tx = self._enclave_key(name), self._c.transactions
        kv = await self._do(self._c.get(key))
        if kv is None or decode_value(kv.value).get("at") != frm:
            return False
        ok, _ = await self._do(self._c.transaction(compare=[tx.mod(key) == kv.mod_revision], success=[op],
                                                   failure=[]))
        return bool(ok)

    async def move(self, name: str, frm: str, to: str) -> bool:
        """`name` moved from `frm` to `to`: True if the entry said `frm` and now says `to` (a late or
        repeated update, whose old location is no longer current, changes nothing)."""
        return await self._swap(name, frm, self._c.transactions.put(self._enclave_key(name), _encode({"at": to})))

    async def release(self, name: str, at: str) -> bool:
        """`name` stopped at `at`: drop its entry if it still names `at`."""
        return await self._swap(name, at, self._c.transactions.delete(self._enclave_key(name)))

    # ---- plain keys (host/record_store.py: migration records, drain marks) ----
    def key(self, rest: str) -> bytes:
        return f"{self.prefix}{rest}".encode()

    async def read(self, rest: str) -> tuple[bytes, int] | None:
        """The value under `rest` and its mod revision (what a compare-and-set compares), or None."""
        kv = await self._do(self._c.get(self.key(rest)))
        return None if kv is None else (bytes(kv.value), int(kv.mod_revision))

    async def read_prefix(self, rest: str) -> dict[str, tuple[bytes, int]]:
        """Every key under `rest`: its name after `rest` -> (value, mod revision)."""
        found = await self._do(self._c.get_prefix(self.key(rest)))
        return {kv.key.decode()[len(self.prefix) + len(rest):]: (bytes(kv.value), int(kv.mod_revision))
                for kv in found}

    async def write_if(self, rest: str, value: bytes, mod: int, lease: int | None = None) -> bool:
        """Put `value` if the key's mod revision is still `mod` (0: only if the key does not exist)."""
        key, tx = self.key(rest), self._c.transactions
        compare = [tx.version(key) == 0] if mod == 0 else [tx.mod(key) == mod]
        ok, _ = await self._do(self._c.transaction(compare=compare, success=[tx.put(key, value, lease=lease)],
                                                   failure=[]))
        return bool(ok)

    async def delete_if(self, rest: str, mod: int) -> bool:
        key, tx = self.key(rest), self._c.transactions
        ok, _ = await self._do(self._c.transaction(compare=[tx.mod(key) == mod], success=[tx.delete(key)],
                                                   failure=[]))
        return bool(ok)

    async def write(self, rest: str, value: bytes, lease: int | None = None) -> None:
        await self._do(self._c.put(self.key(rest), value, lease=lease))

    async def lease(self, ttl: int) -> int:
        return int((await self._do(self._c.lease(ttl))).id)

    async def clear(self) -> None:
        """Delete every key under this directory's prefix (a benchmark's private one, after it)."""
        await self._do(self._c.delete_prefix(self.prefix.encode()))

    async def locate(self, name: str) -> str:
        """The agent to ask for `name`, or one clear line why there is none."""
        at = await self.where(name)
        if at is None:
            raise DirectoryError(f"no enclave named {name!r} in the fleet directory at {self.url}")
        if not await self.alive(at):
            raise DirectoryError(f"enclave {name!r} was last at {at}, whose agent is not in the fleet directory "
                                 "(stopped, dead or cut off); its checkpoints restore only on that host: "
                                 f"`constmig ls --etcd {self.url}` says how to bring it back")
        return at

    async def sealed(self, name: str, at: str, checkpoint: str) -> bool:
        """A checkpoint of `name` was sealed at `at` (whose platform holds its lineage): record it in the
        entry, if the entry still names `at`, so that `ls` can say what brings it back once `at` is gone."""
        key, tx = self._enclave_key(name), self._c.transactions
        kv = await self._do(self._c.get(key))
        entry = {} if kv is None else decode_value(kv.value)
        if entry.get("at") != at:
            return False
        ok, _ = await self._do(self._c.transaction(compare=[tx.mod(key) == kv.mod_revision], failure=[],
                                                   success=[tx.put(key, _encode({**entry, "checkpoint": checkpoint}))]))
        return bool(ok)

    async def forget(self, name: str) -> str:
        """Drop the entry of `name`, whose agent is gone, so that any agent may take the name; returns where
        it was. Refused while that agent is alive, in the same compare-and-set as the delete: an agent that
        registers again meanwhile keeps its entry."""
        key, tx = self._enclave_key(name), self._c.transactions
        for _ in range(5):  # each round loses only to a concurrent change; then look again
            kv = await self._do(self._c.get(key))
            if kv is None:
                raise DirectoryError(f"no enclave named {name!r} in the fleet directory at {self.url}")
            at = str(decode_value(kv.value).get("at") or "")
            compare = [tx.mod(key) == kv.mod_revision]
            if at:
                if await self.alive(at):
                    raise DirectoryError(f"enclave {name!r} runs at {at}, whose agent is alive: stop it there "
                                         f"(constmig stop {name} --agent {at}) rather than forget it")
                compare.append(tx.version(self._host_key(at)) == 0)
            ok, _ = await self._do(self._c.transaction(compare=compare, success=[tx.delete(key)], failure=[]))
            if ok:
                return at
        raise DirectoryError(f"fleet directory at {self.url}: the entry of {name!r} kept changing; try again")


def blocking(url: str, work: Callable[[Directory], Awaitable[T]], timeout: float = OP_TIMEOUT_S,
             credentials: EtcdCredentials | None = None) -> T:
    """Run `work(directory)` to completion from synchronous code, in a thread with its own event loop
    (so it works whether or not the caller's thread runs one)."""
    parse_etcd_url(url)  # a bad address is the caller's mistake: say so before any thread
    box: dict[str, Any] = {}

    async def main() -> None:
        async with Directory(url, timeout=timeout, credentials=credentials) as d:
            box["result"] = await work(d)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="directory", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def locate(url: str, name: str) -> str:
    return blocking(url, lambda d: d.locate(name))
