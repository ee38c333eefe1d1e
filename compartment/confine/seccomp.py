"""seccomp, child side: load the filter the supervisor compiled, last of the security steps.

Child side, unprivileged, no_new_privs set: one seccomp(2) call with the BPF program laid out in
memory before clone.  It comes last so that the filter need not allow any of the setup; it
returns the user-notification listener, which the descriptors step hands to the supervisor.
The program itself is built from the policy by compartment.syscall_filter.
"""

from __future__ import annotations

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "seccomp"


def enter(prepared: syscalls.PreparedFilter) -> int:
    """Child side, unprivileged, no_new_privs set: install the filter, return the listener."""
    try:
        return prepared.install()
    except OSError as err:
        raise fail(STEP, "seccomp", err, "SECCOMP_SET_MODE_FILTER") from None
