"""Sealed checkpoints that cannot be rolled back, and that move with the enclave (Alder et al., DSN'18).

An enclave that checkpoints gets a *lineage*: an id, a migratable sealing key and a platform
monotonic counter. A checkpoint is the small state plus the heap chunks that hold data, sealed under a key
derived from the lineage key and bound to the counter's next value; a restore accepts only the
checkpoint whose version equals the counter now, so an older one (a rollback) is refused.

The lineage key itself is kept on the platform sealed under the platform's sealing key for this
enclave identity, so only the same code on the same platform can restore. The counter names the
instance that holds the lineage (tee/counters.py): a restore takes it over only once that instance has
stopped, so a checkpoint never starts a second copy beside a running one. On migration the lineage
travels in the encrypted small state and changes hosts in two steps, so that at no instant can two
instances hold it, and once the source has committed, one always can:

1. Before READY the destination's incoming instance creates a counter at the same value, owned by it
   and *pending* on the hash of a release code the source drew at the stop (`StateMsg.release_hash`).
2. Past its commit point the source destroys its counter and key file, and only then hands the code to
   its host (the agent keeps it for the operator) and sends COMMIT. The destination confirms its
   counter when it handles COMMIT (or the keyed reconnect that stands for it).

A destination that dies between the source's COMMIT and its own handling of it still holds the lineage:
`constmig restore --release CODE` there completes the move, and only once that instance is gone. One that
gives up before COMMIT destroys its pending counter (as its owner) before it tells the source (ABORT),
so the code is worthless once the source runs again; should a restore have taken the counter over, the
destroy fails and no ABORT goes out. Taking over and giving up are one compare-and-set on the counter.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from constmig.errors import ConfigError, EnclaveError, IntegrityError
from constmig.files import checkpoint_path
from constmig.wire.aead import RecordOpener, RecordSealer
from constmig.wire.channel import is_zero

if TYPE_CHECKING:
    from constmig.enclave.heap import Heap
    from constmig.tee.backend import Identity, TeeBackend

MAGIC = b"CMGCKPT1"
_LEN = struct.Struct("<I")
_REC = struct.Struct("<QI")  # chunk index, ciphertext length
MAX_HEADER = 1 << 16
TAG = 16


class Header(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A checkpoint's plaintext header: authenticated (it is every record's associated data)."""

    lineage: bytes
    version: int
    app: str
    heap: int
    chunk_size: int
    config: dict[str, Any]
    svn: int
    chunks: int
    created: float
    plain_calls: bool = False  # launch flag (measured), so a restore launches the same identity


class Lineage(msgspec.Struct, frozen=True):
    """What moves with the enclave: id, migratable key, and the counter value it had reached."""

    lineage: bytes
    key: bytes
    version: int


class _KeyFile(msgspec.Struct, frozen=True):
    key: bytes
    counter: str



def release_hash(code: bytes) -> bytes:
    return hashlib.sha256(b"constmig-lineage-release" + code).digest()


def _kdf(key: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(key)


@dataclass
class Persistence:
    """One enclave's lineage on one platform (none until the first checkpoint or an incoming one)."""

    backend: TeeBackend
    identity: Identity
    store: Path  # the platform's folder of sealed lineage keys
    lineage: Lineage | None = None
    counter: str = ""
    pending: bytes = b""  # the counter's release hash (see the module doc), until confirmed

    # --- the lineage key on this platform ----------------------------------------------------------

    def _keyfile(self, lineage: bytes) -> Path:
        return self.store / f"{lineage.hex()}.key"

    def _platform_aead(self) -> AESGCM:
        return AESGCM(self.backend.sealing_key(self.identity, b"constmig-lineage"))

    def _bind_here(self, lineage: Lineage, pending: bytes = b"") -> None:
        """Create this platform's counter at the lineage's version, owned by this instance (pending on
        `pending` when given), and seal the key beside it."""
        counter = self.backend.counters.create(lineage.version, pending)
        self.lineage, self.counter, self.pending = lineage, counter, pending
        nonce = os.urandom(12)
        blob = msgspec.msgpack.encode(_KeyFile(lineage.key, counter))
        self.store.mkdir(parents=True, exist_ok=True)
        path = self._keyfile(lineage.lineage)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(nonce + self._platform_aead().encrypt(nonce, blob, lineage.lineage))
        os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one

    def _load_here(self, lineage_id: bytes, release: bytes | None = None) -> None:
        try:
            raw = self._keyfile(lineage_id).read_bytes()
        except FileNotFoundError:
            raise EnclaveError("this enclave has no persistent state on this platform: it migrated away, "
                               "or it never ran here") from None
        try:
            kf = msgspec.msgpack.decode(self._platform_aead().decrypt(raw[:12], raw[12:], lineage_id),
                                        type=_KeyFile)
        except (InvalidTag, ValueError, msgspec.DecodeError):
            raise IntegrityError("this enclave's sealed key on this platform does not open (changed, or "
                                 "sealed for other enclave code)") from None
        # One compare-and-set: refused while another instance holding it runs (a frozen one too), and for
        # a pending lineage without its code; a destination that gave up destroyed the counter.
        version = self.backend.counters.claim(kf.counter, None if release is None else release_hash(release))
        self.lineage, self.counter, self.pending = Lineage(lineage_id, kf.key, version), kf.counter, b""

    # --- migration ---------------------------------------------------------------------------------

    def export(self) -> Lineage | None:
        return self.lineage

    def adopt(self, lineage: Lineage | None, pending: bytes = b"") -> None:
        """Destination, before READY: hold the lineage that arrived in the small state, pending on
        `pending` (the release code's hash) until `confirm`."""
        if lineage is not None:
            self._bind_here(lineage, pending)

    def confirm(self) -> None:
        """Destination that handled COMMIT: no longer pending. LineageHeld if another instance took the
        counter over meanwhile (impossible while this one lives; the caller stops if it happens)."""
        if self.pending and self.counter:
            self.backend.counters.confirm(self.counter)
            self.pending = b""

    def leave(self) -> None:
        """Source, before COMMIT: no checkpoint may restore here once the enclave runs elsewhere."""
        if self.lineage is None:
            return
        self.backend.counters.destroy(self.counter)
        self._keyfile(self.lineage.lineage).unlink(missing_ok=True)
        self.counter = ""

    def reinstate(self) -> None:
        """Source whose destination proved it never resumed: the lineage is ours again."""
        if self.lineage is not None and not self.counter:
            self._bind_here(self.lineage)

    def forget(self) -> None:
        """Destination that aborted before COMMIT: drop the counter and key it created. The counter goes
        first, as its owner's compare-and-set: a copy of the pending key file that the host kept then names a
        counter that is gone, and if a restore holds the counter instead, LineageHeld (no ABORT may go out)."""
        self.leave()
        self.lineage, self.pending = None, b""

    # --- checkpoint and restore --------------------------------------------------------------------

    def checkpoint(self, folder: Path, name: str, spec: dict[str, Any], heap: Heap, small_state: bytes,
                   chunks: np.ndarray) -> dict[str, Any]:
        """Seal small state and `chunks` of `heap` into folder/name.v<version>.ckpt; returns figures.

        Chunks of zeros are left out: a restore starts from a fresh heap, which is zeros already."""
        t0 = time.perf_counter()
        data = [i for i in chunks.tolist() if not is_zero(heap.chunk_view(i))]
        if self.lineage is None:
            self._bind_here(Lineage(os.urandom(16), os.urandom(32), 0))
        assert self.lineage is not None
        version = self.backend.counters.increment(self.counter)
        self.lineage = Lineage(self.lineage.lineage, self.lineage.key, version)
        header = msgspec.msgpack.encode(Header(self.lineage.lineage, version, spec["app"], spec["heap"],
                                               spec["chunk_size"], spec.get("config") or {}, spec.get("svn", 1),
                                               len(data), time.time(), bool(spec.get("plain_calls"))))
        sealer = RecordSealer(_kdf(self.lineage.key, b"checkpoint" + struct.pack("<Q", version)), 1)
        folder.mkdir(parents=True, exist_ok=True)
        path = checkpoint_path(folder, name, version)
        tmp = path.with_suffix(".tmp")
        size = heap.chunk_size
        with open(tmp, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(header)) + header)
            _, ct = sealer.seal(header + _REC.pack(2**64 - 1, len(small_state)), small_state)
            f.write(_REC.pack(2**64 - 1, len(small_state)) + ct)
            for index in data:
                _, ct = sealer.seal(header + _REC.pack(index, size), heap.chunk_view(index))
                f.write(_REC.pack(index, size) + ct)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"path": str(path), "version": version, "chunks": len(data), "zero_chunks": int(chunks.size) - len(data),
                "bytes": path.stat().st_size,
                "seconds": round(time.perf_counter() - t0, 3)}

    def restore(self, path: Path, heap: Heap, release: bytes | None = None) -> bytes:
        """Check `path` is this lineage's newest checkpoint, fill `heap`, return the small state blob.
        `release`: the code that completes a lineage left pending here (see the module doc)."""
        with open(path, "rb") as f:
            header_bytes, header = _read_header(f, path)
            self._load_here(header.lineage, release)
            assert self.lineage is not None
            if header.version != self.lineage.version:
                raise EnclaveError(
                    f"rollback refused: {path.name} is checkpoint version {header.version}, but this enclave's "
                    f"counter is at {self.lineage.version}" + (" (a newer checkpoint exists)"
                                                              if header.version < self.lineage.version else ""))
            if (header.heap, header.chunk_size) != (heap.size, heap.chunk_size):
                raise EnclaveError(f"{path.name} is for a {header.heap}-byte heap in {header.chunk_size}-byte "
                                   "chunks, not this enclave's")
            opener = RecordOpener(_kdf(self.lineage.key, b"checkpoint" + struct.pack("<Q", header.version)), 1)
            state = None
            for n in range(header.chunks + 1):
                head = f.read(_REC.size)
                if len(head) != _REC.size:
                    raise IntegrityError(f"{path.name} is truncated after {n} records")
                index, length = _REC.unpack(head)
                if (n == 0) != (index == 2**64 - 1) or (n and (index >= heap.n_chunks or length != heap.chunk_size)):
                    raise IntegrityError(f"{path.name} record {n} is malformed")
                if n == 0 and length > 64 << 20:
                    raise IntegrityError(f"{path.name} small state of {length} bytes is implausible")
                ct = f.read(length + TAG)
                if len(ct) != length + TAG:
                    raise IntegrityError(f"{path.name} is truncated in record {n}")
                out = bytearray(length) if n == 0 else heap.chunk_view(index)
                try:
                    opener.open(n, header_bytes + head, ct, out)
                except IntegrityError:
                    raise IntegrityError(f"{path.name} record {n} failed authentication (tampered, or not "
                                         "sealed for this enclave)") from None
                if n == 0:
                    state = bytes(out)
            if f.read(1):
                raise IntegrityError(f"{path.name} has bytes after its last record")
        assert state is not None
        return state


def _read_header(f: Any, path: Path) -> tuple[bytes, Header]:
    magic = f.read(len(MAGIC) + _LEN.size)
    if len(magic) != len(MAGIC) + _LEN.size or magic[: len(MAGIC)] != MAGIC:
        raise ConfigError(f"{path} is not a constmig checkpoint")
    n = _LEN.unpack(magic[len(MAGIC):])[0]
    if n > MAX_HEADER:
        raise ConfigError(f"{path} has an implausible header of {n} bytes")
    raw = f.read(n)
    try:
        header = msgspec.msgpack.decode(raw, type=Header)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path} has a malformed header: {e}") from None
    return raw, header


def read_header(path: Path) -> Header:
    """The checkpoint's claims (app, heap, ...), for the host to launch an enclave; unverified until restore."""
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)[1]
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
