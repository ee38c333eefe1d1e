"""cgroup: the child joins the cgroup v1 hierarchies the supervisor made its compartment's in.

Child side, just cloned, root in the initial user namespace: moving a process into a cgroup is a
write that needs it, so this comes before the credentials change; and it comes first of all, so
that everything the compartment does from here on (every page, process and CPU cycle, the
confinement steps included) is charged to its own cgroup and bounded by its limits.  The
supervisor opened each v1 hierarchy's cgroup.procs for writing (compartment/cgroups.py); "0"
is the writer itself.  Each descriptor is closed once used: nothing after this step holds one.
On cgroup v2 the clone put the child in its cgroup already (CLONE_INTO_CGROUP).  No descriptors
(unprivileged, limits.enforcement = "rlimits", or v2 alone): nothing to do here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from compartment.confine.errors import fail

STEP = "cgroup"


def enter(procs_fds: Sequence[int]) -> None:
    for fd in procs_fds:
        try:
            os.write(fd, b"0")
        except OSError as err:
            raise fail(STEP, "write", err, f"cgroup.procs (descriptor {fd})") from None
        os.close(fd)
