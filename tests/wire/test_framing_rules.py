"""Control frames (framing.py), rule by rule: the size limit at its edge, frames that arrive in pieces,
descriptors that ride along (and only SCM_RIGHTS ones), exchange() with progress, and lost connections
as ChannelClosed. Found wanting by mutation testing (tools/mutation.py); test_framing.py has the rest."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from constmig.errors import ChannelClosed, ProtocolError
from constmig.wire.framing import MAX_FRAME, FramedSocket, encode, read_frame, write_frame


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def frame_of_body_size(size: int) -> bytes:
    """A frame whose msgpack body is exactly `size` bytes: {"b": <bin32 of size - 8 bytes>}."""
    frame = encode({"b": bytes(size - 8)})
    assert len(frame) - 4 == size
    return frame


def test_limit_is_8_mib_and_inclusive() -> None:
    assert MAX_FRAME == 8 << 20
    frame_of_body_size(MAX_FRAME)
    with pytest.raises(ProtocolError, match=f"control message of {MAX_FRAME + 1} bytes exceeds"):
        encode({"b": bytes(MAX_FRAME + 1 - 8)})


def read_async(data: bytes, exc: BaseException | None = None) -> dict:
    async def main() -> dict:
        reader = asyncio.StreamReader(limit=MAX_FRAME * 2)
        reader.feed_data(data)
        if exc is not None:
            reader.set_exception(exc)
        else:
            reader.feed_eof()
        return await read_frame(reader)
    return asyncio.run(main())


def test_reader_takes_a_frame_of_exactly_the_limit() -> None:
    assert len(read_async(frame_of_body_size(MAX_FRAME))["b"]) == MAX_FRAME - 8
    with pytest.raises(ProtocolError, match=f"announced a {MAX_FRAME + 1}-byte control message"):
        read_async(struct.pack("!I", MAX_FRAME + 1))


def test_lost_connections_are_channel_closed() -> None:
    with pytest.raises(ChannelClosed, match="connection lost"):
        read_async(b"", ConnectionResetError("reset by peer"))

    class Writer:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            raise ConnectionResetError("reset by peer")

    with pytest.raises(ChannelClosed, match="connection lost"):
        asyncio.run(write_frame(Writer(), {"op": "x"}))  # type: ignore[arg-type]


def test_blocking_socket_errors_are_channel_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(ChannelClosed, match="connection lost"):
        FramedSocket(a).send({"op": "x" * 100_000})  # the peer is gone: EPIPE
    c, d = socket.socketpair()
    fs = FramedSocket(c)
    c.close()
    with pytest.raises(ChannelClosed, match="connection lost"):
        fs.recv()  # our own socket is closed: EBADF
    d.close()


def test_frame_arriving_in_pieces(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frame = encode({"op": "slow", "data": bytes(3000)})

    def drip() -> None:
        for i in range(0, len(frame), 700):
            a.sendall(frame[i:i + 700])
            time.sleep(0.01)

    t = threading.Thread(target=drip)
    t.start()
    obj, fds = FramedSocket(b).recv()
    t.join()
    assert obj == {"op": "slow", "data": bytes(3000)} and fds == []


def test_large_frame_with_descriptors_is_sent_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    """sendmsg() may take only part of a big frame; the rest must follow (the fds ride with the first part)."""
    a, b = pair
    a.settimeout(10)  # with a timeout a send returns what fitted in the socket buffer, not all of it
    b.settimeout(10)
    r, w = os.pipe()
    got: list = []

    def receive() -> None:
        try:
            got.append(FramedSocket(b).recv())
        except ChannelClosed as e:
            got.append(e)

    t = threading.Thread(target=receive)
    t.start()
    FramedSocket(a).send({"data": bytes(4 << 20)}, [r])
    t.join(20)
    assert got and not isinstance(got[0], Exception), got
    obj, fds = got[0]
    assert len(obj["data"]) == 4 << 20 and len(fds) == 1
    os.write(w, b"x")
    assert os.read(fds[0], 1) == b"x"
    for fd in (r, w, *fds):
        os.close(fd)


def test_sixteen_descriptors_in_one_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    pipes = [os.pipe() for _ in range(8)]
    sent = [fd for p in pipes for fd in p]
    FramedSocket(a).send({"op": "fds"}, sent)
    obj, fds = FramedSocket(b).recv()
    assert obj == {"op": "fds"} and len(fds) == 16
    for fd in sent + fds:
        os.close(fd)


def test_credentials_are_not_taken_for_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    """Only SCM_RIGHTS carries descriptors; an SCM_CREDENTIALS message (also SOL_SOCKET) is not one."""
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
    a.sendmsg([encode({"op": "creds"})], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
    obj, fds = FramedSocket(b).recv()
    assert obj == {"op": "creds"} and fds == []


def test_exchange_skips_progress_and_closes_stray_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    seen: list[dict] = []
    client, server = FramedSocket(a), FramedSocket(b)
    r, w = os.pipe()

    def serve() -> None:
        req, _ = server.recv()
        assert req == {"op": "work"}
        server.send({"progress": {"done": 1}}, [r])  # a descriptor no reply should carry
        server.send({"progress": {"done": 2}})
        server.send({"ok": True, "result": 42})

    t = threading.Thread(target=serve)
    t.start()
    before = open_fds()
    assert client.exchange({"op": "work"}, on_progress=seen.append) == {"ok": True, "result": 42}
    t.join(10)
    assert seen == [{"done": 1}, {"done": 2}]
    assert open_fds() == before, "a descriptor that came with a progress frame was left open"
    t = threading.Thread(target=lambda: (server.recv(), server.send({"progress": 3}), server.send({"ok": 1})))
    t.start()
    assert client.exchange({"op": "quiet"}) == {"ok": 1}  # progress without a callback is skipped
    t.join(10)
    os.close(r)
    os.close(w)


def test_close_releases_descriptors_of_an_unfinished_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    frame = encode({"op": "cut"})
    a.sendmsg([frame[:5]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    a.close()  # the rest of the frame never comes
    fs = FramedSocket(b)
    before = open_fds()
    with pytest.raises(ChannelClosed):
        fs.recv()
    assert open_fds() == before + 1  # the descriptor arrived with the first part and is held
    fs.close()
    assert open_fds() == before - 1  # ...and released with the socket
    os.close(r)
    os.close(w)
