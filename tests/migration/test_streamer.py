"""The background stream's order (streamer.py), without sockets: heap order; after a demand, the few
chunks after it, then on in heap order from the demand, wrapping around for what it skipped."""

from __future__ import annotations

from typing import Any

import numpy as np

from constmig.migration import messages as m
from constmig.migration.ledger import ChunkLedger
from constmig.migration.streamer import FOLLOW, Streamer


def streamer(n: int, expected: list[int] | None = None, done: list[int] | None = None) -> Streamer:
    ledger = ChunkLedger(b"m" * 16, n, np.array(range(n) if expected is None else expected, dtype=np.int64))
    mask = None
    if done is not None:
        mask = np.zeros(n, dtype=bool)
        mask[done] = True
    none: Any = None  # the order needs no channel or heap
    return Streamer(none, none, ledger, none, lambda _: None, done=mask)


def background(s: Streamer, count: int | None = None) -> list[int]:
    out: list[int] = []
    while count is None or len(out) < count:
        idx = s._claim_next()
        if idx is None:
            break
        out.append(idx)
    return out


def test_the_stream_goes_in_heap_order() -> None:
    assert background(streamer(8)) == list(range(8))


def test_chunks_outside_the_ledger_or_held_already_are_skipped() -> None:
    assert background(streamer(10, expected=[0, 1, 2, 3, 7, 8], done=[2])) == [0, 1, 3, 7, 8]


def test_after_a_demand_its_followers_then_on_from_the_demand() -> None:
    n = 40
    s = streamer(n)
    assert background(s, 2) == [0, 1]
    assert s._claim_demand(m.Demand(10, 1)) == [10]
    rest = background(s)
    assert rest[:FOLLOW] == list(range(11, 11 + FOLLOW)), "the chunks right after a demand go next"
    assert rest[FOLLOW:] == list(range(11 + FOLLOW, n)) + list(range(2, 10)), \
        "then heap order from the demand, wrapping around"
    assert sorted([0, 1, 10] + rest) == list(range(n)), "every chunk exactly once"


def test_a_batch_demand_sends_its_second_half_on_the_background_next() -> None:
    s = streamer(20)
    run = s._claim_demand(m.Demand(4, 6, whole=True))
    assert run == [4, 5, 6]
    assert background(s) == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3]


def test_chunks_claimed_by_the_demand_path_are_never_sent_again() -> None:
    s = streamer(12)
    assert s._claim_demand(m.Demand(3, 2)) == [3, 4]
    got = background(s)
    assert 3 not in got and 4 not in got
    assert sorted(got + [3, 4]) == list(range(12))
