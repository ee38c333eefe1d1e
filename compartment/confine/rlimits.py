"""Resource limits: CPU, address space, file size, descriptors, processes, no core dumps.

Child side, unprivileged (lowering a limit needs no privilege).  Three of them are set by the
agent itself between fork and exec (`enter_late`), then every limit is read back: RLIMIT_NOFILE
(the seccomp listener is a new descriptor), RLIMIT_AS (the interpreter still allocates, and the
init must not run short) and RLIMIT_NPROC (the fork of the agent would count against it).
RLIMIT_NPROC counts per uid and user namespace: with a pool uid or a new user namespace it bounds
this compartment alone, its init included, which the limit allows for.

Under a cgroup (compartment/cgroups.py) the cgroup is the limit of the whole compartment, and
the rlimits of the same quantities are a second line, set looser so that the cgroup, which
counts exactly, acts first and the outcome names it: RLIMIT_AS (address space, per process) at
twice memory_bytes, RLIMIT_NPROC (per uid) at twice the cgroup's pids.max.  RLIMIT_CPU stays at
cpu_seconds: no process can use more than the compartment's total.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence

from compartment.confine.errors import SetupError, fail

TYPE_CHECKING = False  # the spawner imports this module, and must not import the loader
if TYPE_CHECKING:
    from compartment.policy import Limits

STEP = "rlimits"
_LATE = (resource.RLIMIT_NOFILE, resource.RLIMIT_AS, resource.RLIMIT_NPROC)

Rlimits = Sequence[tuple[int, int, int]]  # (resource, soft, hard)


def plan(limits: Limits, cgroup: bool) -> Rlimits:
    # The init has the agent's uid and counts as one of its processes.
    processes = 2 * (max(limits.processes, 1) + 1) if cgroup else limits.processes + 1
    memory = 2 * limits.memory_bytes if cgroup else limits.memory_bytes
    memory = memory if memory < 1 << 63 else resource.RLIM_INFINITY  # twice a huge limit
    # The CPU soft limit sends SIGXCPU, which an agent may catch; the hard limit one second
    # later kills it for good.
    return ((resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
            (resource.RLIMIT_NPROC, processes, processes),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
            (resource.RLIMIT_AS, memory, memory))


def prison(limits: Limits, held_fds: int) -> Rlimits:
    """compartment.isolate's prison: the policy's CPU time and address space; no file written
    (it has none to write), no process (it never forks, and has no init to count), and no
    descriptor beyond the `held_fds` it holds (descriptor numbers start at 0)."""
    return ((resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, 0, 0),
            (resource.RLIMIT_NPROC, 0, 0),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NOFILE, held_fds, held_fds),
            (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))


def enter(rlimits: Rlimits) -> None:
    _set([r for r in rlimits if r[0] not in _LATE])


def enter_late(rlimits: Rlimits) -> None:
    _set([r for r in rlimits if r[0] in _LATE])
    for which, soft, hard in rlimits:
        if resource.getrlimit(which) != (soft, hard):
            raise SetupError(STEP, "getrlimit", 0, f"resource {which} is "
                                                   f"{resource.getrlimit(which)}")


def _set(rlimits: Rlimits) -> None:
    for which, soft, hard in rlimits:
        try:
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as err:
            raise fail(STEP, "setrlimit", err if isinstance(err, OSError) else 0,
                       f"resource {which} to {soft}/{hard}") from None
