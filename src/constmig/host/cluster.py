"""A few agents on this machine as real processes on loopback: what the demo, benchmarks and tests use."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from constmig.client.trust import default_ca_dir
from constmig.errors import AgentError
from constmig.host import client
from constmig.wire import control


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free now (held together while chosen, so agents started at once never share one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


class LocalCluster:
    """N agents (separate processes, state dirs and ports) sharing one root CA in a temp folder."""

    def __init__(self, n: int = 2, base_dir: Path | None = None, host: str = "127.0.0.1",
                 ca_dir: Path | None = None, metrics: bool = False, agent_args: Sequence[str] = ()) -> None:
        self._own_dir = base_dir is None
        self.base = Path(tempfile.mkdtemp(prefix="constmig-")) if base_dir is None else base_dir
        self.base.mkdir(parents=True, exist_ok=True)
        self.ca_dir = ca_dir or default_ca_dir()  # as `constmig agent`; clients find the root there too
        self.procs: list[subprocess.Popen] = []
        self.addrs: list[str] = []
        self.host = host
        self.n = n
        self.metrics = metrics  # each agent serves /metrics on a free port (its status says where)
        self.agent_args = list(agent_args)  # more `constmig agent` options for every agent (e.g. --etcd URL)

    def __enter__(self) -> LocalCluster:
        try:
            ports = free_ports(self.n, self.host)
            for i in range(self.n):  # every agent starts at once (each takes about a second of imports)
                self._spawn(i, f"{self.host}:{ports[i]}")
            for i in range(self.n):
                self._wait_ready(i)
        except BaseException:
            self.close()
            raise
        return self

    def start_agent(self, i: int, addr: str | None = None) -> str:
        """Start (or restart) agent number i; it keeps its state dir and, if given, its address."""
        addr = self._spawn(i, addr)
        self._wait_ready(i)
        return addr

    def _spawn(self, i: int, addr: str | None = None) -> str:
        host_id = chr(ord("a") + i)
        addr = addr or f"{self.host}:{free_port(self.host)}"
        log = open(self.base / f"agent-{host_id}.log", "ab")  # noqa: SIM115 (owned by the child)
        proc = subprocess.Popen(
            [sys.executable, "-m", "constmig", "agent", "--listen", addr, "--state-dir",
             str(self.base / f"host-{host_id}"), "--host-id", host_id, "--ca-dir", str(self.ca_dir),
             *(["--metrics-listen", f"{self.host}:0"] if self.metrics else []), *self.agent_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        if i < len(self.procs):
            self.procs[i], self.addrs[i] = proc, addr
        else:
            self.procs.append(proc)
            self.addrs.append(addr)
        return addr

    def _wait_ready(self, i: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise AgentError(f"agent {i} exited at start; see {self.base}/agent-*.log")
            try:
                client.request(self.addrs[i], control.Status(), timeout=5)
                return
            except AgentError:
                time.sleep(0.05)
        raise AgentError(f"agent {i} did not come up within {timeout:g}s")

    def kill_agent(self, i: int) -> None:
        """SIGKILL an agent and everything it started (its enclaves die with it)."""
        proc = self.procs[i]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        asked = []
        for i, proc in enumerate(self.procs):  # every agent is asked first, then each is waited for
            if proc.poll() is None:
                with contextlib.suppress(AgentError):
                    client.request(self.addrs[i], control.Shutdown(), timeout=5)
                    asked.append(proc)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            if proc in asked:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
