"""The shape of an enclave application: a class whose methods are ECALLs, whose big state lives in the heap.

An app never sees migration: the runtime exports its small state (plain attributes) at the stop and
rebinds its heap arrays by name on the destination, so app code is the same for every strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from constmig.enclave.heap import Heap


def ecall(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method as callable from outside the enclave (by the agent, on a client's behalf)."""
    fn.__ecall__ = True  # type: ignore[attr-defined]
    return fn


class EnclaveApp:
    """Base class of enclave apps.

    Subclasses set `name`, allocate their arrays in `setup()` (fresh launch only; on a migration
    destination the arrays arrive with the heap), and mark ECALLs with @ecall. Arguments and results
    of ECALLs must be msgpack-able (str, bytes, int, float, bool, None, list, dict).
    """

    name: ClassVar[str] = ""
    # This release's security version: part of the app's source, hence of its measurement, so it is the
    # code's claim (as ISVSVN is the signer's in SGX), never a number the host picks at launch. Raise it
    # with a release that fixes a security bug: the default policy refuses a migration to a lower one.
    svn: ClassVar[int] = 1
    # Further modules of the app's own code (beyond the class's module) that the measurement covers: a
    # destination whose copy of any of them differs is refused. List every module the app's ECALLs run.
    measured_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, heap: Heap) -> None:
        self.heap = heap

    def setup(self, **config: Any) -> None:
        """Allocate heap arrays and initial state for a fresh instance."""

    @ecall
    def checksum(self) -> str:
        """A digest of all application state (heap arrays and small state), hex."""
        raise NotImplementedError

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Fill about `fraction` of the heap with incompressible data generated inside the enclave."""
        raise NotImplementedError

    @ecall
    def stats(self) -> dict[str, Any]:
        """Small, cheap facts about the app's state (counts, bytes used)."""
        return {}

    @classmethod
    def ecalls(cls) -> dict[str, str]:
        """Names of the ECALL methods of this app class (name -> method name)."""
        out = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if getattr(value, "__ecall__", False):
                    out[attr] = attr
        return out
