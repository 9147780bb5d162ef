"""Stop-and-copy end to end: two real agent processes, real enclave processes, real TCP."""

import threading

import pytest
from mitm import MitmProxy, cut_after, flip_bit_at

from conftest import checksum, launch, running_at, wait_gone
from constmig.client import EnclaveClient
from constmig.errors import AgentError
from constmig.host.client import request
from constmig.host.cluster import LocalCluster, free_port
from constmig.host.orchestrate import migrate

pytestmark = pytest.mark.e2e


@pytest.mark.smoke
@pytest.mark.parametrize("app", ["kvstore", "matrix"])
def test_migration_moves_every_byte_and_redirects(cluster, app):
    a, b = cluster.addrs
    before = launch(a, app=app)
    fig = migrate("kv", a, b, "stopcopy")
    assert fig["strategy"] == "stopcopy" and fig["workload"] == app
    assert fig["heap_bytes"] == 64 << 20 and 0 < fig["state_bytes"] <= fig["heap_bytes"]
    assert fig["wire_bytes"] > fig["state_bytes"] and fig["downtime_ms"] > 0 and fig["total_s"] > 0
    c = EnclaveClient(a, "kv")  # the old address: must be redirected
    assert c.call("checksum") == before
    if app == "kvstore":
        assert c.call("get", "client-7") == b"value-7-xxxxxxx"
        assert c.call("put", "after", "move")
    assert c.addr == b
    c.close()
    assert not request(a, {"op": "status"})["enclaves"]
    assert running_at(b)


def test_migrate_back_and_forth(cluster):
    a, b = cluster.addrs
    before = launch(a, heap=32 << 20)
    migrate("kv", a, b, "stopcopy")
    migrate("kv", b, a, "stopcopy")
    assert checksum(a) == before and running_at(a)


def test_unreachable_destination_keeps_source(cluster):
    a, _ = cluster.addrs
    before = launch(a)
    with pytest.raises(AgentError, match="cannot reach agent"):
        migrate("kv", a, f"127.0.0.1:{free_port()}", "stopcopy")
    assert running_at(a) and checksum(a) == before


def test_unknown_enclave(cluster):
    a, b = cluster.addrs
    with pytest.raises(AgentError, match="no enclave named 'nope'"):
        migrate("nope", a, b, "stopcopy")
    with pytest.raises(AgentError, match="no enclave named"):
        EnclaveClient(a, "nope").call("get", "x")


def test_heap_larger_than_memory_is_refused(cluster):
    with pytest.raises(AgentError, match="exceeds this host's available memory"):
        request(cluster.addrs[0], {"op": "run", "name": "big", "app": "kvstore", "heap": 1 << 50})


@pytest.mark.adversarial
@pytest.mark.parametrize("position", [200, 5 << 20])
def test_flipped_bit_in_flight_aborts_and_source_keeps_running(cluster, position):
    """position 200 lands in the handshake; 5 MiB lands in a heap chunk."""
    a, b = cluster.addrs
    before = launch(a)
    proxy = MitmProxy(b, flip_bit_at(position))
    try:
        with pytest.raises(AgentError, match="aborted before handoff|attestation"):
            migrate("kv", a, proxy.addr, "stopcopy")
    finally:
        proxy.close()
    assert running_at(a) and checksum(a) == before
    wait_gone(b)  # the half-built copy was wiped (the destination notices on its own schedule)


@pytest.mark.adversarial
def test_truncated_stream_aborts_and_source_keeps_running(cluster):
    a, b = cluster.addrs
    before = launch(a)
    proxy = MitmProxy(b, cut_after(20 << 20))
    try:
        with pytest.raises(AgentError, match="aborted before handoff"):
            migrate("kv", a, proxy.addr, "stopcopy", timeout=20)
    finally:
        proxy.close()
    assert running_at(a) and checksum(a) == before


def test_destination_agent_killed_mid_transfer(cluster):
    a, b = cluster.addrs
    before = launch(a, heap=512 << 20, fill=0.9)
    errors: list[Exception] = []
    flowing = threading.Event()

    def on_progress(info):
        if info.get("done", 0) > 0:
            flowing.set()

    def go():
        try:
            migrate("kv", a, b, "stopcopy", timeout=30, on_progress=on_progress)
        except AgentError as e:
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()
    assert flowing.wait(60), "no transfer progress seen"
    cluster.kill_agent(1)  # SIGKILL the destination agent and its enclave mid-transfer
    t.join(60)
    assert not t.is_alive()
    assert errors, "migration should have failed"
    assert "keeps running here" in str(errors[0])
    assert running_at(a) and checksum(a) == before


@pytest.mark.adversarial
def test_destination_with_other_root_ca_is_refused(tmp_path):
    import shutil

    from constmig.client.trust import default_ca_dir
    from constmig.host.pki import create_admin_ca

    # Its agent holds a host certificate from the fleet's admin CA (or the source would not prepare it:
    # tests/e2e/test_admin_auth.py); only the attestation root differs.
    create_admin_ca(default_ca_dir())
    shutil.copytree(default_ca_dir() / "admin", tmp_path / "other-ca" / "admin")
    with LocalCluster(1) as one, LocalCluster(1, ca_dir=tmp_path / "other-ca") as other:
        a, b = one.addrs[0], other.addrs[0]
        before = launch(a)
        with pytest.raises(AgentError, match="not signed by the trusted root|root"):
            migrate("kv", a, b, "stopcopy")
        assert running_at(a) and checksum(a) == before


@pytest.mark.parametrize("back", ["stopcopy", "precopy", "constmig", "hybrid"])
def test_an_unwritten_heap_stays_off_the_wire_after_a_round_trip(cluster, back):
    """An enclave whose heap was never filled, migrated in (the destination pre-faults its heap)
    and back: its untouched chunks go as zero records (a length, no page data), in every strategy."""
    a, b = cluster.addrs
    request(a, {"op": "run", "name": "kv", "app": "kvstore", "heap": 64 << 20, "config": {}})
    before = checksum(a)
    there = migrate("kv", a, b, "constmig", tracker="fault")
    fig = migrate("kv", b, a, back, tracker="fault")
    for f in (there, fig):
        assert f["zero_chunks"] >= f["chunks"] - 4, f  # the app's few written chunks carry data
        assert f["wire_bytes"] < 8 << 20, f  # not the 64 MiB heap
    assert checksum(a) == before
