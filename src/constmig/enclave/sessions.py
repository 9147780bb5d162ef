"""The enclave's client sessions (wire/session.py): open, one sealed call at a time, and the table that
moves with the enclave.

Why the table lives here and not in the agent: the keys must never leave trusted memory except inside
the migration's sealed small state. A call is received, run and answered under the app lock (the
caller holds it), so the stop of a migration exports a table in which every request either ran (its
answer kept for a resend) or did not (its seq still expected): a call in flight at the stop is answered
exactly once, by one side. The export also freezes the table: no session opens or closes between the
stop and the handoff (it would not move), so a close the client was told about holds wherever the
enclave runs next. After the handoff the source empties its table: the session is refused there for
good and continues on the destination.

Closing. A Hello that proves it holds an old session's keys closes that session before the enclave
answers, and the Accept says how many of its requests ran: a record of it the host kept is refused from
then on ("closed by its client"). Opens do not take the app lock, so a close can arrive while a request of
that session runs: it waits for the request's answer and counts it (else the client, told its request never
ran, would send it again). The last MAX_CLOSED closes (and idle evictions) are remembered with that count,
and move with the table, so a client whose closing Accept the host dropped still learns it.

The table's limit. A stranger can open sessions too (opening needs no credentials), so the limit must not
let anyone push a live client out: when the table is full, only a session idle for IDLE_EVICT_S makes
room (its count is remembered like a close; a session whose request is running is never idle); otherwise
the new open is refused with one line, and the live sessions go on.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from constmig.errors import ConstmigError, EnclaveError, EnclaveNotRunning, IntegrityError, SessionUnknown
from constmig.tee.backend import Identity, TeeBackend
from constmig.wire.session import (
    About,
    Answer,
    Call,
    Closed,
    EnclaveEnd,
    Hello,
    QuoteRequest,
    accept,
    decode_table,
    encode_table,
    parse_hello,
    split_record,
)

MAX_SESSIONS = 1024  # open sessions; beyond it only an idle one makes room
IDLE_EVICT_S = 600.0  # a session unused this long may be dropped for a new one (its client learns the count)
MAX_CLOSED = 4096  # closed or evicted sessions remembered with how many of their requests ran


class SessionTable:
    def __init__(self, backend: TeeBackend, identity: Identity, about: About | None = None) -> None:
        self.backend = backend
        self.identity = identity
        self.about = about  # who this enclave is; None until it knows (an incoming one: at COMMIT)
        self._ends: OrderedDict[bytes, EnclaveEnd] = OrderedDict()  # least recently used first
        self._used: dict[bytes, float] = {}  # monotonic time of each session's last open or call
        self._closed: OrderedDict[bytes, Closed] = OrderedDict()
        self._lock = threading.Lock()  # opens run beside calls (which hold the app lock)
        self._running: set[bytes] = set()  # sessions with a request being received, run and answered
        self._ended = threading.Condition(self._lock)  # notified when such a request is answered (or refused)
        self.closed = False  # handed off: every session continues elsewhere
        self.frozen = False  # exported for a migration: nothing opens or closes until it ends

    def __len__(self) -> int:
        return len(self._ends)

    def open(self, hello: bytes) -> bytes:
        """A client's Hello in, the Accept (with this enclave's quote bound to it) out. The close the Hello
        asks for, the room the new session needs and its entry happen under one lock, before the answer."""
        h = parse_hello(hello)
        with self._lock:
            while h.close is not None and h.close.session_id in self._running:
                self._ended.wait()  # a request of the session to close is running: the close counts it
            if self.closed:
                raise SessionUnknown("this enclave has moved; open the session where it runs now")
            if self.frozen or self.about is None:
                raise EnclaveNotRunning("enclave is not running (moving, or not started yet); it opens no "
                                        "session now")
            closed = self._close(h.close.session_id, h) if h.close is not None else None
            self._make_room()
            end, reply = accept(hello, lambda rd: self.backend.quote(self.identity, rd), self.about, closed)
            self._ends[end.session_id] = end
            self._used[end.session_id] = time.monotonic()
        return reply

    def _close(self, sid: bytes, h: Hello) -> Closed:
        end = self._ends.get(sid)
        if end is None:
            return self._closed.get(sid) or Closed(sid, False)
        if not end.proves_close(h):
            raise IntegrityError("the close of an earlier session in this hello does not verify (not made "
                                 "with that session's keys); refused")
        return self._drop(sid, end)

    def _drop(self, sid: bytes, end: EnclaveEnd) -> Closed:
        """Forget a session, remembering how many of its requests ran (not its answer: kept small)."""
        del self._ends[sid]
        self._used.pop(sid, None)
        closed = end.closed()
        self._closed[sid] = Closed(sid, True, closed.ran)
        while len(self._closed) > MAX_CLOSED:
            self._closed.popitem(last=False)
        return closed

    def _make_room(self) -> None:
        if len(self._ends) < MAX_SESSIONS:
            return
        sid, end = next(iter(self._ends.items()))
        idle = time.monotonic() - self._used.get(sid, 0.0)
        if idle < IDLE_EVICT_S or sid in self._running:
            raise EnclaveError(f"enclave has {len(self._ends)} open sessions and none has been idle for "
                               f"{IDLE_EVICT_S / 60:.0f} minutes; no new session now (try again later)")
        self._drop(sid, end)

    def call(self, record: bytes, run: Callable[[str, list[Any], dict[str, Any]], Any]) -> bytes:
        """Receive, run and answer one sealed request. The caller holds the app lock and has checked the
        app runs: nothing here may run a request twice or lose its answer."""
        sid, _, _ = split_record(record)
        with self._lock:
            end = self._ends.get(sid)
            if end is None:
                if sid in self._closed:
                    raise SessionUnknown("this session was closed (by its client, or idle past the table's "
                                         "limit); its requests are refused: open a new one")
                raise SessionUnknown("no such session in this enclave (it expired, or the enclave was "
                                     "restarted or restored); open a new one")
            self._ends.move_to_end(sid)
            self._used[sid] = time.monotonic()
            self._running.add(sid)  # until answered, a close of this session waits and it is never evicted
        try:
            return self._receive_run_answer(end, record, run)
        finally:
            with self._lock:
                self._running.discard(sid)
                self._ended.notify_all()

    def _receive_run_answer(self, end: EnclaveEnd, record: bytes,
                            run: Callable[[str, list[Any], dict[str, Any]], Any]) -> bytes:
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
        """Every session's keys and positions, and the closes remembered (for the sealed small state of a
        migration). Freezes the table until thaw() or the handoff: what is exported is what moves."""
        with self._lock:
            blob = encode_table(list(self._ends.values()), list(self._closed.values()))
            self.frozen = True
            return blob

    def thaw(self) -> None:
        """The migration ended before the handoff: this table is the enclave's again."""
        with self._lock:
            self.frozen = False

    def adopt(self, blob: bytes) -> None:
        """The source's sessions continue here (the destination, at COMMIT); their idle clocks start now."""
        if not blob:
            return
        table = decode_table(blob)
        now = time.monotonic()
        with self._lock:
            for end in table.ends:
                self._ends[end.session_id] = end
                self._used[end.session_id] = now
            for closed in table.closed[-MAX_CLOSED:]:
                self._closed[closed.session_id] = closed

    def close(self) -> None:
        """Handed off: no new session opens here (calls are refused by the lifecycle already)."""
        with self._lock:
            self.closed = True

    def reopen(self) -> None:
        """The destination gave the enclave back (authenticated ABORT): sessions continue here."""
        with self._lock:
            self.closed = self.frozen = False

    def wipe(self) -> None:
        """The destination runs the enclave for good: forget every key here."""
        with self._lock:
            self._ends.clear()
            self._used.clear()
            self._closed.clear()
            self.closed = True
