"""Quote producers and detect() against fake trees in tmp_path (no SGX or TDX machine here).

The fake Gramine tree is plain files: the producer's reads and writes are exactly Gramine's. The fake
configfs needs a kernel's two actions, populating an entry on mkdir and removing it on rmdir; FakeTsm
does those and nothing else. Quotes served are the real recorded vectors, so the producers' own check
(the returned quote carries our report data) runs on real quotes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dcap_qvl
import pytest

from constmig.errors import AttestationError, ConfigError
from constmig.tee.producers import NO_HARDWARE, GramineSgx, TdxConfigfsTsm, detect, resolve_tee

VECTORS = Path(__file__).parent / "vectors"
SGX_Q, TDX_Q = (VECTORS / "sgx_quote").read_bytes(), (VECTORS / "tdx_quote").read_bytes()
SGX_RD = bytes(dcap_qvl.parse_quote(SGX_Q).report.report_data)
TDX_RD = bytes(dcap_qvl.parse_quote(TDX_Q).report.report_data)


def gramine(root: Path, served: bytes = SGX_Q, kind: str | None = "dcap") -> Path:
    dev = root / "dev" / "attestation"
    dev.mkdir(parents=True)
    (dev / "user_report_data").write_bytes(bytes(64))
    (dev / "quote").write_bytes(served)
    if kind is not None:
        (dev / "attestation_type").write_text(kind + "\n")
    return dev


def tdx_tree(root: Path) -> None:
    (root / "sys" / "kernel" / "config" / "tsm" / "report").mkdir(parents=True)
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev" / "tdx_guest").write_bytes(b"")


class FakeTsm(TdxConfigfsTsm):
    """configfs-tsm's kernel side: mkdir makes the attribute files (outblob: a recorded quote); rmdir
    removes them. What the producer wrote to inblob is kept for the test to check."""

    served: bytes = TDX_Q
    provider: str = "tdx_guest"
    inblobs: list[bytes]

    def _create_entry(self, entry: Path) -> None:
        entry.mkdir()
        for name, data in (("inblob", b""), ("outblob", self.served), ("provider", self.provider.encode() + b"\n"),
                           ("generation", b"1\n")):
            (entry / name).write_bytes(data)

    def _remove_entry(self, entry: Path) -> None:
        FakeTsm.inblobs.append((entry / "inblob").read_bytes())
        shutil.rmtree(entry)


@pytest.fixture(autouse=True)
def _fresh_inblobs() -> None:
    FakeTsm.inblobs = []


def test_nothing_found_and_auto_never_falls_back_to_sim(tmp_path: Path) -> None:
    found = detect(tmp_path)
    assert found.producer is None and found.kind is None
    assert "Gramine: no" in found.reason and "TDX: no" in found.reason
    with pytest.raises(ConfigError) as info:
        resolve_tee("auto", tmp_path)
    assert str(info.value).startswith(NO_HARDWARE) and "\n" not in str(info.value)
    assert NO_HARDWARE == ("no SGX (Gramine /dev/attestation) or TDX (configfs-tsm) found; "
                           "use --tee sim for the software TEE")
    assert resolve_tee("sim", tmp_path) == "sim"
    with pytest.raises(ConfigError, match="--tee must be one of"):
        resolve_tee("sev", tmp_path)
    with pytest.raises(ConfigError, match=r"^--tee sgx: Gramine: no "):
        resolve_tee("sgx", tmp_path)


def test_gramine_detected_and_quotes(tmp_path: Path) -> None:
    dev = gramine(tmp_path)
    found = resolve_tee("auto", tmp_path)
    assert found != "sim" and found.kind == "sgx" and isinstance(found.producer, GramineSgx)
    assert found.producer.quote(SGX_RD) == SGX_Q
    assert (dev / "user_report_data").read_bytes() == SGX_RD


def test_gramine_refuses_a_quote_over_other_report_data(tmp_path: Path) -> None:
    gramine(tmp_path)
    with pytest.raises(AttestationError, match="quote over other report data"):
        GramineSgx(tmp_path).quote(bytes(64))
    with pytest.raises(ValueError, match="64 bytes"):
        GramineSgx(tmp_path).quote(b"short")


def test_gramine_serving_a_tdx_or_broken_quote_is_refused(tmp_path: Path) -> None:
    dev = gramine(tmp_path, served=TDX_Q)
    with pytest.raises(AttestationError, match="returned a TDX quote, expected SGX"):
        GramineSgx(tmp_path).quote(TDX_RD)
    (dev / "quote").write_bytes(b"\x03\x00garbage")
    with pytest.raises(AttestationError, match="malformed quote"):
        GramineSgx(tmp_path).quote(SGX_RD)
    (dev / "quote").unlink()
    with pytest.raises(AttestationError, match=r"^Gramine SGX quote: No such file"):
        GramineSgx(tmp_path).quote(SGX_RD)


@pytest.mark.parametrize("setup,reason", [
    (lambda dev: (dev / "attestation_type").write_text("none\n"), "attestation type 'none', not dcap"),
    (lambda dev: (dev / "quote").unlink(), "lacks quote"),
])
def test_gramine_without_dcap_is_not_detected(tmp_path: Path, setup, reason: str) -> None:
    setup(gramine(tmp_path))
    found = detect(tmp_path)
    assert found.producer is None and reason in found.reason


def test_tdx_detected_and_quotes_through_a_fresh_entry(tmp_path: Path) -> None:
    tdx_tree(tmp_path)
    found = detect(tmp_path)
    assert found.kind == "tdx"
    producer = FakeTsm(tmp_path)
    assert producer.quote(TDX_RD) == TDX_Q
    assert FakeTsm.inblobs == [TDX_RD]
    assert list(producer.reports.iterdir()) == []  # the entry is gone


def test_tdx_refusals_remove_the_entry(tmp_path: Path) -> None:
    tdx_tree(tmp_path)
    with pytest.raises(AttestationError, match="quote over other report data"):
        FakeTsm(tmp_path).quote(bytes(64))
    other = type("SevTsm", (FakeTsm,), {"provider": "sev_guest"})
    with pytest.raises(AttestationError, match="provider is 'sev_guest', not tdx_guest"):
        other(tmp_path).quote(TDX_RD)
    assert list(TdxConfigfsTsm(tmp_path).reports.iterdir()) == []


def test_tdx_without_a_kernel_behind_configfs_fails_in_one_line(tmp_path: Path) -> None:
    """The real class on a plain directory: mkdir works, but no attribute files appear."""
    tdx_tree(tmp_path)
    with pytest.raises(AttestationError) as info:
        TdxConfigfsTsm(tmp_path).quote(TDX_RD)
    assert str(info.value).startswith("TDX configfs-tsm quote: No such file") and "\n" not in str(info.value)
    assert list(TdxConfigfsTsm(tmp_path).reports.iterdir()) == []


def test_tdx_needs_the_guest_device(tmp_path: Path) -> None:
    tdx_tree(tmp_path)
    (tmp_path / "dev" / "tdx_guest").unlink()
    assert "not a TDX guest" in detect(tmp_path).reason
    with pytest.raises(ConfigError, match=r"^--tee tdx: TDX: "):
        resolve_tee("tdx", tmp_path)


def test_gramine_is_preferred_when_both_exist_and_explicit_choice_wins(tmp_path: Path) -> None:
    gramine(tmp_path)
    tdx_tree(tmp_path)
    assert detect(tmp_path).kind == "sgx"
    tdx = resolve_tee("tdx", tmp_path)
    assert tdx != "sim" and tdx.kind == "tdx"
