"""Confinement: the child-side steps, in one fixed order, each fatal on failure.

`enter` is the whole story of the child, from the clone() that made it in new namespaces to the
execve() of the agent.  The first process takes every step itself, then forks the agent, which
inherits all of it; the first process stays behind as the compartment's init (init.py).  The
order, and why:

1. cgroup        the compartment's cgroup v1 hierarchies joined (root, limits.enforcement not
                 "rlimits"; on v2 the clone put it there): first, before anything allocates,
                 forks or runs, so all of it is counted; it needs root, so before credentials.
2. namespaces    the shared network namespace joined (root) or user-namespace id maps
                 (unprivileged), hostname: everything below happens inside them.
3. filesystem    mounts and pivot_root need CAP_SYS_ADMIN, so they come before the ids change.
4. capabilities  bounding set emptied, securebits locked: needs CAP_SETPCAP, also before the
   (restrict)    ids change.
5. credentials   groups, gid, uid, read back; the uid change clears the capability sets.
6. capabilities  every set cleared and verified empty.
   (drop_all)
7. rlimits       CPU, file size, core: lowering needs no privilege.
8. session       setsid, signal dispositions reset, every signal blocked (for the init),
                 parent-death signal (after the uid change, which clears it), not dumpable.
9. no_new_privs  required by seccomp for an unprivileged process, and keeps setuid binaries inert.
10. scope        a Landlock domain that keeps abstract sockets to the compartment, when the
                 network namespace is shared: needs no_new_privs.
   (commit)      a compartment the resident supervisor prepared ahead waits here for its
                 request's part: the descriptors, program, argv and environment (commit.py).
                 Everything above depends on the policy alone; everything below on the request.
11. descriptors  0/1/2 and extras placed, the rest close on exec.
12. init         fork: pid 1 stays behind, closes every descriptor but the status socket and
                 only waits; the agent is pid 2, an ordinary process: its own session, no
                 signal blocked.
13. seccomp      in the agent alone, after the fork (a policy may refuse fork), last security
                 step so the filter need not allow any of the above; the listener goes to the
                 supervisor.
14. rlimits      descriptors, address space and processes, which would have starved the setup or
   (late)        the init, or counted it; then every limit read back.
15. exec         the program, by path, with the policy's environment; argv is a list, no shell.

Everything before the fork is done once, in the process that is already a copy of the
supervisor, and the agent runs a few calls of Python between fork and exec, so that few of the
supervisor's pages are copied twice.

A failing step raises SetupError; `run_child` sends it to the supervisor as one fixed-size record
on the status socket and exits 127.  Nothing here returns into the supervisor's code.

The prison (`enter_prison`, compartment.isolate): the same steps for a function run in the
child's own interpreter, cloned from a zygote (compartment/zygote.py) instead of exec'd, and
cloned ahead of its request: it takes every step that does not depend on the request, then
waits for its input.  Its order, with what differs from the above:

1. namespaces    only a pid namespace is new at the clone; network, ipc, uts (and the user
                 namespace, unprivileged) are the zygote's, made once at its start.
2. descriptors   moved first, and closed rather than close-on-exec (there is no exec): the
                 zygote's own descriptors (its connection to the caller) leave at once, and
                 the status socket is at its fixed number for every failure report.  0 /dev/null
                 until the input comes, 1 output, 2 result record, 3 status socket, 4 the
                 empty root (until step 3).
3. filesystem    join the empty read-only root the zygote made once (no /tmp, no /dev), rather
                 than build one: a setns instead of a mount tree.
-  capabilities  inherited: the zygote emptied its bounding set and locked securebits once at
   (restrict)    its start (they bind only what an exec could gain; the zygote never execs).
4-8.             credentials, capabilities (drop_all: verifies the bounding set too), rlimits,
                 session, no_new_privs: as above.  rlimits: RLIMIT_FSIZE is 0.
-  scope         none: the network namespace is not shared and no socket call is allowed.
-  init          none: the prison never forks, and is pid 1 of its namespace (a signal it sends
                 itself is refused by the filter before the kernel could ignore it).
9. input         the request: the input descriptor arrives on the status socket, put at 0.
10. seccomp      the prison's allow-list (syscall_filter.PRISON), not the policy's filter.
11. rlimits      RLIMIT_NOFILE 3 (the descriptors it holds), RLIMIT_NPROC 0, RLIMIT_AS; then
   (late)        the status socket is closed.
-  exec          none: enter_prison returns, and the zygote's code runs the function.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import prctl

from compartment import rootfs, syscalls
from compartment.confine import (
    capabilities,
    cgroup,
    commit,
    credentials,
    descriptors,
    filesystem,
    init,
    namespaces,
    rlimits,
    scope,
    seccomp,
    session,
)
from compartment.confine.errors import SetupError, fail

CHILD_FAILED = 127
# The prison's descriptors, fixed so that its filter can name them (syscall_filter.PRISON).
PRISON_INPUT, PRISON_OUTPUT, PRISON_RECORD, PRISON_STATUS, PRISON_ROOT = range(5)
PRISON_HELD = 3  # input, output and record: all it holds once the setup is over


@dataclass(frozen=True)
class Plan:
    """Everything the child needs, computed by the supervisor before clone."""

    unprivileged: bool
    cgroup_procs: Sequence[int]  # the compartment's v1 cgroup.procs, open for writing, or ()
    cgroup_fd: int  # its v2 cgroup directory, which the clone puts the child in, or -1
    hostname: str
    network: int | None  # the shared network namespace, or None for one of its own
    uid: int
    gid: int
    filesystem: rootfs.Plan
    last_cap: int
    rlimits: rlimits.Rlimits
    seccomp: syscalls.PreparedFilter
    handed: Sequence[tuple[int, int]]  # (target fd in the agent, source fd in the supervisor)
    program: str
    argv: Sequence[str]
    env: dict[str, str]
    commit: bool = False  # prepared ahead: handed, program, argv and env come on `status`


def enter(plan: Plan, status: socket.socket) -> None:
    """Child, just cloned into new namespaces, privileged there; returns only by raising."""
    cgroup.enter(plan.cgroup_procs)
    namespaces.enter(plan.unprivileged, plan.uid, plan.gid, plan.hostname, plan.network)
    filesystem.enter(plan.filesystem)
    capabilities.restrict(plan.last_cap)
    credentials.enter(plan.uid, plan.gid, change=not plan.unprivileged)
    capabilities.drop_all(plan.last_cap)
    rlimits.enter(plan.rlimits)
    session.enter(status)
    _no_new_privs()
    scope.enter(plan.network is not None)
    if plan.commit:
        plan = commit.receive(plan, status)
    descriptors.enter(plan.handed)
    agent = syscalls.clone(0)
    if agent:
        init.run(agent, status)
    session.agent()
    seccomp.enter(plan.seccomp, status)
    rlimits.enter_late(plan.rlimits)
    try:
        os.execve(plan.program, list(plan.argv), plan.env)
    except OSError as err:
        # ENOENT for a program that is there: its loader (or a script's interpreter) is not.
        hint = " (is it dynamically linked, its loader not in this root?)" \
            if err.errno == errno.ENOENT else ""
        raise fail("exec", "execve", err, plan.program + hint) from None


def start(plan: Plan, status: socket.socket, flags: int = 0) -> int:
    """Parent side: clone the child into its namespaces (and `flags`); it confines itself and
    execs, reporting on `status`.  Returns its pid.  The caller must be single-threaded."""
    # No garbage collection may run a finaliser between clone and exec in the child.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        own_network = plan.network is None
        flags |= namespaces.clone_flags(plan.unprivileged, own_network)
        # On cgroup v2 the child is born in its compartment's cgroup (cgroups.py).
        pid = syscalls.clone_into_cgroup(flags, plan.cgroup_fd) if plan.cgroup_fd >= 0 \
            else syscalls.clone(flags)
        if pid == 0:
            run_child(plan, status)  # never returns
    finally:
        if gc_was_enabled:
            gc.enable()
    return pid


def run_child(plan: Plan, status: socket.socket) -> None:
    """The child's outermost frame: report any failure, never return to the caller's code."""
    try:
        enter(plan, status)
        raise SetupError("exec", "execve", 0, "returned")
    except SetupError as err:
        record = err.pack()
    except BaseException as err:  # noqa: BLE001 - anything else is an internal error, reported
        record = SetupError("internal", type(err).__name__, 0, str(err)).pack()
    try:
        status.send(record)
    finally:
        os._exit(CHILD_FAILED)


@dataclass(frozen=True)
class PrisonPlan:
    """Everything a prison needs, prepared by its zygote before the clone."""

    unprivileged: bool
    uid: int
    gid: int
    last_cap: int
    rlimits: rlimits.Rlimits
    seccomp: syscalls.PreparedFilter
    handed: Sequence[tuple[int, int]]  # (PRISON_INPUT, fd) ... (PRISON_ROOT, fd), in order


def enter_prison(plan: PrisonPlan) -> None:
    """Child of the zygote, just cloned into a pid namespace of its own, privileged (root, or
    in the zygote's user namespace); returns confined with its input, the function not yet
    run.  A failing step is reported to the zygote on the status socket, and the child exits."""
    try:
        descriptors.keep_only(plan.handed)
    except SetupError:
        os._exit(CHILD_FAILED)  # the status socket may not be at its number: say nothing
    status = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, PRISON_STATUS)
    try:
        filesystem.join_empty_root(PRISON_ROOT)
        os.close(PRISON_ROOT)
        credentials.enter(plan.uid, plan.gid, change=not plan.unprivileged)
        capabilities.drop_all(plan.last_cap)
        rlimits.enter(plan.rlimits)
        session.enter(status)
        _no_new_privs()
        descriptors.receive(status, PRISON_INPUT)  # the request: everything above was ahead
        seccomp.enter(plan.seccomp, status)
        rlimits.enter_late(plan.rlimits)
    except SetupError as err:
        record = err.pack()
    except BaseException as err:  # noqa: BLE001 - anything else is an internal error, reported
        record = SetupError("internal", type(err).__name__, 0, str(err)).pack()
    else:
        status.close()
        return
    try:
        status.sendmsg([record])  # sendmsg: what the prison's filter allows on this socket
    finally:
        os._exit(CHILD_FAILED)


def _no_new_privs() -> None:
    try:
        prctl.set_no_new_privs(1)
    except OSError as err:
        raise fail("no_new_privs", "prctl", err) from None
    if prctl.get_no_new_privs() != 1:
        raise SetupError("no_new_privs", "prctl", 0, "not set after PR_SET_NO_NEW_PRIVS")
