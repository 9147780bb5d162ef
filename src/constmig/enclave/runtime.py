"""The enclave process: one app, its heap, its lifecycle, and the ECALL loop the agent talks to.

Started by the agent as `python -m constmig.enclave.runtime ...`. It binds a Unix socket, prints one
line (`ready` or `error: ...`) on stdout, then serves each connection the agent opens in a thread of its
own: ECALLs, status, checkpoints, and the migration entry points, which receive the migration's TCP
connections as file descriptors. So a migration's handshake runs while ECALLs go on, as an SGX enclave
runs several threads through its TCSs. ECALLs stay serialized among themselves (the app lock), and a
migration stops the app by taking that lock: the stop lands between two ECALLs.

Each request is decoded once as it arrives (`handle`), into its wire/control.py struct; the replies
are control's Reply, with the lifecycle state as the Life enum.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constmig.apps import app_source, load_app
from constmig.enclave.app import EnclaveApp
from constmig.enclave.heap import Heap
from constmig.enclave.lifecycle import Life, Lifecycle
from constmig.enclave.lifeline import die_with_parent
from constmig.enclave.persist import Lineage, Persistence
from constmig.enclave.sessions import SessionTable
from constmig.enclave.state import export_app_state, import_app_state
from constmig.enclave.throttle import WriteLimit
from constmig.errors import (
    ChannelClosed,
    ConfigError,
    ConstmigError,
    EnclaveError,
    EnclaveNotRunning,
    HeapIncomplete,
    LineageHeld,
    MigrationCancelled,
    MigrationError,
    ProtocolError,
)
from constmig.migration import destination, source, trackers
from constmig.migration.port import Snapshot
from constmig.migration.receiver import Receiver
from constmig.migration.resume_server import CommitWaiter
from constmig.migration.trackers.base import Tracker
from constmig.tee.backend import Identity, TeeBackend
from constmig.tee.measure import measure
from constmig.wire import control
from constmig.wire.framing import FramedSocket, encode
from constmig.wire.handshake import Policy
from constmig.wire.session import INSTANCE_SIZE, MAX_LAUNCH, About

DEV_SIGNER = b"constmig development signer"
ACCEPT_POLL_S = 0.2  # how often the accept loop looks whether the enclave is done
# The small state (migrations, checkpoints) starts with this tag and the instance id: the enclave's own
# identity travels with its state, inside the sealed blob, so persist.py and the migration carry it unchanged.
_INSTANCE_TAG = b"constmig-instance-v1\x00"


def with_instance(instance: bytes, app_state: bytes) -> bytes:
    """The small state as it leaves the enclave: the instance id, then the app's state."""
    assert len(instance) == INSTANCE_SIZE
    return _INSTANCE_TAG + instance + app_state


def split_instance(blob: bytes) -> tuple[bytes | None, bytes]:
    """(instance id, app state) of a small state; no id in one sealed before instances had one."""
    head = len(_INSTANCE_TAG)
    if bytes(blob[:head]) == _INSTANCE_TAG and len(blob) >= head + INSTANCE_SIZE:
        return bytes(blob[head:head + INSTANCE_SIZE]), bytes(blob[head + INSTANCE_SIZE:])
    return None, blob


@dataclass
class Enclave:
    """Everything trusted that one enclave process holds."""

    app_name: str
    app_cls: type[EnclaveApp]
    heap: Heap
    life: Lifecycle
    identity: Identity
    backend: TeeBackend
    policy: Policy
    config: dict[str, Any]
    tracking: Tracker  # how it lives with a heap that arrives after it runs (migration/trackers/)
    app: EnclaveApp | None = None
    sessions: SessionTable | None = None  # clients' attested sessions (set by build_enclave)
    # Which enclave this is, beyond its code: drawn at the first launch, carried in the small state through
    # migrations, checkpoints and restores, and bound into every session's quote (wire/session.py).
    instance: bytes = b""
    code_hash: bytes = b""  # sha256 of the measured app source
    launch: str = ""  # the measured launch configuration (JSON)
    plain_calls: bool = False  # launched to also take unsealed ECALLs from the host (measured)
    figures: dict[str, Any] = field(default_factory=dict)
    receiver: Receiver | None = None  # the stream's receiver when it runs here (a pager process has its own)
    write_limit: WriteLimit = field(default_factory=WriteLimit)  # pre-copy rounds slow the writers with it
    persist: Persistence | None = None  # sealed checkpoints and their counter (set by build_enclave)
    outgoing: source.Outgoing | None = None  # a migration out that paused after the commit point
    resume_path: Path | None = None  # where an incoming migration listens for reconnects (resume.py)
    incoming_chunks: int = 0  # chunks the last incoming post-copy migration streams after COMMIT
    tombstone: CommitWaiter | None = None  # gave an incoming migration up after READY: answers ABORT
    # ECALLs, checkpoints and a migration's stop take turns: the stop waits for the running ECALL (an
    # ECALL boundary), and an ECALL after it finds the enclave stopped. Status and the migration's
    # handshake do not take it.
    app_lock: threading.Lock = field(default_factory=threading.Lock)
    # A migration out may be cancelled until its commit point, and not after: the two are decided under
    # one lock (cancel_out, hand_off), so a cancel either wins or is told it came too late.
    cancel_lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: str | None = None
    migration_socks: list[socket.socket] = field(default_factory=list)
    migration_token: str = ""  # the agent's name for the migration out in progress
    pending_cancel: tuple[str, str] | None = None  # (token, reason): a cancel that came before its migration

    def abandon_incoming(self) -> None:
        """The incoming migration failed before COMMIT: stop tracking (its pager, its wrapped arrays)."""
        self.tracking.abandon("migration aborted")

    def heap_arrival(self) -> int | None:
        """Chunks in so far while an incoming migration's heap is still arriving; None when it is whole.

        Decided by the migration's own ledger (the pager's, or the receiver's here), never by the OS's
        view of memory: a page still waiting on userfaultfd looks absent, not missing.
        """
        return self.tracking.arriving()

    def whole_heap(self, what: str) -> Any:
        """The chunks an export of the whole heap carries (migrate out, checkpoint, anything that
        serializes it): the one gate, which refuses an enclave that is not running or whose heap is
        still arriving (exporting then would carry missing chunks as zeros and lose acknowledged writes)."""
        if self.life.state is not Life.RUNNING or self.app is None:
            raise EnclaveError(f"enclave is {self.life.state.value}; only a running enclave can {what}")
        arrived = self.heap_arrival()
        if arrived is not None:
            raise HeapIncomplete(f"cannot {what}: heap still arriving: {arrived} of {self.incoming_chunks} "
                                 "chunks; retry after DONE")
        return self.heap.export_chunks()

    # --- the port the migration code uses (migration/port.py) -------------------------------------------

    def limit_writes(self, rate: float | None, wrote: Any = None) -> dict[str, Any]:
        return self.write_limit.set(rate, wrote)

    def stop(self) -> Snapshot:
        self.write_limit.set(None)  # the app writes no more: held writers go (they find it stopped)
        with self.app_lock:  # at an ECALL boundary: the ECALL in progress finishes first
            chunks = self.whole_heap("migrate")
            assert self.app is not None
            self.life.move(Life.RUNNING, Life.STOPPING)
            stopped_at = time.time()
            try:
                state = with_instance(self.instance, export_app_state(self.app))
                lineage = self.persist.export() if self.persist is not None else None
                sessions = self.sessions.export() if self.sessions is not None else b""
            except BaseException:
                self.life.move(Life.STOPPING, Life.RUNNING)
                raise
        return Snapshot(chunks, state, lineage, stopped_at, sessions)

    def unstop(self) -> None:
        if self.life.state is Life.STOPPING:
            self.life.move(Life.STOPPING, Life.RUNNING)
            if self.sessions is not None:
                self.sessions.thaw()

    def begin_out(self, socks: list[socket.socket], token: str = "") -> None:
        with self.cancel_lock:
            self.cancelled = None
            if self.pending_cancel is not None and token and self.pending_cancel[0] == token:
                self.cancelled = self.pending_cancel[1]  # cancelled while its request was on its way here
            self.pending_cancel = None
            self.migration_token = token
            self.migration_socks = list(socks)

    def end_out(self) -> None:
        with self.cancel_lock:
            self.migration_socks = []

    def cancel_out(self, reason: str, token: str = "") -> control.CancelOutResult:
        """Stop a migration out before its commit point. The migration sees the flag at its next progress
        report (every 0.1 s while it sends) and at the commit point; what it waits to receive ends at once
        (the connections are shut for reading, so its ABORT still reaches the destination, which wipes);
        a send stuck on a silent destination is cut after CANCEL_GRACE_S. Its own error path rolls back."""
        with self.cancel_lock:
            if self.life.state is Life.HANDED_OFF:
                raise MigrationError("the migration passed its commit point (the destination runs the enclave); "
                                     "it cannot be undone and goes on")
            if not self.migration_socks or (token and token != self.migration_token):
                if not token:
                    raise MigrationError("no migration out is in progress")
                self.pending_cancel = (token, reason)  # its migrate_out has not begun here yet
                return control.CancelOutResult(cancelled=True, state=self.life.state)
            self.cancelled = reason
            socks = list(self.migration_socks)
            _shut(socks, socket.SHUT_RD)
        timer = threading.Timer(CANCEL_GRACE_S, self._cut, (socks,))
        timer.daemon = True
        timer.start()
        return control.CancelOutResult(cancelled=True, state=self.life.state)

    def _cut(self, socks: list[socket.socket]) -> None:
        with self.cancel_lock:
            if self.migration_socks == socks and self.life.state is not Life.HANDED_OFF:
                _shut(socks, socket.SHUT_RDWR)

    def hand_off(self) -> None:
        with self.cancel_lock:
            if self.cancelled is not None:
                raise MigrationCancelled(f"migration cancelled before the commit point ({self.cancelled})")
            self.life.move(Life.STOPPING, Life.HANDED_OFF)
        if self.sessions is not None:
            self.sessions.close()

    def leave_lineage(self) -> None:
        if self.persist is not None:
            self.persist.leave()

    def park(self, out: source.Outgoing) -> None:
        self.outgoing = out

    def parked(self) -> source.Outgoing:
        if self.outgoing is None or self.life.state is not Life.HANDED_OFF:
            raise MigrationError(f"enclave is {self.life.state.value} and has no paused migration to resume")
        return self.outgoing

    def reclaim(self) -> None:
        self.life.reclaim()
        self.outgoing = None
        if self.sessions is not None:
            self.sessions.reopen()
        if self.persist is not None:
            self.persist.reinstate()

    def retire(self) -> None:
        self.heap.wipe()
        if self.sessions is not None:
            self.sessions.wipe()
        self.outgoing = None
        self.life.move(Life.HANDED_OFF, Life.DESTROYED)

    def expect_incoming(self) -> None:
        self.life.require(Life.INCOMING)

    def import_state(self, blob: bytes, wrap: Any = None) -> EnclaveApp:
        instance, state = split_instance(blob)
        if instance is None:
            raise EnclaveError("the incoming small state names no enclave instance")
        app = import_app_state(self.app_cls, self.heap, state, wrap=wrap)
        self.instance = instance  # takes effect for sessions at COMMIT (run_incoming)
        return app

    def about(self) -> About:
        return About(self.instance, self.code_hash, self.launch)

    def hold_lineage(self, lineage: Lineage, release_hash: bytes) -> None:
        if self.persist is None:
            raise EnclaveError("this instance has no persistent-state store for the incoming lineage")
        self.persist.adopt(lineage, release_hash)

    def forget_lineage(self) -> None:
        if self.persist is not None:
            self.persist.forget()

    def confirm_lineage(self) -> None:
        if self.persist is not None:
            try:
                self.persist.confirm()
            except LineageHeld as e:  # another instance holds the lineage: this copy loses and stops
                self.figures["lineage_error"] = str(e)
                self.app = None
                self.heap.wipe()
                self.life.move(Life.RUNNING, Life.DESTROYED)
                raise
            except (ConstmigError, OSError) as e:  # the app runs on; the counter stays pending, and ours
                self.figures["lineage_error"] = str(e)

    def run_incoming(self, app: EnclaveApp, sessions: bytes = b"") -> None:
        if self.sessions is not None:
            self.sessions.adopt(sessions)  # the clients' sessions continue here, same keys and positions
            self.sessions.about = self.about()  # the same instance, here now: sessions may open
        self.app = app
        self.life.move(Life.INCOMING, Life.RUNNING)

    def stream_incoming(self, chunks: int, receiver: Receiver | None) -> None:
        self.incoming_chunks = chunks
        self.receiver = receiver

    def give_up_incoming(self, tombstone: CommitWaiter | None) -> None:
        self.tombstone = tombstone
        self.abandon_incoming()
        self.forget_lineage()  # _give_up did already; kept so no path out of INCOMING leaves one
        self.heap.wipe()
        self.app = None
        self.life.move(Life.INCOMING, Life.DESTROYED)

    # --- ECALLs and the agent's requests ---------------------------------------------------------------

    def ecall(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """An unsealed ECALL from the host: only when the enclave was launched to take them (measured)."""
        if not self.plain_calls:
            raise EnclaveError(f"{self.app_name} takes calls only over an attested session (it was not "
                               "launched with --plain-calls)")
        try:
            with self.app_lock:
                self._runnable()
                return self._run_ecall(name, args, kwargs)
        finally:
            self.write_limit.pay()  # a held writer waits here, outside the lock

    def session_call(self, record: bytes) -> bytes:
        """One sealed request of a client's session: received, run and answered between two ECALLs."""
        assert self.sessions is not None
        try:
            with self.app_lock:
                self._runnable()
                return self.sessions.call(record, self._run_ecall)
        finally:
            self.write_limit.pay()

    def _runnable(self) -> None:
        if self.life.state is not Life.RUNNING or self.app is None:  # not run: the caller may retry
            raise EnclaveNotRunning(f"enclave is {self.life.state.value}; it does not run ECALLs now")
        self.tracking.settle(self.app)

    def _run_ecall(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if name not in self.app_cls.ecalls():
            known = ", ".join(sorted(self.app_cls.ecalls()))
            raise EnclaveError(f"{self.app_name} has no ECALL {name!r}; known: {known}")
        try:
            with self.write_limit.call():
                return getattr(self.app, name)(*args, **kwargs)
        except TypeError as e:
            raise EnclaveError(f"bad arguments for {name}: {e}") from None

    def checkpoint(self, folder: str, name: str, final: bool = False) -> dict[str, Any]:
        """Seal the app's state to folder/name.v<version>.ckpt, bound to the next counter value. A `final`
        checkpoint (the agent is stopping) also ends the app: no ECALL after it could be restored."""
        with self.app_lock:  # between ECALLs: a consistent state
            chunks = self.whole_heap("checkpoint")
            assert self.persist is not None and self.app is not None
            spec = {"app": self.app_name, "heap": self.heap.size, "chunk_size": self.heap.chunk_size,
                    "config": self.config, "svn": self.identity.svn, "plain_calls": self.plain_calls}
            done = self.persist.checkpoint(Path(folder), name, spec, self.heap,
                                           with_instance(self.instance, export_app_state(self.app)), chunks)
            if final:
                self.life.move(Life.RUNNING, Life.STOPPING)  # for good: the process ends next
            return done

    def status(self) -> control.EnclaveInfo:
        arrived = self.heap_arrival() if self.life.state is Life.RUNNING else None
        return control.EnclaveInfo(
            app=self.app_name,
            state=self.life.state,
            heap_bytes=self.heap.size,
            chunk_size=self.heap.chunk_size,
            used_bytes=self.heap.used_bytes,
            measurement=self.identity.measurement.hex(),
            instance=self.instance.hex(),
            svn=self.identity.svn,
            platform=self.backend.platform_id,
            pid=os.getpid(),
            tracker=self.tracking.name,
            sessions=len(self.sessions) if self.sessions is not None else 0,
            plain_calls=self.plain_calls,
            streaming=(self.receiver.stats or {"complete": False, "error": self.receiver.error})
            if self.receiver is not None else None,
            heap_arriving=(arrived, self.incoming_chunks) if arrived is not None else None,
        )


def launch_text(app_name: str, config: dict[str, Any]) -> str:
    """The launch configuration as measured (and as sessions report it, so a client can say what differs)."""
    return json.dumps({"app": app_name, **config}, sort_keys=True)


def measure_app(app_name: str, config: dict[str, Any]) -> bytes:
    """The measurement: the app's code (which class of it runs, and its source, svn included) and its
    launch config (heap layout is part of what runs)."""
    return measure(app_source(app_name), launch_text(app_name, config).encode())


def build_enclave(args: argparse.Namespace) -> Enclave:
    from constmig.tee.sim import SimPlatform

    config = json.loads(args.config) if args.config else {}
    app_cls = load_app(args.app)
    backend = SimPlatform.open(Path(args.platform_dir), Path(args.root_pem))
    launch = launch_text(args.app, {"heap": args.heap, "chunk": args.chunk_size, **config,
                                    **({"plain_calls": True} if args.plain_calls else {})})
    if len(launch) > MAX_LAUNCH:  # sessions report it to clients, bounded (wire/session.py)
        raise ConfigError(f"the launch configuration is {len(launch)} characters; at most {MAX_LAUNCH} fit")
    source_code = app_source(args.app)
    identity = Identity(
        measurement=measure(source_code, launch.encode()),
        signer=hashlib.sha256(DEV_SIGNER).digest(),
        product_id=1,
        svn=app_cls.svn,
    )
    heap = Heap(args.heap, args.chunk_size)
    incoming = args.mode == "incoming"
    persist = Persistence(backend, identity, Path(args.platform_dir) / "enclaves")
    # before any thread starts or the heap is touched (the Fault Tracker registers it untouched)
    tracking, figures = trackers.launch(args.tracker, heap, sys.modules[app_cls.__module__],
                                        Path(args.socket).with_suffix(".pager.json"), incoming)
    enclave = Enclave(
        app_name=args.app,
        app_cls=app_cls,
        heap=heap,
        life=Lifecycle(Life.INCOMING if incoming else Life.CREATED),
        identity=identity,
        backend=backend,
        policy=Policy(),  # the downgrade rule compares SVNs; min_svn is for an owner-set floor
        config=config,
        tracking=tracking,
        figures=figures,
        persist=persist,
        resume_path=Path(args.socket).with_suffix(".resume.sock") if incoming else None,
        sessions=SessionTable(backend, identity),
        plain_calls=args.plain_calls,
        code_hash=hashlib.sha256(source_code).digest(),
        launch=launch,
    )
    if args.mode == "restore":
        blob = persist.restore(Path(args.restore), heap, bytes.fromhex(args.release) if args.release else None)
        instance, state = split_instance(blob)
        enclave.app = import_app_state(app_cls, heap, state)
        # a checkpoint sealed before instances had ids: this restore names one, from now on kept
        enclave.instance = instance or os.urandom(INSTANCE_SIZE)
        enclave.life.move(Life.CREATED, Life.RUNNING)
    elif not incoming:
        enclave.app = app_cls(heap)
        enclave.app.setup(**config)
        enclave.instance = os.urandom(INSTANCE_SIZE)  # a new enclave: a new instance
        enclave.life.move(Life.CREATED, Life.RUNNING)
    if enclave.instance and enclave.sessions is not None:
        enclave.sessions.about = enclave.about()
    return enclave


CANCEL_GRACE_S = 2.0  # a cancelled migration's sends get this long to finish its ABORT before they are cut


def _shut(socks: list[socket.socket], how: int) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(how)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def handle(enclave: Enclave, fs: FramedSocket, frame: dict[str, Any], fds: list[int]) -> control.Reply | None:
    """One request, decoded here into its control struct; returns the reply, or None when the process
    should exit after replying. A migrate_in that is itself malformed is refused as any failure of an
    incoming migration before COMMIT is: this instance is wiped."""
    try:
        req = control.decode(frame, control.EnclaveRequest)
    except control.BadRequest as e:
        _close(fds)
        if control.op(frame) == "migrate_in":
            destination.refuse(enclave, str(e))
        raise
    if not isinstance(req, control.MigrateOut | control.MigrateIn | control.ResumeOut) and fds:
        _close(fds)  # no other request takes descriptors
        fds = []
    if isinstance(req, control.Ecall):
        return control.ok(enclave.ecall(req.name, req.args, req.kwargs))
    if isinstance(req, control.EnclaveSessionOpen):
        assert enclave.sessions is not None
        return control.ok(enclave.sessions.open(req.hello))
    if isinstance(req, control.EnclaveSessionCall):
        return control.ok(enclave.session_call(req.record))
    if isinstance(req, control.EnclaveStatus):
        return control.ok(enclave.status())
    if isinstance(req, control.Seal):
        return control.ok(enclave.checkpoint(req.folder, req.name, req.final))
    if isinstance(req, control.CancelOut):
        return control.ok(enclave.cancel_out(req.reason or control.CANCEL_REASON, req.token))
    if isinstance(req, control.CheckExport):  # the agent asks before it prepares a destination: same gate
        return control.ok(control.CheckExportResult(chunks=int(enclave.whole_heap(req.what).size)))
    if isinstance(req, control.Shutdown):
        return None
    if not 1 <= len(fds) <= 2:
        _close(fds)
        raise EnclaveError(f"{control.op(req)} needs one or two connection descriptors, got {len(fds)}")
    socks = [socket.socket(fileno=fd) for fd in fds]
    for sock in socks:
        sock.setblocking(True)

    def progress(info: dict[str, Any]) -> None:
        fs.send(control.Progress(info))

    try:
        if isinstance(req, control.MigrateOut):
            result = source.run(enclave, socks, req, progress)
        elif isinstance(req, control.ResumeOut):
            result = source.resume(enclave, socks, req, progress)
        else:
            result = destination.run(enclave, socks, req, progress)
            result["populate_s"] = enclave.figures.get("populate_s")
    finally:
        if enclave.receiver is None:  # otherwise the Access Tracker's receiver streams on them
            for sock in socks:
                sock.close()
    return control.ok(result)


def serve(enclave: Enclave, listener: socket.socket) -> None:
    """Serve each connection the agent opens in a thread of its own, until shutdown or the enclave is
    gone: a migration's handshake runs while calls go on, and a status request never waits behind a
    migration (the enclave's app lock keeps ECALLs, checkpoints and the stop serialized)."""
    done = threading.Event()
    listener.settimeout(ACCEPT_POLL_S)
    while not done.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_serve_connection, args=(enclave, conn, done), name="conn", daemon=True).start()


def _serve_connection(enclave: Enclave, conn: socket.socket, done: threading.Event) -> None:
    fs = FramedSocket(conn)
    try:
        while not done.is_set():
            frame, fds = fs.recv()
            try:
                reply = handle(enclave, fs, frame, fds)
            except ConstmigError as e:
                reply = control.refused(str(e), kind=type(e).__name__, state=enclave.life.state,
                                        tombstone=enclave.tombstone is not None)
            except Exception as e:  # an app bug must not kill the enclave and its data
                traceback.print_exc(file=sys.stderr)
                reply = control.refused(f"internal error in enclave: {type(e).__name__}: {e}", kind="InternalError",
                                        state=enclave.life.state)
            if reply is None:
                fs.send(control.ok("bye"))
                done.set()
                return
            try:
                encode(reply)
            except ProtocolError as e:  # a result the wire cannot carry must not end the enclave
                reply = control.refused(f"the ECALL's result cannot be sent back: {e}", kind="EnclaveError",
                                        state=enclave.life.state)
            fs.send(reply)
            if enclave.life.state is Life.DESTROYED and enclave.tombstone is None:
                done.set()  # a tombstone stays, answering the source's reconnects, until the agent stops it
                return
    except ChannelClosed:
        pass
    finally:
        fs.close()


def main(argv: list[str] | None = None) -> int:
    from constmig.units import parse_size

    p = argparse.ArgumentParser(prog="constmig-enclave")
    p.add_argument("--app", required=True)
    p.add_argument("--heap", required=True, type=parse_size)
    p.add_argument("--chunk-size", type=parse_size, default=1 << 20)
    p.add_argument("--mode", choices=["fresh", "incoming", "restore"], default="fresh")
    p.add_argument("--restore", default="", help="checkpoint file (with --mode restore)")
    p.add_argument("--release", default="", help="hex release code of a lineage left pending here (enclave/persist.py)")
    p.add_argument("--tracker", choices=list(trackers.REGISTRY), default="none")
    p.add_argument("--config", default="")
    p.add_argument("--plain-calls", action="store_true", help="also take unsealed ECALLs from the host")
    p.add_argument("--socket", required=True)
    p.add_argument("--platform-dir", required=True)
    p.add_argument("--root-pem", required=True)
    args = p.parse_args(argv)
    die_with_parent()
    t0 = time.perf_counter()
    try:
        enclave = build_enclave(args)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        listener.bind(args.socket)
        listener.listen(4)
    except ConstmigError as e:
        print(f"error: {e}", flush=True)
        return 1
    print(f"ready {time.perf_counter() - t0:.3f}", flush=True)
    try:
        serve(enclave, listener)
    finally:
        listener.close()
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        if enclave.tombstone is not None:
            enclave.tombstone.close()
        if enclave.resume_path is not None:
            enclave.resume_path.unlink(missing_ok=True)
        enclave.tracking.close()
        Path(args.socket).with_suffix(".pager.json").unlink(missing_ok=True)  # after the pager last wrote it
        enclave.heap.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
