"""This machine's end-to-end bound for a heap stream: sealed 1 MiB chunks from one process to another over
TCP loopback, opened into a fresh heap, with nothing of the migration protocol around them. A
migration's stream (`stream_gbps`) is judged against it (`stream_vs_raw`), measured in the same run.

Two ways into the heap, as the two trackers receive:
* `plain`: open each chunk straight into a fresh heap populated beforehand, as an incoming heap is at
  launch (the Access Tracker's and stop-and-copy's way);
* `uffd`: open into scratch, then one UFFDIO_COPY into a fresh heap registered with userfaultfd, whose
  pages stay missing until installed (the Fault Tracker's pager's way; skipped, with the reason, where
  userfaultfd does not work).

Beside them the native bound (`native`, `native_gbps`; issue 34, docs/native.md): the same stream of
the same records into a populated heap as `plain`, but sealed and sent by the native engine's bulk
sender straight from the heap and received and opened (in scratch, then copied) by its bulk receiver,
with no Python per chunk on either side. Skipped, with the reason, where the engine was not built.

The record layer is the migration's own (wire/channel.py, AES-256-GCM), keyed with random keys; the
sender's heap is random bytes (no zero records). Repeats alternate the modes.

Beside the rate, the latency floor (bench/floor.py): a bare TCP round trip between two processes, and a
demand fault served by the Fault Tracker's hops with nothing else running (`floor`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from typing import Any

import numpy as np

from constmig.bench.results import machine_info
from constmig.bench.stats import spread
from constmig.enclave.heap import Heap
from constmig.kernel.uffd import preflight
from constmig.wire.channel import SecureChannel

CHUNK = 1 << 20
MODES = ("plain", "uffd", "native")
_MID = b"constmig-bench-raw-mid!!"[:16]
_K1, _K2 = b"\x01" * 32, b"\x02" * 32


def _receive(port: int, heap_bytes: int, mode: str, conn: Any) -> None:
    """Child: one connection's chunks into a fresh heap; sends back (seconds from first byte to the last
    chunk in place, chunks) or an error line."""
    try:
        heap = Heap(heap_bytes, chunk_size=CHUNK)
        if mode in ("plain", "native"):
            heap.populate()  # as an incoming heap is at launch, before any migration starts
        uffd = installer = None
        if mode == "uffd":
            from constmig.kernel.uffd import Userfaultfd
            from constmig.migration.trackers.pager import UffdInstaller

            uffd = Userfaultfd.open()
            uffd.register_missing(heap.address, heap.size)
            installer = UffdInstaller(uffd, heap.address, CHUNK, None)
        sock = socket.create_connection(("127.0.0.1", port))
        n = heap_bytes // CHUNK
        if mode == "native":
            from constmig.native.engine import NativeOpener

            opener = NativeOpener(_K1, 1, _MID)
            conn.send("ready")
            t0 = time.perf_counter()
            opener.recv_chunks(sock, heap.buf, CHUNK, n, timeout=120)
            conn.send((time.perf_counter() - t0, n))
            sock.close()
            heap.close()
            return
        chan = SecureChannel(sock, _MID)
        chan.install_keys(_K2, _K1, 2, 1)
        conn.send("ready")
        t0 = None
        for _ in range(n):
            sealed = chan.recv()
            if t0 is None:
                t0 = time.perf_counter()
            if installer is not None:
                installer.install(sealed.index, sealed, chan, demand=False)
            else:
                chan.open_chunk(sealed, heap.chunk_view(sealed.index))
        conn.send((time.perf_counter() - (t0 or time.perf_counter()), n))
        chan.close()
        if uffd is not None:
            uffd.close()
        heap.close()
    except Exception as e:  # noqa: BLE001 (reported to the parent as one line)
        conn.send(f"{type(e).__name__}: {e}")


def _one(src: Heap, mode: str) -> float:
    """One stream of the whole heap; bytes per second from the first send to the last chunk in place."""
    ctx = mp.get_context("spawn")
    with socket.create_server(("127.0.0.1", 0)) as server:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_receive, args=(server.getsockname()[1], src.size, mode, child), daemon=True)
        proc.start()
        try:
            server.settimeout(60)
            sock, _ = server.accept()
            first = parent.recv() if parent.poll(60) else "no answer within 60 s"
            if first != "ready":
                raise RuntimeError(f"receiver did not start: {first}")
            t0 = time.perf_counter()
            if mode == "native":
                from constmig.native.engine import NativeSealer

                NativeSealer(_K1, 1, _MID).send_chunks(sock, src.buf, CHUNK, np.arange(src.n_chunks), timeout=120)
            else:
                chan = SecureChannel(sock, _MID)
                chan.install_keys(_K1, _K2, 1, 2)
                for i in range(src.n_chunks):
                    chan.send_chunk(i, src.chunk_view(i))
            if not parent.poll(120):
                raise RuntimeError("receiver did not finish within 120 s")
            answer = parent.recv()
            wall = time.perf_counter() - t0
            sock.close()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if isinstance(answer, str):
            raise RuntimeError(f"receiver failed: {answer}")
        return src.size / wall


def run_raw(heap_bytes: int, repeat: int, quiet: bool = False, floor_faults: int = 400) -> dict[str, Any]:
    """`repeat` streams per mode, alternating; per mode the median, min and max in GB/s; the native bound
    also as `native_gbps` and its ratio to the Python one; then the latency floor over `floor_faults`
    faults (0: not measured)."""
    from rich.progress import Progress

    from constmig.bench.floor import measure_floor
    from constmig.native.engine import available, why_unavailable

    problem = preflight()
    skipped = {} if problem is None else {"uffd": f"userfaultfd unusable here: {problem}"}
    if not available():
        skipped["native"] = f"{why_unavailable()}; the Python path is the only one here"
    modes = [m for m in MODES if m not in skipped]
    src = Heap(heap_bytes, chunk_size=CHUNK)
    try:
        rng = np.random.default_rng(0)
        words = np.frombuffer(src.buf, dtype=np.uint64)
        step = 1 << 20
        for at in range(0, words.size, step):  # random, so no chunk goes as a zero record
            words[at:at + step] = rng.integers(1, 2**63, min(step, words.size - at), dtype=np.uint64)
        runs: dict[str, list[float]] = {m: [] for m in modes}
        with Progress(disable=quiet, transient=True) as bar:
            task = bar.add_task("raw stream", total=repeat * len(modes))
            for _ in range(repeat):
                for mode in modes:
                    runs[mode].append(_one(src, mode) / 1e9)
                    bar.advance(task)
    finally:
        src.close()
    out: dict[str, Any] = {"bench": "raw", "machine": machine_info(), "heap_bytes": heap_bytes, "chunk_bytes": CHUNK,
                           "repeat": repeat, "cpus": os.cpu_count(),
                           "skipped": skipped}
    for mode, gbps in runs.items():
        rate = spread(gbps)
        out[mode] = {"raw_gbps": rate["median"], "min": rate["min"], "max": rate["max"], "runs": gbps}
    out["raw_gbps"] = out["plain"]["raw_gbps"]
    native = out.get("native", {}).get("raw_gbps")
    out["native_gbps"] = native  # None where the engine is not built (skipped says why)
    out["native_vs_python"] = round(native / out["raw_gbps"], 2) if native and out["raw_gbps"] else None
    if floor_faults:
        out["floor"] = measure_floor(floor_faults)
    return out


def stream_vs_raw(figures: dict[str, Any], raw: dict[str, Any]) -> float | None:
    """A migration's stream rate as a share of the raw bound of the same way into the heap."""
    mode = "uffd" if figures.get("tracker") == "fault" else "plain"
    bound = (raw.get(mode) or raw.get("plain") or {}).get("raw_gbps")
    got = figures.get("stream_gbps")
    return round(got / bound, 3) if got and bound else None
