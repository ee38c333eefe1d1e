"""The syscall filter: the policy's seccomp section compiled into a BPF program, once.

Supervisor side, before clone (the child only loads the result: compartment.confine.seccomp).
The policy's groups and names become a BPF program through libseccomp (pyseccomp, or the
Debian package's python3-seccomp, libseccomp's own bindings with the same API).  Compiling
costs tens of milliseconds, mostly in importing pyseccomp, so the program and its syscall-name
table are cached by a hash of everything they depend on.  The cache is root's alone
(/var/cache/compartment/seccomp, readable by all): written only by root, read by root and
unprivileged callers alike, and only when the file and every directory above it are root's and
writable by nobody else.  No agent ever runs as root, so none can forge it.  An unprivileged
caller keeps no cache of its own: its agents run as its own uid, and a file the caller could
write, one of them could rewrite (a forged program would leave the next run unfiltered); on a
miss it compiles in memory.  Denied syscalls return SECCOMP_RET_USER_NOTIF: the calling
thread stops in the kernel, the supervisor reads which syscall it was from the listener and kills
the compartment, and the report names the syscall.  Syscalls of other ABIs (i386, x32) never
reach the table: the architecture check kills the process outright.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compartment import paths, syscalls
from compartment.policy import Network, Seccomp

if TYPE_CHECKING:
    from typing import Any

# Named groups, in the manner of systemd's @mount, @module… Members missing on this
# architecture are skipped.
GROUPS: dict[str, tuple[str, ...]] = {
    "@mount": ("mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig",
               "fspick", "move_mount", "open_tree", "mount_setattr"),
    "@namespace": ("unshare", "setns"),
    "@debug": ("ptrace", "process_vm_readv", "process_vm_writev", "perf_event_open", "kcmp",
               "pidfd_getfd", "lookup_dcookie"),
    "@module": ("init_module", "finit_module", "delete_module", "create_module"),
    "@reboot": ("reboot", "kexec_load", "kexec_file_load"),
    "@swap": ("swapon", "swapoff"),
    "@keyring": ("add_key", "request_key", "keyctl"),
    "@bpf": ("bpf",),
    "@io-uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    "@userfaultfd": ("userfaultfd",),
    "@handle": ("open_by_handle_at", "name_to_handle_at"),
    "@accounting": ("acct", "quotactl", "quotactl_fd"),
    "@clock": ("settimeofday", "clock_settime", "adjtimex", "clock_adjtime"),
    "@raw-io": ("iopl", "ioperm"),
    "@system": ("sethostname", "setdomainname", "syslog", "vhangup", "uselib", "ustat",
                "sysfs", "_sysctl", "nfsservctl", "fanotify_init"),
    # For allow-list policies: what a static program's C library needs to start, read and
    # write its descriptors and exit, plus what compartment's own last steps call before exec.
    # Nothing that opens or creates a file: the prison works on the descriptors it is given.
    "@basic": ("read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close",
               "fstat", "newfstatat", "statx", "exit", "exit_group", "brk", "mmap", "munmap",
               "mremap", "mprotect", "madvise", "arch_prctl", "set_tid_address",
               "set_robust_list", "rseq", "prlimit64", "getrlimit", "setrlimit", "getrandom",
               "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "futex",
               "clock_gettime", "gettimeofday", "nanosleep", "clock_nanosleep", "getpid",
               "gettid", "getuid", "geteuid", "getgid", "getegid", "uname", "fcntl",
               "dup", "dup2", "dup3", "close_range", "sendmsg", "sendto", "execve", "getcwd",
               "readlink", "readlinkat",
               "tgkill", "poll", "ppoll", "pipe2"),
}
# Always denied, whatever the policy: the sandbox's own walls and the kernel's riskiest surface.
BASELINE = ("@mount", "@namespace", "@debug", "@module", "@reboot", "@swap", "@keyring", "@bpf",
            "@io-uring", "@userfaultfd", "@handle", "@accounting", "@clock", "@raw-io", "@system")

# The prison of compartment.isolate: what CPython needs to run a function that imports nothing,
# on the descriptors the prison holds, and why.  Found by experiment: the function's process
# traced (strace) after its filter was loaded, for the examples (email parsing and generating)
# and for functions that raise, recurse, exhaust memory, grow buffers, read the clocks, write
# 8 MB.  Not needed, so not allowed: futex (one thread: nothing to wait for), clock_gettime
# (the vDSO answers without a syscall), madvise and mprotect (glibc's main arena uses brk and
# mmap), rt_sigreturn (every signal is blocked or kills), exit (one thread: exit_group),
# getpid and getrandom (a function that wants them is given them by seccomp.allow).
PRISON: dict[str, str] = {
    "read": "the input: descriptor 0 only",
    "write": "the output (descriptor 1) and the result record (2) only",
    "close": "the setup's end closes the status socket and the seccomp listener",
    "sendmsg": "the listener to the zygote, on the status socket (3) only, closed right after",
    "prlimit64": "the late limits, set and read back once the filter is loaded; pid 0 only",
    "brk": "memory: the C allocator's heap",
    "mmap": "memory: CPython's arenas and large objects; anonymous, never executable",
    "munmap": "memory: giving them back",
    "mremap": "memory: a large buffer grown in place (bytearray +=, list growth)",
    "exit_group": "the end: os._exit",
}
_PROT_EXEC, _MAP_ANONYMOUS = 0x4, 0x20
# The arguments some are limited to: alternatives, each a list of (argument index, mask, value)
# that must all hold (argument & mask == value).
_WORD = 0xFFFFFFFF
_PRISON_ARGUMENTS: dict[str, tuple[tuple[tuple[int, int, int], ...], ...]] = {
    "read": (((0, _WORD, 0),),),
    "write": (((0, _WORD, 1),), ((0, _WORD, 2),)),
    "sendmsg": (((0, _WORD, 3),),),
    "prlimit64": (((0, _WORD, 0),),),
    # Anonymous memory only: a shared writable mapping of a descriptor the caller handed in
    # read-write would write into the caller's file.
    "mmap": (((2, _PROT_EXEC, 0), (3, _MAP_ANONYMOUS, _MAP_ANONYMOUS)),),
}

_NAMESPACE_FLAGS = (0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                    0x02000000, 0x00000080)  # CLONE_NEW{NS,UTS,IPC,USER,PID,NET,CGROUP,TIME}
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
_SAFE_IOCTLS = (0x5401, 0x5413, 0x541B)  # TCGETS (isatty), TIOCGWINSZ, FIONREAD
_AF_UNIX, _ENOSYS, _EOPNOTSUPP, _EPERM = 1, 38, 95, 1
_SOCKET_CALLS = frozenset({"socket", "socketpair"})
# setsockopt(SOL_SOCKET, SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE)
_SOL_SOCKET, _BUFFER_OPTIONS = 1, (7, 8, 32, 33)
_S_ISUID, _S_ISGID, _O_CREAT, _O_TMPFILE = 0o4000, 0o2000, 0o100, 0o20000000
_UNSUPPORTED = ("clone3", "openat2", "memfd_create", "memfd_secret", "shmget", "msgget",
                "semget")
_MODE_ARGUMENT = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "mkdir": 1,
                  "mkdirat": 2, "mknod": 1, "mknodat": 2, "creat": 1}


CACHE_DIR = "/var/cache/compartment/seccomp"


class FilterError(Exception):
    """The policy names a syscall this kernel's libseccomp does not know, or compiling failed."""


@dataclass(frozen=True, eq=False)
class CompiledFilter:
    bpf: bytes
    names: dict[int, str]  # syscall number -> name, to report a violation

    @functools.cached_property
    def prepared(self) -> syscalls.PreparedFilter:
        """The program laid out for seccomp(2); read-only after this, so one serves every run."""
        return syscalls.PreparedFilter(self.bpf)


def expand(names: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name.startswith("@") and name not in GROUPS:
            raise FilterError(f"seccomp: unknown group {name!r} (groups: {', '.join(GROUPS)})")
        out += GROUPS[name] if name.startswith("@") else (name,)
    return out


@functools.lru_cache(maxsize=32)
def compile_filter(spec: Seccomp, network: Network) -> CompiledFilter:
    """Supervisor side: the cached program for this policy, compiled on a miss.  A long-lived
    caller keeps it in memory too: the policy sections are frozen, so equal means same."""
    # The key covers this file too (its size and time): changed rules never reuse an old
    # program.  The file name is a checksum of the key; the key itself is stored in the file
    # and compared, so two keys that share a checksum can never share a program.
    key = cache_key(spec, network)
    cached = _read_cache(key)
    if cached:
        return cached
    compiled = _compile(spec, network)
    if os.geteuid() == 0:
        _write_cache(key, compiled)
    return compiled


def cache_key(spec: Seccomp, network: Network) -> str:
    """Everything the program depends on, this file's rules included (its size and time)."""
    rules = os.stat(__file__)
    return json.dumps([os.uname().machine, rules.st_size, rules.st_mtime_ns, spec.default,
                       spec.allow, spec.deny, network.unix_sockets])


def compile_learning_filter(spec: Seccomp, network: Network,
                            watched: frozenset[str]) -> CompiledFilter:
    """For `compartment learn` only (never on a delivery path, never cached): the policy's
    filter, except that every syscall in `watched` also goes to the listener, whatever the
    policy says of it, so that learn sees the paths and processes the program asks for."""
    return _compile(spec, network, watched)


def libseccomp() -> Any:
    """libseccomp's Python bindings: PyPI's pyseccomp (make setup, make install), else the
    Debian package's python3-seccomp, libseccomp's own, whose API pyseccomp copies."""
    try:
        import pyseccomp
    except ImportError:
        import seccomp as pyseccomp
    return pyseccomp


@functools.lru_cache(maxsize=8)
def compile_prison(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> CompiledFilter:
    """Caller side of compartment.isolate, once per set of extras (the zygote never loads
    libseccomp): PRISON, plus a policy's seccomp.allow, minus its seccomp.deny."""
    pyseccomp = libseccomp()  # slow: once per process

    _refuse_walls(allow)
    sockets = set(expand(allow)) & _SOCKET_CALLS
    if sockets:
        raise FilterError(f"seccomp.allow: {sorted(sockets)[0]!r}: the prison of "
                          "compartment.isolate makes no socket")
    denied = set(expand(BASELINE + deny))
    flt = _new_filter(pyseccomp, pyseccomp.NOTIFY)
    for name in sorted((set(PRISON) | set(expand(allow))) - denied):
        limited = _PRISON_ARGUMENTS.get(name) if name not in allow else None
        try:
            if limited is None:
                flt.add_rule(pyseccomp.ALLOW, name)
                continue
            for conditions in limited:
                flt.add_rule(pyseccomp.ALLOW, name,
                             *(pyseccomp.Arg(index, pyseccomp.MASKED_EQ, mask, value)
                               for index, mask, value in conditions))
        except (OSError, ValueError, RuntimeError) as err:
            raise FilterError(f"seccomp: cannot filter {name!r}: {err}") from None
    return _export(pyseccomp, flt)


def _refuse_walls(allow: tuple[str, ...]) -> None:
    walls = set(expand(BASELINE)) & set(expand(allow))
    if walls:
        raise FilterError(f"seccomp.allow: {sorted(walls)[0]!r} is in the built-in baseline, "
                          "which no policy can allow")


def _compile(spec: Seccomp, network: Network,
             watched: frozenset[str] = frozenset()) -> CompiledFilter:
    pyseccomp = libseccomp()  # slow (ctypes.util.find_library): only on a cache miss

    notify = pyseccomp.NOTIFY
    denied = set(expand(BASELINE + spec.deny))
    _refuse_walls(spec.allow)
    allowed = set(expand(spec.allow + ("@basic",))) - denied if spec.default == "kill" else set()
    allowed -= {"prlimit64", *watched}  # prlimit64 only with pid 0: an argument rule, below
    # Sockets are [network]'s to grant (AF_UNIX alone, by an argument rule below): a socket
    # named in seccomp.allow must not bring every other family in with it.
    named_sockets = allowed & _SOCKET_CALLS
    if named_sockets:
        raise FilterError(f"seccomp.allow: {sorted(named_sockets)[0]!r} is granted by "
                          "network.unix_sockets (AF_UNIX only); no policy allows other families")
    reserves = "fallocate" in allowed
    allowed.discard("fallocate")  # mode 0 only: an argument rule, below
    flt = _new_filter(pyseccomp, notify if spec.default == "kill" else pyseccomp.ALLOW)
    explicit = set(expand(spec.allow + spec.deny))
    # In allow-list mode a denied name is simply not allowed: the default already notifies.
    rules = allowed if spec.default == "kill" else denied | watched
    for name in sorted(rules):
        try:
            flt.add_rule(pyseccomp.ALLOW if name in allowed else notify, name)
        except (OSError, ValueError, RuntimeError) as err:
            if name in explicit:
                raise FilterError(f"seccomp: cannot filter {name!r}: {err}") from None
            # A group member this architecture does not have: nothing to filter.
    _add_argument_rules(pyseccomp, flt, network, spec.default == "kill", watched)
    _bound_fallocate(pyseccomp, flt, spec.default == "kill", reserves)
    return _export(pyseccomp, flt)


def _new_filter(ps: Any, default_action: Any) -> Any:
    flt = ps.SyscallFilter(default_action)
    flt.set_attr(ps.Attr.ACT_BADARCH, ps.KILL_PROCESS)
    flt.set_attr(ps.Attr.CTL_NNP, 0)  # the child sets no_new_privs itself, and checks it
    return flt


def _export(ps: Any, flt: Any) -> CompiledFilter:
    """The BPF program, and the syscall-name table a violation is reported with."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        bpf = out.read()
    names = {}
    for nr in range(1024):
        try:
            # NATIVE, not system_arch(): libseccomp's own bindings take the arch as a C int,
            # which x86-64's token (0xc000003e) overflows.
            names[nr] = ps.resolve_syscall(ps.Arch.NATIVE, nr).decode()
        except (OSError, ValueError, RuntimeError):
            continue
    return CompiledFilter(bpf, names)


def _add_argument_rules(ps: Any, flt: Any, network: Network, allow_list: bool,
                        watched: frozenset[str]) -> None:
    """Rules that look at arguments.  In allow-list mode the default already kills, so only
    the permitted forms are added (libseccomp refuses a rule that repeats the default); a
    watched syscall keeps the default (notify) in every form."""
    arg, notify, allow = ps.Arg, ps.NOTIFY, ps.ALLOW
    if allow_list:
        if network.unix_sockets:
            for name, args in (("socket", [arg(0, ps.EQ, _AF_UNIX)]), ("socketpair", [])):
                if name not in watched:
                    flt.add_rule(allow, name, *args)
        if "clone" not in watched:
            flt.add_rule(allow, "clone", arg(0, ps.MASKED_EQ, sum(_NAMESPACE_FLAGS), 0))
        flt.add_rule(allow, "prlimit64", arg(0, ps.EQ, 0))
        for request in _SAFE_IOCTLS:  # the kernel reads the request as 32 bits
            flt.add_rule(allow, "ioctl", arg(1, ps.MASKED_EQ, 0xFFFFFFFF, request))
    else:
        flt.add_rule(notify, "socket", *([arg(0, ps.NE, _AF_UNIX)] if network.unix_sockets
                                         else []))
        for flag in _NAMESPACE_FLAGS:  # clone() that would make a namespace
            flt.add_rule(notify, "clone", arg(0, ps.MASKED_EQ, flag, flag))
        for request in (_TIOCSTI, _TIOCLINUX):
            flt.add_rule(notify, "ioctl", arg(1, ps.MASKED_EQ, 0xFFFFFFFF, request))
        _deny_set_id_modes(ps, flt)
        # Socket buffers stay at the system's default size (net.core.wmem_default): raised to
        # net.core.wmem_max, a socket queues more kernel memory, which only a cgroup counts.
        # Refused as the kernel refuses the FORCE variants without privilege: EPERM.
        for option in _BUFFER_OPTIONS if "setsockopt" not in watched else ():
            flt.add_rule(ps.ERRNO(_EPERM), "setsockopt", arg(1, ps.EQ, _SOL_SOCKET),
                         arg(2, ps.EQ, option))
        # The compartment's init has the agent's uid, so prlimit64 could lower its hard CPU
        # limit and have the kernel kill it: a process may set its own limits (pid 0) only.
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # denied outright already
            flt.add_rule(notify, "prlimit64", arg(0, ps.NE, 0))
    # clone3 and openat2 pass their flags in memory, out of the filter's sight: refuse them with
    # ENOSYS so that the C library falls back to clone() and openat(), checked above.
    # Anonymous shared memory (memfd, SysV segments and queues) is held by the kernel, not by
    # the address space RLIMIT_AS bounds: refused too, as not supported, which callers expect.
    for name in _UNSUPPORTED:
        flt.add_rule(ps.ERRNO(_ENOSYS), name)


def _bound_fallocate(ps: Any, flt: Any, allow_list: bool, allowed: bool) -> None:
    """fallocate(2) with a mode (FALLOC_FL_KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, COLLAPSE_RANGE,
    INSERT_RANGE...) reserves or moves blocks without growing the file's size, which is all
    RLIMIT_FSIZE looks at: one file of size 0 could hold the whole disk.  It fails as a
    filesystem that cannot do it answers (EOPNOTSUPP); mode 0, posix_fallocate's, grows the
    size and so meets limits.file_bytes.  The mode is an int: a value the kernel reads as 0
    but with high bits set is refused too, which costs nothing.  Denied outright by the policy,
    the unconditional rule added before wins (libseccomp keeps it)."""
    if allow_list and not allowed:
        return  # not allowed at all: the default stops every form
    if allowed:
        flt.add_rule(ps.ALLOW, "fallocate", ps.Arg(1, ps.EQ, 0))
    flt.add_rule(ps.ERRNO(_EOPNOTSUPP), "fallocate", ps.Arg(1, ps.NE, 0))


def _deny_set_id_modes(ps: Any, flt: Any) -> None:
    """No setuid or setgid file or directory: one left in a writable directory would run with
    the agent's ids for whoever executes it outside, where the mount is not nosuid."""
    for bit in (_S_ISUID, _S_ISGID):
        for name, index in _MODE_ARGUMENT.items():
            try:
                flt.add_rule(ps.NOTIFY, name, ps.Arg(index, ps.MASKED_EQ, bit, bit))
            except (OSError, ValueError, RuntimeError):
                continue  # not a syscall of this architecture or this libseccomp
        for name, flags in (("open", 1), ("openat", 2)):
            for creating in (_O_CREAT, _O_TMPFILE):
                flt.add_rule(ps.NOTIFY, name, ps.Arg(flags, ps.MASKED_EQ, creating, creating),
                             ps.Arg(flags + 1, ps.MASKED_EQ, bit, bit))


def _cache_name(key: str) -> str:
    return f"{zlib.crc32(key.encode()):08x}.json"


def _read_cache(key: str) -> CompiledFilter | None:
    try:
        fd = paths.open_trusted(os.path.join(CACHE_DIR, _cache_name(key)))
    except paths.PathError:
        return None  # none yet, or not root's alone: compile (root then replaces it)
    with os.fdopen(fd, "rb") as file:
        try:
            data = json.loads(file.read())
            if data["key"] != key:
                return None
            return CompiledFilter(bytes.fromhex(data["bpf"]),
                                  {int(k): v for k, v in data["names"].items()})
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: recompile and replace it


def _write_cache(key: str, compiled: CompiledFilter) -> None:
    """Root only: a new file beside the old, renamed over it, in a directory root keeps to
    itself and lets everyone read."""
    text = json.dumps({"key": key, "bpf": compiled.bpf.hex(), "names": compiled.names})
    try:
        directory = _cache_directory()
        try:
            aside = f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                         dir_fd=directory)
            with os.fdopen(fd, "w") as file:
                os.fchmod(fd, 0o644)  # whatever the umask: unprivileged callers read it
                file.write(text)
            os.rename(aside, _cache_name(key), src_dir_fd=directory, dst_dir_fd=directory)
        finally:
            os.close(directory)
    except (OSError, paths.PathError):
        return  # the cache is an optimisation; the compiled filter is used either way


def _cache_directory() -> int:
    """The cache directory, made if missing, root's and readable by all, as a descriptor."""
    parent = os.path.dirname(CACHE_DIR)
    for path in (parent, CACHE_DIR):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
        fd = paths.open_trusted(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fchmod(fd, 0o755)  # an older version made it 0700: readable by root alone
        except OSError:
            os.close(fd)
            raise
        if path == parent:
            os.close(fd)
    return fd
