"""How a verified chunk reaches the heap: never decrypted in place, where GCM would put unverified
plaintext into writable heap memory before it knows the tag."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from constmig.enclave.heap import Heap
from constmig.enclave.tracker import AccessTracker
from constmig.errors import IntegrityError
from constmig.kernel.uffd import buffer_address
from constmig.migration.trackers.access import AccessInstaller
from constmig.wire.channel import SealedChunk, SecureChannel

MiB = 1 << 20
MID = bytes(range(16))


@pytest.fixture
def setup(monkeypatch):
    heap = Heap(4 * MiB)
    tracker = AccessTracker(heap, np.arange(4, dtype=np.int64), lambda chunks: None, timeout=5)
    a, b = socket.socketpair()
    src, dst = SecureChannel(a, MID), SecureChannel(b, MID)
    src.install_keys(b"s" * 32, b"d" * 32, 1, 2)
    dst.install_keys(b"d" * 32, b"s" * 32, 2, 1)
    targets: list[int] = []
    real = SecureChannel.open_chunk

    def spy(self, sealed, out):
        targets.append(buffer_address(out))
        return real(self, sealed, out)

    monkeypatch.setattr(SecureChannel, "open_chunk", spy)
    yield heap, tracker, src, dst, targets
    for t in _threads:
        t.join(5)
    _threads.clear()
    src.close()
    dst.close()
    heap.close()


def send(ch: SecureChannel, index: int, data: bytes, demand: bool = False) -> None:
    """Send from a thread: a 1 MiB record does not fit the socket buffer of a one-thread test."""
    t = threading.Thread(target=ch.send_chunk, args=(index, data), kwargs={"demand": demand})
    t.start()
    _threads.append(t)


_threads: list[threading.Thread] = []


def in_heap(heap: Heap, address: int) -> bool:
    return heap.address <= address < heap.address + heap.size


def test_access_installer_verifies_outside_the_heap(setup):
    heap, tracker, src, dst, targets = setup
    send(src, 1, b"d" * MiB)
    rec = dst.recv(timeout=5)
    assert isinstance(rec, SealedChunk)
    AccessInstaller(tracker, MiB).install(1, rec, dst, demand=False)
    assert targets and not any(in_heap(heap, t) for t in targets)
    assert bytes(heap.chunk_view(1)) == b"d" * MiB and not tracker.missing[1]


def test_access_installer_pieces_and_zero_chunks(setup):
    heap, tracker, src, dst, targets = setup
    inst = AccessInstaller(tracker, MiB)
    np.frombuffer(heap.chunk_view(2), dtype=np.uint8)[:] = 7  # stale bytes a zero chunk must overwrite
    send(src, 2, bytes(MiB))
    rec = dst.recv(timeout=5)
    inst.install(2, rec, dst, demand=True)
    assert not any(heap.chunk_view(2)) and not tracker.missing[2]
    for p in range(16):
        send(src, 3 * 16 + p, bytes([p + 1]) * (64 << 10), demand=True)
        inst.install_piece(3, p, dst.recv(timeout=5), dst)
    inst.chunk_done(3)
    assert not any(in_heap(heap, t) for t in targets)
    assert np.array_equal(np.frombuffer(heap.chunk_view(3), dtype=np.uint8).reshape(16, -1)[:, 0],
                          np.arange(1, 17, dtype=np.uint8))


def test_access_installer_leaves_a_tampered_chunk_missing(setup):
    heap, tracker, src, dst, _ = setup
    a, b = socket.socketpair()
    tx = SecureChannel(a, MID)
    tx.install_keys(b"x" * 32, b"d" * 32, 1, 2)  # sealed with a key the destination does not share
    rx = SecureChannel(b, MID)
    rx.install_keys(b"d" * 32, b"s" * 32, 2, 1)
    send(tx, 0, b"e" * MiB)
    rec = rx.recv(timeout=5)
    with pytest.raises(IntegrityError):
        AccessInstaller(tracker, MiB).install(0, rec, rx, demand=False)
    assert tracker.missing[0] and not any(heap.chunk_view(0))
    tx.close()
    rx.close()


def test_two_receive_threads_install_at_once_without_mixing_chunks() -> None:
    """Whole chunks arrive on both channels (background and demand), and the two receive threads install
    them at the same time: each needs scratch of its own. A shared buffer let one thread copy in the
    other's plaintext (a chunk verified, then replaced: `bench load` saw lost and stale writes)."""
    chunk = 64 << 10
    heap = Heap(16 * MiB, chunk)
    n = heap.n_chunks
    tracker = AccessTracker(heap, np.arange(n, dtype=np.int64), lambda chunks: None, timeout=30)
    inst = AccessInstaller(tracker, chunk)
    errors: list[BaseException] = []

    def lane(demand: bool) -> None:
        a, b = socket.socketpair()
        tx, rx = SecureChannel(a, MID), SecureChannel(b, MID)
        tx.install_keys(b"s" * 32, b"d" * 32, 1, 2)
        rx.install_keys(b"d" * 32, b"s" * 32, 2, 1)
        mine = range(int(demand), n, 2)
        sender = threading.Thread(target=lambda: [tx.send_chunk(i, bytes([i % 251 + 1]) * chunk) for i in mine])
        sender.start()
        try:
            for i in mine:
                inst.install(i, rx.recv(timeout=10), rx, demand=demand)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        sender.join(10)
        tx.close()
        rx.close()

    threads = [threading.Thread(target=lane, args=(d,)) for d in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    firsts = np.frombuffer(heap.buf, dtype=np.uint8)[::chunk]
    lasts = np.frombuffer(heap.buf, dtype=np.uint8)[chunk - 1::chunk]
    want = (np.arange(n) % 251 + 1).astype(np.uint8)
    assert np.array_equal(firsts, want) and np.array_equal(lasts, want) and tracker.complete
    heap.close()
