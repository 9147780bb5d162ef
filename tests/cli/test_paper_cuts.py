"""What a new operator hits, each checked the way they met it: a --timeout the first
contact ignored, a port that is no agent, --json into a folder that does not exist, tables that cut
addresses at 80 columns."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from constmig.errors import AgentError, AgentUnreachable, ConfigError

ADDR_A, ADDR_B, ADDR_C = "10.200.100.101:17001", "10.200.100.102:17001", "10.200.100.103:17001"


@pytest.fixture
def plain_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A user with no local agents and no operator certificate: admin requests go over plain TCP."""
    monkeypatch.setenv("CONSTMIG_ADMIN_CERT", str(tmp_path / "no-operator"))
    monkeypatch.setenv("CONSTMIG_AGENTS_DIR", str(tmp_path / "no-agents"))
    return {**os.environ}


def cm(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, env=env,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p, time.monotonic() - t0


# ---- --timeout bounds the first contact ----

@pytest.fixture
def unanswered() -> Iterator[str]:
    """A port whose accept queue is full: a connect to it waits until its own timeout (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    held = []
    for _ in range(8):  # fill the queue (its length is the backlog plus one)
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(listener.getsockname())
            held.append(s)
        except TimeoutError:
            s.close()
            break
    try:
        yield addr
    finally:
        for s in held:
            s.close()
        listener.close()


def test_status_timeout_bounds_the_connect(unanswered: str, plain_env: dict[str, str]) -> None:
    """Before: 10 s and "timed out after 10s", whatever --timeout said."""
    p, took = cm("status", "--agent", unanswered, "--timeout", "1", env=plain_env)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"cannot reach agent at {unanswered}: timed out after 1s" in p.stderr, p.stderr
    assert took < 8, took


def test_a_request_timeout_bounds_the_connect(unanswered: str, plain_env: dict[str, str]) -> None:
    from constmig.host.client import EnclaveRoute, request
    from constmig.wire import control

    for ask in (lambda: request(unanswered, control.Status(), timeout=0.5),
                lambda: EnclaveRoute(unanswered, "kv", timeout=0.5).request(
                    control.SessionOpen(name="kv", hello=b"h"))):
        t0 = time.monotonic()
        with pytest.raises(AgentUnreachable, match="timed out after 0.5s"):
            ask()
        assert time.monotonic() - t0 < 3


# ---- a port that is not an agent ----

@pytest.fixture
def web_server() -> Iterator[str]:
    """Something else on the port: a web server answering any bytes with a 400."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        listener.close()


def test_a_web_server_is_not_a_constmig_agent(web_server: str, plain_env: dict[str, str]) -> None:
    """Before: "peer announced a 1213486160-byte control message" (the bytes "HTTP" read as a length)."""
    p, _ = cm("status", "--agent", web_server, env=plain_env)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"error: {web_server} is not a constmig agent: it answered b'HTTP/1.1 400 Bad Request" in p.stderr, \
        p.stderr
    assert "1213486160" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_web_server_is_not_an_agent_for_calls_or_with_a_certificate(web_server: str, tmp_path: Path,
                                                                     plain_env: dict[str, str]) -> None:
    from constmig.host import pki
    from constmig.host.client import PlainEnclaveClient, admin_connect, request
    from constmig.wire import control

    with pytest.raises(AgentError, match="is not a constmig agent: it answered b'HTTP/1.1 400"):
        request(web_server, control.Ping(), timeout=5)
    with pytest.raises(AgentError, match="is not a constmig agent"):
        PlainEnclaveClient(web_server, "kv", timeout=5).call("get", "k")
    pki.create_admin_ca(tmp_path / "ca")
    operator = pki.issue(tmp_path / "ca", "operator", "alice", tmp_path / "op")
    with pytest.raises(AgentError, match="is not a constmig agent: it answered b'HTTP/1.1 400"):
        admin_connect(web_server, operator, timeout=5)  # the first frame there is the `tls` request


# ---- --json into a folder that does not exist ----

def test_json_into_a_missing_folder_is_refused_and_creates_nothing(tmp_path: Path,
                                                                   plain_env: dict[str, str]) -> None:
    """Before: the folders were created (as root, at / for /nonexistent/dir/x.json), then the migration ran."""
    target = tmp_path / "nonexistent" / "dir" / "x.json"
    p, _ = cm("migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--json", str(target), env=plain_env)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: cannot write to --json {target}: No such file or directory (the folder " \
                               f"{target.parent} does not exist)", p.stderr
    assert not (tmp_path / "nonexistent").exists()


def test_check_writable_creates_no_folder_for_a_file(tmp_path: Path) -> None:
    from constmig.units import check_writable

    with pytest.raises(ConfigError, match="does not exist"):
        check_writable(tmp_path / "a" / "b.json", "--json")
    assert not (tmp_path / "a").exists()
    check_writable(tmp_path / "b.json", "--json")  # an existing folder is fine
    check_writable(tmp_path / "out" / "run1", "--out", folder=True)  # an output folder is still made


# ---- tables at 80 columns keep addresses whole ----

@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "50")


def test_status_keeps_every_address_whole(narrow: None, capsys: pytest.CaptureFixture[str]) -> None:
    from constmig.progress import print_status

    print_status({"host_id": "a", "listen": ADDR_A, "moved": {"kv2": ADDR_C}, "enclaves": {
        "kvstore-primary": {"status": "running", "state": "running", "app": "kvstore", "heap_bytes": 1 << 30,
                            "used_bytes": 1 << 29, "tracker": "none", "sessions": 2,
                            "platform": "sim:host-a-platform-0123456789"}}})
    out = capsys.readouterr().out
    assert ADDR_A in out and f"kv2: moved to {ADDR_C}" in out and not re.search(r"(10\.200[\d.:]*|kv\S*)…", out), out


@pytest.mark.parametrize("sources", [1, 2])
def test_drain_table_keeps_every_address_whole(narrow: None, capsys: pytest.CaptureFixture[str],
                                               sources: int) -> None:
    from constmig.progress import print_drain

    second = ADDR_A if sources == 1 else ADDR_B
    print_drain({"title": f"drain of {ADDR_A}", "wall_s": 3.2, "moved": [
        {"name": "kvstore-primary", "from": ADDR_A, "to": ADDR_B, "ok": True, "downtime_ms": 3.5, "total_s": 1.25,
         "state_bytes": 1 << 30},
        {"name": "kv2", "from": second, "to": ADDR_C, "ok": False, "downtime_ms": None, "total_s": None,
         "error": "migration of 'kv2' cancelled before its commit point", "state_bytes": None}]})
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert any(ADDR_B in row for row in rows) and any(ADDR_C in row for row in rows), out  # whole, one line
    if sources == 2:
        assert sum(ADDR_A in row for row in rows) == 1 and sum(ADDR_B in row for row in rows) == 2, out
    assert not re.search(r"(10\.200[\d.:]*|kv\S*)…", out), out  # no address or name cut short
    assert "kv2 stayed: migration of 'kv2' cancelled before its commit point" in out, out


def test_ls_keeps_every_address_whole(narrow: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from constmig import cli
    from constmig.host import fleet

    views = [fleet.HostView(ADDR_A, "host-a", {
        "kvstore-primary": {"status": "running", "app": "kvstore", "heap_bytes": 1 << 30, "calls_per_s": 12.5},
        "kvstore-secondary-long-name": {"status": "migrating-out", "app": "hashjoin", "heap_bytes": 1 << 30}},
        free=8 << 30),
        fleet.HostView(ADDR_B, "host-b", {}, free=8 << 30)]
    monkeypatch.setattr(fleet, "look", lambda addrs: views)
    result = CliRunner().invoke(cli.main, ["ls", "--hosts", f"{ADDR_A},{ADDR_B}"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert sum(ADDR_A in row for row in rows) == 2, result.output  # both enclaves' rows, whole
    assert not re.search(r"(10\.200[\d.:]*|kv\S*)…", result.output), result.output


# ---- docs/apps.md says where EnclaveError comes from and how to size arrays ----

def test_apps_doc_names_its_imports_and_its_sizing_runs() -> None:
    """Before: the page used EnclaveError without saying where it comes from, and said nothing of how
    big an array may be (heap.free_bytes)."""
    import numpy as np

    from constmig.enclave.heap import Heap
    from constmig.errors import EnclaveError

    text = (Path(__file__).resolve().parents[2] / "docs" / "apps.md").read_text()
    assert "from constmig.errors import ConfigError, EnclaveError" in text
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    sizing = [b for b in blocks if "free_bytes" in b]
    assert sizing, "no example sizes an array by heap.free_bytes"
    scope: dict = {"np": np, "ConfigError": ConfigError, "EnclaveError": EnclaveError}
    exec(sizing[0], scope)

    class App:
        def __init__(self, heap: Heap) -> None:
            self.heap = heap

    for taken, fits in ((0, True), (60_000, False)):
        heap = Heap(1 << 20, 64 << 10)
        try:
            heap.alloc("taken", (1 << 20) - 4096 if taken else 1, np.uint8)
            app = App(heap)
            if fits:
                scope["setup"](app)
                assert app.balances.size > 16 and heap.free_bytes >= 0
            else:
                with pytest.raises(ConfigError, match="needs a larger --heap"):
                    scope["setup"](app)
        finally:
            heap.close()
