"""One etcd server on this machine, for tests, the testbed and trying the fleet directory out.

The server is the distribution's `etcd` binary (Debian's `etcd-server` package), started with a
temporary data folder on one address; it is single-member and keeps nothing after `stop`. It can serve
its clients over TLS (and ask them for a certificate) and turn on etcd's users, as a production store
would (docs/fleet.md, "A store with TLS and users").
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from constmig.errors import ConfigError
from constmig.host import daemon
from constmig.host.etcd_auth import EtcdCredentials

READY_TIMEOUT_S = 20.0


def etcd_binary() -> str | None:
    return shutil.which("etcd")


@dataclass(frozen=True)
class ServerTls:
    """The store's own certificate and key (PEM; its names must cover the address clients use) and, to
    require client certificates, the CA they must come from."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class LocalEtcd:
    """`with LocalEtcd() as e: e.url` — an etcd on `host` (loopback by default) until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, peer_port: int = 0,
                 data_dir: Path | None = None, tls: ServerTls | None = None) -> None:
        from constmig.host.cluster import free_port

        binary = etcd_binary()
        if binary is None:
            raise ConfigError("no etcd binary on PATH: install the distribution's etcd-server package "
                              "(apt-get install etcd-server)")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="constmig-etcd-")) if data_dir is None else data_dir
        self.tls = tls
        self.metrics_port = free_port(host) if tls else 0  # plain HTTP /health: readiness without a client certificate
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> LocalEtcd:
        client, peer = self.url, f"http://{self.host}:{self.peer_port}"
        ready = f"{client}/version"
        tls: list[str] = []
        if self.tls is not None:
            ready = f"http://{self.host}:{self.metrics_port}/health"
            tls = ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                   "--listen-metrics-urls", ready.removesuffix("/health")]
            if self.tls.client_ca is not None:
                tls += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.client_ca)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = daemon.start("etcd", [
                self.binary, "--name", "constmig", "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"constmig={peer}", "--log-level", "warn", *tls],
                self.data_dir / "etcd.log", ready, READY_TIMEOUT_S, 0.05)
        except ConfigError:
            self.stop()
            raise
        return self

    def enable_auth(self, users: Mapping[str, str], prefix: str = "/constmig/",
                    credentials: EtcdCredentials | None = None) -> None:
        """Turn on etcd's users: `root` (a random password, unused here) and each of `users` (name ->
        password), who may read and write under `prefix` and nothing else. `credentials`: this client's
        TLS files, for a store that requires a client certificate."""
        from aetcd import rpc

        from constmig.host import etcd_auth

        creds = EtcdCredentials(*(credentials.ca, credentials.cert, credentials.key) if credentials else ())
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # etcd's range end: every key that starts with prefix

        async def enable() -> None:
            c = etcd_auth.client(self.host, self.port, 10.0, creds, self.tls is not None)
            try:
                await c.connect()
                auth = rpc.AuthStub(c.channel)
                await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=secrets.token_hex(16)))
                await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
                await auth.RoleAdd(rpc.AuthRoleAddRequest(name="constmig"))
                await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="constmig", perm=rpc.Permission(
                    permType=rpc.Permission.READWRITE, key=prefix.encode(), range_end=end.encode())))
                for name, password in users.items():
                    await auth.UserAdd(rpc.AuthUserAddRequest(name=name, password=password))
                    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=name, role="constmig"))
                await auth.AuthEnable(rpc.AuthEnableRequest())
            finally:
                await c.close()

        asyncio.run(enable())

    def stop(self) -> None:
        daemon.stop(self.proc)
        self.proc = None
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
