"""compartment.isolate: a function in DJB's prison, one clone of a zygote per call.

The probes (tests/prison_probes.py) try each forbidden thing; what refuses it must be the prison
(a seccomp violation naming the syscall, or the kernel under a relaxed filter), never Python.
Run as root; the unprivileged mode is run as nobody through a subprocess at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import prison_probes
import pytest

from compartment import Failed, Outcome, PolicyError, isolate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs prisons as root (as CI does); "
                                "the unprivileged mode is tested via `nobody`")
TESTS = Path(__file__).parent
NOBODY = 65534


@pytest.fixture(scope="module")
def echo():
    with isolate(prison_probes.echo) as function:
        yield function


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def ready_prison(function) -> int:
    """The zygote keeps one prison cloned ahead of the next call (made just after it
    replies): its pid."""
    deadline = time.monotonic() + 10
    while not (children := children_of(function.zygote_pid)) and time.monotonic() < deadline:
        time.sleep(0.005)
    (prison,) = children
    return prison


def failure(function, data=b"x") -> Failed:
    with pytest.raises(Failed) as caught:
        function(data)
    return caught.value


def test_returns_the_functions_bytes(echo, tmp_path):
    assert echo(b"hello") == b"hello"
    assert echo(bytearray(b"\0" * 100_000)) == b"\0" * 100_000
    assert echo(b"") == b""
    message = tmp_path / "message"
    message.write_bytes(b"from a descriptor\n")
    with open(message, "rb") as file:
        assert echo(file) == b"from a descriptor\n"  # the caller's own descriptor


def test_no_state_carries_from_one_call_to_the_next():
    with isolate(prison_probes.count) as count:
        assert [count(b"") for _ in range(3)] == [b"1", b"1", b"1"]


def test_the_callers_memory_and_environment_stay_out(monkeypatch):
    monkeypatch.setattr(prison_probes, "SECRET", b"the caller's secret")
    monkeypatch.setenv("CALLER_SECRET", "envelope data")
    with isolate(prison_probes.secret) as secret, \
            isolate(prison_probes.environment) as environment:
        assert secret(b"") == b"the module's own value"  # the zygote's copy, not ours
        seen = json.loads(environment(b""))
    # The policy's variables; LC_CTYPE is CPython's own locale coercion (PEP 538).
    assert set(seen) <= {"PATH", "LC_CTYPE"} and seen["PATH"] == "/nonexistent"


@pytest.mark.parametrize(("probe", "syscall"), [
    ("open_file", "openat"), ("make_socket", "socket"), ("fork", "clone"),
    ("execute", "execve"), ("read_caller_memory", "openat"), ("read_descriptor", "read"),
    ("kill_self", "getpid"), ("map_executable", "mmap"),
])
def test_forbidden_calls_are_violations(probe, syscall):
    with isolate(getattr(prison_probes, probe)) as function:
        failed = failure(function, str(os.getpid()).encode())
        assert (failed.outcome, failed.denied_syscall) == (Outcome.VIOLATION, syscall), failed
        assert failed.reason == f"seccomp violation: {syscall} is not allowed"
        assert failure(function, b"1").denied_syscall == syscall  # the next call is served


def test_a_read_write_input_cannot_be_written_through_a_mapping(tmp_path):
    message = tmp_path / "message"
    message.write_bytes(b"the original message")
    with isolate(prison_probes.write_through_mapping) as function, \
            open(message, "r+b") as read_write:
        failed = failure(function, read_write)
    assert (failed.outcome, failed.denied_syscall) == (Outcome.VIOLATION, "mmap")
    assert message.read_bytes() == b"the original message"


def test_behind_the_filter_only_three_descriptors_are_open():
    with isolate(prison_probes.open_descriptors, Policy_allowing("fcntl")) as function:
        assert json.loads(function(b"")) == [0, 1, 2]


def test_behind_the_filter_the_root_is_empty_and_nothing_can_be_made():
    calls = ("openat", "newfstatat", "mkdir", "fcntl", "getresuid", "getresgid", "getpid")
    with isolate(prison_probes.facts, Policy_allowing(*calls)) as function:
        facts = json.loads(function(b""))
    assert (facts["root_links"], facts["stat_etc"]) == (2, "ENOENT")
    assert (facts["open_dot"], facts["mkdir"], facts["dup"]) == ("EMFILE", "EROFS", "EMFILE")
    assert facts["nofile"] == [3, 3] and facts["nproc"] == [0, 0] and facts["fsize"] == [0, 0]
    assert facts["pid"] == 1  # a pid namespace of its own
    uid = facts["uid"][0]
    assert 60000 <= uid <= 60999 and facts["uid"] == [uid] * 3 and facts["gid"] == [uid] * 3


def Policy_allowing(*calls):  # noqa: N802 - reads as the policy it builds
    from compartment import Policy

    return Policy.load("strict", {"seccomp.allow": ",".join(calls)})


@pytest.mark.parametrize(("probe", "limits", "outcome", "reason"), [
    ("loop", {"wall_timeout_s": 1}, Outcome.TIMEOUT, "timed out: limits.wall_timeout_s = 1"),
    ("loop", {"cpu_seconds": 1, "wall_timeout_s": 20}, Outcome.CPU_LIMIT,
     "used its 1 s of CPU (limits.cpu_seconds)"),
    ("allocate", {"memory_bytes": "128M"}, Outcome.MEMORY_LIMIT,
     "MemoryError (limits.memory_bytes is 134217728)"),
    ("recurse", {}, Outcome.AGENT_FAILED, "RecursionError: maximum recursion depth exceeded"),
    ("raise_value_error", {}, Outcome.AGENT_FAILED, "ValueError: bad header: X-Evil"),
    ("return_text", {}, Outcome.AGENT_FAILED,
     "TypeError: the function returned str, not bytes"),
])
def test_each_failure_has_its_outcome_and_the_next_call_works(probe, limits, outcome, reason):
    with isolate(getattr(prison_probes, probe), **limits) as function:
        used = ready_prison(function)
        failed = failure(function)
        assert (failed.outcome, failed.reason) == (outcome, reason)
        assert not Path(f"/proc/{used}").exists()  # nothing outlives the call
        assert ready_prison(function) != used  # the next one, cloned ahead
        assert failure(function).outcome is outcome  # the zygote serves the next call
        assert function.deaths == []


def test_killed_from_outside_is_a_signal_and_the_next_call_works():
    with isolate(prison_probes.echo, wall_timeout_s=20) as function:
        held_r, held_w = os.pipe()  # never closed while it runs: its read blocks
        os.write(held_w, b"x")
        caught: list[BaseException] = []
        caller = threading.Thread(target=lambda: caught.append(failure(function, held_r)))
        prison = ready_prison(function)
        caller.start()
        time.sleep(0.3)  # it has its input, and waits for more
        os.kill(prison, signal.SIGKILL)
        caller.join(10)
        os.close(held_w)
        os.close(held_r)
        assert (caught[0].outcome, caught[0].reason) == (Outcome.SIGNAL, "killed by SIGKILL")
        assert function(b"xy") == b"xy"


@pytest.mark.parametrize(("probe", "data", "outcome", "reason"), [
    ("double", b"x" * 600, Outcome.OUTPUT_LIMIT, "wrote more than 1000 bytes of output"),
    ("double", b"x" * 5000, Outcome.OUTPUT_LIMIT, "wrote more than 1000 bytes of output"),
    ("half_written", b"x" * 100, Outcome.AGENT_FAILED,
     "the function's process exited with status 0 without its result (0 bytes of record)"),
    ("output_without_record", b"x" * 10, Outcome.AGENT_FAILED,
     "the function's process exited with status 0 and a result record that does not match "
     "its output (15 bytes)"),
])
def test_malformed_output_is_refused(probe, data, outcome, reason):
    with isolate(getattr(prison_probes, probe), output_bytes=1000) as function:
        failed = failure(function, data)
        assert (failed.outcome, failed.reason) == (outcome, reason)


def test_print_in_the_function_goes_nowhere():
    with isolate(prison_probes.printing) as function:
        assert function(b"the message") == b"the message"


def test_lambdas_closures_and_nested_functions_are_refused_at_isolate():
    def nested(data):
        return data

    suffix = b"!"

    def closure(data):
        return data + suffix
    for func in (lambda data: data, nested, closure):
        with pytest.raises(TypeError, match="lambda, closure or nested function"):
            isolate(func)


def test_what_the_zygote_cannot_find_by_name_is_refused():
    class Holder:
        def method(self, data):
            return data
    with pytest.raises(TypeError, match="lambda, closure or nested function"):
        isolate(Holder().method)
    with pytest.raises(TypeError, match="expected MODULE:FUNCTION"):
        isolate("prison_probes.echo")
    with pytest.raises(Failed, match="cannot import no_such_module") as caught:
        isolate("no_such_module:function")
    assert caught.value.outcome is Outcome.CONFIG_ERROR
    with pytest.raises(Failed, match="prison_probes:SECRET is not a function"):
        isolate("prison_probes:SECRET")
    with pytest.raises(Failed, match="the zygote exited with status 3 before it was ready"):
        isolate("exits_at_import:function")


def test_a_policy_that_is_not_a_prison_is_refused():
    with pytest.raises(PolicyError, match='needs filesystem.root = "empty"'):
        isolate(prison_probes.echo, "filter")
    with pytest.raises(TypeError, match="unexpected keyword argument 'open_files'"):
        isolate(prison_probes.echo, open_files=10)
    with pytest.raises(PolicyError, match="memory_bytes: expected a byte count"):
        isolate(prison_probes.echo, memory_bytes="lots")
    with pytest.raises(Failed, match="leaves the function less than 16 MiB"):
        isolate(prison_probes.echo, memory_bytes="1M")
    from compartment import Policy

    cgroup = Policy.load("strict", {"limits.enforcement": "cgroup"})  # a prison has none yet
    with pytest.raises(PolicyError, match='needs limits.enforcement "auto" or "rlimits"'):
        isolate(prison_probes.echo, cgroup)


def test_a_pool_with_no_uid_left_is_a_config_error():
    from compartment import Policy

    pool = Policy.load("strict", {"identity.uid_pool": "61990-61990"})  # one uid, held below
    with isolate(prison_probes.echo, pool) as holder:
        ready_prison(holder)  # the holder's next prison, cloned ahead, has the pool's one uid
        with isolate(prison_probes.echo, pool) as other:
            failed = failure(other)
        assert (failed.outcome, failed.reason) == \
            (Outcome.CONFIG_ERROR, "uid pool 61990-61990: all 1 uids are in use")
        assert holder(b"held") == b"held"


def test_close_stops_the_zygote_and_later_calls_are_refused():
    function = isolate(prison_probes.echo)
    pid = function.zygote_pid
    with function:
        assert function(b"a") == b"a"
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    with pytest.raises(ValueError, match="is closed"):
        function(b"a")


def test_a_dead_zygote_is_reported_and_replaced(caplog):
    with isolate(prison_probes.echo) as function:
        first = function.zygote_pid
        os.kill(first, signal.SIGKILL)
        time.sleep(0.1)
        assert function(b"again") == b"again"
        assert function.zygote_pid != first
        line = f"the zygote of prison_probes:echo (pid {first}) was killed by SIGKILL, " \
            "between calls"
        assert function.deaths == [line]
        assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == \
            [("compartment.isolate", "WARNING", line)]


def test_a_zygote_that_dies_during_a_call_fails_that_call_only():
    with isolate(prison_probes.echo) as function:
        first = function.zygote_pid
        held_r, held_w = os.pipe()  # the call waits on its input while its zygote is killed
        caught: list[BaseException] = []
        caller = threading.Thread(target=lambda: caught.append(failure(function, held_r)))
        caller.start()
        time.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        caller.join(10)
        os.close(held_w)
        os.close(held_r)
        line = f"the zygote of prison_probes:echo (pid {first}) was killed by SIGKILL, during " \
            "a call"
        assert (caught[0].outcome, caught[0].reason) == \
            (Outcome.INTERNAL_ERROR, line + "; the next call starts a new one")
        assert function.deaths == [line]
        assert function(b"again") == b"again"


def test_a_zygote_that_does_not_answer_is_killed_and_replaced():
    with isolate(prison_probes.echo, wall_timeout_s=0.5) as function:
        stuck = function.zygote_pid
        os.kill(stuck, signal.SIGSTOP)
        failed = failure(function)
        assert failed.outcome is Outcome.INTERNAL_ERROR
        assert "did not answer within 2.5 s, and was killed" in failed.reason
        assert function(b"next") == b"next" and function.zygote_pid != stuck
        assert len(function.deaths) == 1


def test_a_forked_caller_gets_a_zygote_of_its_own(echo):
    parent_zygote = echo.zygote_pid
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            said = echo(b"from the child") + f" {echo.zygote_pid}".encode()
            os.write(write_end, said)
        finally:
            os._exit(0)
    os.close(write_end)
    said = os.read(read_end, 1000)
    os.close(read_end)
    os.waitpid(child, 0)
    data, pid = said.rsplit(b" ", 1)
    assert data == b"from the child" and int(pid) != parent_zygote
    assert echo(b"parent") == b"parent" and echo.zygote_pid == parent_zygote


def test_threads_may_call_at_once(echo):
    results: dict[int, list[bytes]] = {}

    def worker(n: int) -> None:
        results[n] = [echo(f"{n}-{i}".encode()) for i in range(20)]
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: [f"{n}-{i}".encode() for i in range(20)] for n in range(4)}


def test_asyncio_callers_await_acall(echo):
    async def main():
        return await asyncio.gather(*(echo.acall(f"{n}".encode()) for n in range(5)))
    assert asyncio.run(main()) == [f"{n}".encode() for n in range(5)]


def _fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _zygote_fds(function) -> int:
    """The zygote's descriptors once it waits for a call, its next prison cloned."""
    ready_prison(function)
    counts = [-1, _fd_count(function.zygote_pid)]
    while counts[-1] != counts[-2]:
        time.sleep(0.05)
        counts.append(_fd_count(function.zygote_pid))
    return counts[-1]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_ten_thousand_calls_leak_nothing(echo):
    message = b"x" * 1024
    for _ in range(500):  # the allocators' pools settle first
        assert echo(message) == message
    caller_fds, zygote_fds = _fd_count(), _zygote_fds(echo)
    caller_threads, caller_children = threading.active_count(), children_of(os.getpid())
    zygote_rss = _rss_kib(echo.zygote_pid)
    for _ in range(10_000):
        assert echo(message) == message
    assert (_fd_count(), _zygote_fds(echo)) == (caller_fds, zygote_fds)
    assert threading.active_count() == caller_threads
    assert children_of(os.getpid()) == caller_children
    assert len(children_of(echo.zygote_pid)) <= 1  # the one ready for the next call, no more
    assert _rss_kib(echo.zygote_pid) - zygote_rss < 1024
    assert echo.deaths == []


NOBODY_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import prison_probes
from compartment import Failed, Policy, isolate
said = {}
with isolate(prison_probes.count) as count:
    said["count"] = [count(b"").decode() for _ in range(3)]
for probe in ("open_file", "make_socket", "fork", "execute", "read_descriptor"):
    try:
        with isolate(getattr(prison_probes, probe)) as function:
            function(b"")
    except Failed as failed:
        said[probe] = [failed.outcome, failed.denied_syscall]
for probe, limits in (("allocate", {"memory_bytes": "128M"}), ("loop", {"wall_timeout_s": 1}),
                      ("raise_value_error", {})):
    with isolate(getattr(prison_probes, probe), **limits) as function:
        for _ in range(2):  # the second call is served as the first
            try:
                function(b"")
            except Failed as failed:
                said.setdefault(probe, []).append([failed.outcome, failed.reason])
allowed = Policy.load("strict", {"seccomp.allow": "openat,newfstatat,mkdir,dup,getresuid,"
                                 "getresgid,getpid,fcntl"})
with isolate(prison_probes.facts, allowed) as facts:
    said["facts"] = json.loads(facts(b""))
with isolate(prison_probes.open_descriptors, allowed) as descriptors:
    said["descriptors"] = json.loads(descriptors(b""))
print(json.dumps(said))
"""


def test_unprivileged_as_nobody():
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", sys.executable, "-c", NOBODY_SCRIPT, str(TESTS)],
                          capture_output=True, stdin=subprocess.DEVNULL, cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    said = json.loads(done.stdout)
    assert said["count"] == ["1", "1", "1"]
    assert said["open_file"] == ["violation", "openat"]
    assert said["make_socket"] == ["violation", "socket"]
    assert said["fork"] == ["violation", "clone"]
    assert said["execute"] == ["violation", "execve"]
    assert said["read_descriptor"] == ["violation", "read"]
    assert [outcome for outcome, _ in said["allocate"]] == ["memory-limit"] * 2
    assert said["loop"] == [["timeout", "timed out: limits.wall_timeout_s = 1"]] * 2
    assert said["raise_value_error"] == [["agent-failed", "ValueError: bad header: X-Evil"]] * 2
    facts = said["facts"]
    assert (facts["root_links"], facts["stat_etc"], facts["pid"]) == (2, "ENOENT", 1)
    assert facts["uid"] == [NOBODY] * 3  # the caller's own, through a user namespace
    assert (facts["open_dot"], facts["mkdir"], facts["dup"]) == ("EMFILE", "EROFS", "EMFILE")
    assert said["descriptors"] == [0, 1, 2]
