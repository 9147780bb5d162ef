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


# ---- the pieces one by one (what a mutation run of host/admin.py found unchecked) ----


def test_a_caller_says_how_it_was_authenticated_and_cannot_be_changed():
    assert admin.Caller("tls", "operator", "alice", "10.0.0.1:5000").describe() == "operator 'alice' at 10.0.0.1:5000"
    assert admin.Caller("network", peer="10.0.0.9:4000").describe() == "network peer 10.0.0.9:4000"
    assert admin.Caller("local").describe() == "local peer"
    with pytest.raises(AttributeError):
        admin.Caller("network").via = "local"  # type: ignore[misc]


def test_only_this_user_and_root_are_trusted_on_the_local_socket(monkeypatch):
    monkeypatch.setattr(admin.os, "geteuid", lambda: 1000)
    assert admin.trusted_uid(0) and admin.trusted_uid(1000)
    assert not any(admin.trusted_uid(uid) for uid in (1, 999, 1001, 65534, -1))


def test_a_short_socket_path_is_bound_by_name_a_longer_one_through_its_folder(tmp_path):
    base = len(str(tmp_path)) + 1
    for size, direct in ((99, True), (100, False)):
        path = tmp_path / ("d" * (size - base - len("/agent.sock"))) / "agent.sock"
        assert len(str(path)) == size
        server = admin.bind_local(path)
        try:
            name = server.getsockname()
            assert (name == str(path)) if direct else name.startswith("/proc/self/fd/"), name
        finally:
            server.close()


def test_the_local_socket_is_the_users_alone_and_a_restarted_agent_binds_it_again(tmp_path):
    path = admin.socket_path(tmp_path / "state")
    for _ in range(2):  # the second time, the folder and a stale socket are there (an agent that was killed)
        server = admin.bind_local(path)
        assert stat_mode(path) == 0o600 and stat_mode(path.parent) == 0o700
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.close()
        server.close()


def test_a_local_socket_that_cannot_be_set_up_leaves_no_descriptor_behind(tmp_path, monkeypatch):
    import os

    def refuse(name, mode):
        if str(name).endswith(admin.SOCKET_NAME):
            raise PermissionError(1, "Operation not permitted")
        return chmod(name, mode)

    chmod = os.chmod
    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(admin.os, "chmod", refuse)
    with pytest.raises(PermissionError):
        admin.bind_local(admin.socket_path(tmp_path / "state"))
    assert len(os.listdir("/proc/self/fd")) == before


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_index_is_private_per_network_namespace_and_cleans_up_after_killed_agents(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("CONSTMIG_AGENTS_DIR", str(tmp_path / "home" / "agents"))
    folder = admin.index_dir()
    assert folder.name == f"net-{os.stat('/proc/self/ns/net').st_ino}"
    gone = tmp_path / "gone" / "agent.sock"
    gone.parent.mkdir()
    entry = admin.register("127.0.0.1:7001", gone)
    assert entry.name == "127.0.0.1:7001" and stat_mode(folder) == 0o700 and stat_mode(folder.parent) == 0o700
    (tmp_path / "gone").rmdir()  # that agent was killed with its state folder
    (folder / "notes").write_text("not an entry")  # anything else in the index is left alone
    live = tmp_path / "live.sock"
    live.write_text("")
    assert admin.register("[::1]:7002", live).name == "[::1]:7002"
    assert sorted(p.name for p in folder.iterdir()) == ["[::1]:7002", "notes"]
    real_stat = os.stat

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/self/ns/net":
            raise PermissionError(13, "Permission denied")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(admin.os, "stat", no_proc)
    assert admin.index_dir().name == "net-0"  # no namespace to tell: one index for all


def test_a_wildcard_listener_serves_every_address_of_this_machine_and_only_those(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSTMIG_AGENTS_DIR", str(tmp_path / "index"))
    sock = tmp_path / "agent.sock"
    sock.write_text("")  # (an entry whose target is gone is dropped as a killed agent's)
    admin.register("0.0.0.0:7002", sock)
    admin.register("[::]:7003", sock)
    assert admin.find_local("[::]:7002") is not None  # IPv6's any-address is this machine's too
    assert admin.find_local("[::ffff:127.0.0.1]:7002") is not None
    assert admin.find_local("0.0.0.0:7003") is not None
    assert admin.find_local("agent.example:7002") is None  # a name is not resolved: remote, as far as we know
    assert admin.find_local("[2001:db8::7]:7003") is None and admin.find_local("192.0.2.7:7002") is None
    assert admin.find_local("no port") is None


def _identity_folder(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, folder: Path):
    from types import SimpleNamespace

    folder.mkdir(parents=True)
    for name, data in (("cert.pem", cert_pem), ("key.pem", key_pem), ("ca.pem", ca_pem)):
        (folder / name).write_bytes(data)
    return SimpleNamespace(cert_path=folder / "cert.pem", key_path=folder / "key.pem", ca_path=folder / "ca.pem")


def tls(server, client) -> dict[str, object]:
    """One mutual-TLS handshake between an agent's context and a client's (None: a client with no certificate),
    over a socket pair: what each side learnt of the other, or how it refused, in words."""
    import ssl
    import threading

    a, b = socket.socketpair()
    out: dict[str, object] = {}

    def serve() -> None:
        try:
            with admin.server_context(server).wrap_socket(a, server_side=True) as s:
                out["server"] = admin.peer_identity(s)
                s.sendall(b"ok")
        except ssl.SSLError as e:
            out["server"] = admin.alert_text(e)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    if client is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(server.ca_path)
    else:
        ctx = admin.client_context(client)
    try:
        with ctx.wrap_socket(b) as c:
            out["client"] = admin.peer_identity(c)
            if c.recv(2) != b"ok":
                raise ssl.SSLError("no answer")
    except ssl.SSLError as e:
        out["client"] = admin.alert_text(e)
    except OSError:
        pass  # the server closed the connection first: its own word is the one that counts
    th.join(10)
    a.close()
    b.close()
    return out


def test_mutual_tls_names_each_side_and_says_why_a_stranger_is_refused(ca, tmp_path):
    host = pki.issue(ca, "host", "a", tmp_path / "host")
    alice = pki.issue(ca, "operator", "alice", tmp_path / "alice")
    assert tls(host, alice) == {"server": ("operator", "alice"), "client": ("host", "a")}
    pki.create_admin_ca(tmp_path / "other")
    ours = (ca / "admin" / "ca.pem").read_bytes()  # public: a stranger can trust the agent, not be trusted by it
    mallory = pki.issue(tmp_path / "other", "operator", "mallory", tmp_path / "mallory")
    stranger = _identity_folder(mallory.cert_path.read_bytes(), mallory.key_path.read_bytes(), ours,
                                tmp_path / "stranger")
    assert tls(host, stranger)["server"] == "not issued by this fleet's admin CA"
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue(ca, "operator", "old", tmp_path / "old", days=1, now=now - dt.timedelta(days=2))
    assert tls(host, expired)["server"] == "certificate expired"
    early = pki.issue(ca, "operator", "early", tmp_path / "early", days=1, now=now + dt.timedelta(days=2))
    assert tls(host, early)["server"] == "certificate not yet valid"
    other_ca = tmp_path / "other" / "admin"
    selfsigned = _identity_folder((other_ca / "ca.pem").read_bytes(), (other_ca / "ca.key").read_bytes(), ours,
                                  tmp_path / "self")
    assert tls(host, selfsigned)["server"] == "self-signed, not issued by this fleet's admin CA"
    assert tls(host, None)["server"] == "peer did not return a certificate"
    # the client checks the agent just as strictly: an agent of another fleet is refused
    assert tls(pki.issue(tmp_path / "other", "host", "b", tmp_path / "b"), alice)["client"] == \
        "not issued by this fleet's admin CA"


@pytest.mark.parametrize(("code", "message", "said"), [
    (2, "unable to get issuer certificate", "not issued by this fleet's admin CA"),
    (19, "self-signed certificate in certificate chain", "not issued by this fleet's admin CA"),
    (20, "unable to get local issuer certificate", "not issued by this fleet's admin CA"),
    (21, "unable to verify the first certificate", "not issued by this fleet's admin CA"),
    (18, "self-signed certificate", "self-signed, not issued by this fleet's admin CA"),
    (10, "certificate has expired", "certificate expired"),
    (9, "certificate is not yet valid", "certificate not yet valid"),
    (26, "unsupported certificate purpose", "unsupported certificate purpose"),
    (26, "", "certificate does not verify"),
])
def test_every_certificate_refusal_is_said_in_words(code, message, said):
    import ssl

    e = ssl.SSLCertVerificationError(1, "certificate verify failed")
    e.verify_code, e.verify_message = code, message
    assert admin.alert_text(e) == said


def test_a_tls_error_without_a_verify_code_is_its_alert_or_reason_in_words():
    import ssl

    for reason, said in (("TLSV13_ALERT_CERTIFICATE_REQUIRED", "certificate required"),
                         ("SSLV3_ALERT_BAD_CERTIFICATE", "bad certificate"),
                         ("WRONG_VERSION_NUMBER", "wrong version number")):
        e = ssl.SSLError(1, f"[SSL: {reason}] ...")
        e.reason = reason
        assert admin.alert_text(e) == said
    assert admin.alert_text(ssl.SSLError(1, "handshake interrupted")) == "handshake interrupted"  # no reason


def test_an_ordinary_user_finds_this_machines_addresses_local_too():
    """The CLI runs as an ordinary user, while these tests may run as root (which may bind any port): the
    check that an address is this machine's runs here with root's privileges dropped."""
    import os

    drop = "os.setgroups([]); os.setgid(65534); os.setuid(65534); " if os.geteuid() == 0 else ""
    code = ("import os, sys; from constmig.host import admin; " + drop +
            "print(os.geteuid() != 0, [admin._is_local_address(a) for a in sys.argv[1:]])")
    p = subprocess.run([sys.executable, "-c", code, "0.0.0.0", "::", "192.0.2.7"], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert p.stdout.strip() == "True [True, True, False]", p.stderr


# ---- the admin CA's certificates (what a mutation run of host/pki.py found unchecked) ----


def test_renewing_the_ca_revokes_every_certificate_it_issued(ca, tmp_path):
    """`constmig ca init --renew` is the revocation (docs/security.md): a new key, so nothing the old one
    signed verifies against the new CA."""
    host = pki.issue(ca, "host", "a", tmp_path / "host")
    alice = pki.issue(ca, "operator", "alice", tmp_path / "alice")
    old_key = (ca / "admin" / "ca.key").read_bytes()
    assert pki.create_admin_ca(ca, renew=True) is True
    assert (ca / "admin" / "ca.key").read_bytes() != old_key
    (tmp_path / "alice" / "ca.pem").write_bytes((ca / "admin" / "ca.pem").read_bytes())  # the new CA, as agents load it
    with pytest.raises(ConfigError, match="is not issued by"):
        pki.read_identity(tmp_path / "alice")
    renewed = pki.issue(ca, "host", "a", tmp_path / "renewed")
    assert tls(renewed, alice)["server"] == "not issued by this fleet's admin CA"
    assert tls(host, pki.issue(ca, "operator", "alice", tmp_path / "alice2"))["client"] == \
        "not issued by this fleet's admin CA"


def test_what_each_certificate_may_do(ca, tmp_path):
    """The CA signs certificates and nothing else, and no certificate below it may; a host's serves and
    authenticates, an operator's only authenticates; the constraints are critical (a verifier that does
    not know them must refuse)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    def ext(cert, kind):
        e = cert.extensions.get_extension_for_class(kind)
        return e.critical, e.value

    ca_cert, _ = pki.load_ca(ca)
    assert ext(ca_cert, x509.BasicConstraints) == (True, x509.BasicConstraints(ca=True, path_length=0))
    assert ext(ca_cert, x509.KeyUsage) == (True, pki._usage(key_cert_sign=True, crl_sign=True))
    usage = ext(ca_cert, x509.KeyUsage)[1]
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature and not usage.key_agreement
    for role, uses in (("host", [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                       ("operator", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        cert = pki.issue(ca, role, "x", tmp_path / role).cert
        assert ext(cert, x509.BasicConstraints) == (True, x509.BasicConstraints(ca=False, path_length=None))
        critical, usage = ext(cert, x509.KeyUsage)
        assert critical and usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
        assert not (usage.content_commitment or usage.key_encipherment or usage.data_encipherment
                    or usage.key_agreement)
        assert ext(cert, x509.ExtendedKeyUsage) == (False, x509.ExtendedKeyUsage(uses))


def test_validity_periods_are_the_documented_ones(ca, tmp_path):
    """docs/security.md: an operator's certificate lasts 90 days, a host's a year; the CA ten years. Each is
    valid from 5 minutes before it was issued (clocks differ a little)."""
    ca_cert, _ = pki.load_ca(ca)
    assert ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc == dt.timedelta(days=3650, minutes=5)
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    for role, days in (("operator", 90), ("host", 365)):
        ident = pki.issue(ca, role, "x", tmp_path / role, now=now)
        assert ident.cert.not_valid_before_utc == now - dt.timedelta(minutes=5)
        assert ident.not_after == now + dt.timedelta(days=days)
    with pytest.raises(ConfigError, match="--days must be positive, not 0"):
        pki.issue(ca, "operator", "x", tmp_path / "zero", days=0)


def test_a_certificate_is_usable_from_its_first_to_its_last_second(ca, tmp_path):
    ident = pki.issue(ca, "operator", "alice", tmp_path / "op", days=10)
    start, end = ident.cert.not_valid_before_utc, ident.not_after
    second = dt.timedelta(seconds=1)
    assert "not valid before" in (ident.problem(now=start - second) or "")
    assert ident.problem(now=start) is None and ident.problem(now=end) is None
    assert "expired on" in (ident.problem(now=end + second) or "")
    assert ident.problem(now=end - dt.timedelta(hours=12)) is None  # no margin unless asked
    assert "expired on" in (ident.problem(now=end + dt.timedelta(hours=12)) or "")
    assert "expires on" in (ident.problem(now=end, margin=dt.timedelta(days=1)) or "")
    with pytest.raises(AttributeError):
        ident.role = "host"  # type: ignore[misc]


def test_an_agent_renews_its_host_certificate_30_days_before_expiry_when_it_can(ca, tmp_path):
    now = dt.datetime.now(dt.UTC)
    for left, renewed in ((29.9, True), (30.1, False)):
        out = tmp_path / f"tls-{left}"
        pki.issue(ca, "host", "a", out, days=left)
        ident, issued = pki.ensure_host(ca, out, "a")
        assert issued is renewed and ident.not_after - now > dt.timedelta(days=29)
    # without the CA's key there is nothing to renew with: a host certificate is used until it expires
    soon, gone = tmp_path / "soon", tmp_path / "gone"
    pki.issue(ca, "host", "a", soon, days=0.5)
    pki.issue(ca, "host", "a", gone, days=1, now=now - dt.timedelta(days=1.5))
    (ca / "admin" / "ca.key").unlink()
    ident, issued = pki.ensure_host(ca, soon, "a")
    assert not issued and ident.not_after - now < dt.timedelta(days=1)
    with pytest.raises(ConfigError, match=r"expired on .* has no ca.key to issue one"):
        pki.ensure_host(ca, gone, "a")


def test_files_have_the_modes_of_what_they_hold(ca, tmp_path):
    assert stat_mode(ca / "admin" / "ca.key") == 0o600 and stat_mode(ca / "admin" / "ca.pem") == 0o644
    pki.issue(ca, "operator", "alice", tmp_path / "op")
    assert stat_mode(tmp_path / "op") == 0o700 and stat_mode(tmp_path / "op" / "key.pem") == 0o600
    assert stat_mode(tmp_path / "op" / "cert.pem") == 0o644 and stat_mode(tmp_path / "op" / "ca.pem") == 0o644


@pytest.mark.parametrize(("name", "ok"), [("a", True), ("n" * 64, True), ("", False), ("n" * 65, False),
                                          ("bad\nname", False), ("tab\tname", False)])
def test_certificate_names_are_1_to_64_printable_characters(name, ok):
    if ok:
        pki.check_name("operator", name)
    else:
        with pytest.raises(ConfigError, match="1-64 printable characters"):
            pki.check_name("operator", name)


def test_files_that_cannot_be_read_or_written_are_one_line_each(ca, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(ConfigError, match=f"^cannot read {tmp_path}/none/cert.pem: No such file or directory$"):
        pki.read_identity(tmp_path / "none")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"^cannot create the admin CA in {tmp_path}/file/admin: Not a directory$"):
        pki.create_admin_ca(tmp_path / "file")
    with pytest.raises(ConfigError, match=f"^cannot write the certificate to {tmp_path}/file/op: Not a directory$"):
        pki.issue(ca, "operator", "x", tmp_path / "file" / "op")
    pki.issue(ca, "operator", "x", tmp_path / "op")
    key = tmp_path / "op" / "key.pem"
    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    unknown = (b"-----BEGIN PRIVATE KEY-----\nMA4CAQAwBQYDKgMEBAIEAA==\n-----END PRIVATE KEY-----\n")  # OID 1.2.3.4
    for data in (b"garbage", encrypted, unknown):
        key.write_bytes(data)
        with pytest.raises(ConfigError, match=f"^{key} is not a PEM private key$"):
            pki.read_identity(tmp_path / "op")
