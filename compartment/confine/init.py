"""init: pid 1 of the compartment, so that the agent is an ordinary process.

The kernel protects a pid namespace's first process from signals sent inside the namespace
unless it handles them, so an agent running as pid 1 would survive its own kill(getpid(),
SIGKILL) and go on to exit 0.  Instead the first process, once confined, forks the agent and
only waits: when the agent ends it sends the agent's wait status to the supervisor as one
fixed-size record, and it goes on reaping (every orphan of the namespace is its child) until
no process is left, then exits.  The run is over when the compartment is empty: work the agent
left to a child (the rest of a filter's output, a delivery written in the background) is
finished as it would be unconfined, never cut off and reported as done.  The supervisor's
deadline bounds it: a compartment still busy then is killed whole, and that is a timeout.

Child side, pid 1, after every confinement step but seccomp and the late limits, which are the
agent's own: it has the agent's uid, no capabilities, and holds no descriptor but the status
socket.  The agent cannot signal it (every signal blocked, default dispositions: the kernel
drops what comes from inside the namespace), read or trace it (not dumpable; ptrace is
refused), nor change its limits (the agent's filter allows prlimit64 on pid 0 only).
"""

from __future__ import annotations

import os
import socket
import struct

EXIT_RECORD = struct.Struct("8si")
EXIT_TAG = b"exited"


def run(agent: int, status: socket.socket) -> None:
    """Never returns: reaps until the namespace is empty, reporting the agent's status as soon
    as the agent ends, then exits."""
    keep = status.fileno()
    os.closerange(0, keep)
    os.closerange(keep + 1, 1 << 20)
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:  # ECHILD: nothing left in the namespace but this process
            os._exit(0)
        if pid == agent:
            status.sendmsg([EXIT_RECORD.pack(EXIT_TAG, wait_status)])
            agent = 0  # reported once: a later process given the same pid is not the agent
