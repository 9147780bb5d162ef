"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import re
import subprocess
import sys

import pytest

from constmig.host.cluster import free_port


def cm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "constmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_clean_error(p: subprocess.CompletedProcess, fragment: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert fragment in p.stderr, p.stderr


@pytest.mark.parametrize("args,fragment", [
    (["run", "kvstore", "--heap", "12Q"], "malformed size"),
    (["demo", "--heap", "12Q"], "malformed size"),
    (["run", "nosuchapp"], "unknown app 'nosuchapp'"),
    (["migrate", "kv", "--from", "nocolon", "--to", "127.0.0.1:1"], "bad address"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "teleport"], "teleport"),
    (["bench", "sizes", "--sizes", "1X"], "malformed size"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--tracker", "psychic"], "psychic"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--max-bandwidth", "fast"],
     "malformed size"),
    (["demo", "--tracker", "psychic"], "psychic"),
    (["bench", "sizes", "--strategy", "constmig-psychic"], "constmig-psychic"),
    (["frobnicate"], "No such command"),
    (["migrate", "kv", "--from", "127.0.0.1:1"], "missing --to"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--resume"], "drop --to"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--resume-deadline", "-1"],
     "resume-deadline"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "stopcopy",
      "--max-downtime", "50ms"], "use them with --strategy precopy or hybrid or auto"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "precopy", "--rounds", "0"],
     "--rounds"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "constmig",
      "--write-tracking", "enclave"], "use them with --strategy precopy or hybrid or auto"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--write-tracking", "magic"],
     "--write-tracking"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "constmig",
      "--max-throttle", "0.5"], "use them with --strategy precopy or hybrid or auto"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "stopcopy",
      "--completion-timeout", "10"], "use them with --strategy precopy or hybrid or auto"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "precopy",
      "--max-throttle", "1.5"], "--max-throttle"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "auto",
      "--completion-timeout", "0"], "--completion-timeout"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "precopy",
      "--max-throttle", "0.5", "--write-tracking", "kernel"], "the kernel's cannot tell which call wrote"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--prefetch", "used-last"],
     "No such option '--prefetch'"),
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--strategy", "precopy",
      "--max-downtime", "soon"], "--max-downtime"),
    # outputs are checked before any work starts, not after a migration finished
    (["migrate", "kv", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--json", "/proc/nope/x.json"],
     "cannot write to --json /proc/nope/x.json: No such file"),
    (["demo", "--out", "/proc/nope"], "cannot write to --out /proc/nope: No such file"),
    (["demo", "--json", "/proc/nope/f.json"], "cannot write to --json /proc/nope/f.json: No such file"),
    (["bench", "calls", "--out", "/proc/nope"], "cannot write to --out /proc/nope: No such file"),
    (["migrate", "kv", "--from", "127.0.0.1:7001", "--to", "127.0.0.1:7001"], "--from and --to are the same agent"),
    (["run", "kvstore", "--name", ""], "--name must not be empty"),
    (["restore", "/tmp/kv.v1.ckpt", "--release", "zz"], "bad --release 'zz': a release code is 64 hex digits"),
])
def test_bad_input_gives_one_clean_error(args, fragment):
    assert_clean_error(cm(*args), fragment)


def test_unreachable_agent_is_one_line():
    p = cm("call", "kv1", "--agent", f"127.0.0.1:{free_port()}", "get", "x")
    assert_clean_error(p, "cannot reach agent")
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_demo_prints_verified_json(tmp_path):
    p = cm("demo", "--strategy", "stopcopy", "--heap", "64M", "--out", str(tmp_path), "--json", "-", timeout=300)
    assert p.returncode == 0, p.stderr
    fig = json.loads(p.stdout)
    assert fig["verified"] is True
    for key in ("strategy", "workload", "heap_bytes", "state_bytes", "downtime_ms", "total_s", "wire_bytes"):
        assert key in fig
    assert (tmp_path / "figures.json").exists() and (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.e2e
def test_demo_of_another_app_checks_the_redirect_too():
    p = cm("demo", "--app", "matrix", "--strategy", "constmig", "--heap", "32M", "--json", "-", timeout=300)
    assert p.returncode == 0, p.stderr
    fig = json.loads(p.stdout)
    assert fig["verified"] is True and fig["workload"] == "matrix" and fig["redirected_to"] == fig["to"]


@pytest.mark.e2e
def test_constmig_demo_reports_tracker_and_streaming_figures(tmp_path):
    p = cm("demo", "--strategy", "constmig", "--tracker", "access", "--heap", "64M", "--out", str(tmp_path),
           "--json", "-", timeout=300)
    assert p.returncode == 0, p.stderr
    fig = json.loads(p.stdout)
    assert fig["verified"] is True and fig["client_wrong"] == 0 and fig["client_errors"] == 0
    assert fig["strategy"] == "constmig" and fig["tracker"] == "access"
    for key in ("demand_chunks", "background_chunks", "stream_s", "client_gap_ms", "downtime_ms", "attest_ms"):
        assert key in fig, key
    assert fig["demand_chunks"] + fig["background_chunks"] == fig["chunks"]


@pytest.mark.e2e
def test_checkpoint_and_restore_from_the_command_line(tmp_path):
    """checkpoint prints where it sealed the state; restore of a missing or foreign file is one line."""
    from constmig.host.cluster import LocalCluster
    from constmig.host.orchestrate import launch_filled

    with LocalCluster(1) as c:
        a = c.addrs[0]
        launch_filled(a, "kv", "kvstore", 16 << 20, 0.5, seed=1)
        p = cm("checkpoint", "kv", "--agent", a)
        assert p.returncode == 0, p.stderr
        assert "kv.v1.ckpt" in p.stdout
        assert_clean_error(cm("restore", str(tmp_path / "nope.ckpt"), "--agent", a), "cannot read checkpoint")
        junk = tmp_path / "junk.ckpt"
        junk.write_bytes(b"not a checkpoint at all")
        assert_clean_error(cm("restore", str(junk), "--agent", a, "--name", "kv2"), "not a constmig checkpoint")
        assert_clean_error(cm("checkpoint", "nope", "--agent", a), "no enclave named 'nope'")


@pytest.mark.e2e
@pytest.mark.parametrize("args", [[],  # the default (README: auto, and why)
                                  ["--strategy", "precopy", "--max-downtime", "50ms"],
                                  ["--strategy", "hybrid", "--tracker", "access"],
                                  ["--strategy", "hybrid", "--tracker", "fault", "--rounds", "2"],
                                  ["--strategy", "auto", "--max-throttle", "0.5", "--completion-timeout", "60"]])
def test_migrate_with_rounds_from_the_command_line(args):
    """The rounds' options as a user types them: figures with the rounds, the state intact."""
    from constmig.enclave.dirty import preflight
    from constmig.host.cluster import LocalCluster
    from constmig.host.orchestrate import launch_filled

    if (why := preflight()) is not None:
        pytest.skip(f"write tracking unavailable: {why}")
    with LocalCluster(2) as c:
        a, b = c.addrs
        launch_filled(a, "kv1", "kvstore", 32 << 20, 0.9, seed=1)
        assert cm("call", "kv1", "--agent", a, "put", "k1", "v1").returncode == 0
        p = cm("migrate", "kv1", "--from", a, "--to", b, *args, "--verify", "--json", "-")
        assert p.returncode == 0, p.stderr
        fig = json.loads(p.stdout)
        strategy = args[1] if args else "auto"
        assert fig["verified"] is True and fig["rounds"] >= 1 and fig["strategy"] == strategy, fig
        assert "final_chunks" in fig or "missing_at_switch" in fig, fig  # auto: either, as it decided
        got = cm("call", "kv1", "--agent", a, "get", "k1")  # the old agent redirects
        assert got.returncode == 0 and "v1" in got.stdout, got.stderr


@pytest.mark.e2e
def test_call_passes_arguments_as_the_ecall_annotates_them():
    """`call kv fill 0.9 1` (README): a float and an int, not two strings; a bad number is one line."""
    from constmig.host.cluster import LocalCluster
    from constmig.host.orchestrate import launch_filled

    with LocalCluster(1) as c:
        a = c.addrs[0]
        launch_filled(a, "kv", "kvstore", 16 << 20, 0.1, seed=1)
        p = cm("call", "kv", "--agent", a, "fill", "0.5", "2")
        assert p.returncode == 0, p.stderr
        assert_clean_error(cm("call", "kv", "--agent", a, "fill", "lots"), "fill: fraction must be a number")
        p = cm("call", "kv", "--agent", a, "put", "k1", "123")  # an unannotated value stays a string
        assert p.returncode == 0, p.stderr
        assert "123" in cm("call", "kv", "--agent", a, "get", "k1").stdout


@pytest.mark.e2e
def test_call_pins_on_first_use_and_refuses_other_code_after(tmp_path):
    """known_hosts for enclaves: the first `call` pins (the instance, its code, its fleet) and says so; `trust`
    re-pins on purpose; a later enclave of the same name running other code is refused in one line that
    names what differs and the command that re-pins."""
    from constmig.client.trust import pin_key
    from constmig.host.client import request
    from constmig.host.cluster import LocalCluster

    known = tmp_path / "known.json"
    with LocalCluster(1) as c:
        a = c.addrs[0]
        assert cm("run", "kvstore", "--agent", a, "--heap", "16M", "--name", "kv").returncode == 0
        p = cm("call", "kv", "--agent", a, "--known", str(known), "put", "k", "v")
        assert p.returncode == 0 and "trusting enclave 'kv' on first use" in p.stderr, p.stderr
        (key,) = json.loads(known.read_text())["enclaves"]
        pinned = json.loads(known.read_text())["enclaves"][key]
        assert key == pin_key("kv", pinned["fleet"])
        status = request(a, {"op": "status"})["enclaves"]["kv"]
        assert pinned["measurement"] == status["measurement"] and pinned["instance"] == status["instance"]
        p = cm("call", "kv", "--agent", a, "--known", str(known), "get", "k")
        assert p.returncode == 0 and "first use" not in p.stderr and "v" in p.stdout

        request(a, {"op": "stop", "name": "kv"})  # same name, other launch config: other measurement
        assert cm("run", "kvstore", "--agent", a, "--heap", "32M", "--name", "kv").returncode == 0
        p = cm("call", "kv", "--agent", a, "--known", str(known), "get", "k")
        now = request(a, {"op": "status"})["enclaves"]["kv"]["measurement"]
        assert_clean_error(p, f"enclave 'kv' runs the pinned code with another launch configuration (heap 32.0 MiB "
                              f"where the pin has 16.0 MiB): measurement {now[:16]}")
        assert f"not the pinned {pinned['measurement'][:16]}" in p.stderr
        assert f"constmig trust kv --agent {a} --known {known}" in p.stderr

        p = cm("trust", "kv", "--agent", a, "--known", str(known))
        assert p.returncode == 0 and "pinned enclave 'kv'" in p.stdout and "replaces the pin" in p.stderr, p.stderr
        assert cm("call", "kv", "--agent", a, "--known", str(known), "get", "k").returncode == 0

        wrong = "0" * 64
        assert_clean_error(cm("call", "kv", "--agent", a, "--expect-measurement", wrong, "get", "k"),
                           "not the expected 0000000000000000… (--expect-measurement)")
        assert_clean_error(cm("call", "kv", "--agent", a, "--expect-measurement", "abc", "get", "k"),
                           "measurement must be 64 hex digits")
        assert_clean_error(cm("call", "kv", "--agent", a, "--plain", "get", "k"),
                           "takes calls only over an attested session")
        assert_clean_error(cm("call", "kv", "--agent", a, "--ca-dir", str(tmp_path / "nope"), "get", "k"),
                           "no root CA certificate to check the enclave's quote against")

        assert cm("run", "kvstore", "--agent", a, "--heap", "16M", "--name", "open", "--plain-calls").returncode == 0
        p = cm("call", "open", "--agent", a, "--plain", "put", "k", "v")
        assert p.returncode == 0, p.stderr
        open_m = request(a, {"op": "status"})["enclaves"]["open"]["measurement"]
        assert open_m != pinned["measurement"]  # taking plain calls is part of what is measured


def test_agent_tee_auto_never_falls_back_to_the_sim(tmp_path):
    """No SGX or TDX here: --tee auto (or sgx, tdx) is one line naming what was looked for."""
    for tee in ("auto", "sgx", "tdx"):
        p = cm("agent", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / tee), "--host-id", "a",
               "--tee", tee, timeout=30)
        assert_clean_error(p, "Gramine" if tee != "tdx" else "configfs-tsm")
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.e2e
def test_one_agent_per_state_folder_and_clear_folder_errors(tmp_path):
    """A second agent on a state folder in use is refused naming the first; a folder that is a file or
    cannot be created is named at start, not blamed on the port."""
    import os
    import signal
    import time

    from constmig.host.client import request

    port = free_port()
    first = subprocess.Popen([sys.executable, "-m", "constmig", "agent", "--listen", f"127.0.0.1:{port}",
                              "--state-dir", "host-a", "--host-id", "a"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request(f"127.0.0.1:{port}", {"op": "status"}, timeout=2)
                break
            except Exception:  # noqa: BLE001 (not up yet)
                assert time.monotonic() < deadline and first.poll() is None
                time.sleep(0.1)
        p = cm("agent", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "host-a"),
               "--host-id", "a2", timeout=30)
        assert_clean_error(p, f"state folder {tmp_path / 'host-a'} is in use by another agent (pid {first.pid})")
        # the checkpoint path it prints is absolute although the agent got a relative --state-dir
        a = f"127.0.0.1:{port}"
        assert cm("run", "kvstore", "--agent", a, "--heap", "8M", "--name", "kv").returncode == 0
        path = json.loads(cm("checkpoint", "kv", "--agent", a).stdout)["path"]
        assert os.path.isabs(path) and os.path.exists(path), path
        long = cm("run", "kvstore", "--agent", a, "--heap", "8M", "--name", "k" * 65)
        assert_clean_error(long, "enclave name of 65 characters is too long (at most 64)")
        same = request(a, {"op": "status"})
        assert set(same["enclaves"]) == {"kv"}
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(20)
    (tmp_path / "afile").write_text("x")
    assert_clean_error(cm("agent", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "afile"),
                          "--host-id", "a", timeout=30), "is not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:  # root writes anyway; as anyone else the folder cannot be created, and that is the one line
        if os.geteuid() != 0:
            p = cm("agent", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(ro / "sub"), "--host-id",
                   "a", timeout=30)
            assert_clean_error(p, f"cannot use state folder {ro / 'sub'}: Permission denied")
    finally:
        ro.chmod(0o700)


@pytest.mark.e2e
def test_migrating_to_the_agent_it_runs_on_is_one_clear_line():
    """Asked of the agent directly (an address spelled differently slips past the CLI's own check)."""
    from constmig.errors import AgentError
    from constmig.host.client import request
    from constmig.host.cluster import LocalCluster

    with LocalCluster(1) as c:
        a = c.addrs[0]
        request(a, {"op": "run", "name": "kv", "app": "kvstore", "heap": 8 << 20, "config": {}})
        with pytest.raises(AgentError, match="already runs on this agent"):
            request(a, {"op": "migrate", "name": "kv", "to": a, "strategy": "stopcopy"})
        assert request(a, {"op": "status"})["enclaves"]["kv"]["state"] == "running"


@pytest.mark.e2e
def test_heaps_already_promised_count_against_available_memory():
    """Two heaps of 60% of free memory: each fits alone, not both (admission control)."""
    from constmig.host.cluster import LocalCluster
    from constmig.units import available_memory

    heap = f"{int(available_memory() * 0.6) >> 20}M"
    with LocalCluster(1) as c:
        a = c.addrs[0]
        assert cm("run", "kvstore", "--agent", a, "--heap", heap, "--name", "big1").returncode == 0
        p = cm("run", "kvstore", "--agent", a, "--heap", heap, "--name", "big2")
        assert_clean_error(p, "promised to enclaves already here")
        assert cm("stop", "big1", "--agent", a).returncode == 0
        assert cm("run", "kvstore", "--agent", a, "--heap", heap, "--name", "big2").returncode == 0


@pytest.mark.parametrize("args", [["status", "--timeout", "1"], ["call", "kv", "--timeout", "1", "get", "k"]])
def test_an_agent_that_never_answers_is_one_line_after_the_timeout(args):
    """An address that accepts TCP and says nothing: bounded, one line, not a hang."""
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.listen(8)
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        p = cm(*args, "--agent", addr, timeout=60)
        took = time.monotonic() - t0
    assert_clean_error(p, f"agent at {addr} did not answer in time")
    assert len(p.stderr.strip().splitlines()) == 1 and took < 30, (took, p.stderr)


def test_a_flag_the_strategy_ignores_says_so():
    p = cm("migrate", "kv", "--from", f"127.0.0.1:{free_port()}", "--to", f"127.0.0.1:{free_port()}",
           "--strategy", "stopcopy", "--tracker", "fault")
    assert "(--tracker fault is ignored: stopcopy needs no tracker)" in p.stderr
    assert_clean_error(p, "cannot reach agent")


@pytest.mark.e2e
def test_an_agent_restarted_on_its_state_folder_names_what_died_and_how_to_restore_it():
    """A restarted agent says which of its enclaves died with it, and the restore command it prints works."""
    import shlex

    from constmig.host.client import request
    from constmig.host.cluster import LocalCluster

    with LocalCluster(1) as c:
        a = c.addrs[0]
        for name in ("kept", "lost"):
            assert cm("run", "kvstore", "--agent", a, "--heap", "8M", "--name", name).returncode == 0
        assert cm("call", "kept", "--agent", a, "put", "k", "v").returncode == 0
        assert cm("checkpoint", "kept", "--agent", a).returncode == 0
        c.kill_agent(0)
        c.start_agent(0, a)
        st = request(a, {"op": "status"})
        assert st["enclaves"] == {} and set(st["died"]) == {"kept", "lost"}
        assert st["died"]["lost"]["restore"] is None
        restore = st["died"]["kept"]["restore"]
        assert restore.startswith("constmig restore ") and restore.endswith(f"--agent {a} --name kept")
        table = cm("status", "--agent", a)
        assert re.search(r"kept\s+.\s*died", table.stdout) and f"restore with `{restore}`" in table.stdout
        assert "lost: no checkpoint of it here" in table.stdout
        p = cm(*shlex.split(restore)[1:])
        assert p.returncode == 0, p.stderr
        assert cm("call", "kept", "--agent", a, "get", "k").stdout.strip() == "v"
        assert set(request(a, {"op": "status"})["died"]) == {"lost"}


@pytest.mark.e2e
def test_sigterm_checkpoints_running_enclaves_and_a_restart_restores_them():
    """SIGTERM does not kill running enclaves silently: the agent takes no new work,
    seals a final checkpoint of each and says how to restore it; the restarted agent lists the command,
    which brings back every acknowledged write."""
    import os
    import shlex
    import signal
    import time

    from constmig.host.client import request
    from constmig.host.cluster import LocalCluster

    with LocalCluster(1) as c:
        a = c.addrs[0]
        for name in ("one", "two"):
            assert cm("run", "kvstore", "--agent", a, "--heap", "8M", "--name", name).returncode == 0
            assert cm("call", name, "--agent", a, "put", "k", name).returncode == 0
        t0 = time.monotonic()
        os.kill(c.procs[0].pid, signal.SIGTERM)  # the agent only, as a service manager sends it
        assert c.procs[0].wait(timeout=60) == 0
        assert time.monotonic() - t0 < 30
        log = (c.base / "agent-a.log").read_text()
        assert "SIGTERM: the agent stops; it checkpoints its running enclaves first" in log
        for name in ("one", "two"):
            assert re.search(rf"enclave {name} checkpointed to \S+; after a restart: constmig restore \S+ "
                             rf"--agent {re.escape(a)} --name {name}", log), log
        c.start_agent(0, a)
        died = request(a, {"op": "status"})["died"]
        assert set(died) == {"one", "two"}
        for name in ("one", "two"):
            p = cm(*shlex.split(died[name]["restore"])[1:])
            assert p.returncode == 0, p.stderr
            assert cm("call", name, "--agent", a, "get", "k").stdout.strip() == name
