"""scope, child side: a Landlock domain of the compartment's own for abstract sockets.

Compartments of a root supervisor share one empty network namespace (see namespaces.py), whose
abstract AF_UNIX names are common to them.  LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET refuses
connect() and sendto() to an abstract socket made by a process outside this domain (EPERM), so
a compartment reaches only its own.  The domain is inherited across fork and exec and cannot be
left.  Child side, after no_new_privs (which Landlock requires of an unprivileged thread) and
before seccomp (whose filter then need not allow the two calls).  Only when the network
namespace is shared: one of the compartment's own needs no scope.
"""

from __future__ import annotations

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "scope"
MIN_ABI = 6  # the first Landlock ABI with scopes (Linux 6.12)


def enter(shared_network: bool) -> None:
    if not shared_network:
        return
    try:
        syscalls.landlock_scope(syscalls.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET)
    except OSError as err:
        raise fail(STEP, "landlock", err, "LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET") from None
