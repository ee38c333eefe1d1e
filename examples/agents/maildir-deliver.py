#!/usr/bin/python3
"""Deliver the message on standard input into a Maildir: a small sample delivery agent.

    usage: maildir-deliver.py MAILDIR

Meant to run inside `compartment run -p deliver --set filesystem.writable=MAILDIR`, where the
Maildir is the only writable directory the agent can see.  It follows the Maildir protocol:
write the whole message under tmp/ with a unique name, fsync it, then link it into new/ (a
reader never sees a partial message), and remove the tmp/ name.

A leading mbox "From " envelope line is dropped (see copy_stdin).

Exit status (sysexits.h): 0 when the message is safely in new/, 75 (EX_TEMPFAIL) on any error,
so that every MTA keeps the message and retries; this agent never asks for a bounce, because
nothing it can fail on is the sender's fault.  Postfix pipe(8) defers only on 71 and 75, which
is why this agent does not use 73 or 74 for "cannot create" or "I/O error".
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time

EX_OK = 0
EX_TEMPFAIL = 75
CHUNK_BYTES = 1 << 16


def unique_name() -> str:
    """A Maildir file name nobody else will pick: time, microseconds, pid and random bits.

    Inside a compartment the pid is small and repeats (a fresh pid namespace per delivery) and
    the host name may be the compartment's own, so the random part carries the uniqueness.
    """
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
    return f"{seconds}.M{micros}P{os.getpid()}R{secrets.token_hex(8)}.{host}"


def write_all(out_fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(out_fd, view)
        view = view[written:]


def copy_stdin(out_fd: int) -> int:
    """Copy standard input to out_fd until end of file; return the byte count written.

    A leading mbox envelope line ("From sender date", which Postfix local(8) puts in front
    of the message for mailbox_command) is dropped: a Maildir file holds the message alone.
    No header field can start with "From " (a field name has no space), so nothing else is
    ever dropped.
    """
    stdin = sys.stdin.buffer
    first = stdin.readline()
    if first.startswith(b"From "):
        first = b""
    write_all(out_fd, first)
    total = len(first)
    while chunk := stdin.read(CHUNK_BYTES):
        write_all(out_fd, chunk)
        total += len(chunk)
    return total


def fsync_dir(path: str) -> None:
    """Make a rename or link in `path` durable."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def deliver(maildir: str) -> str:
    """Write stdin into maildir/tmp, then move it into maildir/new; return the final path."""
    name = unique_name()
    tmp_path = os.path.join(maildir, "tmp", name)
    new_path = os.path.join(maildir, "new", name)
    # O_EXCL: a name collision is an error, never an overwrite of someone else's message.
    out_fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_stdin(out_fd)
        os.fsync(out_fd)
    except BaseException:
        os.close(out_fd)
        os.unlink(tmp_path)
        raise
    os.close(out_fd)
    # link() fails if new/NAME exists, where rename() would silently replace it.
    os.link(tmp_path, new_path)
    fsync_dir(os.path.join(maildir, "new"))
    os.unlink(tmp_path)
    return new_path


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not os.path.isabs(argv[1]):
        print("usage: maildir-deliver.py /absolute/path/to/Maildir", file=sys.stderr)
        # A configuration mistake, not the message's fault: keep the mail queued.
        return EX_TEMPFAIL
    maildir = argv[1]
    try:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
        deliver(maildir)
    except Exception as exc:  # every failure here is temporary: the MTA keeps the message
        # Postfix and Exim show the first line of output in the bounce or defer reason.
        print(f"4.2.0 maildir-deliver: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
