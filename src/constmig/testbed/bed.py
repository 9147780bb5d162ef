"""The Testbed: N hosts in network namespaces with shaped links, an agent in each, and runtime controls.

`up` builds it and starts the agents, `down` removes everything it can find by name (idempotent, and
safe after a half-failed `up`), and the controls (link down/up, loss, rate, kill/restart an agent)
are what reliability tests drive. Any process can attach to a running testbed by name: everything
needed is in its JSON record (state.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constmig.client.trust import default_ca_dir
from constmig.errors import AgentError, AgentUnreachable, ConstmigError
from constmig.host import admin, client
from constmig.testbed import cmd, netns, shaping, state
from constmig.testbed.spec import (
    HostPlan,
    Layout,
    LinkSpec,
    TestbedError,
    check_name,
    format_rate,
    host_index,
    make_layout,
    parse_hosts,
)
from constmig.wire import control

AGENT_READY_TIMEOUT = 60.0


def _alive(pid: int | None) -> bool:
    """True if pid runs (a zombie counts as dead: it is only waiting for its parent to reap it)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def agent_answers(addr: str, timeout: float = 2.0) -> dict[str, Any]:
    """One ping (open to anyone: it crosses the host's link), `timeout` bounding the connect too."""
    try:
        answer = client.request(addr, control.Ping(), timeout=timeout)
    except AgentUnreachable as e:
        raise AgentError(f"agent at {addr} did not answer: {e}") from None
    except (ConstmigError, OSError) as e:
        raise AgentError(f"agent at {addr} refused a ping: {e}") from None
    return control.builtins(control.result(answer, control.PingResult))


def free_subnet(taken: set[int]) -> int:
    """First 10.77.k.0/24 not used by another testbed record nor by any route of the root namespace."""
    p = cmd.run(["ip", "-4", "-o", "route", "show", "table", "all"], check=False)
    nets = []
    for line in p.stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest in ("default", "local", "broadcast", "unreachable", "blackhole", "prohibit"):
            dest = line.split()[1] if len(line.split()) > 1 else ""
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(dest, strict=False))
    for k in range(256):
        cand = ipaddress.ip_network(f"10.77.{k}.0/24")
        if k not in taken and not any(n.prefixlen > 0 and cand.overlaps(n) for n in nets):
            return k
    raise TestbedError("no free subnet in 10.77.0.0/16 for another testbed")


class Testbed:
    """One named testbed. Use as a context manager in tests: `with Testbed("t1", 2, link) as tb: ...`."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, name: str = "tb", hosts: int = 2, link: LinkSpec | None = None,
                 state_dir: Path | str | None = None, ca_dir: Path | str | None = None,
                 etcd: bool = False) -> None:
        self.name = check_name(name)
        self.n = parse_hosts(hosts)
        self.link = link or LinkSpec()
        self.root = state.state_root(state_dir)
        self.dir = state.work_dir(self.name, self.root)
        self.ca_dir = Path(ca_dir) if ca_dir else default_ca_dir()  # where clients find the root too
        self.etcd = etcd  # an etcd in the root namespace, and every agent in its fleet directory
        self.layout: Layout | None = None
        self.record: dict[str, Any] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # processes this object started, to reap them

    # ----- finding a running testbed -----

    @classmethod
    def attach(cls, name: str = "tb", state_dir: Path | str | None = None) -> Testbed:
        """The testbed `up` made earlier (maybe in another process); error if there is none."""
        check_name(name)
        root = state.state_root(state_dir)
        record = state.load(name, root)
        if record is None:
            raise TestbedError(f"testbed {name!r} is not up (no record in {root}); start it with `constmig testbed up`")
        layout = Layout.from_json(record["layout"])
        bed = cls(name, len(layout.hosts), layout.hosts[0].link if layout.hosts else None, root,
                  record.get("ca_dir"), bool(record.get("etcd_url")))
        bed.layout, bed.record = layout, record
        return bed

    def _require_layout(self) -> Layout:
        if self.layout is None:
            raise TestbedError(f"testbed {self.name!r} is not up")
        return self.layout

    def host(self, host: str | int) -> HostPlan:
        layout = self._require_layout()
        i = host if isinstance(host, int) else host_index(host, len(layout.hosts))
        if not 0 <= i < len(layout.hosts):
            raise TestbedError(f"unknown host {host!r}: this testbed has {len(layout.hosts)} hosts")
        return layout.hosts[i]

    @property
    def addrs(self) -> list[str]:
        """Agent addresses as everyone (root namespace and other hosts) should use them."""
        return [h.addr for h in self._require_layout().hosts]

    def addr(self, host: str | int) -> str:
        return self.host(host).addr

    # ----- up -----

    def exists(self) -> bool:
        """Any trace of this name: a record, a namespace or the root link."""
        prefix = f"cmtb-{self.name}-"
        return (state.state_file(self.name, self.root).exists()
                or any(ns.startswith(prefix) for ns in cmd.list_netns())
                or cmd.link_exists(f"cmtb-{self.name}"))

    def up(self, timeout: float = AGENT_READY_TIMEOUT) -> Testbed:
        """Build namespaces, links and shaping, start relays and agents, wait until every agent answers."""
        cmd.preflight(need_nft=self.link.loss_pct > 0)
        if self.exists():
            raise TestbedError(f"testbed {self.name!r} is already up (or left over): "
                               f"run `constmig testbed down --name {self.name}` first")
        index = free_subnet(state.used_subnets(self.root))
        self.layout = layout = make_layout(self.name, self.n, self.link, index)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record = {"name": self.name, "status": "starting", "created": time.time(),
                       "layout": layout.to_json(), "dir": str(self.dir), "ca_dir": str(self.ca_dir),
                       "switch_ns": layout.switch_ns, "root_iface": layout.root_iface,
                       "root_ip": layout.root_ip, "subnet": str(layout.network), "procs": {}}
        self._save()
        try:
            cmd.run_all(netns.switch_cmds(layout))
            for h in layout.hosts:
                cmd.run_all(netns.host_cmds(layout, h))
                cmd.run_all(shaping.rate_cmds(layout, h))
                if h.link.loss_pct > 0:
                    cmd.run(shaping.loss_cmd(layout), input=shaping.loss_ruleset(h, h.link.loss_pct))
            for h in layout.hosts:
                if h.relayed:
                    self._start_relay(h)
            if self.etcd:
                self._start_etcd(layout)
            # The first agent creates the root CA; the others start once it exists, together.
            self._start_agent(layout.hosts[0])
            self._wait_ready(layout.hosts[:1], timeout)
            for h in layout.hosts[1:]:
                self._start_agent(h)
            self._wait_ready(layout.hosts[1:], timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        self.record["status"] = "up"
        self._save()
        return self

    def _save(self) -> None:
        state.save(self.name, self.root, self.record)

    def _procs(self, h: HostPlan) -> dict[str, Any]:
        return self.record.setdefault("procs", {}).setdefault(h.id, {})

    def _spawn(self, h: HostPlan, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> int:
        log_path = self.dir / log_name
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([*netns.exec_prefix(h.ns), *argv], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True,
                                    env=None if env is None else {**os.environ, **env})
        self._children[proc.pid] = proc
        return proc.pid

    def relay_argv(self, h: HostPlan) -> list[str]:
        return [sys.executable, "-m", "constmig.testbed.relay", "--listen", h.addr, "--target", h.agent_listen,
                "--delay", repr(h.link.delay_s)]

    def agent_argv(self, h: HostPlan) -> list[str]:
        etcd = ["--etcd", self.record["etcd_url"], "--etcd-ttl", "3"] if self.record.get("etcd_url") else []
        return [sys.executable, "-m", "constmig", "agent", "--listen", h.agent_listen, "--state-dir",
                str(self.dir / f"host-{h.id}"), "--host-id", h.id, "--ca-dir", str(self.ca_dir), *etcd]

    @property
    def etcd_url(self) -> str | None:
        """The fleet directory's address (reachable from every host and the root namespace), if any."""
        return self.record.get("etcd_url")

    def _start_etcd(self, layout: Layout) -> None:
        """etcd in the root namespace on the controller's address: the hosts reach it over the bridge."""
        from constmig.host.cluster import free_port
        from constmig.host.etcd_server import LocalEtcd

        server = LocalEtcd(layout.root_ip, free_port(), free_port(), data_dir=self.dir / "etcd").start()
        assert server.proc is not None
        self._children[server.proc.pid] = server.proc
        self.record["etcd_url"], self.record["etcd_pid"] = server.url, server.proc.pid
        self._save()

    def _start_relay(self, h: HostPlan) -> None:
        self._procs(h)["relay_pid"] = self._spawn(h, self.relay_argv(h), f"relay-{h.id}.log")
        self._save()

    def _start_agent(self, h: HostPlan) -> None:
        # An agent lists its socket under its own namespace's address: in this testbed's folder, gone with it.
        self._procs(h)["agent_pid"] = self._spawn(h, self.agent_argv(h), f"agent-{h.id}.log",
                                                  {"CONSTMIG_AGENTS_DIR": str(self.dir / "agents")})
        self._procs(h)["agent_log"] = str(self.dir / f"agent-{h.id}.log")
        self._save()

    def _admin_socket(self, h: HostPlan) -> Path:
        return admin.socket_path(self.dir / f"host-{h.id}")

    def _wait_ready(self, hosts: Sequence[HostPlan], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for h in hosts:
            procs = self._procs(h)
            while True:
                for key in ("agent_pid", "relay_pid"):
                    if key in procs and not _alive(procs[key]):
                        what = key.split("_")[0]
                        raise TestbedError(f"{what} of host {h.id} exited at start: {self._log_tail(h, what)}")
                try:
                    agent_answers(h.addr, timeout=5)
                    # Admin requests from this machine (root) reach the agent through its socket (bound
                    # before it answers), listed under the address everyone uses.
                    admin.register(h.addr, self._admin_socket(h))
                    break
                except AgentError as e:
                    if time.monotonic() > deadline:
                        raise TestbedError(f"agent of host {h.id} did not answer at {h.addr} "
                                           f"within {timeout:g}s: {e}") from None
                    time.sleep(0.05)

    def _log_tail(self, h: HostPlan, what: str) -> str:
        try:
            lines = [ln for ln in (self.dir / f"{what}-{h.id}.log").read_text().splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1].strip() if lines else "(no output)"

    # ----- down -----

    def down(self) -> list[str]:
        """Kill every process in the testbed's namespaces, delete them and the root link, drop the record.

        Works from names alone (cmtb-NAME-*), so it also cleans up after a crashed or half-done `up`;
        running it twice is harmless. Returns what it removed.
        """
        cmd.require_root()
        cmd.require_tools("ip")
        removed: list[str] = []
        record = self.record or state.load(self.name, self.root) or {}
        etcd_pid = record.get("etcd_pid")
        with contextlib.suppress(ConstmigError, KeyError, TypeError, ValueError):
            for h in Layout.from_json(record["layout"]).hosts:
                admin.unregister(h.addr, self._admin_socket(h))
        if _alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
            self._await_exit([etcd_pid])
            removed.append("etcd")
        prefix = f"cmtb-{self.name}-"
        spaces = [ns for ns in cmd.list_netns() if ns.startswith(prefix)]
        pids = [pid for ns in spaces for pid in cmd.netns_pids(ns)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._await_exit(pids)
        if pids:
            removed.append(f"{len(pids)} processes")
        root_iface = f"cmtb-{self.name}"
        if cmd.link_exists(root_iface):
            cmd.run(netns.delete_link_cmd(root_iface), check=False)
            removed.append(f"link {root_iface}")
        for ns in spaces:  # its veths (and their peers) and nft tables go with it
            cmd.run(netns.delete_ns_cmd(ns), check=False)
            removed.append(f"netns {ns}")
        if state.state_file(self.name, self.root).exists():
            state.remove(self.name, self.root)
            removed.append("record")
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.layout, self.record = None, {}
        return removed

    def _await_exit(self, pids: Sequence[int], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for pid in pids:
            child = self._children.pop(pid, None)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(max(0.1, deadline - time.monotonic()))
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)

    # ----- use -----

    def env(self) -> dict[str, str]:
        """What `testbed run` adds to a command's environment."""
        layout = self._require_layout()
        out = {"CONSTMIG_TESTBED_NAME": self.name, "CONSTMIG_TESTBED_HOSTS": ",".join(self.addrs),
               "CONSTMIG_TESTBED_STATE": str(state.state_file(self.name, self.root)),
               "CONSTMIG_CA_DIR": str(self.ca_dir), **({"CONSTMIG_ETCD": self.etcd_url} if self.etcd_url else {})}
        for h in layout.hosts:
            out[f"CONSTMIG_HOST_{h.id.upper()}"] = h.addr
        return out

    def run(self, argv: Sequence[str], timeout: float | None = None) -> int:
        """Run a command from the root namespace (it reaches the hosts over its own link) with env() set."""
        if not argv:
            raise TestbedError("nothing to run: give a command after --")
        try:
            return subprocess.run(list(argv), env={**os.environ, **self.env()}, timeout=timeout).returncode
        except FileNotFoundError:
            raise TestbedError(f"command not found: {argv[0]}") from None
        except PermissionError:
            raise TestbedError(f"cannot execute {argv[0]}: permission denied") from None

    def exec_in(self, host: str | int, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside a host's namespace (subprocess.run keyword arguments pass through)."""
        return subprocess.run([*netns.exec_prefix(self.host(host).ns), *argv], check=False, **kwargs)

    def popen_in(self, host: str | int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen([*netns.exec_prefix(self.host(host).ns), *argv], **kwargs)

    def status(self) -> dict[str, Any]:
        """Hosts, addresses, link settings and liveness as seen right now."""
        layout = self._require_layout()
        hosts = []
        for h in layout.hosts:
            procs = self.record.get("procs", {}).get(h.id, {})
            link_up = self._link_is_up(h)
            answers = False
            if _alive(procs.get("agent_pid")):
                try:
                    agent_answers(h.addr, timeout=2)
                    answers = True
                except AgentError:
                    answers = False
            hosts.append({"id": h.id, "ns": h.ns, "addr": h.addr, "agent_listen": h.agent_listen,
                          "agent_pid": procs.get("agent_pid"), "agent_alive": _alive(procs.get("agent_pid")),
                          "agent_answers": answers, "relay_pid": procs.get("relay_pid"),
                          "relay_alive": _alive(procs.get("relay_pid")) if h.relayed else None,
                          "link_up": link_up, "rate": format_rate(h.link.rate_bps), "rate_bps": h.link.rate_bps,
                          "delay_ms": h.link.delay_s * 1e3, "loss_pct": h.link.loss_pct})
        return {"name": self.name, "status": self.record.get("status"), "subnet": str(layout.network),
                "controller": layout.root_ip, "switch_ns": layout.switch_ns, "dir": str(self.dir),
                "etcd": self.etcd_url, "etcd_alive": _alive(self.record.get("etcd_pid")) if self.etcd_url else None,
                "hosts": hosts}

    def _link_is_up(self, h: HostPlan) -> bool:
        p = cmd.run(["ip", "-n", self._require_layout().switch_ns, "-o", "link", "show", "dev", h.switch_port],
                    check=False)
        flags = p.stdout.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in p.stdout else []
        return "UP" in flags

    # ----- runtime controls (for reliability tests) -----

    def link_down(self, host: str | int) -> None:
        """Unplug a host: its switch port goes down, so packets to and from it are lost until link_up."""
        h = self.host(host)
        cmd.run(netns.link_state_cmd(self._require_layout(), h, up=False))

    def link_up(self, host: str | int) -> None:
        h = self.host(host)
        cmd.run(netns.link_state_cmd(self._require_layout(), h, up=True))

    def set_loss(self, host: str | int, loss_pct: float) -> None:
        """Replace a host's loss (each direction of its link); 0 removes the rule."""
        h = self.host(host)
        if not 0 <= loss_pct <= 100:
            raise TestbedError(f"loss {loss_pct:g}% out of range: use 0% to 100%")
        if loss_pct > 0 or h.link.loss_pct > 0:
            cmd.require_tools("nft")
            cmd.run(shaping.loss_cmd(self._require_layout()), input=shaping.loss_ruleset(h, loss_pct))
        h.link.loss_pct = loss_pct
        self._save_layout()

    def set_rate(self, host: str | int, rate_bps: int) -> None:
        """Change a host's rate in both directions (tbf replaced in place; connections survive)."""
        h = self.host(host)
        h.link.rate_bps = rate_bps
        cmd.run_all(shaping.rate_cmds(self._require_layout(), h))
        self._save_layout()

    def kill_agent(self, host: str | int) -> None:
        """SIGKILL a host's agent and its process group (its enclaves die with it); the relay stays."""
        h = self.host(host)
        pid = self._procs(h).get("agent_pid")
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._await_exit([pid])

    def restart_agent(self, host: str | int, timeout: float = AGENT_READY_TIMEOUT) -> None:
        """Kill the agent if it runs, start a new one with the same state folder and address, wait for it."""
        h = self.host(host)
        self.kill_agent(h.id)
        self._start_agent(h)
        self._wait_ready([h], timeout)

    def _save_layout(self) -> None:
        self.record["layout"] = self._require_layout().to_json()
        self._save()

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
