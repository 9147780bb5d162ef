"""Control messages between the two enclaves, carried encrypted in CONTROL records.

Typed, tagged msgspec structs: decoding is strict, so a forged or garbled message is a ProtocolError,
never a half-read object.
"""

from __future__ import annotations

import msgspec

from constmig.errors import ProtocolError


class StateMsg(msgspec.Struct, tag="state", frozen=True):
    """The small state that moves at the stop: app state blob, heap layout, the chunks to expect."""

    strategy: str
    app_state: bytes
    heap_size: int
    chunk_size: int
    chunks: bytes  # int64 little-endian chunk indices, ascending
    stop_time: float  # source wall clock at the stop (for the downtime figure)
    # the enclave's persistent-state lineage (see enclave/persist.py); empty if it never checkpointed
    lineage: bytes = b""
    lineage_key: bytes = b""
    lineage_version: int = 0
    # chunks whose last pre-copy-round version is current (int64 little-endian, ascending): the
    # destination keeps those and makes every other chunk a round brought missing again
    held: bytes = b""
    # the clients' sessions (wire/session.py): keys and positions, so each continues at the destination
    sessions: bytes = b""
    # with a lineage: the hash of the code that releases it (enclave/persist.py); the destination holds
    # the lineage pending on it from READY until COMMIT
    release_hash: bytes = b""
    # who moves the post-copy stream (the request's data_plane): "native", the destination receives through
    # the engine too (docs/native.md step 2b), where it has one
    data_plane: str = "python"


class RoundEnd(msgspec.Struct, tag="round_end", frozen=True):
    """A pre-copy round is out: `count` chunk records since the last one (rounds count from 1). `stale`
    (int64 little-endian, ascending) names chunks an earlier round sent that were written since and
    will not come again before the stop: the destination lets go of them now, not in the downtime."""

    round: int
    count: int
    stale: bytes = b""


class RoundAck(msgspec.Struct, tag="round_ack", frozen=True):
    """The destination holds the round: what the source measures its rate by, and waits for before the
    stop (so no backlog of unread chunks becomes downtime)."""

    round: int
    count: int


class HeapEnd(msgspec.Struct, tag="heap_end", frozen=True):
    """All chunks meant to precede the handoff have been sent."""

    count: int


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Destination holds and checked everything it needs to resume."""

    digest: bytes


class Commit(msgspec.Struct, tag="commit", frozen=True):
    """The handoff: the source has recorded HANDED_OFF and will never run the app again."""


class Resumed(msgspec.Struct, tag="resumed", frozen=True):
    """The destination resumed the app (downtime ended at resume_time)."""

    resume_time: float


class Demand(msgspec.Struct, tag="demand", frozen=True):
    """The destination needs these chunks now (a fault or a tracked access).

    `offset` (bytes into the first chunk) is where the access waits: that piece is sent first. `whole`
    asks for each chunk as one record instead (a tracker that can use a chunk only when all of it is in)."""

    index: int
    count: int = 1
    offset: int = 0
    whole: bool = False


class Done(msgspec.Struct, tag="done", frozen=True):
    """Every chunk arrived; digest over (migration id, count, chunk tags) proves which."""

    count: int
    digest: bytes
    stats: dict[str, float | int | str] = {}  # destination's streaming figures (tracker, demand counts...)


class Abort(msgspec.Struct, tag="abort", frozen=True):
    reason: str


Message = StateMsg | RoundEnd | RoundAck | HeapEnd | Ready | Commit | Resumed | Demand | Done | Abort

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _enc.encode(msg)


def decode(data: bytes) -> Message:
    try:
        return _dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed migration message: {e}") from None
