"""seccomp, child side: load the filter the supervisor compiled, last of the security steps.

Child side, in the agent after the fork (a policy may refuse fork, and the init runs none of the
agent's code), unprivileged, no_new_privs set: one seccomp(2) call with the BPF program laid out
in memory before clone.  It comes last so that the filter need not allow any of the setup; the
user-notification listener it returns goes to the supervisor over the status socket and is
closed here.  The program itself is built from the policy by compartment.syscall_filter.
"""

from __future__ import annotations

import array
import os
import socket

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "seccomp"
LISTENER_RECORD = b"listener"


def enter(prepared: syscalls.PreparedFilter, status: socket.socket) -> None:
    try:
        listener = prepared.install()
    except OSError as err:
        raise fail(STEP, "seccomp", err, "SECCOMP_SET_MODE_FILTER") from None
    try:
        status.sendmsg([LISTENER_RECORD], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [listener]))])
    except OSError as err:
        raise fail(STEP, "sendmsg", err, "the listener, to the supervisor") from None
    os.close(listener)
