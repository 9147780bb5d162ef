"""Monotonic counters kept by the platform: what makes a sealed checkpoint impossible to roll back, and
what decides which single instance of an enclave may hold its sealed state.

An enclave binds each checkpoint it seals to the next value of one of its counters, and on restore
accepts only a checkpoint whose version equals the counter's current value. Counters move with an
enclave on migration (Alder et al., DSN'18): the destination platform creates one at the value the
source had, and the source platform's counter is destroyed before COMMIT, so a checkpoint can never
be restored on the host the enclave left.

Each counter names its **owner**, the enclave process that created or last claimed it, and may be
**pending** on the hash of a release code (a migration's lineage that has not yet committed here). The
owner alone increments, confirms or destroys it; another instance takes it over (a restore) only once
the owner has stopped, and a pending one only with its code. Every read-modify-write happens under one
cross-process lock, so "restore with the code" and "the incoming instance gives up" are one
compare-and-set on the same record, and the loser learns it lost (`LineageHeld`). A live owner cannot
be taken over, not even while the host has it frozen: at most one instance of an enclave holds its
lineage on a platform at any moment (docs/security.md, "One live copy").

The sim platform keeps its counters in one file authenticated with a key derived from the platform
secret: the host cannot edit a value unnoticed. It can put back an older copy of the whole file; a
hardware platform keeps counters in replay-protected storage, and the sim accepts that limit the way
it accepts keeping its keys in root-readable files (see docs/security.md). Liveness is the kernel's
word (a process id, its start time and the boot id), the sim's stand-in for a hardware platform's
knowledge of which enclave instance is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import hmac
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from constmig.errors import ConfigError, EnclaveError, LineageHeld

MAX_COUNTERS = 4096  # per platform; a hardware platform bounds these too
LOCK_WAIT_S = 10.0  # the longest one read-modify-write waits for another (each holds it for milliseconds)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Owner:
    """An enclave process, named so that a reused pid or a reboot is another owner."""

    boot: str
    pid: int
    start: int

    def __str__(self) -> str:
        return f"{self.boot}/{self.pid}/{self.start}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        boot, _, rest = text.partition("/")
        pid, _, start = rest.partition("/")
        return cls(boot, int(pid), int(start)) if pid.isdigit() and start.isdigit() else None

    @classmethod
    def of(cls, pid: int) -> Owner | None:
        """The process `pid` as it is now; None if it is gone or a zombie (it can run nothing)."""
        try:
            state, start = parse_stat(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            return None
        return None if state in ("Z", "X") else cls(_BOOT_ID.read_text().strip(), pid, start)

    @classmethod
    def me(cls) -> Owner:
        me = cls.of(os.getpid())
        assert me is not None
        return me

    def alive(self) -> bool:
        return Owner.of(self.pid) == self


def parse_stat(stat: str) -> tuple[str, int]:
    """A /proc/PID/stat line's state (field 3) and start time (field 22). The command name (field 2) may
    hold spaces and parentheses, so the fields are counted from its last ')'."""
    fields = stat[stat.rindex(")") + 1:].split()
    return fields[0], int(fields[19])


def _entry(value: int, owner: str, pending: str = "") -> dict[str, int | str]:
    return {"value": value, "owner": owner, "pending": pending}


class CounterStore:
    """The platform's counters: values only ever go up; each has one owner, and may be pending."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self._key = key

    # --- the file ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        """The counters, under the platform's cross-process lock; saved if the body changed them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:  # bounded: a host that holds the lock gets a clear error, never a hung enclave
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EnclaveError(f"the platform's counter file {self.path} stayed locked by another "
                                           f"process for {LOCK_WAIT_S:g} s") from None
                    time.sleep(0.005)
            counters = self._load()
            before = copy.deepcopy(counters)
            yield counters
            if counters != before:
                self._save(counters)

    def _load(self) -> dict[str, dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            body = doc["counters"].encode()
            mac = bytes.fromhex(doc["mac"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{self.path} is not a counter file") from None
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            raise ConfigError(f"{self.path} was changed outside the platform (bad MAC)")
        counters = json.loads(body)
        if not isinstance(counters, dict) or not all(
                isinstance(e, dict) and set(e) == {"value", "owner", "pending"} and type(e["value"]) is int
                and e["value"] >= 0 and isinstance(e["owner"], str) and isinstance(e["pending"], str)
                for e in counters.values()):
            raise ConfigError(f"{self.path} has malformed counters")
        return counters

    def _save(self, counters: dict[str, dict]) -> None:
        """A unique temp file, synced, renamed over the file, and the folder synced: a crash leaves the old
        file or the new one, and two processes never write the same temp file."""
        body = json.dumps(counters)
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"counters": body, "mac": mac}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    @staticmethod
    def _get(counters: dict[str, dict], cid: str) -> dict:
        if cid not in counters:
            raise EnclaveError("this enclave's monotonic counter does not exist on this platform "
                               "(the enclave migrated away, or never ran here)")
        return counters[cid]

    @staticmethod
    def _owned(entry: dict, what: str) -> None:
        """Only the owner may change its counter: any other instance lost the lineage and must stop."""
        if entry["owner"] != str(Owner.me()):
            raise LineageHeld(f"cannot {what}: another instance of this enclave holds its lineage on this "
                              "platform now (this instance lost it and must stop)")

    # --- the platform's operations -------------------------------------------------------------------

    def create(self, value: int = 0, pending: bytes = b"") -> str:
        """A new counter owned by the calling process, starting at `value` (a migrated enclave's counter
        continues where it was), pending on `pending` (a release code's hash) when given."""
        if not isinstance(value, int) or value < 0:
            raise EnclaveError(f"counter value must be a non-negative int, not {value!r}")
        with self._locked() as counters:
            if len(counters) >= MAX_COUNTERS:
                raise EnclaveError(f"this platform already holds {MAX_COUNTERS} counters")
            cid = os.urandom(16).hex()
            counters[cid] = _entry(value, str(Owner.me()), pending.hex())
            return cid

    def read(self, cid: str) -> int:
        return int(self._get(self._load(), cid)["value"])

    def pending(self, cid: str) -> bytes:
        return bytes.fromhex(self._get(self._load(), cid)["pending"])

    def claim(self, cid: str, release: bytes | None = None) -> int:
        """Take the counter over for the calling process (a restore): only once its owner has stopped, and
        for a pending counter only with the release code's hash. Returns the value."""
        with self._locked() as counters:
            entry = self._get(counters, cid)
            if entry["pending"]:
                if release is None:
                    raise EnclaveError(PENDING)
                if not hmac.compare_digest(release, bytes.fromhex(entry["pending"])):
                    raise ConfigError("the release code does not match this enclave's pending lineage on this "
                                      "platform (it belongs to another migration, or was mistyped)")
            owner = Owner.parse(entry["owner"])
            me = Owner.me()
            if owner is not None and owner != me and owner.alive():
                raise LineageHeld(f"another instance of this enclave still runs on this platform (pid "
                                  f"{owner.pid}) and holds its lineage: a checkpoint restores only once that "
                                  "instance has stopped")
            entry.update(owner=str(me), pending="")
            return int(entry["value"])

    def confirm(self, cid: str) -> None:
        """The owner's pending counter is its own for good (the migration that brought it committed)."""
        with self._locked() as counters:
            entry = self._get(counters, cid)
            self._owned(entry, "confirm the lineage")
            entry["pending"] = ""

    def increment(self, cid: str) -> int:
        with self._locked() as counters:
            entry = self._get(counters, cid)
            self._owned(entry, "checkpoint")
            if entry["pending"]:
                raise EnclaveError("this enclave's lineage here is still pending on its migration's COMMIT")
            entry["value"] += 1
            return int(entry["value"])

    def destroy(self, cid: str) -> None:
        """The owner lets its counter go (the source at the handoff, a destination giving up). A counter
        already gone stays gone; one another instance holds is refused (LineageHeld)."""
        with self._locked() as counters:
            if cid in counters:
                self._owned(counters[cid], "give the lineage up")
                del counters[cid]


PENDING = ("this enclave's lineage on this platform is pending: the migration that brought it here never "
           "handled its COMMIT. If the source committed, its agent's error names the release code: "
           "constmig restore CHECKPOINT --release CODE")
