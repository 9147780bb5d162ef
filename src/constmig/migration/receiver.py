"""The destination's half of post-copy streaming, shared by both trackers.

Chunks arrive on two channels (background and demand); each is verified before it is installed and
counted at most once. How a chunk is installed is the tracker's business (the Fault Tracker's pager
copies it in with UFFDIO_COPY; the Access Tracker decrypts it in place and flips its bitmap), so
that is an `Installer`. When the ledger is complete the receiver sends DONE with its digest and the
streaming figures. Any failure pauses: nothing more is installed, missing chunks stay missing (an
access to one waits; it never sees unverified or zero bytes), and the source keeps them. A reconnect
(resume.py) gives the receiver new links: half-received chunks are dropped and asked for again.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import numpy as np
import numpy.ma  # noqa: F401  np.unique imports it on first use (10-20 ms): not at the first fault

from constmig.enclave.heap import chunk_runs
from constmig.errors import ChannelClosed, ConstmigError, ProtocolError, RecvTimeout
from constmig.migration import messages as m
from constmig.migration.ledger import PIECE, ChunkLedger, pieces_tag
from constmig.migration.link import Link
from constmig.migration.priority import DEMAND_QUIET_S, BackgroundCores, boost_this_thread
from constmig.migration.streamer import MAX_DEMAND
from constmig.wire.channel import Arrival, OpenedChunk, SealedChunk, SecureChannel


class Installer(Protocol):
    pieces_visible: bool  # does a piece become visible to the app before its whole chunk is in?

    def scratch(self, demand: bool) -> np.ndarray:
        """The receive thread's own scratch (one chunk): the native data plane opens its records there."""

    def install(self, index: int, sealed: Arrival, chan: SecureChannel, *, demand: bool) -> None:
        """Verify `sealed` (channel.verified: a native arrival is verified already, in `scratch(demand)`)
        and make chunk `index` readable by the app. `demand` says which receive thread calls: the two run
        at once, so each needs scratch memory of its own."""

    def install_piece(self, index: int, piece: int, sealed: Arrival, chan: SecureChannel) -> None:
        """Verify one PIECE of chunk `index` and put it in place (visible at once for the Fault
        Tracker; for the Access Tracker only with `chunk_done`)."""

    def chunk_done(self, index: int) -> None:
        """Every piece of chunk `index` is in."""

    def chunk_failed(self, index: int) -> None:
        """A piece of chunk `index` failed: none of it may count."""

    def fail(self, reason: str) -> None:
        """The migration paused: accesses to missing chunks wait (until a reconnect or their timeout)."""

    def resumed(self) -> None:
        """A reconnect brought the stream back."""

    def figures(self) -> dict[str, Any]:
        """The tracker's own figures, joined to the receiver's when the heap is whole (and sent in DONE)."""


def percentile_us(samples: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(samples) * 1e6, q)), 1) if samples else None


HIST_BINS_PER_DECADE = 10  # fault latency histogram: bin k covers [10**(k/10), 10**((k+1)/10)) microseconds
HIST_MAX_BIN = 70  # 10 s; slower faults land in the last bin, sub-microsecond ones in bin 0


def segment_figures(prefix: str, segments: dict[str, list[float]]) -> dict[str, Any]:
    """p50, p99 and the histogram of each segment, as `{prefix}_{segment}_us_p50` etc."""
    out: dict[str, Any] = {}
    for name, samples in segments.items():
        if samples:
            out[f"{prefix}_{name}_us_p50"] = percentile_us(samples, 50)
            out[f"{prefix}_{name}_us_p99"] = percentile_us(samples, 99)
            out[f"{prefix}_{name}_hist"] = latency_histogram(samples)
    return out


def parse_histogram(text: str | None) -> tuple[int, np.ndarray] | None:
    """"B:FIRST:c,c,..." (receiver.latency_histogram) -> (bins per decade, counts from bin 0)."""
    if not text:
        return None
    try:
        per_decade, first, counts = text.split(":", 2)
        b, f = int(per_decade), int(first)
        cs = [int(c) for c in counts.split(",")]
    except ValueError:
        return None
    if b <= 0 or f < 0 or any(c < 0 for c in cs):
        return None
    return b, np.concatenate((np.zeros(f, dtype=np.int64), np.asarray(cs, dtype=np.int64)))


def latency_histogram(samples: list[float]) -> str | None:
    """Fault latencies (seconds) as a compact log-binned histogram, "10:FIRST:c,c,...", or None if empty.

    Why: the figures carry p50/p99/max only, but a latency distribution (CDF) needs the shape; a
    fixed-resolution histogram (10 bins per decade, about 26% wide) stays under a few hundred bytes in
    DONE however many faults there were. FIRST is the index of the first listed bin; trailing empty
    bins are left out.
    """
    if not samples:
        return None
    us = np.maximum(np.asarray(samples, dtype=np.float64) * 1e6, 1.0)
    bins = np.clip(np.floor(np.log10(us) * HIST_BINS_PER_DECADE), 0, HIST_MAX_BIN).astype(np.int64)
    counts = np.bincount(bins, minlength=HIST_MAX_BIN + 1)
    nz = np.flatnonzero(counts)
    first, last = int(nz[0]), int(nz[-1])
    return f"{HIST_BINS_PER_DECADE}:{first}:" + ",".join(str(int(c)) for c in counts[first:last + 1])


class Receiver:
    """Receives the streamed heap on `main` and `demand`, with demand requests going out on `demand`."""

    def __init__(self, main: Link, demand: Link, ledger: ChunkLedger, installer: Installer, *, chunk_size: int,
                 tracker: str, t_resume: float, native: bool = False) -> None:
        """`native`: the engine receives and opens each record into the thread's scratch, the GIL released
        (the native data plane, docs/native.md step 2b); the rest (checks, installs, ledger) is the same."""
        self.main, self.demand, self.ledger, self.installer = main, demand, ledger, installer
        self.native = native
        self.chunk_size = chunk_size
        self.pieces = chunk_size // PIECE  # a demanded chunk comes as this many records (unless whole)
        self._partial: dict[int, list[bytes | None]] = {}  # chunk -> piece tags so far (demand path)
        self.tracker = tracker
        self.t_resume = t_resume
        n = ledger.n_chunks
        self._lock = threading.Lock()
        self._inflight = np.zeros(n, dtype=bool)
        self._requested = np.zeros(n, dtype=bool)
        self._t_wait: dict[int, float] = {}  # chunk -> when an access first waited for it
        self._last_wait = 0.0  # monotonic time an access last asked for a chunk (the background's cores)
        self._t_asked: dict[int, float] = {}  # chunk -> when its demand went out (waited-for chunks only)
        self._t_back: dict[int, float] = {}  # chunk -> when its first record came back on the demand channel
        self.latencies: list[float] = []
        # where a waited-for chunk's time goes, per segment (seconds): queued before its demand went out;
        # out and back (the wire both ways and the source's service, which the source measures itself);
        # its first record verified and installed until the access goes on
        self.segments: dict[str, list[float]] = {"queued": [], "round_trip": [], "install": []}
        self.demand_chunks = 0
        self.background_chunks = 0
        self.requested_chunks = 0
        self.recv_s = 0.0  # time the receive threads waited for records (together)
        self.install_s = 0.0  # time they spent verifying and installing chunks
        self.error: str | None = None
        self.finished = threading.Event()  # complete, or paused
        self.done = threading.Event()  # complete and DONE sent
        self.resumes = 0
        self.stats: dict = {}
        self._threads = [threading.Thread(target=self._loop, args=(main,), name="recv-bg", daemon=True),
                         threading.Thread(target=self._loop, args=(demand,), name="recv-demand", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()
        if self.ledger.complete:
            self._finish()

    @property
    def complete(self) -> bool:
        return self.ledger.complete

    def received(self, index: int) -> bool:
        return bool(self.ledger.received[index])

    def request(self, chunks: np.ndarray, t_wait: float | None = None, offsets: np.ndarray | None = None) -> None:
        """An access needs `chunks` (int64, any order): ask the source for those not on their way yet.

        `offsets` (bytes into each chunk, same order) say where an access waits, so that piece comes first.
        """
        if t_wait is None:
            t_wait = time.perf_counter()
        self._last_wait = time.monotonic()
        where: dict[int, int] = {}
        if offsets is not None:
            for c, o in zip(np.asarray(chunks).tolist(), np.asarray(offsets).tolist(), strict=True):
                where.setdefault(int(c), int(o))
        chunks = np.unique(np.asarray(chunks, dtype=np.int64))
        with self._lock:
            chunks = chunks[(chunks >= 0) & (chunks < self.ledger.n_chunks)]
            chunks = chunks[self.ledger.expected_mask[chunks] & ~self.ledger.received[chunks]]
            for c in chunks.tolist():
                self._t_wait.setdefault(c, t_wait)
            if self.error is not None:
                return  # paused: a reconnect asks for every chunk still awaited
            chunks = chunks[~self._requested[chunks] & ~self._inflight[chunks]]
            self._requested[chunks] = True
            self.requested_chunks += int(chunks.size)
        if chunks.size == 0:
            return
        try:
            if where:  # a fault knows its address: one message per chunk, with the piece to send first
                for c in chunks.tolist():
                    self.demand.send(m.Demand(c, 1, where.get(c, 0)))
                    self._asked([c])
                return
            whole = not self.installer.pieces_visible  # pieces would only add records
            # contiguous runs, at most MAX_DEMAND each: one small message per run
            for first, stop in chunk_runs(chunks):
                for start in range(first, stop, MAX_DEMAND):
                    self.demand.send(m.Demand(start, min(MAX_DEMAND, stop - start), whole=whole))
                    self._asked(range(start, min(start + MAX_DEMAND, stop)))
        except (ConstmigError, OSError) as e:
            self.fail(f"cannot send a demand request: {e}")

    def _asked(self, chunks: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            for c in chunks:
                if c in self._t_wait:
                    self._t_asked.setdefault(c, now)

    def _woken(self, idx: int, now: float) -> None:
        """The access waiting for `idx` goes on now: its latency, and the segments it is made of (under
        the lock)."""
        t0 = self._t_wait.pop(idx, None)
        if t0 is None:
            return
        self.latencies.append(now - t0)
        asked, back = self._t_asked.pop(idx, None), self._t_back.pop(idx, None)
        if asked is not None and back is not None and t0 <= asked <= back <= now:
            self.segments["queued"].append(asked - t0)
            self.segments["round_trip"].append(back - asked)
            self.segments["install"].append(now - back)

    def _loop(self, link: Link) -> None:
        cores = None
        if link is self.demand:
            boost_this_thread()
        else:
            cores = BackgroundCores()
        try:
            while not self.ledger.complete and self.error is None:
                if cores is not None:  # an access waits, or did just now: keep off the demand path's core
                    cores.update(bool(self._t_wait) or time.monotonic() - self._last_wait < DEMAND_QUIET_S)
                t0 = time.perf_counter()
                try:
                    msg = link.recv_opened(self.installer.scratch(link is self.demand)) if self.native \
                        else link.recv()
                except RecvTimeout:
                    if link is self.demand:
                        continue  # nothing demanded for a while: normal
                    raise
                t1 = time.perf_counter()
                if not isinstance(msg, SealedChunk | OpenedChunk):
                    raise ProtocolError(f"unexpected {type(msg).__name__} while the heap streams")
                if link is self.demand:
                    first = msg.index if msg.length == self.chunk_size else msg.index // self.pieces
                    self._t_back.setdefault(first, t1)
                if link is self.demand and msg.length != self.chunk_size:
                    self._take_piece(msg, link.chan)
                else:
                    self._take(msg, link.chan, demand=link is self.demand)
                self.recv_s += t1 - t0
                self.install_s += time.perf_counter() - t1
        except ChannelClosed as e:
            if not self.finished.is_set():
                self.fail(f"connection to the source lost while streaming: {e}")
        except (ConstmigError, OSError) as e:
            self.fail(str(e))
        except Exception as e:  # a bug must pause the migration, not leave an access waiting forever
            self.fail(f"internal error while receiving: {type(e).__name__}: {e}")

    def _take(self, sealed: Arrival, chan: SecureChannel, demand: bool) -> None:
        idx = sealed.index
        with self._lock:
            self.ledger.check_acceptable(idx)
            if self._inflight[idx]:
                raise ProtocolError(f"chunk {idx} arrived twice")
            self._inflight[idx] = True
        tag = sealed.tag
        self.installer.install(idx, sealed, chan, demand=demand)  # raises on a bad tag: never visible
        self._accept(idx, tag, demand=sealed.demand)

    def _take_piece(self, sealed: Arrival, chan: SecureChannel) -> None:
        idx, piece = divmod(sealed.index, self.pieces)
        if sealed.length != PIECE:
            raise ProtocolError(f"piece record of chunk {idx} is {sealed.length} bytes, not {PIECE}")
        with self._lock:
            tags = self._partial.get(idx)
            if tags is None:
                self.ledger.check_acceptable(idx)
                if self._inflight[idx]:
                    raise ProtocolError(f"chunk {idx} arrived twice")
                self._inflight[idx] = True
                tags = self._partial[idx] = [None] * self.pieces
            elif tags[piece] is not None:
                raise ProtocolError(f"piece {piece} of chunk {idx} arrived twice")
        tag = sealed.tag
        try:
            self.installer.install_piece(idx, piece, sealed, chan)
        except BaseException:
            self.installer.chunk_failed(idx)
            raise
        tags[piece] = tag
        if len(tags) - tags.count(None) == 1 and self.installer.pieces_visible:
            # the awaited piece (sent first) is in place: the access goes on now
            with self._lock:
                self._woken(idx, time.perf_counter())
        if None in tags:
            return
        del self._partial[idx]
        self.installer.chunk_done(idx)
        self._accept(idx, pieces_tag(tags), demand=True)  # type: ignore[arg-type]

    def _accept(self, idx: int, tag: bytes, demand: bool) -> None:
        now = time.perf_counter()
        with self._lock:
            self.ledger.accept(idx, tag)
            self._inflight[idx] = False
            if demand:
                self.demand_chunks += 1
            else:
                self.background_chunks += 1
            self._woken(idx, now)
            self._t_back.pop(idx, None)
            complete = self.ledger.complete
        if complete:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            if self.finished.is_set():
                return
            self.finished.set()
        self.stats = {
            "tracker": self.tracker,
            "demand_chunks": self.demand_chunks,
            "background_chunks": self.background_chunks,
            "requested_chunks": self.requested_chunks,
            "faults": len(self.latencies),
            "fault_latency_us_p50": percentile_us(self.latencies, 50),
            "fault_latency_us_p99": percentile_us(self.latencies, 99),
            "fault_latency_us_max": percentile_us(self.latencies, 100),
            "fault_latency_hist": latency_histogram(self.latencies),
            **segment_figures("demand", self.segments),
            "stream_s": round(time.time() - self.t_resume, 4),
            "recv_wait_s": round(self.recv_s, 3),
            "install_s": round(self.install_s, 3),
            "recv_data_plane": "native" if self.native else "python",  # who received and opened the stream
            **self.installer.figures(),
        }
        if self.resumes:
            self.stats["resumes"] = self.resumes
        try:
            self.main.send(m.Done(self.ledger.count, self.ledger.digest(),
                                  {k: v for k, v in self.stats.items() if v is not None}))
            self.done.set()
        except (ConstmigError, OSError) as e:
            # the app runs here with every chunk; the source waits for DONE: a reconnect sends it
            self.error = f"could not send DONE: {e}"
            self.installer.fail(self.error)
        self.demand.chan.close()  # nothing more comes on it; wakes its receive thread

    def fail(self, reason: str) -> None:
        """Pause: stop receiving, keep every verified chunk, and tell the tracker."""
        with self._lock:
            if self.error is not None or self.done.is_set():
                return
            self.error = reason
        self.main.machine.fail()
        self.installer.fail(reason)
        self.main.chan.close()
        self.demand.chan.close()
        self.finished.set()

    def resume(self, main: Link, demand: Link) -> None:
        """Continue on a reconnect's links (the caller sent HAVE on `main` already, after `pause_for_resume`)."""
        with self._lock:
            self.main, self.demand = main, demand
            self.error = None
            self.finished.clear()
            self.resumes += 1
            waiting = [c for c in self._t_wait if not self.ledger.received[c]]
            self._threads = [threading.Thread(target=self._loop, args=(main,), name="recv-bg", daemon=True),
                             threading.Thread(target=self._loop, args=(demand,), name="recv-demand", daemon=True)]
        self.installer.resumed()
        for t in self._threads:
            t.start()
        if self.ledger.complete:
            self._finish()  # everything was here; DONE was what got lost
        elif waiting:
            self.request(np.asarray(waiting, dtype=np.int64))

    def pause_for_resume(self, reason: str) -> None:
        """Stop the current links (if they still look alive) and settle the ledger for a HAVE."""
        self.fail(reason)
        self.join(10.0)
        with self._lock:
            for idx in list(self._partial):  # a chunk half-received as pieces comes again whole
                self.installer.chunk_failed(idx)
            self._partial.clear()
            self._inflight[:] = False
            self._requested[:] = False
        if self.finished.is_set() and self.ledger.complete:
            self.finished.clear()  # _finish runs again on the new links and sends DONE there

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def join(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)
