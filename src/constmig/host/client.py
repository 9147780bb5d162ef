"""Talking to an agent: one request, its progress frames, one reply; redirects followed for calls.

Blocking sockets on purpose: the CLI, tests and benchmark drivers are simple sequential programs,
and the agent uses the same client from a worker thread when it talks to another agent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from constmig.errors import AgentError, AgentUnreachable, ChannelClosed, Redirect, SessionUnknown
from constmig.host.address import parse_addr
from constmig.wire.framing import FramedSocket

MAX_REDIRECTS = 4


def connect(addr: str, timeout: float = 10.0) -> socket.socket:
    host, port = parse_addr(addr)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise AgentUnreachable(f"cannot reach agent at {addr}: connection refused (is it running?)") from None
    except TimeoutError:
        raise AgentUnreachable(f"cannot reach agent at {addr}: timed out after {timeout:g}s") from None
    except OSError as e:
        raise AgentUnreachable(f"cannot reach agent at {addr}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class AgentClient:
    """A persistent connection to one agent (reuse it for many calls)."""

    def __init__(self, addr: str, timeout: float | None = 600.0) -> None:
        self.addr = addr
        self.sock = connect(addr)
        self.sock.settimeout(timeout)
        self.fs = FramedSocket(self.sock)

    def request(self, req: dict[str, Any], on_progress: Callable[[dict], None] | None = None) -> Any:
        try:
            reply = self.fs.exchange(req, on_progress=on_progress)
        except TimeoutError:
            raise AgentUnreachable(f"agent at {self.addr} did not answer in time") from None
        except ChannelClosed as e:
            if isinstance(e.__cause__, TimeoutError):  # the socket's timeout, seen while reading a frame
                raise AgentUnreachable(f"agent at {self.addr} did not answer in time") from None
            raise AgentUnreachable(f"agent at {self.addr} closed the connection: {e}") from None
        if reply.get("ok"):
            return reply.get("result")
        if reply.get("redirect"):
            raise Redirect(str(reply.get("error", "moved")), str(reply["redirect"]))
        if reply.get("kind") == SessionUnknown.__name__:
            raise SessionUnknown(str(reply.get("error", "no such session")))
        raise AgentError(str(reply.get("error", "request failed")))

    def close(self) -> None:
        self.fs.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(addr: str, req: dict[str, Any], on_progress: Callable[[dict], None] | None = None,
            timeout: float | None = 600.0) -> Any:
    with AgentClient(addr, timeout) as c:
        return c.request(req, on_progress)


class EnclaveRoute:
    """The way to one enclave by name: a kept connection to the agent that hosts it, redirects followed
    and remembered (after a migration, `addr` is the new agent)."""

    def __init__(self, addr: str, name: str, timeout: float | None = 600.0) -> None:
        self.addr = addr
        self.name = name
        self.timeout = timeout
        self._client: AgentClient | None = None

    def request(self, req: dict[str, Any]) -> Any:
        for _ in range(MAX_REDIRECTS + 1):
            if self._client is None:
                self._client = AgentClient(self.addr, self.timeout)
            try:
                return self._client.request({**req, "name": self.name})
            except Redirect as r:
                self.close()
                self.addr = r.location
            except AgentUnreachable:
                self.close()  # a late reply must never answer the next request
                raise
        raise AgentError(f"too many redirects looking for enclave {self.name!r}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class PlainEnclaveClient:
    """Unsealed ECALLs through the agent, which reads and could change them: only enclaves launched with
    --plain-calls take these (the bench's baseline). Clients use constmig.client.EnclaveClient."""

    def __init__(self, addr: str, name: str, timeout: float | None = 600.0) -> None:
        self.route = EnclaveRoute(addr, name, timeout)

    @property
    def addr(self) -> str:
        return self.route.addr

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.route.request({"op": "call", "method": method, "args": list(args), "kwargs": kwargs})

    def close(self) -> None:
        self.route.close()
