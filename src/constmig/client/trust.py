"""What a client trusts: the root its enclaves' quotes chain to, and which code it expects by name.

Like ssh's known_hosts: the first session with an enclave name records what it runs (measurement,
signer, security version) in a file the user owns, and every later session refuses anything else,
naming what differs. `--expect-measurement` (or an `Expect` from Python) pins without the file;
`constmig trust NAME` records (or replaces) the entry on purpose.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import VerifiedQuote


def default_ca_dir() -> Path:
    return Path(os.environ.get("CONSTMIG_CA_DIR", Path.home() / ".constmig" / "ca"))


def default_known_path() -> Path:
    return Path(os.environ.get("CONSTMIG_KNOWN_ENCLAVES", Path.home() / ".constmig" / "known_enclaves.json"))


def _short(b: bytes) -> str:
    return b.hex()[:16] + "…"


def _hex32(text: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 32:
        raise ConfigError(f"{what} must be 64 hex digits, not {text!r}")
    return value


@dataclass(frozen=True)
class Expect:
    """The code a client accepts for one enclave; None fields accept anything the root attests."""

    measurement: bytes | None = None
    signer: bytes | None = None
    min_svn: int = 0
    source: str = ""  # where this came from, for the error ("pinned in FILE", "--expect-measurement")

    @classmethod
    def parse(cls, measurement: str | None = None, signer: str | None = None, min_svn: int = 0,
              source: str = "") -> Expect:
        return cls(_hex32(measurement, "measurement") if measurement else None,
                   _hex32(signer, "signer") if signer else None, min_svn, source)

    def check(self, name: str, vq: VerifiedQuote) -> None:
        """AttestationError, one line naming what differs, unless the quoted identity is the expected one."""
        ident, where = vq.identity, f" ({self.source})" if self.source else ""
        if self.measurement is not None and ident.measurement != self.measurement:
            raise AttestationError(f"enclave {name!r} runs measurement {_short(ident.measurement)}, not the "
                                   f"expected {_short(self.measurement)}{where}; refusing to talk to it")
        if self.signer is not None and ident.signer != self.signer:
            raise AttestationError(f"enclave {name!r} is signed by {_short(ident.signer)}, not the expected "
                                   f"{_short(self.signer)}{where}; refusing to talk to it")
        if ident.svn < self.min_svn:
            raise AttestationError(f"enclave {name!r} has security version {ident.svn}, below the minimum "
                                   f"{self.min_svn}{where}; refusing to talk to it")


class KnownEnclaves:
    """The user's file of pinned enclaves: {"enclaves": {name: {measurement, signer, svn, pinned_at}}}."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_known_path()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read known enclaves file {self.path}: {e}") from None
        entries = data.get("enclaves") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise ConfigError(f"known enclaves file {self.path} is not in the expected format")
        return entries

    def get(self, name: str) -> Expect | None:
        entry = self._load().get(name)
        if entry is None:
            return None
        try:
            return Expect.parse(entry["measurement"], entry["signer"], int(entry.get("svn", 0)),
                                f"pinned in {self.path}; if the change is intended: constmig trust {name}")
        except (KeyError, TypeError, ValueError, ConfigError):
            raise ConfigError(f"entry {name!r} of {self.path} is malformed") from None

    def pin(self, name: str, vq: VerifiedQuote) -> None:
        """Record (or replace) what `name` runs, atomically, in a file only the user can read."""
        entries = self._load()
        ident = vq.identity
        entries[name] = {"measurement": ident.measurement.hex(), "signer": ident.signer.hex(), "svn": ident.svn,
                         "platform": vq.platform_id, "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".known-")
            with os.fdopen(fd, "w") as f:
                json.dump({"enclaves": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            raise ConfigError(f"cannot write known enclaves file {self.path}: {e.strerror or e}") from None


QuoteVerifier = Callable[[bytes], VerifiedQuote]


class SimVerifier:
    """Quotes of the software TEE, checked against the root certificate in `ca_dir` (or a root.pem file).
    The root is read at the first quote, so an unreachable agent is reported as that, first."""

    def __init__(self, ca_dir: Path | None = None) -> None:
        self.path = Path(ca_dir) if ca_dir is not None else default_ca_dir()
        self._verify: QuoteVerifier | None = None

    def __call__(self, quote: bytes) -> VerifiedQuote:
        if self._verify is None:
            from constmig.tee.sim import load_root, verify_quote

            try:
                root = load_root(self.path)
            except (OSError, ConfigError) as e:
                why = e.strerror if isinstance(e, OSError) else str(e)
                raise ConfigError(f"no root CA certificate to check the enclave's quote against ({why}); set "
                                  "--ca-dir or $CONSTMIG_CA_DIR to the agents' CA folder") from None
            self._verify = partial(verify_quote, root=root)
        return self._verify(quote)


@dataclass
class Trust:
    """A client's trust decisions: how quotes verify, and which code each enclave name may run.

    With `expect` the client accepts only that; else with `known` it checks the pinned entry and pins
    on first use; with neither, any enclave the root attests (still sealed end to end).
    """

    verify: QuoteVerifier
    expect: Expect | None = None
    known: KnownEnclaves | None = None
    first_use: bool = False  # the last check pinned a name it had not seen

    @classmethod
    def default(cls, ca_dir: Path | None = None, expect: Expect | None = None,
                known: KnownEnclaves | None = None) -> Trust:
        return cls(SimVerifier(ca_dir), expect, known)

    def check(self, name: str, vq: VerifiedQuote) -> None:
        self.first_use = False
        if self.expect is not None:
            self.expect.check(name, vq)
        elif self.known is not None:
            pinned = self.known.get(name)
            if pinned is None:
                self.known.pin(name, vq)
                self.first_use = True
            else:
                pinned.check(name, vq)
