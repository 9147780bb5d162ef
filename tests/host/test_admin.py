"""Who may ask an agent what (host/admin.py), its certificates (host/pki.py), `constmig ca`, and where
metrics are served: the pieces, without agents (except where an agent's own refusal is the point)."""

from __future__ import annotations

import datetime as dt
import inspect
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from constmig.errors import ConfigError
from constmig.host import admin, pki
from constmig.host.agent import Agent
from constmig.host.metrics import metrics_address

# ---- which op is whose ----


def test_every_op_the_agent_serves_is_classified():
    dispatched = set(re.findall(r'"(\w+)": self\.op_', inspect.getsource(Agent._dispatch)))
    served = dispatched | {"data", "tls"}  # answered before dispatch, in Agent._serve
    classes = (admin.OPEN_OPS, admin.AGENT_OPS, admin.ADMIN_OPS)
    assert served == set().union(*classes), served ^ set().union(*classes)
    assert not (admin.OPEN_OPS & admin.ADMIN_OPS) and not (admin.AGENT_OPS & (admin.OPEN_OPS | admin.ADMIN_OPS))


@pytest.mark.parametrize("op", sorted(admin.ADMIN_OPS | admin.AGENT_OPS))
def test_plain_tcp_may_not_ask_for_an_admin_op(op):
    why = admin.refusal(op, admin.Caller("network", peer="10.0.0.9:4000"))
    assert why is not None and admin.NEEDS in why and "\n" not in why
    assert admin.refusal(op, admin.Caller("local")) is None
    assert admin.refusal(op, admin.Caller("tls", "operator", "alice")) is None


@pytest.mark.parametrize("op", sorted(admin.OPEN_OPS))
def test_open_ops_are_anyones(op):
    assert admin.refusal(op, admin.Caller("network")) is None


def test_a_host_certificate_asks_only_what_agents_ask_each_other():
    host = admin.Caller("tls", "host", "b")
    assert all(admin.refusal(op, host) is None for op in admin.AGENT_OPS)
    for op in admin.ADMIN_OPS:
        assert "allows only what one agent asks another" in (admin.refusal(op, host) or "")
    assert "no constmig role" in (admin.refusal("stop", admin.Caller("tls", "", "x")) or "")


# ---- certificates ----


@pytest.fixture
def ca(tmp_path):
    assert pki.create_admin_ca(tmp_path / "ca") is True
    assert pki.create_admin_ca(tmp_path / "ca") is False  # there already: kept
    return tmp_path / "ca"


def test_an_operator_certificate_names_its_role_and_expiry(ca, tmp_path):
    ident = pki.issue(ca, "operator", "alice", tmp_path / "op", days=2)
    assert (ident.role, ident.name) == ("operator", "alice") and ident.problem() is None
    assert dt.timedelta(days=1.9) < ident.not_after - dt.datetime.now(dt.UTC) < dt.timedelta(days=2.1)
    assert (tmp_path / "op" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert pki.read_identity(tmp_path / "op").name == "alice"
    old = pki.issue(ca, "operator", "bob", tmp_path / "old", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    assert "expired on" in (old.problem() or "")


def test_a_certificate_with_another_cas_file_is_refused(ca, tmp_path):
    pki.issue(ca, "operator", "alice", tmp_path / "op")
    pki.create_admin_ca(tmp_path / "other")
    (tmp_path / "op" / "ca.pem").write_bytes((tmp_path / "other" / "admin" / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="is not issued by"):
        pki.read_identity(tmp_path / "op")


def test_an_agent_issues_its_host_certificate_once_and_again_after_the_ca_is_renewed(ca, tmp_path):
    out = tmp_path / "state" / "tls"
    first, issued = pki.ensure_host(ca, out, "a")
    assert issued and (first.role, first.name) == ("host", "a")
    again, issued = pki.ensure_host(ca, out, "a")
    assert not issued and again.cert == first.cert
    other, issued = pki.ensure_host(ca, out, "b")  # another host's certificate there: this host gets its own
    assert issued and other.name == "b"
    pki.create_admin_ca(ca, renew=True)  # revocation: every earlier certificate is from another CA now
    renewed, issued = pki.ensure_host(ca, out, "b")
    assert issued and pki.fingerprint(renewed.ca) != pki.fingerprint(other.ca)


def test_without_the_cas_key_a_host_needs_a_provisioned_certificate(ca, tmp_path):
    (ca / "admin" / "ca.key").rename(tmp_path / "away.key")
    with pytest.raises(ConfigError, match=r"no host certificate in .*constmig ca issue host a --out"):
        pki.ensure_host(ca, tmp_path / "tls", "a")
    with pytest.raises(ConfigError, match="no ca.key"):
        pki.issue(ca, "operator", "x", tmp_path / "x")


# ---- the local socket and its index ----


def test_the_index_finds_a_local_agent_by_address(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSTMIG_AGENTS_DIR", str(tmp_path / "index"))
    sock_path = admin.socket_path(tmp_path / ("s" * 120))  # longer than sun_path: bound through its folder
    server = admin.bind_local(sock_path)
    try:
        assert (sock_path.parent.stat().st_mode & 0o777) == 0o700
        assert admin.connect_local("127.0.0.1:7001", 2) is None  # not listed: remote, as far as the CLI knows
        admin.register("localhost:7001", sock_path)
        conn = admin.connect_local("127.0.0.1:7001", 2)
        assert conn is not None
        peer, _ = server.accept()
        assert admin.trusted_uid(admin.peer_uid(peer))
        conn.close()
        peer.close()
        admin.register("0.0.0.0:7002", sock_path)  # a wildcard listener serves this machine's addresses
        assert admin.find_local("127.0.0.1:7002") is not None and admin.find_local("192.0.2.7:7002") is None
        admin.unregister("127.0.0.1:7001", tmp_path / "another.sock")  # another agent's: left alone
        assert admin.find_local("127.0.0.1:7001") is not None
        admin.unregister("127.0.0.1:7001", sock_path)
        assert admin.find_local("127.0.0.1:7001") is None
    finally:
        server.close()
    assert admin.connect_local("127.0.0.1:7002", 2) is None  # listed, but its agent is gone


# ---- metrics: loopback unless asked ----


def test_metrics_serve_on_loopback_unless_made_public():
    assert metrics_address("9464") == ("127.0.0.1", 9464)
    assert metrics_address("[::1]:0") == ("::1", 0)
    for where in ("0.0.0.0:9464", "10.1.2.3:9464", "metrics.example:9464"):
        with pytest.raises(ConfigError, match="enclave names to anyone"):
            metrics_address(where)
        assert metrics_address(where, public=True)[1] == 9464


def _cm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env)


def _one_line(p: subprocess.CompletedProcess, wanted: str) -> None:
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and wanted in p.stderr, p.stderr


def test_an_agent_refuses_public_metrics_without_the_flag(tmp_path):
    from constmig.host.cluster import free_port

    p = _cm("agent", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "s"), "--host-id", "m",
            "--ca-dir", str(tmp_path / "ca"), "--metrics-listen", "0.0.0.0:0")
    _one_line(p, "add --metrics-public")


# ---- constmig ca ----


def test_ca_commands(tmp_path):
    import os

    env = {**os.environ, "CONSTMIG_ADMIN_CERT": str(tmp_path / "me")}
    p = _cm("ca", "init", "--ca-dir", str(tmp_path / "ca"), env=env)
    assert p.returncode == 0 and "admin CA created in" in p.stdout, p.stderr
    p = _cm("ca", "issue", "operator", "alice", "--ca-dir", str(tmp_path / "ca"), "--days", "7", env=env)
    assert p.returncode == 0 and f"in {tmp_path / 'me'}" in p.stdout, p.stderr
    assert "operator 'alice', valid until" in _cm("ca", "show", env=env).stdout
    p = _cm("ca", "issue", "host", "b", "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "b"), env=env)
    assert p.returncode == 0 and pki.read_identity(tmp_path / "b").role == "host"
    _one_line(_cm("ca", "issue", "host", "b", "--ca-dir", str(tmp_path / "ca"), env=env), "needs --out")
    _one_line(_cm("ca", "issue", "admin", "x", "--ca-dir", str(tmp_path / "ca"), env=env), "unknown role 'admin'")
    _one_line(_cm("ca", "issue", "operator", "x", "--days", "-1", "--ca-dir", str(tmp_path / "ca"), env=env),
              "--days must be more than 0")
    _one_line(_cm("ca", "issue", "operator", "x", "--ca-dir", str(tmp_path / "none"), env=env), "no admin CA in")
    _one_line(_cm("ca", "show", str(tmp_path / "nothing"), env=env), "no certificate in")


def test_a_plain_socket_is_not_a_tls_peer():
    a, b = socket.socketpair()
    try:
        assert admin.peer_identity(None) == ("", "")
        assert admin.trusted_uid(admin.peer_uid(a))
    finally:
        a.close()
        b.close()


def test_paths():
    assert admin.socket_path(Path("/s")) == Path("/s/admin/agent.sock")
    assert pki.host_dir(Path("/s")) == Path("/s/tls")
