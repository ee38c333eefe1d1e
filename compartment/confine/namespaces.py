"""Namespaces: mount, pid, network, ipc, uts, and a user namespace when the caller is not root.

Parent side: `clone_flags` chooses them; the clone itself is in the supervisor.  Child side
(`enter`), just cloned, privileged (root, or every capability inside its own new user namespace):
map the caller's own ids into the user namespace, or join the shared network namespace.  The
network namespace holds only a loopback interface that is down, so no address is reachable;
pid 1 of the new pid namespace is the init, and when it dies the kernel kills everything else in
the namespace.

A new network namespace costs about a third of a millisecond to make and more to destroy, and
the kernel serialises both, so a root supervisor makes one, once, and every compartment joins
it.  What compartments could share through it: no interface is up and seccomp refuses every
socket family but AF_UNIX, so only the abstract AF_UNIX names are common to them; the scope step
(Landlock) refuses connecting or sending to an abstract socket made outside the compartment,
and without Landlock scopes, or with a /proc (whose net/unix lists the names), a compartment
gets a network namespace of its own as before.  Left between them: seeing that a name is taken
when binding it, a covert channel between two compromised compartments no wider than their CPU
load, which no namespace closes either.
"""

from __future__ import annotations

import os

from compartment import syscalls
from compartment.confine.errors import fail

STEP = "namespaces"
# A prison (compartment.isolate) gets only a pid namespace at its clone: the rest is its
# zygote's (`zygote`), and its root is joined (filesystem.join_empty_root).
PRISON_CLONE_FLAGS = syscalls.CLONE_NEWPID
_shared: list[tuple[int, int]] = []  # the shared network namespace once made: (fd, inode)


def clone_flags(unprivileged: bool, own_network: bool) -> int:
    flags = (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWIPC
             | syscalls.CLONE_NEWUTS)
    flags |= syscalls.CLONE_NEWNET if own_network else 0
    return flags | syscalls.CLONE_NEWUSER if unprivileged else flags


def shared_network() -> int:
    """Parent side, root: a descriptor of the empty network namespace compartments join, one
    per supervisor process.  To make it, the supervisor steps into a new namespace just long
    enough to open it, then back: it is single-threaded (clone requires it), so nothing of its
    own runs there meanwhile."""
    if _shared and _still_open(*_shared[0]):
        return _shared[0][0]
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.unshare(syscalls.CLONE_NEWNET)
        try:
            made = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            syscalls.setns(own, syscalls.CLONE_NEWNET)
    finally:
        os.close(own)
    _shared[:] = [(made, os.fstat(made).st_ino)]
    return made


def _still_open(fd: int, inode: int) -> bool:
    """The caller may have closed our descriptor since (a daemon closing every descriptor),
    and the number may now be another file's."""
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


def enter(unprivileged: bool, uid: int, gid: int, hostname: str, network: int | None) -> None:
    if network is not None:
        try:
            syscalls.setns(network, syscalls.CLONE_NEWNET)
        except OSError as err:
            raise fail(STEP, "setns", err, "the shared network namespace") from None
    if unprivileged:
        _map_own_ids(uid, gid)
    # The host's name is none of the agent's business; each compartment gets a name of its
    # own, unique, because Maildir delivery names files time.pid.host and every agent's pid is 2,
    # and dotted (.invalid, RFC 2606), because programs resolve an undotted name through DNS.
    _set_hostname(hostname)


def zygote(unprivileged: bool, hostname: str) -> None:
    """The zygote of compartment.isolate, once at its start, for all its prisons: it moves
    itself into new network, ipc and uts namespaces (and a user namespace when unprivileged,
    where its children are privileged enough to take their steps), which every prison it clones
    inherits.  Made once because they hold nothing a prison could leave for the next: no
    interface is up, and no prison can call socket, SysV IPC or sethostname.  Each prison
    still gets a pid namespace of its own (PRISON_CLONE_FLAGS) and joins the empty root
    (filesystem.join_empty_root).  The zygote is single-threaded, which unshare requires."""
    uid, gid = os.getuid(), os.getgid()
    flags = syscalls.CLONE_NEWNET | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS
    try:
        syscalls.unshare(flags | (syscalls.CLONE_NEWUSER if unprivileged else 0))
    except OSError as err:
        hint = " (user namespaces disabled? user.max_user_namespaces; no unconfined run " \
            "instead)" if unprivileged else ""
        raise fail(STEP, "unshare", err, "the zygote's namespaces" + hint) from None
    if unprivileged:
        _map_own_ids(uid, gid)
    _set_hostname(hostname)


def _map_own_ids(uid: int, gid: int) -> None:
    # One line each, our own ids: the only mapping an unprivileged process may write, and
    # gid_map needs setgroups denied first (user_namespaces(7)).
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def _set_hostname(hostname: str) -> None:
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
