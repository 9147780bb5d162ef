"""Attacks by the host on its own enclaves: the test starts enclave processes and plays the agent.

What an agent sends an enclave is untrusted, so these tests send what a malicious agent would: run
the source again after the commit point, migrate it a second time, replay a recorded migration into
a fresh enclave (a rollback to an older state), launch the destination from an older release, forge a
chunk's length, ask for waits that never end.
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
    assert not src2["ok"] and "only a running enclave can migrate" in src2["error"], json_reply(src2)
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


RELEASE = """from constmig.apps.kvstore import KVStore


class KV(KVStore):
    svn = {svn}
"""


def release(tmp_path, svn: int) -> dict:
    """One release of an app package (same module name, its own folder): Enclave(...) arguments."""
    folder = tmp_path / f"release-{svn}"
    folder.mkdir(exist_ok=True)
    (folder / "kv_release.py").write_text(RELEASE.format(svn=svn))
    return {"app": "kv_release:KV", "path": folder}


def test_security_version_is_the_codes_not_the_hosts(tmp_path):
    """The svn is declared in the app's (measured) source: no launch argument sets it, so the host cannot
    launch old code claiming a new version."""
    import subprocess
    import sys

    old = Enclave(tmp_path, "a", "kv1", "fresh", **release(tmp_path, 1))
    new = Enclave(tmp_path, "b", "kv2", "fresh", **release(tmp_path, 2))
    try:
        s1, s2 = (e.request({"op": "status"})["result"] for e in (old, new))
        assert (s1["svn"], s2["svn"]) == (1, 2)
        assert s1["measurement"] != s2["measurement"]  # the version is part of what is measured
    finally:
        old.close()
        new.close()
    out = subprocess.run([sys.executable, "-m", "constmig.enclave.runtime", "--app", "kvstore", "--heap", "4M",
                          "--svn", "9", "--socket", str(tmp_path / "x.sock"), "--platform-dir", str(tmp_path),
                          "--root-pem", str(tmp_path / "ca" / "root.pem")], capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --svn" in out.stderr


def test_destination_on_an_older_release_is_refused(tmp_path):
    """The host launches the destination from an older release (svn 1) of the code the source runs (svn 2)."""
    src_enc = Enclave(tmp_path, "a", "kv", "fresh", **release(tmp_path, 2))
    old = Enclave(tmp_path, "b", "kv", "incoming", **release(tmp_path, 1))
    try:
        assert src_enc.ecall("put", "acked", "v")["ok"]
        before = src_enc.ecall("checksum")["result"]
        src, dst = migrate(src_enc, old, Relay(), timeout=5)
        assert not src["ok"] and "refusing to migrate" in src["error"], json_reply(src)
        assert not dst["ok"]
        assert src_enc.state() == "running" and src_enc.ecall("checksum")["result"] == before
    finally:
        src_enc.close()
        old.close()


def test_same_release_migrates(tmp_path):
    """The positive control for the test above: the same release on both sides."""
    src_enc = Enclave(tmp_path, "a", "kv", "fresh", **release(tmp_path, 2))
    same = Enclave(tmp_path, "b", "kv", "incoming", **release(tmp_path, 2))
    try:
        before = src_enc.ecall("checksum")["result"]
        src, dst = migrate(src_enc, same, Relay(), timeout=5)
        assert src["ok"] and dst["ok"], json_reply(src) + json_reply(dst)
        assert same.ecall("checksum")["result"] == before
    finally:
        src_enc.close()
        same.close()


def test_forged_chunk_length_wipes_the_destination(source, incoming):
    """A chunk record whose header claims another length, with the right sequence number: a protocol
    error and a wipe, never an exception past the destination's error handling (no ABORT, no wipe, the
    instance left incoming holding migrated plaintext)."""
    from constmig.wire.records import HEADER_SIZE, pack_header, parse_header

    dst = incoming("b")
    before = source.ecall("checksum")["result"]
    forged = {"done": False}

    def shorten_first_chunk(direction, header, record):
        if direction == "s2d" and header.kind == Kind.CHUNK and not forged["done"]:
            forged["done"] = True
            h = parse_header(record[:HEADER_SIZE])
            cut = 4096
            return pack_header(h.kind, h.length - cut, h.seq, h.arg, h.flags) + record[HEADER_SIZE:-cut]
        return record

    src, got = migrate(source, dst, Relay(RecordFilter(shorten_first_chunk)), timeout=5)
    assert forged["done"]
    assert not got["ok"] and "wiped" in got["error"] and "carries" in got["error"], json_reply(got)
    assert not src["ok"] and "keeps running here" in src["error"], json_reply(src)
    assert dst.proc.wait(timeout=10) == 0  # wiped and gone: a destroyed instance ends its process
    assert source.state() == "running" and source.ecall("checksum")["result"] == before


@pytest.mark.parametrize("field", ["timeout", "commit_wait"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1, "10", 10**9])
def test_agent_supplied_waits_are_bounded(source, incoming, field, value):
    """An agent's timeout or commit wait of inf (settimeout's OverflowError, if unchecked), nan, a
    negative, a string or a billion seconds: refused with one line, and the instance wiped."""
    import socket

    dst = incoming("b")
    mine, theirs = socket.socketpair()
    try:
        reply = dst.request({"op": "migrate_in", "strategy": "stopcopy", "timeout": 5, field: value},
                            [theirs.fileno()])
    finally:
        mine.close()
        theirs.close()
    assert not reply["ok"] and f"{field} must be a number of seconds" in reply["error"], json_reply(reply)
    assert reply["kind"] == "MigrationError" and "wiped" in reply["error"] and reply["state"] == "destroyed"
    assert dst.proc.wait(timeout=10) == 0
