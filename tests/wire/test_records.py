"""The record header: every field validated before a payload byte is read."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constmig.errors import ProtocolError
from constmig.wire.records import (
    FLAG_DEMAND,
    FLAG_ZERO,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK,
    MAX_CONTROL_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    TAG_SIZE,
    U64_MAX,
    Header,
    Kind,
    max_length,
    pack_header,
    parse_header,
)


def raw(magic=MAGIC, kind=2, flags=0, reserved=0, length=100, seq=0, arg=0) -> bytes:
    return HEADER.pack(magic, kind, flags, reserved, length, seq, arg)


def test_layout_is_fixed() -> None:
    assert HEADER_SIZE == 28
    assert HEADER.format == "!4sBBHIQQ"
    h = pack_header(Kind.CHUNK, 1 << 20, seq=7, arg=9, flags=FLAG_DEMAND)
    assert h == MAGIC + bytes([3, 1, 0, 0]) + struct.pack("!IQQ", 1 << 20, 7, 9)


@pytest.mark.parametrize(("kind", "length", "arg", "flags"), [
    (Kind.HANDSHAKE, 0, 0, 0),
    (Kind.HANDSHAKE, MAX_HANDSHAKE_PAYLOAD, 0, 0),
    (Kind.CONTROL, TAG_SIZE, 0, 0),
    (Kind.CONTROL, MAX_CONTROL_PAYLOAD + TAG_SIZE, 0, 0),
    (Kind.CHUNK, TAG_SIZE + 1, U64_MAX, 0),
    (Kind.CHUNK, MAX_CHUNK + TAG_SIZE, 3, FLAG_DEMAND),
])
def test_round_trip(kind: Kind, length: int, arg: int, flags: int) -> None:
    h = parse_header(pack_header(kind, length, seq=U64_MAX, arg=arg, flags=flags))
    assert h == Header(kind, flags, length, U64_MAX, arg)
    assert h.pack() == pack_header(kind, length, U64_MAX, arg, flags)
    assert h.plaintext_length == (length if kind is Kind.HANDSHAKE else length - TAG_SIZE)


@pytest.mark.parametrize(("data", "match"), [
    (raw(magic=b"CMG2"), "bad record magic"),
    (raw(magic=b"GET "), "not a constmig stream"),
    (raw(kind=0), "unknown record kind 0"),
    (raw(kind=4), "unknown record kind 4"),
    (raw(kind=255), "unknown record kind 255"),
    (raw(reserved=1), "reserved field"),
    (raw(reserved=0x8000), "reserved field"),
    (raw(flags=FLAG_DEMAND), "unknown flags"),  # DEMAND is for chunks only
    (raw(kind=3, flags=0x04), "unknown flags"),
    (raw(kind=3, flags=FLAG_ZERO, length=100), "zero CHUNK record length 100"),  # a zero chunk carries 4+16
    (raw(kind=2, flags=FLAG_ZERO, length=20), "unknown flags"),
    (raw(kind=1, flags=0x80, length=1), "unknown flags"),
    (raw(kind=1, length=MAX_HANDSHAKE_PAYLOAD + 1), "outside"),
    (raw(kind=2, length=MAX_CONTROL_PAYLOAD + TAG_SIZE + 1), "outside"),
    (raw(kind=2, length=TAG_SIZE - 1), "outside"),
    (raw(kind=3, length=TAG_SIZE), "outside"),  # an empty chunk
    (raw(kind=3, length=max_length(Kind.CHUNK) + 1), "outside"),
    (raw(kind=3, length=0xFFFFFFFF), "outside"),
    (raw(kind=2, arg=1), "nonzero arg"),
    (raw(kind=1, length=5, arg=U64_MAX), "nonzero arg"),
])
def test_invalid_headers_are_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as e:
        parse_header(data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size", [0, 27, 29, 100])
def test_wrong_header_size(size: int) -> None:
    with pytest.raises(ProtocolError, match="must be 28 bytes"):
        parse_header(bytes(size))


def test_parse_accepts_any_buffer() -> None:
    h = pack_header(Kind.CONTROL, 40, seq=1)
    assert parse_header(bytearray(h)) == parse_header(memoryview(h)) == parse_header(h)


@pytest.mark.parametrize(("args", "exc"), [
    ((9, 10, 0), ValueError),  # unknown kind
    ((Kind.CONTROL, 10, 0), ValueError),  # shorter than a tag
    ((Kind.CHUNK, MAX_CHUNK * 2, 0), ValueError),
    ((Kind.CONTROL, 40, -1), ValueError),
    ((Kind.CONTROL, 40, U64_MAX + 1), ValueError),
    ((Kind.CHUNK, 40, 0, -1), ValueError),
    ((Kind.CONTROL, 40, 0, 5), ValueError),
    ((Kind.HANDSHAKE, 4, 0, 0, FLAG_DEMAND), ValueError),
])
def test_pack_rejects_what_a_peer_would_reject(args: tuple, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        pack_header(*args)


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_any_28_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    try:
        h = parse_header(data)
    except ProtocolError:
        return
    assert h.pack() == data


@given(st.sampled_from(list(Kind)), st.integers(0, U64_MAX), st.integers(0, U64_MAX),
       st.integers(0, MAX_CHUNK + TAG_SIZE), st.booleans())
def test_valid_fields_round_trip(kind: Kind, seq: int, arg: int, length: int, demand: bool) -> None:
    if kind is not Kind.CHUNK:
        arg, demand = 0, False
    try:
        packed = pack_header(kind, length, seq, arg, FLAG_DEMAND if demand else 0)
    except ValueError:
        with pytest.raises(ProtocolError):
            parse_header(raw(kind=kind, length=length, seq=seq, arg=arg, flags=FLAG_DEMAND if demand else 0))
        return
    assert parse_header(packed) == Header(kind, FLAG_DEMAND if demand else 0, length, seq, arg)


# --- found by mutation testing (tools/mutation.py) -------------------------------------------------------


def test_length_bounds_are_the_documented_ones() -> None:
    """The bounds are part of the wire format (both ends must agree) and what keeps a forged header from
    making a receiver allocate or wait for more: the largest heap chunk plus tag and a 256-byte margin,
    1 MiB of handshake, 1 MiB of control plaintext plus tag."""
    from constmig.enclave.heap import MAX_CHUNK as HEAP_MAX_CHUNK

    assert MAX_CHUNK == HEAP_MAX_CHUNK == 4 << 20
    bounds = {Kind.CHUNK: HEAP_MAX_CHUNK + TAG_SIZE + 256, Kind.HANDSHAKE: 1 << 20, Kind.CONTROL: (1 << 20) + TAG_SIZE}
    assert (MAX_HANDSHAKE_PAYLOAD, MAX_CONTROL_PAYLOAD) == (1 << 20, 1 << 20)
    for kind, top in bounds.items():
        assert max_length(kind) == top
        arg = 1 if kind == Kind.CHUNK else 0
        assert parse_header(pack_header(kind, top, 0, arg)).length == top
        with pytest.raises(ValueError, match="outside"):
            pack_header(kind, top + 1, 0, arg)
        with pytest.raises(ProtocolError, match="outside"):
            parse_header(raw(kind=int(kind), length=top + 1, arg=arg))


@pytest.mark.parametrize("field", ["seq", "arg"])
def test_64_bit_fields_reach_exactly_u64_max(field: str) -> None:
    assert U64_MAX == 2**64 - 1
    top = {"seq": 0, "arg": 0, field: 2**64 - 1}
    h = parse_header(pack_header(Kind.CHUNK, 100, top["seq"], top["arg"]))
    assert (h.seq, h.arg) == (top["seq"], top["arg"])
    with pytest.raises(ValueError, match="64 bits"):
        pack_header(Kind.CHUNK, 100, **{**top, field: 2**64})


def test_header_is_immutable_and_slotted() -> None:
    import dataclasses

    h = parse_header(raw())
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.seq = 5  # type: ignore[misc]
    assert not hasattr(h, "__dict__")


def test_pack_header_into_defaults_to_arg_zero_and_no_flags() -> None:
    from constmig.wire.records import pack_header_into

    buf = bytearray(HEADER_SIZE + 4)
    pack_header_into(buf, Kind.CONTROL, 100, 7)
    assert bytes(buf[:HEADER_SIZE]) == pack_header(Kind.CONTROL, 100, 7) == raw(kind=2, length=100, seq=7)
    assert bytes(buf[HEADER_SIZE:]) == bytes(4)


def test_negative_lengths_are_refused_as_value_errors() -> None:
    for kind in Kind:
        with pytest.raises(ValueError, match="outside"):
            pack_header(kind, -1, 0, 1 if kind == Kind.CHUNK else 0)


def test_zero_chunk_length_message_names_the_only_valid_length() -> None:
    from constmig.wire.records import FLAG_ZERO, ZERO_PAYLOAD

    assert ZERO_PAYLOAD + TAG_SIZE == 20
    with pytest.raises(ProtocolError, match="zero CHUNK record length 100 is not 20$"):
        parse_header(raw(kind=3, flags=FLAG_ZERO, length=100, arg=1))
