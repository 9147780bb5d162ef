import numpy as np
import pytest

from constmig.errors import ProtocolError
from constmig.migration.ledger import ChunkLedger

MID = b"m" * 16


def test_accept_once_and_complete():
    led = ChunkLedger(MID, 10, np.array([1, 3, 5]))
    for i in (5, 1, 3):
        led.accept(i, bytes([i]) * 16)
    assert led.complete and led.missing().size == 0
    with pytest.raises(ProtocolError, match="twice"):
        led.accept(3, b"x" * 16)


def test_unexpected_and_out_of_range_chunks():
    led = ChunkLedger(MID, 10, np.array([1]))
    for bad in (0, 2, 10, -1, 1 << 40):
        with pytest.raises(ProtocolError):
            led.accept(bad, b"t" * 16)


def test_bad_chunk_lists():
    with pytest.raises(ProtocolError):
        ChunkLedger(MID, 4, np.array([0, 4]))
    with pytest.raises(ProtocolError):
        ChunkLedger(MID, 4, np.array([2, 1]))
    with pytest.raises(ProtocolError):
        ChunkLedger.from_wire(MID, 4, b"\x00" * 7)


def test_digest_binds_tags_ids_and_migration():
    src = ChunkLedger(MID, 8, np.array([0, 2]))
    dst = ChunkLedger.from_wire(MID, 8, src.to_wire())
    for led in (src, dst):
        led.accept(0, b"a" * 16)
        led.accept(2, b"b" * 16)
    assert src.digest() == dst.digest()
    other = ChunkLedger(b"n" * 16, 8, np.array([0, 2]))
    other.accept(0, b"a" * 16)
    other.accept(2, b"b" * 16)
    assert other.digest() != src.digest()
    swapped = ChunkLedger(MID, 8, np.array([0, 2]))
    swapped.accept(0, b"b" * 16)
    swapped.accept(2, b"a" * 16)
    assert swapped.digest() != src.digest()
