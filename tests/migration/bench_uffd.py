"""Fault service latency and UFFDIO_COPY throughput with a separate pager process.

Not a test (pytest does not collect it). Run:  python tests/migration/bench_uffd.py [stream MiB]

The app (this process) registers a fresh anonymous region, passes the userfaultfd to a pager process
(SCM_RIGHTS) and closes its own copy, then:
  - latency: touches one byte of each fresh page in turn (Python, GIL held while faulting) and times
    each access; the pager answers each fault with one UFFDIO_COPY of 4 KiB (or of the 64 KiB block);
  - throughput: the pager streams the whole region with UFFDIO_COPY in fixed chunks (no faults).
Before timing, 2 GiB is touched and freed (first touch of guest memory is slow on these VMs and
free-page reporting gives it back to the host within ~2 s, so it is redone right before each run).
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from constmig.kernel.uffd import PAGE_SIZE, Userfaultfd, buffer_address, preflight

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
NCPU = len(os.sched_getaffinity(0))


def prewarm(nbytes: int = 2 << 30) -> float:
    """Touch and free nbytes so that the next allocations find guest memory the VM has backed."""
    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(MADV_POPULATE_WRITE, 0, nbytes)
    m.close()
    return time.perf_counter() - t0


# -- pager side ------------------------------------------------------------------------------------


def pager_main(fd: int) -> None:
    signal.alarm(600)  # never outlive a stuck benchmark
    ctl = socket.socket(fileno=fd)
    while True:
        msg, fds, _, _ = socket.recv_fds(ctl, 4096, 1)
        if not msg:
            return
        cmd = json.loads(msg)
        uffd = Userfaultfd.from_fd(fds[0])
        if cmd.get("cpu") is not None:
            os.sched_setaffinity(0, {cmd["cpu"]})
        else:
            os.sched_setaffinity(0, range(NCPU))
        if cmd["op"] == "serve":
            out = serve(uffd, ctl, cmd["base"], cmd["block"], cmd["busy"])
        else:
            out = stream(uffd, cmd["base"], cmd["size"], cmd["chunk"])
        uffd.close()
        ctl.sendall((json.dumps(out) + "\n").encode())


def serve(uffd: Userfaultfd, ctl: socket.socket, base: int, block: int, busy: bool) -> dict:
    src = np.full(block, 0x5A, dtype=np.uint8)  # pre-touched source
    faults = 0
    ctl.setblocking(False)
    p = select.poll()
    p.register(uffd.fileno(), select.POLLIN)
    p.register(ctl.fileno(), select.POLLIN)
    try:
        while True:
            if not busy:
                p.poll()
            addrs = uffd.read_faults()
            for a in addrs:
                off = (a - base) // block * block
                uffd.copy_buffer(base + off, src)
                faults += 1
            if not addrs:
                try:
                    if ctl.recv(16, socket.MSG_PEEK):
                        ctl.recv(16)
                        break
                except BlockingIOError:
                    pass
    finally:
        ctl.setblocking(True)
    return {"faults": faults, "skipped": uffd.pages_skipped}


def stream(uffd: Userfaultfd, base: int, size: int, chunk: int) -> dict:
    src = np.full(chunk, 0xA5, dtype=np.uint8)
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        uffd.copy_buffer(base + off, src)
    return {"seconds": time.perf_counter() - t0}


# -- app side --------------------------------------------------------------------------------------


class Pager:
    def __init__(self) -> None:
        a, b = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--pager", str(b.fileno())], pass_fds=[b.fileno()]
        )
        b.close()
        self.sock = a
        self.replies = a.makefile("r")

    def start(self, cmd: dict, uffd: Userfaultfd) -> None:
        socket.send_fds(self.sock, [json.dumps(cmd).encode()], [uffd.fileno()])
        uffd.close()  # the pager holds the only copy: if it dies, faults fall back to zero pages

    def finish(self, stop: bool) -> dict:
        if stop:
            self.sock.sendall(b"s")
        return json.loads(self.replies.readline())

    def close(self) -> None:
        self.replies.close()  # the file holds the socket's fd open too
        self.sock.close()
        self.proc.wait(10)


def region(size: int) -> tuple[mmap.mmap, int, Userfaultfd]:
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = buffer_address(mm)
    uffd = Userfaultfd.open()
    uffd.register_missing(base, size)
    return mm, base, uffd


def latency(pager: Pager, n: int, block: int, busy: bool, app_cpu: int | None, pager_cpu: int | None) -> dict:
    size = n * block
    mm, base, uffd = region(size)
    os.sched_setaffinity(0, {app_cpu} if app_cpu is not None else range(NCPU))
    pager.start({"op": "serve", "base": base, "block": block, "busy": busy, "cpu": pager_cpu}, uffd)
    mv = memoryview(mm)
    time.sleep(0.2)  # let the pager reach its loop
    t = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        off = i * block
        t0 = clock()
        mv[off]  # one fault on a fresh page (GIL held: only another process can serve it)
        t[i] = clock() - t0
    base_t = np.empty(n, dtype=np.int64)
    for i in range(n):  # the same accesses on present pages: the cost of the probe itself
        off = i * block
        t0 = clock()
        mv[off]
        base_t[i] = clock() - t0
    got = pager.finish(stop=True)
    os.sched_setaffinity(0, range(NCPU))
    assert bytes(mv[:8]) == b"\x5a" * 8
    mv.release()
    mm.close()
    us = t / 1000
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "probe_us": float(np.percentile(base_t / 1000, 50)),
        "faults": got["faults"],
    }


def throughput(pager: Pager, size: int, chunk: int, warm: bool) -> dict:
    warm_s = prewarm(size + (512 << 20)) if warm else 0.0
    mm, base, uffd = region(size)
    pager.start({"op": "stream", "base": base, "size": size, "chunk": chunk, "cpu": None}, uffd)
    got = pager.finish(stop=False)
    arr = np.frombuffer(mm, dtype=np.uint8)
    ok = bool(arr[:: 1 << 16].min() == 0xA5 and arr[size - 1] == 0xA5)
    del arr
    mm.close()
    return {"gbps": size / got["seconds"] / 1e9, "seconds": got["seconds"], "ok": ok, "prewarm_s": warm_s}


def memcpy_reference(size: int, chunk: int, warm: bool) -> float:
    """GB/s of numpy copies in the same chunks into a fresh, unregistered mapping (first-touch cost)."""
    if warm:
        prewarm(size + (512 << 20))
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    dst = np.frombuffer(mm, dtype=np.uint8)
    src = np.full(chunk, 0xA5, dtype=np.uint8)
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        dst[off : off + chunk] = src
    dt = time.perf_counter() - t0
    del dst
    mm.close()
    return size / dt / 1e9


def fmt(xs: list[float]) -> str:
    return f"{np.median(xs):5.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> None:
    reason = preflight()
    if reason:
        sys.exit(f"bench_uffd: {reason}")
    stream_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    print(f"{NCPU} CPUs; pre-warming 2 GiB (touch + free) ... {prewarm():.2f} s")
    pager = Pager()
    try:
        n = 2000
        print(f"\nfault service latency, {n} faults on fresh pages, app touches one byte per fault (Python):")
        print(f"{'case':52s} {'p50 µs':>8s} {'p99 µs':>8s} {'mean µs':>8s}  faults")
        cases = [
            ("4 KiB/fault, blocking poll, unpinned", PAGE_SIZE, False, None, None),
            ("4 KiB/fault, blocking poll, app cpu0 / pager cpu1", PAGE_SIZE, False, 0, 1),
            ("4 KiB/fault, blocking poll, both on cpu0", PAGE_SIZE, False, 0, 0),
            ("4 KiB/fault, pager busy-polls, app cpu0 / pager cpu1", PAGE_SIZE, True, 0, 1),
            ("4 KiB/fault, pager busy-polls, unpinned", PAGE_SIZE, True, None, None),
            ("64 KiB/fault (readahead), blocking poll, unpinned", 64 << 10, False, None, None),
        ]
        probe = []
        for label, block, busy, acpu, pcpu in cases:
            if NCPU < 2 and (acpu or pcpu):
                continue
            prewarm(1 << 30)
            r = latency(pager, n, block, busy, acpu, pcpu)
            probe.append(r["probe_us"])
            print(f"{label:52s} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['mean_us']:8.1f}  {r['faults']}")
        print(f"(probe cost on a present page: p50 {np.median(probe):.2f} µs, included above)")

        size = stream_mib << 20
        reps = 3
        print(
            f"\nUFFDIO_COPY throughput, pager streams {stream_mib} MiB into a fresh registered region "
            f"(median [min-max] of {reps}); reference: numpy copies in the same chunks into a fresh plain "
            "mapping in the same memory state:"
        )
        for chunk in (1 << 20, 64 << 10, 2 << 20):
            for warm in (True, False):
                rates, refs, ok = [], [], True
                for _ in range(reps):
                    if not warm:
                        time.sleep(4)  # let free-page reporting take freed memory back: a cold target
                    r = throughput(pager, size, chunk, warm)
                    rates.append(r["gbps"])
                    ok &= r["ok"]
                    if not warm:
                        time.sleep(4)
                    refs.append(memcpy_reference(size, chunk, warm))
                state = "pre-warmed just before" if warm else "after 4 s idle (cold)"
                print(
                    f"  chunk {chunk >> 10:5d} KiB, {state:22s}: UFFDIO_COPY {fmt(rates)} GB/s,"
                    f"  numpy copy {fmt(refs)} GB/s" + ("" if ok else "  CONTENT MISMATCH")
                )
    finally:
        pager.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--pager":
        pager_main(int(sys.argv[2]))
    else:
        main()
