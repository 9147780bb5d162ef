"""A client's attested session with one enclave, through whichever agent hosts it now.

The agent forwards the session's bytes and cannot read or forge them (wire/session.py). The session
follows the enclave: a redirect after a migration sends the next record to the new agent, where the
enclave continues the session with the same keys. A request whose answer was lost (a cut connection,
a move in between) is sent again as the same record, so it runs exactly once wherever the enclave is.

When the host says the enclave does not know the session, the client never re-seals the request blindly
(the host may hold it and run it later): it opens a new session whose Hello closes the old one, and the
enclave's Accept says, under its quote, whether the request ran. If it did, its kept answer is the call's
answer; if it did not, the old session can run nothing any more, so the call is sent once more in the new
one. A client process that ends with a request outstanding (a timeout) can leave the old session to the
next process in an `UnsettledCalls` file (the CLI does), which closes it the same way and says what ran.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from constmig.client.trust import Pin, Trust
from constmig.errors import (
    CallFailed,
    ConfigError,
    ProtocolError,
    SessionUnknown,
)
from constmig.host.client import EnclaveRoute
from constmig.tee.backend import Identity, VerifiedQuote
from constmig.wire import control
from constmig.wire.session import Answer, ClientOpen, ClientSession, Closing, Settled, settle

MAX_RESENDS = 2  # how often a call the host claimed unknown (and that provably did not run) is sent anew


class UnsettledCalls:
    """Sessions a client process left with a request outstanding, for the next process to close: a JSON
    file only the user can read, beside the known-enclaves file. It holds each session's close key (which
    can only close it) and its answer key (which opens only that session's answers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read unsettled calls file {self.path}: {e}") from None
        return data if isinstance(data, dict) else {}

    def _save(self, entries: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".unsettled-")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            raise ConfigError(f"cannot write unsettled calls file {self.path}: {e.strerror or e}") from None

    def get(self, key: str) -> Closing | None:
        entry = self._load().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Closing(bytes.fromhex(entry["session_id"]), bytes.fromhex(entry["key"]),
                           bytes.fromhex(entry["instance"]), entry.get("pending"), bytes.fromhex(entry.get("e2c", "")),
                           str(entry.get("what", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, closing: Closing) -> None:
        with self._lock:
            entries = self._load()
            entries[key] = {"session_id": closing.session_id.hex(), "key": closing.key.hex(),
                            "instance": closing.instance.hex(), "pending": closing.pending, "e2c": closing.e2c.hex(),
                            "what": closing.what}
            self._save(entries)

    def drop(self, key: str) -> None:
        with self._lock:
            entries = self._load()
            if entries.pop(key, None) is not None:
                self._save(entries)


def _describe(method: str, args: tuple[Any, ...]) -> str:
    text = " ".join([method, *(a if isinstance(a, str) else json.dumps(a, default=str) for a in args)])
    return text if len(text) <= 80 else text[:79] + "…"


class EnclaveClient:
    """Calls one enclave by name over an attested, sealed session that moves with the enclave.

    `trust` says which root quotes chain to and which enclave the name stands for (default: the root in
    $CONSTMIG_CA_DIR, pinned on first use in the user's known-enclaves file, said on stderr). With `etcd`
    (a fleet directory's address), `addr` may be None: the directory says where the enclave runs, and is
    asked again when that agent is gone. `unsettled` keeps a request left without its answer for the
    next process. Not thread-safe: one per thread.
    """

    def __init__(self, addr: str | None, name: str, timeout: float | None = 600.0, trust: Trust | None = None,
                 etcd: str | None = None, unsettled: UnsettledCalls | None = None) -> None:
        self.name = name
        self.trust = trust if trust is not None else Trust.default()
        self.route = EnclaveRoute(addr, name, timeout, etcd)
        self.unsettled = unsettled
        self.settled: Settled | None = None  # what became of the request an open closed, if one did
        self._agent = addr  # as given: how a person reaches the enclave (for the re-pin command)
        self._session: ClientSession | None = None
        self._closing: Closing | None = None
        self._call: tuple[str, list[Any], dict[str, Any]] | None = None  # the pending request, if a call
        self._what = ""

    @property
    def addr(self) -> str:
        """The agent that hosts the enclave, as far as this client knows (redirects update it)."""
        return self.route.addr

    @addr.setter
    def addr(self, addr: str) -> None:
        self.route.close()
        self.route.addr = addr

    @property
    def timeout(self) -> float | None:
        """How long one request waits for its answer (a new value applies from the next connection)."""
        return self.route.timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self.route.close()
        self.route.timeout = seconds

    # --- what the session knows, authenticated ----------------------------------------------------------

    @property
    def identity(self) -> Identity | None:
        return self._session.identity if self._session is not None else None

    @property
    def instance(self) -> bytes | None:
        """The enclave instance this session is with (bound to its quote)."""
        return self._session.about.instance if self._session is not None else None

    @property
    def app(self) -> str | None:
        """The app the enclave runs, as its measured launch configuration says (bound to its quote)."""
        if self._session is None:
            return None
        try:
            app = json.loads(self._session.about.launch).get("app")
        except (ValueError, AttributeError):
            return None
        return app if isinstance(app, str) else None

    @property
    def platform(self) -> str | None:
        """The platform the enclave's last answer was produced on."""
        return self._session.platform if self._session is not None else None

    @property
    def moves(self) -> list[str]:
        """Platforms the enclave moved to during this session, in order (from its sealed answers)."""
        return list(self._session.moves) if self._session is not None else []

    @property
    def attested(self) -> VerifiedQuote | None:
        """The quote the session was opened on (verified, bound to this session)."""
        return self._session.peer if self._session is not None else None

    @property
    def session_id(self) -> bytes | None:
        return self._session.session_id if self._session is not None else None

    @property
    def outstanding(self) -> bool:
        """A request was sent and its answer never came (its outcome is unknown until it is resent or closed)."""
        return self._session is not None and self._session.pending is not None

    # --- calls ------------------------------------------------------------------------------------------

    def _key(self) -> str:
        """Which enclave a kept unsettled session belongs to, known before any quote: name, directory, root."""
        return f"{self.name} via {self.route.etcd or '-'} ca {getattr(self.trust.verify, 'path', '-')}"

    def open(self) -> ClientSession:
        """Attest the enclave and agree on keys (done by the first call anyway); closes a session left with a
        request outstanding (here, or by an earlier process) and says what became of it (`settled`)."""
        if self._session is None:
            closing = self._closing
            if closing is None and self.unsettled is not None:
                closing = self.unsettled.get(self._key())
            hs = ClientOpen(closing)
            accept = self.route.request(control.SessionOpen(name=self.name, hello=hs.hello))
            if not isinstance(accept, bytes):
                raise ProtocolError("the agent answered a session open with something else than bytes")
            self._session = hs.finish(accept, self.trust.verify, lambda vq, about: self.trust.check(
                self.name, vq, about, self._agent, self.route.etcd))
            if closing is not None:
                assert self._session.closed is not None  # finish() checked the close was answered
                self.settled = settle(closing, self._session.closed, self._session.about)
                self._closing = None
                if self.unsettled is not None:
                    self.unsettled.drop(self._key())
        return self._session

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one ECALL; its arguments, result and errors cross the host sealed."""
        self._finish_pending()
        self._call, self._what = (method, list(args), dict(kwargs)), _describe(method, args)
        session = self.open()
        session.seal_call(method, list(args), kwargs)
        answer = self._exchange()
        if not answer.ok:
            raise CallFailed(answer.error)
        return answer.result

    def platform_quote(self) -> VerifiedQuote:
        """A fresh quote from the platform the enclave runs on now, bound to this session."""
        self._finish_pending()
        self._call, self._what = None, "platform quote"
        session = self.open()
        session.seal_quote_request()
        answer = self._exchange()
        if not answer.ok or not isinstance(answer.result, bytes):
            raise CallFailed(answer.error or "the enclave did not return a quote")
        return session.check_platform_quote(answer.result, self.trust.verify)

    def _finish_pending(self) -> None:
        """A request whose answer was lost is completed first (exactly once), its answer dropped."""
        if self._session is not None and self._session.pending is not None:
            self._exchange()

    def _exchange(self, resends: int = 0) -> Answer:
        session = self._session
        assert session is not None and session.pending is not None
        if self.unsettled is not None:  # until its answer comes, the next process must be able to close it
            self.unsettled.put(self._key(), session.closing(self._what))
        try:
            record = self.route.request(control.SessionCall(name=self.name, record=session.pending))
        except SessionUnknown:
            # Never sealed again while the old session may still run it: close that session first.
            self._closing, self._session = session.closing(self._what), None
            return self._recover(resends)
        if not isinstance(record, bytes):
            raise ProtocolError("the agent answered a sealed request with something else than bytes")
        answer = session.open_answer(record)  # IntegrityError: forged, replayed or stale answer
        if self.unsettled is not None:
            self.unsettled.drop(self._key())
        return answer

    def _recover(self, resends: int) -> Answer:
        """The host says the enclave does not know the session: a new session closes it, and the enclave
        says whether the request ran; if it provably did not, it is sent once more, in the new session."""
        what = f" ({self._what})" if self._what else ""
        session = self.open()
        settled = self.settled
        assert settled is not None
        if settled.ran is None:
            raise CallFailed(f"enclave {self.name!r} does not know this session any more (it was restored from a "
                             "checkpoint, or the session sat idle past the table's limit, or the instance is not "
                             f"the one it was with): the call{what} may or may not have run, and it can no longer "
                             "run; the next call uses a new session")
        if settled.ran:
            if settled.answer is not None:
                return settled.answer
            raise CallFailed(f"the call{what} ran, but the host withheld its answer, which was too large to "
                             "recover; the next call uses a new session")
        if self._call is None or resends >= MAX_RESENDS:
            raise CallFailed(f"the call{what} did not run: the host kept claiming its session was unknown; its "
                             "sessions are closed, so it never will")
        method, args, kwargs = self._call
        session.seal_call(method, args, kwargs)
        answer = self._exchange(resends + 1)
        self.settled = Settled(False, None, f"the host claimed the session was unknown; the call{what} had not "
                                            "run there (that session is closed now), so it ran once in a new one")
        return answer

    def close(self) -> None:
        self.route.close()

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pin_now(addr: str | None, name: str, trust: Trust, etcd: str | None = None,
            timeout: float | None = 60.0) -> tuple[Pin | None, Pin | None]:
    """What `constmig trust` does: attest whatever answers as `name` now and pin it in `trust`'s store on
    purpose, replacing an earlier pin. For whoever just launched the enclave (`run`, a bench, a demo);
    returns (the new pin, the one it replaced), or (None, None) for a trust that pins nothing."""
    if trust.known is None:
        return None, None
    seen = Trust(trust.verify)  # no pin and no expectation: this is the moment the pin is made
    with EnclaveClient(addr, name, timeout=timeout, trust=seen, etcd=etcd) as c:
        session = c.open()
    before = trust.known.get(name, seen.fleet, etcd or "")
    pin = Pin.of(name, seen.fleet, etcd or "", session.peer, session.about)
    if trust.expect is not None:
        trust.expect.check(name, session.peer)
    trust.known.pin(pin)
    return pin, before
