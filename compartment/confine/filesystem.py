"""Filesystem: a new root built from nothing, then pivot_root into it.

Parent side (`plan`): decide what the agent will see — for a "system" root the read-only system
directories and the listed /etc files, then the declared readable and writable paths, the program
itself when nothing else shows it, the devices, a private /tmp.  Paths the administrator named
must exist; optional /etc files that this machine lacks are left out.

Child side (`enter`), in the new mount namespace, privileged: stop mount propagation, open every
source first (the staging tmpfs at /tmp would hide sources below /tmp), build the tree on a small
tmpfs (small world-readable /etc files copied, not bound), make it read-only, pivot_root into it
and detach the old root.  Every bind is remounted
nosuid and nodev; read-only binds keep the flags the kernel locks (noexec, atime) in a user
namespace, or the remount would fail.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass

from compartment import syscalls
from compartment.confine.errors import fail
from compartment.policy import Filesystem

STEP = "filesystem"
STAGE = "/tmp"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")

_PRESERVED = ((os.ST_NOEXEC, syscalls.MS_NOEXEC), (os.ST_NOATIME, syscalls.MS_NOATIME),
              (os.ST_NODIRATIME, syscalls.MS_NODIRATIME), (os.ST_RELATIME, syscalls.MS_RELATIME))


class PlanError(Exception):
    """A path named by the policy cannot be shown: a configuration error, nothing runs."""


@dataclass(frozen=True)
class Entry:
    kind: str  # "ro", "rw", "dev" (bind mounts), "copy" or "symlink"
    target: str
    source: str
    directory: bool = False  # a directory is bound onto a directory, anything else onto a file
    remount: int = 0  # flags for the bind's remount; 0 for none


@dataclass(frozen=True)
class Plan:
    entries: tuple[Entry, ...]
    directories: tuple[str, ...]  # to create on the new root, parents first
    tmp_bytes: int
    proc: bool

    def shows(self, path: str) -> bool:
        """Will `path` be reachable inside the new root?"""
        return any(_covers(entry, path) for entry in self.entries)


def plan(policy: Filesystem, program: str | None) -> Plan:
    """Parent side: the list of what the new root holds, checked against this machine.  The
    paths the policy names are checked on every run (a mailbox may come and go); the rest of
    the plan is kept for the life of the process."""
    for kind, paths in (("readable", policy.readable), ("writable", policy.writable)):
        for path in paths:
            if not os.path.exists(path):
                raise PlanError(f"filesystem.{kind}: {path}: no such file or directory")
            if kind == "writable" and not os.path.isdir(path):
                raise PlanError(f"filesystem.writable: {path}: not a directory")
    return _plan(policy, program)


@functools.lru_cache(maxsize=64)
def _plan(policy: Filesystem, program: str | None) -> Plan:
    entries: list[Entry] = []
    if policy.root == "system":
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                entries.append(Entry("symlink", path, os.readlink(path)))
            elif os.path.isdir(path):
                entries.append(Entry("ro", path, path))
        entries += [Entry("ro", f"/etc/{name}", f"/etc/{name}") for name in policy.etc
                    if os.path.exists(f"/etc/{name}")]
    entries += [Entry("ro", path, path) for path in policy.readable]
    entries += [Entry("rw", path, path) for path in policy.writable]
    if program and not any(_covers(e, program) for e in entries):
        entries.append(Entry("ro", program, program))
    entries += [Entry("dev", f"/dev/{name}", f"/dev/{name}") for name in policy.devices]
    entries = [_describe(entry) for entry in entries]
    return Plan(tuple(entries), _directories(entries, policy), policy.tmp_bytes, policy.proc)


def _describe(entry: Entry) -> Entry:
    """Work the child would otherwise repeat on every run: what the source is, and the remount
    flags — nosuid, nodev, read-only where asked, plus the flags of the source mount that the
    kernel locks in a user namespace (noexec, atime), without which the remount fails."""
    if entry.kind == "symlink":
        return entry
    directory = os.path.isdir(entry.source)
    info = os.stat(entry.source)
    if entry.target.startswith("/etc/") and stat.S_ISREG(info.st_mode) and info.st_mode & 0o004:
        # A copy, not a bind: an flock on a shared /etc/passwd would be seen by the host and by
        # every other compartment.  These files are small; a private copy costs microseconds.
        return Entry("copy", entry.target, entry.source)
    if entry.kind == "dev":
        return Entry(entry.kind, entry.target, entry.source, directory)
    flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_NOSUID | syscalls.MS_NODEV
    if entry.kind == "ro":
        flags |= syscalls.MS_RDONLY
    locked = os.statvfs(entry.source).f_flag
    flags |= sum(ms for st, ms in _PRESERVED if locked & st)
    return Entry(entry.kind, entry.target, entry.source, directory, flags)


def _directories(entries: list[Entry], policy: Filesystem) -> tuple[str, ...]:
    """Every directory the new root needs, shallowest first, so parents precede children
    (and /tmp, mounted as it is made, precedes whatever is shown below it)."""
    wanted = {os.path.dirname(e.target) for e in entries} | \
        {e.target for e in entries if e.directory} | \
        ({"/tmp"} if policy.tmp_bytes else set()) | ({"/proc"} if policy.proc else set())
    every = {path[:end] for path in wanted for end in range(len(path) + 1)
             if end == len(path) or path[end] == "/"} - {"", "/"}
    return tuple(sorted(every, key=lambda path: (path.count("/"), path)))


def _covers(entry: Entry, path: str) -> bool:
    if entry.kind == "symlink":  # /bin -> usr/bin: the program is reachable if usr/bin is shown
        return path.startswith(entry.target + "/")
    return path == entry.target or path.startswith(entry.target.rstrip("/") + "/")


def enter(fs: Plan) -> None:
    """Child side: build the root and pivot into it.  Needs CAP_SYS_ADMIN in the mount ns."""
    _mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    sources = {e.source: _open_path(e.source, e.kind == "copy") for e in fs.entries
               if e.kind != "symlink"}
    _mount("tmpfs", STAGE, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
           "size=8m,nr_inodes=4096,mode=0755")
    for path in fs.directories:
        _call("mkdir", path, os.mkdir, STAGE + path, 0o755)
        if path == "/tmp" and fs.tmp_bytes:
            # First, so that declared paths below /tmp are shown on top of it.
            _mount("tmpfs", STAGE + "/tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                   f"size={fs.tmp_bytes},mode=1777")
    for entry in fs.entries:
        if entry.kind == "symlink":
            _call("symlink", entry.target, os.symlink, entry.source, STAGE + entry.target)
        elif entry.kind == "copy":
            _call("copy", entry.target, _copy, sources[entry.source], STAGE + entry.target)
        else:
            _bind(entry, sources[entry.source])
    if fs.proc:
        _mount("proc", STAGE + "/proc", "proc",
               syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    _mount(None, STAGE, None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_NOSUID
           | syscalls.MS_NODEV)
    _pivot()


def _bind(entry: Entry, source_fd: int) -> None:
    target = STAGE + entry.target
    if not entry.directory:
        _call("mknod", target, os.mknod, target, 0o600)
    # Bind through the O_PATH descriptor: the path opened in the parent's view is the one shown,
    # even though the staging tmpfs now covers /tmp.
    _mount(f"/proc/self/fd/{source_fd}", target, None, syscalls.MS_BIND)
    os.close(source_fd)
    if entry.remount:
        _mount(None, target, None, entry.remount)


def _copy(source_fd: int, target: str) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        while os.sendfile(out, source_fd, None, 1 << 20):
            continue
    finally:
        os.close(out)
        os.close(source_fd)


def _pivot() -> None:
    # pivot_root(".", "."): the old root ends up stacked on the new one and is detached at once,
    # so no path to the host's tree remains (pivot_root(2), "new_root and put_old may be the same").
    _call("chdir", STAGE, os.chdir, STAGE)
    try:
        syscalls.pivot_root(".", ".")
        syscalls.umount2(".", syscalls.MNT_DETACH)
    except OSError as err:
        raise fail(STEP, "pivot_root", err, STAGE) from None
    _call("chdir", "/", os.chdir, "/")


def _open_path(path: str, readable: bool = False) -> int:
    try:
        return os.open(path, (os.O_RDONLY if readable else os.O_PATH) | os.O_CLOEXEC)
    except OSError as err:
        raise fail(STEP, "open", err, path) from None


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    try:
        syscalls.mount(source, target, fstype, flags, data)
    except OSError as err:
        raise fail(STEP, "mount", err, f"{source or ''} {target}".strip()) from None


def _call(call: str, path: str, function: object, *args: object) -> None:
    try:
        function(*args)  # type: ignore[operator]
    except OSError as err:
        raise fail(STEP, call, err, path) from None
