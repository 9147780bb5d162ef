"""Channels with keys installed, for the channel tests (test_channel.py, test_channel_batch.py): one
migration id and one key per direction, the source sending as direction 1."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from constmig.wire.channel import SecureChannel

MID = bytes(range(16))
OTHER_MID = bytes(range(1, 17))
K_S2D = bytes([1]) * 32
K_D2S = bytes([2]) * 32


def install_source(ch: SecureChannel, mid: bytes | None = None) -> None:
    ch.install_keys(K_S2D, K_D2S, 1, 2, migration_id=mid)


def install_destination(ch: SecureChannel, mid: bytes | None = None) -> None:
    ch.install_keys(K_D2S, K_S2D, 2, 1, migration_id=mid)


@contextmanager
def keyed_pair() -> Iterator[tuple[SecureChannel, SecureChannel]]:
    """(source, destination) channels over a socketpair, keys installed, closed after."""
    a, b = socket.socketpair()
    src, dst = SecureChannel(a, MID), SecureChannel(b, MID)
    install_source(src)
    install_destination(dst)
    try:
        yield src, dst
    finally:
        src.close()
        dst.close()
