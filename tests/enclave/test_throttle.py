"""The write limit the enclave holds its writers to while pre-copy rounds do not converge
(enclave/throttle.py): only calls that newly wrote are charged, the charge is the limit's time for what
they wrote, the hold is bounded, and lifting the limit releases held callers at once."""

from __future__ import annotations

import threading
import time

import pytest

from constmig.enclave.throttle import MAX_HOLD_S, WriteLimit


class Counter:
    """What the enclave's write tracker reports: first writes since arming, cumulative."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        return self.n


def _owed(limit: WriteLimit) -> float:
    return max(0.0, getattr(limit._owed, "until", 0.0) - time.monotonic())


def test_without_a_limit_nothing_is_charged() -> None:
    limit, wrote = WriteLimit(), Counter()
    with limit.call():
        wrote.n += 5
    assert _owed(limit) == 0.0
    limit.pay()
    assert limit.held_calls == 0


def test_a_call_that_wrote_is_charged_the_limits_time_for_it_and_a_reader_nothing() -> None:
    limit, wrote = WriteLimit(), Counter()
    limit.set(100.0, wrote)  # 100 new chunks a second
    with limit.call():
        pass  # a reader
    assert _owed(limit) == 0.0
    with limit.call():
        wrote.n += 20  # 20 chunks: 0.2 s of the limit
    assert 0.15 < _owed(limit) <= 0.2
    with limit.call():
        wrote.n += 10  # charges add up: the next writer waits behind the first
    assert 0.25 < _owed(limit) <= 0.3


def test_paying_waits_outside_the_call_and_at_most_the_bound() -> None:
    limit, wrote = WriteLimit(), Counter()
    limit.set(10.0, wrote)
    with limit.call():
        wrote.n += 2  # 0.2 s
    t0 = time.monotonic()
    limit.pay()
    assert 0.1 < time.monotonic() - t0 < 0.2 + 0.5
    assert limit.held_calls == 1 and limit.held_s > 0.1
    with limit.call():
        wrote.n += 10_000  # 1,000 s of the limit: held MAX_HOLD_S at most
    t0 = time.monotonic()
    limit.pay()
    assert time.monotonic() - t0 < MAX_HOLD_S + 0.5


def test_lifting_the_limit_releases_a_held_caller_at_once_and_reports_the_cost() -> None:
    limit, wrote = WriteLimit(), Counter()
    limit.set(1.0, wrote)
    done = threading.Event()

    def caller() -> None:  # as the runtime does: the call under the app lock, then the wait outside it
        with limit.call():
            wrote.n += 1  # a full second's worth
        limit.pay()
        done.set()

    t = threading.Thread(target=caller)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.05)
    cost = limit.set(None)
    assert done.wait(0.5), "the held caller was not released"
    assert time.monotonic() - t0 < 0.5
    t.join()
    assert cost == {"held_calls": 0, "held_s": 0.0}  # counted when the caller returns, not before
    assert limit.set(None)["held_calls"] == 1
    with limit.call():
        wrote.n += 100
    assert _owed(limit) == 0.0, "no limit: nothing charged"


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_limit_is_a_positive_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="positive rate"):
        WriteLimit().set(rate, Counter())


def test_a_reader_after_a_writer_owes_nothing_even_with_debt_outstanding() -> None:
    limit, wrote = WriteLimit(), Counter()
    limit.set(1.0, wrote)
    with limit.call():
        wrote.n += 5  # five seconds of the limit ahead
    assert _owed(limit) > 4
    limit._owed.until = 0.0  # (that writer's caller paid elsewhere)
    with limit.call():
        pass  # a reader: wrote nothing
    assert _owed(limit) == 0.0


def test_a_limit_without_a_counter_is_no_limit() -> None:
    limit = WriteLimit()
    assert limit.set(10.0, None) == {"held_calls": 0, "held_s": 0.0}
    assert limit.rate is None


def test_what_holding_cost_is_the_time_held() -> None:
    limit, wrote = WriteLimit(), Counter()
    limit.set(10.0, wrote)
    with limit.call():
        wrote.n += 2  # 0.2 s
    limit.pay()
    assert 0.1 < limit.held_s < 0.5 and limit.set(None)["held_s"] == round(limit.held_s, 4)
