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
compartment is killed: first the agent's process group, through the pidfd of the agent its init
handed over, so that the init reaps them and reports what the compartment used (CPU, peak
memory) as after any run; then, should it not be empty KILL_GRACE_S later (a process that left
the group), or at once when the agent is already gone, the init itself, with which the kernel
kills the rest.  Under a cgroup the CPU time of the whole compartment is read at times planned
from the budget left (it cannot be spent sooner than that budget over the number of CPUs), and
the compartment is killed once it has used it all; on cgroup v1 the kernel's word that it ran
out of memory (an eventfd) ends it too, as memory.oom.group does on v2.

A Watch never blocks and owns no loop of its own: `wanted()` says which descriptors it waits on
and for what, `on_event` takes what poll() reported, `check_deadline` is called whenever the
loop wakes.  `run()` is that loop for one compartment (compartment run); the resident supervisor
drives many watches from its single loop (compartment serve).  When the caller's stdout is full,
the watch waits for it to have room instead of reading the agent, which the full pipe stops.
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
from compartment.confine.init import AGENT_RECORD, EMPTY_RECORD, EMPTY_TAG, EXIT_RECORD, EXIT_TAG
from compartment.confine.seccomp import LISTENER_RECORD
from compartment.exits import Outcome
from compartment.policy import Limits

DIAGNOSTIC_BYTES = 4096
PIPE_BYTES = 1 << 20
_CHUNK = 1 << 20
_SPILL_READ = 65536 - DIAGNOSTIC_BYTES  # with the diagnostics kept, one empty pipe's worth
KILL_GRACE_S = 0.05  # for the init to reap the agent's killed group before it is killed too
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
        self.pid = self.pidfd = self.listener = self.agent_pidfd = -1
        self.status: socket.socket | None = None
        self.deadline = self.started = self.ended = 0.0
        self.kill_deadline: float | None = None  # when the init is killed after the agent
        self.bytes_out = 0
        self.diagnostics = bytearray()
        self.killed_for: Outcome | None = None  # why we killed it; the caller's failure is ours
        self.denied_syscall: str | None = None
        self.setup_error: SetupError | None = None
        self.wait_status = 0  # of the compartment's init
        self.agent_wait_status: int | None = None  # reported by the init
        self.rusage: resource.struct_rusage | None = None  # the compartment's, when it ended
        self.reaped = False  # the init waited for
        self.usage: cgroups.Usage | None = None  # the cgroup's figures, once it is over
        self.cpu_check_at = math.inf
        self._oom_fd = -1
        self.caller_error = ""
        self._splice = True
        self._spilled = False  # merged output grew past diagnostics: now passed on as data
        self._pending = -1  # a pipe of ours holding spilled output the caller has not taken
        self._handlers: dict[int, Callable[[], bool]] = {}  # fd -> handler; False: done with it
        self._listening = False

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
        self._handlers = {self.pidfd: self._on_exit, status.fileno(): self._on_status}
        if self.out_r >= 0:
            self._handlers[self.out_r] = self._output_handler()
        if self.err_r >= 0:
            self._handlers[self.err_r] = self._on_diagnostics
        if self.cgroup:
            self.cgroup.close_fds()  # the child has its own copies
            self.cpu_check_at = self.started + self.limits.cpu_seconds / _CPUS
            self._oom_fd = self.cgroup.watch_oom()
            if self._oom_fd >= 0:
                self._handlers[self._oom_fd] = self._on_out_of_memory

    def wanted(self) -> dict[int, int]:
        """The descriptors to poll now, and for what."""
        return {fd: select.POLLOUT if fd == self.caller_out else select.POLLIN
                for fd in self._handlers}

    @property
    def finished(self) -> bool:
        # Once the agent is reaped and its pipes are drained, the listener (and the cgroup's
        # memory) have nothing to say.
        return not set(self._handlers) - {self.listener, self._oom_fd}

    def on_event(self, fd: int, events: int) -> None:
        handler = self._handlers.get(fd)
        if handler is None:
            return  # dropped by an earlier handler of the same poll() round
        # On the listener, POLLHUP without POLLIN: no task uses the filter any more.
        hung_up = fd == self.listener and not events & select.POLLIN
        if hung_up or not handler():
            self._handlers.pop(fd, None)
        if self.listener >= 0 and not self._listening:
            self._listening = True
            self._handlers[self.listener] = self._on_notification

    def check_deadline(self) -> None:
        now = time.monotonic()
        if self.killed_for is None and now >= self.deadline:
            self.kill(Outcome.TIMEOUT)
        elif self.kill_deadline is not None and now >= self.kill_deadline:
            self._kill_init()
        if self.killed_for is None and self.rusage is None and now >= self.cpu_check_at:
            left_s = self.limits.cpu_seconds - self.cgroup.cpu_seconds()
            if left_s <= 0:
                self.kill(Outcome.CPU_LIMIT)
            self.cpu_check_at = now + max(left_s / _CPUS, _CPU_CHECK_MIN_S)

    def commit(self, caller_out: int) -> None:
        """A compartment started ahead of its request (compartment.isolate's prisons) gets it:
        where its output goes, and its time, which counts from now."""
        self.caller_out = caller_out
        self.started = time.monotonic()
        self.deadline = self.started + self.limits.wall_timeout_s

    def run(self) -> None:
        """Watch this one compartment to its end."""
        poller = select.poll()
        registered: dict[int, int] = {}
        while not self.finished:
            sync(poller, registered, self.wanted())
            for fd, events in poller.poll(self.poll_ms()):
                self.on_event(fd, events)
            self.check_deadline()

    def poll_ms(self) -> int | None:
        """How long the loop may sleep for this watch: until the deadline, which holds while
        the agent runs or its output waits for the caller."""
        if self.kill_deadline is not None:
            return max(0, math.ceil((self.kill_deadline - time.monotonic()) * 1000))
        waiting = self.rusage is None or self.caller_out in self._handlers
        if self.killed_for or not waiting:
            return None
        until = min(self.deadline, self.cpu_check_at if self.rusage is None else math.inf)
        return max(0, math.ceil((until - time.monotonic()) * 1000))

    def kill(self, why: Outcome) -> None:
        """End the compartment; the first reason is the one reported, a second call changes
        nothing."""
        # Waiting for a caller that does not read: what the agent wrote is not delivered now.
        self._handlers.pop(self.caller_out, None)
        if self.killed_for:
            return
        self.killed_for = why
        if self.agent_pidfd >= 0 and _kill_group(self.agent_pidfd):
            self.kill_deadline = time.monotonic() + KILL_GRACE_S
        else:
            self._kill_init()  # no agent to start from: the whole compartment at once

    def _kill_init(self) -> None:
        self.kill_deadline = None
        if self.rusage is not None or self.pidfd < 0:
            return  # the compartment is empty already: only the init's own exit is left
        try:
            syscalls.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return  # already gone: nothing left to kill

    def _on_exit(self) -> bool:
        _, self.wait_status, usage = os.wait4(self.pid, 0)
        self.reaped = True
        if self.rusage is None:  # not told already (the init was killed, or died)
            self.rusage, self.ended = usage, time.monotonic()
            self._read_usage()
        return False

    def _read_usage(self) -> None:
        """The cgroup's figures, once the compartment is empty (its init reaped, or exiting)."""
        if self.cgroup and self.usage is None:
            self.usage = self.cgroup.usage()

    def _on_out_of_memory(self) -> bool:
        """cgroup v1: the compartment ran out of memory; it ends whole, as on v2."""
        self.kill(Outcome.MEMORY_LIMIT)
        return False

    def _on_status(self) -> bool:
        data, fds, _, _ = socket.recv_fds(self.status, RECORD.size + 1, 1,
                                          socket.MSG_CMSG_CLOEXEC)
        for fd in fds:
            if data == LISTENER_RECORD and self.listener < 0:
                self.listener = fd
                if self.cgroup:  # the child is past its cgroup steps, the agent about to exec:
                    cgroups.make_spare(self.limits)  # spare time
            elif data == AGENT_RECORD and self.agent_pidfd < 0:
                self.agent_pidfd = fd
            else:
                os.close(fd)  # only the listener is ever sent, and only once
        if len(data) == RECORD.size:
            self.setup_error = SetupError.unpack(data)
        elif len(data) == EXIT_RECORD.size and data.startswith(EXIT_TAG):
            self.agent_wait_status = EXIT_RECORD.unpack(data)[1]
        elif len(data) == EMPTY_RECORD.size and data.startswith(EMPTY_TAG):
            return self._on_empty(data)
        elif data and data not in (LISTENER_RECORD, AGENT_RECORD):
            self.setup_error = SetupError("internal", "status", 0, f"bad record of {len(data)}")
        return bool(data)

    def _on_empty(self, data: bytes) -> bool:
        """The compartment is empty and its init is exiting: the run is over (once its output
        is drained), with the usage wait4 would have given.  The init's own teardown need not
        be waited for; whoever holds the watch reaps it (close(), or the daemon later)."""
        _, user_us, system_us, peak_kib = EMPTY_RECORD.unpack(data)
        self.rusage = resource.struct_rusage((user_us / 1e6, system_us / 1e6, peak_kib,
                                              *(0,) * 13))
        self.ended = time.monotonic()
        self._read_usage()
        self._handlers.pop(self.pidfd, None)
        return False  # nothing more to read on the status socket

    def release_init(self) -> tuple[int, int]:
        """(pid, pidfd) of the compartment's init, which the caller now reaps; close() will
        not.  Once the compartment is empty (finished), only its teardown is left."""
        init = self.pid, self.pidfd
        self.pid = self.pidfd = -1
        return init

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
            moved = self._move(self.out_r, min(room, _CHUNK))
        except BlockingIOError:
            # The caller's pipe is full: wait for it to have room (not past the deadline), and
            # leave the agent's output in its own pipe meanwhile, which stops the agent.
            self._handlers[self.caller_out] = self._on_writable
            return False
        except OSError as err:
            return self._caller_failed(err)
        self.bytes_out += moved
        return moved > 0

    def _on_writable(self) -> bool:
        try:
            if not self._flush():
                return True  # still full: go on waiting
        except OSError as err:
            return self._caller_failed(err)
        self._handlers[self.out_r] = self._output_handler()
        return False

    def _output_handler(self) -> Callable[[], bool]:
        return self._on_diagnostics if self.merged else self._on_stdout

    def _move(self, source: int, count: int) -> int:
        while self._splice:
            try:
                # Non-blocking on the pipes: a caller that stops reading must not hold the
                # loop past the deadline (BlockingIOError goes up: wait for room).
                return os.splice(source, self.caller_out, count, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                raise  # the caller is full (or the agent's pipe empty): wait for room
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: a destination splice cannot write to
                    if not _pending(source):
                        return 0  # the agent's end of file, which splice reports as the error
                    raise
                self._splice = False
        data = os.read(source, count)
        message.write_all(self.caller_out, data)
        return len(data)

    def _spill(self, data: bytes) -> bool:
        """Output that is more than diagnostics goes to the caller through a pipe of ours,
        which holds it (data is at most an empty pipe's 64 KiB) while the caller has no room:
        writing never blocks.  False: the caller is full, wait for room."""
        self._pending, pending_w = os.pipe2(os.O_CLOEXEC)
        try:
            message.write_all(pending_w, data)
        finally:
            os.close(pending_w)
        return self._flush()

    def _flush(self) -> bool:
        """Move what is pending to the caller; False when the caller is full (and wait)."""
        while self._pending >= 0:
            try:
                moved = self._move(self._pending, _CHUNK)
            except BlockingIOError:
                self._handlers[self.caller_out] = self._on_writable
                return False
            if not moved:
                os.close(self._pending)
                self._pending = -1
        return True

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
        data = os.read(fd, min(room, _SPILL_READ))
        self.bytes_out += len(data)
        if self.merged and len(self.diagnostics) + len(data) >= DIAGNOSTIC_BYTES:
            # More than diagnostics: the caller gave one file for stdout and stderr (`> out
            # 2>&1`) and the agent writes real output.  All of it is passed on, none of it
            # dropped; a reason line of ours then comes last instead of first.
            self._spilled = True
            try:
                flushed = self._spill(bytes(self.diagnostics) + data)
            except OSError as err:
                return self._caller_failed(err)
            self.diagnostics.clear()
            return flushed  # False: paused, until the caller has room
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
                   self._pending, self.unwritable, self.agent_pidfd):
            if fd >= 0:
                os.close(fd)
        self.out_r = self.out_w = self.err_r = self.err_w = self.pidfd = self.listener = -1
        self._pending = self.unwritable = self.agent_pidfd = -1
        self._handlers = {}  # events still queued for closed descriptors are dropped
        if self.status is not None:
            self.status.close()
        if self.pid > 0 and not self.reaped:
            # Killed unless it told us it is exiting (or run() itself failed: the child must
            # not outlive the supervisor); then waited for.
            if self.rusage is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.reaped = True


def sync(poller: select.poll, registered: dict[int, int], wanted: dict[int, int]) -> None:
    """Bring poller's registrations (mirrored in `registered`) to `wanted`."""
    for fd in registered.keys() - wanted.keys():
        poller.unregister(fd)
        del registered[fd]
    for fd, events in wanted.items():
        if registered.get(fd) != events:
            poller.register(fd, events)  # registering again modifies
            registered[fd] = events


def _kill_group(agent_pidfd: int) -> bool:
    """SIGKILL to the agent's process group (the agent leads it: it made its own session),
    resolved by the kernel from the pidfd, so never another group that took the number; on a
    kernel without that (before 6.9) the agent alone.  False: the agent is gone already."""
    try:
        syscalls.pidfd_send_signal(agent_pidfd, signal.SIGKILL,
                                   syscalls.PIDFD_SIGNAL_PROCESS_GROUP)
    except ProcessLookupError:
        return False
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        try:
            syscalls.pidfd_send_signal(agent_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
    return True


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
