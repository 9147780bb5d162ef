"""Thin, checked userfaultfd layer: the Fault Tracker's syscalls and nothing else.

A post-copy destination registers its heap (one anonymous mmap) for MISSING faults and hands the
userfaultfd to a separate pager process (`send` / `receive`, SCM_RIGHTS). A thread of the faulting
process cannot serve the faults: the faulting thread holds the GIL (docs/architecture.md, "The Fault
Tracker"). The pager reads fault addresses with `read_faults` and installs chunks with `copy`;
registration survives the original fd being closed in the enclave process.

Every call here is one syscall (or one loop of them in C-sized steps); every failure is a UffdError
with a one-line message. `preflight()` says in one line why userfaultfd cannot be used, or None.

The kernel ABI is mirrored from <linux/userfaultfd.h>; ioctl numbers are computed from the _IOC macros
and checked at import against the x86_64 values this machine's kernel answers to.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import select
import socket
from typing import Any

import numpy as np

from constmig.errors import UffdError

PAGE_SIZE = mmap.PAGESIZE


# -- ABI: structures (<linux/userfaultfd.h>) ---------------------------------------------------------

_u8, _u16, _u32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32
_u64, _s64 = ctypes.c_uint64, ctypes.c_int64


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", _u64), ("features", _u64), ("ioctls", _u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", _u64), ("len", _u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64), ("ioctls", _u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", _u64), ("src", _u64), ("len", _u64), ("mode", _u64), ("copy", _s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64), ("zeropage", _s64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64)]


class page_region(ctypes.Structure):
    """One run of pages PAGEMAP_SCAN reports (<linux/fs.h>)."""

    _fields_ = [("start", _u64), ("end", _u64), ("categories", _u64)]


class pm_scan_arg(ctypes.Structure):
    """The PAGEMAP_SCAN ioctl's argument (<linux/fs.h>), on /proc/self/pagemap."""

    _fields_ = [(name, _u64) for name in ("size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
                                          "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class uffd_pagefault(ctypes.Structure):
    _fields_ = [("flags", _u64), ("address", _u64), ("ptid", _u32)]


class uffd_msg_arg(ctypes.Union):
    _fields_ = [("pagefault", uffd_pagefault), ("reserved", _u64 * 3)]


class uffd_msg(ctypes.Structure):
    """One event read from a userfaultfd (the kernel declares it __packed; it is naturally aligned)."""

    _fields_ = [
        ("event", _u8),
        ("reserved1", _u8),
        ("reserved2", _u16),
        ("reserved3", _u32),
        ("arg", uffd_msg_arg),
    ]


MSG_SIZE = ctypes.sizeof(uffd_msg)

# -- ABI: constants ----------------------------------------------------------------------------------

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # flag of userfaultfd(2): faults taken in kernel mode get EFAULT instead
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # never-touched pages are write-protected too
UFFD_FEATURE_WP_ASYNC = 1 << 15  # the kernel resolves a write fault itself and marks the page written
PAGE_IS_WRITTEN = 1 << 1  # PAGEMAP_SCAN category
PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages it reports, in the same walk
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail unless the range is registered with WP_ASYNC

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_API = 0x3F
UFFDIO = 0xAA
USERFAULTFD_IOC = 0xAA

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # the kernel's macro names
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect)
PAGEMAP_SCAN = _IOWR(ord("f"), 16, pm_scan_arg)
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)

# The x86_64 values of the kernel headers, which these machines' kernel answers to: a wrong structure
# size would silently corrupt the ioctl, so refuse to import instead.
assert MSG_SIZE == 32 and uffd_msg.arg.offset == 8, "uffd_msg must be 32 bytes"
assert ctypes.sizeof(uffdio_copy) == 40 and UFFDIO_COPY == 0xC028AA03
assert ctypes.sizeof(uffdio_api) == 24 and UFFDIO_API == 0xC018AA3F
assert ctypes.sizeof(uffdio_register) == 32 and UFFDIO_REGISTER == 0xC020AA00
assert ctypes.sizeof(uffdio_range) == 16 and UFFDIO_WAKE == 0x8010AA02 and UFFDIO_UNREGISTER == 0x8010AA01
assert ctypes.sizeof(uffdio_zeropage) == 32 and UFFDIO_ZEROPAGE == 0xC020AA04
assert USERFAULTFD_IOC_NEW == 0xAA00
assert ctypes.sizeof(uffdio_writeprotect) == 24 and UFFDIO_WRITEPROTECT == 0xC018AA06
assert ctypes.sizeof(pm_scan_arg) == 96 and PAGEMAP_SCAN == 0xC0606610 and ctypes.sizeof(page_region) == 24

# userfaultfd(2) by architecture; elsewhere only /dev/userfaultfd is tried.
_SYSCALL_NR = {"x86_64": 323, "aarch64": 282, "arm64": 282, "riscv64": 282}
SYS_userfaultfd: int | None = _SYSCALL_NR.get(platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL: a slow UFFDIO_COPY blocks no thread
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.argtypes = [ctypes.c_long, ctypes.c_long]
_syscall.restype = ctypes.c_long

_REASONS = {
    errno.ENOENT: "the range is not registered with this userfaultfd",
    errno.ESRCH: "the process that registered the range has exited",
    errno.EFAULT: "the source buffer is not readable",
    errno.EINVAL: "bad range, flags or state (is the UFFDIO_API handshake done?)",
    errno.ENOMEM: "out of memory",
    errno.EBUSY: "the range is busy (registered with another userfaultfd?)",
    errno.EPERM: "not permitted",
    errno.EBADF: "bad file descriptor",
}


def _error(what: str, err: int) -> UffdError:
    name = errno.errorcode.get(err, str(err))
    reason = _REASONS.get(err) or os.strerror(err)
    return UffdError(f"{what}: {reason} ({name})", err)


def _check_range(what: str, addr: Any, length: Any) -> tuple[int, int]:
    for label, v in (("address", addr), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise UffdError(f"{what}: {label} must be an integer, not {type(v).__name__}")
    addr, length = int(addr), int(length)
    if addr <= 0 or addr % PAGE_SIZE or length < 0 or length % PAGE_SIZE:
        raise UffdError(
            f"{what}: address {addr:#x} and length {length} must be page aligned ({PAGE_SIZE} bytes)"
        )
    return addr, length


def buffer_address(buf: Any) -> int:
    """Address of the first byte of a C-contiguous buffer (bytes, bytearray, mmap, memoryview, numpy).

    Works for read-only buffers too and never copies. The address is valid only while `buf` is alive
    and not resized: keep a reference across the syscall that uses it.
    """
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError) as e:
        raise UffdError(f"cannot use a {type(buf).__name__} as a copy source: {e}") from None
    return int(arr.ctypes.data)


class Userfaultfd:
    """One userfaultfd. Open it with `open()` in the process that owns the memory, or adopt one
    received over a Unix socket with `receive()` / `from_fd()`. Not a context for per-page work:
    `copy` and `zeropage` take whole ranges and loop in the kernel.

    Counters (for metrics): bytes_installed, pages_skipped (already present: EEXIST),
    partial_copies (EAGAIN with progress).
    """

    def __init__(self, fd: int, *, handshake_done: bool) -> None:
        self._fd: int | None = fd
        self.handshake_done = handshake_done
        self.features = 0  # features the kernel offers, as reported by UFFDIO_API
        self.api_ioctls = 0
        self.bytes_installed = 0
        self.pages_skipped = 0
        self.partial_copies = 0

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, features: int = 0, *, handshake: bool = True, user_mode_only: bool = False) -> Userfaultfd:
        """A new non-blocking, close-on-exec userfaultfd for this process, API handshake done.

        Tries userfaultfd(2), then /dev/userfaultfd + USERFAULTFD_IOC_NEW. `user_mode_only` asks for
        UFFD_USER_MODE_ONLY (allowed unprivileged, but then a syscall writing into a missing page fails
        with EFAULT instead of waiting). Pass handshake=False to call `api()` yourself.
        """
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
        sys_err = errno.ENOSYS
        if SYS_userfaultfd is not None:
            fd = _syscall(SYS_userfaultfd, flags)
            if fd >= 0:
                return cls._finish(fd, features, handshake)
            sys_err = ctypes.get_errno()
        dev_err = None
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            dev_err = e.errno or errno.EIO
        else:
            try:
                fd = _ioctl(dev, USERFAULTFD_IOC_NEW, flags)
                dev_err = None if fd >= 0 else ctypes.get_errno()
            finally:
                os.close(dev)
            if dev_err is None:
                return cls._finish(fd, features, handshake)
        raise UffdError(_open_failure(sys_err, dev_err), sys_err)

    @classmethod
    def _finish(cls, fd: int, features: int, handshake: bool) -> Userfaultfd:
        uffd = cls(fd, handshake_done=False)
        if handshake:
            try:
                uffd.api(features)
            except BaseException:
                uffd.close()
                raise
        return uffd

    @classmethod
    def from_fd(cls, fd: int) -> Userfaultfd:
        """Adopt (take ownership of) a userfaultfd received over SCM_RIGHTS; its opener did the handshake.

        The fd is made non-blocking (this changes the shared open file, which is what every user wants).
        """
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise UffdError(f"not a file descriptor: {fd!r}")
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            raise UffdError(f"fd {fd} is not open") from None
        except OSError:
            target = None  # no /proc: trust the caller
        if target is not None and target != "anon_inode:[userfaultfd]":
            raise UffdError(f"fd {fd} is not a userfaultfd but {target}")
        os.set_blocking(fd, False)
        return cls(fd, handshake_done=True)

    @classmethod
    def receive(cls, sock: socket.socket, timeout: float | None = 10.0) -> Userfaultfd:
        """Receive a userfaultfd sent with `send` on a Unix socket (one message, one fd)."""
        old = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 4, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise UffdError(f"no userfaultfd received within {timeout} s") from None
        except OSError as e:
            raise UffdError(f"cannot receive a userfaultfd: {e.strerror or e}", e.errno or 0) from None
        finally:
            sock.settimeout(old)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise UffdError(f"expected one userfaultfd in the message, got {len(fds)} fds")
        try:
            return cls.from_fd(fds[0])
        except UffdError:
            os.close(fds[0])
            raise

    def send(self, sock: socket.socket) -> None:
        """Pass this userfaultfd to the process at the other end of a Unix socket (SCM_RIGHTS)."""
        try:
            socket.send_fds(sock, [b"uffd"], [self.fileno()])
        except OSError as e:
            raise UffdError(f"cannot send the userfaultfd: {e.strerror or e}", e.errno or 0) from None

    # -- ioctls ------------------------------------------------------------------------------------

    def api(self, features: int = 0) -> int:
        """The UFFDIO_API handshake (once per userfaultfd); returns the features the kernel offers."""
        if self.handshake_done:
            raise UffdError("the UFFDIO_API handshake was already done on this userfaultfd")
        arg = uffdio_api(UFFD_API, features, 0)
        if _ioctl(self.fileno(), UFFDIO_API, ctypes.byref(arg)) < 0:
            raise _error(f"UFFDIO_API handshake (features {features:#x})", ctypes.get_errno())
        self.handshake_done = True
        self.features, self.api_ioctls = int(arg.features), int(arg.ioctls)
        return self.features

    def register(self, addr: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
        """Register [addr, addr+length) (page aligned); returns the bitmask of ioctls the range allows."""
        addr, length = _check_range("UFFDIO_REGISTER", addr, length)
        arg = uffdio_register(uffdio_range(addr, length), mode, 0)
        if _ioctl(self.fileno(), UFFDIO_REGISTER, ctypes.byref(arg)) < 0:
            raise _error(f"UFFDIO_REGISTER of {length} bytes at {addr:#x}", ctypes.get_errno())
        return int(arg.ioctls)

    def writeprotect(self, addr: int, length: int, protect: bool = True) -> None:
        """UFFDIO_WRITEPROTECT over [addr, addr+length) of a range registered in WP mode."""
        addr, length = _check_range("UFFDIO_WRITEPROTECT", addr, length)
        arg = uffdio_writeprotect(uffdio_range(addr, length), UFFDIO_WRITEPROTECT_MODE_WP if protect else 0)
        if _ioctl(self.fileno(), UFFDIO_WRITEPROTECT, ctypes.byref(arg)) < 0:
            raise _error(f"UFFDIO_WRITEPROTECT of {length} bytes at {addr:#x}", ctypes.get_errno())

    def register_missing(self, addr: int, length: int) -> int:
        """Register a range for MISSING faults and check that UFFDIO_COPY/ZEROPAGE/WAKE work on it."""
        ioctls = self.register(addr, length, UFFDIO_REGISTER_MODE_MISSING)
        need = (1 << _UFFDIO_COPY) | (1 << _UFFDIO_WAKE) | (1 << _UFFDIO_ZEROPAGE)
        if ioctls & need != need:
            self.unregister(addr, length)
            raise UffdError(
                f"range at {addr:#x} does not support UFFDIO_COPY/ZEROPAGE/WAKE (ioctls {ioctls:#x}); "
                "is it anonymous memory?"
            )
        return ioctls

    def unregister(self, addr: int, length: int) -> None:
        addr, length = _check_range("UFFDIO_UNREGISTER", addr, length)
        arg = uffdio_range(addr, length)
        if _ioctl(self.fileno(), UFFDIO_UNREGISTER, ctypes.byref(arg)) < 0:
            raise _error(f"UFFDIO_UNREGISTER of {length} bytes at {addr:#x}", ctypes.get_errno())

    def wake(self, addr: int, length: int) -> None:
        """Wake the threads waiting on faults in [addr, addr+length)."""
        addr, length = _check_range("UFFDIO_WAKE", addr, length)
        if length == 0:
            return  # a zero length would wake every waiter of this userfaultfd
        arg = uffdio_range(addr, length)
        if _ioctl(self.fileno(), UFFDIO_WAKE, ctypes.byref(arg)) < 0:
            raise _error(f"UFFDIO_WAKE of {length} bytes at {addr:#x}", ctypes.get_errno())

    def copy(self, dst: int, src_addr: int, length: int, *, wake: bool = True) -> int:
        """Install [src_addr, +length) at dst (page aligned) with UFFDIO_COPY; returns the bytes installed.

        Pages already present are left as they are (their bytes are not counted). Unless wake=False,
        every thread waiting in [dst, dst+length) is woken when this returns.
        """
        if isinstance(src_addr, bool) or not isinstance(src_addr, int | np.integer) or src_addr <= 0:
            raise UffdError(f"UFFDIO_COPY: source address must be a positive integer, not {src_addr!r}")
        return self._fill(True, dst, int(src_addr), length, wake)

    def copy_buffer(self, dst: int, buf: Any, *, wake: bool = True) -> int:
        """`copy` from a contiguous buffer (bytes, bytearray, mmap, numpy...) of a page-multiple size."""
        try:
            arr = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise UffdError(f"cannot use a {type(buf).__name__} as a copy source: {e}") from None
        return self._fill(True, dst, int(arr.ctypes.data), arr.nbytes, wake)

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> int:
        """Map zero pages over [dst, dst+length) with UFFDIO_ZEROPAGE; returns the bytes installed."""
        return self._fill(False, dst, 0, length, wake)

    def _fill(self, is_copy: bool, dst: int, src: int, length: int, wake: bool) -> int:
        """UFFDIO_COPY / UFFDIO_ZEROPAGE over a whole range, one syscall per run of missing pages.

        Traps (measured on these VMs; docs/architecture.md, "The Fault Tracker"): if the first page is
        present, nothing is installed and the call fails with EEXIST, without waking anyone; if a later
        page is present, the call fails with EAGAIN and the result field says how much was installed (that
        part was woken). So: advance by the progress,
        skip the single present page, retry; wake the whole range once at the end if a page was skipped.
        """
        name = "UFFDIO_COPY" if is_copy else "UFFDIO_ZEROPAGE"
        dst, length = _check_range(name, dst, length)
        fd = self.fileno()
        dontwake = 0 if wake else 1  # COPY_MODE_DONTWAKE == ZEROPAGE_MODE_DONTWAKE == 1
        done = skipped = stalls = 0
        while done < length:
            n = length - done
            if is_copy:
                arg: Any = uffdio_copy(dst + done, src + done, n, dontwake, 0)
                rc = _ioctl(fd, UFFDIO_COPY, ctypes.byref(arg))
            else:
                arg = uffdio_zeropage(uffdio_range(dst + done, n), dontwake, 0)
                rc = _ioctl(fd, UFFDIO_ZEROPAGE, ctypes.byref(arg))
            if rc == 0:
                done = length
                break
            err = ctypes.get_errno()
            progress = int(arg.copy if is_copy else arg.zeropage)
            if err == errno.EAGAIN and progress > 0:
                done += progress  # stopped at a present page (or ran out of something): retry from there
                self.partial_copies += 1
                stalls = 0
            elif err == errno.EEXIST:
                done += PAGE_SIZE  # the first page of the rest is present: keep it, skip it
                skipped += 1
                stalls = 0
            elif err in (errno.EAGAIN, errno.EINTR) and stalls < 1000:
                stalls += 1  # the mm is changing or a signal came in, nothing done: try again
            else:
                raise _error(f"{name} of {n} bytes at {dst + done:#x}", err)
        installed = length - skipped * PAGE_SIZE
        self.bytes_installed += installed
        self.pages_skipped += skipped
        if skipped and wake:
            self.wake(dst, length)  # EEXIST woke nobody; a waiter on a present page must not hang
        return installed

    # -- events ------------------------------------------------------------------------------------

    def read_faults(self, max_events: int = 64) -> list[int]:
        """Page-aligned addresses of pending MISSING faults (up to max_events, one read); [] if none."""
        if max_events < 1:
            raise UffdError(f"max_events must be at least 1, not {max_events}")
        try:
            data = os.read(self.fileno(), MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        except OSError as e:
            raise _error("read of userfaultfd events", e.errno or errno.EIO) from None
        count = len(data) // MSG_SIZE
        if count == 0:
            return []
        msgs = (uffd_msg * count).from_buffer_copy(data, 0)
        return [m.arg.pagefault.address for m in msgs if m.event == UFFD_EVENT_PAGEFAULT]

    def wait(self, timeout: float | None) -> bool:
        """True when fault events are ready to read within `timeout` seconds (None: wait forever)."""
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        try:
            ready = p.poll(ms)
        except InterruptedError:
            return False
        for _fd, ev in ready:
            if ev & (select.POLLERR | select.POLLNVAL):
                raise UffdError("poll on the userfaultfd failed (is the UFFDIO_API handshake done?)")
            if ev & select.POLLIN:
                return True
        return False

    # -- lifecycle ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd is None:
            raise UffdError("userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        """Close this fd. The registration lives while any process holds the userfaultfd; when the last
        one closes it, waiting threads wake and the range behaves like plain anonymous memory."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd} {'closed' if self._fd is None else 'open'}>"


def _open_failure(sys_err: int, dev_err: int | None) -> str:
    """One line saying why neither userfaultfd(2) nor /dev/userfaultfd gave us a userfaultfd."""
    if sys_err == errno.ENOSYS and dev_err == errno.ENOENT:
        return (
            "the kernel has no userfaultfd (userfaultfd(2) returns ENOSYS and there is no /dev/userfaultfd)"
        )
    if sys_err == errno.EPERM:
        try:
            with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
                sysctl = f.read().strip()
        except OSError:
            sysctl = "?"
        if os.geteuid() != 0 and sysctl == "0":
            return "userfaultfd needs root or vm.unprivileged_userfaultfd=1 (it is 0)"
        return (
            f"userfaultfd is not permitted for this process (EPERM with vm.unprivileged_userfaultfd={sysctl}; "
            "a seccomp or container policy?)"
        )
    sys_name = errno.errorcode.get(sys_err, str(sys_err))
    dev_name = errno.errorcode.get(dev_err, str(dev_err)) if dev_err else "?"
    return (
        f"cannot open a userfaultfd: userfaultfd(2) failed with {sys_name}, /dev/userfaultfd with {dev_name}"
    )


def preflight() -> str | None:
    """None if this process can use userfaultfd for MISSING faults on anonymous memory, else one line why.

    Opens a userfaultfd, registers two fresh pages, installs one with UFFDIO_COPY and one with
    UFFDIO_ZEROPAGE, checks the bytes, and cleans up (well under a millisecond).
    """
    mm = None
    try:
        with Userfaultfd.open() as uffd:
            mm = mmap.mmap(-1, 2 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            addr = buffer_address(mm)
            uffd.register_missing(addr, 2 * PAGE_SIZE)
            pattern = bytes(range(256)) * (PAGE_SIZE // 256)
            uffd.copy_buffer(addr, pattern)
            uffd.zeropage(addr + PAGE_SIZE, PAGE_SIZE)
            uffd.unregister(addr, 2 * PAGE_SIZE)
            ok = mm[:PAGE_SIZE] == pattern and mm[PAGE_SIZE:].count(0) == PAGE_SIZE
            if not ok:
                return "userfaultfd installed the wrong bytes (UFFDIO_COPY or UFFDIO_ZEROPAGE is broken here)"
        return None
    except UffdError as e:
        return str(e)
    except OSError as e:
        return f"userfaultfd preflight failed: {e.strerror or e}"
    finally:
        if mm is not None:
            mm.close()
