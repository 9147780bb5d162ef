"""One Prometheus server on this machine, for tests and trying the shipped rules out.

The server is the distribution's `prometheus` binary (Debian's `prometheus` package, 2.42), run on a
copy of deploy/prometheus/ in a temporary folder with a faster scrape interval, so a test queries what
an operator's Prometheus would compute from the agents' metrics, through its own HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from constmig.errors import ConfigError
from constmig.host import daemon

READY_TIMEOUT_S = 30.0


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class LocalPrometheus:
    """`with LocalPrometheus(deploy_dir) as p: p.query(...)` — Prometheus on loopback, its configuration
    and rules from `deploy_dir` (prometheus.yml, rules.yml), scraping every `interval` seconds the file_sd
    targets written into `p.targets_dir`."""

    def __init__(self, deploy_dir: Path, interval: float = 1.0, port: int = 0) -> None:
        from constmig.host.cluster import free_port

        binary = prometheus_binary()
        if binary is None:
            raise ConfigError("no prometheus binary on PATH: install the distribution's prometheus package "
                              "(apt-get install prometheus)")
        self.binary = binary
        self.port = port or free_port("127.0.0.1")
        self.dir = Path(tempfile.mkdtemp(prefix="constmig-prometheus-"))
        self.targets_dir = self.dir / "targets"
        self.targets_dir.mkdir()
        # the shipped file as it is, but every interval `interval` (a test waits seconds, not minutes)
        config = re.sub(r"(?m)^(\s*(?:scrape|evaluation|refresh)_interval:)\s*\S+", rf"\g<1> {interval:g}s",
                        (deploy_dir / "prometheus.yml").read_text())
        (self.dir / "prometheus.yml").write_text(config)
        for rules in deploy_dir.glob("rules*.yml"):
            shutil.copy(rules, self.dir / rules.name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalPrometheus:
        try:
            self.proc = daemon.start("prometheus", [
                self.binary, f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn"], self.dir / "prometheus.log", f"{self.url}/-/ready", READY_TIMEOUT_S, 0.1,
                cwd=self.dir)
        except ConfigError:
            self.stop()
            raise
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API (/api/v1/query): its vector, each sample's labels and value."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with daemon.HTTP.open(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise ConfigError(f"prometheus refused {expr!r}: {body.get('error')}")
        return [{"labels": s["metric"], "value": float(s["value"][1])} for s in body["data"]["result"]]

    def wait(self, expr: str, ok: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Query `expr` until `ok(result)` holds; the result, or an AssertionError naming what was seen."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.query(expr)
            if ok(found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr}: still {found} after {timeout:g} s")
            time.sleep(0.25)

    def stop(self) -> None:
        daemon.stop(self.proc)
        self.proc = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
