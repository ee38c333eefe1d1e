"""init: pid 1 of the compartment, so that the agent is an ordinary process.

The kernel protects a pid namespace's first process from signals sent inside the namespace
unless it handles them, so an agent running as pid 1 would survive its own kill(getpid(),
SIGKILL) and go on to exit 0.  Instead the first process forks the agent right after the
filesystem is built, then only waits: it reaps orphans, and when the agent ends it sends the
agent's wait status to the supervisor as one fixed-size record and exits, which makes the kernel
kill whatever the agent left behind.

Child side, pid 1, before the ids change: it keeps its uid (root, or the caller's in a user
namespace) but clears its capability sets and sets no_new_privs, and holds no descriptor but the
status socket, so the agent can neither use nor borrow anything from it.  It never execs, so the
bounding set and securebits, which only matter across exec, are left to the agent's own steps;
those are on the agent's critical path, this is not.
"""

from __future__ import annotations

import os
import signal
import socket
import struct

import prctl

from compartment import syscalls
from compartment.confine import session

EXIT_RECORD = struct.Struct("8si")
EXIT_TAG = b"exited"


def run(agent: int, status: socket.socket) -> None:
    """Never returns: waits for the agent, reports its status, exits."""
    keep = status.fileno()
    os.closerange(0, keep)
    os.closerange(keep + 1, 1 << 20)
    syscalls.capset_empty()
    prctl.set_no_new_privs(1)
    # Not dumpable: in a user namespace the agent has our uid, and /proc/1/mem, environ and
    # ptrace would otherwise let it read or write this copy of the supervisor's memory.
    prctl.set_dumpable(0)
    # Default dispositions (the supervisor's Python handlers are inherited): the kernel then
    # drops every signal sent to a namespace's pid 1 from inside it, so the agent cannot kill
    # its init and make its own end look like the runner's failure.
    session.default_dispositions()
    prctl.set_pdeathsig(signal.SIGKILL)  # the supervisor gone: the whole namespace goes
    while True:
        pid, wait_status = os.waitpid(-1, 0)
        if pid == agent:
            break
    status.send(EXIT_RECORD.pack(EXIT_TAG, wait_status))
    os._exit(0)
