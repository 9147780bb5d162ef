"""A confidential ledger: accounts with balances and a journal of every transfer, in enclave memory.

Heap arrays hold what grows (balances, the journal); small state holds the account index and counters,
which move at the stop. ECALL arguments and results are plain msgpack values (str, int, list, dict).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError
from constmig_ledger import journal as J

MAX_NAME = 64


class Ledger(EnclaveApp):
    name = "ledger"
    svn = 1
    measured_modules = ("constmig_ledger.journal",)  # measured with this module (see journal.py)

    def setup(self, **config: Any) -> None:
        accounts = config.get("accounts", 4096)
        if isinstance(accounts, bool) or not isinstance(accounts, int) or accounts < 1:
            raise ConfigError(f"ledger accounts must be a positive integer, not {accounts!r}")
        unknown = set(config) - {"accounts"}
        if unknown:
            raise ConfigError(f"unknown ledger option(s): {', '.join(sorted(unknown))}")
        self.balances = self.heap.alloc("ledger.balances", accounts, np.int64)
        rows = max((self.heap.free_bytes - (1 << 16)) // (8 * J.ROW), 16)
        self.journal = self.heap.alloc("ledger.journal", (rows, J.ROW), np.int64)
        self.index: dict[str, int] = {}
        self.seq = 0

    # -- helpers -----------------------------------------------------------------------------------------

    def _account(self, name: Any, create: bool = False) -> int:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise EnclaveError(f"an account name is a string of 1 to {MAX_NAME} characters, not {name!r}")
        i = self.index.get(name)
        if i is None:
            if not create:
                raise EnclaveError(f"no account {name!r}")
            if len(self.index) >= self.balances.size:
                raise EnclaveError(f"the ledger is full: {self.balances.size} accounts")
            i = self.index[name] = len(self.index)
        return i

    @staticmethod
    def _amount(amount: Any) -> int:
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount < 1 << 53:
            raise EnclaveError(f"an amount is a positive integer, not {amount!r}")
        return amount

    # -- ECALLs ------------------------------------------------------------------------------------------

    @ecall
    def deposit(self, account: str, amount: int) -> int:
        """Add `amount` to `account` (opened on first deposit); returns the new balance."""
        i, amount = self._account(account, create=True), self._amount(amount)
        self.balances[i] += amount
        self.seq = J.append(self.journal, self.seq, np.array([[-1, i, amount]]))
        return int(self.balances[i])

    @ecall
    def deposit_many(self, items: list[list[Any]]) -> int:
        """Many deposits in one call: [[account, amount], ...]; all or nothing. Returns how many."""
        if not isinstance(items, list) or not all(isinstance(x, list) and len(x) == 2 for x in items):
            raise EnclaveError("deposit_many takes [[account, amount], ...]")
        amounts = [self._amount(a) for _, a in items]
        rows = np.array([[-1, self._account(n, create=True), a] for (n, _), a in zip(items, amounts, strict=True)],
                        dtype=np.int64).reshape(-1, 3)
        np.add.at(self.balances, rows[:, 1], rows[:, 2])
        self.seq = J.append(self.journal, self.seq, rows)
        return len(items)

    @ecall
    def transfer(self, source: str, destination: str, amount: int) -> dict[str, int]:
        """Move `amount` between two accounts; refused (nothing changes) if the source lacks it."""
        s, d, amount = self._account(source), self._account(destination, create=True), self._amount(amount)
        if self.balances[s] < amount:
            raise EnclaveError(f"{source!r} holds {int(self.balances[s])}, less than {amount}")
        self.balances[s] -= amount
        self.balances[d] += amount
        self.seq = J.append(self.journal, self.seq, np.array([[s, d, amount]]))
        return {source: int(self.balances[s]), destination: int(self.balances[d])}

    @ecall
    def balance(self, account: str) -> int:
        return int(self.balances[self._account(account)])

    @ecall
    def history(self, n: int = 10) -> list[list[int]]:
        """The newest `n` journal entries: [source, destination, amount, seq] (-1: a deposit)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise EnclaveError(f"n must be a non-negative integer, not {n!r}")
        return J.last(self.journal, self.seq, n).tolist()

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Open accounts and journal random transfers among them until `fraction` of the journal is used."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        rng = np.random.default_rng(seed)
        n_acc = min(self.balances.size, 1024)
        for k in range(len(self.index), n_acc):
            self.index[f"fill-{k}"] = k
        rows = int(self.journal.shape[0] * fraction) - self.seq
        done = 0
        while done < rows:
            k = min(1 << 16, rows - done)
            batch = np.column_stack([rng.integers(0, n_acc, k), rng.integers(0, n_acc, k), rng.integers(1, 1000, k)])
            np.add.at(self.balances, batch[:, 1], batch[:, 2])
            np.subtract.at(self.balances, batch[:, 0], batch[:, 2])
            self.seq = J.append(self.journal, self.seq, batch)
            done += k
        return {"accounts": len(self.index), "journal": self.seq}

    @ecall
    def stats(self) -> dict[str, Any]:
        return {"accounts": len(self.index), "journal": self.seq, "journal_rows": int(self.journal.shape[0]),
                "used_bytes": self.heap.used_bytes}

    @ecall
    def checksum(self) -> str:
        h = hashlib.sha256(f"ledger:{self.seq}:{sorted(self.index.items())}".encode())
        h.update(memoryview(self.balances).cast("B"))
        h.update(memoryview(self.journal).cast("B"))
        return h.hexdigest()
