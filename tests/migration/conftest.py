"""Fixtures the migration tests share (the helpers behind them are in scripted.py)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from scripted import Enclaves, World, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def enclaves(world: World) -> Iterator[Enclaves]:
    e = Enclaves(world)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket pair, shut down and closed after the test."""
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
