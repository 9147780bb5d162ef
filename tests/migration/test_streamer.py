"""The background stream's order (streamer.py), without sockets: hot chunks first, then heap order; after a
demand, the few chunks after it, back to the hot ones, then on in heap order from the demand."""

from __future__ import annotations

from typing import Any

import numpy as np

from constmig.migration import messages as m
from constmig.migration.ledger import ChunkLedger
from constmig.migration.streamer import FOLLOW, Streamer


def streamer(n: int, hot: list[int] | None = None, expected: list[int] | None = None,
             done: list[int] | None = None) -> Streamer:
    ledger = ChunkLedger(b"m" * 16, n, np.array(range(n) if expected is None else expected, dtype=np.int64))
    mask = None
    if done is not None:
        mask = np.zeros(n, dtype=bool)
        mask[done] = True
    none: Any = None  # the order needs no channel or heap
    return Streamer(none, none, ledger, none, lambda _: None, done=mask,
                    hot=None if hot is None else np.array(hot, dtype=np.int64))


def background(s: Streamer, count: int | None = None) -> list[int]:
    out: list[int] = []
    while count is None or len(out) < count:
        idx = s._claim_next()
        if idx is None:
            break
        out.append(idx)
    return out


def test_without_hot_chunks_the_stream_goes_in_heap_order() -> None:
    assert background(streamer(8)) == list(range(8))


def test_hot_chunks_go_first_in_their_order_then_the_rest_in_heap_order() -> None:
    s = streamer(10, hot=[7, 2, 9])
    assert s.hot_chunks == 3
    assert background(s) == [7, 2, 9, 0, 1, 3, 4, 5, 6, 8]


def test_hot_chunks_outside_the_ledger_or_held_already_are_skipped() -> None:
    s = streamer(10, hot=[7, 2, 9, 42, -1], expected=[0, 1, 2, 3, 7, 8], done=[2])
    assert s.hot_chunks == 1
    assert background(s) == [7, 0, 1, 3, 8]


def test_after_a_demand_its_followers_then_the_hot_chunks_then_on_from_the_demand() -> None:
    n = 40
    s = streamer(n, hot=[30, 31, 5])
    assert background(s, 1) == [30]
    assert s._claim_demand(m.Demand(10, 1)) == [10]
    follow = list(range(11, 11 + FOLLOW))
    rest = background(s)
    assert rest[:FOLLOW] == follow, "the chunks right after a demand go next"
    assert rest[FOLLOW:FOLLOW + 2] == [31, 5], "then the hot chunks not sent yet"
    tail = [i for i in range(11 + FOLLOW, n) if i not in (30, 31)] + [i for i in range(0, 10) if i != 5]
    assert rest[FOLLOW + 2:] == tail, "then heap order from the demand, wrapping around"
    assert sorted([30, 10] + rest) == list(range(n)), "every chunk exactly once"


def test_a_batch_demand_sends_its_second_half_on_the_background_next() -> None:
    s = streamer(20, hot=[15])
    run = s._claim_demand(m.Demand(4, 6, whole=True))
    assert run == [4, 5, 6]
    assert background(s) == [7, 8, 9, 15, 10, 11, 12, 13, 14, 16, 17, 18, 19, 0, 1, 2, 3]


def test_chunks_claimed_by_the_demand_path_are_never_sent_again() -> None:
    s = streamer(12, hot=[3, 4])
    assert s._claim_demand(m.Demand(3, 2)) == [3, 4]
    got = background(s)
    assert 3 not in got and 4 not in got
    assert sorted(got + [3, 4]) == list(range(12))
