"""Compartments prepared ahead of their requests: ready ahead, committed late.

Privileged (the resident supervisor, root).  Most of what a delivery costs does not depend on
the request: the clone, the namespaces, the read-only system view, the ids of a pool uid, the
limits, the session.  For a policy whose agent runs under a pool uid, the daemon has the spawner
prepare one compartment ahead (supervisor.prepare_ahead, then the child takes steps 1 to 9 and
waits: confine.commit).  When a request for that policy has passed every check, the compartment
is committed to it — its descriptors, program, argv and environment — and a new one is prepared
for the next request, off that request's critical path.

What may be prepared: a policy (the frozen, loaded Policy, overrides included, is the key) whose
identity is the pool's, for a request that names no path of its own (a mailbox, a readable
directory: those are opened for the request, as its peer, and need a root of their own; root's
are opened as root whoever names them, so for root the policy says it all), and whose program
the prepared root shows (the system's own directories).  Anything else takes the
ordinary way (supervisor.prepare, a clone per request).  A prepared compartment serves one
request or none: unused ones are killed on a reload (the policies may have changed) and when
the daemon stops; one that failed before its request (a setup error) is logged, and its policy
is prepared no more until the next reload.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable

from compartment import supervisor, syscalls
from compartment.confine.errors import RECORD, SetupError
from compartment.policy import Policy
from compartment.spawner import Spawner

MAX_POLICIES = 8  # kinds of compartment kept ready at once; the oldest gives way


class Spare:
    """One compartment prepared ahead: its init waits for its request's part."""

    def __init__(self, policy: Policy, prepared: supervisor.Prepared,
                 status: socket.socket) -> None:
        self.policy, self.prepared, self.status = policy, prepared, status
        self.pid = self.pidfd = -1  # known once the spawner has cloned it

    def close(self) -> None:
        """Gone (reaped) or committed elsewhere: what the daemon still holds of it."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.status.close()


class Ahead:
    def __init__(self, spawner: Callable[[], Spawner], log: Callable[[str], None]) -> None:
        self.spawner, self.log = spawner, log
        self.ready: dict[Policy, Spare] = {}
        self.starting: dict[Policy, Spare] = {}  # sent to the spawner, not answered yet
        self.failing: set[Policy] = set()
        self.dying: dict[int, Spare] = {}  # killed or failed, to be reaped (pidfd -> spare)

    @staticmethod
    def eligible(policy: Policy, sets: tuple[str, ...], root: bool) -> bool:
        """Root's paths are opened as root whoever names them: the loaded policy says it all."""
        return policy.identity.uid == "pool" and (root or not any(
            item.startswith("filesystem.") for item in sets))

    def take(self, policy: Policy) -> Spare | None:
        return self.ready.pop(policy, None)

    def give_back(self, spare: Spare) -> None:
        """Taken but not committed (the request needed a root of its own): ready again."""
        if spare.policy in self.ready:
            self._kill(spare)
        else:
            self.ready[spare.policy] = spare

    def want(self, policy: Policy) -> Spare | None:
        """Prepare one for the next request of this policy, unless there is one; the Spare
        the spawner will answer for (the caller queues it with its other requests)."""
        if policy in self.ready or policy in self.starting or policy in self.failing:
            return None
        if len(self.ready) + len(self.starting) >= MAX_POLICIES and self.ready:
            self._kill(self.ready.pop(next(iter(self.ready))))
        try:
            prepared = supervisor.prepare_ahead(policy)
        except (supervisor.ConfigError, OSError) as err:
            self.failing.add(policy)
            self.log(f"policy {policy.name}: not prepared ahead: {err}")
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        spare = Spare(policy, prepared, ours)
        try:
            self.spawner().send(prepared.plan, theirs.fileno())
        except BaseException:
            self._release(spare)
            raise
        finally:
            theirs.close()
            prepared.close_paths()  # the spawner has its copies, or there is no child
        self.starting[policy] = spare
        return spare

    def spawned(self, spare: Spare, pid: int, err: int) -> None:
        """The spawner's answer for a spare."""
        del self.starting[spare.policy]
        if not pid:
            self.failing.add(spare.policy)
            self.log(f"policy {spare.policy.name}: not prepared ahead: clone: "
                     f"{os.strerror(err)}")
            self._release(spare)
            return
        spare.pid, spare.pidfd = pid, os.pidfd_open(pid)
        self.ready[spare.policy] = spare

    def handlers(self) -> dict[int, Callable[[int], None]]:
        """Descriptors to poll for POLLIN: a ready compartment's pidfd (it died unused) and
        those being reaped."""
        out: dict[int, Callable[[int], None]] = {}
        for spare in list(self.ready.values()) + list(self.dying.values()):
            out[spare.pidfd] = lambda _events, s=spare: self._gone(s)
        return out

    def drop_all(self) -> None:
        """Kill every unused compartment (a reload, a stop); they are reaped as they go."""
        for spare in list(self.ready.values()):
            self._kill(spare)
        self.ready.clear()
        self.failing.clear()

    def _kill(self, spare: Spare) -> None:
        with contextlib.suppress(ProcessLookupError):
            syscalls.pidfd_send_signal(spare.pidfd, signal.SIGKILL)
        self.dying[spare.pidfd] = spare

    def _gone(self, spare: Spare) -> None:
        """Its init exited: killed by us, or a setup step failed before any request came."""
        os.waitpid(spare.pid, 0)
        if self.ready.get(spare.policy) is spare:  # not killed by us: it failed
            del self.ready[spare.policy]
            self.failing.add(spare.policy)
            self.log(f"policy {spare.policy.name}: a compartment prepared ahead failed "
                     f"({self._why(spare)}); its requests are prepared one by one")
        self.dying.pop(spare.pidfd, None)
        self._release(spare)

    @staticmethod
    def _why(spare: Spare) -> str:
        try:
            data = spare.status.recv(RECORD.size + 1, socket.MSG_DONTWAIT)
        except OSError:
            return "no record"
        return SetupError.unpack(data).text() if len(data) == RECORD.size else "no record"

    def _release(self, spare: Spare) -> None:
        spare.close()
        spare.prepared.release()  # its cgroup, then its uid

    def waiting(self) -> bool:
        """Is anything of ours still to be reaped (the daemon's stop waits for it)?"""
        return bool(self.dying or self.starting)
