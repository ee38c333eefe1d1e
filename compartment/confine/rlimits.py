"""Resource limits: CPU, address space, file size, descriptors, processes, no core dumps.

Child side, unprivileged (lowering a limit needs no privilege).  Three of them are set by the
agent itself between fork and exec (`enter_late`), then every limit is read back: RLIMIT_NOFILE
(the seccomp listener is a new descriptor), RLIMIT_AS (the interpreter still allocates, and the
init must not run short) and RLIMIT_NPROC (the fork of the agent would count against it).
RLIMIT_NPROC counts per uid and user namespace: with a pool uid or a new user namespace it bounds
this compartment alone, its init included, which the limit allows for.
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


def plan(limits: Limits) -> Rlimits:
    # The CPU soft limit sends SIGXCPU, which an agent may catch; the hard limit one second
    # later kills it for good.
    return ((resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
            # The init has the agent's uid and counts as one of its processes.
            (resource.RLIMIT_NPROC, limits.processes + 1, limits.processes + 1),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
            (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))


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
