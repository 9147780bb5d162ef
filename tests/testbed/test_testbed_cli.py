"""`constmig testbed ...` as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tb_helpers import needs_netns, unique_name


def cm(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def assert_one_line_error(p: subprocess.CompletedProcess, fragment: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert fragment in p.stderr, p.stderr


@pytest.mark.parametrize("args,fragment", [
    (["up", "--hosts", "0"], "bad --hosts '0'"),
    (["up", "--hosts", "many"], "bad --hosts 'many'"),
    (["up", "--link", "fast"], "malformed rate 'fast'"),
    (["up", "--delay", "5 parsecs"], "malformed delay"),
    (["up", "--loss", "120%"], "loss '120%' out of range"),
    (["up", "--name", "Bad_Name"], "bad testbed name"),
    (["status", "--name", "nosuch"], "testbed 'nosuch' is not up"),
    (["run", "--name", "nosuch", "--", "true"], "testbed 'nosuch' is not up"),
    (["set-loss", "a", "lots"], "malformed loss"),
    (["set-rate", "a", "warp9"], "malformed rate"),
])
def test_bad_input_is_one_line(args, fragment, tmp_path):
    assert_one_line_error(cm("testbed", *args, "--state-dir", str(tmp_path)), fragment)


def test_missing_ip_tool_or_root_is_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no ip, tc or nft to be found
    p = cm("testbed", "up", "--name", "nopath", "--state-dir", str(tmp_path), env=env)
    assert_one_line_error(p, "`ip` not found (install the iproute2 package" if os.geteuid() == 0 else "needs root")


@pytest.mark.root
@pytest.mark.e2e
@pytest.mark.reliability
@needs_netns
def test_up_status_run_down(tmp_path):
    name, sd = unique_name("tc"), str(tmp_path)
    p = cm("testbed", "up", "--hosts", "2", "--link", "100mbit", "--delay", "1ms", "--name", name,
           "--state-dir", sd)
    try:
        assert p.returncode == 0, p.stderr
        assert "CONSTMIG_TESTBED_HOSTS=10.77." in p.stdout and p.stdout.count("agent answering") == 2
        assert_one_line_error(cm("testbed", "up", "--name", name, "--state-dir", sd), "already up")

        st = json.loads(cm("testbed", "status", "--json", "--name", name, "--state-dir", sd).stdout)
        assert [h["id"] for h in st["hosts"]] == ["a", "b"]
        assert all(h["agent_answers"] and h["rate"] == "100mbit" and h["delay_ms"] == 1 for h in st["hosts"])

        # The command runs in the root namespace and reaches the agents with the constmig CLI itself.
        script = ("import os, subprocess, sys; "
                  "a = os.environ['CONSTMIG_HOST_A']; assert os.environ['CONSTMIG_TESTBED_HOSTS'].startswith(a); "
                  "sys.exit(subprocess.run([sys.executable, '-m', 'constmig', 'status', '--json', '--agent', a]).returncode)")
        p = cm("testbed", "run", "--name", name, "--state-dir", sd, "--", sys.executable, "-c", script)
        assert p.returncode == 0, p.stderr
        assert '"host_id": "a"' in p.stdout
        assert cm("testbed", "run", "--name", name, "--state-dir", sd, "--", "sh", "-c", "exit 7").returncode == 7

        assert cm("testbed", "link", "down", "b", "--name", name, "--state-dir", sd).returncode == 0
        assert "link DOWN" in cm("testbed", "status", "--name", name, "--state-dir", sd).stdout
        assert cm("testbed", "link", "up", "b", "--name", name, "--state-dir", sd).returncode == 0
        assert_one_line_error(cm("testbed", "kill-agent", "q", "--name", name, "--state-dir", sd), "unknown host")
        assert cm("testbed", "kill-agent", "b", "--name", name, "--state-dir", sd).returncode == 0
        assert "agent dead" in cm("testbed", "status", "--name", name, "--state-dir", sd).stdout
        p = cm("testbed", "restart-agent", "b", "--name", name, "--state-dir", sd)
        assert p.returncode == 0 and "agent answering" in p.stdout, p.stderr
    finally:
        p = cm("testbed", "down", "--name", name, "--state-dir", sd)
    assert p.returncode == 0 and f"netns cmtb-{name}-a" in p.stdout, p.stderr
    p = cm("testbed", "down", "--name", name, "--state-dir", sd)
    assert p.returncode == 0 and "nothing to remove" in p.stdout
    assert f"cmtb-{name}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.reliability
@needs_netns
@pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd binary (apt-get install etcd-server)")
def test_up_with_etcd_lists_every_agent_in_the_directory_and_down_stops_it(tmp_path):
    name, sd = unique_name("td"), str(tmp_path)
    p = cm("testbed", "up", "--hosts", "2", "--etcd", "--name", name, "--state-dir", sd)
    try:
        assert p.returncode == 0, p.stderr
        assert "fleet directory: etcd at http://10.77." in p.stdout and "(alive)" in p.stdout
        st = json.loads(cm("testbed", "status", "--json", "--name", name, "--state-dir", sd).stdout)
        url = st["etcd"]
        # From the root namespace, with the testbed's environment: ls finds both agents through etcd.
        p = cm("testbed", "run", "--name", name, "--state-dir", sd, "--", sys.executable, "-m", "constmig", "ls",
               "--json")
        assert p.returncode == 0, p.stderr
        assert set(json.loads(p.stdout)) == {h["addr"] for h in st["hosts"]} | {"dead", "unknown", "advice"}
    finally:
        p = cm("testbed", "down", "--name", name, "--state-dir", sd)
    assert p.returncode == 0 and "etcd" in p.stdout, p.stdout
    from constmig.errors import DirectoryError
    from constmig.host.directory import locate

    with pytest.raises(DirectoryError, match="unreachable|did not answer"):
        locate(url, "x")
