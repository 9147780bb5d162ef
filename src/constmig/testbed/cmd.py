"""Running the system tools (ip, tc, nft) and checking up front that they are there and we are root.

Every builder in this package returns plain argv lists, so tests can read the exact commands without
root; this module is the one place that executes them and turns failures into one-line errors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from constmig.testbed.spec import TestbedError

_PACKAGES = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run one tool; with check, a non-zero exit becomes TestbedError quoting the command and its message."""
    try:
        p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise TestbedError(missing_tool_message(argv[0])) from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(argv)}` did not finish within {timeout:g}s") from None
    if check and p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {p.returncode}"
        raise TestbedError(f"`{' '.join(argv)}` failed: {why}")
    return p


def run_all(cmds: Sequence[Sequence[str]]) -> None:
    for argv in cmds:
        run(argv)


def missing_tool_message(tool: str) -> str:
    pkg = _PACKAGES.get(tool)
    hint = f" (install the {pkg} package: apt-get install {pkg})" if pkg else ""
    return f"`{tool}` not found{hint}"


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (network namespaces, tc, nftables): run it as root")


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise TestbedError(missing_tool_message(tool))


def preflight(need_nft: bool) -> None:
    """Root, ip and tc always; nft only when some loss is asked for; `ip netns` must work."""
    require_root()
    require_tools("ip", "tc", *(["nft"] if need_nft else []))
    p = run(["ip", "netns", "list"], check=False)
    if p.returncode != 0:
        raise TestbedError(f"`ip netns` does not work here: {p.stderr.strip() or p.returncode}")


def list_netns() -> list[str]:
    """Names of the network namespaces `ip netns` knows (first word of each line)."""
    p = run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip()]


def netns_pids(ns: str) -> list[int]:
    p = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def link_exists(iface: str, ns: str | None = None) -> bool:
    argv = ["ip", *(["-n", ns] if ns else []), "link", "show", "dev", iface]
    return run(argv, check=False).returncode == 0
