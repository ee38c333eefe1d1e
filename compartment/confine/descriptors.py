"""Descriptors: exactly 0, 1, 2 and the policy's extra descriptors reach the program.

Child side, after seccomp (so the filter is already in force while descriptors are arranged;
dup2, sendmsg and close_range are in every filter's basic set).  The handed descriptors are first
lifted above every target number, so that placing one cannot clobber another, then placed.  The
seccomp listener goes to the supervisor over the status socket and is closed here.  Everything
else is marked close-on-exec, the status socket included: it closes at the moment exec
succeeds, which is how the supervisor knows it did.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
from collections.abc import Sequence

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "descriptors"
LISTENER_RECORD = b"listener"


def enter(handed: Sequence[tuple[int, int]], listener: int, status: socket.socket) -> None:
    """handed: (target, source) pairs; every other descriptor is closed by exec."""
    try:
        status.sendmsg([LISTENER_RECORD], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [listener]))])
        os.close(listener)
        floor = max(target for target, _ in handed) + 1
        lifted = [(target, fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, floor))
                  for target, source in handed]
        for target, source in lifted:
            os.dup2(source, target, inheritable=True)
        syscalls.close_range_cloexec(floor)
        targets = {target for target, _ in handed}
        for fd in set(range(floor)) - targets:
            _set_cloexec(fd)
    except OSError as err:
        raise fail(STEP, "dup2", err) from None


def _set_cloexec(fd: int) -> None:
    try:
        os.set_inheritable(fd, False)
    except OSError as err:
        if err.errno != errno.EBADF:  # not open: nothing to close
            raise
