"""Every test run gets its own root CA folder and known-enclaves file, never the user's (~/.constmig).

Agents started without --ca-dir (LocalCluster, Testbed, `constmig agent`) and clients without a Trust
both read $CONSTMIG_CA_DIR, so setting it here before anything starts makes them agree.

Ctrl-C is tested as a real SIGINT, so a run that started with SIGINT ignored (a shell's background job:
`nohup bash .ci/run &`) gets Python's default handler back; the CLIs and agents it starts inherit it."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

import pytest

_CA_DIR = tempfile.mkdtemp(prefix="constmig-test-ca-")


def pytest_configure(config: pytest.Config) -> None:
    os.environ["CONSTMIG_CA_DIR"] = _CA_DIR
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_CA_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _known_enclaves(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins made by one test (CLI `call`, `trust`) never decide another's."""
    monkeypatch.setenv("CONSTMIG_KNOWN_ENCLAVES", str(tmp_path_factory.mktemp("known") / "known_enclaves.json"))


@pytest.fixture(scope="module")
def etcd_url():
    """A real etcd (the distribution's etcd-server package; .ci/run installs it) on loopback, one per module."""
    from constmig.host.etcd_server import LocalEtcd, etcd_binary

    if etcd_binary() is None:
        pytest.skip("no etcd binary (apt-get install etcd-server): the fleet directory tests need a real etcd")
    with LocalEtcd() as server:
        yield server.url
