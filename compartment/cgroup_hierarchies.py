"""Where compartments' cgroups go: below the supervisor's own cgroup in each hierarchy.

Supervisor side, root; compartment/cgroups.py holds the compartments' cgroups themselves, and
the few file helpers at the end serve both.  The supervisor's own cgroups come from
/proc/self/cgroup, the mount points from /proc/self/mountinfo; nothing is made elsewhere.
cgroup v1 (memory, pids, cpuacct, each mounted on its own or together) has no rule against a
cgroup holding both processes and children.  cgroup v2 does: a cgroup holding processes cannot
enable controllers for its children, so the supervisor needs a cgroup of its own to divide.
On v2 the compartments' cgroups go
- below the root cgroup, when the supervisor is there (no systemd);
- below a cgroup that systemd delegated (Delegate=yes on the unit: the trusted.delegate or
  user.delegate attribute), after the supervisor moved itself into a leaf `supervisor/` of it;
  a supervisor started in that leaf (DelegateSubgroup=supervisor) uses its parent;
- nowhere else: a cgroup that is not delegated, or that holds other processes (an MTA's), is
  not ours to divide, and that is Unavailable, a configuration error naming the cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

MEMORY, PIDS, CPU = "memory", "pids", "cpuacct"  # CPU: cpuacct on v1, cpu.stat (core) on v2
WANTED = frozenset({MEMORY, PIDS, CPU})
LEAF = "supervisor"  # the delegated cgroup's leaf that holds the supervisor on v2


class Unavailable(Exception):
    """No cgroup can be made for the compartment here; the message says where and why."""


@dataclass(frozen=True)
class Hierarchy:
    version: int            # 1 or 2
    base: str               # the directory in which compartments' cgroups are made
    serves: frozenset[str]  # which of MEMORY, PIDS, CPU this hierarchy accounts and limits
    leaf: str = ""          # v2: the leaf the supervisor moves into before dividing `base`


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
    missing = need - set(read(f"{base}/cgroup.controllers").split())
    if missing:
        raise Unavailable(f"cgroup v2: {base} lacks the {', '.join(sorted(missing))} "
                          "controller (cgroup.controllers)")
    return Hierarchy(2, base, serves, leaf)


def _prepare_v2(hierarchy: Hierarchy) -> None:
    """Enable the controllers below `base`, first moving this process into the leaf if it is
    in `base` itself (no internal processes)."""
    base, leaf = hierarchy.base, hierarchy.leaf
    need = hierarchy.serves - {CPU}
    enabled = set(read(f"{base}/cgroup.subtree_control").split())
    if need <= enabled and not leaf:
        return
    if leaf:
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o755)
        write(f"{leaf}/cgroup.procs", os.getpid())
    try:
        if need - enabled:
            write(f"{base}/cgroup.subtree_control", " ".join(f"+{c}" for c in need - enabled))
    except OSError as err:
        if leaf:
            write(f"{base}/cgroup.procs", os.getpid())  # back where we were
        if err.errno == errno.EBUSY:
            raise Unavailable(f"cgroup v2: {base} holds other processes, so the kernel cannot "
                              "limit memory below it; give compartment a unit of its own with "
                              "Delegate=yes") from None
        raise Unavailable(f"cgroup v2: cannot enable controllers in {base}: "
                          f"{err.strerror}") from None


def _own_cgroups() -> dict[str, str]:
    """/proc/self/cgroup: controllers (sorted, comma-separated; "" for v2) -> own path."""
    own = {}
    for line in read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        own[",".join(sorted(controllers.split(","))) if controllers else ""] = path
    return own


def _cgroup_mounts() -> list[tuple[str, str, str, str]]:
    """(root within the hierarchy, mount point, fstype, super options) of cgroup mounts."""
    mounts = []
    for line in read("/proc/self/mountinfo").splitlines():
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


# --- files ------------------------------------------------------------------------------------

def read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def write(path: str, value: int | str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def write_if_there(path: str, value: int) -> None:
    """A file the kernel has only with an option (swap accounting)."""
    with contextlib.suppress(FileNotFoundError):
        write(path, value)


def keyed(text: str, key: str) -> int:
    """The value of `key` in a flat keyed file ("key value" per line); 0 when absent."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
