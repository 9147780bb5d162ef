"""A bulk native stream between two real processes over TCP: 64 MiB of chunks (some zero, in shuffled
order, demand-flagged) arrive with identical bytes and the tags the sender recorded."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import socket
from typing import Any

import numpy as np
import pytest

from constmig.native import engine

pytestmark = pytest.mark.skipif(not engine.available(), reason=f"{engine.why_unavailable()}")

MID = bytes(range(16))
KEY = bytes([7]) * 32
CS = 1 << 20
N = 64  # chunks: 64 MiB
ZERO = (3, 17, 40)


def _receive(port: int, conn: Any) -> None:
    """Child: open N chunks natively into a fresh heap; send back the heap's digest, indexes, tags, flags."""
    try:
        heap = np.full(N * CS, 0xAA, dtype=np.uint8)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            got = engine.NativeOpener(KEY, 3, MID, 1000).recv_chunks(sock, heap, CS, N, timeout=60)
        conn.send((hashlib.sha256(heap).hexdigest(), got.indexes.tolist(), got.tags.tobytes(), got.flags.tolist(),
                   got.next_seq))
    except Exception as e:  # noqa: BLE001 (reported to the parent)
        conn.send(f"{type(e).__name__}: {e}")


def test_64_mib_arrive_whole_between_two_processes():
    rng = np.random.default_rng(1)
    heap = rng.integers(0, 256, N * CS, dtype=np.uint8)
    for i in ZERO:
        heap[i * CS:(i + 1) * CS] = 0
    order = rng.permutation(N).astype(np.int64)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = ctx.Process(target=_receive, args=(server.getsockname()[1], child), daemon=True)
        proc.start()
        try:
            server.settimeout(60)
            sock, _ = server.accept()
            with sock:
                sealer = engine.NativeSealer(KEY, 3, MID, 1000)
                tags = sealer.send_chunks(sock, heap, CS, order, demand=True, timeout=60)
            assert parent.poll(120), "receiver did not answer within 120 s"
            answer = parent.recv()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert not isinstance(answer, str), answer
    digest, indexes, got_tags, flags, next_seq = answer
    assert digest == hashlib.sha256(heap).hexdigest()
    assert indexes == order.tolist() and got_tags == tags.tobytes()
    assert next_seq == sealer.next_seq == 1000 + N and sealer.zero_chunks_sent == len(ZERO)
    assert [f & 2 != 0 for f in flags] == [int(i) in ZERO for i in order] and all(f & 1 for f in flags)
