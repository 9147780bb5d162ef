"""No (key, nonce) pair is ever used twice for AES-GCM, checked over a 4 GiB migration's traffic.

By construction a nonce is direction || per-direction counter and a counter only goes up; each
channel direction has its own key, and post-copy's demand channel derives its own keys. This test
watches every AES-GCM encryption (a spy in place of the AESGCM class) while a 4 GiB heap crosses the
main channel as 1 MiB chunks and a share of it crosses the demand channel as 64 KiB pieces, with
control messages both ways, and checks that every (key, nonce) pair is distinct.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import constmig.wire.aead as aead
from constmig.wire.channel import SealedChunk, SecureChannel

pytestmark = pytest.mark.adversarial

HEAP = 4 << 30
CHUNK = 1 << 20
PIECE = 64 << 10


class SpyAESGCM:
    """AESGCM that records every (key, nonce) it encrypts under (wraps it: the class is final)."""

    used: list[tuple[bytes, bytes]] = []
    lock = threading.Lock()

    def __init__(self, key: bytes) -> None:
        self.inner = AESGCM(key)
        self.key = bytes(key)

    def _saw(self, nonce: bytes) -> None:
        with self.lock:
            self.used.append((self.key, bytes(nonce)))

    def encrypt(self, nonce, data, associated_data):  # noqa: ANN001 (AESGCM's signature)
        self._saw(nonce)
        return self.inner.encrypt(nonce, data, associated_data)

    def encrypt_into(self, nonce, data, associated_data, out):  # noqa: ANN001
        self._saw(nonce)
        return self.inner.encrypt_into(nonce, data, associated_data, out)

    def __getattr__(self, name: str):  # decrypt paths are not what this test watches
        return getattr(self.inner, name)


def _pair(mid: bytes) -> tuple[SecureChannel, SecureChannel]:
    a, b = socket.socketpair()
    s2d, d2s = os.urandom(32), os.urandom(32)
    src, dst = SecureChannel(a, mid), SecureChannel(b, mid)
    src.install_keys(s2d, d2s, 1, 2)
    dst.install_keys(d2s, s2d, 2, 1)
    return src, dst


def _drain(chan: SecureChannel, n: int, errors: list[BaseException]) -> None:
    out = bytearray(CHUNK)
    try:
        for _ in range(n):
            rec = chan.recv(timeout=60)
            if isinstance(rec, SealedChunk):
                chan.open_chunk(rec, memoryview(out)[: rec.length])
    except BaseException as e:  # reported by the main thread
        errors.append(e)


def test_no_key_nonce_pair_repeats_across_a_4gib_migration(monkeypatch):
    monkeypatch.setattr(aead, "AESGCM", SpyAESGCM)
    SpyAESGCM.used = []
    mid = os.urandom(16)
    main_src, main_dst = _pair(mid)
    demand_src = SecureChannel.resume(*_resume_socks(main_src, main_dst))
    data = memoryview(bytearray(os.urandom(CHUNK)))
    chunks = HEAP // CHUNK
    demanded = list(range(0, chunks, 64))  # every 64th chunk goes as 16 pieces on the demand channel
    errors: list[BaseException] = []
    drains = [threading.Thread(target=_drain, args=(main_dst, chunks - len(demanded) + 3, errors)),
              threading.Thread(target=_drain, args=(_DEMAND_DST[0], len(demanded) * CHUNK // PIECE, errors))]
    for t in drains:
        t.start()
    main_src.send_control(b"state")
    for i in range(chunks):
        if i % 64:
            main_src.send_chunk(i, data)
        else:
            for p in range(CHUNK // PIECE):
                demand_src.send_chunk(i, data[p * PIECE:(p + 1) * PIECE], demand=True)
    main_src.send_control(b"heap-end")
    main_src.send_control(b"commit")
    for _ in range(3):
        main_dst.send_control(b"ready/resumed/done")
    for t in drains:
        t.join(120)
    assert not errors, errors
    used = SpyAESGCM.used
    expected = 3 + (chunks - len(demanded)) + len(demanded) * (CHUNK // PIECE) + 3
    assert len(used) == expected  # every record was seen, so the check below covers them all
    assert len(set(used)) == len(used), "a (key, nonce) pair was used twice"
    keys = {k for k, _ in used}
    assert len(keys) == 3  # source->destination, destination->source, and the demand channel's own key


_DEMAND_DST: list[SecureChannel] = []


def _resume_socks(main_src: SecureChannel, main_dst: SecureChannel):
    """A second connection for demanded chunks, keyed apart from the main channel (as post-copy does)."""
    a, b = socket.socketpair()
    label = b"demand"
    _DEMAND_DST[:] = [SecureChannel.resume(b, main_dst.ticket().derive(label))]
    return a, main_src.ticket().derive(label)


def test_the_spy_would_catch_a_reused_pair(monkeypatch):
    """Positive control: two sealers on one key and direction (the bug the design rules out) repeat."""
    monkeypatch.setattr(aead, "AESGCM", SpyAESGCM)
    SpyAESGCM.used = []
    key = os.urandom(32)
    for sealer in (aead.RecordSealer(key, 1), aead.RecordSealer(key, 1)):
        sealer.seal(b"aad", b"data")
    assert len(set(SpyAESGCM.used)) < len(SpyAESGCM.used)
