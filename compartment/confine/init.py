"""init: pid 1 of the compartment, so that the agent is an ordinary process.

The kernel protects a pid namespace's first process from signals sent inside the namespace
unless it handles them, so an agent running as pid 1 would survive its own kill(getpid(),
SIGKILL) and go on to exit 0.  Instead the first process, once confined, forks the agent and
only waits: when the agent ends it sends the agent's wait status to the supervisor as one
fixed-size record, and it goes on reaping (every orphan of the namespace is its child) until
no process is left, tells the supervisor so with the compartment's CPU time and peak memory (what
its wait4 would give), and exits; the supervisor can answer at once, and this process's own
teardown (its address space, the namespaces) happens after.  The run is over when the
compartment is empty: work the agent
left to a child (the rest of a filter's output, a delivery written in the background) is
finished as it would be unconfined, never cut off and reported as done.  The supervisor's
deadline bounds it: a compartment still busy then is killed whole, and that is a timeout.
First it hands the supervisor a pidfd of the agent, so that a run the supervisor kills
(timeout, violation, output) ends like any other: the agent's process group is killed, this
init reaps it and reports what the compartment used (CPU time, peak memory) for the report.

Child side, pid 1, after every confinement step but seccomp and the late limits, which are the
agent's own: it has the agent's uid, no capabilities, and holds no descriptor but the status
socket.  The agent cannot signal it (every signal blocked, default dispositions: the kernel
drops what comes from inside the namespace), read or trace it (not dumpable; ptrace is
refused), nor change its limits (the agent's filter allows prlimit64 on pid 0 only).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct

EXIT_RECORD = struct.Struct("8si")
EXIT_TAG = b"exited"
# tag, user and system CPU in microseconds, peak resident memory in KiB: the whole compartment's
EMPTY_RECORD = struct.Struct("8sQQQ")
EMPTY_TAG = b"empty"
AGENT_RECORD = b"agent"  # with the agent's pidfd (SCM_RIGHTS)


def run(agent: int, status: socket.socket) -> None:
    """Never returns: reaps until the namespace is empty, reporting the agent's status as soon
    as the agent ends, then exits."""
    keep = status.fileno()
    os.closerange(0, keep)
    os.closerange(keep + 1, 1 << 20)
    agent_pidfd = os.pidfd_open(agent)
    socket.send_fds(status, [AGENT_RECORD], [agent_pidfd])
    os.close(agent_pidfd)
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:  # ECHILD: nothing left in the namespace but this process
            _report_empty(status)
            os._exit(0)
        if pid == agent:
            status.sendmsg([EXIT_RECORD.pack(EXIT_TAG, wait_status)])
            agent = 0  # reported once: a later process given the same pid is not the agent


def _report_empty(status: socket.socket) -> None:
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = EMPTY_RECORD.pack(EMPTY_TAG, round((own.ru_utime + reaped.ru_utime) * 1e6),
                               round((own.ru_stime + reaped.ru_stime) * 1e6),
                               max(own.ru_maxrss, reaped.ru_maxrss))
    with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
        status.sendmsg([record])
