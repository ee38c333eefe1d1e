"""Session and signals: a new session with no controlling terminal, default dispositions.

Child side.  setsid() leaves the caller's terminal behind, so TIOCSTI has nothing to inject into.
MTAs start pipe commands with signals ignored (Exim ignores SIGHUP, SIGINT, SIGUSR1, SIGTERM;
Python itself ignores SIGPIPE and SIGXFSZ) and ignored dispositions survive exec, so each is
reset.  The parent-death signal is set here, after the uid change, because changing credentials
clears it; as pid 1 of the namespace its death takes every agent process.  A supervisor that died
before it was set sends no signal, so the status socket is looked at next: its other end is the
supervisor's alone, and hung up means the supervisor is gone (the child then stops there, rather
than run an agent nobody watches).

`enter` is the init's, before the fork: it also blocks every signal.  A handler the caller
installed behind the signal module's back (faulthandler's, a C extension's) would otherwise let
a signal from the agent, which has the init's uid, run it; blocked, such a signal stays pending
and the kernel drops the rest (a namespace's pid 1 gets no default-action signal from inside).
SIGKILL from the supervisor, or as the parent-death signal, cannot be blocked.  `agent` is the
agent's, just forked: a session of its own, nothing blocked.
"""

from __future__ import annotations

import _signal  # signal's C half: the same calls without an enum made per signal (~0.1 ms)
import os
import select
import signal
import socket

import prctl

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "session"


def enter(status: socket.socket) -> None:
    try:
        os.setsid()
        default_dispositions()
        _signal.pthread_sigmask(_signal.SIG_SETMASK, _signal.valid_signals())
        prctl.set_pdeathsig(signal.SIGKILL)
        prctl.set_dumpable(0)
    except (OSError, ValueError) as err:
        raise fail(STEP, "setsid", err if isinstance(err, OSError) else 0, str(err)) from None
    supervisor_alive(status)


def supervisor_alive(status: socket.socket) -> None:
    """After the parent-death signal is set: the supervisor did not die before it was."""
    poller = select.poll()
    poller.register(status.fileno(), select.POLLRDHUP)
    if poller.poll(0):
        os._exit(1)  # nobody to tell: the status socket's other end is gone


def agent() -> None:
    os.setsid()  # it cannot fail in a process just forked: it leads no group
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())


def default_dispositions() -> None:
    """Every signal to SIG_DFL.  The signal module knows every disposition (it read them all at
    start-up and made every change since), so only those not at SIG_DFL need a call; it does not
    know the C library's own two (32 and 33, None here), which a caller may have left ignored."""
    for signum in range(1, signal.NSIG):
        handler = _signal.getsignal(signum)
        if handler is None:
            syscalls.default_signal(signum)
        elif handler != _signal.SIG_DFL:
            _signal.signal(signum, _signal.SIG_DFL)
