"""Talking to an agent: one request, its progress frames, one reply; redirects followed for calls.

Requests are wire/control.py's structs (a test playing a hostile client may still hand a raw map); the
reply is decoded into control.Reply, and its result handed back as the plain value it travels as.

Blocking sockets on purpose: the CLI, tests and benchmark drivers are simple sequential programs,
and the agent uses the same client from a worker thread when it talks to another agent.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import msgspec

from constmig.errors import (
    AgentError,
    AgentUnreachable,
    ChannelClosed,
    ConstmigError,
    NoSuchEnclave,
    PastCommitPoint,
    ProtocolError,
    Redirect,
    SessionUnknown,
)
from constmig.host import admin, pki
from constmig.host.address import parse_addr
from constmig.wire import control
from constmig.wire.framing import FramedSocket

MAX_REDIRECTS = 4
CONNECT_TIMEOUT_S = 10.0  # the first contact of a request that waits for its answer without a bound


def connect(addr: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
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


def not_an_agent(addr: str, fs: FramedSocket, e: ProtocolError) -> AgentError:
    """What to say when the first answer on a connection is no control frame (or no Reply): whatever
    listens at `addr` (a web server, say: its "HTTP" read as a frame length) is not a constmig agent."""
    head = fs.unread(32)
    said = f"it answered {head!r}" if head else f"its answer is no control frame ({e})"
    return AgentError(f"{addr} is not a constmig agent: {said}")


class _TlsStream:
    """A TLS socket as FramedSocket uses one (no file descriptors ride on TLS)."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls

    def recvmsg(self, bufsize: int, ancbufsize: int = 0) -> tuple[bytes, list, int, None]:
        return self.tls.recv(bufsize), [], 0, None

    def sendall(self, data: bytes) -> None:
        self.tls.sendall(data)

    def settimeout(self, timeout: float | None) -> None:
        self.tls.settimeout(timeout)

    def close(self) -> None:
        self.tls.close()


_contexts: dict[tuple[str, str], ssl.SSLContext] = {}


def _tls_context(ident: pki.Identity) -> ssl.SSLContext:
    key = (str(ident.folder), pki.fingerprint(ident.cert))
    if key not in _contexts:
        try:
            _contexts[key] = admin.client_context(ident)
        except (OSError, ssl.SSLError) as e:
            raise AgentError(f"cannot use the {ident.role} certificate in {ident.folder}: {e}") from None
    return _contexts[key]


def operator_identity() -> pki.Identity | None:
    """The CLI's certificate for remote agents, if this user has one ($CONSTMIG_ADMIN_CERT or
    ~/.constmig/operator); one line if it is there but unusable."""
    folder = pki.operator_dir()
    if not (folder / "cert.pem").exists():
        return None
    return pki.read_identity(folder)


def admin_connect(addr: str, identity: pki.Identity | None = None,
                  timeout: float = CONNECT_TIMEOUT_S) -> tuple[Any, str, pki.Identity | None]:
    """A connection for admin requests to the agent at `addr`: its local socket if it runs on this machine
    (and no `identity` is given), else mutual TLS with `identity` or this user's operator certificate,
    else plain TCP (where the agent refuses admin requests, in one line). Returns (socket, via, identity)."""
    if identity is None:
        local = admin.connect_local(addr, timeout)
        if local is not None:
            return local, "local", None
        identity = operator_identity()
    if identity is None:
        return connect(addr, timeout), "network", None
    if problem := identity.problem():
        raise AgentError(f"{problem}: ask for a new one (`constmig ca issue {identity.role} {identity.name}` where "
                         "the admin CA's key is)")
    ctx = _tls_context(identity)
    sock = connect(addr, timeout)
    fs = FramedSocket(sock)
    try:
        try:
            reply = control.reply(fs.exchange(control.Tls()))
        except ProtocolError as e:
            raise not_an_agent(addr, fs, e) from None
        if not reply.ok:
            raise AgentError(f"agent at {addr} takes no certificate: {reply.error}")
        tls = ctx.wrap_socket(sock, do_handshake_on_connect=False)
        sock = tls
        tls.settimeout(timeout)
        tls.do_handshake()
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise AgentError(f"agent at {addr} is not an agent of this fleet: its certificate does not verify against "
                         f"{identity.ca_path} ({admin.alert_text(e)})") from None
    except ssl.SSLError as e:
        sock.close()
        raise AgentError(f"mutual TLS with agent at {addr} failed: {admin.alert_text(e)}") from None
    except (OSError, ChannelClosed) as e:
        sock.close()
        if isinstance(e, TimeoutError) or isinstance(e.__cause__, TimeoutError):
            raise AgentUnreachable(f"agent at {addr} did not answer in time (within {timeout:g}s)") from None
        raise AgentUnreachable(f"agent at {addr} broke off the TLS handshake: {e}") from None
    except ConstmigError:
        sock.close()
        raise
    role, name = admin.peer_identity(tls)
    if role != "host":
        tls.close()
        raise AgentError(f"agent at {addr} presented a certificate of {role or 'no'} role ({name!r}), not a host's")
    return _TlsStream(tls), "tls", identity


class AgentClient:
    """A persistent connection to one agent (reuse it for many calls). `privileged`: for admin requests
    (see admin_connect); otherwise plain TCP, which takes client calls and sessions.

    `timeout` bounds every wait, the first contact (connect, TLS) included; None waits for answers as
    long as they take, and CONNECT_TIMEOUT_S for the first contact."""

    def __init__(self, addr: str, timeout: float | None = 600.0, privileged: bool = False,
                 identity: pki.Identity | None = None) -> None:
        self.addr = addr
        self.via, self.identity = "network", identity
        first = timeout if timeout is not None else CONNECT_TIMEOUT_S
        if privileged:
            self.sock, self.via, self.identity = admin_connect(addr, identity, first)
        else:
            self.sock = connect(addr, first)
        self.sock.settimeout(timeout)
        self.fs = FramedSocket(cast(socket.socket, self.sock))
        self._answered = False

    def request(self, req: control.Request | dict[str, Any], on_progress: Callable[[dict], None] | None = None) -> Any:
        """Send `req`, pass its progress frames on, return its result (AgentError & co. if refused)."""
        try:
            reply = control.reply(self.fs.exchange(req, on_progress=on_progress))
        except ProtocolError as e:
            if self._answered:
                raise
            raise not_an_agent(self.addr, self.fs, e) from None
        except TimeoutError:
            raise AgentUnreachable(f"agent at {self.addr} did not answer in time") from None
        except ChannelClosed as e:
            if isinstance(e.__cause__, TimeoutError):  # the socket's timeout, seen while reading a frame
                raise AgentUnreachable(f"agent at {self.addr} did not answer in time") from None
            if self.identity is not None and (isinstance(e.__cause__, ssl.SSLError) or not self._answered):
                # Its verdict on our certificate: an alert, or (asyncio's TLS sends none) the connection
                # closed right after the handshake; the agent's log says which check failed.
                why = admin.alert_text(e.__cause__) if isinstance(e.__cause__, ssl.SSLError) else \
                    "it closed the connection after the handshake (another CA's, expired or revoked)"
                raise AgentError(f"agent at {self.addr} refused the {self.identity.role} certificate in "
                                 f"{self.identity.folder}: {why}") from None
            raise AgentUnreachable(f"agent at {self.addr} closed the connection: {e}") from None
        self._answered = True
        if reply.ok:
            return reply.result
        if reply.kind == "AdminRefused" and self.via == "network":
            raise AgentError(f"{reply.error}; this machine has no socket of that agent and no operator "
                             f"certificate in {pki.operator_dir()}")
        if reply.redirect:
            raise Redirect(reply.error or "moved", reply.redirect)
        if reply.kind == SessionUnknown.__name__:
            raise SessionUnknown(reply.error or "no such session")
        if reply.kind == NoSuchEnclave.__name__:
            raise NoSuchEnclave(reply.error or "no such enclave")
        if reply.kind == PastCommitPoint.__name__:
            raise PastCommitPoint(reply.error or "the migration passed its commit point")
        raise AgentError(reply.error or "request failed")

    def close(self) -> None:
        self.fs.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(addr: str, req: control.Request | dict[str, Any], on_progress: Callable[[dict], None] | None = None,
            timeout: float | None = 600.0, identity: pki.Identity | None = None) -> Any:
    """One request and its reply; admin requests go the admin way (admin_connect), others over plain TCP.
    `timeout` bounds the first contact too (CONNECT_TIMEOUT_S when it is None)."""
    with AgentClient(addr, timeout, privileged=admin.needs_admin(control.op(req)), identity=identity) as c:
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

    def request(self, req: control.Call | control.SessionOpen | control.SessionCall) -> Any:
        """`req` to the enclave this route leads to (its name is the route's)."""
        req = msgspec.structs.replace(req, name=self.name)
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
                return self._client.request(req)
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
        return self.route.request(control.Call(name=self.route.name, method=method, args=list(args), kwargs=kwargs))

    def close(self) -> None:
        self.route.close()
