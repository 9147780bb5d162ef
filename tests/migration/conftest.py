"""Fixtures the migration tests share (the helpers behind them are in scripted.py)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from scripted import Enclaves, Pairs, World, make_world


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


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    """Two socket pairs (main and demand connections): `real` ends for the code under test, `fake` ends
    for the scripted peer."""
    main, demand = socket.socketpair(), socket.socketpair()
    p = Pairs([main[0], demand[0]], [main[1], demand[1]])
    try:
        yield p
    finally:
        p.close()
