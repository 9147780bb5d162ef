"""The fault table in docs/reliability.md is exactly what faults.py renders (no testbed needed, so
this runs everywhere and the doc cannot drift from the scenarios CI runs)."""

from __future__ import annotations

import faults as F
import pytest

pytestmark = pytest.mark.reliability


def test_doc_table_is_current() -> None:
    text = F.DOC.read_text()
    assert F.doc_table(text) == F.render(), "run `python tests/reliability/faults.py --write`"


def test_scenarios_are_well_formed() -> None:
    ids = [s.id for s in F.SCENARIOS]
    assert len(ids) == len(set(ids))
    for s in F.SCENARIOS:
        for e in (s.today, s.should):
            if e is None:
                continue
            assert e.runs in (*F.RUNS, "one") and e.result in F.RESULTS and e.writes in F.WRITES, s.id
        assert s.phase in F.PHASES and s.fault in F.FAULTS and (s.strategy, s.tracker) in F.STRATEGIES, s.id
        assert bool(s.bug) == (s.should is not None), s.id
        assert s.mitigation in ("", "checkpoint", "refused"), s.id
