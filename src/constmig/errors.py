"""One exception family, so the CLI can turn any expected failure into a one-line message.

Every error raised on purpose by constmig derives from ConstmigError; anything else is a bug and
is allowed to show a traceback. Callers branch on these types (and their typed fields), never on
message text.

Two axes for what goes wrong between two parties, as h11 separates local from remote protocol errors:
a **ProtocolError** says the peer (or someone posing as it) broke the rules: a malformed, illegal or
forged message; a **TransportError** says the connection failed (closed, reset, silent too long) and
says nothing about the peer's honesty. Recovery differs: a cut link is waited out or reconnected, a
broken rule never is.
"""

from __future__ import annotations

from enum import Enum


class ConstmigError(Exception):
    """Base of every expected failure; str(e) is a complete one-line message."""


class ConfigError(ConstmigError):
    """Bad user input: a malformed size, an unknown app, a missing file."""


class AttestationError(ConstmigError):
    """A quote, certificate or measurement did not verify, or a policy refused it."""


# --- the peer broke the rules ------------------------------------------------------------------------

class ProtocolError(ConstmigError):
    """A peer sent a message that is malformed or not allowed in the current state."""


class IntegrityError(ProtocolError):
    """An authenticated record failed its tag check, or arrived out of sequence."""


class HandshakeAborted(ProtocolError):
    """The peer sent Abort instead of its next handshake message; the reason is its (unauthenticated) word."""


class PeerAborted(ConstmigError):
    """The peer enclave said, over the authenticated channel, that it gave the migration up."""


# --- the connection failed ---------------------------------------------------------------------------

class TransportError(ConstmigError):
    """The connection failed: closed, reset, or silent past a timeout. Nothing about the peer's honesty."""


class ChannelClosed(TransportError):
    """The stream ended (EOF or reset) before the protocol said it could."""


class RecvTimeout(TransportError):
    """A receive ran out of time. A channel stays usable after it: a partial record is kept and the next
    receive continues it, so a slow link never desynchronizes the stream."""


# --- the parts -----------------------------------------------------------------------------------------

class HeapError(ConstmigError):
    """A heap could not be created, or an allocation does not fit."""


class UffdError(ConstmigError):
    """A userfaultfd syscall failed; `errno` is the kernel's error number (0 if none)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class EnclaveError(ConstmigError):
    """An ECALL failed inside the enclave, or the enclave is in the wrong lifecycle state.

    Seen from the agent, `state` is the enclave's lifecycle state when it answered (enclave/lifecycle.py's
    Life; None when the enclave could not say, e.g. its process is gone) and `tombstone` says that the
    instance gave an incoming migration up after READY and stays to answer the source's reconnect with
    ABORT."""

    def __init__(self, message: str, state: Enum | None = None, tombstone: bool = False) -> None:
        super().__init__(message)
        self.state = state
        self.tombstone = tombstone


class EnclaveNotRunning(EnclaveError):
    """The enclave refused an ECALL because it does not run the app now (stopped for a migration, handed
    off, incoming): the ECALL did not run, so it may be sent again where the enclave runs."""


class SessionUnknown(EnclaveError):
    """The enclave holds no such client session (expired, or the enclave restarted or was restored): the
    request did not run; a client with no request outstanding opens a new session."""


class LineageHeld(EnclaveError):
    """Another live instance holds this enclave's lineage (its platform counter) on this platform: a
    restore waits until that instance has stopped, and an instance that lost its lineage stops."""


class HeapIncomplete(EnclaveError):
    """The heap is still arriving from a migration: nothing may export it whole (migrate out, checkpoint)."""


class MigrationError(ConstmigError):
    """A migration failed; the message says which side still runs the enclave."""


class MigrationCancelled(MigrationError):
    """The operator cancelled a migration before its commit point (or the command that started it went
    away): the source runs on with all its data."""


class AgentError(ConstmigError):
    """An agent could not be reached or refused a request."""


class AgentUnreachable(AgentError):
    """The agent could not be reached, or the exchange with it broke (closed, or no answer in time):
    a reply may still be on its way, so the connection must not be reused."""


class NoReconnect(AgentError):
    """The destination agent answers that no enclave of that name there takes a reconnect: its copy is
    gone (or its host hides it; the source cannot tell, so it still may not run)."""


class PastCommitPoint(AgentError):
    """A cancel came too late: the migration passed its commit point (or is over), so the destination runs
    the enclave and the move goes on to its end. A caller that interrupts moves treats it as done."""


class CallFailed(AgentError):
    """The enclave answered a call with an error, inside the sealed session (the app refused it, or data it
    needs cannot arrive): authenticated, unlike an agent's own errors. An AgentError, so a caller handles
    every failed call in one place."""


class NoSuchEnclave(AgentError):
    """The agent asked has no enclave of that name (and does not know where it went)."""


class DirectoryError(ConstmigError):
    """The fleet directory (etcd) could not be reached, or has no usable entry for what was asked."""


class Redirect(AgentError):
    """The enclave lives elsewhere now."""

    def __init__(self, message: str, location: str) -> None:
        super().__init__(message)
        self.location = location
