"""commit, child side: the request's part of a compartment prepared ahead of its request.

The resident supervisor may prepare a compartment before any request for its policy comes: the
child takes steps 1 to 9 (namespaces, the root, the ids of a pool uid leased for it, the first
limits, the session, no_new_privs, the scope) and then waits here, in the init-to-be, every
signal blocked (the supervisor's SIGKILL and the parent-death signal still reach it).  Once a
request for that policy has passed every check, the supervisor commits the compartment to it:
one datagram on the status socket, whose other end is the supervisor's alone, with the request's
descriptors attached and its program, argv and environment (marshal data, written by the
supervisor, not by the peer).  What comes from the request enters only here, and a compartment
is committed to one request only: this runs once, then the steps go on from 10.
"""

from __future__ import annotations

import marshal
import os
import socket
from dataclasses import replace

from compartment.confine.errors import SetupError, fail

TYPE_CHECKING = False  # not typing's: the spawner, every compartment's image, imports this
if TYPE_CHECKING:
    from compartment.confine import Plan

STEP = "commit"
MAX_BYTES = 1 << 20
MAX_FDS = 32


def receive(plan: Plan, status: socket.socket) -> Plan:
    try:
        data, fds, flags, _ = socket.recv_fds(status, MAX_BYTES, MAX_FDS,
                                              socket.MSG_CMSG_CLOEXEC)
    except OSError as err:
        raise fail(STEP, "recvmsg", err, "the request's part") from None
    if not data:
        os._exit(0)  # the supervisor let this compartment go unused: nothing to run
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise SetupError(STEP, "recvmsg", 0, "the request's part was truncated")
    try:
        program, argv, env, targets = marshal.loads(data)
        handed = tuple(zip(targets, fds, strict=True))
    except (ValueError, TypeError, EOFError) as err:
        raise SetupError(STEP, "marshal", 0, f"the request's part: {err}") from None
    return replace(plan, program=program, argv=tuple(argv), env=dict(env), handed=handed,
                   commit=False)


def send(status: socket.socket, program: str, argv: tuple[str, ...], env: dict[str, str],
         handed: tuple[tuple[int, int], ...]) -> None:
    """Supervisor side: commit a prepared compartment to a request."""
    data = marshal.dumps((program, tuple(argv), dict(env), tuple(t for t, _ in handed)))
    socket.send_fds(status, [data], [source for _, source in handed])
