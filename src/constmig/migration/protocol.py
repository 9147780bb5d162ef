"""The migration protocol's rules as pure transition tables (h11-style, no I/O).

Each side owns one Machine, with the edges its strategy removes taken out (strategies/). Drivers call
`sent(msg)` before sending and `received(msg)` after receiving; anything the table does not allow
raises ProtocolError and moves the machine to ABORTED (before the handoff) or PAUSED (after it).
Attack tests feed forged event sequences straight into these machines.

The commit point is the source's transition READY_RECEIVED -> HANDED_OFF, taken before COMMIT is sent.
So from READY on the destination waits for COMMIT or, if the link broke, a keyed reconnect from the
source (which only a handed-off source makes): either commits it.
Before it, every failure ends in ABORTED and the source runs on; after it, the source never runs the
app again, and a failure ends in PAUSED with every chunk still held for recovery. One exception keeps
a lost or forged COMMIT from leaving no live copy: an authenticated ABORT from the destination before
its RESUMED proves the destination never ran the app and wiped itself, so the source's machine goes to
ABORTED and the source may run again (the destination only sends ABORT before it commits).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable
from typing import Literal, Protocol

from constmig.errors import ProtocolError
from constmig.migration import messages as m


class Edges(Protocol):
    """What the tables need of a strategy (strategies/base.py): its name and the edges it removes."""

    name: str
    removed_edges: dict[str, dict[St, dict[tuple[str, str], str]]]


class St(enum.Enum):
    CONNECTED = "connected"
    ROUND_SENT = "round-sent"  # source: a pre-copy round is out, waiting for the destination to hold it
    ROUND_RECEIVED = "round-received"  # destination: a pre-copy round is in, acknowledging it
    STATE_SENT = "state-sent"  # source: small state out, pre-handoff chunks may follow
    RECEIVING = "receiving"  # destination: small state in, pre-handoff chunks may follow
    AWAIT_READY = "await-ready"
    HEAP_RECEIVED = "heap-received"
    READY_SENT = "ready-sent"
    READY_RECEIVED = "ready-received"
    HANDED_OFF = "handed-off"  # source, after the commit point
    PEER_RUNNING = "peer-running"  # source: the destination said it resumed
    COMMITTED = "committed"  # destination got COMMIT
    RUNNING = "running"  # destination resumed; background chunks may still arrive
    COMPLETE = "complete"
    ABORTED = "aborted"
    PAUSED = "paused"


Role = Literal["source", "destination"]
CHUNK = "chunk"  # chunk records are events too, though not control messages
RECONNECT = "reconnect"  # a reconnect's keyed hello (resume.py), checked before it gets here
HAVE = "have"  # a reconnect's first record: what the destination holds (it runs the app)

# {role: {state: {(direction, event): next_state}}}
TABLE: dict[str, dict[St, dict[tuple[str, str], St]]] = {
    "source": {
        St.CONNECTED: {("send", CHUNK): St.CONNECTED, ("send", "round_end"): St.ROUND_SENT,  # pre-copy rounds
                       ("send", "state"): St.STATE_SENT},
        St.ROUND_SENT: {("recv", "round_ack"): St.CONNECTED},
        St.STATE_SENT: {("send", CHUNK): St.STATE_SENT, ("send", "heap_end"): St.AWAIT_READY},
        St.AWAIT_READY: {("recv", "ready"): St.READY_RECEIVED},
        St.READY_RECEIVED: {("send", "commit"): St.HANDED_OFF},
        St.HANDED_OFF: {
            ("send", CHUNK): St.HANDED_OFF,
            ("recv", "resumed"): St.PEER_RUNNING,
            ("recv", HAVE): St.PEER_RUNNING,  # a reconnect's HAVE says the destination runs (resume.py)
            ("recv", "demand"): St.HANDED_OFF,  # demands travel apart from RESUMED and may overtake it
        },
        St.PEER_RUNNING: {
            ("send", CHUNK): St.PEER_RUNNING,
            ("recv", HAVE): St.PEER_RUNNING,
            ("recv", "demand"): St.PEER_RUNNING,
            ("recv", "done"): St.COMPLETE,
        },
        St.COMPLETE: {},
        St.ABORTED: {},
        St.PAUSED: {},
    },
    "destination": {
        St.CONNECTED: {("recv", CHUNK): St.CONNECTED, ("recv", "round_end"): St.ROUND_RECEIVED,
                       ("recv", "state"): St.RECEIVING},
        St.ROUND_RECEIVED: {("send", "round_ack"): St.CONNECTED},
        St.RECEIVING: {("recv", CHUNK): St.RECEIVING, ("recv", "heap_end"): St.HEAP_RECEIVED},
        St.HEAP_RECEIVED: {("send", "ready"): St.READY_SENT},
        # A keyed reconnect after READY stands for a COMMIT lost with the link (resume_server.py).
        St.READY_SENT: {("recv", "commit"): St.COMMITTED, ("recv", RECONNECT): St.COMMITTED},
        St.COMMITTED: {("send", "resumed"): St.RUNNING, ("send", HAVE): St.RUNNING},
        St.RUNNING: {
            ("recv", CHUNK): St.RUNNING,
            ("send", "demand"): St.RUNNING,
            ("send", "done"): St.COMPLETE,
        },
        St.COMPLETE: {},
        St.ABORTED: {},
        St.PAUSED: {},
    },
}

# States after the commit point: failures there pause instead of aborting.
_COMMITTED = {
    "source": frozenset({St.HANDED_OFF, St.PEER_RUNNING, St.PAUSED, St.COMPLETE}),
    "destination": frozenset({St.COMMITTED, St.RUNNING, St.PAUSED, St.COMPLETE}),
}


def event_name(msg: m.Message | str) -> str:
    return msg if isinstance(msg, str) else type(msg).__struct_config__.tag  # type: ignore[attr-defined]


class Machine:
    """One side's protocol state. Pure: it only says whether an event is allowed, and what follows."""

    def __init__(self, role: Role, state: St = St.CONNECTED, strategy: Edges | None = None) -> None:
        """`state` other than CONNECTED continues a machine in another process (post-copy's pager).
        `strategy` removes the edges it does not allow (post-copy: no chunk before the handoff)."""
        if role not in TABLE:
            raise ValueError(f"unknown role {role!r}")
        if state not in TABLE[role]:
            raise ValueError(f"{role} has no state {state!r}")
        self.role = role
        self.state = state
        self._removed = strategy.removed_edges.get(role, {}) if strategy is not None else {}
        self._table = {st: {edge: nxt for edge, nxt in edges.items() if edge not in self._removed.get(st, {})}
                       for st, edges in TABLE[role].items()}
        self.history: list[St] = [state]
        self._lock = threading.Lock()  # post-copy drives one machine from several threads

    @property
    def committed(self) -> bool:
        return self.state in _COMMITTED[self.role]

    def _step(self, direction: str, msg: m.Message | str) -> St:
        with self._lock:
            return self._step_locked(direction, msg)

    def _step_locked(self, direction: str, msg: m.Message | str) -> St:
        name = event_name(msg)
        if name == "abort" and direction == "recv" and self.role == "source" and self.state is St.HANDED_OFF:
            return self._set(St.ABORTED)  # the destination gave up before resuming: see the module doc
        if name == "abort" and self.state not in (St.COMPLETE, St.ABORTED, St.PAUSED):
            return self._set(St.PAUSED if self.committed else St.ABORTED)
        if name == "abort" and direction == "send" and self.state is St.ABORTED:
            return self.state  # a side that failed (e.g. on an event the table refused) still tells its peer
        nxt = self._table[self.state].get((direction, name))
        if nxt is None:
            before = self.state
            self._fail_locked()
            verb = "receive" if direction == "recv" else "send"
            why = self._removed.get(before, {}).get((direction, name))
            raise ProtocolError(f"{self.role} cannot {verb} {name!r} in state {before.value}"
                                + (f": {why}" if why else ""))
        return self._set(nxt)

    def _set(self, st: St) -> St:
        self.state = st
        self.history.append(st)
        return st

    def sent(self, msg: m.Message | str) -> St:
        """Record that we are about to send `msg` (call before the bytes go out)."""
        return self._step("send", msg)

    def received(self, msg: m.Message | str) -> St:
        """Record that `msg` arrived; raises ProtocolError if it is not allowed now."""
        return self._step("recv", msg)

    def fail(self) -> St:
        """The link broke or a check failed: abort before the commit point, pause after it."""
        with self._lock:
            return self._fail_locked()

    def _fail_locked(self) -> St:
        if self.state in (St.COMPLETE, St.ABORTED, St.PAUSED):
            return self.state
        return self._set(St.PAUSED if self.committed else St.ABORTED)


BEGIN_DIAGRAM = "<!-- generated by constmig.migration.protocol.diagram(); tests/migration/test_protocol.py checks it -->"
END_DIAGRAM = "<!-- end of generated diagram -->"


def diagram(strategies: Iterable[Edges] = ()) -> str:
    """The tables as Mermaid state diagrams, for docs/protocol.md, and the edges each strategy removes."""
    out = []
    for role, states in TABLE.items():
        out.append(f"### {role}\n\n```mermaid\nstateDiagram-v2")
        for st, edges in states.items():
            for (direction, ev), nxt in edges.items():
                out.append(f"    {st.name} --> {nxt.name}: {direction} {ev}")
        out.append("```\n")
    removed = [(s.name, role, st, edge, why) for s in strategies for role, states in s.removed_edges.items()
               for st, edges in states.items() for edge, why in edges.items()]
    if removed:
        out.append("Edges a strategy removes:\n")
        out += [f"* `{name}`, {role}: {st.name} --{edge[0]} {edge[1]}--> ({why})" for name, role, st, edge, why in removed]
        out.append("")
    return "\n".join(out)
