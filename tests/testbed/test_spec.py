"""Parsers and the layout they imply: no root needed."""

import pytest

from constmig.testbed.spec import (
    LinkSpec,
    TestbedError,
    check_name,
    format_delay,
    format_rate,
    host_index,
    make_layout,
    parse_delay,
    parse_hosts,
    parse_loss,
    parse_rate,
)


@pytest.mark.parametrize("text,bps", [("1gbit", 10**9), ("100mbit", 10**8), ("2.5Mbit", 2_500_000),
                                      ("64kbit", 64_000), (" 50 mbit ", 50 * 10**6), ("10mbps", 80 * 10**6)])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "1gb", "100", "-1mbit", "1e9bit", "", "0mbit", "200gbit"])
def test_parse_rate_rejects(text):
    with pytest.raises(TestbedError, match="rate"):
        parse_rate(text)


@pytest.mark.parametrize("text,seconds", [("0.2ms", 0.0002), ("5ms", 0.005), ("150us", 0.00015), ("1s", 1.0),
                                          ("0", 0.0), ("20MS", 0.02)])
def test_parse_delay(text, seconds):
    assert parse_delay(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "5 parsecs", "-1ms", "ms", "11s", "0.2 m s"])
def test_parse_delay_rejects(text):
    with pytest.raises(TestbedError, match="delay"):
        parse_delay(text)


@pytest.mark.parametrize("text,pct", [("0.1%", 0.1), ("1%", 1.0), ("0", 0.0), ("5", 5.0), ("100%", 100.0),
                                      ("0.001%", 0.001)])
def test_parse_loss(text, pct):
    assert parse_loss(text) == pytest.approx(pct)


@pytest.mark.parametrize("text", ["120%", "-1%", "lots", "1%%", "0.5 percent"])
def test_parse_loss_rejects(text):
    with pytest.raises(TestbedError, match="loss"):
        parse_loss(text)


@pytest.mark.parametrize("text", ["0", "17", "two", "-3", "1.5", ""])
def test_parse_hosts_rejects(text):
    with pytest.raises(TestbedError, match="--hosts"):
        parse_hosts(text)


def test_names_fit_interface_names():
    assert check_name("tb") == "tb"
    for bad in ["", "Tb", "9tb", "tb-1", "toolongname", "a b"]:
        with pytest.raises(TestbedError, match="testbed name"):
            check_name(bad)


def test_host_index():
    assert host_index("a", 3) == 0 and host_index("C", 3) == 2 and host_index("1", 3) == 1
    with pytest.raises(TestbedError, match="hosts a, b, c"):
        host_index("d", 3)


def test_format_round_trip():
    assert format_rate(parse_rate("1gbit")) == "1gbit" and format_rate(parse_rate("50mbit")) == "50mbit"
    assert format_delay(parse_delay("0.2ms")) == "0.2ms" and format_delay(0) == "0"
    assert LinkSpec.parse("100mbit", "5ms", "1%").describe() == "rate 100mbit, delay 5ms, loss 1%"


def test_layout_without_delay_agents_listen_on_host_address():
    lay = make_layout("tb", 3, LinkSpec.parse("1gbit"), subnet_index=4)
    assert [h.ns for h in lay.hosts] == ["cmtb-tb-a", "cmtb-tb-b", "cmtb-tb-c"]
    assert [h.addr for h in lay.hosts] == ["10.77.4.10:7000", "10.77.4.11:7000", "10.77.4.12:7000"]
    assert all(h.agent_listen == h.addr and not h.relayed for h in lay.hosts)
    assert lay.root_ip == "10.77.4.1" and lay.switch_ns == "cmtb-tb-sw" and lay.root_iface == "cmtb-tb"


def test_layout_with_delay_hides_agent_behind_relay():
    lay = make_layout("tb", 2, LinkSpec.parse("1gbit", "0.2ms"))
    assert all(h.relayed and h.agent_listen == "127.0.0.1:7001" and h.addr.endswith(":7000") for h in lay.hosts)


def test_layout_json_round_trip():
    lay = make_layout("tb", 2, LinkSpec.parse("10mbit", "1ms", "0.5%"), subnet_index=7)
    again = type(lay).from_json(lay.to_json())
    assert again == lay and again.hosts[1].link.loss_pct == 0.5


def test_longest_name_fits_15_character_interfaces():
    lay = make_layout("abcdefgh", 16, LinkSpec())
    assert len(lay.root_iface) <= 15 and all(len(h.switch_port) <= 15 for h in lay.hosts)
