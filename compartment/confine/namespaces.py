"""Namespaces: mount, pid, network, ipc, uts, and a user namespace when the caller is not root.

Parent side: `clone_flags` chooses them; the clone itself is in the supervisor.  Child side
(`enter`), just cloned, privileged (root, or every capability inside its own new user namespace):
map the caller's own ids into the user namespace.  The new network namespace holds only a
loopback interface that is down, so no address is reachable; pid 1 of the new pid namespace is
the agent, and when it dies the kernel kills everything else in the namespace.
"""

from __future__ import annotations

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "namespaces"


def clone_flags(unprivileged: bool) -> int:
    flags = (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNET
             | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS)
    return flags | syscalls.CLONE_NEWUSER if unprivileged else flags


def enter(unprivileged: bool, uid: int, gid: int, hostname: str) -> None:
    if unprivileged:
        # One line each, our own ids: the only mapping an unprivileged process may write, and
        # gid_map needs setgroups denied first (user_namespaces(7)).
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/setgroups", "deny\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    # The host's name is none of the agent's business; each compartment gets a name of its
    # own, unique, because Maildir delivery names files time.pid.host and every agent's pid is 2,
    # and dotted (.invalid, RFC 2606), because programs resolve an undotted name through DNS.
    try:
        syscalls.sethostname(hostname)
    except OSError as err:
        raise fail(STEP, "sethostname", err) from None


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as file:
            file.write(text)
    except OSError as err:
        raise fail(STEP, "write", err, path) from None
