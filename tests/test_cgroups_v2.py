"""cgroup v2 paths that need no controller, on whatever cgroup2 mount this machine has.

Where memory and pids are v1 controllers (this project's CI), a cgroup2 hierarchy is still
mounted without them (/sys/fs/cgroup/unified): there the compartment is born in its cgroup
(clone3 CLONE_INTO_CGROUP), its CPU is counted and limited (cpu.stat is in every v2 cgroup), and
what is left is killed with cgroup.kill; the placement rules (root, delegated, leaf) are checked
with delegation marked by hand.  Memory and pids limits on v2 need a kernel that has them there
(tests/test_cgroups.py runs on such a machine unchanged: see tests/vm/).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrun import PYTHON, run_agent
from test_cgroups import SERIAL_CPU

from compartment import Outcome, Policy, cgroup_hierarchies, cgroups, syscalls


def _unified() -> str:
    if os.geteuid() != 0:
        return ""
    own = cgroup_hierarchies._own_cgroups().get("")
    for mount_root, point, fstype, _ in cgroup_hierarchies._cgroup_mounts():
        if fstype == "cgroup2" and own:
            return cgroup_hierarchies._below(point, mount_root, own)
    return ""


UNIFIED = _unified()
pytestmark = pytest.mark.skipif(not UNIFIED, reason="needs root and a cgroup2 hierarchy")


@pytest.fixture
def v2_core(monkeypatch) -> Iterator[cgroups.Hierarchy]:
    """This process makes its compartments' cgroups in the cgroup2 hierarchy, for CPU alone."""
    hierarchy = cgroups.Hierarchy(2, UNIFIED, frozenset({cgroups.CPU}))
    monkeypatch.setattr(cgroup_hierarchies, "_layout", [(hierarchy,)])
    monkeypatch.setattr(cgroups, "_state", [])
    yield hierarchy
    cgroups.release()


def test_the_child_is_born_in_its_cgroup(v2_core):
    before = set(os.listdir(v2_core.base))
    code = "print([x for x in open('/proc/self/cgroup') if x.startswith('0::')][0], end='')"
    ran = run_agent([PYTHON, "-I", "-c", code], overrides={"filesystem.proc": "true"})
    assert ran.result.outcome is Outcome.OK, ran.result
    relative = v2_core.base[len(UNIFIED):]
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert ran.stdout.decode().startswith(f"0::{relative}/compartment-{namespace}-{os.getpid()}-")
    assert ran.result.cpu_s > 0  # from cpu.stat
    assert set(os.listdir(v2_core.base)) <= before  # and removed


def test_cpu_seconds_is_the_total_on_v2(v2_core):
    ran = run_agent([PYTHON, "-I", "-c", SERIAL_CPU], overrides={"limits.cpu_seconds": "1"})
    assert ran.result.outcome is Outcome.CPU_LIMIT, ran.result
    assert 1.0 <= ran.result.cpu_s < 1.5


def test_remove_kills_what_is_left_with_cgroup_kill(v2_core):
    cgroup = cgroups.create(Policy.load("filter").limits)
    member = syscalls.clone_into_cgroup(0, cgroup.clone_fd)
    if member == 0:
        time.sleep(60)
        os._exit(0)
    cgroup.close_fds()
    cgroup.remove()
    assert os.waitpid(member, 0)[1] == signal.SIGKILL
    assert not os.path.exists(cgroup.dirs[0][1])


def test_the_spawner_clones_for_its_parent_into_the_cgroup(v2_core):
    """compartment serve's spawner clones with CLONE_PARENT: the compartment is the daemon's
    child, born in its cgroup all the same."""
    cgroup = cgroups.create(Policy.load("filter").limits)
    said_r, said_w = os.pipe()
    spawner = os.fork()
    if spawner == 0:
        try:
            pid = syscalls.clone_into_cgroup(syscalls.CLONE_PARENT, cgroup.clone_fd)
            if pid == 0:
                time.sleep(60)
            else:
                os.write(said_w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(said_w)
    os.waitpid(spawner, 0)
    pid = int(os.read(said_r, 32) or b"0")
    os.close(said_r)
    assert pid, "clone3 with CLONE_PARENT failed"
    assert str(pid) in Path(cgroup.dirs[0][1], "cgroup.procs").read_text().split()
    cgroup.close_fds()
    cgroup.remove()  # kills it
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL  # this process's child


def test_sweep_on_v2(v2_core):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    namespace = os.stat("/proc/self/ns/pid").st_ino
    stale = Path(v2_core.base, f"compartment-{namespace}-{dead.stdout.strip()}-1-1")
    elsewhere = Path(v2_core.base, f"compartment-{namespace + 1}-{dead.stdout.strip()}-1-1")
    stale.mkdir()
    elsewhere.mkdir()
    try:
        assert cgroups.sweep((v2_core,)) >= 1 and not stale.exists()
        assert elsewhere.exists()  # another pid namespace's: its pids mean nothing here
    finally:
        elsewhere.rmdir()


# --- where: the root, a delegated cgroup, its leaf --------------------------------------------

PLACE = """import json, os, sys
from compartment import cgroup_hierarchies
here = sys.argv[1]
with open(here + "/cgroup.procs", "w") as procs:
    procs.write(str(os.getpid()))
try:
    found = cgroup_hierarchies._find_v2(here, frozenset(sys.argv[2:]))
    cgroup_hierarchies._prepare_v2(found)
    print(json.dumps({"base": found.base, "leaf": found.leaf,
                      "now": open("/proc/self/cgroup").read().split("::")[-1].strip()}))
except cgroup_hierarchies.Unavailable as err:
    print(json.dumps({"unavailable": str(err)}))
"""


@pytest.fixture
def scratch_cgroup() -> Iterator[Path]:
    if CONTROLLERS and cgroup_hierarchies._is_root(UNIFIED):  # as the supervisor enables them
        Path(UNIFIED, "cgroup.subtree_control").write_text(
            " ".join(f"+{c}" for c in CONTROLLERS))
    path = Path(UNIFIED, f"place-test-{os.getpid()}")
    path.mkdir()
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        if child.is_dir():
            child.rmdir()
    path.rmdir()


# The controllers this hierarchy has (none where they are all cgroup v1 controllers).
CONTROLLERS = {cgroups.MEMORY, cgroups.PIDS} & set(
    Path(UNIFIED, "cgroup.controllers").read_text().split() if UNIFIED else ())


def _place(directory: Path) -> dict:
    import json

    done = subprocess.run([sys.executable, "-c", PLACE, str(directory), cgroups.CPU,
                           *CONTROLLERS], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_a_cgroup_not_delegated_is_not_divided(scratch_cgroup):
    found = _place(scratch_cgroup)
    assert "is not delegated to compartment" in found["unavailable"]
    assert "Delegate=yes" in found["unavailable"]


def test_a_delegated_cgroup_is_divided_after_moving_into_its_leaf(scratch_cgroup):
    os.setxattr(scratch_cgroup, "trusted.delegate", b"1")
    found = _place(scratch_cgroup)
    assert found["base"] == str(scratch_cgroup)
    assert found["leaf"] == f"{scratch_cgroup}/supervisor"
    assert found["now"] == found["leaf"][len(UNIFIED):]  # it moved itself there


@pytest.mark.skipif(not CONTROLLERS, reason="no memory or pids controller on this cgroup2 "
                    "hierarchy (they are cgroup v1 controllers here), so there is nothing to "
                    "enable that another process could block; tests/vm runs it")
def test_a_delegated_cgroup_holding_other_processes_is_not_divided(scratch_cgroup):
    os.setxattr(scratch_cgroup, "trusted.delegate", b"1")
    other = subprocess.Popen(["sleep", "60"])
    try:
        Path(scratch_cgroup, "cgroup.procs").write_text(str(other.pid))
        found = _place(scratch_cgroup)
        assert "holds other processes" in found["unavailable"]
        # the supervisor went back where it was
        assert str(other.pid) in Path(scratch_cgroup, "cgroup.procs").read_text().split()
    finally:
        other.kill()
        other.wait()


def test_a_supervisor_started_in_the_leaf_uses_its_parent(scratch_cgroup):
    os.setxattr(scratch_cgroup, "user.delegate", b"1")
    leaf = scratch_cgroup / "supervisor"
    leaf.mkdir()
    found = _place(leaf)
    assert (found["base"], found["leaf"]) == (str(scratch_cgroup), "")
