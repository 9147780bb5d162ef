"""Talking to an agent: one request, its progress frames, one reply; redirects followed for calls.

Blocking sockets on purpose: the CLI, tests and benchmark drivers are simple sequential programs,
and the agent uses the same client from a worker thread when it talks to another agent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from constmig.errors import (
    AgentError,
    AgentUnreachable,
    ChannelClosed,
    NoSuchEnclave,
    Redirect,
    SessionUnknown,
)
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
        if reply.get("kind") == NoSuchEnclave.__name__:
            raise NoSuchEnclave(str(reply.get("error", "no such enclave")))
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
    and remembered (after a migration, `addr` is the new agent).

    With a fleet directory (`etcd`), the first agent comes from it when `addr` is None, and it is asked
    again when the agent known cannot be reached or no longer knows the enclave (its host was retired
    after the move, so no redirect is left there). Both happen before the request is sent, so asking
    again never runs a call twice."""

    def __init__(self, addr: str | None, name: str, timeout: float | None = 600.0, etcd: str | None = None) -> None:
        if addr is None and etcd is None:
            raise AgentError(f"no way to find enclave {name!r}: give its agent's address or a fleet directory")
        self.addr = addr or ""
        self.name = name
        self.timeout = timeout
        self.etcd = etcd
        self._client: AgentClient | None = None

    def _relocate(self, tried: bool) -> bool:
        """Ask the directory where the enclave runs; False if there is none, or it names the agent known."""
        if self.etcd is None or tried:
            return False
        from constmig.host.directory import locate

        at = locate(self.etcd, self.name)
        if at == self.addr:
            return False
        self.addr = at
        return True

    def request(self, req: dict[str, Any]) -> Any:
        tried = False
        if not self.addr:
            tried = self._relocate(False)
        for _ in range(MAX_REDIRECTS + 2):
            if self._client is None:
                try:
                    self._client = AgentClient(self.addr, self.timeout)
                except AgentUnreachable:
                    if not self._relocate(tried):
                        raise
                    tried = True
                    continue
            try:
                return self._client.request({**req, "name": self.name})
            except Redirect as r:
                self.close()
                self.addr = r.location
            except NoSuchEnclave:
                self.close()
                if not self._relocate(tried):
                    raise
                tried = True
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

    def __init__(self, addr: str | None, name: str, timeout: float | None = 600.0, etcd: str | None = None) -> None:
        self.route = EnclaveRoute(addr, name, timeout, etcd)

    @property
    def addr(self) -> str:
        return self.route.addr

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.route.request({"op": "call", "method": method, "args": list(args), "kwargs": kwargs})

    def close(self) -> None:
        self.route.close()
