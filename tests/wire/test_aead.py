"""RecordSealer / RecordOpener: known answers, counter discipline, and every bad argument."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from constmig.errors import IntegrityError, ProtocolError
from constmig.wire.aead import RecordOpener, RecordSealer
from constmig.wire.records import TAG_SIZE, U64_MAX

KEY = bytes(range(32))
AAD = b"header||migration-id"

# AES-256 test cases 13-16 of McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)" (the NIST
# submission), all with 96-bit IVs. Their IVs split exactly into our nonce layout direction||seq:
# 000000000000000000000000 = (0, 0) and cafebabefacedbaddecaf888 = (0xcafebabe, 0xfacedbaddecaf888).
_K16 = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
_P16 = bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
                     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
_C16 = bytes.fromhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
                     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662")
GCM_VECTORS = [  # (name, key, direction, seq, aad, plaintext, ciphertext || tag)
    ("TC13", bytes(32), 0, 0, b"", b"", bytes.fromhex("530f8afbc74536b9a963b4f1c4cb738b")),
    ("TC14", bytes(32), 0, 0, b"", bytes(16),
     bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18" "d0d1c8a799996bf0265b98b5d48ab919")),
    ("TC15", _K16, 0xCAFEBABE, 0xFACEDBADDECAF888, b"", _P16 + bytes.fromhex("1aafd255"),
     _C16 + bytes.fromhex("898015ad") + bytes.fromhex("b094dac5d93471bdec1a502270e3cc6c")),
    ("TC16", _K16, 0xCAFEBABE, 0xFACEDBADDECAF888, bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2"),
     _P16, _C16 + bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")),
]


@pytest.mark.parametrize(("name", "key", "direction", "seq", "aad", "pt", "ct"), GCM_VECTORS,
                         ids=[v[0] for v in GCM_VECTORS])
def test_known_answer_vectors(name: str, key: bytes, direction: int, seq: int, aad: bytes, pt: bytes,
                              ct: bytes) -> None:
    sealer = RecordSealer(key, direction)
    sealer._next_seq = seq  # the only way to reach the vector's IV: callers never choose a nonce
    got_seq, got = sealer.seal(aad, pt)
    assert got_seq == seq and bytes(got) == ct
    assert sealer.next_seq == seq + 1
    opener = RecordOpener(key, direction)
    opener._next_seq = seq
    out = bytearray(len(pt))
    assert bytes(opener.open(seq, aad, ct, out)) == pt == bytes(out)


def test_nonce_is_direction_then_counter() -> None:
    sealer = RecordSealer(KEY, 7)
    ref = AESGCM(KEY)
    for seq in range(3):
        data = os.urandom(100)
        got_seq, ct = sealer.seal(AAD, data)
        assert got_seq == seq
        assert bytes(ct) == ref.encrypt(struct.pack("!IQ", 7, seq), data, AAD)


def test_round_trip_into_caller_buffers_and_numpy() -> None:
    sealer, opener = RecordSealer(KEY, 1), RecordOpener(KEY, 1)
    heap = np.arange(1 << 16, dtype=np.float64)  # 512 KiB of non-byte data: sealed without a copy
    out = bytearray(heap.nbytes + TAG_SIZE)
    seq, ct = sealer.seal(AAD, memoryview(heap), out)
    assert ct.obj is out and seq == 0
    target = np.zeros_like(heap)
    plain = opener.open(0, AAD, out, memoryview(target))
    assert len(plain) == heap.nbytes and np.array_equal(target, heap)
    # without out: a fresh buffer
    _, ct2 = sealer.seal(b"", b"abc")
    assert bytes(opener.open(1, b"", bytes(ct2))) == b"abc"


def test_internal_buffer_is_reused() -> None:
    sealer = RecordSealer(KEY, 1)
    _, a = sealer.seal(AAD, bytes(1000))
    _, b = sealer.seal(AAD, bytes(500))
    assert a.obj is b.obj  # no allocation for a smaller or equal record
    assert len(b) == 500 + TAG_SIZE


def sealed(n: int = 3, direction: int = 1) -> list[bytes]:
    sealer = RecordSealer(KEY, direction)
    return [bytes(sealer.seal(AAD, f"record {i}".encode())[1]) for i in range(n)]


def test_strict_order() -> None:
    recs = sealed(3)
    opener = RecordOpener(KEY, 1)
    assert bytes(opener.open(0, AAD, recs[0])) == b"record 0"
    assert opener.expected_seq == 1


@pytest.mark.parametrize(("seq", "match"), [
    (0, "replayed or duplicated"),
    (2, "reordered, or records were dropped"),
])
def test_replay_and_drop_fail(seq: int, match: str) -> None:
    recs = sealed(3)
    opener = RecordOpener(KEY, 1)
    opener.open(0, AAD, recs[0])
    with pytest.raises(IntegrityError, match=match):
        opener.open(seq, AAD, recs[seq])


def test_right_seq_wrong_record_fails() -> None:
    """A record presented under another seq number (its nonce) fails its tag."""
    recs = sealed(3)
    opener = RecordOpener(KEY, 1)
    with pytest.raises(IntegrityError, match="failed authentication"):
        opener.open(0, AAD, recs[1])


@pytest.mark.parametrize("where", ["ct", "tag", "aad"])
def test_tampering_fails_zeroes_out_and_poisons(where: str) -> None:
    recs = sealed(2)
    ct, aad = bytearray(recs[0]), bytearray(AAD)
    if where == "ct":
        ct[0] ^= 1
    elif where == "tag":
        ct[-1] ^= 0x80
    else:
        aad[-1] ^= 1
    opener = RecordOpener(KEY, 1)
    out = bytearray(b"\xaa" * (len(ct) - TAG_SIZE))
    with pytest.raises(IntegrityError, match="failed authentication"):
        opener.open(0, bytes(aad), ct, out)
    assert out == bytes(len(out))  # no unverified plaintext left behind
    assert opener.failed
    # even the genuine records are refused now
    with pytest.raises(IntegrityError, match="unusable after an earlier failure"):
        opener.open(0, AAD, recs[0])
    with pytest.raises(IntegrityError, match="unusable"):
        opener.check_seq(0)


def test_seq_failure_also_poisons() -> None:
    recs = sealed(2)
    opener = RecordOpener(KEY, 1)
    with pytest.raises(IntegrityError):
        opener.open(1, AAD, recs[1])
    with pytest.raises(IntegrityError, match="unusable"):
        opener.open(0, AAD, recs[0])


@pytest.mark.parametrize(("key", "direction"), [(bytes(32), 1), (KEY, 2)])
def test_other_key_or_direction_fails(key: bytes, direction: int) -> None:
    with pytest.raises(IntegrityError):
        RecordOpener(key, direction).open(0, AAD, sealed(1)[0])


def test_short_ciphertext_is_an_integrity_error() -> None:
    opener = RecordOpener(KEY, 1)
    with pytest.raises(IntegrityError, match="shorter than its 16-byte tag"):
        opener.open(0, AAD, bytes(15), bytearray(0))


def test_counters_refuse_to_wrap() -> None:
    sealer = RecordSealer(KEY, 1)
    sealer._next_seq = U64_MAX
    seq, ct = sealer.seal(AAD, b"last")
    assert seq == U64_MAX
    with pytest.raises(ProtocolError, match="exhausted"):
        sealer.seal(AAD, b"one too many")
    opener = RecordOpener(KEY, 1)
    opener._next_seq = U64_MAX
    assert bytes(opener.open(U64_MAX, AAD, bytes(ct))) == b"last"
    with pytest.raises(IntegrityError, match="exhausted"):
        opener.open(U64_MAX + 1, AAD, bytes(ct))


def test_repr_hides_key() -> None:
    for obj in (RecordSealer(KEY, 1), RecordOpener(KEY, 1)):
        assert KEY.hex() not in repr(obj) and str(KEY) not in repr(obj)


@pytest.mark.parametrize(("key", "exc"), [
    (bytes(31), ValueError), (bytes(33), ValueError), (bytes(16), ValueError), (bytes(24), ValueError),
    (b"", ValueError), ("k" * 32, TypeError), (None, TypeError), (12345, TypeError),
])
@pytest.mark.parametrize("cls", [RecordSealer, RecordOpener])
def test_bad_keys(cls: type, key: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        cls(key, 1)


@pytest.mark.parametrize(("direction", "exc"), [
    (-1, ValueError), (1 << 32, ValueError), (1.0, TypeError), ("1", TypeError), (True, TypeError), (None, TypeError),
])
@pytest.mark.parametrize("cls", [RecordSealer, RecordOpener])
def test_bad_directions(cls: type, direction: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        cls(KEY, direction)


def test_key_may_be_any_bytes_like() -> None:
    RecordSealer(bytearray(KEY), 0xFFFFFFFF)
    RecordOpener(memoryview(KEY), 0)


@pytest.mark.parametrize(("aad", "data", "out", "exc"), [
    (None, b"x", None, TypeError),
    ("aad", b"x", None, TypeError),
    (AAD, "text", None, TypeError),
    (AAD, 42, None, TypeError),
    (AAD, b"x", bytearray(1), ValueError),  # must be exactly len(data) + 16
    (AAD, b"x", bytearray(18), ValueError),
    (AAD, b"x", bytes(17), TypeError),  # read-only
    (AAD, b"x", "not a buffer", TypeError),
    (AAD, b"x", np.zeros((4, 8), dtype=np.uint8)[:, :4], ValueError),  # not contiguous
])
def test_seal_bad_arguments_do_not_consume_a_seq(aad: object, data: object, out: object,
                                                 exc: type[Exception]) -> None:
    sealer = RecordSealer(KEY, 1)
    with pytest.raises(exc):
        sealer.seal(aad, data, out)
    assert sealer.next_seq == 0


@pytest.mark.parametrize(("seq", "aad", "ct_ok", "out", "exc"), [
    ("0", AAD, True, None, TypeError),
    (None, AAD, True, None, TypeError),
    (False, AAD, True, None, TypeError),
    (0, None, True, None, TypeError),
    (0, AAD, False, None, TypeError),
    (0, AAD, True, bytearray(3), ValueError),
    (0, AAD, True, bytes(8), TypeError),
    (0, AAD, True, 7, TypeError),
])
def test_open_bad_arguments_do_not_poison(seq: object, aad: object, ct_ok: bool, out: object,
                                          exc: type[Exception]) -> None:
    rec = sealed(1)[0]
    opener = RecordOpener(KEY, 1)
    with pytest.raises(exc):
        opener.open(seq, aad, rec if ct_ok else "ciphertext", out)
    assert not opener.failed and opener.expected_seq == 0
    assert bytes(opener.open(0, AAD, rec)) == b"record 0"


# --- found by mutation testing (tools/mutation.py): each kills a mutant no test above caught ---------------


def test_internal_buffer_is_reused_for_an_equal_size() -> None:
    sealer = RecordSealer(KEY, 1)
    _, a = sealer.seal(AAD, bytes(700))
    _, b = sealer.seal(AAD, bytes(700))
    assert a.obj is b.obj and len(b) == 700 + TAG_SIZE


@pytest.mark.parametrize("cls", [RecordSealer, RecordOpener])
def test_direction_is_a_read_only_property(cls: type) -> None:
    end = cls(KEY, 7)
    assert end.direction == 7
    with pytest.raises(AttributeError):
        end.direction = 8


@pytest.mark.parametrize("start", [1, 5, U64_MAX])
def test_sealer_and_opener_continue_at_a_start_seq(start: int) -> None:
    """A sealer or opener handed to another trusted process (the pager) continues where it stopped."""
    sealer, opener = RecordSealer(KEY, 3, start), RecordOpener(KEY, 3, start)
    assert sealer.next_seq == opener.expected_seq == start
    seq, ct = sealer.seal(AAD, b"continued")
    assert seq == start
    assert bytes(opener.open(start, AAD, bytes(ct))) == b"continued"
    assert bytes(ct) == AESGCM(KEY).encrypt(struct.pack("!IQ", 3, start), b"continued", AAD)


@pytest.mark.parametrize("cls", [RecordSealer, RecordOpener])
@pytest.mark.parametrize("start", [-1, U64_MAX + 1, True, False, "1", 1.0, None])
def test_bad_start_seqs(cls: type, start: object) -> None:
    with pytest.raises(ValueError, match="start seq must be an int in 0..2"):
        cls(KEY, 1, start)


@pytest.mark.parametrize("shape", [(4, 8), (2, 2, 8)])
def test_multidimensional_byte_views_are_sealed_flat(shape: tuple[int, ...]) -> None:
    """A 2-D (or 3-D) view of bytes is 32 bytes of data, not 4 (or 2) rows: sealed and opened flat."""
    data = np.arange(32, dtype=np.uint8).reshape(shape)
    seq, ct = RecordSealer(KEY, 1).seal(memoryview(data), memoryview(data))
    assert bytes(ct) == AESGCM(KEY).encrypt(struct.pack("!IQ", 1, 0), data.tobytes(), data.tobytes())
    out = np.zeros(shape, dtype=np.uint8)
    RecordOpener(KEY, 1).open(seq, memoryview(data), bytes(ct), memoryview(out))
    assert np.array_equal(out, data)


def test_empty_record_still_checks_out() -> None:
    """A record of no plaintext (a bare tag): `out` must still be exactly 0 bytes."""
    _, ct = RecordSealer(KEY, 1).seal(AAD, b"")
    ct = bytes(ct)
    with pytest.raises(ValueError, match="must be exactly 0 bytes"):
        RecordOpener(KEY, 1).open(0, AAD, ct, bytearray(5))
    opener = RecordOpener(KEY, 1)
    assert bytes(opener.open(0, AAD, ct, bytearray(0))) == b""
    assert opener.expected_seq == 1


def test_zero_dimensional_byte_view_is_one_byte() -> None:
    scalar = np.uint8(0x5A)
    view = memoryview(scalar)
    assert view.ndim == 0
    _, ct = RecordSealer(KEY, 1).seal(AAD, view)
    assert bytes(RecordOpener(KEY, 1).open(0, AAD, bytes(ct))) == b"\x5a"
