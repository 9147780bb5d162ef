"""One etcd server on this machine, for tests, the testbed and trying the fleet directory out.

The server is the distribution's `etcd` binary (Debian's `etcd-server` package), started with a
temporary data folder on one address; it is single-member and keeps nothing after `stop`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from constmig.errors import ConfigError
from constmig.host import daemon

READY_TIMEOUT_S = 20.0


def etcd_binary() -> str | None:
    return shutil.which("etcd")


class LocalEtcd:
    """`with LocalEtcd() as e: e.url` — an etcd on `host` (loopback by default) until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, peer_port: int = 0,
                 data_dir: Path | None = None) -> None:
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
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalEtcd:
        client, peer = self.url, f"http://{self.host}:{self.peer_port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = daemon.start("etcd", [
                self.binary, "--name", "constmig", "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"constmig={peer}", "--log-level", "warn"],
                self.data_dir / "etcd.log", f"{client}/version", READY_TIMEOUT_S, 0.05)
        except ConfigError:
            self.stop()
            raise
        return self

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
