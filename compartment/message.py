"""How the message reaches the agent's stdin: handed over read-only, or copied first.

Supervisor side.  The message is moved between descriptors by the kernel (splice, sendfile,
copy_file_range) and never read into Python: the supervisor does not look at it.

- "direct": the caller's descriptor, always as a read-only open file description (stdin is for
  reading: an agent must not write into the caller's terminal, file or socket through fd 0).
  One the caller opened read-only (a pipe from Postfix or Exim, qmail's queue file) is handed
  as it is; a terminal, device, FIFO or file opened for writing too is opened again read-only
  (refused when this user may not); a socket has its write direction shut down, or is copied
  when it is also stdout or stderr.
- "memfd": a sealed, read-only memfd — seekable, and nothing can change it (qmail semantics for
  agents that read twice or mmap the message).
- "file": a private writable memfd, for in-place editors.  Its growth is bounded by the agent's
  RLIMIT_FSIZE (limits.file_bytes) and held in memory, not on the host's disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterator

_CHUNK = 1 << 20
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class MessageError(Exception):
    """The message cannot be handed over: too large, or unreadable."""


@contextlib.contextmanager
def handed(fds: tuple[int, int, int], mode: str, max_bytes: int) -> Iterator[int]:
    """The descriptor to give the agent as stdin (fds[0] is the caller's, fds[1] and fds[2]
    its stdout and stderr); whatever was opened for it is closed when the run is over."""
    if mode == "direct":
        with read_only(fds, max_bytes) as stdin:
            yield stdin
        return
    spool = spool_copy(fds[0], mode, max_bytes)
    try:
        yield spool
    finally:
        os.close(spool)


@contextlib.contextmanager
def read_only(fds: tuple[int, int, int], max_bytes: int) -> Iterator[int]:
    """The caller's stdin as a read-only open file description (see the module's comment)."""
    fd = fds[0]
    try:
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        info = os.fstat(fd)
    except OSError as err:
        raise MessageError(f"stdin: {err.strerror}") from None
    if access == os.O_RDONLY:
        yield fd
        return
    if access == os.O_WRONLY:
        raise MessageError("stdin is open for writing only: there is no message to read")
    if stat.S_ISSOCK(info.st_mode):
        if not _shared(info, fds[1:]):
            _shut_writing(fd)
            yield fd
            return
        # also stdout or stderr, which shutting it would cut: a sealed copy instead
        ours, regular = spool_copy(fd, "memfd", max_bytes), False
    else:  # a file starts where the caller stands and is left where the agent stopped
        ours, regular = _reopen(fd), stat.S_ISREG(info.st_mode)
    try:
        if regular:
            os.lseek(ours, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
        yield ours
        if regular:
            os.lseek(fd, os.lseek(ours, 0, os.SEEK_CUR), os.SEEK_SET)
    finally:
        os.close(ours)


def _reopen(fd: int) -> int:
    """A new read-only open of what fd names."""
    try:
        # O_NONBLOCK: a FIFO whose writer is gone must not block this open; O_NOCTTY: a
        # terminal must not become the supervisor's controlling one.
        ours = os.open(f"/proc/self/fd/{fd}",
                       os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:  # e.g. a terminal of another user's, handed down: refused, since
        # copying one would wait for an end that may never come
        raise MessageError(f"stdin cannot be opened again read-only ({err.strerror}); give "
                           "the message on a pipe or in a file") from None
    os.set_blocking(ours, True)
    return ours


def _shared(info: os.stat_result, others: tuple[int, ...]) -> bool:
    """Is this socket also one of the caller's other descriptors?"""
    for fd in others:
        with contextlib.suppress(OSError):  # not open: it shares nothing
            if os.path.samestat(info, os.fstat(fd)):
                return True
    return False


def _shut_writing(fd: int) -> None:
    """A socket cannot be opened again read-only: its write direction is shut down instead.
    MTAs that hand one (Postfix's pipe(8), a socketpair) never read back from it."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            raise MessageError(f"stdin: a socket that cannot be made read-only "
                               f"({err.strerror})") from None


def spool_copy(fd: int, mode: str, max_bytes: int) -> int:
    """Copy all of `fd` into a new spool positioned at 0: a memfd, sealed and read-only
    ("memfd") or writable ("file"), memory charged to whoever fills it; or ("disk") an
    unlinked file under /var/tmp for the supervisor's own keeping (the filter's original),
    of which the agent is only ever shown a read-only open."""
    spool = Spool(fd, mode, max_bytes)
    try:
        copy(fd, spool.fd, max_bytes)
    except BaseException:
        spool.close()
        raise
    return spool.finish()


class Spool:
    """A new spool for the message (see spool_copy).  copy() fills it at once; step() a
    little at a time without ever blocking, for the resident supervisor's loop (a pipe is read
    with SPLICE_F_NONBLOCK, a file by chunks).  finish() gives the descriptor the agent reads:
    sealed read-only for "memfd", rewound otherwise."""

    def __init__(self, source: int, mode: str, max_bytes: int) -> None:
        self.source, self.mode, self.max_bytes, self.total = source, mode, max_bytes, 0
        self.pipe = stat.S_ISFIFO(os.fstat(source).st_mode)
        if mode == "disk":
            self.fd = os.open("/var/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        else:
            self.fd = os.memfd_create("message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)

    def step(self) -> bool:
        """Move what the source has now, up to a chunk; True once it is all in."""
        try:
            if self.pipe:
                moved = os.splice(self.source, self.fd, _CHUNK, flags=os.SPLICE_F_NONBLOCK)
            else:
                moved = os.sendfile(self.fd, self.source, None, _CHUNK)
        except BlockingIOError:
            return False  # a pipe with nothing in it yet
        except OSError as err:
            raise MessageError(f"cannot copy the message: {err.strerror}") from None
        self.total += moved
        if self.total > self.max_bytes:
            raise MessageError(f"the message is larger than message.max_bytes "
                               f"({self.max_bytes})")
        return moved == 0

    def finish(self) -> int:
        """The agent's descriptor; this spool's own is closed (or handed over)."""
        if self.mode != "memfd":
            os.lseek(self.fd, 0, os.SEEK_SET)
            handed, self.fd = self.fd, -1
            return handed
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            # A read-only descriptor of its own, with its own offset at 0: the write seal stops
            # writes, the read-only open stops even an attempt.
            return reopen_read_only(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sealed(data: bytes | bytearray | memoryview) -> int:
    """A sealed memfd holding `data`, positioned at 0: nothing can change it."""
    spool = os.memfd_create("message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        write_all(spool, data)
        fcntl.fcntl(spool, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(spool, 0, os.SEEK_SET)
    except BaseException:
        os.close(spool)
        raise
    return spool


def reopen_read_only(fd: int) -> int:
    """A new read-only open of the same file, with its own offset at 0."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def copy(source: int, destination: int, max_bytes: int | None = None) -> int:
    """Move everything from source to destination in the kernel; returns the byte count."""
    total = 0
    move = _mover(source, destination)
    while True:
        limit = _CHUNK if max_bytes is None else min(_CHUNK, max_bytes - total + 1)
        try:
            moved = move(limit)
        except OSError as err:
            raise MessageError(f"cannot copy the message: {err.strerror}") from None
        if moved == 0:
            return total
        total += moved
        if max_bytes is not None and total > max_bytes:
            raise MessageError(f"the message is larger than message.max_bytes ({max_bytes})")


def _mover(source: int, destination: int):  # noqa: ANN202 - a closure over the two descriptors
    if stat.S_ISFIFO(os.fstat(source).st_mode) or stat.S_ISFIFO(os.fstat(destination).st_mode):
        return lambda count: os.splice(source, destination, count)

    def send(count: int) -> int:
        try:
            return os.sendfile(destination, source, None, count)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
        data = os.read(source, count)  # a socket or a terminal: the slow way
        write_all(destination, data)
        return len(data)
    return send


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until all of data is written (a pipe or socket may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
