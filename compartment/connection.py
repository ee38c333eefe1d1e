"""One client of the resident supervisor: its connection, its request read within bounds, and
the delivery it asked for, with everything that delivery holds.

Privileged (the daemon, root).  Reading a request is one recvmsg of a bounded size with at most
protocol.MAX_FDS descriptors, nothing but SCM_RIGHTS accepted; what it holds is decoded by
compartment.protocol.  The caller's stdout and stderr must be something the daemon can write
without ever blocking (a pipe, a file, /dev/null); submit relays anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import struct
import time

from compartment import message, protocol, serveconfig, watch
from compartment.api import failure
from compartment.authorize import Peer, Refused
from compartment.exits import Convention, Outcome
from compartment.policy import Policy
from compartment.report import Result
from compartment.supervisor import Prepared

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_DEV_NULL = os.makedev(1, 3)


class Delivery:
    """One request being run: from the spawn request to the answer.  It owns the client's
    descriptors, the uid lease, the watch and the status socket until close()."""

    def __init__(self, request: protocol.Request, policy: Policy, fds: list[int],
                 caller: Convention, agent: Convention) -> None:
        self.request, self.policy, self.fds, self.caller, self.agent = \
            request, policy, fds, caller, agent
        self.prepared: Prepared | None = None
        self.watch: watch.Watch | None = None
        self.status: socket.socket | None = None  # our end of the child's status socket
        self.started = time.monotonic()
        self.spool: message.Spool | None = None  # the message being copied (message.stdin)
        self.stdin = -1  # the agent's stdin: the copy, or the caller's read-only
        self.stack = contextlib.ExitStack()  # what read_only opened, undone at the end
        self.running = False  # the spawner answered with a pid
        self.counted = False  # in the live statistics
        self.ended = False  # answered: events still queued for it are dropped
        self.accepted = False  # ACCEPTED sent (to a client whose delivery runs long)
        self.stopped = ""  # why the client ended it early (its compartment is killed)

    def close(self) -> None:
        """Idempotent.  The watch first: closing it reaps the init (killing it if need be),
        after which nothing of the compartment is left: its cgroup and its uid lease may go."""
        if self.watch is not None:
            self.watch.close()
        if self.status is not None:
            self.status.close()
        if self.spool is not None:
            self.spool.close()
        if self.prepared is not None:
            self.prepared.close_paths()
        self.stack.close()
        if self.prepared is not None:
            self.prepared.release()  # its cgroup, then its uid
        for fd in self.fds:  # first of what the client sees: a relay waits for their end
            os.close(fd)
        self.fds = []


class Connection:
    def __init__(self, sock: socket.socket, peer: Peer, rule: serveconfig.Rule | None,
                 request_timeout_s: float) -> None:
        self.sock, self.peer, self.rule = sock, peer, rule
        self.deadline = time.monotonic() + request_timeout_s
        self.delivery: Delivery | None = None
        self.gone = False  # the client hung up mid-delivery
        self.violated = False  # it sent more than its one request
        # Refused and answered: waiting for the client to close, so that closing first with its
        # request unread does not reset the connection before it reads the answer.
        self.lingering = False


def failed(delivery: Delivery, why: str) -> Result:
    return failure(Outcome.INTERNAL_ERROR, f"internal error: {why}", delivery.policy.name,
                   delivery.request.argv, delivery.caller, delivery.started)


def encode(result: Result, stderr: bytes, refused: bool = False) -> bytes:
    fields = {name: getattr(result, name) for name in Result.__dataclass_fields__}
    return protocol.encode_result({**fields, "stderr": stderr, "refused": refused})


def peer(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:  # no SO_PEERGROUPS (Linux < 4.13): the primary group alone
        groups = ()
    return Peer(uid, gid, pid, (gid, *groups))


def receive(sock: socket.socket) -> tuple[bytes, list[int], str | None]:
    """One request datagram and its descriptors; a refusal reason when it broke a bound."""
    space = socket.CMSG_SPACE(4 * (protocol.MAX_FDS + 1))
    data, ancillary, flags, _ = sock.recvmsg(protocol.MAX_REQUEST_BYTES + 1, space,
                                             socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    fds: list[int] = []
    other = False
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % 4
            fds += list(memoryview(payload[:whole]).cast("i"))
        else:
            other = True
    if flags & socket.MSG_TRUNC:
        return data, fds, f"request larger than {protocol.MAX_REQUEST_BYTES} bytes"
    if flags & socket.MSG_CTRUNC or len(fds) > protocol.MAX_FDS:
        return data, fds, f"more than {protocol.MAX_FDS} descriptors"
    if other:
        return data, fds, "ancillary data other than descriptors"
    return data, fds, None


def check_outputs(fds: list[int]) -> None:
    """The caller's stdout and stderr must be where a write cannot stall the daemon: a pipe
    (written without blocking), a file, or /dev/null.  `compartment submit` relays anything
    else (a terminal, a socket) through a pipe of its own."""
    for name, fd in (("stdout", fds[1]), ("stderr", fds[2])):
        info = os.fstat(fd)
        mode = info.st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)
                or (stat.S_ISCHR(mode) and info.st_rdev == _DEV_NULL)):
            raise Refused(f"{name} must be a pipe, a file or /dev/null")
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise Refused(f"{name} is not open for writing")
