"""The uid pool: one dedicated uid per live compartment, as root.

Supervisor side, root.  Each uid of the pool has a lock file under /run/compartment/uids; a lease
is an exclusive flock on it, held by the supervisor for the life of the compartment and dropped
by the kernel if the supervisor dies, so no two live compartments share a uid.  The file holds
one byte while leased: a lease that finds it left behind (a supervisor that died before
cleaning up) first kills every process of that uid from a helper running as that uid, as qmail's
security paper advises (kill(-1) as the uid), before the uid is used again.  After a clean run
nothing of the uid can remain: its processes all lived in the compartment's pid namespace,
which the kernel empties before the namespace's first process is reaped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal

LEASE_DIR = "/run/compartment/uids"
_DIRTY = b"x"


class PoolExhausted(Exception):
    """Every uid of the pool is leased by a live compartment."""


class Lease:
    def __init__(self, uid: int, fd: int) -> None:
        self.uid, self._fd = uid, fd

    def release(self) -> None:
        """Called after the compartment's first process was reaped: the uid is clean."""
        os.ftruncate(self._fd, 0)
        os.close(self._fd)


def lease(first: int, last: int) -> Lease:
    if not os.path.isdir(LEASE_DIR):  # one stat per lease; makedirs would raise and catch
        os.makedirs(LEASE_DIR, mode=0o700, exist_ok=True)
    size = last - first + 1
    start = int.from_bytes(os.urandom(4), "little") % size  # spread concurrent callers
    for i in range(size):
        uid = first + (start + i) % size
        fd = os.open(f"{LEASE_DIR}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno != errno.EWOULDBLOCK:
                raise
            continue
        if os.pread(fd, 1, 0) == _DIRTY:
            _kill_all_of(uid)
        os.pwrite(fd, _DIRTY, 0)
        return Lease(uid, fd)
    raise PoolExhausted(f"uid pool {first}-{last}: all {size} uids are in use")


def _kill_all_of(uid: int) -> None:
    """kill(-1, SIGKILL) as `uid`: reaches exactly the processes that uid may signal."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            os._exit(0)  # nothing of that uid was left
        except BaseException:  # noqa: BLE001 - the child must never return into the caller
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"cannot clear uid {uid} of old processes")
