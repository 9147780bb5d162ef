"""A secure channel plus the protocol machine: every message sent or received is checked first."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from constmig.errors import ConstmigError, PeerAborted, ProtocolError
from constmig.migration import messages as m
from constmig.migration.protocol import CHUNK, Machine
from constmig.wire.channel import Arrival, ControlRecord, OpenedChunk, SealedChunk, SecureChannel

T = TypeVar("T")


class Link:
    """The migration's view of its channel: typed messages, table-checked, with a receive timeout."""

    def __init__(self, chan: SecureChannel, machine: Machine, timeout: float) -> None:
        self.chan = chan
        self.machine = machine
        self.timeout = timeout

    def send(self, msg: m.Message) -> None:
        self.machine.sent(msg)
        self.chan.send_control(m.encode(msg))

    def send_chunk(self, index: int, data: memoryview, *, demand: bool = False) -> bytes:
        """Send one chunk; returns its GCM tag for the ledger."""
        self.machine.sent(CHUNK)
        return self.chan.send_chunk(index, data, demand=demand)

    def recv(self, timeout: float | None = None) -> m.Message | SealedChunk:
        """The next message, within `timeout` seconds (default: the link's)."""
        return self._judge(self.chan.recv(timeout=self.timeout if timeout is None else timeout))

    def recv_opened(self, out: memoryview | np.ndarray, timeout: float | None = None) -> m.Message | Arrival:
        """`recv` through the native engine (the post-copy receive threads on the native data plane): a
        chunk comes back verified into `out` (SecureChannel.recv_opened)."""
        from constmig.native.engine import NativeOpener

        return self._judge(self.chan.recv_opened(NativeOpener, out, self.timeout if timeout is None else timeout))

    def _judge(self, rec: object) -> m.Message | Arrival:
        if isinstance(rec, SealedChunk | OpenedChunk):
            self.machine.received(CHUNK)
            return rec
        if not isinstance(rec, ControlRecord):
            self.machine.fail()
            raise ProtocolError("unexpected handshake record after keys were set")
        msg = m.decode(rec.payload)
        self.machine.received(msg)
        if isinstance(msg, m.Abort):
            raise PeerAborted(f"peer aborted the migration: {msg.reason}")
        return msg

    def expect(self, kind: type[T], timeout: float | None = None) -> T:
        msg = self.recv(timeout)
        if not isinstance(msg, kind):  # the table already refused anything illegal; this is belt and braces
            self.machine.fail()
            raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
        return msg

    def abort(self, reason: str) -> None:
        """Tell the peer (best effort) and fail the machine."""
        if not self.machine.committed:
            try:
                self.machine.sent(m.Abort(reason[:500]))
                self.chan.send_last_words(m.encode(m.Abort(reason[:500])))
            except (ConstmigError, OSError):
                pass
        self.machine.fail()
