"""The client's side: a hostile host and a stranger against a client that pinned its enclave,
with real agent processes and the stock CLI (`python -m constmig ...`), the test playing the host (a frame
relay posing as an agent, its own enclaves launched under the client's names, held records delivered late).

Each test's docstring says what the host would get without the rule it checks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from test_client_sessions import FrameRelay  # a sibling test module: the relay lives there

from constmig.client import EnclaveClient, Trust
from constmig.client.trust import SimVerifier
from constmig.errors import AttestationError, ConstmigError
from constmig.host.client import AgentClient, request
from constmig.host.cluster import LocalCluster
from constmig.wire.session import ClientOpen

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]

CARD = "4111-1111-1111-1111"


def cm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{p.args}\n{p.stdout}\n{p.stderr}"
    return p


def refused(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """One line on stderr, exit 1, no traceback, every fragment in it."""
    assert p.returncode == 1, f"{p.args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    return lines[0]


def run(addr: str, name: str, heap: str = "16M", app: str = "kvstore") -> None:
    ok(cm("run", app, "--agent", addr, "--heap", heap, "--name", name))


def host_reads(addr: str, name: str, key: str) -> Any:
    """The host reads its own copy through a session of its own (it accepts whatever it launched)."""
    with EnclaveClient(addr, name, timeout=30, trust=Trust(SimVerifier())) as c:
        return c.call("get", key)


def redirect_sessions_to(target: str) -> Any:
    """A rogue agent: it serves everything from the real agent but sends sessions to `target`."""
    def answer(req: dict[str, Any]) -> dict[str, Any] | None:
        if req.get("op") in ("session_open", "session_call"):
            return {"ok": False, "error": f"enclave moved to {target}", "redirect": target}
        return None
    return answer


# --- item 1: the host's own instance of the same code under the client's name --------------------------

def test_a_copy_the_host_launched_under_the_same_name_is_refused() -> None:
    """The pin covers the instance, not only the code: otherwise the redirected `put card ...` exits 0 and
    lands in the host's copy, which reads it back through its own session ('4111-1111-1111-1111')."""
    with LocalCluster(2) as cl:
        a, b = cl.addrs
        run(a, "kv1")
        ok(cm("call", "kv1", "--agent", a, "put", "k", "v"))  # pins kv1 on first use
        run(b, "kv1")  # the host's own instance: same app, same launch, same measurement
        rogue = FrameRelay(a, answer=redirect_sessions_to(b))
        try:
            p = cm("call", "kv1", "--agent", rogue.addr, "put", "card", CARD)
        finally:
            rogue.close()
        assert host_reads(b, "kv1", "card") is None  # the card never reached the host's copy
        refused(p, "another instance", f"constmig trust kv1 --agent {rogue.addr}")
        assert ok(cm("call", "kv1", "--agent", a, "get", "k")).stdout.strip() == "v"  # the real one is fine


def test_the_instance_survives_migration_checkpoint_and_restore_and_run_makes_a_new_one(tmp_path) -> None:
    """The pinned instance is the enclave wherever it moves or restores; a relaunch with `run` is not."""
    with LocalCluster(2) as cl:
        a, b = cl.addrs
        run(a, "kv1")
        ok(cm("call", "kv1", "--agent", a, "put", "k", "v"))
        ok(cm("migrate", "kv1", "--from", a, "--to", b, "--strategy", "stopcopy"))
        assert ok(cm("call", "kv1", "--agent", b, "get", "k")).stdout.strip() == "v"
        ok(cm("migrate", "kv1", "--from", b, "--to", a, "--strategy", "hybrid", "--tracker", "access"))
        assert ok(cm("call", "kv1", "--agent", a, "get", "k")).stdout.strip() == "v"
        path = json.loads(ok(cm("checkpoint", "kv1", "--agent", a)).stdout)["path"]
        ok(cm("stop", "kv1", "--agent", a))
        ok(cm("restore", path, "--agent", a))
        assert ok(cm("call", "kv1", "--agent", a, "get", "k")).stdout.strip() == "v"
        ok(cm("stop", "kv1", "--agent", a))
        run(a, "kv1")
        refused(cm("call", "kv1", "--agent", a, "get", "k"), "another instance")


# --- item 2: no trust option widens what is accepted -------------------------------------------------

def test_min_svn_and_expect_measurement_only_narrow_the_pin() -> None:
    """--min-svn 1 (or --expect-measurement of the new code) is checked on top of the pin: in its place,
    `get k` of other code under the pinned name would exit 0 ('None')."""
    with LocalCluster(1) as cl:
        a = cl.addrs[0]
        run(a, "kv1", "16M")
        ok(cm("call", "kv1", "--agent", a, "put", "k", "v"))
        ok(cm("stop", "kv1", "--agent", a))
        run(a, "kv1", "32M")  # other launch configuration: another measurement
        other = request(a, {"op": "status"})["enclaves"]["kv1"]["measurement"]
        refused(cm("call", "kv1", "--agent", a, "get", "k"), "kv1")  # the control: refused without flags
        refused(cm("call", "kv1", "--agent", a, "--min-svn", "1", "get", "k"), "pinned")
        refused(cm("call", "kv1", "--agent", a, "--expect-measurement", other, "get", "k"), "pinned")
        refused(cm("call", "kv1", "--agent", a, "--min-svn", "1", "--expect-measurement", other, "put", "k", "x"),
                "pinned")


# --- item 3: a held request never runs after its client was told it may not have ----------------------

@pytest.mark.parametrize("how", ["session-unknown", "timeout"])
def test_a_held_request_never_runs_after_the_client_was_told(how: str) -> None:
    """The host keeps `put balance 100` sealed and says the session is unknown (or lets the CLI time out);
    the client checks, writes 50; the host then delivers the held record. Were the old session still open,
    it would run there and the balance would end at 100."""
    with LocalCluster(1) as cl:
        a = cl.addrs[0]
        run(a, "kv1")
        ok(cm("call", "kv1", "--agent", a, "put", "balance", "0"))
        held: list[dict[str, Any]] = []

        def answer(req: dict[str, Any]) -> dict[str, Any] | None:
            if req.get("op") != "session_call" or held:
                return None
            held.append(req)
            if how == "timeout":
                time.sleep(4)  # past the CLI's --timeout: the process gives up and exits
                return {"ok": False, "error": "late"}
            return {"ok": False, "error": "no such session in this enclave", "kind": "SessionUnknown"}

        rogue = FrameRelay(a, answer=answer)
        try:
            first = cm("call", "kv1", "--agent", rogue.addr, "--timeout", "1", "--raw", "put", "balance", "100")
        finally:
            rogue.close()
        assert held, first.stderr
        checked = ok(cm("call", "kv1", "--agent", a, "get", "balance"))
        ok(cm("call", "kv1", "--agent", a, "put", "balance", "50"))
        with pytest.raises(ConstmigError):
            request(a, held[0])  # the host delivers the held record late: refused, it does not run
        assert ok(cm("call", "kv1", "--agent", a, "get", "balance")).stdout.strip() == "50"
        if how == "timeout":  # the CLI said the outcome was unknown; the next one says it did not run
            assert first.returncode == 1 and "unknown" in first.stderr, first.stderr
            assert checked.stdout.strip() == "0" and "did not run" in checked.stderr, checked.stderr
        else:  # closed provably at once, it did not run, so it ran in a new session: exactly once
            assert ok(first).stdout.strip() == "True"
            assert checked.stdout.strip() == "100"


# --- item 5: pins a person can live with -------------------------------------------------------------

def test_one_name_in_two_walkthroughs_and_refusals_that_say_what_differs(etcd_url) -> None:
    """Pins are per fleet and directory: the fleet's kv1 is not refused for the by-hand kv1's pin ('runs
    measurement …, not the expected …; … constmig trust kv1'), and `constmig trust kv1 --etcd URL` pins it."""
    with LocalCluster(1) as by_hand, LocalCluster(2, agent_args=["--etcd", etcd_url]) as fleet:
        h = by_hand.addrs[0]
        fa, fb = fleet.addrs
        run(h, "kv1", "16M")
        ok(cm("trust", "kv1", "--agent", h))
        run(fa, "kv1", "32M")
        p = ok(cm("call", "kv1", "--etcd", etcd_url, "put", "k1", "v1"))
        assert "first use" in p.stderr, p.stderr
        assert "pinned enclave 'kv1'" in ok(cm("trust", "kv1", "--etcd", etcd_url)).stdout
        assert ok(cm("call", "kv1", "--agent", h, "put", "k", "h")).stdout.strip() == "True"
        assert ok(cm("call", "kv1", "--etcd", etcd_url, "get", "k1")).stdout.strip() == "v1"
        ok(cm("stop", "kv1", "--agent", fa))
        run(fb, "kv1", "16M")  # the same code, another launch configuration
        refused(cm("call", "kv1", "--etcd", etcd_url, "get", "k1"), "launch configuration", "heap",
                f"constmig trust kv1 --etcd {etcd_url}")
        ok(cm("stop", "kv1", "--agent", fb))
        run(fb, "kv1", "32M", app="matrix")
        refused(cm("call", "kv1", "--etcd", etcd_url, "--raw", "get", "k1"), "other code",
                f"constmig trust kv1 --etcd {etcd_url}")
        ok(cm("stop", "kv1", "--agent", fb))
        run(fb, "kv1", "32M")  # exactly the pinned launch, another instance
        line = refused(cm("call", "kv1", "--etcd", etcd_url, "get", "k1"), "another instance",
                       f"constmig trust kv1 --etcd {etcd_url}")
        ok(cm(*re.search(r"constmig (trust kv1 .*)$", line).group(1).split()))  # the command it names re-pins
        assert ok(cm("call", "kv1", "--etcd", etcd_url, "get", "k1")).stdout.strip() == "None"


# --- item 6: defaults that pin, and a table a stranger cannot empty ------------------------------------

def test_the_python_api_pins_on_first_use_and_refuses_another_instance(capfd) -> None:
    """EnclaveClient's default pins: accepting any code the root attests, it would let the host's own kv1
    take the card."""
    with LocalCluster(2) as cl:
        a, b = cl.addrs
        run(a, "kv1")
        with EnclaveClient(a, "kv1", timeout=30) as c:
            assert c.call("put", "k", "v") is True
        assert "trusting enclave 'kv1' on first use" in capfd.readouterr().err
        run(b, "kv1")
        with EnclaveClient(b, "kv1", timeout=30) as c, pytest.raises(AttestationError, match="another instance"):
            c.call("put", "card", CARD)
        assert host_reads(b, "kv1", "card") is None


def test_migrate_verify_reads_only_the_pinned_instance() -> None:
    """`migrate --verify` reads its 'before' checksum only from the pinned instance: from whatever enclave the
    source agent sent it to, it would print 'verified True' with the host's fresh copy standing in."""
    with LocalCluster(3) as cl:
        a, b, c = cl.addrs
        run(a, "kv1")
        ok(cm("trust", "kv1", "--agent", a))
        run(c, "kv1")  # the host's copy, fresh like the real one: the same checksum
        rogue = FrameRelay(a, answer=redirect_sessions_to(c))
        try:
            p = cm("migrate", "kv1", "--from", rogue.addr, "--to", b, "--strategy", "stopcopy", "--verify")
        finally:
            rogue.close()
        refused(p, "another instance")


def test_a_stranger_cannot_push_a_live_session_out_of_the_table() -> None:
    """1,024 session opens by anyone do not evict the live client's session (whose next call would be told
    'does not know this session … may or may not have run')."""
    from constmig.enclave.sessions import MAX_SESSIONS

    with LocalCluster(1) as cl:
        a = cl.addrs[0]
        run(a, "kv1")
        c = EnclaveClient(a, "kv1", timeout=30)
        assert c.call("put", "k", "v1") is True
        refusals = []
        with AgentClient(a) as stranger:
            for _ in range(MAX_SESSIONS):
                try:
                    stranger.request({"op": "session_open", "name": "kv1", "hello": ClientOpen().hello})
                except ConstmigError as e:
                    refusals.append(str(e))
        assert c.call("get", "k") == b"v1"
        c.close()
        assert refusals and "sessions" in refusals[0], refusals[:1]
