"""Names that do not get stuck: an agent killed with SIGKILL leaves its enclaves in the fleet directory.
`ls` lists them as dead with the commands that bring them back (run here exactly as printed), `forget`
frees a name once its agent is gone (refused while it lives), and the untrusted host, which holds etcd,
the agents and every printed command, cannot use a forgotten name to get two copies of one instance."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constmig.host.client import request
from constmig.host.cluster import LocalCluster
from constmig.host.directory import blocking
from constmig.host.orchestrate import launch_filled

pytestmark = pytest.mark.e2e


def cm(*args: str, known: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"CONSTMIG_KNOWN_ENCLAVES": str(known)} if known else {})}
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=env)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def wait_gone(url: str, addr: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while addr in blocking(url, lambda d: d.hosts()):
        assert time.monotonic() < deadline, f"{addr} still in the directory"
        time.sleep(0.1)


def start_as_printed(line: str, log: Path) -> subprocess.Popen:
    """Start the agent command `ls` printed, word for word (`constmig` is this interpreter's)."""
    words = shlex.split(line)
    assert words[:2] == ["constmig", "agent"], line
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "constmig", *words[1:]], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    addr = words[words.index("--listen") + 1]
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            request(addr, {"op": "status"}, timeout=5)
            return proc
        except Exception:  # noqa: BLE001 (not up yet)
            assert time.monotonic() < deadline
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_dead_agents_names_come_back_by_the_printed_advice_or_are_forgotten_never_forked(etcd_url, tmp_path):
    mine, other = tmp_path / "mine.json", tmp_path / "other.json"  # two clients' pins
    with LocalCluster(2, agent_args=["--etcd", etcd_url, "--etcd-ttl", "2"]) as c:
        a, b = c.addrs
        launch_filled(a, "kv2", "kvstore", 16 << 20, 0.5, seed=2)
        assert cm("trust", "kv2", "--etcd", etcd_url, known=mine).returncode == 0  # pins this instance
        assert cm("call", "kv2", "--etcd", etcd_url, "put", "k1", "v1", known=mine).returncode == 0
        assert cm("checkpoint", "kv2", "--agent", a).returncode == 0
        err = one_line_error(cm("forget", "kv2", "--etcd", etcd_url))  # its agent lives: stop it there
        assert f"runs at {a}, whose agent is alive: stop it there (constmig stop kv2 --agent {a})" in err

        # 1. SIGKILL: kv2 is listed as dead, with the commands that bring it back; they work as printed.
        c.kill_agent(0)
        wait_gone(etcd_url, a)
        err = one_line_error(cm("call", "kv2", "--etcd", etcd_url, "get", "k1", known=mine))
        assert "restore it elsewhere" not in err and f"constmig ls --etcd {etcd_url}" in err
        ls = cm("ls", "--etcd", etcd_url)
        assert ls.returncode == 0, ls.stderr
        row = next(line for line in ls.stdout.splitlines() if "kv2" in line and "│" in line)
        assert "dead" in row and a in row, ls.stdout
        agent_line = next(line.strip() for line in ls.stdout.splitlines() if line.strip().startswith("constmig agent"))
        restore_line = next(line.strip()[len("then: "):] for line in ls.stdout.splitlines()
                            if line.strip().startswith("then: constmig restore"))
        assert f"--listen {a} " in agent_line and "kv2.v1.ckpt" in restore_line, ls.stdout
        back = start_as_printed(agent_line, tmp_path / "a-again.log")
        try:
            p = cm(*shlex.split(restore_line)[1:])
            assert p.returncode == 0, p.stderr
            p = cm("call", "kv2", "--etcd", etcd_url, "get", "k1", known=mine)
            assert p.returncode == 0 and p.stdout.strip() == "v1", p.stderr  # the pinned instance, with its data
            assert "dead" not in cm("ls", "--etcd", etcd_url).stdout

            # 2. Stopped (SIGTERM: a final checkpoint, recorded, and out of the directory at once); this time
            #    the operator gives the name up and runs a new kv2 on B.
            os.kill(back.pid, signal.SIGTERM)
            back.wait(60)
            wait_gone(etcd_url, a, 1.0)
        finally:
            stop(back)
        doc = json.loads(cm("ls", "--etcd", etcd_url, "--json").stdout)
        ckpt = Path(doc["dead"]["kv2"]["checkpoint"])
        assert ckpt.name == "kv2.v2.ckpt" and ckpt.exists(), doc
        p = cm("forget", "kv2", "--etcd", etcd_url)
        assert p.returncode == 0 and f"forgot kv2 (last at {a}" in p.stdout, p.stderr
        doc = json.loads(cm("ls", "--etcd", etcd_url, "--json").stdout)
        assert doc["dead"] == {} and "kv2" not in doc[b]["enclaves"]
        one_line_error(cm("forget", "kv2", "--etcd", etcd_url))  # nothing left to forget
        p = cm("run", "kvstore", "--agent", b, "--heap", "16M", "--name", "kv2")
        assert p.returncode == 0, p.stderr
        assert cm("trust", "kv2", "--etcd", etcd_url, known=other).returncode == 0  # another client pins the new one
        # The client pinned to the old instance is not served by the new one, though the name is the same.
        err = one_line_error(cm("call", "kv2", "--etcd", etcd_url, "get", "k1", known=mine))
        assert "is another instance of the pinned code" in err

        # 3. The host plays every card it holds. A's agent comes back with the old instance's checkpoint:
        back = start_as_printed(agent_line, tmp_path / "a-third.log")
        try:
            err = one_line_error(cm("restore", str(ckpt), "--agent", a, "--name", "kv2"))  # the name is B's
            assert f"the fleet directory says an enclave named 'kv2' runs at {b}" in err
            # The store is the host's: it points kv2 at a dead address, and A restores the old instance
            # under the name. Two enclaves answer to "kv2" now, each only as the instance it is.
            assert blocking(etcd_url, lambda d: d.release("kv2", b))
            p = cm("restore", str(ckpt), "--agent", a, "--name", "kv2")
            assert p.returncode == 0, p.stderr
            p = cm("call", "kv2", "--etcd", etcd_url, "get", "k1", known=mine)
            assert p.returncode == 0 and p.stdout.strip() == "v1", p.stderr  # the one copy of the old instance
            err = one_line_error(cm("call", "kv2", "--etcd", etcd_url, "get", "k1", known=other))
            assert "is another instance of the pinned code" in err  # the new one's client is not served by it
            # No second copy of the old instance: not beside it on A, not on B (sealed to A's platform).
            err = one_line_error(cm("restore", str(ckpt), "--agent", a, "--name", "kv2b"))
            assert "another instance of this enclave still runs on this platform" in err
            err = one_line_error(cm("restore", str(ckpt), "--agent", b, "--name", "kv2c"))
            assert "no persistent state on this platform" in err
            p = cm("call", "kv2", "--agent", b, "get", "k1", known=other)
            assert p.returncode == 0 and "v1" not in p.stdout, p.stderr  # B's kv2 is the new, empty instance
        finally:
            stop(back)
