"""One exception family, so the CLI can turn any expected failure into a one-line message.

Every error raised on purpose by constmig derives from ConstmigError; anything else is a bug and
is allowed to show a traceback.
"""


class ConstmigError(Exception):
    """Base of every expected failure; str(e) is a complete one-line message."""


class ConfigError(ConstmigError):
    """Bad user input: a malformed size, an unknown app, a missing file."""


class AttestationError(ConstmigError):
    """A quote, certificate or measurement did not verify, or a policy refused it."""


class ProtocolError(ConstmigError):
    """A peer sent a message that is malformed or not allowed in the current state."""


class IntegrityError(ProtocolError):
    """An authenticated record failed its tag check, or arrived out of sequence."""


class PeerAborted(ProtocolError):
    """The peer enclave said, over the authenticated channel, that it gave the migration up."""


class ChannelClosed(ProtocolError):
    """The stream ended (EOF or reset) before the protocol said it could."""


class HeapError(ConstmigError):
    """A heap could not be created, or an allocation does not fit."""


class EnclaveError(ConstmigError):
    """An ECALL failed inside the enclave, or the enclave is in the wrong lifecycle state."""


class HeapIncomplete(EnclaveError):
    """The heap is still arriving from a migration: nothing may export it whole (migrate out, checkpoint)."""


class MigrationError(ConstmigError):
    """A migration failed; the message says which side still runs the enclave."""


class AgentError(ConstmigError):
    """An agent could not be reached or refused a request."""
