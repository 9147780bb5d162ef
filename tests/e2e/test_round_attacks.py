"""The host attacks pre-copy rounds: it replays a chunk record of an earlier round (of
this migration and of a previous one), drops or reorders records between rounds, and flips a bit in a
late round. Each is refused before the commit point: the destination wipes, the source runs on with
every acknowledged write, including the one made while the rounds were streaming.

A client write during round 1 (through a second connection to the source enclave, which keeps serving
while it migrates) guarantees a second round: the write tracker reports it, and max_downtime=0 makes the
source send what was written in another round rather than at the stop.
"""

from __future__ import annotations

import pytest
from rogue_host import Enclave, RecordFilter, Relay, json_reply, migrate

from constmig.enclave.dirty import preflight
from constmig.wire.records import HEADER_SIZE, Kind

_WP = preflight()
pytestmark = [pytest.mark.e2e, pytest.mark.adversarial,
              pytest.mark.skipif(_WP is not None, reason=f"write tracking unavailable: {_WP}")]

VARIANTS = [("precopy", "none"), ("hybrid", "fault"), ("hybrid", "access")]
ROUNDS = {"max_rounds": 3, "max_downtime": 0.0}


@pytest.fixture
def source(tmp_path):
    enc = Enclave(tmp_path, "a", "kv", "fresh")
    assert enc.ecall("fill", 0.9, 3)["ok"]
    yield enc
    enc.close()


class RoundTap:
    """Names the source's records by round: `on(round, n, header, record)` for the n-th chunk record of a
    round (1-based), after a client write lands in round 1 (so there is a round 2)."""

    def __init__(self, source: Enclave, on) -> None:
        self.source, self.on = source, on
        self.round, self.n, self.wrote = 1, 0, False
        self.controls = 0
        self.seen: list[tuple[int, int, bytes]] = []  # (round, n, record) of every chunk record passed

    def __call__(self, direction, header, record):
        if direction != "s2d":
            return record
        if header.kind == Kind.CHUNK:
            if not self.wrote:
                self.wrote = True
                conn = self.source.connect()
                try:
                    reply = self.source.ecall("put", "during", "round one", conn=conn)
                finally:
                    conn.close()
                assert reply["ok"], reply
            self.n += 1
            self.seen.append((self.round, self.n, record))
            return self.on(self.round, self.n, header, record)
        if header.kind == Kind.CONTROL and self.n:  # a round's end (then the state, the heap's end, ...)
            self.controls += 1
            got = self.on(self.round, 0, header, record)
            self.round, self.n = self.round + 1, 0
            return got
        return record


def attack(source: Enclave, tmp_path, strategy: str, tracker: str, on) -> tuple[dict, dict, RoundTap]:
    before = source.ecall("checksum")["result"]
    dst = Enclave(tmp_path, "b", "kv", "incoming", tracker=tracker)
    tap = RoundTap(source, on)
    try:
        src, got = migrate(source, dst, Relay(RecordFilter(tap)), strategy=strategy, timeout=5, **ROUNDS)
        assert not got["ok"] and "wiped" in got["error"], json_reply(got)
        assert not src["ok"] and "keeps running here" in src["error"], json_reply(src)
        assert dst.proc.wait(timeout=10) == 0  # wiped and gone
    finally:
        dst.close()
    assert source.state() == "running"
    assert source.ecall("get", "during")["result"] == b"round one"  # the write made during the rounds
    assert source.ecall("checksum")["result"] != before  # ... and only that one changed the state
    return src, got, tap


@pytest.mark.parametrize(("strategy", "tracker"), VARIANTS)
def test_a_clean_run_has_two_rounds(source, tmp_path, strategy, tracker):
    """The setup the attacks rely on: the write during round 1 makes a round 2, and the migration lands."""
    dst = Enclave(tmp_path, "b", "kv", "incoming", tracker=tracker)
    tap = RoundTap(source, lambda r, n, h, rec: rec)
    try:
        src, got = migrate(source, dst, Relay(RecordFilter(tap)), strategy=strategy, timeout=10, **ROUNDS)
        assert src["ok"] and got["ok"], json_reply(src) + json_reply(got)
        assert src["result"]["rounds"] >= 2, src["result"]
        assert any(r == 2 for r, _, _ in tap.seen)
        assert dst.ecall("get", "during")["result"] == b"round one"
    finally:
        dst.close()


@pytest.mark.parametrize(("strategy", "tracker"), VARIANTS)
def test_chunk_of_an_earlier_round_replayed_in_a_later_one(source, tmp_path, strategy, tracker):
    first: dict[str, bytes] = {}

    def replay(r, n, header, record):
        if r == 1 and n == 1:
            first["record"] = record
        if r == 2 and n == 1:  # round 2's first chunk replaced by round 1's first, verbatim
            return first["record"]
        return record

    _, got, _ = attack(source, tmp_path, strategy, tracker, replay)
    assert "replayed or duplicated" in got["error"], json_reply(got)


@pytest.mark.parametrize(("strategy", "tracker"), VARIANTS)
def test_chunk_of_a_later_round_dropped(source, tmp_path, strategy, tracker):
    _, got, _ = attack(source, tmp_path, strategy, tracker, lambda r, n, h, rec: b"" if (r, n) == (2, 1) else rec)
    assert "arrived where" in got["error"], json_reply(got)


@pytest.mark.parametrize(("strategy", "tracker"), VARIANTS)
def test_chunk_moved_past_its_rounds_end(source, tmp_path, strategy, tracker):
    """Round 2's chunk held back and delivered after round 2's end (as if it belonged to the stop)."""
    held: dict[str, bytes] = {}

    def reorder(r, n, header, record):
        if (r, n) == (2, 1):
            held["chunk"] = record
            return b""
        if (r, n) == (2, 0):
            return record + held.pop("chunk")
        return record

    _, got, _ = attack(source, tmp_path, strategy, tracker, reorder)
    assert "arrived where" in got["error"], json_reply(got)


@pytest.mark.parametrize(("strategy", "tracker"), VARIANTS)
def test_rounds_end_withheld(source, tmp_path, strategy, tracker):
    """Round 1's end never delivered: rounds cannot overlap (the source waits for each round's ack), so
    the host can only stall them; the destination gives up and wipes, the source runs on."""
    src, got, _ = attack(source, tmp_path, strategy, tracker, lambda r, n, h, rec: b"" if (r, n) == (1, 0) else rec)
    assert "no record from the peer" in src["error"] + got["error"], json_reply(src) + json_reply(got)


@pytest.mark.parametrize(("strategy", "tracker"), VARIANTS)
def test_bit_flipped_in_a_late_round(source, tmp_path, strategy, tracker):
    def flip(r, n, header, record):
        if (r, n) == (2, 1):
            body = bytearray(record)
            body[HEADER_SIZE + 100] ^= 0x01
            return bytes(body)
        return record

    _, got, _ = attack(source, tmp_path, strategy, tracker, flip)
    assert "authentication" in got["error"] or "tag" in got["error"], json_reply(got)


def test_chunk_of_a_previous_migration_replayed(source, tmp_path):
    """Migration 1 (A to B) is recorded; in migration 2 (B to C) the host swaps in migration 1's first
    chunk record, sequence number and all. Another migration's keys: refused."""
    b = Enclave(tmp_path, "b", "kv", "incoming")
    recorded: list[bytes] = []
    try:
        src, got = migrate(source, b, Relay(RecordFilter(
            lambda d, h, rec: (recorded.append(rec) if d == "s2d" and h.kind == Kind.CHUNK else None) or rec)),
            strategy="precopy", timeout=10)
        assert src["ok"] and got["ok"], json_reply(src) + json_reply(got)
        before = b.ecall("checksum")["result"]
        c = Enclave(tmp_path, "c", "kv", "incoming")
        swapped = {"done": False}

        def swap(d, h, rec):
            if d == "s2d" and h.kind == Kind.CHUNK and not swapped["done"]:
                swapped["done"] = True
                return recorded[0]
            return rec

        try:
            src2, got2 = migrate(b, c, Relay(RecordFilter(swap)), strategy="precopy", timeout=5)
            assert swapped["done"]
            assert not got2["ok"] and "wiped" in got2["error"], json_reply(got2)
            assert not src2["ok"] and "keeps running here" in src2["error"], json_reply(src2)
        finally:
            c.close()
        assert b.state() == "running" and b.ecall("checksum")["result"] == before
    finally:
        b.close()
