"""`constmig.testing.check_migrates` against an app that reads its heap through `np.asarray` (a path the
Access Tracker's checks miss; tests/testing/escaper_app.py). Its slow stream keeps chunks missing while
the client calls, so such a read meets a guarded chunk: the enclave's fault handler serves it (the app
reads what `fill` wrote, checked by the app itself), and the report counts it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from constmig.enclave.tracker.untracked import available

APP = "escaper_app:Escaper"  # tests/testing/escaper_app.py, on the agents' PYTHONPATH


@pytest.fixture
def app_path(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_an_untracked_read_under_the_access_tracker_is_served_and_counted(app_path: None):
    from constmig.testing import check_migrates

    report = check_migrates(APP, heap="32M", fill=0.9, call=("scan", []), strategies=["constmig-access"])
    assert report.ok, report.problems
    assert report.calls >= 4  # answered while chunks were missing, each one checked by the app
    moves = report.migrations
    assert [m["variant"] for m in moves] == ["constmig-access"] * 2
    # the slow stream kept chunks missing: the app's np.asarray reads met guarded chunks and waited for them
    assert all(m["untracked_accesses"] > 0 for m in moves), moves
    assert report.untracked_accesses == sum(m["untracked_accesses"] for m in moves)
    assert all(m["background_chunks"] + m["demand_chunks"] == m["chunks"] for m in moves)
