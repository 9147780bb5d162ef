"""Fixtures the channel tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from keyed import keyed_pair

from constmig.wire.channel import SecureChannel


@pytest.fixture
def pair() -> Iterator[tuple[SecureChannel, SecureChannel]]:
    """(source, destination) channels with keys installed."""
    with keyed_pair() as chans:
        yield chans
