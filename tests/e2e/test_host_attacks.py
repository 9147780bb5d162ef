"""Attacks by the host on its own enclaves: the test starts enclave processes and plays the agent.

What an agent sends an enclave is untrusted, so these tests send what a malicious agent would: run
the source again after the commit point, migrate it a second time, replay a recorded migration into
a fresh enclave (a rollback to an older state), launch the destination at an older security version.
"""

from __future__ import annotations

import pytest
from rogue_host import Enclave, RecordFilter, Relay, feed, json_reply, migrate

from constmig.wire.records import Kind

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]


@pytest.fixture
def source(tmp_path):
    enc = Enclave(tmp_path, "a", "kv", "fresh")
    assert enc.ecall("fill", 0.9, 3)["ok"]
    assert enc.ecall("put", "acked", "before the migration")["ok"]
    yield enc
    enc.close()


@pytest.fixture
def incoming(tmp_path):
    made: list[Enclave] = []

    def make(host: str, **kw) -> Enclave:
        made.append(Enclave(tmp_path, host, "kv", "incoming", **kw))
        return made[-1]

    yield make
    for enc in made:
        enc.close()


def drop_after_ready(direction, header, record):
    """Deliver everything except the destination's RESUMED and DONE: the source never hears back."""
    if direction == "d2s" and header.kind == Kind.CONTROL:
        drop_after_ready.controls = getattr(drop_after_ready, "controls", 0) + 1
        if drop_after_ready.controls > 1:
            return b""
    return record


def test_source_never_runs_again_after_the_commit_point(source, incoming):
    """Fork attempt: the host hides the destination's RESUMED, then asks the source to run and to
    migrate again. The source refuses both; the destination is the one live copy, with all the data."""
    before = source.ecall("checksum")["result"]
    first = incoming("b")
    drop_after_ready.controls = 0
    src, dst = migrate(source, first, Relay(RecordFilter(drop_after_ready)), timeout=3)
    assert dst["ok"], json_reply(dst)
    assert not src["ok"] and "handed off but the destination did not confirm" in src["error"], json_reply(src)
    assert src["state"] == "handed-off"

    refused = source.ecall("get", "acked")
    assert not refused["ok"] and "handed-off; it does not run ECALLs" in refused["error"]

    second = incoming("c")
    src2, dst2 = migrate(source, second, Relay(), timeout=3)
    assert not src2["ok"] and "needs it running" in src2["error"], json_reply(src2)
    assert not dst2["ok"] and "wiped" in dst2["error"], json_reply(dst2)

    assert first.state() == "running"
    assert first.ecall("checksum")["result"] == before
    assert first.ecall("get", "acked")["result"] == b"before the migration"


def test_recorded_migration_replayed_into_a_fresh_enclave_is_refused(source, incoming):
    """Rollback attempt: every byte the source sent in a finished migration, played into a new
    incoming enclave, must not bring the old state back to life (fresh ephemeral keys per migration)."""
    first = incoming("b")
    relay = Relay()
    src, dst = migrate(source, first, relay)
    assert src["ok"] and dst["ok"], json_reply(src) + json_reply(dst)
    assert first.ecall("put", "acked", "after the migration")["ok"]

    stale = incoming("c")
    reply = feed(stale, bytes(relay.recorded["s2d"]))
    assert not reply["ok"] and "wiped" in reply["error"], json_reply(reply)
    assert "attestation" in reply["error"] or "handshake" in reply["error"], reply["error"]
    assert first.ecall("get", "acked")["result"] == b"after the migration"


def test_same_host_replay_into_the_old_destination_slot_is_refused(source, incoming, tmp_path):
    """The replay lands on the very platform (same host keys) the real migration went to."""
    first = incoming("b")
    relay = Relay()
    src, dst = migrate(source, first, relay)
    assert src["ok"] and dst["ok"]
    again = Enclave(tmp_path, "b", "kv2", "incoming")
    try:
        reply = feed(again, bytes(relay.recorded["s2d"]))
        assert not reply["ok"] and "wiped" in reply["error"], json_reply(reply)
    finally:
        again.close()


def test_destination_at_a_lower_security_version_is_refused(tmp_path):
    """The host launches the destination from an older release (svn 1) of the same code (svn 2)."""
    src_enc = Enclave(tmp_path, "a", "kv", "fresh", svn=2)
    old = Enclave(tmp_path, "b", "kv", "incoming", svn=1)
    try:
        assert src_enc.ecall("put", "acked", "v")["ok"]
        before = src_enc.ecall("checksum")["result"]
        src, dst = migrate(src_enc, old, Relay(), timeout=5)
        assert not src["ok"] and "refusing a downgrade" in src["error"], json_reply(src)
        assert not dst["ok"]
        assert src_enc.state() == "running" and src_enc.ecall("checksum")["result"] == before
    finally:
        src_enc.close()
        old.close()


def test_destination_with_a_higher_security_version_is_accepted(tmp_path):
    """The positive control for the test above: an upgrade is a legitimate migration."""
    src_enc = Enclave(tmp_path, "a", "kv", "fresh", svn=1)
    new = Enclave(tmp_path, "b", "kv", "incoming", svn=2)
    try:
        before = src_enc.ecall("checksum")["result"]
        src, dst = migrate(src_enc, new, Relay(), timeout=5)
        assert src["ok"] and dst["ok"], json_reply(src) + json_reply(dst)
        assert new.ecall("checksum")["result"] == before
    finally:
        src_enc.close()
        new.close()
