"""The agent's root, planned: what the new root will hold, from the policy and this machine.

Parent side, before clone, like the syscall-filter compiler: the administrator's [filesystem]
section in, frozen data out.  For a "system" root: the read-only system directories and the
listed /etc files, then the declared readable and writable paths, the program itself when
nothing else shows it, the devices, a private /tmp.  Optional /etc files that this machine lacks
are left out.  compartment.confine.filesystem builds the plan in the child.

The system's own part (root's directories and files) is the same on every run and is kept for the
life of the process.  The paths a policy names and the program are another matter: a mailbox may
be a link its owner planted a moment ago.  The supervisor opens each of those once
(compartment.paths) and the plan carries the descriptor: its type and mount flags are read from
it here, and the child mounts exactly it.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace

from compartment import syscalls

TYPE_CHECKING = False  # the spawner imports this module, and must not import the loader
if TYPE_CHECKING:
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
    fd: int = -1  # the supervisor's descriptor of a named path, for this run; -1: the child
    #               opens `source` itself (the system's own directories and /etc files)
    detached: bool = False  # fd is a detached mount to attach (confine.filesystem.prepare)
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of a named path, as decided on


@dataclass(frozen=True)
class Plan:
    entries: tuple[Entry, ...]
    directories: tuple[str, ...]  # to create on the new root, parents first
    tmp_bytes: int
    proc: bool

    def shows(self, path: str) -> bool:
        """Will `path` be reachable inside the new root?"""
        return any(_covers(entry, path) for entry in self.entries)


def plan(policy: Filesystem, program: str | None, opened: Mapping[str, int]) -> Plan:
    """Parent side: the list of what the new root holds.  `opened` has a descriptor
    (compartment.paths.open_path) for every readable and writable path and for the program."""
    entries = list(_system(policy))
    for kind, paths in (("ro", policy.readable), ("rw", policy.writable)):
        entries += [_named(Entry(kind, path, path, fd=opened[path])) for path in paths]
    if program and not any(_covers(e, program) for e in entries):
        entries.append(_named(Entry("ro", program, program, fd=opened[program])))
    entries += _devices(policy.devices)
    return Plan(tuple(entries), _directories(entries, policy), policy.tmp_bytes, policy.proc)


@functools.lru_cache(maxsize=64)
def _system(policy: Filesystem) -> tuple[Entry, ...]:
    """The system directories and /etc files: root's, the same on every run."""
    if policy.root != "system":
        return ()
    entries: list[Entry] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            entries.append(Entry("symlink", path, os.readlink(path)))
        elif os.path.isdir(path):
            entries.append(Entry("ro", path, path))
    entries += [Entry("ro", f"/etc/{name}", f"/etc/{name}") for name in policy.etc
                if os.path.exists(f"/etc/{name}")]
    return tuple(_describe(e, os.stat(e.source), os.statvfs(e.source).f_flag)
                 if e.kind != "symlink" else e for e in entries)


@functools.lru_cache(maxsize=8)
def _devices(names: tuple[str, ...]) -> tuple[Entry, ...]:
    return tuple(Entry("dev", f"/dev/{name}", f"/dev/{name}",
                       os.path.isdir(f"/dev/{name}")) for name in names)


def _named(entry: Entry) -> Entry:
    """A path the policy names or the program, described from its descriptor."""
    info = os.fstat(entry.fd)
    if entry.kind == "rw" and not stat.S_ISDIR(info.st_mode):
        raise PlanError(f"filesystem.writable: {entry.source}: not a directory")
    described = _describe(entry, info, os.fstatvfs(entry.fd).f_flag)
    return replace(described, identity=(info.st_dev, info.st_ino))


def _describe(entry: Entry, info: os.stat_result, locked: int) -> Entry:
    """Work the child would otherwise repeat on every run: what the source is, and the remount
    flags — nosuid, nodev, read-only where asked, plus the flags of the source mount that the
    kernel locks in a user namespace (noexec, atime), without which the remount fails."""
    directory = stat.S_ISDIR(info.st_mode)
    if entry.target.startswith("/etc/") and stat.S_ISREG(info.st_mode) and info.st_mode & 0o004:
        # A copy, not a bind: an flock on a shared /etc/passwd would be seen by the host and by
        # every other compartment.  These files are small; a private copy costs microseconds.
        return replace(entry, kind="copy")
    flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_NOSUID | syscalls.MS_NODEV
    if entry.kind == "ro":
        flags |= syscalls.MS_RDONLY
    flags |= sum(ms for st, ms in _PRESERVED if locked & st)
    return replace(entry, directory=directory, remount=flags)


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
