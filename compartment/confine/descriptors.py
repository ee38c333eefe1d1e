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
import socket
from collections.abc import Sequence

from compartment import syscalls
from compartment.confine.errors import SetupError, fail

STEP = "descriptors"
_FD_MAX = 0x7FFFFFFF
INPUT_TAG = b"input"


def enter(handed: Sequence[tuple[int, int]]) -> None:
    """handed: (target, source) pairs; every other descriptor is closed by exec."""
    try:
        floor = _place(handed)
        syscalls.close_range_cloexec(floor)
        targets = {target for target, _ in handed}
        for fd in set(range(floor)) - targets:
            _set_cloexec(fd)
    except OSError as err:
        raise fail(STEP, "dup2", err) from None


def keep_only(handed: Sequence[tuple[int, int]]) -> None:
    """The prison's (compartment.isolate): no exec will close the rest, so it is closed now.
    handed must fill 0 up to its highest target without a gap."""
    try:
        os.closerange(_place(handed), _FD_MAX)  # one close_range(2)
    except OSError as err:
        raise fail(STEP, "dup2", err) from None


def receive(status: socket.socket, target: int) -> None:
    """The prison's input, which arrives after its setup (it was cloned ahead of the request):
    one descriptor on the status socket, put at `target`."""
    try:
        data, fds, _, _ = socket.recv_fds(status, len(INPUT_TAG) + 1, 2)
    except OSError as err:
        raise fail(STEP, "recvmsg", err, "the input") from None
    if data != INPUT_TAG or len(fds) != 1:
        raise SetupError(STEP, "recvmsg", 0, f"no input: {len(data)} bytes, {len(fds)} "
                                             "descriptors (the zygote went away?)")
    try:
        os.dup2(fds[0], target, inheritable=False)
        os.close(fds[0])
    except OSError as err:
        raise fail(STEP, "dup2", err, "the input") from None


def _place(handed: Sequence[tuple[int, int]]) -> int:
    """Lift every source above the targets, then put each in place; returns the first number
    above the targets."""
    floor = max(target for target, _ in handed) + 1
    lifted = [(target, fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, floor))
              for target, source in handed]
    for target, source in lifted:
        os.dup2(source, target, inheritable=True)
    return floor


def _set_cloexec(fd: int) -> None:
    try:
        os.set_inheritable(fd, False)
    except OSError as err:
        if err.errno != errno.EBADF:  # not open: nothing to close
            raise
