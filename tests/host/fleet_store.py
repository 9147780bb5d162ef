"""The fleet store as its owner sees it, for the tests of records and drain marks: raw writes (none of
constmig's code), record reads, and a poll."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from constmig.host.directory import blocking, parse_etcd_url
from constmig.host.record_store import RecordStore


def raw_put(url: str, key: str, value: Any) -> None:
    """The store's owner writes a key: plain bytes, none of constmig's code."""
    import aetcd

    async def put() -> None:
        host, port = parse_etcd_url(url)
        async with aetcd.Client(host, port, options={"grpc.enable_http_proxy": 0}) as c:
            await c.put(f"/constmig/{key}".encode(), json.dumps(value).encode())

    asyncio.run(put())


def read(url: str, key: str) -> dict[str, Any]:
    got = blocking(url, lambda d: RecordStore(d).get(key))
    return {} if got is None else got.value


def until(what, timeout: float = 20.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return got
