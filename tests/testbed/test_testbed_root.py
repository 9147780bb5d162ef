"""Real testbeds (root): agents in namespaces, a migration through shaped links, rate, delay, loss,
link and agent failures, and a teardown that leaves nothing behind."""

import os
import subprocess
import time

import pytest
from tb_helpers import needs_netns, needs_nft, unique_name

from constmig.errors import AgentError
from constmig.host import client
from constmig.host.orchestrate import app_checksum, launch_filled, migrate
from constmig.testbed import LinkSpec, Testbed, TestbedError, probe
from constmig.testbed.bed import _alive

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.reliability, needs_netns]

RATE = "200mbit"
DELAY_S = 0.010
HEAP = 32 << 20


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """Two hosts, 200 Mbit/s each way, 10 ms one-way delay on every agent connection, no loss."""
    tb = Testbed(unique_name("tr"), 2, LinkSpec.parse(RATE, f"{DELAY_S * 1e3:g}ms"),
                 state_dir=tmp_path_factory.mktemp("tb"))
    with tb:
        yield tb


def _status(addr: str, timeout: float = 5) -> dict:
    return client.request(addr, {"op": "status"}, timeout=timeout)


def test_both_agents_answer(bed):
    assert [_status(a)["host_id"] for a in bed.addrs] == ["a", "b"]
    st = bed.status()
    assert all(h["agent_answers"] and h["relay_alive"] and h["link_up"] for h in st["hosts"])


def test_stopcopy_migration_through_the_testbed_is_rate_limited(bed):
    a, b = bed.addrs
    launch_filled(a, "kv", "kvstore", HEAP, 0.9, seed=3)
    before = app_checksum(a, "kv")
    fig = migrate("kv", a, b, "stopcopy", timeout=120)
    assert app_checksum(b, "kv") == before
    assert _status(b)["enclaves"] and not _status(a)["enclaves"]
    limit = LinkSpec.parse(RATE).rate_bps
    bps = fig["state_bytes"] * 8 / fig["migrate_s"]
    assert fig["state_bytes"] >= HEAP * 0.8
    assert bps < 1.5 * limit, f"migration moved {bps / 1e6:.0f} Mbit/s through a {RATE} link"
    client.request(b, {"op": "stop", "name": "kv"})


def test_tbf_limits_raw_tcp_between_namespaces(bed):
    limit = LinkSpec.parse(RATE).rate_bps
    bps = probe.tcp_throughput(bed, "a", "b", 16 << 20)
    assert 0.5 * limit < bps < 1.25 * limit, f"{bps / 1e6:.1f} Mbit/s through a {RATE} link"


def test_relay_adds_the_delay_to_each_direction(bed):
    rtt = probe.request_rtt(bed.addr("a"))
    assert 2 * DELAY_S <= rtt < 2 * DELAY_S + 0.015, f"status round trip {rtt * 1e3:.1f} ms with {DELAY_S * 1e3:g} ms delay"


def test_link_down_fails_clearly_and_link_up_restores(bed):
    addr = bed.addr("b")
    bed.link_down("b")
    try:
        assert bed.status()["hosts"][1]["link_up"] is False
        with pytest.raises(AgentError, match="cannot reach agent"):
            client.connect(addr, timeout=1.5).close()
    finally:
        bed.link_up("b")
    deadline = time.monotonic() + 15
    while True:
        try:
            assert _status(addr, timeout=2)["host_id"] == "b"
            break
        except AgentError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_kill_and_restart_agent(bed):
    addr = bed.addr("b")
    old_pid = bed.record["procs"]["b"]["agent_pid"]
    bed.kill_agent("b")
    assert not _alive(old_pid)
    with pytest.raises(AgentError):
        _status(addr, timeout=3)
    assert bed.status()["hosts"][1]["agent_alive"] is False
    bed.restart_agent("b")
    assert _status(addr)["host_id"] == "b"
    assert bed.record["procs"]["b"]["agent_pid"] != old_pid


def test_unknown_host_is_a_clear_error(bed):
    with pytest.raises(TestbedError, match="unknown host 'z'"):
        bed.kill_agent("z")


@needs_nft
def test_loss_is_measured_and_a_migration_still_completes(tmp_path):
    with Testbed(unique_name("tl"), 2, LinkSpec.parse("1gbit", "0", "5%"), state_dir=tmp_path) as tb:
        both = probe.udp_loss(tb, "a", "b", count=5000)
        # Two lossy links on the way: 1 - 0.95^2 = 9.75% expected; 5000 datagrams give sigma ~0.4%.
        assert 0.06 < both < 0.14, f"measured {both:.2%} loss across two 5% links"
        tb.set_loss("b", 0)
        one = probe.udp_loss(tb, "a", "b", count=5000)
        assert 0.025 < one < 0.08, f"measured {one:.2%} loss across one 5% link"
        tb.set_loss("b", 5)
        a, b = tb.addrs
        launch_filled(a, "kv", "kvstore", HEAP, 0.9, seed=5)
        before = app_checksum(a, "kv")
        migrate("kv", a, b, "stopcopy", timeout=120)
        assert app_checksum(b, "kv") == before


def _leftovers(name: str, pids: list[int]) -> list[str]:
    out = []
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out += [ln for ln in spaces.splitlines() if ln.startswith(f"cmtb-{name}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [ln for ln in links.splitlines() if f"cmtb-{name}" in ln]
    out += [f"pid {p}" for p in pids if _alive(p)]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    out += [ln for ln in ps.splitlines() if f"cmtb-{name}-" in ln or f"/{name}/host-" in ln]
    return out


@needs_nft
def test_down_leaves_nothing_behind_and_is_idempotent(tmp_path):
    name = unique_name("td")
    tb = Testbed(name, 2, LinkSpec.parse("100mbit", "1ms", "1%"), state_dir=tmp_path).up()
    launch_filled(tb.addr("a"), "kv", "kvstore", 8 << 20, 0.5)  # an enclave process too
    pids = [p for procs in tb.record["procs"].values() for p in procs.values() if isinstance(p, int)]
    pids += subprocess.run(["ip", "netns", "pids", f"cmtb-{name}-a"], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in pids]
    assert len(pids) >= 5 and _leftovers(name, []) != []
    removed = tb.down()
    assert "record" in removed and f"link cmtb-{name}" in removed
    assert _leftovers(name, pids) == []
    assert not (tmp_path / f"{name}.json").exists() and not (tmp_path / name).exists()
    assert Testbed(name, state_dir=tmp_path).down() == []


def test_half_failed_up_cleans_up_and_down_removes_strays(tmp_path):
    name = unique_name("th")
    not_a_dir = tmp_path / "ca-file"
    not_a_dir.write_text("not a CA folder")
    tb = Testbed(name, 2, LinkSpec.parse("1gbit", "1ms"), state_dir=tmp_path, ca_dir=not_a_dir / "sub")
    with pytest.raises(TestbedError, match="host a"):
        tb.up(timeout=20)
    assert _leftovers(name, []) == []
    # Strays of a crashed `up` (no record at all) are found by name.
    subprocess.run(["ip", "netns", "add", f"cmtb-{name}-a"], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", f"cmtb-{name}-a", "sleep", "60"])
    try:
        assert Testbed(name, state_dir=tmp_path).down() == ["1 processes", f"netns cmtb-{name}-a"]
        sleeper.wait(5)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert _leftovers(name, [sleeper.pid]) == []


def test_second_up_with_same_name_is_refused(bed):
    again = Testbed(bed.name, 1, state_dir=os.path.dirname(bed.dir))
    with pytest.raises(TestbedError, match="already up"):
        again.up()
