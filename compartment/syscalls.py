"""The one home of ctypes, syscall numbers and kernel constants.

Everything else in compartment calls the kernel through the standard library or through the
small wrappers here; no other module loads a C library or spells a syscall number.  The libc is
opened with ``CDLL(None)`` (the already-loaded process image), never ``find_library``, which
forks a compiler or ldconfig and costs tens of milliseconds per run.
"""

from __future__ import annotations

import ctypes
import os

_MACHINE = os.uname().machine

# Syscall numbers the standard library does not wrap in Python 3.11.
_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"clone": 56, "pivot_root": 155, "seccomp": 317, "rt_sigaction": 13},
    "aarch64": {"clone": 220, "pivot_root": 41, "seccomp": 277, "rt_sigaction": 134},
}
if _MACHINE not in _NUMBERS:
    raise ImportError(f"compartment supports x86_64 and aarch64, not {_MACHINE}")
# Numbers from 403 up are the same on every architecture.
NR = _NUMBERS[_MACHINE] | {"pidfd_send_signal": 424, "open_tree": 428, "move_mount": 429,
                           "clone3": 435, "close_range": 436, "landlock_create_ruleset": 444,
                           "landlock_restrict_self": 446}

# clone(2) namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
CLONE_INTO_CGROUP = 0x200000000  # clone3 only (Linux 5.7)
CLONE_PARENT = 0x00008000  # the child's parent is the caller's parent (the spawner's daemon)
SIGCHLD = 17

# mount(2) flags (linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2
# open_tree(2) and move_mount(2) (linux/mount.h, linux/fcntl.h).
OPEN_TREE_CLONE = 0x1
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4

# seccomp(2) (linux/seccomp.h).
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif), 80 bytes
SECCOMP_NOTIF_SIZE = 80
# For `compartment learn` only (its listener answers instead of killing; Linux 5.5 for CONTINUE):
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp), 24 bytes
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
CLOSE_RANGE_CLOEXEC = 1 << 2

_libc = ctypes.CDLL(None, use_errno=True)
# clone() must run with the GIL held from the call to its return in both processes, so that the
# child wakes up owning the interpreter; PyDLL does not release the GIL around the call.
_libc_gil = ctypes.PyDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_clone_syscall = _libc_gil.syscall
_clone_syscall.restype = ctypes.c_long
_mount = _libc.mount
_mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p)
_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _check(result: int, call: str, arg: str = "") -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}({arg}): {os.strerror(err)}")
    return result


def _raw(name: str, *args: object, detail: str = "") -> int:
    """A syscall the C library does not wrap, by number, as an OSError on failure."""
    return _check(_syscall(ctypes.c_long(NR[name]), *args), name, detail)


def clone(flags: int) -> int:
    """fork()-like clone with namespace flags: 0 in the child, the child's pid in the parent.

    The caller must be single-threaded.  Unlike os.fork() this runs no at-fork handlers; the
    child must only run compartment's confinement code and then exec or _exit.
    """
    return _check(_clone_syscall(ctypes.c_long(NR["clone"]), ctypes.c_ulong(flags | SIGCHLD),
                                 None, None, None, None), "clone", hex(flags))


class _CloneArgs(ctypes.Structure):
    """struct clone_args (linux/sched.h), up to the cgroup field (CLONE_ARGS_SIZE_VER2)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def clone_into_cgroup(flags: int, cgroup_fd: int) -> int:
    """clone() that creates the child in the cgroup v2 directory open at cgroup_fd: it is born
    there, never migrated.  The same fork-like contract as clone()."""
    # With CLONE_PARENT the child's exit signal is its new parent's choice: clone3 wants 0.
    exit_signal = 0 if flags & CLONE_PARENT else SIGCHLD
    args = _CloneArgs(flags=flags | CLONE_INTO_CGROUP, exit_signal=exit_signal, cgroup=cgroup_fd)
    return _check(_clone_syscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args),
                                 ctypes.c_size_t(ctypes.sizeof(args))), "clone3", hex(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_mount(_enc(source), target.encode(), _enc(fstype), flags, _enc(data)),
           "mount", f"{source!r} on {target!r}")


def umount2(target: str, flags: int) -> None:
    _check(_umount2(target.encode(), flags), "umount2", target)


def clone_tree(fd: int) -> int:
    """A detached copy of the mount of what `fd` names (open_tree OPEN_TREE_CLONE, not
    recursive): a bind mount waiting to be attached, in whichever mount namespace attaches it."""
    return _raw("open_tree", ctypes.c_int(fd), b"", ctypes.c_uint(
        OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH), detail=f"descriptor {fd}")


def attach_tree(tree: int, target: str) -> None:
    """Attach a detached mount (clone_tree) at `target` in the caller's mount namespace."""
    _raw("move_mount", ctypes.c_int(tree), b"", ctypes.c_int(-100), target.encode(),
         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH), detail=target)  # -100: AT_FDCWD


def pivot_root(new_root: str, put_old: str) -> None:
    _raw("pivot_root", new_root.encode(), put_old.encode(), detail=new_root)


def close_range_cloexec(first: int) -> None:
    """Mark every descriptor from `first` up close-on-exec (Linux 5.11)."""
    _raw("close_range", ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF),
         ctypes.c_uint(CLOSE_RANGE_CLOEXEC), detail=str(first))


PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2  # Linux 6.9: the target's process group


def pidfd_send_signal(pidfd: int, signum: int, flags: int = 0) -> None:
    _raw("pidfd_send_signal", ctypes.c_int(pidfd), ctypes.c_int(signum), None,
         ctypes.c_uint(flags), detail=str(signum))


def default_signal(signum: int) -> None:
    """SIG_DFL for any signal, the C library's own (32, 33) included, which Python's signal
    module and glibc's signal() refuse to touch.  An all-zero kernel sigaction is SIG_DFL
    with no flags and an empty mask on every architecture."""
    _raw("rt_sigaction", ctypes.c_int(signum), ctypes.create_string_buffer(64), None,
         ctypes.c_size_t(8), detail=str(signum))


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


class PreparedFilter:
    """A BPF program laid out in memory before clone, so the child only makes one syscall."""

    def __init__(self, bpf: bytes) -> None:
        if len(bpf) % 8 or not bpf:
            raise ValueError("a BPF program is a non-empty array of 8-byte instructions")
        self.bpf = bpf
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))

    def install(self) -> int:
        """Load the filter into the calling thread; returns the user-notification listener fd."""
        return _raw("seccomp", SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    ctypes.byref(self._prog), detail="SECCOMP_SET_MODE_FILTER")


def _enc(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def prctl(option: int, arg: int = 0, name: str = "prctl") -> int:
    return _check(_prctl(option, arg, 0, 0, 0), name, str(arg))


def cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap", "rb") as file:
        return int(file.read())


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


# Bound once here, as _mount and _prctl are: a process cloned from this one (a compartment.isolate
# prison) then calls them without making the function objects, and writes fewer of the pages
# it shares with its parent (each such write is a page copied).
_CapSets = _CapData * 2
_capget, _capset, _setns = _libc.capget, _libc.capset, _libc.setns


def capget() -> dict[str, int]:
    """This thread's capability sets as 64-bit masks, read in one capget(2)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = _CapSets()
    _check(_capget(ctypes.byref(header), data), "capget")
    return {name: getattr(data[0], name) | getattr(data[1], name) << 32
            for name in ("effective", "permitted", "inheritable")}


def setfsuid(uid: int) -> int:
    """The filesystem uid of the calling thread; returns the previous one.  The call reports no
    error, so callers read it back: setfsuid(-1) changes nothing and returns the current one."""
    return _libc.setfsuid(ctypes.c_int(uid))


def setfsgid(gid: int) -> int:
    """As setfsuid, for the filesystem gid."""
    return _libc.setfsgid(ctypes.c_int(gid))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare", hex(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype), "setns", hex(nstype))


# Landlock (linux/landlock.h): only its scopes are used, which need ABI 6 (Linux 6.12).
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is not built or not enabled."""
    version = _syscall(ctypes.c_long(NR["landlock_create_ruleset"]), None, ctypes.c_size_t(0),
                       ctypes.c_uint(1))  # LANDLOCK_CREATE_RULESET_VERSION
    return max(version, 0)


def landlock_scope(scoped: int) -> None:
    """Put the calling thread in a new Landlock domain that handles only `scoped`."""
    attr = _LandlockRulesetAttr(0, 0, scoped)
    ruleset = _raw("landlock_create_ruleset", ctypes.byref(attr),
                   ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint(0), detail="scoped")
    try:
        _raw("landlock_restrict_self", ctypes.c_int(ruleset), ctypes.c_uint(0))
    finally:
        os.close(ruleset)


def sethostname(name: str) -> None:
    encoded = name.encode()
    _check(_libc.sethostname(encoded, len(encoded)), "sethostname", name)


def capset_empty() -> None:
    """Clear this thread's effective, permitted and inheritable sets in one capset(2)."""
    header = _CapHeader(0x20080522, 0)
    _check(_capset(ctypes.byref(header), _CapSets()), "capset")
