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
    if mode == "memfd":
        spool = os.memfd_create("message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    else:
        spool = os.open(tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        copy(fd, spool, max_bytes)
        if mode != "memfd":
            os.lseek(spool, 0, os.SEEK_SET)
            return spool
        fcntl.fcntl(spool, fcntl.F_ADD_SEALS, _SEALS)
        # A read-only descriptor of its own, with its own offset at 0: the write seal stops
        # writes, the read-only open stops even an attempt.
        read_only = reopen_read_only(spool)
    except BaseException:
        os.close(spool)
        raise
    os.close(spool)
    return read_only


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
