"""Watching one compartment: exit, setup failures, seccomp violations, output, the deadline.

Supervisor side, one thread, one poll() loop over descriptors only:
- the pidfd of the compartment's init (pid 1 of its namespace), readable when it is gone — by
  then the kernel has killed and waited for every other process of the namespace;
- the status socket: a setup-failure record, the seccomp listener (SCM_RIGHTS), and the
  agent's wait status from the init, then EOF;
- the seccomp listener: a notification is a denied syscall; its number is all we read;
- the agent's stdout, spliced to the caller's stdout in the kernel (the message is never held
  here), and its stderr, of which the first 4 KiB are kept for the caller and the rest counted.
  A caller's stdout or stderr that cannot be written (closed when the command started, or
  opened read-only) gets no pipe: the agent is handed /dev/null opened read-only there, so
  its writes fail with EBADF as they would unconfined (and, unlike a closed number, no file
  it opens lands there and takes what it meant for the caller).
Every byte counts against limits.output_bytes; past it, at the deadline, or on a violation the
whole compartment is killed through the pidfd.  Under a cgroup the CPU time of the whole
compartment is read at times planned from the budget left (it cannot be spent sooner than that
budget over the number of CPUs), and the compartment is killed once it has used it all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import resource
import select
import signal
import socket
import struct
import time
from collections.abc import Callable

from compartment import cgroups, message, syscalls
from compartment.confine.errors import RECORD, SetupError
from compartment.confine.init import EXIT_RECORD, EXIT_TAG
from compartment.confine.seccomp import LISTENER_RECORD
from compartment.exits import Outcome
from compartment.policy import Limits

DIAGNOSTIC_BYTES = 4096
PIPE_BYTES = 1 << 20
_CHUNK = 1 << 20
_CPUS = os.cpu_count() or 1
_CPU_CHECK_MIN_S = 0.01  # near the end of the budget: the overshoot is at most this per CPU


class Watch:
    def __init__(self, limits: Limits, fds: tuple[int, int, int], names: dict[int, str],
                 learner: Callable[[int, bytes], None] | None = None,
                 cgroup: cgroups.Cgroup | None = None) -> None:
        self.limits, self.names, self.cgroup = limits, names, cgroup
        # `compartment learn` only (compartment.learn.listener): it records and answers each
        # notification itself, and nothing is killed for one.  None on every delivery path.
        self.learner = learner
        self.caller_out = fds[1]
        writable = _writable(fds[1]), _writable(fds[2])
        # Postfix and qmail give the command one pipe for stdout and stderr: then all the
        # agent writes is diagnostics, kept (bounded) so our reason line can come first.
        self.merged = all(writable) and _same_file(fds[1], fds[2])
        self.out_r, self.out_w = _pipe(writable[0])
        self.err_r, self.err_w = _pipe(writable[1] and not self.merged)
        # Handed to the agent where the caller cannot be written: writes fail with EBADF.
        self.unwritable = -1
        if not all(writable):
            self.unwritable = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if self.out_w >= 0:
            with contextlib.suppress(OSError):  # over the per-user pipe budget: slower
                fcntl.fcntl(self.out_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.pid = self.pidfd = self.listener = -1
        self.status: socket.socket | None = None
        self.deadline = self.started = self.ended = 0.0
        self.bytes_out = 0
        self.diagnostics = bytearray()
        self.killed_for: Outcome | None = None  # why we killed it; the caller's failure is ours
        self.denied_syscall: str | None = None
        self.setup_error: SetupError | None = None
        self.wait_status = 0  # of the compartment's init
        self.agent_wait_status: int | None = None  # reported by the init
        self.rusage: resource.struct_rusage | None = None
        self.usage: cgroups.Usage | None = None  # the cgroup's figures, once the init is reaped
        self.cpu_check_at = math.inf
        self.caller_error = ""
        self._splice = True
        self._spilled = False  # merged output grew past diagnostics: now passed on as data

    def agent_ends(self) -> list[tuple[int, int]]:
        out = self.out_w if self.out_w >= 0 else self.unwritable
        err = self.out_w if self.merged else self.err_w if self.err_w >= 0 else self.unwritable
        return [(1, out), (2, err)]

    def start(self, pid: int, status: socket.socket) -> None:
        self.started = time.monotonic()
        self.pid, self.status = pid, status
        self.pidfd = os.pidfd_open(pid)
        for fd in (self.out_w, self.err_w):
            if fd >= 0:
                os.close(fd)
        self.out_w = self.err_w = -1
        self.deadline = self.started + self.limits.wall_timeout_s
        if self.cgroup:
            self.cgroup.close_fds()  # the child has its own copies
            self.cpu_check_at = self.started + self.limits.cpu_seconds / _CPUS

    def commit(self, caller_out: int) -> None:
        """A compartment started ahead of its request (compartment.isolate's prisons) gets it:
        where its output goes, and its time, which counts from now."""
        self.caller_out = caller_out
        self.started = time.monotonic()
        self.deadline = self.started + self.limits.wall_timeout_s

    def run(self) -> None:
        poller = select.poll()
        handlers = {self.pidfd: self._on_exit, self.status.fileno(): self._on_status}
        if self.out_r >= 0:
            handlers[self.out_r] = self._on_stdout if not self.merged else self._on_diagnostics
        if self.err_r >= 0:
            handlers[self.err_r] = self._on_diagnostics
        oom_fd = self.cgroup.watch_oom() if self.cgroup else -1
        if oom_fd >= 0:
            handlers[oom_fd] = self._on_out_of_memory
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        listening = False
        # Once the agent is reaped and its pipes are drained, the listener (and the cgroup's
        # memory) have nothing to say.
        while set(handlers) - {self.listener, oom_fd}:
            for fd, events in poller.poll(self._poll_ms()):
                # On the listener, POLLHUP without POLLIN: no task uses the filter any more.
                hung_up = fd == self.listener and not events & select.POLLIN
                if hung_up or not handlers[fd]():
                    poller.unregister(fd)
                    del handlers[fd]
                if self.listener >= 0 and not listening:
                    listening = True
                    handlers[self.listener] = self._on_notification
                    poller.register(self.listener, select.POLLIN)
            if self.killed_for is None and time.monotonic() >= self.deadline:
                self.kill(Outcome.TIMEOUT)
            running = self.killed_for is None and self.rusage is None
            if running and time.monotonic() >= self.cpu_check_at:
                self._check_cpu()

    def _on_out_of_memory(self) -> bool:
        """cgroup v1: the compartment ran out of memory; it ends whole, as on v2."""
        self.kill(Outcome.MEMORY_LIMIT)
        return False

    def _check_cpu(self) -> None:
        left_s = self.limits.cpu_seconds - self.cgroup.cpu_seconds()
        if left_s <= 0:
            self.kill(Outcome.CPU_LIMIT)
        self.cpu_check_at = time.monotonic() + max(left_s / _CPUS, _CPU_CHECK_MIN_S)

    def _poll_ms(self) -> int | None:
        until = min(self.deadline, self.cpu_check_at)
        remaining_ms = math.ceil((until - time.monotonic()) * 1000)
        return None if self.killed_for or self.rusage else max(0, remaining_ms)

    def kill(self, why: Outcome) -> None:
        self.killed_for = self.killed_for or why  # the first reason is the one reported
        try:
            syscalls.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return  # already gone: nothing left to kill

    def _on_exit(self) -> bool:
        _, self.wait_status, self.rusage = os.wait4(self.pid, 0)
        self.ended = time.monotonic()
        if self.cgroup:
            self.usage = self.cgroup.usage()
        return False

    def _on_status(self) -> bool:
        data, fds, _, _ = socket.recv_fds(self.status, RECORD.size + 1, 1,
                                          socket.MSG_CMSG_CLOEXEC)
        for fd in fds:
            if data == LISTENER_RECORD and self.listener < 0:
                self.listener = fd
                if self.cgroup:  # the child is past its cgroup steps, the agent about to exec:
                    cgroups.make_spare(self.limits)  # spare time
            else:
                os.close(fd)  # only the listener is ever sent, and only once
        if len(data) == RECORD.size:
            self.setup_error = SetupError.unpack(data)
        elif len(data) == EXIT_RECORD.size and data.startswith(EXIT_TAG):
            self.agent_wait_status = EXIT_RECORD.unpack(data)[1]
        elif data and data != LISTENER_RECORD:
            self.setup_error = SetupError("internal", "status", 0, f"bad record of {len(data)}")
        return bool(data)

    def _on_notification(self) -> bool:
        notification = bytearray(syscalls.SECCOMP_NOTIF_SIZE)
        try:
            fcntl.ioctl(self.listener, syscalls.SECCOMP_IOCTL_NOTIF_RECV, notification, True)
        except OSError as err:
            # ENOENT: the task died before we read its notification; there may be others.
            return err.errno == errno.ENOENT
        if self.learner is not None:
            self.learner(self.listener, bytes(notification))
            return True
        (number,) = struct.unpack_from("=i", notification, 16)  # seccomp_data.nr
        if self.denied_syscall is None:
            self.denied_syscall = self.names.get(number, f"syscall {number}")
        self.kill(Outcome.VIOLATION)
        return True

    def _on_stdout(self) -> bool:
        room = self.limits.output_bytes - self.bytes_out
        if room <= 0:
            return self._overflow(self.out_r)
        try:
            moved = self._move(min(room, _CHUNK))
        except OSError as err:
            return self._caller_failed(err)
        self.bytes_out += moved
        return moved > 0

    def _move(self, count: int) -> int:
        while self._splice:
            try:
                # Non-blocking on the pipes: a caller that stops reading must not hold this
                # loop past the deadline.
                return os.splice(self.out_r, self.caller_out, count, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:  # the caller's pipe is full: wait, but not past the deadline
                if not self._writable_before_deadline():
                    self.kill(Outcome.TIMEOUT)
                    return 0  # what the agent still writes is not delivered: the run failed
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: a destination splice cannot write to
                    if not _pending(self.out_r):
                        return 0  # the agent's end of file, which splice reports as the error
                    raise
                self._splice = False
        data = os.read(self.out_r, count)
        message.write_all(self.caller_out, data)
        return len(data)

    def _writable_before_deadline(self) -> bool:
        waiter = select.poll()
        waiter.register(self.caller_out, select.POLLOUT)
        return bool(waiter.poll(self._poll_ms()))

    def _caller_failed(self, err: OSError) -> bool:
        self.caller_error = f"cannot write the agent's output: {err.strerror}"
        self.kill(Outcome.INTERNAL_ERROR)
        return False

    def _on_diagnostics(self) -> bool:
        if self._spilled:
            return self._on_stdout()
        fd = self.out_r if self.merged else self.err_r
        room = self.limits.output_bytes - self.bytes_out
        if room <= 0:
            return self._overflow(fd)
        data = os.read(fd, min(room, 65536))
        self.bytes_out += len(data)
        if self.merged and len(self.diagnostics) + len(data) >= DIAGNOSTIC_BYTES:
            # More than diagnostics: the caller gave one file for stdout and stderr (`> out
            # 2>&1`) and the agent writes real output.  All of it is passed on, none of it
            # dropped; a reason line of ours then comes last instead of first.
            try:
                message.write_all(self.caller_out, bytes(self.diagnostics) + data)
            except OSError as err:
                return self._caller_failed(err)
            self.diagnostics.clear()
            self._spilled = True
            return True
        self.diagnostics += data[: DIAGNOSTIC_BYTES - len(self.diagnostics)]
        return bool(data)

    def _overflow(self, fd: int) -> bool:
        """No room left: one more byte means the agent wrote past the limit."""
        if os.read(fd, 1):
            self.bytes_out += 1
            self.kill(Outcome.OUTPUT_LIMIT)
        return False

    def close(self) -> None:
        for fd in (self.out_r, self.out_w, self.err_r, self.err_w, self.pidfd, self.listener,
                   self.unwritable):
            if fd >= 0:
                os.close(fd)
        self.out_r = self.out_w = self.err_r = self.err_w = self.pidfd = self.listener = -1
        self.unwritable = -1
        if self.status is not None:
            self.status.close()
        if self.rusage is None and self.pid > 0:
            # Only reached when run() itself failed: the child must not outlive the supervisor.
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            os.waitpid(self.pid, 0)


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe."""
    import termios  # only on an error path: it costs half a millisecond to import

    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


def _pipe(wanted: bool) -> tuple[int, int]:
    return os.pipe2(os.O_CLOEXEC) if wanted else (-1, -1)


def _writable(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except OSError:
        return False  # not open: nothing can be written there


def _same_file(a: int, b: int) -> bool:
    try:
        return os.path.samestat(os.fstat(a), os.fstat(b))
    except OSError:
        return False
