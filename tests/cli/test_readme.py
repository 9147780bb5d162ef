"""README's "By hand" block runs exactly as written (docs that drift are bugs): the two agents in the
background, then every other line in order through a shell, each one exiting 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def by_hand_block() -> list[str]:
    text = README.read_text()
    section = text[text.index("## By hand"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README has no bash block under 'By hand'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_block_starts_two_agents_and_migrates_with_every_strategy() -> None:
    lines = by_hand_block()
    assert sum(line.startswith("constmig agent ") for line in lines) == 2
    for strategy in ("stopcopy", "constmig", "precopy", "hybrid"):
        assert any(f"--strategy {strategy}" in line for line in lines), strategy


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_readme_by_hand_commands_run_as_written(tmp_path: Path) -> None:
    lines = by_hand_block()
    ports = [int(p) for p in re.findall(r"--listen 127\.0\.0\.1:(\d+)", "\n".join(lines))]
    if any(_listening(p) for p in ports):
        pytest.skip(f"a port the README uses ({ports}) is taken on this machine")
    env = {**os.environ, "HOME": str(tmp_path)}
    agents = [subprocess.Popen(line, shell=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
              for line in lines if line.startswith("constmig agent ")]
    try:
        deadline = time.monotonic() + 60
        while not all(_listening(p) for p in ports):
            for a in agents:
                assert a.poll() is None, a.stderr.read().decode() if a.stderr else "agent exited"
            assert time.monotonic() < deadline, "the README's agents did not start listening"
            time.sleep(0.2)
        for line in lines:
            if line.startswith("constmig agent "):
                continue
            p = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300, stdin=subprocess.DEVNULL)
            assert p.returncode == 0, f"{line}\n{p.stderr[-2000:]}"
            assert "Traceback" not in p.stderr, line
    finally:
        for a in agents:
            os.killpg(a.pid, signal.SIGTERM)
        for a in agents:
            try:
                a.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
