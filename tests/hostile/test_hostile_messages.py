"""Bad messages: whatever the MTA hands over on stdin passes through unchanged to an agent that
reads it, or fails temporarily with a reason; the supervisor never holds the message."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hostile_run import HOSTILE_POOL, TEMPFAIL

SETS = [f"--set=identity.uid_pool={HOSTILE_POOL}", "--set=limits.wall_timeout_s=60"]
MESSAGES = {
    "empty": b"",
    "one-byte": b"x",
    "binary-with-nuls": bytes(range(256)) * 64,
    "no-trailing-newline": b"From: a@example.org\n\nbody without newline",
    "one-mib-line": b"Subject: " + b"y" * (1 << 20) + b"\n\nbody\n",
}
BIG_BODY = 200 << 20
SUPERVISOR_RSS_LIMIT = 120 << 20   # the CLI's interpreter plus buffers, far below the body


def cli_argv(*sets: str) -> list[str]:
    return [sys.executable, "-m", "compartment", "run", "-p", "filter", *SETS, *sets, "--",
            "/bin/cat"]


def cli(stdin: object, stdout: object = subprocess.PIPE, *sets: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cli_argv(*sets), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_message_passes_through(name: str, kind: str, case_dir: Path) -> None:
    message = MESSAGES[name]
    if kind == "file":
        path = case_dir / "message"
        path.write_bytes(message)
        with open(path, "rb") as stdin:
            process = cli(stdin)
            out, err = process.communicate(timeout=60)
    else:
        process = cli(subprocess.PIPE)
        out, err = process.communicate(message, timeout=60)
    assert process.returncode == 0, err
    assert out == message


# A child's ru_maxrss starts at the peak of the process it was forked from (exec keeps the
# larger), and this test runner passes 120 MiB in a full run: the command is started by a small
# launcher, which reports on stderr the status and peak of its own child.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, file=sys.stderr)
"""


def test_big_body_does_not_grow_the_supervisor(case_dir: Path) -> None:
    # cat's output is the body again: let it through (limits.output_bytes is 64M)
    command = cli_argv("--set=limits.output_bytes=1G")
    with open(os.devnull, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, *command],
                                   stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.PIPE)
        assert process.stdin is not None and process.stderr is not None

        def feed() -> None:
            block = b"z" * (1 << 20)
            try:
                for _ in range(BIG_BODY // len(block)):
                    process.stdin.write(block)
            finally:
                process.stdin.close()

        writer = threading.Thread(target=feed)
        writer.start()
        said = process.stderr.read()
        process.wait()
        writer.join()
    assert process.returncode == 0, said
    status, peak_kib = map(int, said.split(b"\n")[-2].split())
    assert status == 0, said
    assert peak_kib * 1024 < SUPERVISOR_RSS_LIMIT, \
        f"peak RSS {peak_kib >> 10} MiB for a {BIG_BODY >> 20} MiB body"


def test_stdin_closed() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.close(0); "
         "os.execv(sys.executable, [sys.executable, '-m', 'compartment', 'run', '-p', "
         "'filter', '--', '/bin/cat'])"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=60)
    assert process.returncode == TEMPFAIL, err
    assert err.startswith(b"4.") and b"stdin" in err.split(b"\n")[0], err


def test_stdin_a_directory_api(case_dir: Path) -> None:
    import compartment

    fd = os.open(case_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(os.devnull, "wb") as sink:
            result = compartment.run(["/bin/cat"], compartment.Policy.load("filter"), stdin=fd,
                                     stdout=sink, stderr=sink)
    finally:
        os.close(fd)
    assert result.exit_status == TEMPFAIL and "directory" in result.reason, result


def test_stdin_a_directory(case_dir: Path) -> None:
    # Through the installed command, as an MTA runs it: CPython itself cannot start with a
    # directory on stdin, so the command's shell answers before Python starts.
    command = Path(sys.executable).parent / "compartment"
    fd = os.open(case_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        process = subprocess.Popen([str(command), "run", "-p", "filter", "--", "/bin/cat"],
                                   stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = process.communicate(timeout=60)
    finally:
        os.close(fd)
    assert process.returncode == TEMPFAIL, err
    assert err.startswith(b"4.") and b"directory" in err.split(b"\n")[0], err


def test_stdin_a_tty() -> None:
    controller, terminal = os.openpty()
    try:
        process = cli(terminal)
        os.write(controller, b"typed line\n\x04")   # a line, then end-of-file
        out, err = process.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == 0, err
    assert out == b"typed line\n"
