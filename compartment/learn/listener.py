"""The learning listener: `compartment learn`'s answer to the agent's seccomp notifications.

Supervisor side, `compartment learn` only, in the supervisor's one thread (the watch calls
`Learner.notified` for each notification instead of killing the compartment).  This module is
never imported on a delivery path: `compartment run`, `filter` and the API pass no learner.

What it does with a notification, in order:
1. the built-in baseline (what the most permissive filter any policy can compile still sends
   to the listener: the mount family, namespaces, ptrace, bpf, the keyring, sockets other than
   AF_UNIX, namespace flags to clone...) is recorded and refused with EPERM.  No policy may
   allow these, and some reach beyond the compartment (the kernel keyring is per uid, not per
   namespace), so learning never lets one run;
2. anything else is recorded and let through (SECCOMP_USER_NOTIF_FLAG_CONTINUE, Linux 5.5):
   the syscalls the base policy would refuse but a policy could allow, and the file, process
   and exit calls the learning filter adds so that learn sees the paths the program asks for.

Why letting these through never lets the program reach the host: every other step of the
compartment is the base policy's, unchanged — the root (only what the base shows, read-only
where it says so), the empty network namespace, the pid, mount and ipc namespaces, the uid, no
capabilities, no_new_privs, the rlimits and the output bound.  A call let through here is the
same call a policy allowing it would let through, inside the same walls.

To name the paths, this module reads the agent's memory: the path argument, from
/proc/PID/mem, bounded to PATH_MAX, kept as bytes until decoded for the record.  That is the
supervisor reading memory the agent controls, which the delivery path never does; it is
acceptable here because learn is an administrator's tool run on sample messages, and what it
reads only ever becomes a line in a proposal the administrator reviews.  The agent may change
the string between our read and the kernel's (another thread), so a hostile program can make
learn record a path it did not open: the record is evidence to review, not a decision.  After
reading, SECCOMP_IOCTL_NOTIF_ID_VALID checks that the task is still the one stopped in the call
(not a pid reused by another process), else the record is dropped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field

from compartment import syscall_filter, syscalls
from compartment.learn import bpf
from compartment.policy import Network, Policy, Seccomp

PATH_MAX = 4096
MAX_PATHS = 50_000  # distinct paths recorded per sample
_PAGE = os.sysconf("SC_PAGE_SIZE")
_AT_FDCWD = -100
_HEAD = struct.Struct("=QI")  # struct seccomp_notif: id, pid (then flags, seccomp_data)
_ARGS = struct.Struct("=6Q")  # seccomp_data.args, at offset 16 of seccomp_data
_RESPONSE = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags

# The calls that name a path: name -> ((dirfd argument or None, path argument), ...).  Names this
# architecture lacks (open, stat... on aarch64) are skipped by the filter compiler.
PATH_CALLS: dict[str, tuple[tuple[int | None, int], ...]] = {
    "open": ((None, 0),), "creat": ((None, 0),), "openat": ((0, 1),),
    "stat": ((None, 0),), "lstat": ((None, 0),), "newfstatat": ((0, 1),), "statx": ((0, 1),),
    "access": ((None, 0),), "faccessat": ((0, 1),), "faccessat2": ((0, 1),),
    "execve": ((None, 0),), "execveat": ((0, 1),),
    "readlink": ((None, 0),), "readlinkat": ((0, 1),), "chdir": ((None, 0),),
    "statfs": ((None, 0),), "getxattr": ((None, 0),), "lgetxattr": ((None, 0),),
    "listxattr": ((None, 0),), "llistxattr": ((None, 0),),
    "mkdir": ((None, 0),), "mkdirat": ((0, 1),), "rmdir": ((None, 0),),
    "unlink": ((None, 0),), "unlinkat": ((0, 1),), "truncate": ((None, 0),),
    "rename": ((None, 0), (None, 1)), "renameat": ((0, 1), (2, 3)),
    "renameat2": ((0, 1), (2, 3)), "link": ((None, 0), (None, 1)), "linkat": ((0, 1), (2, 3)),
    "symlink": ((None, 1),), "symlinkat": ((1, 2),), "mknod": ((None, 0),),
    "mknodat": ((0, 1),), "chmod": ((None, 0),), "fchmodat": ((0, 1),), "chown": ((None, 0),),
    "lchown": ((None, 0),), "fchownat": ((0, 1),), "utimensat": ((0, 1),),
}
# Calls that change what they name (open and openat: when their flags ask to write).
_WRITES = {"creat", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "truncate", "rename",
           "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "mknod",
           "mknodat", "chmod", "fchmodat", "chown", "lchown", "fchownat", "utimensat"}
_OPEN_FLAGS = {"open": 1, "openat": 2}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
PROCESS_CALLS = ("fork", "vfork", "clone")
_DESCRIPTOR_CALLS = {"open", "openat", "creat", "socket", "socketpair"}
WATCHED = frozenset({*PATH_CALLS, *PROCESS_CALLS, "exit", "exit_group", "socket",
                     "socketpair"})


@dataclass
class Observation:
    """What one sample's run asked for, as seen from the listener."""

    sample: str
    refused: dict[str, str] = field(default_factory=dict)  # base refuses, ran: call -> detail
    walls: dict[str, str] = field(default_factory=dict)  # baseline, refused: detail -> call
    calls: Counter[str] = field(default_factory=Counter)  # every call notified, by name
    paths: dict[str, tuple[str, bool]] = field(default_factory=dict)  # path -> (call, write)
    sockets: dict[str, str] = field(default_factory=dict)  # "socket(AF_UNIX)" -> call
    processes: int = 1  # live processes and threads now (the agent itself is one)
    peak_processes: int = 1
    peak_vm_bytes: int = 0  # the largest address space (VmPeak) of a process at its end
    descriptors: int = 0  # the highest descriptor number seen, plus one
    execs: int = 0
    unreadable: int = 0  # notifications whose path could not be read (the task was gone)
    paths_dropped: int = 0  # distinct paths past MAX_PATHS, not recorded


class Learner:
    """The learning filter for a policy, and the handler the watch calls for notifications."""

    def __init__(self, policy: Policy) -> None:
        self.compiled = syscall_filter.compile_learning_filter(policy.seccomp, policy.network,
                                                               WATCHED)
        base = syscall_filter.compile_filter(policy.seccomp, policy.network)
        loosest = syscall_filter.compile_filter(Seccomp(), Network(unix_sockets=True))
        self.base, self.walls = bpf.Program(base.bpf), bpf.Program(loosest.bpf)
        self.names = self.compiled.names
        self.seen = Observation("")

    def start(self, sample: str) -> Observation:
        self.seen = Observation(sample)
        return self.seen

    def notified(self, listener: int, notification: bytes) -> None:
        """One notification: record it and answer it (continue, or EPERM for the baseline)."""
        ident, pid = _HEAD.unpack_from(notification, 0)
        data = notification[16:80]
        number = int.from_bytes(data[:4], sys.byteorder, signed=True)
        agent_args = _ARGS.unpack_from(data, 16)
        name = self.names.get(number, f"syscall {number}")
        seen = self.seen
        seen.calls[name] += 1
        if _refuses(self.walls, data):
            seen.walls.setdefault(_describe(name, agent_args), name)
            _answer(listener, ident, errno.EPERM)
            return
        facts = _Facts(pid, name, agent_args, self.seen.execs == 0)
        if not _still_waiting(listener, ident):
            return  # the task is gone: what was read may belong to a process that reused its pid
        if _refuses(self.base, data):
            seen.refused.setdefault(name, _describe(name, agent_args))
        facts.record(seen)
        _answer(listener, ident, 0)


class _Facts:
    """What one notification tells, read from the stopped task (its memory and /proc)."""

    def __init__(self, pid: int, name: str, agent_args: tuple[int, ...], first_exec: bool) -> None:
        self.name, self.agent_args = name, agent_args
        self.paths = _paths(pid, name, agent_args)
        self.descriptors = _descriptor_high(pid) if name in _DESCRIPTOR_CALLS else 0
        self.status: dict[str, int] = {}
        if name == "exit_group" or (name == "execve" and not first_exec):
            self.status = _status(pid)  # the address space as it ends (or is replaced)

    def record(self, seen: Observation) -> None:
        name = self.name
        if self.paths is None:
            seen.unreadable += 1
        write = _writes(name, self.agent_args)
        for path in self.paths or ():
            if path not in seen.paths and len(seen.paths) >= MAX_PATHS:
                seen.paths_dropped += 1  # a program naming paths without end: bounded memory
            elif path not in seen.paths or (write and not seen.paths[path][1]):
                seen.paths[path] = (name, write)  # the first use, or the first write
        seen.descriptors = max(seen.descriptors, self.descriptors)
        seen.peak_vm_bytes = max(seen.peak_vm_bytes, self.status.get("VmPeak", 0))
        if name in ("socket", "socketpair"):
            seen.sockets.setdefault(_describe(name, self.agent_args), name)
        elif name in PROCESS_CALLS:
            seen.processes += 1
            seen.peak_processes = max(seen.peak_processes, seen.processes)
        elif name == "exit":
            seen.processes -= 1
        elif name == "exit_group":
            seen.processes -= self.status.get("Threads", 1)
        elif name == "execve":
            seen.execs += 1


def _refuses(program: bpf.Program, data: bytes) -> bool:
    return bpf.action(program.run(data)) != syscalls.SECCOMP_RET_ALLOW


def _answer(listener: int, ident: int, error: int) -> None:
    flags = 0 if error else syscalls.SECCOMP_USER_NOTIF_FLAG_CONTINUE
    try:
        fcntl.ioctl(listener, syscalls.SECCOMP_IOCTL_NOTIF_SEND,
                    _RESPONSE.pack(ident, 0, -error, flags))
    except OSError as err:
        if err.errno != errno.ENOENT:  # ENOENT: the task was killed while we looked
            raise


def _still_waiting(listener: int, ident: int) -> bool:
    try:
        fcntl.ioctl(listener, syscalls.SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", ident))
    except OSError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


def _paths(pid: int, name: str, agent_args: tuple[int, ...]) -> list[str] | None:
    """The absolute paths the call names, as the agent sees them; None if unreadable."""
    where = PATH_CALLS.get(name, ())
    if not where:
        return []
    try:
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        found = []
        for dirfd_at, path_at in where:
            agent_path = _string(mem, agent_args[path_at])
            if agent_path is None:
                continue  # NULL (utimensat on a descriptor) or not a string the kernel takes
            dirfd = _AT_FDCWD if dirfd_at is None else _int32(agent_args[dirfd_at])
            path = _absolute(pid, dirfd, agent_path)
            if path is not None:
                found.append(path)
        return found
    finally:
        os.close(mem)


def _string(mem: int, address: int) -> bytes | None:
    """A NUL-terminated string of at most PATH_MAX bytes at `address` of the agent's memory,
    read a page at a time so that a string ending just before an unmapped page is read."""
    if not address or address >= 1 << 63:
        return None
    out = b""
    while len(out) < PATH_MAX:
        count = min(_PAGE - address % _PAGE, PATH_MAX - len(out))
        try:
            chunk = os.pread(mem, count, address)
        except OSError:
            return None
        end = chunk.find(b"\0")
        if end >= 0:
            return out + chunk[:end]
        if len(chunk) < count:
            return None
        out, address = out + chunk, address + count
    return None  # no NUL within PATH_MAX: the kernel refuses it too (ENAMETOOLONG)


def _absolute(pid: int, dirfd: int, agent_path: bytes) -> str | None:
    """The path made absolute against the agent's cwd or directory descriptor, normalised."""
    if not agent_path:
        return None  # "" with AT_EMPTY_PATH: the descriptor itself (fstat), no path
    if not agent_path.startswith(b"/"):
        link = "cwd" if dirfd == _AT_FDCWD else f"fd/{dirfd}"
        try:
            base = os.readlink(f"/proc/{pid}/{link}")  # as the agent's root sees it
        except OSError:
            return None
        if not base.startswith("/"):
            return None  # a pipe or socket: no path to name
        agent_path = os.fsencode(base) + b"/" + agent_path
    path = os.path.normpath(os.fsdecode(agent_path))
    return "/" + path.lstrip("/")


def _descriptor_high(pid: int) -> int:
    """The highest open descriptor number plus two: the one being opened may come next."""
    try:
        return max((int(fd) for fd in os.listdir(f"/proc/{pid}/fd")), default=0) + 2
    except OSError:
        return 0


def _status(pid: int) -> dict[str, int]:
    """VmPeak (bytes) and Threads from /proc/PID/status."""
    found = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                key, _, value = line.partition(b":")
                if key in (b"VmPeak", b"Threads"):
                    words = value.split()
                    found[key.decode()] = int(words[0]) * (1024 if key == b"VmPeak" else 1)
    except (OSError, ValueError, IndexError):
        return {}
    return found


def _writes(name: str, agent_args: tuple[int, ...]) -> bool:
    if name in _OPEN_FLAGS:
        return bool(agent_args[_OPEN_FLAGS[name]] & _WRITE_FLAGS)
    return name in _WRITES


def _family(number: int) -> str:
    try:
        return socket.AddressFamily(_int32(number)).name
    except ValueError:
        return f"family {_int32(number)}"


def _describe(name: str, agent_args: tuple[int, ...]) -> str:
    if name in ("socket", "socketpair"):
        return f"{name}({_family(agent_args[0])})"
    if name == "clone":
        return f"clone(flags {agent_args[0]:#x})"
    return name


def _int32(value: int) -> int:
    """A register holding a C int: its low 32 bits, signed (AT_FDCWD is -100)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value
