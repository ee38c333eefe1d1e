"""The baselines compartment is measured against, spawned the way its supervisor spawns.

Every method gets the message as fd 0 directly and has its stdout/stderr carried through pipes
that the parent (this process) copies to the caller's destinations, so that the baselines pay
the same descriptor handling as the supervisor: `unconfined` is a bare `os.posix_spawn`,
`bwrap` is Debian's bubblewrap with options comparable to the `filter` policy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import select
import shutil
import struct
from collections.abc import Sequence

PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ for every pipe, as the supervisor is asked to do
_relay_buffer = bytearray(PIPE_BYTES)  # one buffer reused: no allocation per delivery
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}
SECCOMP_FD = 3  # where bwrap finds its filter (`--seccomp 3`)

POOL_ID = "60000"  # a non-root identity inside, as the uid pool gives the compartment


class View:
    """What the `filter` policy shows the agent, for bwrap to show the same: read-only /usr
    and the merged-usr top directories, these /etc names and devices, a private /tmp.  The
    defaults are the shipped policy's; the bench takes them from the loaded policy."""

    def __init__(self, etc: Sequence[str] = ("ld.so.cache", "passwd", "group", "nsswitch.conf",
                                             "localtime", "mime.types"),
                 devices: Sequence[str] = ("null", "zero", "urandom"),
                 tmp_bytes: int = 16 << 20) -> None:
        self.etc, self.devices, self.tmp_bytes = tuple(etc), tuple(devices), tmp_bytes


def make_pipe(size: int = PIPE_BYTES) -> tuple[int, int]:
    """A close-on-exec pipe (read end, write end) enlarged to `size` bytes."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, size)
    return read_end, write_end


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _move(pipe_r: int, destination: int, splicing: bool) -> int:
    """One chunk from a pipe to its destination: spliced in the kernel (as the supervisor moves
    the agent's stdout) or, where splice cannot write, through the reused buffer."""
    if splicing:
        try:
            return os.splice(pipe_r, destination, PIPE_BYTES)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: a destination splice cannot write to
                raise
    count = os.readv(pipe_r, [_relay_buffer])
    _write_all(destination, memoryview(_relay_buffer)[:count])
    return count


def relay(routes: dict[int, int]) -> int:
    """Copy each pipe (key) to its destination (value) until EOF on all; close the pipes.

    The first route is the agent's stdout, spliced; the rest (stderr) are read and written.
    Returns the bytes moved on the first route."""
    poller = select.poll()
    for pipe_r in routes:
        poller.register(pipe_r, select.POLLIN)
    first, moved, live = next(iter(routes)), 0, set(routes)
    while live:
        for pipe_r, _events in poller.poll():
            count = _move(pipe_r, routes[pipe_r], pipe_r == first)
            if count == 0:
                poller.unregister(pipe_r)
                live.discard(pipe_r)
                os.close(pipe_r)
            elif pipe_r == first:
                moved += count
    return moved


def spawn_relay(argv: Sequence[str], message_fd: int, out_fd: int, err_fd: int,
                extra_actions: Sequence[tuple] = (), pipe_bytes: int = PIPE_BYTES) -> int:
    """posix_spawn `argv` with the message as fd 0, relay its output, wait; return bytes out.

    Raises RuntimeError when the program does not exit 0."""
    out_r, out_w = make_pipe(pipe_bytes)
    err_r, err_w = make_pipe(pipe_bytes)
    actions = [(os.POSIX_SPAWN_DUP2, message_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
               (os.POSIX_SPAWN_DUP2, err_w, 2), *extra_actions]
    try:
        pid = os.posix_spawn(argv[0], list(argv), CLEAN_ENV, file_actions=actions)
    except OSError:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    copied = relay({out_r: out_fd, err_r: err_fd})
    _pid, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv[0]} exited with wait status {status:#x}")
    return copied


def spawn_direct(argv: Sequence[str], message_fd: int, out_fd: int, err_fd: int,
                 extra_actions: Sequence[tuple] = (), env: dict[str, str] | None = None) -> int:
    """posix_spawn `argv` with fds 0/1/2 given directly (a whole process, as a shell runs it).

    Returns the wait status."""
    actions = [(os.POSIX_SPAWN_DUP2, message_fd, 0), (os.POSIX_SPAWN_DUP2, out_fd, 1),
               (os.POSIX_SPAWN_DUP2, err_fd, 2), *extra_actions]
    pid = os.posix_spawn(argv[0], list(argv), env or dict(os.environ), file_actions=actions)
    return os.waitpid(pid, 0)[1]


def discard_sinks() -> tuple[int, int]:
    """(stdout, stderr) destinations that keep nothing: /dev/null, and a memfd of its own for
    stderr.  Never one file for both: the supervisor then takes all output for diagnostics
    (the pipe-transport convention), which is not the path a filter's output takes."""
    return (os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC),
            os.memfd_create("bench-stderr", os.MFD_CLOEXEC))


# ---- bubblewrap ----------------------------------------------------------------------------

def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def bwrap_argv(program: Sequence[str], with_seccomp: bool, view: View | None = None
               ) -> list[str]:
    """bwrap options matching the `filter` policy as closely as bwrap can express it."""
    view = view or View()
    bwrap = bwrap_path() or "bwrap"
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", POOL_ID, "--gid", POOL_ID, "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
        if os.path.islink(top):  # merged /usr: recreate the symlink, as the policy's view does
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for name in view.etc:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in view.devices:  # the policy's devices only, not bwrap's whole --dev set
        argv += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    argv += ["--size", str(view.tmp_bytes), "--tmpfs", "/tmp",
             "--chdir", "/", "--clearenv", "--setenv", "PATH", CLEAN_ENV["PATH"]]
    if with_seccomp:
        argv += ["--seccomp", str(SECCOMP_FD)]
    return [*argv, "--", *program]


def bwrap_actions(bpf_path: str | None) -> list[tuple]:
    """posix_spawn file actions giving bwrap its filter on SECCOMP_FD (opened fresh each run,
    since bwrap reads the descriptor to its end)."""
    if bpf_path is None:
        return []
    return [(os.POSIX_SPAWN_OPEN, SECCOMP_FD, bpf_path, os.O_RDONLY, 0)]


# A deny list like the policy's built-in baseline, as x86-64 syscall numbers (bench only: the
# core's table is compartment/syscalls.py; this filter exists only to give bwrap comparable work).
_X86_64_DENIED = {
    "acct": 163, "add_key": 248, "bpf": 321, "delete_module": 176, "finit_module": 313,
    "fsconfig": 431, "fsmount": 432, "fsopen": 430, "fspick": 433, "init_module": 175,
    "io_uring_enter": 426, "io_uring_register": 427, "io_uring_setup": 425, "kexec_file_load": 320,
    "kexec_load": 246, "keyctl": 250, "mount": 165, "mount_setattr": 442, "move_mount": 429,
    "open_by_handle_at": 304, "open_tree": 428, "perf_event_open": 298, "pivot_root": 155,
    "ptrace": 101, "reboot": 169, "request_key": 249, "setns": 308, "swapoff": 168,
    "swapon": 167, "umount2": 166, "unshare": 272, "userfaultfd": 323,
}
_SYS_SOCKET, _AF_UNIX = 41, 1
_AUDIT_ARCH_X86_64 = 0xC000003E
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _EAFNOSUPPORT = 1, 97


def seccomp_bpf() -> bytes | None:
    """A classic-BPF seccomp program for bwrap: deny the baseline, sockets other than AF_UNIX,
    the x32 ABI and foreign architectures; allow the rest.  None off x86-64."""
    if platform.machine() != "x86_64":
        return None
    denied = sorted(_X86_64_DENIED.values())
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4),                              # A = seccomp_data.arch
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, 0),                              # A = seccomp_data.nr
    ]
    first_check = len(prog) + 1
    socket_at = first_check + len(denied)
    allow_at, deny_at, kill_at = socket_at + 4, socket_at + 5, socket_at + 6
    prog.append((_JGE_K, kill_at - len(prog) - 1, 0, 0x40000000))  # x32 numbers
    for number in denied:
        prog.append((_JEQ_K, deny_at - len(prog) - 1, 0, number))
    prog += [
        (_JEQ_K, 0, allow_at - socket_at - 1, _SYS_SOCKET),
        (_LD_W_ABS, 0, 0, 16),                             # A = low word of args[0] (family)
        (_JEQ_K, 1, 0, _AF_UNIX),
        (_RET_K, 0, 0, _RET_ERRNO | _EAFNOSUPPORT),
        (_RET_K, 0, 0, _RET_ALLOW),
        (_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def bwrap_version() -> str:
    bwrap = bwrap_path()
    if bwrap is None:
        return "not installed"
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(bwrap, [bwrap, "--version"], CLEAN_ENV,
                             file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 1)])
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode().strip()
    os.waitpid(pid, 0)
    return text
