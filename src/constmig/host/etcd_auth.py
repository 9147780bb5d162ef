"""How a constmig process reaches a store that asks for TLS and a user: etcd's own client TLS (a CA to
check the store, a client certificate if the store asks for one) and etcd's users (a name and password).

The directory is routing, not security (host/directory.py): whoever holds the store can misroute, never
fork. What TLS and a user buy is availability against everyone else: only holders of a client certificate
the store trusts, or of a user's password, can read or write the fleet's keys (`forget` among them).

One source for every process: the environment (`CONSTMIG_ETCD_CA`, `_CERT`, `_KEY`, `_USER`,
`_PASSWORD`), which the `--etcd-*` options of every command set for the process they run in, so an agent,
the CLI and the clients they start use the same credentials. The password has no option: a command line
is visible to every user of the machine (`ps`).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constmig.errors import ConfigError

# gRPC's core logs TLS failures on stderr by itself; the one line of DirectoryError says it (unless asked)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

ENV = {"ca": "CONSTMIG_ETCD_CA", "cert": "CONSTMIG_ETCD_CERT", "key": "CONSTMIG_ETCD_KEY",
       "user": "CONSTMIG_ETCD_USER", "password": "CONSTMIG_ETCD_PASSWORD"}


@dataclass(frozen=True)
class EtcdCredentials:
    """TLS files (PEM) and an etcd user; every field optional."""

    ca: Path | None = None  # the CA that signed the store's certificate (None: the system's roots)
    cert: Path | None = None  # this client's certificate, for a store run with --client-cert-auth
    key: Path | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> EtcdCredentials:
        got = {field: environ.get(var) or None for field, var in ENV.items()}
        return cls(*(Path(got[f]) if got[f] else None for f in ("ca", "cert", "key")), got["user"], got["password"])

    @property
    def tls_files(self) -> bool:
        return any((self.ca, self.cert, self.key))

    def check(self, tls: bool, url: str) -> None:
        """One line for a combination that cannot work, before anything is sent."""
        if self.tls_files and not tls:
            raise ConfigError(f"etcd TLS files are set ({', '.join(ENV[f] for f in ('ca', 'cert', 'key') if getattr(self, f))}"
                              f") but {url} is not https://: use https://HOST:PORT")
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"an etcd client certificate needs both {ENV['cert']} and {ENV['key']} (--etcd-cert, "
                              "--etcd-key)")
        if self.user and self.password is None:
            raise ConfigError(f"etcd user {self.user!r} has no password: set {ENV['password']}")
        if self.password is not None and not self.user:
            raise ConfigError(f"{ENV['password']} is set but no etcd user: set {ENV['user']} (or --etcd-user)")

    def channel(self) -> Any:
        """gRPC channel credentials for an https:// store."""
        import grpc

        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read the etcd {what} {path}: {e.strerror or e}") from None

        return grpc.ssl_channel_credentials(read(self.ca, "CA"), read(self.key, "client key"),
                                            read(self.cert, "client certificate"))


def why(url: str, creds: EtcdCredentials, kind: str, details: str) -> str:
    """The store's refusal or a failed connection as one line (what went wrong, and which setting to check)."""
    low = details.lower()
    if any(w in low for w in ("ssl", "handshake", "certificate", "tls", "tsi_", "unwrap failed")):
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return (f"fleet directory at {url}: TLS handshake failed (the store's certificate is not signed by "
                    f"the CA in {ENV['ca']} / --etcd-ca: {creds.ca or 'the system roots'})")
        return (f"fleet directory at {url}: TLS handshake failed (check {ENV['cert']}/{ENV['key']}, --etcd-cert/"
                f"--etcd-key: the store refused {'the client certificate ' + str(creds.cert) if creds.cert else 'to talk without a client certificate'})")
    if "invalid user id or password" in low or "authentication failed" in low:
        return f"fleet directory at {url}: etcd refused user {creds.user!r}: wrong name or password"
    if "user name is empty" in low or "user name not found" in low:
        return (f"fleet directory at {url}: the store requires a user: set {ENV['user']} and {ENV['password']} "
                "(or a client certificate whose common name is an etcd user)")
    if "invalid auth token" in low:
        return f"fleet directory at {url}: the store no longer knows this login (it restarted?); the next request logs in again"
    if "permission denied" in low and creds.user:
        return (f"fleet directory at {url}: etcd user {creds.user!r} may not do this (permission denied): grant "
                "it readwrite on the fleet's prefix (/constmig/)")
    if "permission denied" in low:  # etcd took the client certificate's common name for the user
        return (f"fleet directory at {url}: permission denied to the user the client certificate names: set "
                f"{ENV['user']} and {ENV['password']}, or grant that user readwrite on /constmig/")
    if kind == "ConnectionFailedError":
        return f"fleet directory at {url}: unreachable"
    if kind == "ConnectionTimeoutError":
        return f"fleet directory at {url}: did not answer in time"
    return f"fleet directory at {url}: {kind}: {details}"


def client(host: str, port: int, timeout: float, creds: EtcdCredentials, tls: bool) -> Any:
    """An aetcd client: plain gRPC for http://, TLS for https://; an etcd user's token either way."""
    import aetcd

    options = {"grpc.enable_http_proxy": 0}  # a proxy from the environment would carry gRPC through it
    if not tls:
        return aetcd.Client(host, port, creds.user, creds.password, timeout=timeout, options=options)
    return _tls_client()(host, port, creds.user, creds.password, timeout=timeout, options=options,
                         channel_credentials=creds.channel())


@functools.cache
def _tls_client() -> type:
    """aetcd's Client over a TLS channel. aetcd (1.0.0) always opens an insecure channel, so this is its
    `connect` with `secure_channel` in its place; every request goes through `connect` first."""
    import aetcd
    from aetcd import rpc, watcher
    from aetcd.client import _handle_errors

    class TlsClient(aetcd.Client):  # type: ignore[misc]
        def __init__(self, *args: Any, channel_credentials: Any, **kwargs: Any) -> None:
            self._channel_credentials = channel_credentials
            super().__init__(*args, **kwargs)

        @_handle_errors
        async def connect(self) -> None:
            if self._connected.is_set():
                return
            if self._is_connecting:
                await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
                return
            try:
                self._is_connecting = True
                self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._channel_credentials,
                                                  options=self._options.items())
                if self._username is not None and self._password is not None:
                    self.auth_stub = rpc.AuthStub(self.channel)
                    resp = await self.auth_stub.Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                    self.metadata = (("token", resp.token),)
                self.kvstub = rpc.KVStub(self.channel)
                self.clusterstub = rpc.ClusterStub(self.channel)
                self.leasestub = rpc.LeaseStub(self.channel)
                self.maintenancestub = rpc.MaintenanceStub(self.channel)
                self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                                metadata=self.metadata)
                self._connected.set()
            finally:
                self._is_connecting = False

    return TlsClient
