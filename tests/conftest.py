"""Every test run gets its own root CA folder and known-enclaves file, never the user's (~/.constmig).

Agents started without --ca-dir (LocalCluster, Testbed, `constmig agent`) and clients without a Trust
both read $CONSTMIG_CA_DIR, so setting it here before anything starts makes them agree.

Test lanes (`--lane NAME`, repeatable; README "Test lanes" has each one's time): every test is in exactly
one lane, decided from its markers by `lane_of`. `fast` is the README's test command, run before every
commit: unit tests, in-process attacks and the e2e tests marked `smoke`. `.ci/run` runs every lane.

Ctrl-C is tested as a real SIGINT, so a run that started with SIGINT ignored (a shell's background job:
`nohup bash .ci/run &`) gets Python's default handler back; the CLIs and agents it starts inherit it."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

import pytest

_CA_DIR = tempfile.mkdtemp(prefix="constmig-test-ca-")

LANES = {
    "fast": "unit tests, in-process attacks, a few e2e smoke tests",
    "e2e": "end-to-end tests with real agent, enclave and pager processes",
    "adversarial": "end-to-end attacks: the host or a stranger plays against real processes",
    "reliability": "failures and degraded networks on the namespace testbed",
    "bench": "benchmarks run as a user would, checked from their JSON",
    "stateful": "the stateful property test against a model",
}


def lane_of(item: pytest.Item) -> str:
    """The one lane a test runs in, from its markers (and tests/bench/ for the bench lane)."""
    marks = {m.name for m in item.iter_markers()}
    if "smoke" in marks:
        return "fast"
    for lane in ("stateful", "reliability", "bench"):
        if lane in marks:
            return lane
    if "e2e" not in marks:
        return "fast"
    if item.path.parent.name == "bench":
        return "bench"
    return "adversarial" if "adversarial" in marks else "e2e"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lane", action="append", default=[], choices=sorted(LANES),
                     help="Run only this lane's tests (repeatable): " +
                          "; ".join(f"{k}: {v}" for k, v in LANES.items()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lanes = set(config.getoption("--lane"))
    if not lanes:
        return
    keep = [i for i in items if lane_of(i) in lanes]
    config.hook.pytest_deselected(items=[i for i in items if lane_of(i) not in lanes])
    items[:] = keep


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
