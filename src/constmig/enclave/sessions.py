"""The enclave's client sessions (wire/session.py): open, one sealed call at a time, and the table that
moves with the enclave.

Why the table lives here and not in the agent: the keys must never leave trusted memory except inside
the migration's sealed small state. A call is received, run and answered under the app lock (the
caller holds it), so the stop of a migration exports a table in which every request either ran (its
answer kept for a resend) or did not (its seq still expected): a call in flight at the stop is answered
exactly once, by one side. After the handoff the source empties its table: the session is refused
there for good and continues on the destination.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from constmig.errors import ConstmigError, SessionUnknown
from constmig.tee.backend import Identity, TeeBackend
from constmig.wire.session import (
    Answer,
    Call,
    EnclaveEnd,
    QuoteRequest,
    accept,
    decode_ends,
    encode_ends,
    split_record,
)

MAX_SESSIONS = 1024  # beyond it the least recently used session is dropped (its client opens anew)


class SessionTable:
    def __init__(self, backend: TeeBackend, identity: Identity) -> None:
        self.backend = backend
        self.identity = identity
        self._ends: OrderedDict[bytes, EnclaveEnd] = OrderedDict()
        self._lock = threading.Lock()  # opens run beside calls (which hold the app lock)
        self.closed = False  # handed off: every session continues elsewhere

    def __len__(self) -> int:
        return len(self._ends)

    def open(self, hello: bytes) -> bytes:
        """A client's Hello in, the Accept (with this enclave's quote bound to it) out."""
        end, reply = accept(hello, lambda rd: self.backend.quote(self.identity, rd))
        with self._lock:
            if self.closed:
                raise SessionUnknown("this enclave has moved; open the session where it runs now")
            self._ends[end.session_id] = end
            while len(self._ends) > MAX_SESSIONS:
                self._ends.popitem(last=False)
        return reply

    def call(self, record: bytes, run: Callable[[str, list[Any], dict[str, Any]], Any]) -> bytes:
        """Receive, run and answer one sealed request. The caller holds the app lock and has checked the
        app runs: nothing here may run a request twice or lose its answer."""
        sid, _, _ = split_record(record)
        with self._lock:
            end = self._ends.get(sid)
            if end is None:
                raise SessionUnknown("no such session in this enclave (it expired, or the enclave was "
                                     "restarted or restored); open a new one")
            self._ends.move_to_end(sid)
        req = end.receive(record)  # refusals raise and change nothing
        if isinstance(req, bytes):
            return req  # the same request again: its answer again, not a second run
        platform = self.backend.platform_id
        if isinstance(req, QuoteRequest):
            answer = Answer(True, platform, self.backend.quote(self.identity, end.quote_report_data(req)))
        else:
            assert isinstance(req, Call)
            try:
                answer = Answer(True, platform, run(req.method, req.args, req.kwargs))
            except ConstmigError as e:  # the app's own refusal: the client's business, so sealed
                answer = Answer(False, platform, error=str(e), kind=type(e).__name__)
            except Exception as e:  # an app bug: it ran (partly, perhaps), so it is answered, never run again
                traceback.print_exc(file=sys.stderr)
                answer = Answer(False, platform, error=f"internal error in enclave: {type(e).__name__}: {e}",
                                kind="InternalError")
        return end.answer(record, answer)

    # --- migration -----------------------------------------------------------------------------------

    def export(self) -> bytes:
        """Every session's keys and positions (for the sealed small state of a migration)."""
        with self._lock:
            return encode_ends(list(self._ends.values()))

    def adopt(self, blob: bytes) -> None:
        """The source's sessions continue here (the destination, at COMMIT)."""
        if not blob:
            return
        ends = decode_ends(blob)
        with self._lock:
            for end in ends:
                self._ends[end.session_id] = end

    def close(self) -> None:
        """Handed off: no new session opens here (calls are refused by the lifecycle already)."""
        with self._lock:
            self.closed = True

    def reopen(self) -> None:
        """The destination gave the enclave back (authenticated ABORT): sessions continue here."""
        with self._lock:
            self.closed = False

    def wipe(self) -> None:
        """The destination runs the enclave for good: forget every key here."""
        with self._lock:
            self._ends.clear()
            self.closed = True
