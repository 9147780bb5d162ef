"""Client calls into the enclaves here: admission, holding calls while a migration decides where an
enclave lives, and the wait of a call into a post-copy destination whose stream paused.

The agent forwards calls it cannot read (sealed sessions, wire/session.py) or, for `--plain-calls`
enclaves, plain ECALLs; either way the rule is the same: a call goes in only while the enclave runs here,
waits while it moves, and follows it (a redirect) once it has moved. A call the enclave refused because
it had just stopped did not run, so it is sent again wherever the enclave then runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from constmig.errors import AgentError, EnclaveNotRunning
from constmig.host.metrics import AgentMetrics
from constmig.host.roster import Hosted, Roster
from constmig.host.status import CALLABLE
from constmig.host.status import Status as S
from constmig.wire import control

PAUSE_CHECK_S = 0.5  # how often a long call checks whether the enclave's stream is paused
RETRIES = 4  # a call refused by an enclave that just stopped for a migration is tried again this often


class Calls:
    """Admission of calls to the enclaves in `roster`; each answered call's wait goes into `metrics`."""

    def __init__(self, roster: Roster, metrics: AgentMetrics, host_id: str) -> None:
        self.roster, self.metrics, self.host_id = roster, metrics, host_id

    async def admit(self, name: str, inner: control.Request) -> Any:
        """Send `inner` to the named enclave once it runs here; redirect when it has moved."""
        t0, moving = time.monotonic(), False
        for _ in range(RETRIES):
            hosted = self.roster.get(name)
            status = hosted.status
            if status is S.PAUSED:
                raise AgentError(paused_error(hosted))
            if status is S.EXITED:
                raise AgentError(f"enclave {hosted.name!r} on agent {self.host_id} has exited "
                                 f"(code {hosted.handle.proc.returncode}); its state here is gone")
            if status not in CALLABLE:
                if hosted.settled.is_set():  # settled, yet not callable: never spin the event loop on it
                    raise AgentError(f"enclave {hosted.name!r} is {status.value}; it takes no calls")
                moving = True
                await hosted.settled.wait()  # a migration is deciding where this enclave lives
                continue
            moving = moving or status is not S.RUNNING
            try:
                result = await self._ecall(hosted, inner)
                self.metrics.call_wait.labels("yes" if moving or hosted.status is not S.RUNNING else "no").observe(
                    time.monotonic() - t0)
                return result
            except EnclaveNotRunning:
                # It stopped for a migration after the call was admitted; the call did not run. Once the
                # migration settles, the call goes wherever the enclave runs (here again, or a redirect).
                moving = True
                await hosted.settled.wait()
        raise AgentError(f"enclave {name!r} kept moving; the call did not run (try again)")

    async def _ecall(self, hosted: Hosted, inner: control.Request) -> Any:
        hosted.calls.record()
        call = asyncio.ensure_future(hosted.handle.call(inner))
        while True:
            done, _ = await asyncio.wait({call}, timeout=PAUSE_CHECK_S)
            if done:
                return call.result()
            # A call into a post-copy destination may wait for heap data; if its stream is paused, it
            # waits for the source to reconnect, but not past the migration's resume deadline.
            if hosted.handle.pager_status().get("state") == "paused":
                now = time.monotonic()
                hosted.paused_since = hosted.paused_since or now
                if now - hosted.paused_since > hosted.resume_deadline:
                    hosted.move(S.RUNNING, S.PAUSED)
                    raise AgentError(paused_error(hosted))
            else:
                hosted.paused_since = None


def paused_error(hosted: Hosted) -> str:
    """Why a call into a destination whose stream stopped cannot be answered, and where its data is."""
    reason = hosted.handle.pager_status().get("reason", "the stream stopped")
    return (f"enclave {hosted.name!r} is waiting for heap data its incoming migration could not "
            f"deliver ({reason}); the call is held inside the enclave until the migration recovers, so its outcome "
            "is unknown; the source agent holds the missing data while it runs (if it died, that data is lost: "
            "docs/reliability.md)")
