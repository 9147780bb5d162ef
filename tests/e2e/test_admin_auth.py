"""Who may administer an agent, played with real agent processes and the stock CLI.

A stranger on the network (no certificate, one from another CA, an expired one from the fleet's CA, a
host's certificate taken from another machine) asks for what only an operator may: shutdown, stop
--force, run, migrate, restore. Each is refused in one line, and the enclaves keep running with their
data. The CLI of the agents' own user needs nothing (the local socket), an operator elsewhere needs
only `constmig ca issue operator`, and migrations between agents authenticate with host certificates.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import checksum, launch, running_at
from constmig.errors import AgentError
from constmig.host import admin, pki
from constmig.host.client import _TlsStream, request
from constmig.host.cluster import LocalCluster
from constmig.host.orchestrate import migrate
from constmig.wire.framing import FramedSocket

pytestmark = [pytest.mark.e2e, pytest.mark.adversarial]
REFUSED = "admin operations need the local socket or a certificate from the fleet's CA"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two agents; kv runs on the first, with a checkpoint a stranger will try to restore."""
    with LocalCluster(2) as c:
        a = c.addrs[0]
        before = launch(a)
        ckpt = request(a, {"op": "checkpoint", "name": "kv"})["path"]
        yield c, before, ckpt


@pytest.fixture(scope="module")
def certs(fleet, tmp_path_factory):
    """Identity folders a stranger may hold: none, another CA's operator, an expired operator of the fleet's
    CA, a host certificate of the fleet's CA; and a good operator."""
    c, _, _ = fleet
    base = tmp_path_factory.mktemp("certs")
    pki.create_admin_ca(base / "evil-ca")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    return {
        "none": base / "none",
        "other-ca": pki.issue(base / "evil-ca", "operator", "mallory", base / "other-ca").folder,
        "expired": pki.issue(c.ca_dir, "operator", "old", base / "expired", days=1, now=old).folder,
        "host": pki.issue(c.ca_dir, "host", "z", base / "host").folder,
        "operator": pki.issue(c.ca_dir, "operator", "alice", base / "operator").folder,
    }


def _alive(c: LocalCluster) -> None:
    assert all(p.poll() is None for p in c.procs), "an agent died"


def _intact(fleet) -> None:
    c, before, _ = fleet
    _alive(c)
    a, b = c.addrs
    assert running_at(a) and checksum(a) == before
    assert "kv" not in request(b, {"op": "status"})["enclaves"]
    assert set(request(a, {"op": "status"})["enclaves"]) == {"kv"}


def _stranger_env(tmp_path: Path, cert: Path) -> dict[str, str]:
    """Another machine's CLI: no index of local agents, `cert` as its operator certificate folder."""
    return {**os.environ, "HOME": str(tmp_path), "CONSTMIG_AGENTS_DIR": str(tmp_path / "agents"),
            "CONSTMIG_ADMIN_CERT": str(cert)}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def _one_line_refusal(p: subprocess.CompletedProcess, *wanted: str) -> str:
    """Exit 1 and one `error:` line (migrate's progress bar may have drawn its empty line before)."""
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2, p.stderr
    assert any(w in errors[0] for w in wanted), errors[0]
    return errors[0]


def _plain(addr: str, req: dict) -> dict:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        return FramedSocket(s).exchange(req)


def _tls(addr: str, folder: Path, req: dict) -> dict | str:
    """A stranger's own TLS client: presents the certificate in `folder`, trusts any agent. Returns the
    agent's reply, or how it broke the connection off."""
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        assert FramedSocket(sock).exchange({"op": "tls"})["ok"]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        tls = ctx.wrap_socket(sock)
        sock = tls
        return FramedSocket(_TlsStream(tls)).exchange(req)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 (what the stranger sees is the result)
        return f"{type(e).__name__}: {e.__cause__ or e}"
    finally:
        sock.close()


@pytest.mark.smoke
def test_a_stranger_cannot_shut_an_agent_down(fleet):
    """A shutdown from a peer with no certificate is refused; an open port would answer 'shutting down' and exit."""
    c, _, _ = fleet
    reply = _plain(c.addrs[0], {"op": "shutdown"})
    time.sleep(1.0)
    _alive(c)
    assert not reply["ok"] and REFUSED in reply["error"] and "\n" not in reply["error"]
    _intact(fleet)


@pytest.mark.parametrize("kind,seen", [("other-ca", "not issued by this fleet's admin CA"),
                                       ("expired", "certificate expired"), ("host", None)])
def test_a_bad_certificate_cannot_shut_an_agent_down(fleet, certs, kind, seen):
    """The agent ends the handshake of a certificate its CA did not issue, or that expired (its log says
    why), and answers a host's certificate asking for an operator's request with one line."""
    c, _, _ = fleet
    out = _tls(c.addrs[0], certs[kind], {"op": "shutdown"})
    time.sleep(0.5)
    _alive(c)
    if seen is None:
        assert isinstance(out, dict) and not out["ok"], out
        assert "allows only what one agent asks another" in out["error"] and "\n" not in out["error"]
    else:
        assert out == "ChannelClosed: connection closed by peer", out
        log = (c.base / "agent-a.log").read_text().splitlines()
        assert any("refused a certificate from" in line and seen in line for line in log), log[-5:]
    _intact(fleet)


def test_plain_tcp_refuses_every_admin_op_and_serves_the_open_ones(fleet):
    c, _, _ = fleet
    a = c.addrs[0]
    for op in sorted(admin.ADMIN_OPS | admin.AGENT_OPS):
        reply = _plain(a, {"op": op, "name": "kv", "force": True, "to": c.addrs[1], "path": "x", "app": "kvstore",
                           "spec": {"name": "kv", "app": "kvstore", "heap": 1 << 20}})
        assert not reply["ok"] and REFUSED in reply["error"], (op, reply)
    assert _plain(a, {"op": "ping"})["result"] == {"host_id": "a", "listen": a}
    assert "kv" not in str(_plain(a, {"op": "ping"}))  # liveness names no enclave
    _intact(fleet)


COMMANDS = {
    "stop --force": lambda a, b, ckpt: ["stop", "kv", "--force", "--agent", a],
    "run": lambda a, b, ckpt: ["run", "kvstore", "--name", "evil", "--heap", "8M", "--agent", a],
    "migrate": lambda a, b, ckpt: ["migrate", "kv", "--from", a, "--to", b, "--strategy", "stopcopy"],
    "restore": lambda a, b, ckpt: ["restore", ckpt, "--agent", a, "--name", "kv2"],
}
# What a stranger's stock CLI says, by the certificate it holds.
SAYS = {
    "none": (REFUSED,),
    "other-ca": ("is not an agent of this fleet",),  # its CLI cannot verify the fleet's agent either
    "expired": ("expired on",),  # refused before it is sent; the agent refuses it too (test above)
    "host": ("allows only what one agent asks another",),
}


@pytest.mark.parametrize("kind", list(SAYS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_stranger_with_the_stock_cli_is_refused_in_one_line(fleet, certs, tmp_path, kind, command):
    c, _, ckpt = fleet
    a, b = c.addrs
    p = _cli(_stranger_env(tmp_path, certs[kind]), *COMMANDS[command](a, b, ckpt))
    _one_line_refusal(p, *SAYS[kind])
    _intact(fleet)


def test_an_operator_elsewhere_needs_only_a_certificate(fleet, certs, tmp_path):
    """No local socket (another machine's CLI): the fleet CA's operator certificate administers the agent,
    over mutual TLS on its port; a migration it starts authenticates agent to agent with host certificates."""
    c, before, _ = fleet
    a, b = c.addrs
    env = _stranger_env(tmp_path, certs["operator"])
    p = _cli(env, "status", "--agent", a, "--json")
    assert p.returncode == 0 and '"kv"' in p.stdout, p.stderr
    p = _cli(env, "run", "kvstore", "--name", "ops", "--heap", "8M", "--agent", b)
    assert p.returncode == 0, p.stderr
    p = _cli(env, "migrate", "ops", "--from", b, "--to", a, "--strategy", "stopcopy")
    assert p.returncode == 0, p.stderr
    p = _cli(env, "stop", "ops", "--agent", a)
    assert p.returncode == 0 and "stopped" in p.stdout, p.stderr
    assert "operator 'alice'" in _cli(env, "ca", "show").stdout
    _intact(fleet)


def test_the_local_cli_needs_nothing(fleet, tmp_path):
    """The agents' own user: the local socket, found by the agent's address; no certificate anywhere."""
    c, _, _ = fleet
    env = {**os.environ, "CONSTMIG_ADMIN_CERT": str(tmp_path / "none")}
    p = _cli(env, "status", "--agent", c.addrs[0], "--json")
    assert p.returncode == 0 and '"kv"' in p.stdout and '"socket"' in p.stdout, p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_cannot_use_the_socket(fleet):
    c, _, _ = fleet
    path = admin.find_local(c.addrs[0])
    assert path is not None
    pid = os.fork()
    if pid == 0:  # the child: user nobody, trying the agent's socket
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
        except PermissionError:
            code = 3
        except BaseException:  # noqa: BLE001 (nothing may escape a forked test process)
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    _intact(fleet)


def test_a_destination_with_another_admin_ca_is_refused(fleet, tmp_path):
    """A would-be destination whose host certificate the fleet's CA did not issue: the source agent will
    not prepare it; the enclave stays where it runs."""
    c, _, _ = fleet
    ca = tmp_path / "other"
    shutil.copytree(c.ca_dir, ca, ignore=shutil.ignore_patterns("admin"))  # same attestation root, own admin CA
    with LocalCluster(1, base_dir=tmp_path / "elsewhere", ca_dir=ca) as other:
        with pytest.raises(AgentError, match="is not an agent of this fleet") as e:
            migrate("kv", c.addrs[0], other.addrs[0], "stopcopy")
        assert "\n" not in str(e.value)
        assert "kv" not in request(other.addrs[0], {"op": "status"})["enclaves"]
    _intact(fleet)


def test_a_client_elsewhere_types_its_arguments_by_the_attested_app(fleet, tmp_path):
    """A client without admin access cannot read `status`; `put k 123` still stores the string "123", typed
    by the app the enclave's quote-bound launch configuration names (not by what the host says it runs)."""
    c, _, _ = fleet
    a = c.addrs[0]
    env = {**_stranger_env(tmp_path, tmp_path / "none"), "CONSTMIG_CA_DIR": str(c.ca_dir),
           "CONSTMIG_KNOWN_ENCLAVES": str(tmp_path / "known.json")}
    p = _cli(env, "call", "kv", "--agent", a, "put", "typed-elsewhere", "123")
    assert p.returncode == 0, p.stderr
    p = _cli(env, "call", "kv", "--agent", a, "get", "typed-elsewhere")
    assert p.returncode == 0 and p.stdout.strip() == "123", (p.stdout, p.stderr)
