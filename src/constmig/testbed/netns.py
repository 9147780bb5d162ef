"""Commands that build and tear down the testbed's wiring: namespaces, veth links and a bridge.

Each host gets a namespace with one veth link to a bridge in a separate switch namespace; the root
namespace gets one more (unshaped) link to the same bridge so tools run from it reach every host.
Deleting a namespace destroys the veths inside it, which takes their peers with them.
"""

from __future__ import annotations

from constmig.testbed.spec import HOST_IFACE, HostPlan, Layout

BRIDGE = "br0"
UPLINK = "ctl"  # switch end of the root namespace's link


def _ns(ns: str, *args: str) -> list[str]:
    return ["ip", "-n", ns, *args]


def switch_cmds(layout: Layout) -> list[list[str]]:
    """The switch namespace with its bridge, and the root namespace's link to it with the controller address."""
    sw, root = layout.switch_ns, layout.root_iface
    return [
        ["ip", "netns", "add", sw],
        _ns(sw, "link", "set", "dev", "lo", "up"),
        _ns(sw, "link", "add", BRIDGE, "type", "bridge"),
        _ns(sw, "link", "set", "dev", BRIDGE, "up"),
        ["ip", "link", "add", root, "type", "veth", "peer", "name", UPLINK, "netns", sw],
        _ns(sw, "link", "set", "dev", UPLINK, "master", BRIDGE),
        _ns(sw, "link", "set", "dev", UPLINK, "up"),
        ["ip", "addr", "add", f"{layout.root_ip}/{layout.network.prefixlen}", "dev", root],
        ["ip", "link", "set", "dev", root, "up"],
    ]


def host_cmds(layout: Layout, host: HostPlan) -> list[list[str]]:
    """One host: its namespace, loopback (the relay reaches the agent there), and its link to the bridge."""
    sw = layout.switch_ns
    return [
        ["ip", "netns", "add", host.ns],
        _ns(host.ns, "link", "set", "dev", "lo", "up"),
        _ns(sw, "link", "add", host.switch_port, "type", "veth", "peer", "name", HOST_IFACE, "netns", host.ns),
        _ns(sw, "link", "set", "dev", host.switch_port, "master", BRIDGE),
        _ns(sw, "link", "set", "dev", host.switch_port, "up"),
        _ns(host.ns, "addr", "add", f"{host.ip}/{layout.network.prefixlen}", "dev", HOST_IFACE),
        _ns(host.ns, "link", "set", "dev", HOST_IFACE, "up"),
    ]


def link_state_cmd(layout: Layout, host: HostPlan, up: bool) -> list[str]:
    """Unplug or replug a host's cable at the switch: its own end then sees no carrier."""
    return _ns(layout.switch_ns, "link", "set", "dev", host.switch_port, "up" if up else "down")


def delete_ns_cmd(ns: str) -> list[str]:
    return ["ip", "netns", "del", ns]


def delete_link_cmd(iface: str) -> list[str]:
    return ["ip", "link", "del", "dev", iface]


def exec_prefix(ns: str) -> list[str]:
    """Prefix that runs a command inside a namespace."""
    return ["ip", "netns", "exec", ns]
