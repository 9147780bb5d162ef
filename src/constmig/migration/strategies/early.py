"""The destination's side of pre-copy rounds before the small state: the newest version each round
brought, the chunks the source called stale since, and at the state which of them it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from constmig.errors import ProtocolError
from constmig.migration.ledger import ChunkLedger

if TYPE_CHECKING:
    from constmig.migration.port import MigratingEnclave as Enclave


@dataclass
class Early:
    """Destination, before the small state: the newest version each round brought (`ledger`), and the
    chunks the source called stale since (`stale`: in a plain heap their old bytes are still there;
    under a tracker they were made missing again)."""

    ledger: ChunkLedger
    stale: np.ndarray

    def let_go(self, enclave: Enclave, chunks: np.ndarray) -> None:
        """The source says these versions are stale (written since): they count no more."""
        got = self.ledger
        if chunks.size and not got.received[chunks].all():
            bad = int(chunks[~got.received[chunks]][0])
            raise ProtocolError(f"the source calls chunk {bad} stale, but no round brought it")
        enclave.tracking.make_missing(chunks)
        self.stale[chunks] = True
        got.received[chunks] = False
        got.count = int(np.count_nonzero(got.received))


def keep_held(enclave: Enclave, ledger: ChunkLedger, early: Early, held: np.ndarray) -> np.ndarray:
    """Destination, at the small state: keep the round versions of `held` (in the ledger, with their
    tags) and let go of every other chunk the rounds brought (its version is stale, or the chunk was
    freed since). Returns the chunks whose heap bytes are stale (a plain heap's: the chunks sent at
    the stop must overwrite them, zero records included; under a tracker they are missing)."""
    got = early.ledger
    mask = np.zeros(ledger.n_chunks, dtype=bool)
    mask[held] = True
    unbrought = np.flatnonzero(mask & ~(got.received & ledger.expected_mask))
    if unbrought.size:
        bad = int(unbrought[0])
        raise ProtocolError(f"the small state keeps chunk {bad}, which no round brought or the migration does "
                            "not expect")
    ledger.hold(held, got.tags[held])
    drop = got.received & ~mask
    early.let_go(enclave, np.flatnonzero(drop & ledger.expected_mask))
    freed = np.flatnonzero((drop | early.stale) & ~ledger.expected_mask)
    enclave.tracking.release(freed)  # not part of the migration any more: zeros, as in a fresh heap
    early.stale[freed] = False
    return early.stale
