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


@pytest.mark.adversarial
@pytest.mark.parametrize("chunks", [[1, 1], [0, 2, 2, 3], [3, 3]], ids=["pair", "inner", "last"])
def test_duplicate_indices_in_the_chunk_list_are_refused(chunks):
    """A repeated index would let the count reach the list's size with a chunk never sent."""
    with pytest.raises(ProtocolError, match="not strictly ascending"):
        ChunkLedger(MID, 4, np.array(chunks))
    with pytest.raises(ProtocolError, match="not strictly ascending"):
        ChunkLedger.from_wire(MID, 4, np.array(chunks, dtype="<i8").tobytes())


def test_chunk_list_bounds():
    for bad in ([-1, 2], [0, 4], [4]):
        with pytest.raises(ProtocolError, match="outside the heap"):
            ChunkLedger(MID, 4, np.array(bad))
    for good in ([0], [3], [0, 1, 2, 3], []):
        assert ChunkLedger(MID, 4, np.array(good, dtype=np.int64)).expected.tolist() == good


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------


def test_piece_size_fits_every_chunk_size_and_page():
    """A demanded chunk travels as PIECE-sized records installed with UFFDIO_COPY: PIECE must be a whole
    number of pages and divide every chunk size the heap accepts (powers of two from 64 KiB)."""
    import mmap

    from constmig.enclave.heap import MIN_CHUNK
    from constmig.migration.ledger import PIECE

    assert PIECE > 0 and PIECE % mmap.PAGESIZE == 0
    assert MIN_CHUNK % PIECE == 0


def test_pieces_tag_binds_every_piece_in_order():
    from constmig.migration.ledger import TAG_SIZE, pieces_tag

    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    tags = {pieces_tag([a, b, c]), pieces_tag([a, c, b]), pieces_tag([a, b]), pieces_tag([a, b, a]),
            pieces_tag([b, b, c]), pieces_tag([])}
    assert len(tags) == 6
    assert all(len(t) == TAG_SIZE for t in tags)
    assert pieces_tag([a, b, c]) == pieces_tag([a, b, c])


def test_negative_index_is_not_the_last_chunk():
    led = ChunkLedger(MID, 4, np.array([3]))
    with pytest.raises(ProtocolError, match="chunk -1 is not part of this migration"):
        led.check_acceptable(-1)
    assert led.count == 0


def test_complete_is_a_property_and_only_true_at_the_end():
    led = ChunkLedger(MID, 4, np.array([0, 2]))
    assert led.complete is False
    led.accept(0, b"a" * 16)
    assert led.complete is False and led.missing().tolist() == [2]
    led.accept(2, b"b" * 16)
    assert led.complete is True
    assert ChunkLedger(MID, 4, np.array([], dtype=np.int64)).complete is True


def test_record_sent_counts_each_chunk_once_and_keeps_the_last_tag():
    """Source side: a chunk sent again (after a reconnect) counts once; its digest uses the last copy's tag."""
    src = ChunkLedger(MID, 8, np.array([1, 4, 6]))
    src.record_sent(4, b"x" * 16)
    src.record_sent(4, b"y" * 16)
    assert src.count == 1 and src.received.tolist() == [False, False, False, False, True, False, False, False]
    assert not src.complete
    src.record_sent(1, b"a" * 16)
    src.record_sent(6, b"c" * 16)
    assert src.count == 3 and src.complete
    dst = ChunkLedger(MID, 8, np.array([1, 4, 6]))
    for i, t in ((1, b"a"), (4, b"y"), (6, b"c")):
        dst.accept(i, t * 16)
    assert src.digest() == dst.digest()


def test_keep_only_forgets_what_the_destination_lacks():
    led = ChunkLedger(MID, 8, np.array([1, 4, 6]))
    for i in (1, 4, 6):
        led.record_sent(i, bytes([i]) * 16)
    have = np.zeros(8, dtype=bool)
    have[[1, 2, 6]] = True  # 2 is not part of the migration: it must not count
    led.keep_only(have)
    assert led.count == 2 and led.missing().tolist() == [4] and not led.complete
    assert led.received.tolist() == [False, True, False, False, False, False, True, False]
    led.record_sent(4, b"z" * 16)
    assert led.count == 3 and led.complete
    led.keep_only(np.ones(8, dtype=bool))  # nothing lost: nothing changes
    assert led.count == 3
