"""Fault injection: the supervisor killed mid-delivery, an unwritable report, a missing or
unrunnable agent, a policy that vanished, no user namespaces, an exhausted uid pool.  Nothing
is lost (a temporary failure, never success, never a bounce), nothing is left running, and the
reason says what went wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_evidence import MAIL_UID, survivors
from hostile_run import HOSTILE_POOL, MESSAGE, TEMPFAIL

import compartment
from compartment import Policy, PolicyError

PYTHON = "/usr/bin/python3"
NOBODY = 65534
# A delivery agent that writes half a message into the Maildir's tmp/, says so, then hangs.
HALF_DELIVERY = """
import os, sys, time
mail = sys.argv[1]
data = sys.stdin.buffer.read()
with open(os.path.join(mail, "tmp", "partial"), "wb") as part:
    part.write(data[: len(data) // 2])
print(os.getuid(), flush=True)
time.sleep(60)
"""
HANG = "import os, time; print(os.getuid(), flush=True); time.sleep(60)"


@pytest.fixture
def message(case_dir: Path) -> Iterator[int]:
    path = case_dir / "message"
    path.write_bytes(MESSAGE)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture
def maildir(case_dir: Path) -> Path:
    mail = case_dir / "Maildir"
    for sub in ("", "tmp", "new", "cur"):
        (mail / sub).mkdir()
        os.chown(mail / sub, MAIL_UID, MAIL_UID)
    return mail


def cli(*args: str, **options: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "compartment", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)


def run_quiet(argv: list[str], policy: Policy, stdin: int, case_dir: Path,
              **options: object) -> compartment.Result:
    with open(case_dir / "out", "wb") as out, open(case_dir / "err", "wb") as err:
        return compartment.run(argv, policy, stdin=stdin, stdout=out, stderr=err, **options)


def wait_started(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip().isdigit(), f"agent did not start: {line!r}"


def assert_nothing_survives(marker: str) -> None:
    left = survivors(marker, {os.getpid()}, grace_s=3)
    assert not left, f"processes outlived their killed supervisor: {left}"


@pytest.mark.parametrize("policy", ["deliver", "filter"])
def test_supervisor_killed_mid_delivery(policy: str, maildir: Path, case_dir: Path) -> None:
    sets = [f"--set=identity.uid_pool={HOSTILE_POOL}"]
    marker = f"hostile-victim-{os.getpid()}-{case_dir.name}"   # in the agent's argv
    if policy == "deliver":
        sets.append(f"--set=filesystem.writable={maildir}")
        argv = [PYTHON, "-c", HALF_DELIVERY, str(maildir), marker]
    else:
        argv = [PYTHON, "-c", HANG, marker]
    with open(case_dir / "message", "wb") as file:
        file.write(MESSAGE)
    with open(case_dir / "message", "rb") as stdin:
        supervisor = cli("run", "-p", policy, *sets, "--", *argv, stdin=stdin)
    wait_started(supervisor)
    supervisor.send_signal(signal.SIGKILL)   # only the CLI process we started
    supervisor.communicate()
    assert supervisor.returncode != 0
    assert_nothing_survives(marker)
    assert not list((maildir / "new").iterdir()), "a half delivery was made visible"


@pytest.mark.parametrize("report", ["{dir}/missing/report.jsonl", "/dev/full", "{dir}"])
@pytest.mark.parametrize("code", [0, 67])
def test_report_unwritable_keeps_outcome(report: str, code: int, case_dir: Path,
                                         message: int) -> None:
    policy = Policy.load("filter", overrides={"identity.uid_pool": HOSTILE_POOL})
    argv = [PYTHON, "-c", f"import sys; sys.stdin.buffer.read(); sys.exit({code})"]
    result = run_quiet(argv, policy, message, case_dir, report=report.format(dir=case_dir))
    assert result.exit_status == code, result.reason
    assert "report" in (case_dir / "err").read_text(), "the report failure was not mentioned"


def test_report_written_when_writable(case_dir: Path, message: int) -> None:
    policy = Policy.load("filter", overrides={"identity.uid_pool": HOSTILE_POOL})
    report = case_dir / "report.jsonl"
    result = run_quiet(["/bin/cat"], policy, message, case_dir, report=str(report))
    assert result.exit_status == 0
    assert json.loads(report.read_text())["outcome"] == "ok"


def _unrunnable(case_dir: Path, kind: str) -> tuple[str, str]:
    """A program of the given kind of brokenness, and a word its reason must contain."""
    if kind == "missing":
        return str(case_dir / "no-such-agent"), "no-such-agent"
    if kind == "directory":
        return str(case_dir), "executable"
    path = case_dir / "agent"
    if kind == "not-executable":
        path.write_text("#!/bin/sh\nexit 0\n")
        os.chmod(path, 0o644)
        return str(path), "executable"
    path.write_text("#!/nonexistent/interpreter\n")
    os.chmod(path, 0o755)
    return str(path), "interpreter"


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory", "bad-interpreter"])
def test_unrunnable_agent_is_temporary(kind: str, case_dir: Path, message: int) -> None:
    program, word = _unrunnable(case_dir, kind)
    policy = Policy.load("filter", overrides={"identity.uid_pool": HOSTILE_POOL,
                                              "filesystem.readable": json.dumps([str(case_dir)])})
    result = run_quiet([program], policy, message, case_dir)
    assert result.exit_status == TEMPFAIL, result
    assert result.outcome in ("config-error", "internal-error"), result
    assert word in result.reason, f"reason does not say why: {result.reason!r}"


def test_dynamic_program_under_strict(case_dir: Path, message: int) -> None:
    policy = Policy.load("strict")
    result = run_quiet(["/bin/cat"], policy, message, case_dir)
    assert result.exit_status == TEMPFAIL, result
    assert result.outcome != "ok" and result.reason, result


def test_policy_path_vanished(case_dir: Path) -> None:
    path = case_dir / "gone.toml"
    path.write_text('description = "soon gone"\n')
    path.unlink()
    with pytest.raises(PolicyError, match="gone.toml"):
        Policy.load(str(path))
    with open(os.devnull, "rb") as stdin:
        process = cli("run", "-p", str(path), "--", "/bin/true", stdin=stdin)
    _, err = process.communicate(timeout=60)
    assert process.returncode == TEMPFAIL
    first = err.decode().splitlines()[0]
    assert first.startswith("4.") and "gone.toml" in first, first


def test_writable_directory_vanished(case_dir: Path, message: int) -> None:
    gone = case_dir / "gone-Maildir"
    policy = Policy.load("deliver", overrides={"filesystem.writable": json.dumps([str(gone)])})
    result = run_quiet(["/bin/cat"], policy, message, case_dir)
    assert result.exit_status == TEMPFAIL, result
    assert "gone-Maildir" in result.reason, result.reason


def test_proc_missing_inside(case_dir: Path, message: int) -> None:
    policy = Policy.load("filter", overrides={"identity.uid_pool": HOSTILE_POOL})
    result = run_quiet(["/bin/cat", "/proc/self/status"], policy, message, case_dir)
    assert result.exit_status == TEMPFAIL and result.outcome == "agent-failed", result


def test_uid_pool_exhausted(case_dir: Path, message: int) -> None:
    pool = "60990-60990"
    with open(os.devnull, "rb") as stdin:
        holder = cli("run", "-p", "filter", f"--set=identity.uid_pool={pool}", "--",
                     PYTHON, "-c", HANG, stdin=stdin)
    try:
        wait_started(holder)   # the holder's compartment is running with the only uid
        policy = Policy.load("filter", overrides={"identity.uid_pool": pool})
        result = run_quiet(["/bin/cat"], policy, message, case_dir)
        assert result.exit_status == TEMPFAIL, result
        assert result.outcome == "config-error", result
        assert "pool" in result.reason and "60990" in result.reason, result.reason
    finally:
        holder.send_signal(signal.SIGTERM)   # our own CLI child
        holder.communicate(timeout=30)


# Runs as root in a fresh interpreter: the child enters a new user namespace in which it sets
# user.max_user_namespaces = 0 (that limit is per user namespace, so the host's setting and the
# other tests on this host are untouched), becomes nobody, and execs the CLI, which must then
# refuse to run unconfined.  The parent writes the child's id maps, which needs root outside.
_NO_USERNS = """
import ctypes, os, sys
to_child_r, to_child_w = os.pipe()
to_parent_r, to_parent_w = os.pipe()
pid = os.fork()
if pid == 0:
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
        os._exit(90)
    os.write(to_parent_w, b"u")
    os.read(to_child_r, 1)
    if sys.argv[1] == "0":
        with open("/proc/sys/user/max_user_namespaces", "w") as knob:
            knob.write("0")
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    os.execv(sys.executable, [sys.executable, "-m", "compartment", *sys.argv[2:]])
os.read(to_parent_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as ids:
        ids.write("0 0 1\\n65534 65534 1\\n")
os.write(to_child_w, b"g")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _as_nobody(max_user_namespaces: int) -> subprocess.CompletedProcess[bytes]:
    pythonpath = str(Path(compartment.__file__).parents[1])
    return subprocess.run(
        [sys.executable, "-c", _NO_USERNS, str(max_user_namespaces), "run", "-p", "filter",
         "--", "/bin/true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath}, check=False)


def test_user_namespaces_disabled_unprivileged() -> None:
    baseline = _as_nobody(1000)
    if baseline.returncode == 90:
        pytest.skip("this kernel does not let root create a user namespace")
    assert baseline.returncode == 0, f"unprivileged mode fails even with user namespaces: " \
                                     f"{baseline.stderr.decode()[:400]}"
    refused = _as_nobody(0)
    assert refused.returncode == TEMPFAIL, refused.stderr
    first = refused.stderr.decode().splitlines()[0]
    assert first.startswith("4.") and "user namespace" in first, first


def test_deliver_with_stdin_a_character_device(maildir: Path, case_dir: Path) -> None:
    """Found by the CLI properties: with stdin /dev/null, deliver's full-read check raised
    ENOTTY after the agent had delivered, turning a delivery into a temporary failure (and so a
    duplicate on retry)."""
    policy = Policy.load("deliver", overrides={"filesystem.writable": json.dumps([str(maildir)])})
    with open(os.devnull, "rb") as stdin:
        result = run_quiet(["/bin/cat"], policy, stdin.fileno(), case_dir)
    assert (result.outcome, result.exit_status) == ("ok", 0), result.reason
