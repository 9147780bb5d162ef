"""The TEE backend interface: abstract where a hardware backend must fill in, frozen where it reports."""

from __future__ import annotations

import dataclasses

import pytest

from constmig.tee.backend import Identity, TeeBackend, VerifiedQuote

MEMBERS = ("quote", "verify", "sealing_key", "counters", "platform_id")


def _backend_class(without: str = "") -> type:
    ns = {
        "quote": lambda self, identity, report_data: b"q",
        "verify": lambda self, quote: None,
        "sealing_key": lambda self, identity, label: bytes(32),
        "counters": property(lambda self: None),
        "platform_id": property(lambda self: "host"),
    }
    ns.pop(without, None)
    return type("Backend", (TeeBackend,), ns)


def test_interface_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        TeeBackend()  # type: ignore[abstract]


@pytest.mark.parametrize("missing", MEMBERS)
def test_a_backend_must_provide_every_member(missing: str) -> None:
    with pytest.raises(TypeError, match=missing):
        _backend_class(missing)()


def test_a_complete_backend_works_and_counters_and_platform_id_are_properties() -> None:
    backend = _backend_class()()
    assert backend.platform_id == "host" and backend.counters is None
    assert isinstance(TeeBackend.__dict__["counters"], property)
    assert isinstance(TeeBackend.__dict__["platform_id"], property)
    assert TeeBackend.__abstractmethods__ == frozenset(MEMBERS)


def test_identity_and_verified_quote_are_frozen() -> None:
    ident = Identity(bytes(32), bytes(32), 1, 2)
    vq = VerifiedQuote(ident, bytes(64), "host-a", "sim")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.svn = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        vq.platform_id = "host-b"  # type: ignore[misc]
    assert hash(vq) == hash(VerifiedQuote(Identity(bytes(32), bytes(32), 1, 2), bytes(64), "host-a", "sim"))


def test_measurement_is_measurement_size_bytes() -> None:
    from constmig.tee.measure import MEASUREMENT_SIZE, measure

    assert MEASUREMENT_SIZE == 32
    assert len(measure(b"code")) == len(measure(b"", b"config")) == MEASUREMENT_SIZE
