"""The userfaultfd layer: ABI, the EEXIST/EAGAIN traps, and faults served by a real second process.

Rules that keep these tests from hanging: this process never touches a missing page of a registered
range while holding the GIL (only ctypes.memmove waiters, which release it, fault here); a pager process
arms alarm() so it dies if stuck, and the test process closes its own copy of the userfaultfd once sent,
so a dead pager releases the registration and faults fall back to zero pages instead of blocking.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from constmig.errors import ConstmigError, UffdError
from constmig.kernel import uffd as U
from constmig.kernel.uffd import PAGE_SIZE, Userfaultfd, buffer_address, preflight

REASON = preflight()
needs_uffd = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd is not usable here: {REASON}")
K = np.uint64(0x9E3779B97F4A7C15)  # pattern: 64-bit word i of a region holds (i + 1) * K mod 2**64


def pattern(first_word: int, n_words: int) -> np.ndarray:
    return (np.arange(first_word + 1, first_word + 1 + n_words, dtype=np.uint64) * K).astype(np.uint64)


def page_of(value: int) -> bytes:
    return bytes([value]) * PAGE_SIZE


_WAITERS: list[threading.Thread] = []


@pytest.fixture
def region():
    """An anonymous private mapping factory: region(n_bytes) -> (mmap, address)."""
    maps: list[mmap.mmap] = []

    def make(n: int) -> tuple[mmap.mmap, int]:
        mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        maps.append(mm)
        return mm, buffer_address(mm)

    yield make
    if any(th.is_alive() for th in _WAITERS):
        return  # never unmap under a thread that may still read the region (it would segfault)
    for mm in maps:
        mm.close()


@pytest.fixture
def uffd(region):  # depends on region so that it is closed before the region is unmapped
    u = Userfaultfd.open()
    yield u
    u.close()  # releases the registration: a waiter left behind by a failed test wakes up
    for th in _WAITERS:
        th.join(5.0)
    _WAITERS[:] = [th for th in _WAITERS if th.is_alive()]


def start_waiter(addr: int) -> tuple[threading.Thread, ctypes.Array]:
    """A thread that reads one page at addr. ctypes.memmove releases the GIL, so its fault blocks only it."""
    out = ctypes.create_string_buffer(PAGE_SIZE)
    th = threading.Thread(target=ctypes.memmove, args=(out, addr, PAGE_SIZE), daemon=True)
    _WAITERS.append(th)
    th.start()
    return th, out


def await_fault(u: Userfaultfd, addr: int) -> None:
    assert u.wait(5.0), "no fault event within 5 s"
    assert u.read_faults() == [addr]


# -- ABI -----------------------------------------------------------------------------------------------


def test_struct_sizes_match_ioctl_numbers():
    facts = {  # <linux/userfaultfd.h> on x86_64, the numbers this machine's kernel answers to
        "UFFDIO_API": (0xC018AA3F, U.uffdio_api),
        "UFFDIO_REGISTER": (0xC020AA00, U.uffdio_register),
        "UFFDIO_UNREGISTER": (0x8010AA01, U.uffdio_range),
        "UFFDIO_WAKE": (0x8010AA02, U.uffdio_range),
        "UFFDIO_COPY": (0xC028AA03, U.uffdio_copy),
        "UFFDIO_ZEROPAGE": (0xC020AA04, U.uffdio_zeropage),
    }
    for name, (number, struct) in facts.items():
        assert getattr(U, name) == number, name
        assert (number >> 16) & 0x3FFF == ctypes.sizeof(struct), name
    assert ctypes.sizeof(U.uffdio_copy) == 40
    assert ctypes.sizeof(U.uffd_msg) == U.MSG_SIZE == 32
    assert U.uffd_msg.arg.offset == 8
    assert U.uffd_pagefault.address.offset == 8
    assert U.USERFAULTFD_IOC_NEW == 0xAA00


def test_uffd_error_is_a_constmig_error():
    assert issubclass(UffdError, ConstmigError)


def test_buffer_address_without_copy():
    ro = b"x" * 100
    rw = bytearray(100)
    arr = np.zeros(10, dtype=np.uint64)
    assert buffer_address(rw) == ctypes.addressof(ctypes.c_char.from_buffer(rw))
    assert buffer_address(arr) == arr.ctypes.data
    assert buffer_address(memoryview(arr)[2:]) == arr.ctypes.data + 16
    assert ctypes.string_at(buffer_address(ro), 3) == b"xxx"
    with pytest.raises(UffdError, match="copy source"):
        buffer_address(np.zeros((4, 4))[:, ::2])


# -- preflight -----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_preflight_ok_here():
    if os.geteuid() != 0:
        pytest.skip("not root: preflight may rightly refuse")
    assert preflight() is None


@pytest.mark.timeout(30)
def test_preflight_explains_unprivileged_refusal_in_one_line():
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        sysctl = f.read().strip()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody (this also drops CAP_SYS_PTRACE) and ask
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, repr(preflight()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    if sysctl == "0":
        assert said == repr("userfaultfd needs root or vm.unprivileged_userfaultfd=1 (it is 0)")
    else:
        assert said == "None"


# -- single-process behaviour (no GIL-holding access to missing pages) ------------------------------------


@needs_uffd
@pytest.mark.timeout(30)
def test_read_faults_on_idle_uffd_is_empty(uffd, region):
    _, addr = region(4 * PAGE_SIZE)
    uffd.register_missing(addr, 4 * PAGE_SIZE)
    assert uffd.read_faults() == []
    assert uffd.wait(0.05) is False


@needs_uffd
@pytest.mark.timeout(30)
def test_kernel_traps_as_documented(uffd, region):
    """Raw ioctls: a present first page gives EEXIST with nothing done; a later one EAGAIN with progress."""
    _, addr = region(8 * PAGE_SIZE)
    uffd.register_missing(addr, 8 * PAGE_SIZE)
    src = page_of(7) * 8
    uffd.copy_buffer(addr + 3 * PAGE_SIZE, page_of(1))
    fd, s = uffd.fileno(), buffer_address(src)

    arg = U.uffdio_copy(addr + 3 * PAGE_SIZE, s, 2 * PAGE_SIZE, 0, 0)
    assert U._ioctl(fd, U.UFFDIO_COPY, ctypes.byref(arg)) == -1
    assert ctypes.get_errno() == errno.EEXIST and arg.copy == -errno.EEXIST

    arg = U.uffdio_copy(addr, s, 8 * PAGE_SIZE, 0, 0)
    assert U._ioctl(fd, U.UFFDIO_COPY, ctypes.byref(arg)) == -1
    assert ctypes.get_errno() == errno.EAGAIN and arg.copy == 3 * PAGE_SIZE


@needs_uffd
@pytest.mark.timeout(30)
def test_copy_first_page_present_eexist_wakes_waiter(uffd, region):
    mm, addr = region(4 * PAGE_SIZE)
    uffd.register_missing(addr, 4 * PAGE_SIZE)
    waiter, got = start_waiter(addr)
    await_fault(uffd, addr)
    # Install page 0 without waking: the waiter stays blocked on a page that is now present.
    assert uffd.copy_buffer(addr, page_of(0xA1), wake=False) == PAGE_SIZE
    waiter.join(0.3)
    assert waiter.is_alive(), "UFFDIO_COPY_MODE_DONTWAKE woke the waiter"
    # The whole-range copy hits EEXIST on page 0: it must skip it, install the rest, and wake.
    assert uffd.copy_buffer(addr, page_of(0xB2) * 4) == 3 * PAGE_SIZE
    waiter.join(5.0)
    assert not waiter.is_alive(), "a copy that met EEXIST did not wake the faulting thread"
    assert got.raw == page_of(0xA1)
    assert mm[:PAGE_SIZE] == page_of(0xA1)
    assert mm[PAGE_SIZE:] == page_of(0xB2) * 3
    assert (uffd.pages_skipped, uffd.bytes_installed) == (1, 4 * PAGE_SIZE)


@needs_uffd
@pytest.mark.timeout(30)
def test_copy_present_page_in_middle_eagain_partial(uffd, region):
    n = 8
    mm, addr = region(n * PAGE_SIZE)
    uffd.register_missing(addr, n * PAGE_SIZE)
    uffd.copy_buffer(addr + 3 * PAGE_SIZE, page_of(0xA1))
    waiter, got = start_waiter(addr + 6 * PAGE_SIZE)
    await_fault(uffd, addr + 6 * PAGE_SIZE)
    src = b"".join(page_of(0x10 + i) for i in range(n))
    assert uffd.copy_buffer(addr, src) == (n - 1) * PAGE_SIZE
    waiter.join(5.0)
    assert not waiter.is_alive()
    assert got.raw == page_of(0x16)
    want = bytearray(src)
    want[3 * PAGE_SIZE : 4 * PAGE_SIZE] = page_of(0xA1)
    assert mm[:] == want
    # pages 0-2 (EAGAIN with copy=3 pages), page 3 skipped (EEXIST), pages 4-7 in one call
    assert (uffd.partial_copies, uffd.pages_skipped) == (1, 1)


@needs_uffd
@pytest.mark.timeout(30)
def test_copy_many_present_pages_and_whole_range_present(uffd, region):
    n = 64
    mm, addr = region(n * PAGE_SIZE)
    uffd.register_missing(addr, n * PAGE_SIZE)
    for i in (0, 1, 2, 31, 63):
        uffd.copy_buffer(addr + i * PAGE_SIZE, page_of(0xEE))
    src = np.frombuffer(page_of(0x55) * n, dtype=np.uint8)
    assert uffd.copy(addr, src.ctypes.data, n * PAGE_SIZE) == (n - 5) * PAGE_SIZE
    assert uffd.copy(addr, src.ctypes.data, n * PAGE_SIZE) == 0  # all present: nothing installed
    pages = np.frombuffer(mm, dtype=np.uint8).reshape(n, PAGE_SIZE)
    first = pages[:, 0].copy()
    assert set(np.flatnonzero(first == 0xEE)) == {0, 1, 2, 31, 63}
    assert (pages == first[:, None]).all()
    del pages


@needs_uffd
@pytest.mark.timeout(30)
def test_zeropage(uffd, region):
    n = 16
    mm, addr = region(n * PAGE_SIZE)
    uffd.register_missing(addr, n * PAGE_SIZE)
    uffd.copy_buffer(addr + 5 * PAGE_SIZE, page_of(9))
    waiter, got = start_waiter(addr + 10 * PAGE_SIZE)
    await_fault(uffd, addr + 10 * PAGE_SIZE)
    assert uffd.zeropage(addr, n * PAGE_SIZE) == (n - 1) * PAGE_SIZE
    waiter.join(5.0)
    assert not waiter.is_alive()
    assert got.raw == bytes(PAGE_SIZE)
    assert mm[: 5 * PAGE_SIZE].count(0) == 5 * PAGE_SIZE
    assert mm[5 * PAGE_SIZE : 6 * PAGE_SIZE] == page_of(9)
    assert mm[6 * PAGE_SIZE :].count(0) == (n - 6) * PAGE_SIZE
    assert uffd.zeropage(addr, n * PAGE_SIZE) == 0


@needs_uffd
@pytest.mark.timeout(30)
def test_wake_releases_a_waiter_after_dontwake_copy(uffd, region):
    _, addr = region(2 * PAGE_SIZE)
    uffd.register_missing(addr, 2 * PAGE_SIZE)
    waiter, got = start_waiter(addr + PAGE_SIZE)
    await_fault(uffd, addr + PAGE_SIZE)
    uffd.copy_buffer(addr, page_of(1) + page_of(2), wake=False)
    waiter.join(0.3)
    assert waiter.is_alive()
    uffd.wake(addr, 2 * PAGE_SIZE)
    waiter.join(5.0)
    assert not waiter.is_alive()
    assert got.raw == page_of(2)


@needs_uffd
@pytest.mark.timeout(30)
def test_errors_are_one_line_uffd_errors(uffd, region):
    _, addr = region(4 * PAGE_SIZE)
    src = page_of(1)
    with pytest.raises(UffdError, match="not registered") as ei:
        uffd.copy_buffer(addr, src)  # nothing registered yet
    assert ei.value.errno == errno.ENOENT and "\n" not in str(ei.value)
    with pytest.raises(UffdError, match="page aligned"):
        uffd.register_missing(addr + 1, PAGE_SIZE)
    with pytest.raises(UffdError, match="page aligned"):
        uffd.copy_buffer(addr, b"x" * 100)
    with pytest.raises(UffdError, match="integer"):
        uffd.wake(addr, 1.5)
    with pytest.raises(UffdError, match="already done"):
        uffd.api()
    with Userfaultfd.open(handshake=False) as raw, pytest.raises(UffdError, match="handshake"):
        raw.register_missing(addr, PAGE_SIZE)
    r, w = os.pipe()
    try:
        with pytest.raises(UffdError, match="not a userfaultfd"):
            Userfaultfd.from_fd(r)
    finally:
        os.close(r)
        os.close(w)
    uffd.close()
    with pytest.raises(UffdError, match="closed"):
        uffd.read_faults()


@needs_uffd
@pytest.mark.timeout(30)
def test_send_and_receive_over_unix_socket(region):
    mm, addr = region(2 * PAGE_SIZE)
    a, b = socket.socketpair()
    with a, b, Userfaultfd.open() as sender:
        sender.register_missing(addr, 2 * PAGE_SIZE)
        sender.send(a)
        with Userfaultfd.receive(b, timeout=5) as got:
            assert got.fileno() != sender.fileno()
            sender.close()  # the registration lives on through the received fd
            assert got.copy_buffer(addr, page_of(3) * 2) == 2 * PAGE_SIZE
            assert got.copy_buffer(addr, page_of(4) * 2) == 0  # same userfaultfd: pages already present
    assert mm[:] == page_of(3) * 2
    c, d = socket.socketpair()
    with c, d, pytest.raises(UffdError, match="within"):
        Userfaultfd.receive(d, timeout=0.05)


# -- a real pager process ---------------------------------------------------------------------------------

PAGER = r"""
import select, signal, socket, sys
import numpy as np
from constmig.kernel.uffd import Userfaultfd
signal.alarm(25)  # default action kills us if stuck: the userfaultfd is released and the test unblocks
sock = socket.socket(fileno=int(sys.argv[1]))
base, size, block = (int(x) for x in sys.argv[2:5])
K = np.uint64(0x9E3779B97F4A7C15)
uffd = Userfaultfd.receive(sock)
words = np.arange(1, block // 8 + 1, dtype=np.uint64)
src = np.empty(block // 8, dtype=np.uint64)
served, faults = set(), 0
while True:
    ready = select.select([uffd, sock], [], [], 5.0)[0]
    if sock in ready:
        break  # the test says stop (or died)
    for a in uffd.read_faults():
        faults += 1
        off = (a - base) // block * block
        if off in served:
            uffd.wake(base + off, block)
            continue
        np.multiply(words + np.uint64(off // 8), K, out=src)
        uffd.copy_buffer(base + off, src)
        served.add(off)
sock.recv(16)
sock.sendall(f"{faults} {len(served)} {uffd.bytes_installed} {uffd.pages_skipped}".encode())
"""


def spawn_pager(u: Userfaultfd, base: int, size: int, block: int) -> tuple[subprocess.Popen, socket.socket]:
    a, b = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", PAGER, str(b.fileno()), str(base), str(size), str(block)],
        pass_fds=[b.fileno()],
    )
    b.close()
    u.send(a)
    return proc, a


@needs_uffd
@pytest.mark.timeout(30)
def test_pager_process_serves_faults_of_a_16mib_region(region):
    size, block = 16 << 20, 64 << 10
    mm, base = region(size)
    u = Userfaultfd.open()
    u.register_missing(base, size)
    proc, ctl = spawn_pager(u, base, size, block)
    u.close()  # the pager's copy keeps the registration; if the pager dies, faults get zero pages
    try:
        arr = np.frombuffer(mm, dtype=np.uint64)
        n = len(arr)
        rng = np.random.default_rng(1)
        probe = rng.choice(n, 64, replace=False)
        assert np.array_equal(arr[probe], (probe.astype(np.uint64) + np.uint64(1)) * K)  # random order
        total = int(arr.sum(dtype=np.uint64))  # then everything, sequentially, faulting with the GIL held
        expected = pattern(0, n)
        assert total == int(expected.sum(dtype=np.uint64))
        assert np.array_equal(arr, expected)
        del arr
        ctl.sendall(b"stop")
        faults, served, installed, skipped = (int(x) for x in ctl.recv(128).split())
        assert served == size // block and installed == size and skipped == 0
        assert served <= faults <= served + 64
        assert proc.wait(10) == 0
    finally:
        ctl.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@needs_uffd
@pytest.mark.timeout(30)
def test_dead_pager_releases_the_region_instead_of_hanging(region):
    """If the only holder of the userfaultfd dies, faults fall back to plain zero pages."""
    size = 1 << 20
    mm, base = region(size)
    u = Userfaultfd.open()
    u.register_missing(base, size)
    a, b = socket.socketpair()
    u.send(a)
    u.close()
    a.close()
    b.close()  # the in-flight fd dies with the socket: the last reference is gone
    arr = np.frombuffer(mm, dtype=np.uint64)
    assert int(arr.sum()) == 0
    del arr


CHILD = r"""
import mmap, socket, sys
from constmig.kernel.uffd import Userfaultfd, buffer_address
sock = socket.socket(fileno=int(sys.argv[1]))
mm = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
u = Userfaultfd.open()
addr = buffer_address(mm)
u.register_missing(addr, 1 << 20)
u.send(sock)
sock.sendall(str(addr).encode())
"""


@needs_uffd
@pytest.mark.timeout(30)
def test_copy_after_the_faulting_process_exited_says_so():
    a, b = socket.socketpair()
    with a:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(b.fileno())], pass_fds=[b.fileno()])
        b.close()
        with Userfaultfd.receive(a, timeout=20) as u:
            addr = int(a.recv(64))
            assert proc.wait(20) == 0
            with pytest.raises(UffdError, match="exited") as ei:
                u.copy_buffer(addr, page_of(1))
            assert ei.value.errno == errno.ESRCH
