"""The supervisor: prepares, clones the confined child, watches it, and turns what happened into
an outcome and an exit status.  Trusted, privileged when run as root; it parses nothing that the
message or the agent produced beyond fixed-size records (a setup-failure record from the child,
a seccomp notification from the kernel) and the wait status.

Life cycle of one run (all in one thread, which is required for clone()):
prepare (policy -> plan, uid lease, compiled filter, cgroup, pipes) -> clone -> watch (pidfd,
status socket, seccomp listener, output pipes, deadline, CPU used) -> reap -> cgroup removed,
uid released -> classify -> report.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from compartment import cgroups, paths, rootfs, syscall_filter, syscalls, uidpool
from compartment.confine import Plan, filesystem, namespaces, rlimits, scope, start
from compartment.policy import Policy
from compartment.watch import Watch

if TYPE_CHECKING:
    from compartment.learn.listener import Learner


class ConfigError(Exception):
    """The run cannot start as configured: nothing is executed, the message is kept."""


@dataclass
class Prepared:
    plan: Plan
    compiled: syscall_filter.CompiledFilter
    lease: uidpool.Lease | None
    stdin_fd: int
    stdin_offset: int | None  # None when stdin is not a regular file
    opened: dict[str, int]  # the named paths and the program, open until the child has them
    trees: list[int]  # their detached mounts (root), as long
    cgroup: cgroups.Cgroup | None = None  # None: limits.enforcement is rlimits

    def close_paths(self) -> None:
        close_all(self.opened, self.trees)

    def release(self) -> None:
        """Once the compartment's init is reaped: its cgroup goes, then its uid.  Idempotent.
        If the cgroup still held processes after SIGKILL (something escaped the pid
        namespace) this raises, and the uid stays leased, dirty, never reused as clean."""
        cgroup, lease = self.cgroup, self.lease
        self.cgroup = self.lease = None
        if cgroup:
            cgroup.retire()
        if lease:
            lease.release()


# Opens the program (argv[0], the search path) and the paths a policy names: (program, path ->
# descriptor).  The default opens them as this process may; the resident supervisor's opens
# those a peer named as that peer may (compartment.authorize).
Opener = Callable[[str, str, Policy], tuple[str, dict[str, int]]]


def prepare(argv: Sequence[str], policy: Policy, fds: tuple[int, int, int],
            env: Mapping[str, str] | None, opener: Opener | None = None) -> Prepared:
    """Parent side, before clone: everything the child needs, checked here where errors are
    cheap and precise."""
    stdin_offset, agent_env, search = _request(argv, policy, fds, env)
    program, opened = (opener or _open_paths)(argv[0], search, policy)
    prepared = _compartment(policy, program, opened)
    prepared.plan = replace(prepared.plan, argv=tuple(argv), env=agent_env)
    prepared.stdin_fd, prepared.stdin_offset = fds[0], stdin_offset
    return prepared


def prepare_ahead(policy: Policy) -> Prepared:
    """The resident supervisor's compartment prepared before its request: what no request
    changes (the policy's named paths, the root without the program, the filter, a pool uid
    leased for it), in a plan that waits for the request's part (confine.commit)."""
    return _compartment(policy, None, open_named(policy), commit=True)


class NotShown(ConfigError):
    """A compartment prepared ahead shows only the system's directories and the policy's
    paths: a program elsewhere needs a root of its own (prepare)."""


def commit_request(ahead: Prepared, argv: Sequence[str], policy: Policy,
                   fds: tuple[int, int, int], env: Mapping[str, str] | None,
                   opener: Opener | None = None) -> Prepared:
    """The request's part of a compartment prepared ahead, as prepare makes it: stdin, the
    environment, the program opened by `opener` (and run by its path in a root of root's own
    directories, which must show it)."""
    stdin_offset, agent_env, search = _request(argv, policy, fds, env)
    bare = replace(policy, filesystem=replace(policy.filesystem, readable=(), writable=()))
    program, opened = (opener or _open_paths)(argv[0], search, bare)
    try:
        if not ahead.plan.filesystem.shows(program):
            raise NotShown(f"program {program}: not in the prepared root")
        _check_interpreter(program, opened[program], ahead.plan.filesystem)
    finally:
        close_all(opened)
    plan = replace(ahead.plan, program=program, argv=tuple(argv), env=agent_env)
    return replace(ahead, plan=plan, stdin_fd=fds[0], stdin_offset=stdin_offset)


def _request(argv: Sequence[str], policy: Policy, fds: tuple[int, int, int],
             env: Mapping[str, str] | None) -> tuple[int | None, dict[str, str], str]:
    """What the request brings: stdin's offset, the agent's environment, its search path."""
    if not argv:
        raise ConfigError("no program given")
    stdin_offset = _stdin_offset(fds[0])
    agent_env = dict(policy.environment.set)
    source_env = os.environ if env is None else env
    agent_env.update((name, source_env[name]) for name in policy.environment.pass_
                     if name in source_env)
    for fd in policy.descriptors.pass_:
        _require_open(fd, f"descriptors.pass: descriptor {fd}")
    return stdin_offset, agent_env, agent_env.get("PATH", "/usr/bin:/bin")


def _compartment(policy: Policy, program: str | None, opened: dict[str, int],
                 commit: bool = False) -> Prepared:
    """What the policy (and the program, when known) decide: the root, the filter, the ids.
    Takes `opened` over: closed here on failure, by the caller after the clone otherwise."""
    unprivileged = os.geteuid() != 0
    try:
        use_cgroup = uses_cgroup(policy.limits.enforcement, unprivileged)
    except ConfigError:
        close_all(opened)
        raise
    last_cap, rlimit_plan = syscalls.cap_last_cap(), rlimits.plan(policy.limits, use_cgroup)
    trees: list[int] = []
    try:
        fs = rootfs.plan(policy.filesystem, program, opened)
        if program:
            _check_interpreter(program, opened[program], fs)
        if not unprivileged:
            fs, trees = filesystem.prepare(fs)
        compiled = syscall_filter.compile_filter(policy.seccomp, policy.network)
        uid, gid, lease = _identity(policy, unprivileged, opened)  # last: nothing below fails
    except (rootfs.PlanError, syscall_filter.FilterError, uidpool.PoolExhausted) as err:
        close_all(opened, trees)
        raise ConfigError(str(err)) from None
    except BaseException:
        close_all(opened, trees)
        raise
    network = _network(policy, unprivileged)
    try:
        cgroup = _cgroup(policy, lease) if use_cgroup else None
    except ConfigError:
        close_all(opened, trees)
        raise
    plan = Plan(unprivileged=unprivileged, cgroup_procs=cgroup.procs_fds if cgroup else (),
                cgroup_fd=cgroup.clone_fd if cgroup else -1,
                hostname=f"compartment-{os.urandom(4).hex()}.invalid", network=network,
                uid=uid, gid=gid, filesystem=fs, last_cap=last_cap, rlimits=rlimit_plan,
                seccomp=compiled.prepared, handed=(), program=program or "", argv=(), env={},
                commit=commit)
    return Prepared(plan, compiled, lease, -1, None, opened, trees, cgroup)


def open_named(policy: Policy, for_run: bool = False) -> dict[str, int]:
    """An O_PATH descriptor of every path the policy names, resolved once (compartment.paths);
    the plan takes the type, the owner and the mount from these.  Only `for_run` makes a
    missing Maildir (filesystem.create_maildir): `check` and `learn` change nothing."""
    opened: dict[str, int] = {}
    trusted = paths.trusted_owners()
    try:
        for kind in ("readable", "writable"):
            for path in getattr(policy.filesystem, kind):
                try:
                    opened[path] = paths.open_path(path, trusted=trusted)
                except paths.PathError as err:
                    missing = err.errno == errno.ENOENT and kind == "writable"
                    if not (missing and for_run and policy.filesystem.create_maildir):
                        raise ConfigError(f"filesystem.{kind}: {err}") from None
                    opened[path] = _made_maildir(path, trusted)
    except BaseException:
        close_all(opened)
        raise
    return opened


def _made_maildir(path: str, trusted: Collection[int]) -> int:
    """filesystem.create_maildir: the missing `path` made as a Maildir by the owner of its
    parent (compartment.maildir), from the parent's descriptor; then opened like any other."""
    from compartment import maildir  # only when a Maildir is missing

    parent_path, name = os.path.split(path)
    try:
        parent = paths.open_path(parent_path, trusted=trusted)
    except paths.PathError as err:
        raise ConfigError(f"filesystem.writable: {err}") from None
    try:
        maildir.create(parent, name, path)
        return paths.open_path(path, trusted=trusted)
    except (maildir.MaildirError, paths.PathError) as err:
        raise ConfigError(f"filesystem.create_maildir: {err}") from None
    finally:
        os.close(parent)


def describe_root(policy: Policy, program: str | None = None) -> rootfs.Plan:
    """The root a run would get, for the tools that show or reason about it (check, learn):
    every named path opened as a run opens it, then closed again (the plan keeps no
    descriptor)."""
    opened = open_named(policy)
    try:
        if program and program not in opened:
            try:
                opened[program] = paths.open_path(program, trusted=paths.trusted_owners())
            except paths.PathError as err:
                raise ConfigError(f"program {err}") from None
        fs = rootfs.plan(policy.filesystem, program, opened)
    finally:
        close_all(opened)
    return replace(fs, entries=tuple(replace(e, fd=-1) for e in fs.entries))


def close_all(opened: dict[str, int], trees: list[int] | None = None) -> None:
    """Close the descriptors of named paths (and their detached mounts); empties both."""
    for fd in [*opened.values(), *(trees or ())]:
        os.close(fd)
    opened.clear()
    if trees:
        trees.clear()


def _open_paths(name: str, search: str, policy: Policy) -> tuple[str, dict[str, int]]:
    """The program and every named path, each opened once: (program, path -> descriptor)."""
    opened = open_named(policy, for_run=True)
    try:
        program, program_fd = resolve(name, search)
    except BaseException:
        close_all(opened)
        raise
    if program in opened:  # the program is itself a named path: one descriptor is enough
        os.close(program_fd)
    else:
        opened[program] = program_fd
    return program, opened


def spawn(plan: Plan) -> tuple[int, socket.socket]:
    """Clone the child into its namespaces; returns its pid and our end of the status socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        pid = start(plan, theirs)
    except OSError as err:
        ours.close()
        if plan.unprivileged:
            raise ConfigError(f"cannot create a user namespace ({err.strerror}); user "
                              "namespaces may be disabled (user.max_user_namespaces) — "
                              "refusing to run unconfined") from None
        raise
    finally:
        theirs.close()
    return pid, ours


def supervise(argv: Sequence[str], policy: Policy, fds: tuple[int, int, int],
              env: Mapping[str, str] | None,
              learner: Learner | None = None) -> tuple[Watch, Prepared]:
    """One run; `learner` is `compartment learn`'s (its filter, its notification handler),
    None on every delivery path."""
    prepared = prepare(argv, policy, fds, env)
    if learner is not None:
        prepared.plan = replace(prepared.plan, seccomp=learner.compiled.prepared)
    try:
        watch = Watch(policy.limits, fds, prepared.compiled.names,
                      learner.notified if learner is not None else None, prepared.cgroup)
        try:
            handed = [(0, fds[0]), *watch.agent_ends(),
                      *((fd, fd) for fd in policy.descriptors.pass_)]
            try:
                pid, status = spawn(replace(prepared.plan, handed=tuple(handed)))
            finally:
                prepared.close_paths()  # the child has its copies, or there is no child
            watch.start(pid, status)
            watch.run()
        finally:
            watch.close()
    finally:
        # After close(): the init has been reaped, so nothing of the compartment is left.
        prepared.release()
    return watch, prepared


def _network(policy: Policy, unprivileged: bool) -> int | None:
    """The shared network namespace when sharing keeps compartments apart (namespaces.py)."""
    if unprivileged or policy.filesystem.proc or syscalls.landlock_abi() < scope.MIN_ABI:
        return None
    return namespaces.shared_network()


def uses_cgroup(enforcement: str, unprivileged: bool) -> bool:
    """Whether limits.enforcement asks for a cgroup for this caller."""
    if enforcement == "cgroup" and unprivileged:
        raise ConfigError('limits.enforcement = "cgroup": only root can make cgroups; '
                          'unprivileged runs use "rlimits" (or "auto")')
    return enforcement == "cgroup" or (enforcement == "auto" and not unprivileged)


def _cgroup(policy: Policy, lease: uidpool.Lease | None) -> cgroups.Cgroup:
    """Made last in the preparation: nothing after it can fail before it is released."""
    try:
        return cgroups.create(policy.limits)
    except (cgroups.Unavailable, OSError) as err:
        if lease:
            lease.release()  # nothing ran as that uid
        enforcement = policy.limits.enforcement
        raise ConfigError(f'limits.enforcement = "{enforcement}": no usable cgroup: {err}'
                          + ('; the weaker "rlimits" mode needs no cgroup'
                             if enforcement == "auto" else "")) from None


def _identity(policy: Policy, unprivileged: bool,
              opened: dict[str, int]) -> tuple[int, int, uidpool.Lease | None]:
    if unprivileged:
        return os.getuid(), os.getgid(), None  # kept, mapped into the user namespace
    ident = policy.identity
    if ident.uid == "pool":
        lease = uidpool.lease(*ident.uid_pool)
        return lease.uid, lease.uid, lease
    if ident.uid == "owner":
        # The owner of what will be mounted, from the descriptor that will be mounted.
        mailbox = policy.filesystem.writable[0]
        info = os.fstat(opened[mailbox])
        if info.st_uid == 0:
            raise ConfigError(f"identity.uid = \"owner\": {mailbox} is owned by root; "
                              "refusing to run the agent as root")
        return info.st_uid, info.st_gid, None
    return int(ident.uid), int(ident.gid), None


def resolve(name: str, search: str, trusted: Collection[int] | None = None) -> tuple[str, int]:
    """The program's path and an O_PATH descriptor of it, opened once (compartment.paths),
    following only links `trusted` uids own (default: paths.trusted_owners()).  A name without
    a slash is looked for on the policy's PATH, the system's own directories."""
    found = name if "/" in name else next(
        (os.path.join(d, name) for d in search.split(":")
         if os.access(os.path.join(d, name), os.X_OK)), None)
    if not found or not os.path.isabs(found):
        raise ConfigError(f"program {name}: not found (give an absolute path, or a name on "
                          f"the policy's PATH {search})")
    program = os.path.normpath(found)
    try:
        fd = paths.open_path(program, trusted=paths.trusted_owners() if trusted is None
                             else trusted)
    except paths.PathError as err:
        raise ConfigError(f"program {err}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o111:
        os.close(fd)
        raise ConfigError(f"program {program}: not an executable file")
    return program, fd


def _check_interpreter(program: str, program_fd: int, fs: rootfs.Plan) -> None:
    """A script's #! interpreter must exist in the new root, or exec fails with a misleading
    ENOENT that names the script."""
    try:
        readable = paths.reopen(program_fd, os.O_RDONLY)
    except OSError:
        return  # execute-only: exec will tell
    with open(readable, "rb") as file:
        head = file.read(256)
    if not head.startswith(b"#!"):
        return
    words = head[2:].split(b"\n", 1)[0].split()
    interpreter = words[0].decode(errors="replace") if words else ""
    if not interpreter.startswith("/") or not os.path.exists(interpreter):
        raise ConfigError(f"program {program}: its #! interpreter {interpreter!r} does not "
                          "exist")
    if not fs.shows(interpreter):
        raise ConfigError(f"program {program}: its #! interpreter {interpreter} is not inside "
                          "the compartment (an empty root shows only static programs)")


def _stdin_offset(fd: int) -> int | None:
    info = _require_open(fd, "stdin")
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError("stdin is a directory, not a message")
    return os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(info.st_mode) else None


def _require_open(fd: int, what: str) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as err:
        raise ConfigError(f"{what}: {err.strerror}") from None

