"""The qmail convention end to end, without qmail: run a .qmail `|command` line as qmail-local
would, and check the statuses qmail-local acts on (0, 99, 100, 111).

qmail-local runs a program line with `/bin/sh -c LINE` (the text after `|`), as the user, in
the user's home directory, with the queue file as standard input (seekable, at offset 0) and
the envelope in the environment: SENDER, NEWSENDER, RECIPIENT, USER, HOME, LOCAL, HOST..HOST4,
EXT..EXT4, DEFAULT, DTLINE, RPLINE, UFLINE.  It reads the exit status as: 0 delivered,
99 delivered and stop reading .qmail, 100 (and 64, 65, 70, 76, 77, 78, 112) permanent,
anything else temporary (111 by convention).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from compartment.exits import Convention, Verdict, classify

from .corpus import corpus, split_trace_headers
from .mailsite import (
    AGENTS,
    PIPE_USER,
    PYTHON,
    SITE,
    check_pipe_user_can_run_compartment,
    compartment_command,
    envelope_records,
    exclusive_site,
    prepare_site,
    read_maildir,
    remove_site,
)

HOME = SITE / "qmail-home"
CANARY = "COMPARTMENT_TEST_CANARY"  # in qmail-local's environment, never in the agent's
RECIPIENT = "alice-list@example.test"


def dot_qmail_line(agent: str, *options: str) -> str:
    """A .qmail program line as an administrator would write it (see examples/qmail)."""
    return (f"|{compartment_command()} run -p deliver --exit-codes qmail"
            " --set filesystem.writable=$HOME/Maildir --set limits.wall_timeout_s=3"
            f" {' '.join(options)} -- {PYTHON} {AGENTS / agent} $HOME/Maildir")


def qmail_environment(home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin", "HOME": str(home), "USER": PIPE_USER,
        "SENDER": "bob@example.org", "NEWSENDER": "bob@example.org",
        "RECIPIENT": RECIPIENT, "LOCAL": "alice-list", "HOST": "example.test",
        "HOST2": "example", "HOST3": "example", "HOST4": "example",
        "EXT": "list", "EXT2": "", "EXT3": "", "EXT4": "", "DEFAULT": "list",
        "DTLINE": f"Delivered-To: {RECIPIENT}\n", "RPLINE": "Return-Path: <bob@example.org>\n",
        "UFLINE": "From bob@example.org Thu Jan  1 00:00:00 2026\n",
        CANARY: "must not reach the agent",
    }


def run_like_qmail_local(line: str, message: bytes, home: Path) -> subprocess.CompletedProcess:
    """What qmail-local does for a `|` line: sh -c, as the user, in $HOME, stdin the file."""
    assert line.startswith("|")
    queue_file = home.parent / "queue-file"  # qmail-local's stdin is the message file itself
    queue_file.write_bytes(message)
    user = pwd.getpwnam(PIPE_USER)
    with queue_file.open("rb") as stdin:
        return subprocess.run(["/bin/sh", "-c", line[1:]], stdin=stdin, capture_output=True,
                              cwd=home, env=qmail_environment(home), user=user.pw_uid,
                              group=user.pw_gid, extra_groups=[], timeout=60, check=False)


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("runs the .qmail line as an unprivileged user, like qmail-local: run as root")
    with exclusive_site():
        yield from _home()


def _home() -> Iterator[Path]:
    prepare_site()
    check_pipe_user_can_run_compartment()
    user = pwd.getpwnam(PIPE_USER)
    for sub in ("", "Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        (HOME / sub).mkdir(exist_ok=True)
        os.chown(HOME / sub, user.pw_uid, user.pw_gid)
    yield HOME
    remove_site()


def test_delivered_exit_0(home: Path) -> None:
    message = corpus("qmail", "bob@example.org", "example.test")[3]  # MIME with attachment
    result = run_like_qmail_local(dot_qmail_line("maildir-deliver.py"), message.data, home)
    assert result.returncode == 0, result.stderr
    split_trace_headers(read_maildir(home / "Maildir")[message.marker], message.data)


def test_envelope_and_seekable_stdin_reach_agent(home: Path) -> None:
    message = corpus("qmail-env", "bob@example.org", "example.test")[0]
    result = run_like_qmail_local(dot_qmail_line("envelope.py"), message.data, home)
    assert result.returncode == 0, result.stderr
    [seen] = [r for r in envelope_records(home / "Maildir") if r["bytes"] == len(message.data)]
    expected = qmail_environment(home)
    for name in ("SENDER", "RECIPIENT", "LOCAL", "HOST", "EXT", "DEFAULT", "DTLINE", "RPLINE"):
        assert seen["env"].get(name) == expected[name], name
    assert CANARY not in seen["env"]
    assert seen["bytes"] == len(message.data)
    assert seen["seekable"] and seen["regular_file"], "qmail hands a seekable file as stdin"


def test_qmail_agent_99_stops_processing(home: Path) -> None:
    # A qmail caller's agent speaks qmail by default: its 99 reaches qmail-local unchanged.
    line = dot_qmail_line("exit_qmail_stop.py")
    assert run_like_qmail_local(line, b"Subject: x\n\nbody\n", home).returncode == 99


def test_permanent_failure_is_100(home: Path) -> None:
    # The agent speaks sysexits (77, EX_NOPERM), as the line says; qmail-local must read a
    # hard failure: 100.
    line = dot_qmail_line("exit_permanent.py", "--agent-exit-codes", "sysexits")
    result = run_like_qmail_local(line, b"Subject: x\n\nb\n", home)
    assert result.returncode == 100, result.stderr


@pytest.mark.parametrize("agent", ["sleeper.py", "socket_inet.py"])
def test_runner_failure_is_111(home: Path, agent: str) -> None:
    result = run_like_qmail_local(dot_qmail_line(agent), b"Subject: x\n\nbody\n", home)
    assert result.returncode == 111, result.stderr


def test_memory_exhausted_is_temporary(home: Path) -> None:
    # Without a memory cgroup, running out of RLIMIT_AS is the agent's own failure (Python's
    # MemoryError, exit 1), which a qmail agent's caller reads as it is: temporary.
    line = dot_qmail_line("memory_hog.py", "--set", "limits.memory_bytes=256M")
    result = run_like_qmail_local(line, b"Subject: x\n\nbody\n", home)
    assert classify(result.returncode, Convention.QMAIL) is Verdict.TEMPORARY, result.stderr
