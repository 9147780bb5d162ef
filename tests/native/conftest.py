"""Shared fixtures of the engine's tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: the engine sends on one end and receives on the other."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()
