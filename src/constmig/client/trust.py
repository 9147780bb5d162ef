"""What a client trusts: the root its enclaves' quotes chain to (its fleet), and which enclave each name is.

Like ssh's known_hosts, and one step further than the code: the first session with an enclave name
records which *instance* answered (a random id the enclave drew at its first launch and carries through
migrations, checkpoints and restores, bound into every session's quote), what it runs (measurement, code
hash, launch configuration, signer, security version) and the fleet it belongs to (the root CA's
fingerprint). Every later session refuses anything else in one line that says what differs (another
instance of the same code, other code, the same code launched otherwise) and the exact command that
re-pins on purpose. A pin is per name, fleet and directory (the etcd URL a name is looked up in, or none
when agents are named directly), so one name in two fleets or two walk-throughs is two pins.

Every option only narrows: an `Expect` (a measurement, a signer, a minimum security version) is checked
on top of the pin, and pinning on first use happens only once it holds. Accepting any code the root
attests is a named choice (`Trust.any_code`), never a default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from constmig.errors import AttestationError, ConfigError
from constmig.tee.backend import VerifiedQuote
from constmig.units import short_hex
from constmig.wire.session import About


def default_ca_dir() -> Path:
    return Path(os.environ.get("CONSTMIG_CA_DIR", Path.home() / ".constmig" / "ca"))


def default_known_path() -> Path:
    return Path(os.environ.get("CONSTMIG_KNOWN_ENCLAVES", Path.home() / ".constmig" / "known_enclaves.json"))


def _hex(text: str, size: int, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != size:
        raise ConfigError(f"{what} must be {2 * size} hex digits, not {text!r}")
    return value


def _hex32(text: str, what: str) -> bytes:
    return _hex(text, 32, what)


@dataclass(frozen=True)
class Expect:
    """The code a client accepts for one enclave; None fields accept anything the root attests."""

    measurement: bytes | None = None
    signer: bytes | None = None
    min_svn: int = 0
    source: str = ""  # where this came from, for the error ("--expect-measurement")

    @classmethod
    def parse(cls, measurement: str | None = None, signer: str | None = None, min_svn: int = 0,
              source: str = "") -> Expect:
        return cls(_hex32(measurement, "measurement") if measurement else None,
                   _hex32(signer, "signer") if signer else None, min_svn, source)

    def check(self, name: str, vq: VerifiedQuote) -> None:
        """AttestationError, one line naming what differs, unless the quoted identity is the expected one."""
        ident, where = vq.identity, f" ({self.source})" if self.source else ""
        if self.measurement is not None and ident.measurement != self.measurement:
            raise AttestationError(f"enclave {name!r} runs measurement {short_hex(ident.measurement)}, not the "
                                   f"expected {short_hex(self.measurement)}{where}; refusing to talk to it")
        if self.signer is not None and ident.signer != self.signer:
            raise AttestationError(f"enclave {name!r} is signed by {short_hex(ident.signer)}, not the expected "
                                   f"{short_hex(self.signer)}{where}; refusing to talk to it")
        if ident.svn < self.min_svn:
            raise AttestationError(f"enclave {name!r} has security version {ident.svn}, below the minimum "
                                   f"{self.min_svn}{where}; refusing to talk to it")


def _launch_diff(now: str, pinned: str) -> str:
    """What differs between two launch configurations, for a person: 'heap 32.0 MiB where the pin has 16.0 MiB'."""
    from constmig.units import format_size

    try:
        a, b = json.loads(now), json.loads(pinned)
    except ValueError:
        return "its launch configuration"
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "its launch configuration"

    def show(key: str, value: Any) -> str:
        if value is None:
            return "unset"
        return format_size(value) if key in ("heap", "chunk") and isinstance(value, int) else json.dumps(value)

    parts = [f"{k} {show(k, a.get(k))} where the pin has {show(k, b.get(k))}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(parts) or "its launch configuration"


@dataclass(frozen=True)
class Pin:
    """One pinned enclave: the instance a name stands for in one fleet (and directory), and its code."""

    name: str
    fleet: str  # hex sha256 of the root CA certificate ("" if the verifier has no file root)
    directory: str  # the etcd URL the name is looked up in; "" for agents named directly
    instance: bytes
    measurement: bytes
    code: bytes
    launch: str
    signer: bytes
    svn: int
    platform: str = ""
    pinned_at: str = ""

    @classmethod
    def of(cls, name: str, fleet: str, directory: str, vq: VerifiedQuote, about: About) -> Pin:
        ident = vq.identity
        return cls(name, fleet, directory, about.instance, ident.measurement, about.code, about.launch,
                   ident.signer, ident.svn, vq.platform_id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fleet": self.fleet, "directory": self.directory, "instance": self.instance.hex(),
                "measurement": self.measurement.hex(), "code": self.code.hex(), "launch": self.launch,
                "signer": self.signer.hex(), "svn": self.svn, "platform": self.platform, "pinned_at": self.pinned_at}

    @classmethod
    def from_json(cls, entry: Any) -> Pin:
        return cls(str(entry["name"]), str(entry["fleet"]), str(entry.get("directory") or ""),
                   _hex(entry["instance"], 16, "instance"), _hex32(entry["measurement"], "measurement"),
                   _hex32(entry["code"], "code"), str(entry["launch"]), _hex32(entry["signer"], "signer"),
                   int(entry.get("svn", 0)), str(entry.get("platform") or ""), str(entry.get("pinned_at") or ""))

    def check(self, vq: VerifiedQuote, about: About, where: str, repin: str) -> None:
        """AttestationError, one line: what differs from the pin (code, launch, signer, instance), where the pin
        is, and the command that re-pins on purpose. The measurement and instance decide; the code hash and
        launch text (bound to the same quote) only say which part of the measurement differs."""
        ident, name = vq.identity, self.name
        tail = f" (pinned in {where}); refusing to talk to it; if you replaced it on purpose: {repin}"
        if ident.measurement != self.measurement:
            if about.code != self.code:
                what = f"other code than the pinned enclave (code {short_hex(about.code)}, pinned {short_hex(self.code)})"
            elif about.launch != self.launch:
                what = f"the pinned code with another launch configuration ({_launch_diff(about.launch, self.launch)})"
            else:
                what = "other code"
            raise AttestationError(f"enclave {name!r} runs {what}: measurement {short_hex(ident.measurement)}, "
                                   f"not the pinned {short_hex(self.measurement)}{tail}")
        if ident.signer != self.signer:
            raise AttestationError(f"enclave {name!r} is signed by {short_hex(ident.signer)}, not the pinned "
                                   f"{short_hex(self.signer)}{tail}")
        if about.instance != self.instance:
            raise AttestationError(f"enclave {name!r} is another instance of the pinned code (instance "
                                   f"{short_hex(about.instance)}, pinned {short_hex(self.instance)}): a copy launched "
                                   f"apart from the one pinned, by the host or by a new `run`{tail}")


def pin_key(name: str, fleet: str, directory: str = "") -> str:
    """Where a pin lives in the file: the name, its fleet (root CA fingerprint) and its directory."""
    return f"{name} @ {fleet[:16] or '-'}" + (f" via {directory}" if directory else "")


class KnownEnclaves:
    """The user's file of pinned enclaves: {"enclaves": {pin_key: Pin.to_json()}}; or, with `path=None`
    and `memory=True`, pins this process keeps to itself (a bench's or a demo's own fleet)."""

    def __init__(self, path: Path | None = None, memory: bool = False) -> None:
        self.path = Path(path) if path is not None else default_known_path()
        self._memory: dict[str, Any] | None = {} if memory else None
        self._lock = threading.Lock()

    @classmethod
    def in_memory(cls) -> KnownEnclaves:
        return cls(Path("(this process)"), memory=True)

    @property
    def is_file(self) -> bool:
        return self._memory is None

    @property
    def where(self) -> str:
        return str(self.path) if self.is_file else "this process's memory"

    def _load(self) -> dict[str, Any]:
        if self._memory is not None:
            return dict(self._memory)
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

    def get(self, name: str, fleet: str = "", directory: str = "") -> Pin | None:
        """The pin of `name` in this fleet and directory; None if there is none."""
        entry = self._load().get(pin_key(name, fleet, directory))
        if entry is None:
            return None
        try:
            return Pin.from_json(entry)
        except (KeyError, TypeError, ValueError, ConfigError):
            raise ConfigError(f"entry {pin_key(name, fleet, directory)!r} of {self.path} is malformed") from None

    def legacy(self, name: str) -> Expect | None:
        """A pin written before pins named the instance and fleet (keyed by the name alone): its code."""
        entry = self._load().get(name)
        if entry is None:
            return None
        try:
            return Expect.parse(entry["measurement"], entry["signer"], int(entry.get("svn", 0)),
                                f"pinned by name alone in {self.path}")
        except (KeyError, TypeError, ValueError, ConfigError):
            raise ConfigError(f"entry {name!r} of {self.path} is malformed") from None

    def pin(self, pin: Pin) -> None:
        """Record (or replace) a pin, atomically, in a file only the user can read."""
        with self._lock:
            entries = self._load()
            entries[pin_key(pin.name, pin.fleet, pin.directory)] = pin.to_json()
            if self._memory is not None:
                self._memory = entries
                return
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
        self.fleet = ""  # sha256 of the root certificate (DER), once read

    def __call__(self, quote: bytes) -> VerifiedQuote:
        if self._verify is None:
            from cryptography.hazmat.primitives.serialization import Encoding

            from constmig.tee.sim import load_root, verify_quote

            try:
                root = load_root(self.path)
            except (OSError, ConfigError) as e:
                why = e.strerror if isinstance(e, OSError) else str(e)
                raise ConfigError(f"no root CA certificate to check the enclave's quote against ({why}); set "
                                  "--ca-dir or $CONSTMIG_CA_DIR to the agents' CA folder") from None
            self.fleet = hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest()
            self._verify = partial(verify_quote, root=root)
        return self._verify(quote)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def repin_command(name: str, agent: str | None = None, directory: str | None = None, known: Path | None = None,
                  ca_dir: Path | None = None) -> str:
    """The exact `constmig trust` command that pins `name` again, reached the way this client reaches it."""
    words = ["constmig", "trust", name]
    words += ["--etcd", directory] if directory else ["--agent", agent] if agent else []
    if known is not None and known != default_known_path():
        words += ["--known", str(known)]
    if ca_dir is not None and ca_dir != default_ca_dir():
        words += ["--ca-dir", str(ca_dir)]
    return " ".join(shlex.quote(w) for w in words)


@dataclass
class Trust:
    """A client's trust decisions: how quotes verify, and which enclave each name is.

    `known` pins each name on first use (and says so through `announce`) and then accepts only that
    instance running that code; `expect` narrows further. With `known=None` (`Trust.any_code`) any
    instance the root attests is accepted, narrowed by `expect` only: a choice to make by name.
    """

    verify: QuoteVerifier
    expect: Expect | None = None
    known: KnownEnclaves | None = None
    announce: Callable[[str], None] | None = None  # told, one line, when a name is pinned on first use
    first_use: bool = False  # the last check pinned a name it had not seen
    pinned: Pin | None = field(default=None, repr=False)  # what the last check accepted, when pinning

    @classmethod
    def default(cls, ca_dir: Path | None = None, expect: Expect | None = None, known: KnownEnclaves | None = None,
                announce: Callable[[str], None] | None = _stderr) -> Trust:
        """Pin on first use in the user's known-enclaves file (or `known`) and say so on stderr."""
        return cls(SimVerifier(ca_dir), expect, known if known is not None else KnownEnclaves(), announce)

    @classmethod
    def any_code(cls, ca_dir: Path | None = None, expect: Expect | None = None) -> Trust:
        """No pin: any enclave the root attests, any instance (narrowed by `expect`). Right only where the
        caller launched the enclave itself on agents it trusts, or pins by other means."""
        return cls(SimVerifier(ca_dir), expect, None)

    @classmethod
    def in_memory(cls, ca_dir: Path | None = None, expect: Expect | None = None) -> Trust:
        """Pin on first use for this process only, quietly: a bench's or a demo's own fleet, whose every
        client must keep talking to the instance the first one met."""
        return cls(SimVerifier(ca_dir), expect, KnownEnclaves.in_memory(), None)

    @property
    def fleet(self) -> str:
        """The fleet the verifier trusts: the root CA's fingerprint (read at the first quote)."""
        return str(getattr(self.verify, "fleet", "") or "")

    def repin(self, name: str, agent: str | None = None, directory: str | None = None) -> str:
        known = self.known.path if self.known is not None and self.known.is_file else None
        return repin_command(name, agent, directory, known, getattr(self.verify, "path", None))

    def check(self, name: str, vq: VerifiedQuote, about: About, agent: str | None = None,
              directory: str | None = None) -> None:
        """AttestationError unless the enclave that answered is the one `name` stands for, and `expect` holds."""
        self.first_use = False
        if self.expect is not None:
            self.expect.check(name, vq)
        if self.known is None:
            return
        fleet, where = self.fleet, directory or ""
        pin = self.known.get(name, fleet, where)
        if pin is not None:
            pin.check(vq, about, self.known.where, self.repin(name, agent, directory))
            self.pinned = pin
            return
        legacy = self.known.legacy(name)
        if legacy is not None:  # a pin from before instances: its code must still match
            try:
                legacy.check(name, vq)
            except AttestationError as e:
                raise AttestationError(f"{e}; if you replaced it on purpose: "
                                       f"{self.repin(name, agent, directory)}") from None
        self.pinned = Pin.of(name, fleet, where, vq, about)
        self.known.pin(self.pinned)
        self.first_use = True
        if self.announce is not None:
            self.announce(first_use_line(self.pinned, self.known.where))


def first_use_line(pin: Pin, where: str) -> str:
    """What a client says when it pins a name it had not seen (the CLI and the Python API alike)."""
    via = f", found via {pin.directory}" if pin.directory else ""
    return (f"(trusting enclave {pin.name!r} on first use: instance {short_hex(pin.instance)}, measurement "
            f"{short_hex(pin.measurement)}, svn {pin.svn}, fleet {pin.fleet[:16] or '-'}{via}; pinned in {where})")
