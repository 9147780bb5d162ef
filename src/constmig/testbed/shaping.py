"""Link shaping: tc tbf for the rate, an nftables rule for random loss.

This kernel has no netem (docs/testbed.md, "Why a relay for delay"), so rate and loss are done with
what it has: tbf on the egress of both ends of each host's veth (so each direction is limited), and
`numgen random` drop rules on the switch's bridge for frames entering and leaving the host's port.
Delay is the relay's job (relay.py).
"""

from __future__ import annotations

from constmig.testbed.netns import exec_prefix
from constmig.testbed.spec import HOST_IFACE, HostPlan, Layout

LOSS_TABLE = "constmig_loss"
LOSS_SCALE = 100_000  # numgen modulus: loss resolution is 0.001%
TBF_LATENCY = "50ms"  # how long a packet may queue in tbf before it is dropped
MIN_BURST = 64 * 1024  # veth hands tbf GSO packets of up to 64 KiB; a smaller bucket would split them


def tbf_burst(rate_bps: int) -> int:
    """Bucket size: 1 ms of traffic at the rate, at least one full GSO packet."""
    return max(MIN_BURST, rate_bps // 8 // 1000)


def tbf_cmd(ns: str, iface: str, rate_bps: int) -> list[str]:
    return ["tc", "-n", ns, "qdisc", "replace", "dev", iface, "root", "tbf", "rate", f"{rate_bps}bit",
            "burst", str(tbf_burst(rate_bps)), "latency", TBF_LATENCY]


def rate_cmds(layout: Layout, host: HostPlan) -> list[list[str]]:
    """tbf on both ends of a host's link: host egress (host -> switch) and switch-port egress (switch -> host)."""
    rate = host.link.rate_bps
    return [tbf_cmd(host.ns, HOST_IFACE, rate), tbf_cmd(layout.switch_ns, host.switch_port, rate)]


def loss_threshold(loss_pct: float) -> int:
    """numgen values below this are dropped: loss_pct percent of LOSS_SCALE."""
    return round(loss_pct / 100 * LOSS_SCALE)


def loss_table(host: HostPlan) -> str:
    return f"{LOSS_TABLE}_{host.id}"


def loss_ruleset(host: HostPlan, loss_pct: float) -> str:
    """An nft script for the switch namespace that (re)places one host's loss table atomically; 0 removes it.

    The rules sit on the bridge (family bridge, forward hook) and match the host's switch port both
    ways, so a drop happens "on the wire": the sender's kernel never learns of it (a drop in the
    host's own output hook would fail UDP sends with EPERM), and a path between two hosts crosses
    two lossy links, like netem on both ends of each link. Only IPv4/IPv6 frames are dropped, never
    ARP, so a lossy link stays resolvable. `add table` before `delete table` makes the delete safe.
    """
    table, port = loss_table(host), host.switch_port
    script = [f"add table bridge {table}", f"delete table bridge {table}"]
    k = loss_threshold(loss_pct)
    if k > 0:
        drop = f"meta protocol {{ ip, ip6 }} numgen random mod {LOSS_SCALE} < {k} counter drop"
        script += [
            f"table bridge {table} {{",
            "  chain link_loss {",
            "    type filter hook forward priority 0; policy accept;",
            f'    iifname "{port}" {drop}',
            f'    oifname "{port}" {drop}',
            "  }",
            "}",
        ]
    return "\n".join(script) + "\n"


def loss_cmd(layout: Layout) -> list[str]:
    """Feed loss_ruleset() on stdin: nft has no -n, so it runs under `ip netns exec` in the switch."""
    return [*exec_prefix(layout.switch_ns), "nft", "-f", "-"]
