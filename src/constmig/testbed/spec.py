"""What a testbed is asked for: parsers for link settings and names, and the layout they imply.

Rates are tc-style bits per second with decimal prefixes (1gbit, 100mbit), unlike constmig.units'
binary byte sizes, so they get their own parser; every parser raises TestbedError, whose message
is a complete line for the CLI.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from constmig.errors import ConfigError

MAX_HOSTS = 16
AGENT_PORT = 7000  # advertised port on each host's address (the relay's when a delay is set)
INNER_AGENT_PORT = 7001  # the agent's own port on the namespace's loopback, behind the relay
HOST_IFACE = "eth0"  # the host end of its link, inside the host namespace
SUBNET_BASE = ipaddress.ip_network("10.77.0.0/16")  # testbed k uses 10.77.k.0/24


class TestbedError(ConfigError):
    """A testbed could not be built, found, changed or torn down; str(e) is one line."""

    __test__ = False  # not a pytest class, despite the name


_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
_RATE_RE = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,9})?)\s*([a-z]+)\s*$", re.IGNORECASE)
_DELAY_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_DELAY_RE = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*(us|µs|ms|s)\s*$", re.IGNORECASE)
_LOSS_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d{1,6})?)\s*%?\s*$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
MAX_DELAY_S = 10.0


def parse_rate(text: str) -> int:
    """'1gbit', '100mbit', '12.5mbps' -> bits per second (tc's units: bit, kbit, mbit, gbit, *bps = bytes)."""
    m = _RATE_RE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _RATE_UNITS:
        raise TestbedError(f"malformed rate {text!r}: use a number with kbit, mbit or gbit (e.g. 1gbit, 100mbit)")
    bps = round(float(m.group(1)) * _RATE_UNITS[unit])
    if not 8000 <= bps <= 100 * 10**9:
        raise TestbedError(f"rate {text!r} out of range: use 8kbit to 100gbit")
    return bps


def parse_delay(text: str) -> float:
    """'0.2ms', '5ms', '150us', '0' -> seconds of one-way delay."""
    if str(text).strip() in ("0", "0.0"):
        return 0.0
    m = _DELAY_RE.match(str(text))
    if not m:
        raise TestbedError(f"malformed delay {text!r}: use a number with us, ms or s (e.g. 0.2ms, 5ms)")
    seconds = float(m.group(1)) * _DELAY_UNITS[m.group(2).lower()]
    if seconds > MAX_DELAY_S:
        raise TestbedError(f"delay {text!r} too large: at most {MAX_DELAY_S:g}s")
    return seconds


def parse_loss(text: str) -> float:
    """'0.1%', '1%', '0' -> percent of packets dropped (0 to 100)."""
    m = _LOSS_RE.match(str(text))
    if not m:
        raise TestbedError(f"malformed loss {text!r}: use a percentage (e.g. 0.1%, 1%)")
    pct = float(m.group(1))
    if pct > 100:
        raise TestbedError(f"loss {text!r} out of range: use 0% to 100%")
    return pct


def parse_hosts(text: str | int) -> int:
    """How many hosts: an integer from 1 to MAX_HOSTS."""
    try:
        n = int(str(text).strip())
    except ValueError:
        raise TestbedError(f"bad --hosts {text!r}: expected a whole number from 1 to {MAX_HOSTS}") from None
    if not 1 <= n <= MAX_HOSTS:
        raise TestbedError(f"bad --hosts {text!r}: expected a whole number from 1 to {MAX_HOSTS}")
    return n


def check_name(name: str) -> str:
    """A testbed name ends up in interface names (15 characters at most), so keep it short and plain."""
    if not _NAME_RE.match(name):
        raise TestbedError(f"bad testbed name {name!r}: use 1-8 lowercase letters or digits, starting with a letter")
    return name


def host_id(i: int) -> str:
    return chr(ord("a") + i)


def host_index(host: str, n: int) -> int:
    """'a', 'B' or '0'/'1' (index) -> host number; a clear error for anything else."""
    h = host.strip().lower()
    if len(h) == 1 and "a" <= h <= "z" and ord(h) - ord("a") < n:
        return ord(h) - ord("a")
    if h.isdigit() and int(h) < n:
        return int(h)
    ids = ", ".join(host_id(i) for i in range(n))
    raise TestbedError(f"unknown host {host!r}: this testbed has hosts {ids}")


def format_rate(bps: int) -> str:
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps}bit"


def format_delay(seconds: float) -> str:
    return "0" if seconds == 0 else f"{seconds * 1e3:g}ms"


@dataclass
class LinkSpec:
    """Shaping of one host's link: rate each way, one-way delay added to agent connections, loss each way."""

    rate_bps: int = 10**9
    delay_s: float = 0.0
    loss_pct: float = 0.0

    @classmethod
    def parse(cls, rate: str = "1gbit", delay: str = "0", loss: str = "0") -> LinkSpec:
        return cls(parse_rate(rate), parse_delay(delay), parse_loss(loss))

    def describe(self) -> str:
        return f"rate {format_rate(self.rate_bps)}, delay {format_delay(self.delay_s)}, loss {self.loss_pct:g}%"


@dataclass
class HostPlan:
    """Where one host lives: its namespace, address, the port the world uses, and its agent's own port."""

    id: str
    ns: str
    ip: str
    port: int
    agent_listen: str
    switch_port: str  # the switch end of its link (a bridge port in the switch namespace)
    link: LinkSpec = field(default_factory=LinkSpec)

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def relayed(self) -> bool:
        return self.link.delay_s > 0


@dataclass
class Layout:
    """Every name and address of one testbed, computed up front so `up`, `down` and tests agree."""

    name: str
    subnet_index: int
    hosts: list[HostPlan]

    @property
    def prefix(self) -> str:
        return f"cmtb-{self.name}"

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def root_iface(self) -> str:
        return self.prefix  # root end of the controller's link: "cmtb-" + at most 8 = 13 characters

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"10.77.{self.subnet_index}.0/24")

    @property
    def root_ip(self) -> str:
        return str(self.network.network_address + 1)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "subnet_index": self.subnet_index, "hosts": [asdict(h) for h in self.hosts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        hosts = [HostPlan(**{**h, "link": LinkSpec(**h["link"])}) for h in data["hosts"]]
        return cls(str(data["name"]), int(data["subnet_index"]), hosts)


def make_layout(name: str, n: int, link: LinkSpec, subnet_index: int = 0) -> Layout:
    """Namespaces cmtb-NAME-a.., a switch namespace cmtb-NAME-sw, addresses 10.77.K.10+i."""
    check_name(name)
    parse_hosts(n)
    if not 0 <= subnet_index <= 255:
        raise TestbedError(f"subnet index {subnet_index} out of range 0-255")
    hosts = []
    for i in range(n):
        hid = host_id(i)
        ip = f"10.77.{subnet_index}.{10 + i}"
        relayed = link.delay_s > 0
        agent_listen = f"127.0.0.1:{INNER_AGENT_PORT}" if relayed else f"{ip}:{AGENT_PORT}"
        hosts.append(HostPlan(hid, f"cmtb-{name}-{hid}", ip, AGENT_PORT, agent_listen, f"p-{hid}",
                              LinkSpec(link.rate_bps, link.delay_s, link.loss_pct)))
    return Layout(name, subnet_index, hosts)
