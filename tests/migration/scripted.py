"""What the migration tests share: a root CA with two provisioned platforms, enclaves built in-process the
way the enclave process builds them, and control messages sent and received by hand (a scripted peer)."""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constmig.enclave.runtime import Enclave, build_enclave, with_instance
from constmig.enclave.state import export_app_state
from constmig.migration import messages as m
from constmig.tee.sim import SimPlatform, create_root_ca
from constmig.wire.channel import ControlRecord, SecureChannel

MiB = 1 << 20
HEAP = 8 * MiB
CHUNK = 1 * MiB
SEED = 7
TIMEOUT = 20.0  # every receive on either side; far below the test timeout


@dataclass
class World:
    base: Path
    root_pem: Path
    platforms: dict[str, Path]


def make_world(base: Path) -> World:
    create_root_ca(base / "ca")
    platforms = {}
    for host in ("host-a", "host-b"):
        SimPlatform.provision(base / host, base / "ca", host)
        platforms[host] = base / host
    return World(base, base / "ca" / "root.pem", platforms)


@dataclass
class Enclaves:
    """Builds enclaves the way the enclave process does, and tears them down after the test."""

    world: World
    made: list[Enclave] = field(default_factory=list)

    def build(self, host: str, *, incoming: bool = False, tracker: str = "none") -> Enclave:
        args = argparse.Namespace(
            app="kvstore", heap=HEAP, chunk_size=CHUNK, mode="incoming" if incoming else "fresh",
            tracker=tracker, config="", socket=str(self.world.base / f"{host}-{len(self.made)}.sock"),
            platform_dir=str(self.world.platforms[host]), root_pem=str(self.world.root_pem),
            plain_calls=False,  # measured like an enclave process the agent starts
        )
        enclave = build_enclave(args)
        enclave.plain_calls = True  # in-process tests call the app directly (the runtime's own entry point)
        self.made.append(enclave)
        return enclave

    def filled(self, host: str = "host-a") -> Enclave:
        enclave = self.build(host)
        assert enclave.app is not None
        enclave.app.fill(0.9, SEED)
        return enclave

    def close(self) -> None:
        for enclave in self.made:
            receiver = enclave.receiver
            if receiver is not None:
                receiver.main.chan.close()
                receiver.demand.chan.close()
                receiver.join()
            enclave.tracking.close()  # the heap readable and the app module as it was
            enclave.heap.close()


@dataclass
class Pairs:
    """Two socketpairs: `real` ends go to the code under test, `fake` ends to the scripted peer."""

    real: list[socket.socket]
    fake: list[socket.socket]

    def close(self) -> None:
        for s in self.real + self.fake:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def recv_msg(chan: SecureChannel) -> m.Message:
    rec = chan.recv(timeout=TIMEOUT)
    assert isinstance(rec, ControlRecord), f"expected a control message, got {rec!r}"
    return m.decode(rec.payload)


def send_msg(chan: SecureChannel, msg: m.Message) -> None:
    chan.send_control(m.encode(msg))


class Runner:
    """Runs the real side in a thread and keeps what it returned or raised."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.result = fn(*args)
        except BaseException as e:  # handed to the test thread
            self.error = e

    def join(self, timeout: float = 30.0) -> Runner:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the real side did not finish"
        return self

    def value(self, timeout: float = 30.0) -> Any:
        """What it returned; what it raised is raised here."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def outcome(self, timeout: float = 30.0) -> Any:
        """What it returned, or what it raised (as a value)."""
        self.join(timeout)
        return self.error if self.error is not None else self.result


def run_pair(src_fn: Callable[[SecureChannel], Any], dst_fn: Callable[[SecureChannel], Any],
             mid: bytes) -> tuple[dict[str, Any], SecureChannel, SecureChannel]:
    """Both ends of a reconnect over a socketpair: {"src"|"dst": what each returned or raised}."""
    a, b = socket.socketpair()
    ca, cb = SecureChannel(a, mid), SecureChannel(b, mid)
    out: dict[str, Any] = {}

    def side(name: str, fn: Callable[[SecureChannel], Any], chan: SecureChannel) -> None:
        try:
            out[name] = fn(chan)
        except Exception as e:  # reported to the test
            out[name] = e
            chan.close()

    t = threading.Thread(target=side, args=("dst", dst_fn, cb))
    t.start()
    side("src", src_fn, ca)
    t.join(10)
    return out, ca, cb


def small_state(enclave: Enclave) -> bytes:
    """The small state as the enclave's own export makes it: its instance id, then the app's state."""
    return with_instance(enclave.instance, export_app_state(enclave.app))
