import pytest

from constmig.errors import ConfigError
from constmig.host.address import parse_addr
from constmig.units import format_size, one_line, parse_duration, parse_size, short_hex


@pytest.mark.parametrize("text,n", [("512M", 512 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29), ("64k", 65536),
                                    ("4096", 4096), (" 2 G ", 2 << 30)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["12Q", "", "G", "-1G", "1.0000001K", "1 2G"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_format_size():
    assert format_size(512 << 20) == "512.0 MiB"


def test_parse_addr():
    assert parse_addr("127.0.0.1:7001") == ("127.0.0.1", 7001)
    assert parse_addr("[::1]:80") == ("::1", 80)
    for bad in ("localhost", ":80", "h:x", "h:70000"):
        with pytest.raises(ConfigError):
            parse_addr(bad)


@pytest.mark.parametrize("text,seconds", [("50ms", 0.05), ("0.2s", 0.2), ("500us", 0.0005), ("7", 0.007),
                                          (" 1 S ", 1.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-5ms", "5 min", "1e3ms", "ms"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="malformed duration"):
        parse_duration(text)


def test_short_hex():
    assert short_hex(bytes(range(32))) == "0001020304050607…"


def test_one_line():
    assert one_line("a\n\tb\x1b[2J  c") == "a b [2J c"  # no control character survives, white space is one space
    assert one_line("x" * 300, 10) == "x" * 9 + "…" and len(one_line("y" * 300)) == 240
    assert one_line("short", 10) == "short"
