"""Attested client sessions end to end: real agents and enclaves, the test as the client and, in
the attacks, as the untrusted host between client and agent (a frame relay that reads, edits, replays
and answers in the agent's place). Calls cross the agents sealed; the session moves with the enclave."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import launch
from constmig.client import EnclaveClient, Expect, Trust
from constmig.client.trust import SimVerifier
from constmig.errors import AgentError, AttestationError, IntegrityError
from constmig.host.client import PlainEnclaveClient, request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import migrate
from constmig.kernel.uffd import preflight
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.framing import FramedSocket
from constmig.wire.session import accept

pytestmark = [pytest.mark.e2e]

_UFFD = preflight()
VARIANTS = [("stopcopy", "auto"), ("constmig", "fault"), ("constmig", "access"), ("precopy", "auto"),
            ("hybrid", "fault"), ("hybrid", "access")]


def _skip_without_uffd(strategy: str, tracker: str) -> None:
    if _UFFD is not None and (tracker == "fault" or strategy in ("precopy", "hybrid")):
        pytest.skip(f"userfaultfd unavailable: {_UFFD}")


# A request or reply frame in, the frame to pass on out.
OnFrame = Callable[[dict[str, Any]], dict[str, Any]]


class FrameRelay:
    """The host between a client and its agent, frame by frame: every request and reply passes
    `on_request` / `on_reply`, which may change it; `frames` keeps everything that went by."""

    def __init__(self, target: str, on_request: OnFrame | None = None, on_reply: OnFrame | None = None,
                 answer: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> None:
        self.target, self.on_request, self.on_reply, self.answer = target, on_request, on_reply, answer
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        client = FramedSocket(conn)
        upstream = None
        try:
            while True:
                req, _ = client.recv()
                self.frames.append(("request", req))
                if self.answer is not None and (own := self.answer(req)) is not None:
                    client.send(own)  # a rogue agent: answers in the enclave's place (None: passes it on)
                    continue
                if upstream is None:
                    host, port = self.target.rsplit(":", 1)
                    upstream = FramedSocket(socket.create_connection((host, int(port))))
                reply = upstream.exchange(self.on_request(req) if self.on_request else req)
                self.frames.append(("reply", reply))
                client.send(self.on_reply(reply) if self.on_reply else reply)
        except Exception:  # noqa: BLE001 (a relay thread ends with its connection)
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self.listener.close()


# --- the session moves with the enclave ----------------------------------------------------------------

@pytest.mark.smoke
@pytest.mark.parametrize("strategy,tracker", VARIANTS, ids=[f"{s}-{t}" for s, t in VARIANTS])
def test_session_continues_across_a_migration(cluster, strategy: str, tracker: str) -> None:
    """One session before, during and after the move: same keys (no new handshake), every call answered
    once and right, and the client learns from the enclave's own sealed answers where it runs now."""
    _skip_without_uffd(strategy, tracker)
    a, b = cluster.addrs
    launch(a, heap=32 << 20)
    c = EnclaveClient(a, "kv", timeout=60)
    calls, errors, stop = [0], [], threading.Event()

    def client_loop() -> None:
        i = 0
        while not stop.is_set():
            try:
                assert c.call("put", f"s-{i}", f"v-{i}") is True
                assert c.call("get", f"s-{i}") == f"v-{i}".encode()
            except Exception as e:  # noqa: BLE001 (recorded, asserted below)
                errors.append(repr(e))
                return
            i += 1
            calls[0] = i

    c.call("put", "before", "x")
    sid, platform = c.session_id, c.platform
    t = threading.Thread(target=client_loop)
    t.start()
    try:
        time.sleep(0.2)
        figures = migrate("kv", a, b, strategy, tracker=tracker, timeout=60)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert figures["strategy"] == strategy
    assert c.session_id == sid and c.addr == b  # the same session, now through B's agent
    assert platform == "a" and c.platform == "b" and c.moves == ["b"]
    got = c.call("get_many", ["before", *(f"s-{i}" for i in range(calls[0]))])
    assert got == [b"x", *(f"v-{i}".encode() for i in range(calls[0]))]
    assert calls[0] > 5, calls
    st = request(b, {"op": "status"})["enclaves"]["kv"]
    assert st["sessions"] >= 1  # the session table came with the state (ours among them)
    vq = c.platform_quote()  # and the new platform proves itself, bound to this session
    assert vq.platform_id == "b" and vq.identity == c.identity
    c.close()


def test_call_cut_mid_way_is_answered_once_after_the_move(cluster) -> None:
    """A call ran at the source but its answer never reached the client; the enclave then moved. The
    client sends the same record to the destination, which answers it from the session it carried."""
    a, b = cluster.addrs
    launch(a, heap=32 << 20)
    lose = {"next": False}

    def on_reply(reply: dict[str, Any]) -> dict[str, Any]:
        if lose["next"]:
            lose["next"] = False
            raise ConnectionResetError  # the relay drops the connection: the answer is lost
        return reply

    relay = FrameRelay(a, on_reply=on_reply)
    c = EnclaveClient(relay.addr, "kv", timeout=10)
    try:
        c.call("put", "n", "1")
        lose["next"] = True
        with pytest.raises(AgentError, match="closed the connection"):
            c.call("delete", "n")  # ran: "n" is gone, True was the answer
        migrate("kv", a, b, "stopcopy", timeout=60)
        # the next call first completes the pending one, at B, from the carried answer (not a second
        # run, which would have answered False), then runs its own
        assert c.call("get", "n") is None
        assert c.addr == b
    finally:
        c.close()
        relay.close()
    sent = [f["record"] for k, f in relay.frames if k == "request" and f.get("op") == "session_call"]
    assert len(sent) == 3 and sent[2] == sent[1]  # put, the lost delete, and that same record again


# --- attacks: the host between client and enclave -----------------------------------------------------

@pytest.mark.adversarial
def test_host_cannot_call_a_sealed_only_enclave(cluster) -> None:
    a, _ = cluster.addrs
    launch(a, heap=16 << 20)
    with pytest.raises(AgentError, match="takes calls only over an attested session"):
        PlainEnclaveClient(a, "kv").call("get", "client-1")


@pytest.mark.adversarial
def test_modified_request_and_answer_are_refused(cluster) -> None:
    a, _ = cluster.addrs
    launch(a, heap=16 << 20)
    mode = {"request": False, "reply": False}

    def flip(frame: dict[str, Any], key: str) -> dict[str, Any]:
        if isinstance(frame.get(key), bytes):
            rec = bytearray(frame[key])
            rec[-5] ^= 0x10
            return {**frame, key: bytes(rec)}
        return frame

    def on_request(req: dict[str, Any]) -> dict[str, Any]:
        return flip(req, "record") if mode["request"] and req.get("op") == "session_call" else req

    def on_reply(reply: dict[str, Any]) -> dict[str, Any]:
        return flip(reply, "result") if mode["reply"] and isinstance(reply.get("result"), bytes) else reply

    relay = FrameRelay(a, on_request, on_reply)
    c = EnclaveClient(relay.addr, "kv", timeout=10)
    try:
        c.call("put", "k", "v1")
        mode["request"] = True
        with pytest.raises(AgentError, match="failed authentication .tampered or forged.; refused"):
            c.call("put", "k", "v2")
        mode["request"] = False
        assert c.call("get", "k") == b"v2"  # the untampered resend ran: once
        mode["reply"] = True
        with pytest.raises(IntegrityError, match="failed authentication"):
            c.call("get", "k")
    finally:
        c.close()
        relay.close()


@pytest.mark.adversarial
def test_replayed_and_reordered_requests_are_refused(cluster) -> None:
    """The host keeps a client's sealed "put k v1" and sends it again later: refused, k stays v2."""
    a, _ = cluster.addrs
    launch(a, heap=16 << 20)
    relay = FrameRelay(a)
    c = EnclaveClient(relay.addr, "kv", timeout=10)
    try:
        c.call("put", "k", "v1")
        c.call("put", "k", "v2")
        c.call("get", "k")
    finally:
        c.close()
        relay.close()
    records = [f for k, f in relay.frames if k == "request" and f.get("op") == "session_call"]
    assert len(records) == 3
    for old in records[:2]:
        with pytest.raises(AgentError, match=r"replayed or duplicated\); refused"):
            request(a, old)
    with EnclaveClient(a, "kv") as other:
        assert other.call("get", "k") == b"v2"  # nothing replayed ran
        # held back: the host sends a session's request #1 before its #0; refused, then #0 runs
        other.call("get", "k")  # the session is open; the next seal is its request #1
        session = other._session
        assert session is not None
        first = session.seal_call("put", ["k", "v3"], {})
        session.pending = None
        second = session.seal_call("put", ["k", "v4"], {})
        with pytest.raises(AgentError, match=r"reordered, or requests were dropped\); refused"):
            request(a, {"op": "session_call", "name": "kv", "record": second})
        assert isinstance(request(a, {"op": "session_call", "name": "kv", "record": first}), bytes)
    with EnclaveClient(a, "kv") as third:
        assert third.call("get", "k") == b"v3"


@pytest.mark.adversarial
def test_old_copy_answer_after_the_handoff_is_refused(cluster) -> None:
    """The host records the source's sealed answers and, after the move, answers with one of them in
    place of the destination: the client refuses it (wrong position in its session)."""
    a, b = cluster.addrs
    launch(a, heap=16 << 20)
    c = EnclaveClient(a, "kv", timeout=10)
    recorder = FrameRelay(a)
    c.addr = recorder.addr
    c.call("put", "k", "v1")
    old_answer = [f["result"] for k, f in recorder.frames if k == "reply" and isinstance(f.get("result"), bytes)][-1]
    c.close()
    migrate("kv", a, b, "stopcopy", timeout=60)
    rogue = FrameRelay(b, on_reply=lambda r: {**r, "result": old_answer} if isinstance(r.get("result"), bytes) else r)
    c.addr = rogue.addr
    try:
        with pytest.raises(IntegrityError, match="replayed or duplicated"):
            c.call("get", "k")
    finally:
        c.close()
        rogue.close()
        recorder.close()
    with pytest.raises(AgentError, match="moved to"):
        request(a, {"op": "session_call", "name": "kv", "record": b"x" * 40})  # the old copy takes nothing


@pytest.mark.adversarial
def test_rogue_agent_posing_as_the_enclave_is_refused(cluster, tmp_path) -> None:
    """An agent answering in the enclave's place: with a quote from a platform of its own CA, with a
    replayed Accept of a real session, or with the right quote for other code. Each is refused before
    the client sends a byte of its call."""
    a, _ = cluster.addrs
    launch(a, heap=16 << 20)
    create_root_ca(tmp_path / "evil-ca")
    evil = SimPlatform.provision(tmp_path / "evil", tmp_path / "evil-ca", "a")
    real = EnclaveClient(a, "kv")
    about = real.open().about  # the real instance's id, code and launch: the rogue claims all of them
    ident = real.identity
    assert ident is not None
    real.close()

    def own_ca(req: dict[str, Any]) -> dict[str, Any]:
        if req.get("op") != "session_open":
            return {"ok": False, "error": "no"}
        _, acc = accept(req["hello"], lambda rd: evil.quote(ident, rd), about)
        return {"ok": True, "result": acc}

    recorded = {}

    def keep(reply: dict[str, Any]) -> dict[str, Any]:
        recorded.setdefault("accept", reply.get("result"))
        return reply

    rec = FrameRelay(a, on_reply=keep)
    EnclaveClient(rec.addr, "kv").open()
    rec.close()

    cases = [(own_ca, AttestationError, "not issued by the trusted root|not signed by the trusted root"),
             (lambda req: {"ok": True, "result": recorded["accept"]}, AttestationError, "not bound to this session")]
    for answer, exc, match in cases:
        rogue = FrameRelay(a, answer=answer)
        c = EnclaveClient(rogue.addr, "kv", timeout=10)
        try:
            with pytest.raises(exc, match=match):
                c.call("put", "canary", "secret")
        finally:
            c.close()
            rogue.close()
        assert not [f for k, f in rogue.frames if k == "request" and f.get("op") == "session_call"]


@pytest.mark.adversarial
def test_client_pinned_to_other_code_refuses(tmp_path) -> None:
    """Same name, other launch (a bigger heap measures differently): the pinned client refuses it."""
    with LocalCluster(1) as cl:
        a = cl.addrs[0]
        launch(a, heap=16 << 20)
        first = EnclaveClient(a, "kv")
        first.open()
        pinned = Expect(measurement=first.identity.measurement, source="pinned by this test")
        first.close()
        request(a, {"op": "stop", "name": "kv"})
        launch(a, heap=32 << 20)
        c = EnclaveClient(a, "kv", trust=Trust(SimVerifier(), expect=pinned))
        with pytest.raises(AttestationError, match=r"runs measurement .*not the expected .*pinned by this test"):
            c.call("get", "client-1")
        c.close()



def test_a_restored_enclave_does_not_know_old_sessions(cluster) -> None:
    """A checkpoint holds no session keys: after a restore the client hears, in one line, that its call's
    outcome is unknown, and its next call opens a new session (never re-sealing the old request)."""
    from constmig.errors import CallFailed

    a, _ = cluster.addrs
    launch(a, heap=16 << 20)
    c = EnclaveClient(a, "kv", timeout=30)
    try:
        c.call("put", "k", "v1")
        old = c.session_id
        path = request(a, {"op": "checkpoint", "name": "kv"})["path"]
        request(a, {"op": "stop", "name": "kv"})
        request(a, {"op": "restore", "path": path, "name": "kv"})
        with pytest.raises(CallFailed, match="does not know this session .*may or may not have run"):
            c.call("put", "k", "v2")
        assert c.call("get", "k") == b"v1"  # a new session; the refused put never ran
        assert c.session_id not in (None, old)
    finally:
        c.close()
