"""How the message reaches the agent's stdin: handed over as it is, or spooled first.

Supervisor side.  The message is moved between descriptors by the kernel (splice, sendfile,
copy_file_range) and never read into Python: the supervisor does not look at it.

- "direct": the caller's descriptor itself (a pipe from Postfix or Exim, qmail's queue file).
- "memfd": a sealed, read-only memfd — seekable, and nothing can change it (qmail semantics for
  agents that read twice or mmap the message).
- "file": a private unlinked temporary file, readable and writable, for in-place editors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

_CHUNK = 1 << 20
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class MessageError(Exception):
    """The message cannot be handed over: too large, or unreadable."""


@contextlib.contextmanager
def handed(fd: int, mode: str, max_bytes: int, tmpdir: str = "/var/tmp") -> Iterator[int]:
    """The descriptor to give the agent as stdin; a spool is closed when the run is over."""
    if mode == "direct":
        yield fd
        return
    spool = spool_copy(fd, mode, max_bytes, tmpdir)
    try:
        yield spool
    finally:
        os.close(spool)


def spool_copy(fd: int, mode: str, max_bytes: int, tmpdir: str = "/var/tmp") -> int:
    """Copy all of `fd` into a new memfd or temporary file, positioned at 0."""
    spool = Spool(fd, mode, max_bytes, tmpdir)
    try:
        copy(fd, spool.fd, max_bytes)
    except BaseException:
        spool.close()
        raise
    return spool.finish()


class Spool:
    """A new memfd or private temporary file for the message.  copy() fills it at once;
    step() a little at a time without ever blocking, for the resident supervisor's loop (a
    pipe is read with SPLICE_F_NONBLOCK, a file by chunks).  finish() gives the descriptor the
    agent reads: sealed read-only for "memfd", rewound for "file"."""

    def __init__(self, source: int, mode: str, max_bytes: int, tmpdir: str = "/var/tmp") -> None:
        self.source, self.mode, self.max_bytes, self.total = source, mode, max_bytes, 0
        self.pipe = stat.S_ISFIFO(os.fstat(source).st_mode)
        if mode == "memfd":
            self.fd = os.memfd_create("message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        else:
            self.fd = os.open(tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

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


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of data is written (a pipe or socket may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
