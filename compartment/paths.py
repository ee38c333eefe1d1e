"""Paths a supervisor is handed: resolved once, never through a link someone else planted.

Supervisor side, root or not.  A path that a policy, an administrator's command line or a peer
names (a mailbox, a readable directory, the program, the report, a policy file) may lead through
a directory that another user can write, and a symbolic link there would choose what the path
means: whose mailbox decides the agent's uid, which directory is mounted writable, which file root
appends to.  So a path is resolved here one component at a time from /, each opened with
O_PATH | O_NOFOLLOW relative to the last, and a symbolic link is followed only when its owner is
trusted: root by default (the system's own links, /bin -> usr/bin, /lib64; a user cannot make a
link that root owns, and cannot hard-link root's under fs.protected_hardlinks).  Any other link is
refused with its name and owner.

The result is a descriptor.  Whatever is decided about the path (its type, its owner) is read
with fstat from that descriptor, and whatever is mounted or opened is that descriptor
(/proc/self/fd/N): the path is never looked up a second time.

`open_trusted` is for the files a supervisor reads as its own configuration (policies, the
server's config, the compiled-filter cache): besides the links, every directory on the way and the
file itself must be root's (or, for an unprivileged caller's own policy, the caller's) and
writable by nobody else (sshd's StrictModes, sudoers), because whoever can rewrite them chooses
what the supervisor does.  A directory that others may write is accepted only when it is sticky,
like /tmp: its entries can be renamed or removed by their owners alone.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection

_MAX_LINKS = 40  # as the kernel's own path walk (ELOOP)
_STEP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

Check = Callable[[os.stat_result], str | None]  # what is wrong with it, or None


class PathError(Exception):
    """A path that cannot be used: the message names the path, then the component and why."""

    def __init__(self, path: str, why: str, errno: int = 0) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why, self.errno = path, why, errno


def trusted_owners() -> tuple[int, ...]:
    """Whose links a caller's path may go through, and who may own its configuration: root,
    and an unprivileged caller itself (its agent runs as the caller anyway)."""
    uid = os.geteuid()
    return (0,) if uid == 0 else (0, uid)


def open_path(path: str, *, trusted: Collection[int] = (0,)) -> int:
    """An O_PATH descriptor of absolute `path`, following only the links `trusted` uids own."""
    return _walk(path, trusted, None)


def open_trusted(path: str, flags: int = os.O_RDONLY, *, owners: Collection[int] = (0,)) -> int:
    """`path` opened with `flags`, if it and every directory above it belong to `owners` (root
    by default) and nobody else may write them; otherwise PathError names the culprit."""
    found = _walk(path, owners, lambda info: _owned_alone(info, owners))
    try:
        return reopen(found, flags)
    except OSError as err:
        raise PathError(path, err.strerror) from None
    finally:
        os.close(found)


def reopen(fd: int, flags: int) -> int:
    """A new open of what `fd` (often O_PATH) names, with `flags`: no path is looked up."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _owned_alone(info: os.stat_result, owners: Collection[int]) -> str | None:
    """The rule for what a supervisor reads as configuration: one of `owners` owns it and
    nobody else may write it (a sticky directory excepted, whose entries only their owner may
    rename or remove)."""
    mode = info.st_mode
    sticky_directory = stat.S_ISDIR(mode) and mode & stat.S_ISVTX
    if info.st_uid not in owners:
        return (f"owned by uid {info.st_uid}, not {_names(owners)}: whoever owns it could "
                "rewrite this configuration")
    if mode & _OTHERS_WRITE and not sticky_directory:
        return (f"writable by {_writers(mode)} (mode {stat.S_IMODE(mode):04o}): whoever can "
                "write it could rewrite this configuration")
    return None


def _names(uids: Collection[int]) -> str:
    return " or ".join("root" if uid == 0 else f"uid {uid}" for uid in sorted(set(uids)))


def _writers(mode: int) -> str:
    return " and ".join(who for who, bit in (("its group", stat.S_IWGRP),
                                             ("others", stat.S_IWOTH)) if mode & bit)


def _walk(path: str, trusted: Collection[int], check: Check | None) -> int:
    if not path.startswith("/") or "\0" in path:
        raise PathError(repr(path), "not an absolute path")
    current, reached = _root(path, check), "/"
    pending = _parts(path)
    links = 0
    try:
        while pending:
            part = pending.pop()
            here = os.path.join(reached, part) if part != ".." else os.path.dirname(reached)
            step = _open_step(path, current, part, here)
            info = os.fstat(step)
            if stat.S_ISLNK(info.st_mode):
                links += 1
                target = _link_target(path, step, here, info, trusted, links)
                pending += _parts(target)
                if target.startswith("/"):
                    os.close(current)
                    current, reached = _root(path, check), "/"
                continue
            if check:
                _checked(check, path, step, here, info)
            if pending and not stat.S_ISDIR(info.st_mode):
                os.close(step)
                raise PathError(path, f"{here}: not a directory")
            os.close(current)
            current, reached = step, here
        found, current = current, -1
        return found
    finally:
        if current >= 0:
            os.close(current)


def _root(path: str, check: Check | None) -> int:
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if check:
        _checked(check, path, root, "/", os.fstat(root))
    return root


def _checked(check: Check, path: str, fd: int, here: str, info: os.stat_result) -> None:
    problem = check(info)
    if problem:
        os.close(fd)
        raise PathError(path, f"{here}: {problem}")


def _open_step(path: str, directory: int, part: str, here: str) -> int:
    try:
        return os.open(part, _STEP, dir_fd=directory)
    except PermissionError:
        # EACCES here means the directory we stand in cannot be searched, not that `here`
        # is missing: say which, or an administrator looks for the wrong problem.
        raise PathError(path, f"permission denied: {os.path.dirname(here)} cannot be "
                        "searched") from None
    except OSError as err:
        raise PathError(path, f"{here}: {err.strerror}", err.errno or 0) from None


def _link_target(path: str, link: int, here: str, info: os.stat_result,
                 trusted: Collection[int], links: int) -> str:
    """The text of a link we may follow, read from its own descriptor (not its name again)."""
    try:
        if info.st_uid not in trusted:
            raise PathError(path, f"{here} is a symbolic link owned by uid {info.st_uid}; "
                            f"only links owned by {_names(trusted)} are followed")
        if links > _MAX_LINKS:
            raise PathError(path, f"more than {_MAX_LINKS} symbolic links")
        return os.readlink("", dir_fd=link)
    finally:
        os.close(link)


def _parts(path: str) -> list[str]:
    """Components to visit, last first (the walk pops from the end); '.' and '' dropped."""
    return [part for part in reversed(path.split("/")) if part not in ("", ".")]
