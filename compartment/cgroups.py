"""Cgroups: memory, processes and CPU bounded for the whole compartment, and counted honestly.

Supervisor side, root.  The life cycle of one compartment's cgroup:

    create   before clone: a directory in each hierarchy, named after this process, with the
             limits written (memory, no swap; pids), and what the child joins by opened
    join     so that the cgroup holds the child from its first instruction: on v2 the clone
             itself puts it there (clone3 CLONE_INTO_CGROUP, the directory's descriptor), on v1
             the child's first confinement step writes "0" (itself) to each cgroup.procs opened
             for it (compartment/confine/cgroup.py).  Moving a process between cgroups takes a
             lock whose writer waits for an RCU grace period when none has been taken lately
             (milliseconds on an idle machine); a child born in its cgroup moves nowhere.
    watch    cpu_seconds() while the agent runs (neither version has a CPU budget to set, so the
             watch reads the total and kills); usage() once the init is reaped: CPU, peak
             memory, OOM kills, all of the compartment's own tree
    remove   once the init is reaped: rmdir; what is still inside (nothing, normally: the pid
             namespace died with its init) is killed first — cgroup.kill on v2, on v1 each pid
             of the cgroup's own cgroup.procs, checked through a pidfd.  A process that runs
             several compartments makes the next one's cgroup ahead and removes finished ones
             in time it has to spare (make_spare), and the rest at exit (release)
    sweep    once per process, before the first create: cgroups that a supervisor which died
             left behind.  Names are compartment-NS-PID-START-N: the pid namespace, pid and
             start time (clock ticks after boot) of the process that made them.  A name of this
             pid namespace whose process is gone is stale; names of other pid namespaces, whose
             processes cannot be looked up from here, are left alone.

Where: below the supervisor's own cgroup in each hierarchy (/proc/self/cgroup, mount points from
/proc/self/mountinfo), never elsewhere.  cgroup v1 (memory, pids, cpuacct, each mounted on its
own or together) has no rule against a cgroup holding both processes and children.  cgroup v2
does: a cgroup holding processes cannot enable controllers for its children, so the supervisor
needs a cgroup of its own to divide.  On v2 the compartments' cgroups go
- below the root cgroup, when the supervisor is there (no systemd);
- below a cgroup that systemd delegated (Delegate=yes on the unit: the trusted.delegate or
  user.delegate attribute), after the supervisor moved itself into a leaf `supervisor/` of it;
  a supervisor started in that leaf (DelegateSubgroup=supervisor) uses its parent;
- nowhere else: a cgroup that is not delegated, or that holds other processes (an MTA's), is
  not ours to divide, and that is Unavailable, a configuration error naming the cgroup.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import signal
import time
from dataclasses import dataclass

from compartment.policy import Limits

MEMORY, PIDS, CPU = "memory", "pids", "cpuacct"  # CPU: cpuacct on v1, cpu.stat (core) on v2
WANTED = frozenset({MEMORY, PIDS, CPU})
LEAF = "supervisor"  # the delegated cgroup's leaf that holds the supervisor on v2
_PREFIX = "compartment-"
_REMOVE_WAIT_S = 2.0  # processes killed with SIGKILL are gone long before this
_SWEEP_WAIT_S = 0.1  # another supervisor's leftovers must not hold up this delivery


class Unavailable(Exception):
    """No cgroup can be made for the compartment here; the message says where and why."""


@dataclass(frozen=True)
class Hierarchy:
    version: int            # 1 or 2
    base: str               # the directory in which compartments' cgroups are made
    serves: frozenset[str]  # which of MEMORY, PIDS, CPU this hierarchy accounts and limits
    leaf: str = ""          # v2: the leaf the supervisor moves into before dividing `base`


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    peak_memory_bytes: int | None  # None where the kernel keeps no peak (v2 before Linux 5.19)
    oom_kills: int


class Cgroup:
    """One compartment's cgroup: a directory in each hierarchy."""

    def __init__(self, name: str, hierarchies: tuple[Hierarchy, ...]) -> None:
        self.name = name
        self.dirs = tuple((h, f"{h.base}/{name}") for h in hierarchies)
        self.procs_fds: tuple[int, ...] = ()  # v1: cgroup.procs, for the child to write "0" to
        self.clone_fd = -1  # v2: the directory, for clone3(CLONE_INTO_CGROUP)
        self.limited: tuple[int, int] | None = None  # (memory_bytes, processes) written
        self.oom_fd = -1  # v1: an eventfd the kernel signals when the cgroup runs out of memory

    def _dir(self, what: str) -> tuple[int, str] | None:
        return next(((h.version, d) for h, d in self.dirs if what in h.serves), None)

    def limit(self, limits: Limits) -> None:
        if self.limited == (limits.memory_bytes, limits.processes):
            return  # made ahead with these limits
        raising = self.limited is not None and self.limited[0] < limits.memory_bytes
        self.limited = (limits.memory_bytes, limits.processes)
        memory, pids = self._dir(MEMORY), self._dir(PIDS)
        if memory and memory[0] == 1:
            # memory + swap may never be set below memory alone: which goes first depends on
            # whether a spare's limit is raised or lowered
            swap = f"{memory[1]}/memory.memsw.limit_in_bytes"  # with swap accounting only
            if raising:
                _write_if_there(swap, limits.memory_bytes)
            _write(f"{memory[1]}/memory.limit_in_bytes", limits.memory_bytes)
            _write_if_there(swap, limits.memory_bytes)
        elif memory:
            _write(f"{memory[1]}/memory.max", limits.memory_bytes)
            _write_if_there(f"{memory[1]}/memory.swap.max", 0)
            _write(f"{memory[1]}/memory.oom.group", 1)  # an OOM kill takes the whole compartment
        if pids:
            # The init, and the agent's processes and threads, itself among them: 0 and 1 both
            # mean the agent alone.
            _write(f"{pids[1]}/pids.max", max(limits.processes, 1) + 1)

    def cpu_seconds(self) -> float:
        found = self._dir(CPU)
        if not found:
            return 0.0
        version, path = found
        if version == 1:
            return int(_read(f"{path}/cpuacct.usage")) / 1e9
        return _keyed(_read(f"{path}/cpu.stat"), "usage_usec") / 1e6

    def usage(self) -> Usage:
        """Once the compartment is over: the figures of its own tree, nothing of the supervisor's
        image that the child was cloned from (charged to the supervisor before the child joined)."""
        peak, oom_kills = None, 0
        found = self._dir(MEMORY)
        if found and found[0] == 1:
            peak = int(_read(f"{found[1]}/memory.max_usage_in_bytes"))
            oom_kills = _keyed(_read(f"{found[1]}/memory.oom_control"), "oom_kill")
        elif found:
            with contextlib.suppress(FileNotFoundError):
                peak = int(_read(f"{found[1]}/memory.peak"))
            oom_kills = _keyed(_read(f"{found[1]}/memory.events"), "oom_kill")
        return Usage(self.cpu_seconds(), peak, oom_kills)

    def close_fds(self) -> None:
        """Parent side, once the child is cloned (it has its own copies), and in remove()."""
        for fd in (*self.procs_fds, self.clone_fd):
            if fd >= 0:
                os.close(fd)
        self.procs_fds, self.clone_fd = (), -1

    def watch_oom(self) -> int:
        """v1, which has no memory.oom.group: an eventfd that becomes readable when the memory
        cgroup runs out, for the supervisor to kill the whole compartment then, as v2 does
        by itself (memory.oom.group); -1 on v2 or without a memory controller."""
        found = self._dir(MEMORY)
        if self.oom_fd < 0 and found and found[0] == 1:
            self.oom_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            control = os.open(f"{found[1]}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(f"{found[1]}/cgroup.event_control", f"{self.oom_fd} {control}")
            finally:
                os.close(control)
        return self.oom_fd

    def remove(self) -> None:
        """After the init is reaped: kill what is left, if anything, and remove every directory.
        Raises OSError if processes survive SIGKILL, which would mean something escaped."""
        self.close_fds()
        if self.oom_fd >= 0:
            os.close(self.oom_fd)
            self.oom_fd = -1
        for _, path in self.dirs:
            _remove(path, _REMOVE_WAIT_S)

    def retire(self) -> None:
        """After the init is reaped, in place of remove(): in a process that runs several
        compartments an empty cgroup is removed later, in spare time (make_spare) or at exit.
        Whatever is left inside (nothing: the pid namespace died with its init) dies now."""
        if _own_state().made < 2 or not self._empty():
            self.remove()
            return
        self.close_fds()
        if self.oom_fd >= 0:
            os.close(self.oom_fd)
            self.oom_fd = -1
        _own_state().retired.append(self)

    def _empty(self) -> bool:
        """Every hierarchy holds the same processes: the child joined each, its own inherit."""
        version, path = self.dirs[0][0].version, self.dirs[0][1]
        if version == 2:
            return _keyed(_read(f"{path}/cgroup.events"), "populated") == 0
        return not _read(f"{path}/cgroup.procs").strip()


def create(limits: Limits) -> Cgroup:
    """A new cgroup for one compartment (made now, or ahead by make_spare()), limited, with
    what the child joins by opened."""
    hierarchies = layout()
    own = _own_state()
    cgroup = own.spares.pop() if own.spares else _make(hierarchies, own)
    own.made += 1
    try:
        cgroup.limit(limits)
        for hierarchy, path in cgroup.dirs:
            if hierarchy.version == 2:
                cgroup.clone_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                cgroup.procs_fds += (os.open(f"{path}/cgroup.procs",
                                             os.O_WRONLY | os.O_CLOEXEC),)
    except BaseException:
        cgroup.remove()
        raise
    return cgroup


def make_spare(limits: Limits) -> None:
    """Work done ahead, in time the caller has to spare (the supervisor calls it while a
    compartment runs): the cgroups of finished compartments removed, and the next one's made
    and limited, most likely as this one is (a memory cgroup costs a few hundred microseconds
    to make).  Only in a process that has made two already: one that runs a single compartment
    (the command) removes its own at once, and must not leave one made ahead behind."""
    own = _own_state()
    if own.made < 2:
        return
    while own.retired:
        own.retired.pop().remove()
    if own.spares:
        return
    try:
        spare = _make(layout(), own)
        own.spares.append(spare)
        spare.limit(limits)
    except (Unavailable, OSError):
        return  # create() makes one when it needs one, and says why it cannot
    if not own.release_at_exit:
        atexit.register(release)
        own.release_at_exit = True


def release() -> None:
    """Remove this process's spare and retired cgroups (at exit; a process killed leaves them
    to the next sweep)."""
    own = _state[0] if _state and _state[0].pid == os.getpid() else None
    while own and (own.spares or own.retired):
        (own.spares or own.retired).pop().remove()


def _make(hierarchies: tuple[Hierarchy, ...], own: _State) -> Cgroup:
    cgroup = Cgroup(f"{own.prefix}{next(own.counter)}", hierarchies)
    for hierarchy, path in cgroup.dirs:
        try:
            os.mkdir(path, 0o755)
        except OSError as err:
            cgroup.remove()
            raise Unavailable(f"cannot make a cgroup in {hierarchy.base}: "
                              f"{err.strerror}") from None
    return cgroup


def sweep(hierarchies: tuple[Hierarchy, ...]) -> int:
    """Remove the cgroups of supervisors that are gone, in every hierarchy (supervisors may
    share one and not another); returns how many directories were removed."""
    removed, own_namespace = 0, os.stat("/proc/self/ns/pid").st_ino
    for hierarchy in hierarchies:
        with os.scandir(hierarchy.base) as entries:
            names = [e.name for e in entries if e.name.startswith(_PREFIX)]
        for name in names:
            parts = name[len(_PREFIX):].split("-")
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                continue  # not a name of ours
            if int(parts[0]) != own_namespace or _start_time(int(parts[1])) == int(parts[2]):
                continue  # another pid namespace's, or its supervisor is alive
            try:
                _remove(f"{hierarchy.base}/{name}", _SWEEP_WAIT_S)
            except OSError:
                continue  # stuck (its processes in uninterruptible sleep): the next sweep
            removed += 1
    return removed


# --- where the hierarchies are ----------------------------------------------------------------

_layout: list[tuple[Hierarchy, ...]] = []  # found once per process, the v2 leaf entered then


def layout() -> tuple[Hierarchy, ...]:
    """The hierarchies this process makes compartments' cgroups in, found and made ready once
    (on v2 that may move this process into its leaf).  Raises Unavailable."""
    if not _layout:
        hierarchies = find()
        for hierarchy in hierarchies:
            if hierarchy.version == 2:
                _prepare_v2(hierarchy)
        _layout.append(hierarchies)
    return _layout[0]


def find() -> tuple[Hierarchy, ...]:
    """Where each of memory, pids and CPU accounting is, below this process's own cgroups; no
    change is made (`compartment check` calls this)."""
    own = _own_cgroups()
    v1: dict[str, Hierarchy] = {}
    unified = ""
    for mount_root, point, fstype, options in _cgroup_mounts():
        if fstype == "cgroup2":
            unified = unified or _below(point, mount_root, own.get("", ""))
            continue
        serves = WANTED & set(options.split(","))
        path = own.get(",".join(sorted(serves)), "") or next(
            (p for key, p in own.items() if serves and serves <= set(key.split(","))), "")
        base = _below(point, mount_root, path) if serves and path else ""
        if base:
            v1.setdefault(base, Hierarchy(1, base, frozenset(serves)))
    served = set().union(*(h.serves for h in v1.values()))
    missing = WANTED - served
    if not missing:
        return tuple(v1.values())
    if not unified:
        raise Unavailable(f"no cgroup hierarchy has the {', '.join(sorted(missing))} "
                          "controller (see /proc/cgroups)")
    return (*v1.values(), _find_v2(unified, frozenset(missing)))


def _find_v2(here: str, serves: frozenset[str]) -> Hierarchy:
    need = serves - {CPU}  # CPU time is in every v2 cgroup's cpu.stat
    release = tuple(int(n) for n in os.uname().release.split("-")[0].split(".")[:2])
    if release < (5, 7):
        raise Unavailable(f"cgroup v2 needs Linux 5.7 (clone3 CLONE_INTO_CGROUP), this is "
                          f"{os.uname().release}")
    parent = os.path.dirname(here)
    if _is_root(here):
        base, leaf = here, ""
    elif os.path.basename(here) == LEAF and _delegated(parent):
        base, leaf = parent, ""  # DelegateSubgroup=supervisor, or moved there already
    elif _delegated(here):
        base, leaf = here, f"{here}/{LEAF}"
    else:
        raise Unavailable(f"cgroup v2: {here} is not delegated to compartment, and the kernel "
                          "limits memory only below a cgroup that holds no process; run the "
                          "supervisor in a unit with Delegate=yes (compartment serve), or set "
                          'limits.enforcement = "rlimits"')
    missing = need - set(_read(f"{base}/cgroup.controllers").split())
    if missing:
        raise Unavailable(f"cgroup v2: {base} lacks the {', '.join(sorted(missing))} "
                          "controller (cgroup.controllers)")
    return Hierarchy(2, base, serves, leaf)


def _prepare_v2(hierarchy: Hierarchy) -> None:
    """Enable the controllers below `base`, first moving this process into the leaf if it is
    in `base` itself (no internal processes)."""
    base, leaf = hierarchy.base, hierarchy.leaf
    need = hierarchy.serves - {CPU}
    enabled = set(_read(f"{base}/cgroup.subtree_control").split())
    if need <= enabled and not leaf:
        return
    if leaf:
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o755)
        _write(f"{leaf}/cgroup.procs", os.getpid())
    try:
        if need - enabled:
            _write(f"{base}/cgroup.subtree_control", " ".join(f"+{c}" for c in need - enabled))
    except OSError as err:
        if leaf:
            _write(f"{base}/cgroup.procs", os.getpid())  # back where we were
        if err.errno == errno.EBUSY:
            raise Unavailable(f"cgroup v2: {base} holds other processes, so the kernel cannot "
                              "limit memory below it; give compartment a unit of its own with "
                              "Delegate=yes") from None
        raise Unavailable(f"cgroup v2: cannot enable controllers in {base}: "
                          f"{err.strerror}") from None


def _own_cgroups() -> dict[str, str]:
    """/proc/self/cgroup: controllers (sorted, comma-separated; "" for v2) -> own path."""
    own = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        own[",".join(sorted(controllers.split(","))) if controllers else ""] = path
    return own


def _cgroup_mounts() -> list[tuple[str, str, str, str]]:
    """(root within the hierarchy, mount point, fstype, super options) of cgroup mounts."""
    mounts = []
    for line in _read("/proc/self/mountinfo").splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _, options = (tail.split() + ["", "", ""])[:3]
        if fstype in ("cgroup", "cgroup2"):
            parts = fields.split()
            mounts.append((parts[3], parts[4], fstype, options))
    return mounts


def _below(point: str, mount_root: str, path: str) -> str:
    """The directory of `path` (a cgroup path) in a hierarchy mounted at `point`, whose root is
    `mount_root`; "" when the mount does not show it."""
    if not path or not (path + "/").startswith(mount_root.rstrip("/") + "/"):
        return ""
    tail = path[len(mount_root.rstrip("/")):]
    return os.path.normpath(point + tail)


def _is_root(path: str) -> bool:
    """The hierarchy's root cgroup, which may hold processes and still divide its resources."""
    return not os.path.exists(f"{path}/cgroup.type")


def _delegated(path: str) -> bool:
    for attribute in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, attribute) == b"1":
                return True
    return False


# --- names, liveness, the sweep -------------------------------------------------------------

class _State:
    """This process's own: its names, its spare and retired cgroups.  Made again in a forked
    child (the parent's are the parent's), after sweeping what dead supervisors left."""

    def __init__(self, pid: int) -> None:
        sweep(layout())
        self.pid = pid
        namespace = os.stat("/proc/self/ns/pid").st_ino
        self.prefix = f"{_PREFIX}{namespace}-{pid}-{_start_time(pid)}-"
        self.counter = itertools.count(1)
        self.spares: list[Cgroup] = []  # made ahead
        self.retired: list[Cgroup] = []  # empty, to remove in spare time
        self.made = 0
        self.release_at_exit = False


_state: list[_State] = []


def _own_state() -> _State:
    pid = os.getpid()
    if not _state or _state[0].pid != pid:
        _state[:] = [_State(pid)]
    return _state[0]


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, the process's start in clock ticks after boot: with the pid
    it names one process for the life of the machine.  None for no such process."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _remove(path: str, wait_s: float) -> None:
    """rmdir, killing what is inside until it is empty; OSError(EBUSY) after wait_s."""
    give_up = time.monotonic() + wait_s
    while not _rmdir(path):
        if time.monotonic() > give_up:
            raise OSError(errno.EBUSY, f"{path}: processes left after SIGKILL")
        _kill_members(path)
        time.sleep(0.001)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as err:
        if err.errno != errno.EBUSY:
            raise
        return False
    return True


def _kill_members(path: str) -> None:
    """SIGKILL to every process of this cgroup, and only to them."""
    with contextlib.suppress(FileNotFoundError):
        _write(f"{path}/cgroup.kill", 1)  # v2, Linux 5.14
        return
    procs = f"{path}/cgroup.procs"
    for pid in _read(procs).split():
        try:
            pidfd = os.pidfd_open(int(pid))
        except ProcessLookupError:
            continue
        try:
            # The pidfd names one process.  Its number still in the list means that process is
            # still a member (a number reused by a process outside would not be listed here).
            if pid in _read(procs).split():
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            continue  # gone meanwhile
        finally:
            os.close(pidfd)


# --- files ------------------------------------------------------------------------------------

def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _write(path: str, value: int | str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _write_if_there(path: str, value: int) -> None:
    """A file the kernel has only with an option (swap accounting)."""
    with contextlib.suppress(FileNotFoundError):
        _write(path, value)


def _keyed(text: str, key: str) -> int:
    """The value of `key` in a flat keyed file ("key value" per line); 0 when absent."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
