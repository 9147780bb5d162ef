import asyncio
import contextlib
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from constmig.errors import ChannelClosed, ProtocolError
from constmig.wire.framing import MAX_FRAME, FramedSocket, decode_body, encode, read_frame


def test_roundtrip_with_fds():
    a, b = socket.socketpair()
    fa, fb = FramedSocket(a), FramedSocket(b)
    r, w = os.pipe()
    fa.send({"op": "x", "n": 1}, fds=[r])
    fa.send({"op": "y"})
    msg, fds = fb.recv()
    assert msg == {"op": "x", "n": 1} and len(fds) == 1
    os.write(w, b"hi")
    assert os.read(fds[0], 2) == b"hi"
    assert fb.recv() == ({"op": "y"}, [])
    for fd in (r, w, fds[0]):
        os.close(fd)
    fa.close()
    with pytest.raises(ChannelClosed):
        fb.recv()
    fb.close()


def test_oversized_announcement_refused():
    a, b = socket.socketpair()
    a.sendall((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="limit"):
        FramedSocket(b).recv()
    a.close()
    b.close()


@given(st.binary(max_size=64))
def test_garbage_bodies_only_raise_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        decode_body(data)


def test_async_reader_eof_mid_frame():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(encode({"a": 1})[:-1])
        reader.feed_eof()
        with pytest.raises(ChannelClosed):
            await read_frame(reader)

    asyncio.run(go())


def test_unencodable_message_is_a_protocol_error():
    """An ECALL result msgpack cannot carry must become an error reply, not kill the enclave's loop."""
    from constmig.errors import ProtocolError
    from constmig.wire.framing import encode

    for bad in ({"result": 2**70}, {"result": object()}):
        with pytest.raises(ProtocolError, match="cannot be encoded"):
            encode(bad)
