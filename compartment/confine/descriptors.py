"""Descriptors: exactly 0, 1, 2 and the policy's extra descriptors reach the program.

Child side, in the first process before it forks, so the agent inherits the arrangement.  The
handed descriptors are first lifted above every target number, so that placing one cannot
clobber another, then placed.  Everything else is marked close-on-exec, the status socket
included: the init keeps it, the agent loses it the moment exec succeeds.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "descriptors"


def enter(handed: Sequence[tuple[int, int]]) -> None:
    """handed: (target, source) pairs; every other descriptor is closed by exec."""
    try:
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
