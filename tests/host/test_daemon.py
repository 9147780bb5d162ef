"""host/daemon.py: a local daemon (etcd, Prometheus) that dies at start or never answers is named in one
line and never left running; one that answers is ready."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from constmig.errors import ConfigError
from constmig.host import daemon


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_daemon_that_exits_at_start_is_named_with_its_last_log_line(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('starting'); print('bad flag --x', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(ConfigError, match=r"^toy exited at start: bad flag --x$"):
        daemon.start("toy", argv, tmp_path / "toy.log", f"http://127.0.0.1:{_port()}/", 10.0, 0.05)


def test_a_daemon_that_never_answers_is_stopped(tmp_path):
    pid_file = tmp_path / "pid"
    argv = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                  "time.sleep(60)"]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^toy did not answer at http://127\.0\.0\.1:\d+/ within 0\.5s$"):
        daemon.start("toy", argv, tmp_path / "toy.log", f"http://127.0.0.1:{_port()}/", 0.5, 0.05)
    assert time.monotonic() - t0 < 5
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left behind
        import os
        os.kill(pid, 0)


def test_a_daemon_that_answers_is_ready_and_stops(tmp_path):
    port = _port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proc = daemon.start("toy", argv, tmp_path / "toy.log", f"http://127.0.0.1:{port}/", 20.0, 0.05, cwd=tmp_path)
    try:
        assert proc.poll() is None
    finally:
        daemon.stop(proc)
    assert proc.poll() is not None
    daemon.stop(proc)  # stopping twice is harmless
    daemon.stop(None)
