"""A distribution's daemon run on this machine for tests and the testbed (etcd, Prometheus): its output in
a log file, ready once its HTTP endpoint answers, stopped with SIGTERM and then SIGKILL. One way for
both, so a daemon that dies at start is named with its log's last line, and one that never answers is
stopped rather than left behind."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from constmig.errors import ConfigError

STOP_WAIT_S = 10.0
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy


def start(what: str, argv: list[str], log: Path, ready_url: str, timeout: float, poll_s: float,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `argv`, its output appended to `log`, and wait until `ready_url` answers; on a daemon that
    exits or does not answer within `timeout`, stop it and raise one line saying which."""
    with open(log, "ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-400:].strip()
            raise ConfigError(f"{what} exited at start: {tail.splitlines()[-1] if tail else 'no output'}")
        try:
            with HTTP.open(ready_url, timeout=1.0) as r:
                r.read()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise ConfigError(f"{what} did not answer at {ready_url} within {timeout:g}s") from None
            time.sleep(poll_s)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, and SIGKILL if it has not exited within STOP_WAIT_S."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
