"""`compartment learn` end to end on small programs: what the listener records, that learning
lets through what the base refuses (and refuses the baseline), and that the proposal runs what
the base stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrun import PYTHON, run_agent

from compartment import Outcome, Policy
from compartment.learn import LearnError, learn, run_samples

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs compartments as root (as CI "
                                "does); the unprivileged mode has its own test")
CLI = [sys.executable, "-m", "compartment"]


@pytest.fixture
def host() -> Iterator[Path]:
    """A directory outside /tmp (a compartment's /tmp is its own) that others may read."""
    path = Path(tempfile.mkdtemp(prefix="learn-run-", dir="/var/tmp"))
    path.chmod(0o755)
    (path / "data.txt").write_text("data from the host\n")
    (path / "data.txt").chmod(0o644)
    (path / "sample.eml").write_bytes(b"Subject: a sample\n\nbody\n")
    yield path
    shutil.rmtree(path)


def observe(argv: list[str], base: str = "filter", overrides: tuple[str, ...] = (),
            message: bytes = b"Subject: x\n\nbody\n"):
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as sample:
        sample.write(message)
        sample.flush()
        [ran] = run_samples(argv, Policy.load(base, overrides), [sample.name])
    return ran


def test_paths_are_read_from_the_agent_absolute_relative_and_by_descriptor():
    script = ("import os\n"
              "os.chdir('/usr/share')\n"
              "os.path.exists('learn-relative-probe')\n"
              "fd = os.open('/usr/lib', os.O_RDONLY)\n"
              "try:\n    os.stat('learn-dirfd-probe', dir_fd=fd)\n"
              "except FileNotFoundError:\n    pass\n"
              "os.path.exists('/nonexistent/learn-absolute-probe')\n")
    ran = observe([PYTHON, "-I", "-c", script])
    assert ran.result.outcome is Outcome.OK, ran.result.reason
    paths = ran.seen.paths
    assert paths["/usr/share/learn-relative-probe"] == ("newfstatat", False)
    assert paths["/usr/lib/learn-dirfd-probe"][0] == "newfstatat"
    assert "/nonexistent/learn-absolute-probe" in paths and PYTHON in paths


def test_the_baseline_is_refused_with_eperm_and_recorded_and_the_agent_goes_on():
    script = ("import socket, ctypes, errno\n"
              "libc = ctypes.CDLL(None, use_errno=True)\n"
              "assert libc.unshare(0x10000000) == -1 and ctypes.get_errno() == errno.EPERM\n"
              "try:\n    socket.socket(socket.AF_INET)\n"
              "except PermissionError:\n    print('socket refused')\n")
    ran = observe([PYTHON, "-I", "-c", script])
    assert ran.result.outcome is Outcome.OK, ran.diagnostics
    assert set(ran.seen.walls) == {"unshare", "socket(AF_INET)"}
    # Under the same policy without learning, the first of them is a violation.
    plain = run_agent([PYTHON, "-I", "-c", script])
    assert (plain.result.outcome, plain.result.denied_syscall) == (Outcome.VIOLATION, "unshare")


def test_what_the_base_refuses_runs_and_is_recorded():
    script = "import socket; socket.socket(socket.AF_UNIX).close(); print('made a socket')"
    ran = observe([PYTHON, "-I", "-c", script], "formail")
    assert ran.result.outcome is Outcome.OK, ran.diagnostics
    assert ran.seen.refused == {"socket": "socket(AF_UNIX)"}
    assert run_agent([PYTHON, "-I", "-c", script], "formail").result.outcome \
        is Outcome.VIOLATION


def test_processes_memory_and_descriptors_are_measured():
    ran = observe(["/bin/sh", "-c", "sleep 0.2 & sleep 0.2 & wait; exec 7</dev/null; "
                   "cat /dev/null"])
    assert ran.result.outcome is Outcome.OK, ran.diagnostics
    assert ran.seen.peak_processes >= 3 and ran.seen.calls["clone"] >= 2
    assert ran.seen.peak_vm_bytes > 1 << 20 and ran.seen.descriptors >= 8


def test_the_proposal_runs_what_the_base_stopped(host: Path):
    """formail's profile refuses a fork and shows no /var: learned from it, round after round
    as the notes ask, the policy runs the script, which formail's stops."""
    argv = ["/bin/sh", "-c", f'cat "{host}/data.txt" | tr a-z A-Z']
    base = "formail"
    for round_number in range(3):
        learned = learn(argv, base, [], [str(host / "sample.eml")])
        if not any("ended with" in note for note in learned.proposal.notes):
            break
        base = str(host / f"round-{round_number}.toml")
        Path(base).write_text(learned.text)
    written = host / "learned.toml"
    written.write_text(learned.text)
    policy = Policy.load(str(written))
    assert policy.filesystem.readable == (f"{host}/data.txt",)
    assert "clone" not in policy.seccomp.deny  # fork and vfork, which sh never called, stay
    assert policy.limits.processes > 0
    ran = run_agent(argv, policy)
    assert (ran.result.outcome, ran.stdout) == (Outcome.OK, b"DATA FROM THE HOST\n")
    assert run_agent(argv, "formail").result.outcome is Outcome.VIOLATION


def test_the_command_writes_the_proposal_and_says_what_each_sample_did(host: Path):
    output = host / "proposal.toml"
    done = subprocess.run([*CLI, "learn", "-p", "formail", "--sample", str(host / "sample.eml"),
                           "--sample", str(host / "sample.eml"), "--output", str(output), "--",
                           "/bin/cat"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(f"sample {host}/sample.eml: ok (delivered)") == 2
    assert "written to" in done.stderr and done.stdout == ""
    text = output.read_text()
    assert text.startswith("# compartment learn -p formail --sample") and oct(
        output.stat().st_mode & 0o777) == "0o644"
    assert Policy.load(str(output)).seccomp.deny  # it loads, and keeps formail's denials


@pytest.mark.parametrize("argv, status, message", [
    (["learn", "--", "/nonexistent/program"], 78, "No such file"),
    (["learn", "-p", "nonesuch", "--", "/bin/cat"], 78, "no policy named"),
    (["learn", "-p", "filter"], 64, "no PROGRAM given"),
    (["learn", "--bogus"], 64, "unrecognized arguments"),
])
def test_learn_command_errors(argv, status, message):
    done = subprocess.run([*CLI, *argv], input=b"", capture_output=True, timeout=60, check=False)
    assert done.returncode == status and message.encode() in done.stderr, done.stderr


def test_learn_refuses_a_program_that_cannot_start(host: Path):
    with pytest.raises(LearnError, match="No such file"):
        learn(["/nonexistent/program"], "filter", [], [str(host / "sample.eml")])


def test_a_sample_on_stdin_is_measured_like_a_file():
    """No --sample: stdin is the sample, copied first so that its size is known (cat writes
    the message back, so the output bound stays the base's)."""
    done = subprocess.run([*CLI, "learn", "-p", "formail", "--", "/bin/cat"],
                          input=b"Subject: on stdin\n\n" + b"x" * 5000, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert b"sample stdin: ok (delivered)" in done.stderr and b"5019 bytes out" in done.stderr
    assert b"the program writes the message back" in done.stdout
