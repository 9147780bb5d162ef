"""The fleet directory on a real etcd that serves only TLS, requires a client certificate from its CA and
has etcd's users turned on: registration and lookups work with the right files and user, and each wrong
setting is one line that says which."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from constmig.errors import ConfigError, DirectoryError
from constmig.host.directory import Directory, blocking
from constmig.host.etcd_auth import ENV, EtcdCredentials
from constmig.host.etcd_server import LocalEtcd, ServerTls, etcd_binary

USER, PASSWORD = "fleet", "s3cret-fleet"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, cn: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway CA: its certificate in folder/ca.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.pem", cert, key


def issue(ca: tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey], folder: Path, cn: str,
          server: bool) -> tuple[Path, Path]:
    """A certificate from `ca` for `cn` (a server's for 127.0.0.1, or a client's): (cert.pem, key.pem)."""
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                                              if server else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    """An etcd with client TLS (certificates required) and users on; yields (url, the right credentials,
    a second CA that signed nothing the store shows, a client certificate named after the user)."""
    if etcd_binary() is None:
        pytest.skip("no etcd binary (apt-get install etcd-server): the fleet directory tests need a real etcd")
    base = tmp_path_factory.mktemp("etcd-tls")
    ca = make_ca(base / "ca", "constmig test etcd CA")
    server_cert, server_key = issue(ca, base / "server", "etcd", server=True)
    client_cert, client_key = issue(ca, base / "client", "constmig-agent", server=False)
    other_ca = make_ca(base / "other-ca", "not the store's CA")[0]
    with LocalEtcd(tls=ServerTls(server_cert, server_key, client_ca=ca[0])) as server:
        creds = EtcdCredentials(ca[0], client_cert, client_key, USER, PASSWORD)
        server.enable_auth({USER: PASSWORD}, credentials=creds)
        as_user = EtcdCredentials(ca[0], *issue(ca, base / "as-user", USER, server=False))
        yield server.url, creds, other_ca, as_user


def with_(creds: EtcdCredentials, **change: object) -> EtcdCredentials:
    return EtcdCredentials(**{**creds.__dict__, **change})


def test_register_and_look_up_through_tls_and_a_user(secured):
    url, creds, _, _ = secured
    assert url.startswith("https://127.0.0.1:")

    async def work(d: Directory) -> None:
        lease = await d.register("10.8.0.1:7001", {"host_id": "t"}, ttl=5)
        assert await d.claim("tls1", "10.8.0.1:7001") is None
        assert await d.locate("tls1") == "10.8.0.1:7001"
        assert (await d.hosts())["10.8.0.1:7001"]["host_id"] == "t"
        await d.deregister(lease)
        assert await d.forget("tls1") == "10.8.0.1:7001"

    async def main() -> None:
        async with Directory(url, credentials=creds) as d:
            await work(d)

    asyncio.run(main())


@pytest.mark.parametrize(("change", "says"), [
    ({"ca": "other"}, "TLS handshake failed (the store's certificate is not signed by the CA in CONSTMIG_ETCD_CA"),
    ({"password": "wrong"}, f"etcd refused user {USER!r}: wrong name or password"),
    ({"user": None, "password": None, "cert": None, "key": None}, "TLS handshake failed (check CONSTMIG_ETCD_CERT"),
])
def test_each_wrong_setting_is_one_line(secured, change, says):
    url, creds, other_ca, _ = secured
    bad = with_(creds, **{k: other_ca if v == "other" else v for k, v in change.items()})

    async def look(d: Directory) -> object:
        return await d.where("tls1")

    async def main() -> None:
        async with Directory(url, credentials=bad, timeout=5) as d:
            await look(d)

    with pytest.raises(DirectoryError) as got:
        asyncio.run(main())
    assert says in str(got.value) and "\n" not in str(got.value), got.value


def test_settings_that_cannot_work_are_refused_before_anything_is_sent(secured):
    url, creds, _, _ = secured
    with pytest.raises(ConfigError, match="are set .* but http://127.0.0.1:1 is not https://"):
        Directory("http://127.0.0.1:1", credentials=creds)
    with pytest.raises(ConfigError, match="needs both CONSTMIG_ETCD_CERT and CONSTMIG_ETCD_KEY"):
        Directory(url, credentials=with_(creds, key=None))
    with pytest.raises(ConfigError, match=f"etcd user '{USER}' has no password: set CONSTMIG_ETCD_PASSWORD"):
        Directory(url, credentials=with_(creds, password=None))


def test_the_cli_reaches_it_with_the_options_and_the_password_from_the_environment(secured, tmp_path):
    url, creds, other_ca, _ = secured
    blocking(url, lambda d: d.claim("tls2", "10.8.0.2:7001"), credentials=creds)  # an agent that is gone
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSTMIG_ETCD")}
    opts = ["--etcd", url, "--etcd-ca", str(creds.ca), "--etcd-cert", str(creds.cert), "--etcd-key",
            str(creds.key), "--etcd-user", USER]

    def cm(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=60,
                              env={**env, **extra}, stdin=subprocess.DEVNULL)

    p = cm("forget", "tls2", *opts[:-2])  # no user, and the certificate names none
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "permission denied to the user the client certificate names: set CONSTMIG_ETCD_USER" in p.stderr, p.stderr
    p = cm("forget", "tls2", *opts, **{ENV["password"]: PASSWORD})
    assert p.returncode == 0 and "forgot tls2 (last at 10.8.0.2:7001" in p.stdout, p.stderr
    p = cm("forget", "tls2", *opts[:2], **{ENV["ca"]: str(other_ca), ENV["cert"]: str(creds.cert),
                                           ENV["key"]: str(creds.key), ENV["user"]: USER, ENV["password"]: PASSWORD})
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "TLS handshake failed" in p.stderr, p.stderr


def test_a_token_the_restarted_store_no_longer_knows_is_renewed(secured, tmp_path):
    url, creds, _, _ = secured
    ca = make_ca(tmp_path / "ca", "restart CA")
    cert, key = issue(ca, tmp_path / "server", "etcd", server=True)
    first = LocalEtcd(data_dir=tmp_path / "data", tls=ServerTls(cert, key)).start()
    ours = EtcdCredentials(ca[0], None, None, USER, PASSWORD)
    again = None
    try:
        first.enable_auth({USER: PASSWORD}, credentials=EtcdCredentials(ca[0]))

        async def main() -> list[str]:
            nonlocal again
            seen = []
            async with Directory(first.url, credentials=ours) as d:
                assert await d.claim("tok", "10.8.0.3:7001") is None  # logged in: a token
                first.stop()  # its simple tokens live in memory only
                again = LocalEtcd(port=first.port, peer_port=first.peer_port, data_dir=first.data_dir,
                                  tls=ServerTls(cert, key)).start()
                for _ in range(2):
                    try:
                        seen.append(str(await d.where("tok")))
                    except DirectoryError as e:
                        seen.append(str(e))
            return seen

        seen = asyncio.run(main())
        assert seen[-1] == "10.8.0.3:7001", seen  # the next request logged in again
        assert all(s == "10.8.0.3:7001" or "the next request logs in again" in s for s in seen), seen
        with pytest.raises(DirectoryError, match="the store requires a user: set CONSTMIG_ETCD_USER and CONSTMIG_ETCD_PA"):
            blocking(first.url, lambda d: d.where("tok"), credentials=EtcdCredentials(ca[0]))  # TLS, but no user
    finally:
        first.stop()
        if again is not None:
            again.stop()


def test_an_agent_joins_with_the_options_and_ls_finds_it(secured, monkeypatch):
    from constmig.host.cluster import LocalCluster

    url, creds, _, _ = secured
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(ENV["password"], PASSWORD)  # the agent's and ls's password, from the environment only
    opts = ["--etcd", url, "--etcd-ca", str(creds.ca), "--etcd-cert", str(creds.cert), "--etcd-key", str(creds.key),
            "--etcd-user", USER]
    with LocalCluster(1, agent_args=opts) as c:
        deadline = time.monotonic() + 10  # its local socket may answer before it has joined
        while c.addrs[0] not in blocking(url, lambda d: d.hosts(), credentials=creds):
            assert time.monotonic() < deadline, (c.base / "agent-a.log").read_text()[-2000:]
            time.sleep(0.1)
        p = subprocess.run([sys.executable, "-m", "constmig", "ls", *opts, "--json"], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and c.addrs[0] in json.loads(p.stdout), p.stderr


def test_a_client_certificate_named_after_a_user_stands_for_it(secured):
    url, _, _, as_user = secured
    assert as_user.user is None and as_user.password is None
    assert blocking(url, lambda d: d.claim("tls3", "10.8.0.4:7001"), credentials=as_user) is None
    assert blocking(url, lambda d: d.where("tls3"), credentials=as_user) == "10.8.0.4:7001"
