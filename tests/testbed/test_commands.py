"""The exact ip/tc/nft commands the testbed runs, read without running them (no root needed)."""

import pytest

from constmig.client.trust import default_ca_dir
from constmig.testbed import cmd, netns, shaping
from constmig.testbed.bed import Testbed
from constmig.testbed.spec import LinkSpec, TestbedError, make_layout


@pytest.fixture
def layout():
    return make_layout("tb", 2, LinkSpec.parse("50mbit", "0", "1%"), subnet_index=3)


def test_switch_commands(layout):
    cmds = [" ".join(c) for c in netns.switch_cmds(layout)]
    assert cmds[0] == "ip netns add cmtb-tb-sw"
    assert "ip -n cmtb-tb-sw link add br0 type bridge" in cmds
    assert "ip link add cmtb-tb type veth peer name ctl netns cmtb-tb-sw" in cmds
    assert "ip addr add 10.77.3.1/24 dev cmtb-tb" in cmds
    assert "ip -n cmtb-tb-sw link set dev ctl master br0" in cmds


def test_host_commands(layout):
    cmds = [" ".join(c) for c in netns.host_cmds(layout, layout.hosts[1])]
    assert cmds == [
        "ip netns add cmtb-tb-b",
        "ip -n cmtb-tb-b link set dev lo up",
        "ip -n cmtb-tb-sw link add p-b type veth peer name eth0 netns cmtb-tb-b",
        "ip -n cmtb-tb-sw link set dev p-b master br0",
        "ip -n cmtb-tb-sw link set dev p-b up",
        "ip -n cmtb-tb-b addr add 10.77.3.11/24 dev eth0",
        "ip -n cmtb-tb-b link set dev eth0 up",
    ]


def test_link_down_unplugs_switch_port(layout):
    assert netns.link_state_cmd(layout, layout.hosts[0], up=False) == \
        ["ip", "-n", "cmtb-tb-sw", "link", "set", "dev", "p-a", "down"]


def test_tbf_on_both_ends_of_each_link(layout):
    cmds = [" ".join(c) for c in shaping.rate_cmds(layout, layout.hosts[0])]
    assert cmds == [
        "tc -n cmtb-tb-a qdisc replace dev eth0 root tbf rate 50000000bit burst 65536 latency 50ms",
        "tc -n cmtb-tb-sw qdisc replace dev p-a root tbf rate 50000000bit burst 65536 latency 50ms",
    ]
    assert shaping.tbf_burst(10**9) == 125_000  # 1 ms at 1 Gbit/s


def test_loss_rules_on_the_bridge(layout):
    h = layout.hosts[0]
    script = shaping.loss_ruleset(h, 1.0)
    assert script.startswith("add table bridge constmig_loss_a\ndelete table bridge constmig_loss_a\n")
    assert 'iifname "p-a" meta protocol { ip, ip6 } numgen random mod 100000 < 1000 counter drop' in script
    assert 'oifname "p-a" meta protocol { ip, ip6 } numgen random mod 100000 < 1000 counter drop' in script
    assert "hook forward" in script
    assert shaping.loss_cmd(layout) == ["ip", "netns", "exec", "cmtb-tb-sw", "nft", "-f", "-"]


def test_zero_loss_only_removes_the_table(layout):
    assert shaping.loss_ruleset(layout.hosts[1], 0) == \
        "add table bridge constmig_loss_b\ndelete table bridge constmig_loss_b\n"
    assert shaping.loss_threshold(0.001) == 1 and shaping.loss_threshold(100) == 100_000


def test_agent_and_relay_commands(tmp_path):
    bed = Testbed("tb", 2, LinkSpec.parse("1gbit", "5ms"), state_dir=tmp_path)
    bed.layout = make_layout("tb", 2, bed.link)
    h = bed.host("b")
    relay = bed.relay_argv(h)
    assert relay[1:] == ["-m", "constmig.testbed.relay", "--listen", "10.77.0.11:7000",
                         "--target", "127.0.0.1:7001", "--delay", "0.005"]
    agent = bed.agent_argv(h)
    assert agent[1:5] == ["-m", "constmig", "agent", "--listen"] and agent[5] == "127.0.0.1:7001"
    assert agent[agent.index("--ca-dir") + 1] == str(default_ca_dir())  # the one clients read too
    env = bed.env()
    assert env["CONSTMIG_TESTBED_HOSTS"] == "10.77.0.10:7000,10.77.0.11:7000"
    assert env["CONSTMIG_HOST_B"] == "10.77.0.11:7000"


def test_attach_without_record_is_a_clear_error(tmp_path):
    with pytest.raises(TestbedError, match="testbed 'nope' is not up"):
        Testbed.attach("nope", tmp_path)


def test_not_root_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cmd.os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedError, match="needs root"):
        cmd.preflight(need_nft=False)


def test_missing_tools_are_named_with_their_package(monkeypatch):
    monkeypatch.setattr(cmd.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cmd.shutil, "which", lambda tool: None if tool == "nft" else f"/usr/sbin/{tool}")
    cmd.require_tools("ip", "tc")
    with pytest.raises(TestbedError, match=r"`nft` not found \(install the nftables package"):
        cmd.preflight(need_nft=True)


def test_failed_command_is_one_line():
    with pytest.raises(TestbedError) as e:
        cmd.run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 3"])
    assert "the reason" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TestbedError, match="not found"):
        cmd.run(["no-such-tool-xyz"])
