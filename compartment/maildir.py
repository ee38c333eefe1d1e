"""A missing Maildir made for its owner, as Postfix's local(8) makes one: never as root.

Supervisor side, before the compartment is planned, for a policy with
`filesystem.create_maildir`.  The Maildir's parent comes as a descriptor opened without
following symlinks (compartment.paths); NAME, NAME/cur, NAME/new and NAME/tmp are made
relative to that descriptor, so they are made where it points, whatever the path names now.
As root they are made by a forked child that has taken the owner's ids (groups, gid, uid, read
back) before it makes anything, so they belong to the owner and it can make nothing the owner
could not; unprivileged, the caller is the owner and makes them itself.  A parent owned by
root is refused: the agent would have to run as root to deliver there.
"""

from __future__ import annotations

import errno
import os
import stat

SUBDIRECTORIES = ("cur", "new", "tmp")
MODE = 0o700


class MaildirError(Exception):
    """The Maildir cannot be made: the message says where and why."""


def create(parent_fd: int, name: str, where: str) -> None:
    """Make parent/name and its cur, new, tmp (those missing) as the parent's owner.
    `where` is the Maildir's path, for messages only."""
    owner = os.fstat(parent_fd)
    if owner.st_uid == 0:
        raise MaildirError(f"{where}: cannot be made: its parent is owned by root (give the "
                           "account a Maildir of its own, e.g. from /etc/skel/Maildir)")
    if os.geteuid() != 0:
        _make(parent_fd, name, where)
        return
    reading, writing = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: the owner's ids first, then nothing but the directories
        os.close(reading)
        code = 1
        try:
            _become(owner.st_uid, owner.st_gid)
            _make(parent_fd, name, where)
            code = 0
        except BaseException as err:  # noqa: BLE001 - the child's outermost frame: report it
            os.write(writing, str(err).encode()[:4000])
        finally:
            os._exit(code)  # never back into the supervisor's code
    os.close(writing)
    with os.fdopen(reading, "rb") as said:
        problem = said.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if problem or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise MaildirError(problem or f"{where}: the process making it ended with {status:#x}")


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or os.getgroups():
        raise MaildirError(f"cannot take uid {uid} and gid {gid} to make the Maildir")


def _make(parent_fd: int, name: str, where: str) -> None:
    maildir = _directory(parent_fd, name, where)
    try:
        for sub in SUBDIRECTORIES:
            os.close(_directory(maildir, sub, f"{where}/{sub}"))
    finally:
        os.close(maildir)


def _directory(parent_fd: int, name: str, where: str) -> int:
    """parent/name, made if missing; opened without following a symlink either way."""
    try:
        os.mkdir(name, MODE, dir_fd=parent_fd)
    except FileExistsError:
        pass  # made meanwhile, or there all along: what it is is checked below
    except OSError as err:
        raise MaildirError(_why(err, where, parent_fd)) from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except OSError as err:
        raise MaildirError(_why(err, where, parent_fd)) from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise MaildirError(f"{where}: not a directory")
    return fd


def _why(err: OSError, where: str, parent_fd: int) -> str:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return f"{where}: a symlink or not a directory; refusing to follow it"
    if err.errno == errno.EACCES:
        parent = os.path.dirname(where)
        if os.fstat(parent_fd).st_uid == 0:
            return f"{where}: permission denied: {parent} is owned by root"
        return f"{where}: permission denied: its owner cannot write {parent}"
    return f"{where}: cannot be made: {err.strerror}"
