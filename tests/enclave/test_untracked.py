"""Accesses the Access Tracker's instrumentation misses are served by the enclave's fault handler
(enclave/tracker/untracked.py, _wtrack.c): the access waits for its chunk and reads the verified bytes;
anything else that faults stays a crash, and an access that cannot be served ends the process with one
clear line instead of hanging or reading zeros.

Each case runs in a child process: a real SIGSEGV on a real PROT_NONE chunk, with a Python thread (which
needs the GIL the faulting numpy code holds) installing the chunk.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from constmig.enclave.tracker.untracked import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

CHILD = """
import ctypes, faulthandler, sys, threading, time
import numpy as np
from constmig.enclave.heap import Heap
from constmig.enclave.tracker import AccessTracker
{before}
CHUNK = 64 << 10
heap = Heap(1 << 20, chunk_size=CHUNK)
asked = []

def serve(chunks, offsets=None):
    asked.append((chunks.tolist(), None if offsets is None else offsets.tolist()))
    def install():
        time.sleep(0.05)  # the faulting thread waits meanwhile, the GIL released
        for i in chunks.tolist():
            view = t.begin_install(i)
            view[:] = bytes([i + 1]) * CHUNK  # chunk i holds i+1 everywhere: never zeros
            t.finish_install(i)
    threading.Thread(target=install).start()

request = {request}
t = AccessTracker(heap, np.array([2, 3, 4, 8]), request, timeout={timeout})
t.guard()
a = t.track(heap.alloc("a", (1 << 20) // 8, np.int64))
why = t.serve_untracked()
assert why is None, why
print("serving", flush=True)
{access}
print("figures", t.untracked_figures(), "asked", asked, flush=True)
"""

ACCESSES = {
    "asarray": "print('got', int(np.asarray(a)[8 * CHUNK // 8 + 3]))",
    "memoryview": "print('got', bytes(memoryview(a)[4 * CHUNK // 8 : 4 * CHUNK // 8 + 1])[0])",
    "memmove": "buf = ctypes.create_string_buffer(8); ctypes.memmove(buf, heap.address + 2 * CHUNK + 100, 8); "
               "print('got', buf.raw[0])",
    "write": "heap.buf[3 * CHUNK + 7] = 0xAB; print('got', int(heap.buf[3 * CHUNK + 8]), int(heap.buf[3 * CHUNK + 7]))",
}
EXPECTED = {
    "asarray": "got 651061555542690057",  # int64 of eight 9s (chunk 8 holds 9)
    "memoryview": "got 5",
    "memmove": "got 3",
    "write": "got 4 171",  # the write lands on the installed chunk, after its bytes
}


def run(access: str, *, request: str = "serve", timeout: float = 10.0, before: str = "") -> subprocess.CompletedProcess:
    code = CHILD.format(access=access, request=request, timeout=timeout, before=before)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("escape", sorted(ACCESSES))
def test_an_escaped_access_waits_for_its_chunk_and_reads_the_verified_bytes(escape):
    proc = run(ACCESSES[escape])
    assert proc.returncode == 0, proc.stderr
    assert EXPECTED[escape] in proc.stdout, proc.stdout
    assert "'untracked_accesses': 1" in proc.stdout, proc.stdout


def test_the_demand_names_where_the_access_touched():
    proc = run("np.asarray(a)[8 * CHUNK // 8 + 3]")
    assert proc.returncode == 0, proc.stderr
    assert "asked [([8], [24])]" in proc.stdout, proc.stdout  # chunk 8, byte 24: that piece first


def test_many_threads_faulting_at_once_are_all_served():
    access = ("ths = [threading.Thread(target=lambda k=k: np.asarray(a)[k * CHUNK // 8].item()) for k in (2, 3, 4, 8, 8)]\n"
              "[x.start() for x in ths]; [x.join() for x in ths]\n"
              "assert bytes(np.asarray(a)[2 * CHUNK // 8:].view(np.uint8)[:1]) == b'\\x03'")
    proc = run(access)
    assert proc.returncode == 0, proc.stderr
    assert t_served(proc.stdout) >= 4


def t_served(stdout: str) -> int:
    return int(stdout.split("'untracked_accesses': ")[1].split(",")[0])


def test_an_access_nobody_serves_ends_with_one_clear_line_after_the_timeout():
    proc = run("print(int(np.asarray(a)[8 * CHUNK // 8]))", request="lambda chunks, offsets=None: None", timeout=0.5)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)
    assert "touched heap chunk 8, which has not arrived; the access timed out after" in proc.stderr, proc.stderr
    assert "never verified" in proc.stderr


def test_a_paused_stream_is_named_when_the_wait_ends():
    proc = run("t.pause('the link broke'); print(int(np.asarray(a)[8 * CHUNK // 8]))",
               request="lambda chunks, offsets=None: None", timeout=0.5)
    assert proc.returncode == -signal.SIGSEGV, proc.stderr
    assert "(the migration is paused: the link broke)" in proc.stderr, proc.stderr


def test_a_failed_migration_ends_the_wait_at_once():
    access = ("threading.Timer(0.2, t.fail, ('the source went away',)).start()\n"
              "t0 = time.monotonic(); print(int(np.asarray(a)[8 * CHUNK // 8]))")
    proc = run(access, request="lambda chunks, offsets=None: None", timeout=30)
    assert proc.returncode == -signal.SIGSEGV, proc.stderr
    assert "the incoming migration failed after" in proc.stderr, proc.stderr
    assert "the source went away" in proc.stderr


@pytest.mark.parametrize("fault", ["ctypes.string_at(8, 1)",  # outside the heap
                                   # inside it, on a chunk that is not missing (protected by something else)
                                   "from constmig.enclave.tracker import protect_chunks, PROT_NONE; "
                                   "protect_chunks(heap, np.array([6]), PROT_NONE); print(int(heap.buf[6 * CHUNK]))",
                                   # a write to a read-only chunk: readable, so it must not be retried forever
                                   "from constmig.enclave.tracker import protect_chunks; "
                                   "protect_chunks(heap, np.array([6]), 1); heap.buf[6 * CHUNK] = 1"])
def test_a_real_crash_stays_a_crash_and_reaches_the_previous_handler(fault):
    proc = run(fault, before="faulthandler.enable()")
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)
    assert "Fatal Python error: Segmentation fault" in proc.stderr, proc.stderr  # faulthandler ran: chained
    assert "Access Tracker" not in proc.stderr


def test_once_the_heap_is_whole_the_watcher_ends():
    proc = run("[np.asarray(a)[k * CHUNK // 8].item() for k in (2, 3, 4, 8)]\n"
               "time.sleep(0.2); print('threads', sorted(th.name for th in threading.enumerate()))")
    assert proc.returncode == 0, proc.stderr
    assert "'untracked'" not in proc.stdout.split("threads")[1], proc.stdout


def test_a_chunk_installed_piece_by_piece_is_never_seen_half_there():
    """The installer writes a guarded chunk in two halves with a pause between (as demanded pieces
    arrive); an escaped read meanwhile waits for the whole verified chunk, it never sees the half."""
    access = ("view = t.begin_install(8)\n"
              "view[:CHUNK // 2] = b'\\x09' * (CHUNK // 2)\n"
              "def rest():\n"
              "    time.sleep(0.2)\n"
              "    view[CHUNK // 2:] = b'\\x09' * (CHUNK // 2)\n"
              "    t.finish_install(8)\n"
              "threading.Thread(target=rest).start()\n"
              "print('got', bytes(np.asarray(a)[8 * CHUNK // 8:9 * CHUNK // 8].view(np.uint8)) == b'\\x09' * CHUNK)")
    proc = run(access, request="lambda chunks, offsets=None: None")
    assert proc.returncode == 0, proc.stderr
    assert "got True" in proc.stdout and "'untracked_accesses': 1" in proc.stdout, proc.stdout


def test_without_the_handler_the_figures_say_why_escaped_accesses_are_not_served(monkeypatch):
    """A host where _wtrack.c was not built (no C compiler): the guard stays a tripwire, and says so."""
    import numpy as np

    from constmig.enclave.heap import Heap
    from constmig.enclave.tracker import AccessTracker, untracked

    monkeypatch.setattr(untracked, "_wtrack", None)
    monkeypatch.setattr(untracked, "_NOT_BUILT", "the enclave's fault handler was not built at install (test)",
                        raising=False)
    heap = Heap(1 << 20, chunk_size=64 << 10)
    t = AccessTracker(heap, np.array([2, 3]), lambda chunks, offsets=None: None)
    assert t.serve_untracked() == "the enclave's fault handler was not built at install (test)"
    assert t.untracked is None
    assert t.untracked_figures() == {"untracked_accesses": 0,
                                     "untracked_unserved": "the enclave's fault handler was not built at install (test)"}
    heap.close()
