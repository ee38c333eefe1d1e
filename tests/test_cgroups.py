"""cgroups: the compartment's memory, processes and CPU bounded and counted as a whole.

Root only (CI runs as root).  The bombs run inside compartments and each stops by itself at a
bounded size, so that a run without the cgroup (to watch a test fail) stays bounded too; the
figures the memory tests see are printed (pytest -s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrun import PYTHON, run_agent
from serving import Daemon

from compartment import Outcome, Policy, cgroup_hierarchies, cgroups, syscalls
from compartment.confine import cgroup as cgroup_step


def _unusable() -> str | None:
    if os.geteuid() != 0:
        return "cgroups are made by root (as CI runs the tests)"
    try:
        cgroups.find()
    except cgroups.Unavailable as err:
        return f"no usable cgroup on this machine: {err}"
    return None


pytestmark = pytest.mark.skipif(_unusable() is not None, reason=str(_unusable()))
CLI = [sys.executable, "-m", "compartment"]
MiB = 1 << 20


def _mine(pid: int = 0) -> list[str]:
    """Directories of compartments made by process `pid` (this one by default)."""
    prefix = f"compartment-{os.stat('/proc/self/ns/pid').st_ino}-{pid or os.getpid()}-"
    return [f"{h.base}/{name}" for h in cgroups.layout() for name in os.listdir(h.base)
            if name.startswith(prefix)]


def _mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no MemAvailable in /proc/meminfo")


@contextlib.contextmanager
def host_memory() -> Iterator[dict[str, int]]:
    """MemAvailable before, and the lowest seen every 10 ms while the body runs."""
    seen = {"before": _mem_available()}
    seen["lowest"] = seen["before"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            seen["lowest"] = min(seen["lowest"], _mem_available())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


# --- accounting -------------------------------------------------------------------------------

def test_peak_memory_of_cat_is_its_own():
    """ru_maxrss counted the ~16 MB supervisor image the child was cloned from."""
    ran = run_agent(["/bin/cat"], message=b"x" * 10240)
    assert ran.result.outcome is Outcome.OK
    assert 0 < ran.result.peak_memory_bytes < 6 * MiB, ran.result.peak_memory_bytes


SERIAL_CPU = """import subprocess, sys
spin = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass"
for _ in range(8):   # 3.2 s of CPU, each process under a second of it
    subprocess.run([sys.executable, "-c", spin])
"""


def test_serial_children_cannot_pass_cpu_seconds():
    ran = run_agent([PYTHON, "-I", "-c", SERIAL_CPU], overrides={"limits.cpu_seconds": "1"})
    assert ran.result.outcome is Outcome.CPU_LIMIT, ran.result
    assert ran.result.exit_status == 75
    assert ran.result.reason == "used its 1 s of CPU (limits.cpu_seconds)"
    assert 1.0 <= ran.result.cpu_s < 1.5  # the whole tree's, checked as the budget runs out


# --- memory bombs -----------------------------------------------------------------------------

HEAP = """held = []
while len(held) < 1024:   # 1 GiB at most
    held.append(b"h" * (1 << 20))
print("held", len(held), "MiB")
"""
TMPFS = """block = b"t" * (1 << 20)
for n in range(32):       # 1 GiB at most, in files under limits.file_bytes
    with open(f"/tmp/fill-{n}", "wb") as out:
        for _ in range(32):
            out.write(block)
print("wrote 1 GiB")
"""
# Stream socket pairs filled until the kernel refuses, in as many processes as the policy
# allows, each with its own descriptors: 512 MiB at most.
SOCKETS = """import os, socket, time
held = 0
def fill(cap):
    global held
    pairs = []
    while held < cap:
        try:
            a, b = socket.socketpair()
        except OSError:
            break
        a.setblocking(False)
        try:
            while held < cap:
                held += a.send(b"s" * 65536)
        except BlockingIOError:
            pass
        pairs.append((a, b))
    return pairs
for _ in range(15):
    if os.fork() == 0:
        kept = fill(32 << 20)
        time.sleep(60)
        os._exit(0)
kept = fill(32 << 20)
time.sleep(60)
"""


@pytest.mark.parametrize(("bomb", "overrides"), [
    ("heap", {}),
    ("tmpfs", {"filesystem.tmp_bytes": "1G"}),
    ("sockets", {"limits.processes": "16", "limits.wall_timeout_s": "20"}),
], ids=["heap", "tmpfs", "socket-buffers"])
def test_memory_bomb_ends_as_memory_limit(bomb, overrides):
    limit = 64 * MiB
    code = {"heap": HEAP, "tmpfs": TMPFS, "sockets": SOCKETS}[bomb]
    with host_memory() as seen:
        ran = run_agent([PYTHON, "-I", "-c", code],
                        overrides={"limits.memory_bytes": str(limit), **overrides})
    drop = seen["before"] - seen["lowest"]
    print(f"\n{bomb}: {ran.result.outcome} {ran.result.exit_status}, peak "
          f"{ran.result.peak_memory_bytes / MiB:.1f} MiB; MemAvailable before "
          f"{seen['before'] / MiB:.0f} MiB, lowest during {seen['lowest'] / MiB:.0f} MiB")
    assert ran.result.outcome is Outcome.MEMORY_LIMIT, ran.result
    assert ran.result.exit_status == 75
    assert ran.result.reason == "used its 64 MiB of memory (limits.memory_bytes)"
    assert ran.result.peak_memory_bytes <= limit
    assert drop < 256 * MiB  # the bomb wanted 512 MiB to 1 GiB; other tests share the host


OOM_IN_A_CHILD = """import os, time
if os.fork() == 0:
    held = []
    while len(held) < 1024:
        held.append(b"c" * (1 << 20))
    os._exit(0)
time.sleep(60)  # the agent itself needs little, and would wait
"""


def test_one_process_out_of_memory_ends_the_whole_compartment():
    """The OOM killer picks one process; the compartment ends whole, there and then (v2:
    memory.oom.group; v1: the supervisor, told through cgroup.event_control)."""
    ran = run_agent([PYTHON, "-I", "-c", OOM_IN_A_CHILD],
                    overrides={"limits.memory_bytes": "64M", "limits.wall_timeout_s": "30"})
    assert ran.result.outcome is Outcome.MEMORY_LIMIT, ran.result
    assert ran.result.wall_s < 10


PAGE_CACHE = """import sys
block = b"p" * (1 << 20)
for n in range(8):        # 256 MiB of files in the mail directory
    with open(f"{sys.argv[1]}/cache-{n}", "wb") as out:
        for _ in range(32):
            out.write(block)
print("wrote 256 MiB")
"""


def test_page_cache_is_charged_and_held_at_the_limit(tmp_path):
    """Writing files fills the page cache, which the cgroup counts.  Clean or written back,
    the kernel reclaims it at the limit instead of killing: a large delivery succeeds, and the
    compartment never holds more than its memory (no memory-limit here: that would defer a
    delivery that did nothing wrong)."""
    mail = tmp_path / "mail"
    mail.mkdir(mode=0o777)
    mail.chmod(0o777)
    limit = 96 * MiB  # well above what ru_maxrss would show (the supervisor's image)
    with host_memory() as seen:
        ran = run_agent([PYTHON, "-I", "-c", PAGE_CACHE, str(mail)], overrides={
            "limits.memory_bytes": str(limit), "filesystem.writable": str(mail)})
    print(f"\npage cache: {ran.result.outcome} {ran.result.exit_status}, peak "
          f"{ran.result.peak_memory_bytes / MiB:.1f} MiB; MemAvailable before "
          f"{seen['before'] / MiB:.0f} MiB, lowest during {seen['lowest'] / MiB:.0f} MiB")
    assert ran.result.outcome is Outcome.OK, ran.result
    assert sum(f.stat().st_size for f in mail.iterdir()) == 256 * MiB
    # counted, and never past the limit
    assert limit // 2 < ran.result.peak_memory_bytes <= limit


# --- processes --------------------------------------------------------------------------------

FORK_BOMB = """import os
alive_r, alive_w = os.pipe()  # the children last as long as the agent
made = 0
while made < 1000:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.close(alive_w)
        os.read(alive_r, 1)
        os._exit(0)
    made += 1
print(made)
"""
THREAD_BOMB = """import os, threading, time
made = 0
while made < 1000:
    try:
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    except RuntimeError:
        break
    made += 1
print(made, flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("bomb", [FORK_BOMB, THREAD_BOMB], ids=["fork", "threads"])
def test_bomb_is_bounded_by_the_pids_limit(bomb):
    """processes = 8: the agent and 7 more, whatever RLIMIT_NPROC (the second line, at twice
    pids.max) would allow."""
    ran = run_agent([PYTHON, "-I", "-c", bomb], overrides={"limits.processes": "8"})
    assert ran.result.outcome is Outcome.OK, ran.result
    assert int(ran.stdout) == 7


# --- life cycle -------------------------------------------------------------------------------

def test_no_cgroup_left_after_a_thousand_runs():
    for _ in range(1000):
        assert run_agent(["/bin/true"]).result.outcome is Outcome.OK
    # a process that runs several compartments keeps one made ahead for the next, and may not
    # have removed the last one yet
    assert len(_mine()) <= 2 * len(cgroups.layout())
    cgroups.release()  # what it does at exit
    assert _mine() == []


SEVERAL_RUNS = """import sys
sys.path.insert(0, sys.argv[1])
from agentrun import run_agent
for _ in range(3):
    assert run_agent(["/bin/true"]).result.outcome == "ok"
"""


def test_a_process_that_ran_several_leaves_none_at_exit():
    caller = subprocess.Popen([sys.executable, "-c", SEVERAL_RUNS, str(Path(__file__).parent)])
    assert caller.wait() == 0
    assert _mine(caller.pid) == []


def test_cgroups_of_a_killed_supervisor_are_swept(tmp_path):
    """A supervisor SIGKILLed mid-delivery leaves its compartment's cgroups; the next one to
    start removes them."""
    supervisor = subprocess.Popen([*CLI, "run", "--", "/bin/sleep", "60"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):
            left = _mine(supervisor.pid)
            if len(left) == len(cgroups.layout()) and all(
                    Path(d, "cgroup.procs").read_text() for d in left):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the compartment never joined its cgroups")
    finally:
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
    assert all(os.path.isdir(d) for d in left)
    subprocess.run([*CLI, "run", "--", "/bin/true"], stdin=subprocess.DEVNULL, check=True)
    assert [d for d in left if os.path.exists(d)] == []


def test_the_resident_supervisors_compartments_have_their_cgroup():
    """compartment serve: its compartments (prepared for their request, or ahead of it) are
    limited and counted the same, and it leaves no cgroup when it stops."""
    served = Daemon().start()
    try:
        for _ in range(2):  # the second one of each policy was prepared ahead
            bomb = served.submit([PYTHON, "-I", "-c", HEAP], ["--set=limits.memory_bytes=64M"])
            assert bomb.status == 75, served.log()
            assert b"used its 64 MiB of memory (limits.memory_bytes)" in bomb.stderr
            spent = served.submit([PYTHON, "-I", "-c", SERIAL_CPU],
                                  ["--set=limits.cpu_seconds=1"])
            assert spent.status == 75 and b"used its 1 s of CPU" in spent.stderr
    finally:
        assert served.stop() == 0
    assert _mine(served.process.pid) == []


def test_remove_kills_what_is_left():
    """Nothing is left once the init is reaped; if something were, remove() kills exactly the
    members of the cgroup, then removes it."""
    cgroup = cgroups.create(Policy.load("filter").limits)
    member = syscalls.clone_into_cgroup(0, cgroup.clone_fd) if cgroup.clone_fd >= 0 \
        else os.fork()
    if member == 0:
        cgroup_step.enter(cgroup.procs_fds)  # v1; on v2 the clone put it there
        time.sleep(60)
        os._exit(0)
    cgroup.close_fds()
    dirs = [d for _, d in cgroup.dirs]
    for _ in range(1000):
        if all(str(member) in Path(d, "cgroup.procs").read_text().split() for d in dirs):
            break
        time.sleep(0.001)
    cgroup.remove()
    assert os.waitpid(member, 0)[1] == signal.SIGKILL
    assert not any(os.path.exists(d) for d in dirs)


def test_a_cgroup_made_ahead_takes_other_limits():
    """A spare is limited as the compartment before it was; the next may raise or lower it."""
    cgroup = cgroups.create(Policy.load("filter", {"limits.memory_bytes": "64M"}).limits)
    try:
        for memory in ("96M", "32M"):
            cgroup.limit(Policy.load("filter", {"limits.memory_bytes": memory,
                                               "limits.processes": "3"}).limits)
            version, path = cgroup._dir(cgroups.MEMORY)
            name = "memory.limit_in_bytes" if version == 1 else "memory.max"
            assert Path(path, name).read_text() == f"{int(memory[:-1]) << 20}\n"
            version, path = cgroup._dir(cgroups.PIDS)
            assert Path(path, "pids.max").read_text() == "4\n"
    finally:
        cgroup.remove()


# --- enforcement ------------------------------------------------------------------------------

def test_no_usable_cgroup_is_a_configuration_error(monkeypatch):
    def unavailable() -> tuple[cgroups.Hierarchy, ...]:
        raise cgroups.Unavailable("cgroup v2: /system.slice/postfix.service is not delegated")

    monkeypatch.setattr(cgroup_hierarchies, "_layout", [])
    monkeypatch.setattr(cgroup_hierarchies, "find", unavailable)
    for enforcement in ("auto", "cgroup"):
        ran = run_agent(["/bin/true"], overrides={"limits.enforcement": enforcement})
        assert ran.result.outcome is Outcome.CONFIG_ERROR
        assert ran.result.exit_status == 75
        assert ran.result.reason.startswith(f'limits.enforcement = "{enforcement}": no usable '
                                            "cgroup: cgroup v2: /system.slice/postfix.service")
    ran = run_agent(["/bin/true"], overrides={"limits.enforcement": "rlimits"})
    assert ran.result.outcome is Outcome.OK  # the weaker mode, chosen in the policy


def test_rlimits_mode_makes_no_cgroup(monkeypatch):
    made = []
    monkeypatch.setattr(cgroups, "create", lambda limits: made.append(limits))
    ran = run_agent(["/bin/cat"], overrides={"limits.enforcement": "rlimits"})
    assert ran.result.outcome is Outcome.OK and made == []


def test_check_says_how_limits_are_enforced():
    shown = subprocess.run([*CLI, "check"], capture_output=True, text=True, check=True).stdout
    assert "# limits enforced by a cgroup per compartment (cgroup v" in shown
    shown = subprocess.run([*CLI, "check", "--set", "limits.enforcement=rlimits"],
                           capture_output=True, text=True, check=True).stdout
    assert "# limits enforced by rlimits only" in shown
