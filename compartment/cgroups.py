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

Where (compartment/cgroup_hierarchies.py): below the supervisor's own cgroup in each hierarchy,
never elsewhere.
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

from compartment.cgroup_hierarchies import (
    CPU,
    MEMORY,
    PIDS,
    Hierarchy,
    Unavailable,
    find,
    keyed,
    layout,
    read,
    write,
    write_if_there,
)
from compartment.policy import Limits

__all__ = ["CPU", "MEMORY", "PIDS", "Cgroup", "Hierarchy", "Unavailable", "Usage", "create",
           "find", "layout", "make_spare", "release", "sweep"]

_PREFIX = "compartment-"
_REMOVE_WAIT_S = 2.0  # processes killed with SIGKILL are gone long before this
_SWEEP_WAIT_S = 0.1  # another supervisor's leftovers must not hold up this delivery


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
                write_if_there(swap, limits.memory_bytes)
            write(f"{memory[1]}/memory.limit_in_bytes", limits.memory_bytes)
            write_if_there(swap, limits.memory_bytes)
        elif memory:
            write(f"{memory[1]}/memory.max", limits.memory_bytes)
            write_if_there(f"{memory[1]}/memory.swap.max", 0)
            write(f"{memory[1]}/memory.oom.group", 1)  # an OOM kill takes the whole compartment
        if pids:
            # The init, and the agent's processes and threads, itself among them: 0 and 1 both
            # mean the agent alone.
            write(f"{pids[1]}/pids.max", max(limits.processes, 1) + 1)

    def cpu_seconds(self) -> float:
        found = self._dir(CPU)
        if not found:
            return 0.0
        version, path = found
        if version == 1:
            return int(read(f"{path}/cpuacct.usage")) / 1e9
        return keyed(read(f"{path}/cpu.stat"), "usage_usec") / 1e6

    def usage(self) -> Usage:
        """Once the compartment is over: the figures of its own tree, nothing of the supervisor's
        image that the child was cloned from (charged to the supervisor before the child joined)."""
        peak, oom_kills = None, 0
        found = self._dir(MEMORY)
        if found and found[0] == 1:
            peak = int(read(f"{found[1]}/memory.max_usage_in_bytes"))
            oom_kills = keyed(read(f"{found[1]}/memory.oom_control"), "oom_kill")
        elif found:
            with contextlib.suppress(FileNotFoundError):
                peak = int(read(f"{found[1]}/memory.peak"))
            oom_kills = keyed(read(f"{found[1]}/memory.events"), "oom_kill")
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
                write(f"{found[1]}/cgroup.event_control", f"{self.oom_fd} {control}")
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
            return keyed(read(f"{path}/cgroup.events"), "populated") == 0
        return not read(f"{path}/cgroup.procs").strip()


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
        stat = read(f"/proc/{pid}/stat")
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
        write(f"{path}/cgroup.kill", 1)  # v2, Linux 5.14
        return
    procs = f"{path}/cgroup.procs"
    for pid in read(procs).split():
        try:
            pidfd = os.pidfd_open(int(pid))
        except ProcessLookupError:
            continue
        try:
            # The pidfd names one process.  Its number still in the list means that process is
            # still a member (a number reused by a process outside would not be listed here).
            if pid in read(procs).split():
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            continue  # gone meanwhile
        finally:
            os.close(pidfd)
