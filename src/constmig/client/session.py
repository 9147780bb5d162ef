"""A client's attested session with one enclave, through whichever agent hosts it now.

The agent forwards the session's bytes and cannot read or forge them (wire/session.py). The session
follows the enclave: a redirect after a migration sends the next record to the new agent, where the
enclave continues the session with the same keys. A request whose answer was lost (a cut connection,
a move in between) is sent again as the same record, so it runs exactly once wherever the enclave is.
"""

from __future__ import annotations

from typing import Any

from constmig.client.trust import Trust
from constmig.errors import (
    CallFailed,
    ProtocolError,
    SessionUnknown,
)
from constmig.host.client import EnclaveRoute
from constmig.tee.backend import Identity, VerifiedQuote
from constmig.wire.session import Answer, ClientOpen, ClientSession


class EnclaveClient:
    """Calls one enclave by name over an attested, sealed session that moves with the enclave.

    `trust` says which root quotes chain to and which code is acceptable (default: the root in
    $CONSTMIG_CA_DIR, any code it attests; the CLI adds pinning). With `etcd` (a fleet directory's
    address), `addr` may be None: the directory says where the enclave runs, and is asked again when
    that agent is gone. Not thread-safe: one per thread.
    """

    def __init__(self, addr: str | None, name: str, timeout: float | None = 600.0, trust: Trust | None = None,
                 etcd: str | None = None) -> None:
        self.name = name
        self.trust = trust if trust is not None else Trust.default()
        self.route = EnclaveRoute(addr, name, timeout, etcd)
        self._session: ClientSession | None = None

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

    # --- calls ------------------------------------------------------------------------------------------

    def open(self) -> ClientSession:
        """Attest the enclave and agree on keys (done by the first call anyway)."""
        if self._session is None:
            hs = ClientOpen()
            accept = self.route.request({"op": "session_open", "hello": hs.hello})
            if not isinstance(accept, bytes):
                raise ProtocolError("the agent answered a session open with something else than bytes")
            self._session = hs.finish(accept, self.trust.verify, lambda vq: self.trust.check(self.name, vq))
        return self._session

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one ECALL; its arguments, result and errors cross the host sealed."""
        self._finish_pending()
        session = self.open()
        session.seal_call(method, list(args), kwargs)
        answer = self._exchange()
        if not answer.ok:
            raise CallFailed(answer.error)
        return answer.result

    def platform_quote(self) -> VerifiedQuote:
        """A fresh quote from the platform the enclave runs on now, bound to this session."""
        self._finish_pending()
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

    def _exchange(self) -> Answer:
        session = self._session
        assert session is not None and session.pending is not None
        try:
            record = self.route.request({"op": "session_call", "record": session.pending})
        except SessionUnknown:
            # Never sealed again in a new session: the host may have run it before saying so.
            self._session = None
            raise CallFailed(f"enclave {self.name!r} does not know this session (it was restarted or "
                               "restored, or the host interfered): the call may or may not have run; the "
                               "next call opens a new session") from None
        if not isinstance(record, bytes):
            raise ProtocolError("the agent answered a sealed request with something else than bytes")
        return session.open_answer(record)  # IntegrityError: forged, replayed or stale answer

    def close(self) -> None:
        self.route.close()

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
