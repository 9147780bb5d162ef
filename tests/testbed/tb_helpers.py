"""Skip rules and helpers shared by the testbed tests that build real namespaces (imported, not a conftest)."""

import os
import shutil
import subprocess

import pytest


def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, nftables)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed (iproute2)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None


NETNS_REASON = _netns_reason()
needs_netns = pytest.mark.skipif(NETNS_REASON is not None, reason=NETNS_REASON or "")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None,
                               reason="`nft` not installed (apt-get install nftables): loss rules need it")


def unique_name(tag: str) -> str:
    """Short testbed names (8 characters at most) that do not collide with another run's."""
    return f"{tag}{os.getpid() % 100000:05d}"[:8]
