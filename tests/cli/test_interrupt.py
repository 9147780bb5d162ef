"""Ctrl-C during a migration request: the CLI asks (or cancels) and then waits for the request's own
answer, never reads an answer that has not come."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from constmig import cli


def test_ctrl_c_waits_for_the_answer_of_a_request_still_running(monkeypatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(cli, "_ask_cancel", lambda name, src: asked.append(name))
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    got = cli._interruptible("kv", "127.0.0.1:1", lambda: time.sleep(1.2) or 42)
    assert got == 42 and asked == ["kv"]
    assert time.monotonic() - t0 >= 1.1


def test_the_request_error_reaches_the_caller() -> None:
    def fails() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        cli._interruptible("kv", "127.0.0.1:1", fails)
