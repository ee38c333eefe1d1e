"""The agent's root, planned: what the new root will hold, from the policy and this machine.

Parent side, before clone, like the syscall-filter compiler: the administrator's [filesystem]
section in, frozen data out.  For a "system" root: the read-only system directories and the
listed /etc files, then the declared readable and writable paths, the program itself when
nothing else shows it, the devices, a private /tmp.  Paths the administrator named must exist;
optional /etc files that this machine lacks are left out.  compartment.confine.filesystem builds
the plan in the child.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass

from compartment import syscalls
from compartment.policy import Filesystem

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
