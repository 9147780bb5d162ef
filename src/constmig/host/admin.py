"""Who may administer an agent, the way libvirt does it: a local Unix socket that file permissions
guard, and mutual TLS with certificates from the fleet's admin CA (host/pki.py) for everyone else.

The agent's TCP port stays open to anyone for what is attested and sealed at the enclave (client calls
and sessions, the migration's data connections) and for `ping`. Everything that starts, stops, moves or
describes enclaves is an admin operation: it arrives on the local socket, or on a TCP connection that
the `tls` request turned into mutual TLS with an operator's certificate; a host's certificate allows
only what one agent asks another during a migration. Plain TCP gets one line of refusal.

The CLI finds a local agent's socket with no configuration: each agent links its socket into a
per-user index, `~/.constmig/agents/net-<netns>/<HOST:PORT>` ($CONSTMIG_AGENTS_DIR), under the address
it listens on (the testbed adds its hosts' advertised addresses); an address with no live entry there
is remote, and the CLI uses `~/.constmig/operator` ($CONSTMIG_ADMIN_CERT) if present.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from constmig.errors import ConfigError
from constmig.host.address import parse_addr
from constmig.host.pki import Identity

OPEN_OPS = frozenset({"ping", "call", "session_open", "session_call", "data", "tls"})
AGENT_OPS = frozenset({"prepare_in", "drop_in"})  # one agent asks another during a migration (host certificate)
ADMIN_OPS = frozenset({"status", "run", "stop", "migrate", "cancel", "resume", "checkpoint", "restore", "shutdown"})
NEEDS = "admin operations need the local socket or a certificate from the fleet's CA"
SOCKET_NAME = "agent.sock"
_SUN_MAX = 100  # sun_path holds 108 bytes; longer paths are reached through /proc/self/fd
TLS_HANDSHAKE_S = 10.0


def needs_admin(op: object) -> bool:
    return op in ADMIN_OPS or op in AGENT_OPS


@dataclass(frozen=True)
class Caller:
    """How one connection was authenticated: `local` (the Unix socket), `tls` (a certificate: its role
    and name), or `network` (plain TCP: anyone)."""

    via: str
    role: str = ""
    name: str = ""
    peer: str = ""

    def describe(self) -> str:
        if self.via == "tls":
            return f"{self.role} {self.name!r} at {self.peer}"
        return f"{self.via} peer {self.peer}".strip()


def refusal(op: object, caller: Caller) -> str | None:
    """Why `caller` may not ask for `op`, or None. Unknown ops pass (the dispatcher names them)."""
    if not needs_admin(op) or caller.via == "local":
        return None
    if caller.via == "network":
        return f"{op!r} refused: {NEEDS} (docs/security.md, \"Who may administer an agent\")"
    if caller.role == "operator" or (caller.role == "host" and op in AGENT_OPS):
        return None
    if caller.role == "host":
        return (f"{op!r} refused: the certificate of host {caller.name!r} allows only what one agent asks another "
                "during a migration; admin operations need an operator's certificate or the local socket")
    return f"{op!r} refused: the certificate of {caller.name!r} has no constmig role"


# ---- the local socket ----

def socket_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "admin"


def socket_path(state_dir: Path) -> Path:
    return socket_dir(state_dir) / SOCKET_NAME


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """A name for `path` that fits in sun_path (through its folder's descriptor when the path is long)."""
    if len(os.fsencode(str(path))) < _SUN_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def bind_local(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, in a folder only this user can enter (0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)  # a socket left by an agent that was killed (we hold the state folder's lock)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short(path) as name:
            sock.bind(name)
            os.chmod(name, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return uid


def trusted_uid(uid: int) -> bool:
    """The local socket's peer must be this user or root (the folder's mode already says so)."""
    return uid in (0, os.geteuid())


def index_dir() -> Path:
    """This user's index of local agents, per network namespace (a testbed host's 127.0.0.1 is not ours)."""
    base = Path(os.environ.get("CONSTMIG_AGENTS_DIR", Path.home() / ".constmig" / "agents"))
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ns = 0
    return base / f"net-{ns}"


def _entry_name(host: str, port: int) -> str:
    host = "127.0.0.1" if host == "localhost" else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def register(addr: str, sock: Path) -> Path:
    """Link `sock` into the index under `addr` (replacing an older agent's entry for that address)."""
    host, port = parse_addr(addr)
    folder = index_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(folder.parent, 0o700)
    entry = folder / _entry_name(host, port)
    tmp = folder / f".{entry.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(sock, tmp)
    os.replace(tmp, entry)
    for other in folder.iterdir():  # entries of agents that were killed, whose folders are gone
        if other.is_symlink() and not other.exists():
            with contextlib.suppress(OSError):
                other.unlink()
    return entry


def unregister(addr: str, sock: Path) -> None:
    """Drop `addr`'s index entry if it still names `sock` (a newer agent may have taken the address)."""
    with contextlib.suppress(OSError, ConfigError):
        host, port = parse_addr(addr)
        entry = index_dir() / _entry_name(host, port)
        if os.readlink(entry) == str(sock):
            entry.unlink()


def _is_local_address(host: str) -> bool:
    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))  # succeeds only for an address of this machine (this namespace)
        return True
    except OSError:
        return False


def find_local(addr: str) -> Path | None:
    """The index entry of the agent at `addr` on this machine: its own address, or a wildcard listener
    on that port when `addr` is one of this machine's addresses."""
    try:
        host, port = parse_addr(addr)
    except ConfigError:
        return None
    folder = index_dir()
    names = [_entry_name(host, port)]
    if _is_local_address(host):
        names += [_entry_name("0.0.0.0", port), _entry_name("::", port)]
    for name in names:
        if (folder / name).is_symlink():
            return folder / name
    return None


def connect_local(addr: str, timeout: float | None) -> socket.socket | None:
    """A connection to the local agent serving `addr` through its socket, or None: no entry, an entry
    whose agent is gone, or a socket someone other than this user or root listens on."""
    entry = find_local(addr)
    if entry is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short(entry) as name:
            sock.connect(name)
        if not trusted_uid(peer_uid(sock)):
            raise PermissionError
    except OSError:
        sock.close()
        return None
    return sock


# ---- mutual TLS ----

def server_context(ident: Identity) -> ssl.SSLContext:
    """The agent's side: its host certificate, and a client certificate from the same CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(ident.cert_path, ident.key_path)
    ctx.load_verify_locations(ident.ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ident: Identity) -> ssl.SSLContext:
    """An operator's or agent's side: its certificate, and the agent's verified against the same CA. The
    agent's certificate names a host, not an address, so the role is checked instead of the hostname."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(ident.cert_path, ident.key_path)
    ctx.load_verify_locations(ident.ca_path)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str, str]:
    """(role, name) of a verified peer certificate."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    fields = {k: v for rdn in (cert or {}).get("subject", ()) for k, v in rdn}
    return str(fields.get("organizationalUnitName", "")), str(fields.get("commonName", ""))


_VERIFY = {2: "not issued by this fleet's admin CA", 20: "not issued by this fleet's admin CA",
           21: "not issued by this fleet's admin CA", 18: "self-signed, not issued by this fleet's admin CA",
           19: "not issued by this fleet's admin CA",
           10: "certificate expired", 9: "certificate not yet valid"}


def alert_text(e: ssl.SSLError) -> str:
    """A TLS error in words: 'certificate expired', 'unknown ca', 'not issued by this fleet's admin CA'."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return _VERIFY.get(e.verify_code, str(e.verify_message or "certificate does not verify"))
    reason = str(getattr(e, "reason", "") or "")
    if "ALERT_" in reason:
        return reason.split("ALERT_", 1)[1].replace("_", " ").lower()
    return (reason.replace("_", " ").lower() or str(e)).strip()
