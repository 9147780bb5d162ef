"""The fleet directory on a real etcd: leases that drop a dead agent, and enclave entries that only move
by compare-and-set, so a late update never overwrites a newer one."""

from __future__ import annotations

import asyncio
import time

import pytest

from constmig.errors import ConfigError, DirectoryError
from constmig.host.directory import Directory, blocking, locate, parse_etcd_url


@pytest.mark.parametrize(("text", "want"), [("http://10.0.0.1:2379", ("10.0.0.1", 2379)),
                                            ("127.0.0.1:12379", ("127.0.0.1", 12379)),
                                            ("http://etcd.local", ("etcd.local", 2379)),
                                            ("https://10.0.0.2:2379", ("10.0.0.2", 2379))])
def test_etcd_addresses(text, want):
    assert parse_etcd_url(text) == want


@pytest.mark.parametrize(("text", "fragment"), [("ftp://h:2379", "only http:// and https://"), ("http://h:99999", "bad port"),
                                                ("http://h:2379/v3/kv", "expected http://HOST:PORT")])
def test_bad_etcd_addresses_are_one_line(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_etcd_url(text)


def run(url: str, work):
    return blocking(url, work)


def test_an_agent_drops_out_when_its_lease_runs_out(etcd_url):
    async def work(d: Directory) -> None:
        lease = await d.register("10.9.0.1:7001", {"host_id": "x"}, ttl=2)
        assert (await d.hosts())["10.9.0.1:7001"]["host_id"] == "x"
        assert await d.alive("10.9.0.1:7001")
        await asyncio.sleep(1.2)
        assert await d.refresh(lease)  # kept alive past its first TTL
        await asyncio.sleep(1.2)
        assert await d.alive("10.9.0.1:7001")
        deadline = time.monotonic() + 6
        while await d.alive("10.9.0.1:7001"):  # no refresh: gone within the TTL (etcd checks every ~0.5 s)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert not await d.refresh(lease)  # says so, and the agent registers again
        again = await d.register("10.9.0.1:7001", {"host_id": "x"}, ttl=2)
        assert again != lease and await d.alive("10.9.0.1:7001")
        await d.deregister(again)
        assert not await d.alive("10.9.0.1:7001")

    run(etcd_url, work)


def test_moves_only_from_the_expected_old_location(etcd_url):
    async def work(d: Directory) -> None:
        a, b, c = "10.9.1.1:7001", "10.9.1.2:7001", "10.9.1.3:7001"
        assert await d.claim("m1", a) is None and await d.where("m1") == a
        assert await d.move("m1", a, b)  # A -> B
        assert await d.move("m1", b, c)  # B -> C
        assert not await d.move("m1", a, b)  # A -> B's update arriving late: refused
        assert await d.where("m1") == c
        assert not await d.move("m1", a, b) and not await d.move("nope", a, b)
        assert not await d.release("m1", a)  # only the agent named may drop it
        assert await d.release("m1", c) and await d.where("m1") is None

    run(etcd_url, work)


def test_a_name_held_by_a_live_agent_is_not_claimed_and_one_held_by_a_dead_agent_is(etcd_url):
    async def work(d: Directory) -> None:
        a, b = "10.9.2.1:7001", "10.9.2.2:7001"
        lease = await d.register(a, {"host_id": "a"}, ttl=5)
        assert await d.claim("m2", a) is None
        assert await d.claim("m2", b) == a and await d.where("m2") == a  # alive: left alone, and named
        assert await d.claim("m2", a) is None  # its own: nothing to do
        await d.deregister(lease)
        assert await d.claim("m2", b) is None and await d.where("m2") == b  # its agent gone: taken over
        assert await d.enclaves() == {"m2": b}

    run(etcd_url, work)


def test_locate_says_why_it_cannot(etcd_url):
    async def setup(d: Directory) -> None:
        await d.claim("m3", "10.9.3.1:7001")  # no agent registered there

    run(etcd_url, setup)
    with pytest.raises(DirectoryError, match=r"'m3' was last at 10.9.3.1:7001, whose agent is not in the fleet"):
        locate(etcd_url, "m3")
    with pytest.raises(DirectoryError, match=r"no enclave named 'absent' in the fleet directory at http://"):
        locate(etcd_url, "absent")


def test_an_unreachable_store_is_one_line_and_quick():
    from constmig.host.cluster import free_port

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(DirectoryError, match=rf"fleet directory at {url}: (unreachable|did not answer in time)"):
        locate(url, "kv1")
    assert time.monotonic() - t0 < 10


def test_an_agents_record_outlives_its_lease_and_a_checkpoint_is_noted_only_where_the_entry_says(etcd_url):
    async def work(d: Directory) -> None:
        a, b = "10.9.4.1:7001", "10.9.4.2:7001"
        lease = await d.register(a, {"host_id": "a", "state_dir": "/srv/a"}, ttl=5)
        assert await d.claim("m4", a) is None
        assert await d.sealed("m4", a, "/srv/a/checkpoints/m4.v1.ckpt")
        assert not await d.sealed("m4", b, "/elsewhere/m4.v1.ckpt")  # not where the entry says: unchanged
        assert (await d.entries())["m4"] == {"at": a, "checkpoint": "/srv/a/checkpoints/m4.v1.ckpt"}
        await d.deregister(lease)
        assert a not in await d.hosts() and (await d.agents())[a]["state_dir"] == "/srv/a"  # kept for `ls`
        assert await d.move("m4", a, b) and (await d.entries())["m4"] == {"at": b}  # a move drops the old one

    run(etcd_url, work)


def test_forget_is_refused_while_the_agent_lives_and_frees_the_name_once_it_is_gone(etcd_url):
    async def work(d: Directory) -> None:
        a, b = "10.9.5.1:7001", "10.9.5.2:7001"
        lease = await d.register(a, {"host_id": "a"}, ttl=5)
        assert await d.claim("m5", a) is None
        with pytest.raises(DirectoryError, match=rf"'m5' runs at {a}, whose agent is alive: stop it there "
                                                 rf"\(constmig stop m5 --agent {a}\)"):
            await d.forget("m5")
        assert await d.where("m5") == a
        await d.deregister(lease)
        assert await d.forget("m5") == a and await d.where("m5") is None
        with pytest.raises(DirectoryError, match="no enclave named 'm5'"):
            await d.forget("m5")
        lease_b = await d.register(b, {"host_id": "b"}, ttl=5)
        assert await d.claim("m5", b) is None  # any agent may take the name now
        await d.deregister(lease_b)

    run(etcd_url, work)
