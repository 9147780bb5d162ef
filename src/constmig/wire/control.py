"""The control protocol: every request and reply between the CLI, the agents and the enclave processes.

Typed, tagged msgspec structs, as the enclaves' own protocol is (migration/messages.py): a request is a
map whose "op" names its struct. Each is decoded strictly once, where it enters a process: the agent's
dispatch (`decode(frame, AgentRequest)`), the enclave's request loop (`EnclaveRequest`), the resume
socket (`ResumeIn`) and the pager (`PagerRequest`). An unknown op or a bad field is one line
(`BadRequest`), never a half-read dict. The options' defaults live here, once (DEFAULT_STRATEGY and the
rest): the CLI, the agent and the enclave all read them from these structs.

Sans-IO, as h11 is: structs in, bytes out (`encode`), and back (`decode`); wire/framing.py carries the
bytes (a struct is framed as the map it encodes to: the wire is what the hand-built dicts were).

Who may ask for which agent request is host/admin.py's table (by op name). It lives in wire/ because the
enclave process decodes it too (trusted code imports nothing from host/); it reads the lifecycle enum
(enclave/lifecycle.py) and the option names (migration/constants.py), which depend on nothing but errors.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, TypeVar, get_args

import msgspec

from constmig.enclave.lifecycle import Life
from constmig.errors import AgentError, ConfigError, ProtocolError
from constmig.migration.constants import DATA_CHANNELS, STRATEGIES, TRACKERS, WRITE_TRACKING
from constmig.units import wait_seconds

_BYTES = (bytes, bytearray, memoryview)  # bytes stay bytes: a str is never read as base64

# ---- the defaults, once ------------------------------------------------------------------------------

DEFAULT_STRATEGY = "auto"  # flat downtime and the shortest waits on every workload: see README.md
DEFAULT_TRACKER = "auto"  # the destination picks: fault where userfaultfd works, else access
DEFAULT_TIMEOUT_S = 120.0  # a migration's per-step timeout
RESUME_DEADLINE_S = 30.0  # how long a migration that broke after its handoff keeps reconnecting
DEFAULT_CHUNK = 1 << 20
DEFAULT_WRITE_TRACKING = "auto"  # the kernel's with the Fault Tracker, the enclave's with the Access Tracker
CANCEL_REASON = "cancelled by the operator"
AGENT_TRACKERS = ("auto", *TRACKERS)  # what a request may ask of the destination
ENCLAVE_TRACKERS = ("none", *TRACKERS)  # what a destination runs with
MAX_ROUNDS = 100
DEFAULT_COMPLETION_TIMEOUT_S = 150.0  # per GiB, KubeVirt's default
MAX_THROTTLE = 0.99  # a writer keeps at least 1% of its pace (QEMU: max-cpu-throttle 99)
# what moves the heap's chunks (stop-and-copy, the pre-copy rounds, the stop's rest, and the post-copy stream at
# both ends): the Python channel, or the native engine (docs/native.md)
DATA_PLANES = ("python", "native")
DEFAULT_DATA_PLANE = "python"
_RELEASE = re.compile(r"[0-9a-f]{64}")


class BadRequest(ProtocolError):
    """A control request is malformed: an unknown op, a missing field, a field of the wrong type or out of
    range. One line, naming the op and the field."""


def _one_of(value: str, known: tuple[str, ...], what: str) -> None:
    if value not in known:
        raise BadRequest(f"unknown {what} {value!r}; known: {', '.join(known)}")


class _Checked(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """A control struct. Its fields' types are checked as it is decoded, and then `check()`: its waits
    (`SECONDS`: field name -> may be zero, as units.wait_seconds says: finite, within a day) and each
    struct's own rules. A struct built in this process is checked where it is decoded, not before."""

    SECONDS: ClassVar[dict[str, bool]] = {}

    def check(self) -> None:
        """BadRequest, one line, unless every field is within its rules."""
        for name, zero in self.SECONDS.items():
            value = getattr(self, name)
            if value is not None and value is not msgspec.UNSET:
                try:
                    wait_seconds(value, name, zero=zero)
                except ConfigError as e:
                    raise BadRequest(str(e)) from None


class Request(_Checked, tag_field="op", omit_defaults=False):
    """A request; its struct's tag is its op. Every field travels, defaults too: a receiver with other
    defaults (an agent of another version, in a rolling upgrade) still does what was asked. An option
    left unset (UNSET) travels as no entry: the receiver applies its own (a strategy's, for the rounds)."""


# ---- what the agent runs: its spec ---------------------------------------------------------------------

class LaunchSpec(msgspec.Struct):
    """What the agent asks for; the enclave's measurement covers app, heap, chunk size and config."""

    name: str
    app: str
    heap: int
    chunk_size: int = DEFAULT_CHUNK
    config: dict[str, Any] = {}
    plain_calls: bool = False  # the enclave also takes unsealed ECALLs from the host (part of what is measured)

    def to_wire(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> LaunchSpec:
        try:
            return msgspec.convert(d, cls, builtin_types=_BYTES)
        except msgspec.ValidationError as e:
            raise AgentError(f"bad enclave spec: {e}") from None


# ---- CLI (and other agents) -> agent ---------------------------------------------------------------------

class Ping(Request, tag="ping", kw_only=True):
    """Open to anyone: the agent answers with its name (PingResult), and names no enclave."""


class Status(Request, tag="status", kw_only=True):
    """The agent's view (AgentStatus)."""


class Tls(Request, tag="tls", kw_only=True):
    """Turn this TCP connection into mutual TLS (the answer is a bare Reply, then the handshake)."""


class Shutdown(Request, tag="shutdown", kw_only=True):
    """Stop the agent (and, sent to an enclave, the enclave process)."""


class Run(Request, tag="run", kw_only=True):
    """Launch an enclave (the enclave's EnclaveInfo back)."""

    name: str
    app: str
    heap: int
    chunk_size: int = DEFAULT_CHUNK
    config: dict[str, Any] = {}
    plain_calls: bool = False

    def spec(self) -> LaunchSpec:
        return LaunchSpec(self.name, self.app, self.heap, self.chunk_size, dict(self.config), self.plain_calls)


class Checkpoint(Request, tag="checkpoint", kw_only=True):
    """Seal an enclave's state into the agent's checkpoint folder (CheckpointResult)."""

    name: str


class Restore(Request, tag="restore", kw_only=True):
    """Start an enclave from a sealed checkpoint, with the release code of a lineage held pending here."""

    path: str
    name: str | None = None  # default: from the file name
    release: str = ""

    def check(self) -> None:
        super().check()
        if self.release and not _RELEASE.fullmatch(self.release):
            raise BadRequest("a release code is 64 hex digits, as the source's agent printed it")


class Call(Request, tag="call", kw_only=True):
    """An unsealed ECALL (only an enclave launched with plain calls takes it)."""

    name: str
    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class SessionOpen(Request, tag="session_open", kw_only=True):
    """A client's Hello for the enclave (wire/session.py); its Accept (bytes) back."""

    name: str
    hello: bytes


class SessionCall(Request, tag="session_call", kw_only=True):
    """One sealed record of a client's session; the sealed answer (bytes) back."""

    name: str
    record: bytes


class Stop(Request, tag="stop", kw_only=True):
    name: str
    force: bool = False  # also an enclave holding heap data its migration has not delivered


class _MigrationOptions(Request, kw_only=True):
    """What steers a migration, as the operator asked (Migrate) and as the enclave runs it (MigrateOut)."""

    strategy: str = DEFAULT_STRATEGY
    timeout: float = DEFAULT_TIMEOUT_S
    max_bandwidth: float = 0.0  # bytes per second for the stream while the app runs; 0 = no cap
    # precopy, hybrid: the rounds' goal and their number (None or unset: the strategy's)
    max_downtime: float | None | msgspec.UnsetType = msgspec.UNSET
    max_rounds: int | None | msgspec.UnsetType = msgspec.UNSET
    write_tracking: str = DEFAULT_WRITE_TRACKING
    # precopy, hybrid: the most the enclave may slow the calls that write, as a share of their time, when the
    # rounds do not converge (migration/strategies/converge.py); 0: never
    max_throttle: float | None | msgspec.UnsetType = msgspec.UNSET  # None or unset: the strategy's (auto 0.9)
    # precopy, hybrid: the rounds' time budget, seconds per GiB of heap (at least one GiB's worth), like
    # KubeVirt's completionTimeoutPerGiB: then they end and the stop takes what is left
    completion_timeout: float = DEFAULT_COMPLETION_TIMEOUT_S
    data_plane: str = DEFAULT_DATA_PLANE  # who seals and sends the bulk chunks: "python" or "native"

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False, "max_downtime": True, "completion_timeout": False}

    def check(self) -> None:
        super().check()
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.write_tracking, WRITE_TRACKING, "write tracking")
        _one_of(self.data_plane, DATA_PLANES, "data plane")
        if not (math.isfinite(self.max_bandwidth) and self.max_bandwidth >= 0):
            raise BadRequest(f"max_bandwidth must be a number of bytes per second >= 0, not {self.max_bandwidth!r}")
        if isinstance(self.max_rounds, int) and not 1 <= self.max_rounds <= MAX_ROUNDS:
            raise BadRequest(f"max_rounds must be an integer from 1 to {MAX_ROUNDS}, not {self.max_rounds!r}")
        throttle = self.max_throttle if isinstance(self.max_throttle, (int, float)) else 0.0
        if not (math.isfinite(throttle) and 0 <= throttle <= MAX_THROTTLE):
            raise BadRequest(f"max_throttle must be a share from 0 to {MAX_THROTTLE}, not {self.max_throttle!r}")
        if throttle and self.write_tracking == "kernel":
            raise BadRequest("max_throttle needs the enclave's write tracking (enclave or auto): the kernel's "
                             "cannot tell which call wrote")


class Migrate(_MigrationOptions, tag="migrate", kw_only=True):
    """Migrate an enclave out of this agent to `to` (its figures back, progress frames before)."""

    name: str
    to: str
    tracker: str = DEFAULT_TRACKER  # what the destination tracks missing chunks with (post-copy)
    resume_deadline: float = RESUME_DEADLINE_S

    SECONDS: ClassVar[dict[str, bool]] = {**_MigrationOptions.SECONDS, "resume_deadline": True}

    def check(self) -> None:
        super().check()
        _one_of(self.tracker, AGENT_TRACKERS, "tracker")


class Cancel(Request, tag="cancel", kw_only=True):
    """Cancel a migration out of this agent before its commit point (CancelResult)."""

    name: str
    reason: str = CANCEL_REASON


class Resume(Request, tag="resume", kw_only=True):
    """Resume a migration out that paused after its handoff and gave up reconnecting."""

    name: str
    timeout: float = DEFAULT_TIMEOUT_S
    resume_deadline: float = RESUME_DEADLINE_S

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False, "resume_deadline": True}


class PrepareIn(Request, tag="prepare_in", kw_only=True):
    """One agent asks another to start an empty instance for a migration (PrepareInResult)."""

    spec: LaunchSpec
    strategy: str = DEFAULT_STRATEGY
    source: str = msgspec.field(default="", name="from")  # the source agent (the fleet directory's old entry)
    tracker: str = DEFAULT_TRACKER
    resume_deadline: float = RESUME_DEADLINE_S
    timeout: float = DEFAULT_TIMEOUT_S  # a source that never connects frees the name after this

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False, "resume_deadline": True}

    def check(self) -> None:
        super().check()
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.tracker, AGENT_TRACKERS, "tracker")


class DropIn(Request, tag="drop_in", kw_only=True):
    """The source gave up before sending data: drop the empty instance prepared for it."""

    name: str


class Data(Request, tag="data", kw_only=True):
    """The first frame of a migration's data connection (a bare Reply, then only ciphertext)."""

    name: str
    timeout: float = DEFAULT_TIMEOUT_S
    channel: str = DATA_CHANNELS[0]
    resume: int = 0  # a reconnect of a paused migration: its number of connections

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False}


AgentRequest = (Ping | Status | Tls | Shutdown | Run | Checkpoint | Restore | Call | SessionOpen | SessionCall | Stop
                | Migrate | Cancel | Resume | PrepareIn | DropIn | Data)


# ---- agent -> enclave process ----------------------------------------------------------------------------

class Ecall(Request, tag="ecall", kw_only=True):
    name: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class EnclaveSessionOpen(Request, tag="session_open", kw_only=True):
    hello: bytes


class EnclaveSessionCall(Request, tag="session_call", kw_only=True):
    record: bytes


class EnclaveStatus(Request, tag="status", kw_only=True):
    """The enclave's own view (EnclaveInfo)."""


class Seal(Request, tag="checkpoint", kw_only=True):
    """Seal a checkpoint to folder/name.v<version>.ckpt; `final`: the agent is stopping (the app ends)."""

    folder: str
    name: str
    final: bool = False


class CancelOut(Request, tag="cancel_out", kw_only=True):
    reason: str = CANCEL_REASON
    token: str = ""  # the agent's name for the migration out


class CheckExport(Request, tag="check_export", kw_only=True):
    """Would the enclave export its heap whole now (the gate a migration or checkpoint passes)?"""

    what: str = "migrate"


class MigrateOut(_MigrationOptions, tag="migrate_out", kw_only=True):
    """Run the source's side over the data connections that ride with this frame."""

    token: str = ""
    tracker: str = "none"  # the destination's tracker: the rounds' write tracking follows it

    def check(self) -> None:
        super().check()
        _one_of(self.tracker, ENCLAVE_TRACKERS, "tracker")


class MigrateIn(Request, tag="migrate_in", kw_only=True):
    """Run the destination's side over the data connections that ride with this frame."""

    timeout: float = DEFAULT_TIMEOUT_S
    commit_wait: float = 0.0  # after READY, how long to wait for COMMIT (or a reconnect standing for it)

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False, "commit_wait": True}


class ResumeOut(Request, tag="resume_out", kw_only=True):
    """Reconnect a paused migration out over the connections that ride with this frame."""

    timeout: float = DEFAULT_TIMEOUT_S

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False}


EnclaveRequest = (Ecall | EnclaveSessionOpen | EnclaveSessionCall | EnclaveStatus | Seal | CancelOut | CheckExport
                  | MigrateOut | MigrateIn | ResumeOut | Shutdown)


class ResumeIn(Request, tag="resume_in", kw_only=True):
    """Agent -> an incoming enclave's resume socket: a reconnect's connections ride with it (ResumeInResult)."""

    timeout: float = DEFAULT_TIMEOUT_S

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False}


# ---- enclave process -> its pager (Fault Tracker) ------------------------------------------------------

class PagerInit(Request, tag="init", kw_only=True):
    """The heap the userfaultfd (riding with this frame) watches (PagerReady)."""

    address: int
    size: int
    chunk_size: int


class PagerStream(Request, tag="stream", kw_only=True):
    """After COMMIT: the stream's two connections ride with this frame; the channels' keys, the chunks to
    expect and those in place, and how a reconnect is keyed."""

    main: dict[str, Any]  # wire/channel.py ChannelTicket.to_wire()
    demand: dict[str, Any]
    expected: bytes
    t_resume: float
    resume: dict[str, Any]  # migration/resume.py ResumeSecret.to_wire()
    held: bytes = b""
    held_tags: bytes = b""
    timeout: float = DEFAULT_TIMEOUT_S
    resume_path: str = ""
    epoch: int = 0
    data_plane: str = DEFAULT_DATA_PLANE  # "native": the pager receives the stream through the engine

    SECONDS: ClassVar[dict[str, bool]] = {"timeout": False}


class PagerProgress(Request, tag="progress", kw_only=True):
    """How much of the heap is in (HeapProgress)."""


PagerRequest = PagerInit | PagerStream | PagerProgress

# ---- replies -----------------------------------------------------------------------------------------------


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """The answer to any request: `ok` and its result, or the error in one line and what the caller acts on
    (an error's `kind`; an agent's `redirect`; an enclave's lifecycle `state` and `tombstone`; a data
    connection's `gone`)."""

    ok: bool
    result: Any = None
    error: str = ""
    kind: str = ""
    redirect: str = ""
    state: Life | None = None
    tombstone: bool = False
    gone: bool = False


class Progress(msgspec.Struct, frozen=True):
    """A frame before a long request's Reply (a migration's phases and chunk counts)."""

    progress: dict[str, Any]


def ok(result: Any = None) -> Reply:
    return Reply(ok=True, result=result)


def refused(error: str, **why: Any) -> Reply:
    return Reply(ok=False, error=error, **why)


class PingResult(_Checked, kw_only=True):
    host_id: str
    listen: str


class PrepareInResult(_Checked, kw_only=True):
    host_id: str
    tracker: str
    tracker_reason: str = ""


class CancelResult(_Checked, kw_only=True):
    """An agent's answer to Cancel: the enclave runs `on` that agent."""

    cancelled: bool
    name: str
    state: Life
    on: str


class CancelOutResult(_Checked, kw_only=True):
    """The enclave's answer to CancelOut (also for a cancel that came before its migration)."""

    cancelled: bool
    state: Life


class CheckExportResult(_Checked, kw_only=True):
    chunks: int


class ResumeInResult(_Checked, kw_only=True):
    epoch: int


class PagerReady(_Checked, kw_only=True):
    pid: int


class HeapProgress(_Checked, kw_only=True):
    received: int
    expected: int | None
    complete: bool


class CheckpointResult(_Checked, kw_only=True):
    path: str
    version: int
    chunks: int
    zero_chunks: int
    bytes: int
    seconds: float


class EnclaveInfo(_Checked, kw_only=True):
    """What an enclave says about itself (the agent adds its own view in AgentStatus's rows)."""

    app: str
    state: Life
    heap_bytes: int
    chunk_size: int
    used_bytes: int
    measurement: str
    instance: str
    svn: int
    platform: str
    pid: int
    tracker: str
    sessions: int
    plain_calls: bool
    streaming: dict[str, Any] | None = None  # the Access Tracker's stream receiver
    heap_arriving: tuple[int, int] | None = None  # chunks in, of how many, while an incoming heap arrives


class OutgoingProgress(_Checked, kw_only=True, omit_defaults=False):  # every field, None when unknown
    """A migration out of an agent while it runs, from the source enclave's latest progress frames (sizes
    in bytes, rates in bytes per second; None: no frame said yet). Its figures are the untrusted host's
    view of what the enclave reports, for operators: nothing acts on them."""

    to: str
    strategy: str
    started: float  # the agent's wall clock when it began preparing
    data_plane: str | None = None  # who sends the bulk chunks, as asked (None: a reconnect, which sends none)
    elapsed_s: float = 0.0  # since `started`, as of the answer
    phase: str = ""  # the last frame's: round, round_end, copy, stream, handed_off, ...
    round: int | None = None  # the pre-copy round running (or the last that ended)
    left_bytes: int | None = None  # still to send: of the round running, or what the last round left
    dirty_bytes_per_s: float | None = None  # how fast the app newly wrote chunks in the last round
    ack_bytes_per_s: float | None = None  # how fast the destination acknowledged them in the last round
    throttle: float | None = None  # the share of the writers' pace held back (0 to --max-throttle)
    held_calls: int | None = None  # calls the throttle held so far (as of the last round's end)
    held_s: float | None = None  # and how long, together
    eta_s: float | None = None  # left_bytes / ack_bytes_per_s, when both are known


class AgentStatus(_Checked, kw_only=True):
    """An agent's view: per enclave its status row (host/status.py's status, app, heap_bytes, calls_per_s,
    and while it runs its EnclaveInfo), where the ones that left went, recent migrations' figures (each
    with its outcome), the enclaves of an earlier run that died with it, and the migrations out running
    now (`outgoing`, by enclave; absent from older agents' answers and when none runs)."""

    host_id: str
    listen: str
    enclaves: dict[str, dict[str, Any]]
    moved: dict[str, str]
    migrations: list[dict[str, Any]]
    died: dict[str, dict[str, Any]]
    metrics_url: str | None
    directory: str | None
    admin: dict[str, str]
    memory: dict[str, int]
    outgoing: dict[str, OutgoingProgress] = {}


# ---- encode, decode ----------------------------------------------------------------------------------------

T = TypeVar("T")
_encoder = msgspec.msgpack.Encoder()
_map = msgspec.msgpack.Decoder(dict)


def op(request: msgspec.Struct | dict[str, Any]) -> str:
    """A request's op: its struct's tag (or, from a raw map, its "op" entry)."""
    if isinstance(request, dict):
        return str(request.get("op"))
    tag = request.__struct_config__.tag
    return str(tag)


def encode(message: msgspec.Struct) -> bytes:
    """The msgpack body of one request or reply (wire/framing.py adds the length)."""
    return _encoder.encode(message)


def _members(kind: Any) -> dict[str, type]:
    """A union's structs by tag (one struct: itself)."""
    types = get_args(kind) or (kind,)
    return {str(t.__struct_config__.tag): t for t in types if isinstance(t, type) and t.__struct_config__.tag}


def decode(data: bytes | dict[str, Any], kind: type[T] | Any) -> T:
    """One request (or reply, result) from its msgpack body or its decoded map, into `kind` (a struct or a
    union of requests): BadRequest, in one line, for anything else. A map without "op" decodes into a
    single struct (the in-process drivers and tests hand those to the migration code)."""
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            data = _map.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
            raise BadRequest(f"malformed control message: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"a control message is a map, not {type(data).__name__}")
    members = _members(kind)
    name = data.get("op")
    cls = members.get(name) if isinstance(name, str) else None
    if members and cls is None and ("op" in data or len(members) > 1):
        raise BadRequest(f"unknown request {name!r}")
    target = cls if cls is not None else kind
    try:
        message = msgspec.convert(data, target, builtin_types=_BYTES)
    except msgspec.ValidationError as e:
        raise BadRequest(_explain(target, data, e)) from None
    try:
        message.check()
    except BadRequest as e:
        raise BadRequest(f"{_what(target)}: {e}") from None
    return message


def _what(cls: Any) -> str:
    tag = getattr(cls, "__struct_config__", None) and cls.__struct_config__.tag
    return f"bad {tag!r} request" if isinstance(cls, type) and issubclass(cls, Request) else \
        f"bad {getattr(cls, '__name__', 'control message')}"


def _explain(cls: Any, data: dict[str, Any], e: msgspec.ValidationError) -> str:
    """One line naming the op and the field; a wait of the wrong type says what a wait must be."""
    what = _what(cls)
    at = re.search(r"- at `\$\.(\w+)`$", str(e))
    seconds: dict[str, bool] = getattr(cls, "SECONDS", {})
    if at and at.group(1) in seconds:
        try:
            wait_seconds(data.get(at.group(1)), at.group(1), zero=seconds[at.group(1)])
        except ConfigError as why:
            return f"{what}: {why}"
    return f"{what}: {e}"


def result(reply_result: Any, kind: type[T]) -> T:
    """A reply's result as the struct it should be (ProtocolError, one line, if it is not)."""
    try:
        return msgspec.convert(reply_result, kind, builtin_types=_BYTES)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"malformed {getattr(kind, '__name__', kind)}: {e}") from None


def reply(data: dict[str, Any]) -> Reply:
    """A Reply from its decoded map (ProtocolError, one line, for anything else)."""
    try:
        return msgspec.convert(data, Reply, builtin_types=_BYTES)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"malformed reply: {e}") from None


def builtins(message: msgspec.Struct) -> Any:
    """A struct as the plain map it travels as (bytes stay bytes; enums become their values)."""
    return msgspec.to_builtins(message, builtin_types=_BYTES)
