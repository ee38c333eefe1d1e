"""compartment filter and the message modes: nothing lost, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from agentrun import PROBE, PYTHON, run_agent

from compartment import Outcome, Policy
from compartment.filtering import filter_message

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs compartments as root (as CI "
                                "does); the unprivileged mode has its own test")
MESSAGE = b"Subject: hello\n\nbody text\n"
CLI = [sys.executable, "-m", "compartment", "filter"]


def filt(args, message=MESSAGE, **kwargs):
    return subprocess.run([*CLI, *args], input=message, capture_output=True, **kwargs)


def test_new_message_goes_to_stdout():
    done = filt(["--", "/bin/sed", "s/body/BODY/"])
    assert (done.returncode, done.stdout) == (0, b"Subject: hello\n\nBODY text\n")


def test_output_file_is_whole_or_absent(tmp_path):
    out = tmp_path / "new.eml"
    assert filt(["--output", str(out), "--", "/bin/cat"]).returncode == 0
    assert out.read_bytes() == MESSAGE
    out.unlink()
    failed = filt(["--output", str(out), "--", "/bin/sh", "-c", "cat; exit 1"])
    assert failed.returncode == 75 and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_empty_result_is_a_temporary_failure(tmp_path):
    done = filt(["--output", str(tmp_path / "x"), "--", "/bin/true"])
    assert done.returncode == 75
    assert done.stderr.startswith(b"4.3.0 compartment: the filter wrote an empty message")


@pytest.mark.parametrize("agent", [["/bin/sh", "-c", "exit 1"], ["/bin/sleep", "10"],
                                   [PYTHON, "-c", "import socket; socket.socket(2)"]])
def test_on_failure_pass_hands_on_the_original(tmp_path, agent):
    out = tmp_path / "new.eml"
    done = filt(["--set", "filter.on_failure=pass", "--set", "limits.wall_timeout_s=0.5",
                 "--output", str(out), "--", *agent])
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == MESSAGE


def test_reinject_runs_sendmail_with_an_argv_list(tmp_path):
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n"
                        f"cat > {tmp_path}/stdin\n")
    sendmail.chmod(0o755)
    sender, recipient = "a@example.org", "-oi;rm -rf /@example.net"  # never a shell string
    done = filt(["--reinject", sender, recipient, "b@example.net", "--sendmail", str(sendmail),
                 "--", "/bin/sed", "s/body/BODY/"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-G", "-i", "-f", sender, "--", recipient, "b@example.net"]
    assert (tmp_path / "stdin").read_bytes() == b"Subject: hello\n\nBODY text\n"


def test_failed_reinjection_is_temporary():
    done = filt(["--reinject", "a@b", "c@d", "--sendmail", "/bin/false", "--", "/bin/cat"])
    assert done.returncode == 75
    assert b"re-injection: /bin/false exited 1" in done.stderr


def test_filter_api_with_a_pipe_keeps_the_original(tmp_path):
    read_end, write_end = os.pipe()
    os.write(write_end, MESSAGE)
    os.close(write_end)
    policy = Policy.load("filter", {"filter.on_failure": "pass"})
    with open(os.devnull, "wb") as sink:
        result = filter_message(["/bin/sh", "-c", "cat >/dev/null; exit 1"], policy,
                                stdin=read_end, output=str(tmp_path / "out"), stderr=sink.fileno())
    os.close(read_end)
    assert result.exit_status == 0 and "passed on unchanged" in result.reason
    assert (tmp_path / "out").read_bytes() == MESSAGE


SEEK_AND_WRITE = ("import os; a = os.read(0, 100); os.lseek(0, 0, 0); b = os.read(0, 100); "
                  "print(a == b, end=' ')\ntry:\n    os.write(0, b'x'); print('wrote')\n"
                  "except OSError as e: print('refused', e.errno)")


@pytest.mark.parametrize("mode, expected", [("memfd", b"True refused 9\n"),
                                            ("file", b"True wrote\n")])
def test_message_modes(mode, expected):
    ran = run_agent([PYTHON, "-c", SEEK_AND_WRITE], message=MESSAGE,
                    overrides={"message.stdin": mode})
    assert ran.stdout == expected


def test_direct_pipe_is_not_seekable():
    read_end, write_end = os.pipe()
    os.write(write_end, MESSAGE)
    os.close(write_end)
    done = subprocess.run([sys.executable, "-m", "compartment", "run", "--", PYTHON, "-c",
                           "import os; os.lseek(0, 0, 0)"], stdin=read_end, capture_output=True)
    os.close(read_end)
    assert done.returncode == 75 and b"Illegal seek" in done.stderr


def test_oversized_message_is_refused_with_a_reason():
    ran = run_agent(["/bin/cat"], message=b"x" * 5000,
                    overrides={"message.stdin": "memfd", "message.max_bytes": "4K"})
    assert ran.result.outcome is Outcome.CONFIG_ERROR and ran.result.exit_status == 75
    assert "larger than message.max_bytes (4096)" in ran.result.reason


def test_file_mode_copy_is_memory_bounded_by_the_file_size_limit():
    """The private copy the agent may edit is a memfd: nothing of it lands on the host's
    /var/tmp, and its growth is bounded by limits.file_bytes like any file the agent writes."""
    ran = run_agent([PYTHON, "-I", "-c", PROBE, "stdin"], message=MESSAGE,
                    overrides={"message.stdin": "file"})
    seen = ran.json()
    assert seen["access"] == os.O_RDWR and seen["size"] == len(MESSAGE)
    assert seen["dev"] != os.stat("/var/tmp").st_dev
    ran = run_agent([PYTHON, "-I", "-c", PROBE, "grow", str(2 << 20)], message=MESSAGE,
                    overrides={"message.stdin": "file", "limits.file_bytes": "1M"})
    assert ran.json() == {"ok": False, "errno": 27}  # EFBIG


def test_output_a_child_writes_after_the_agent_exited_is_kept_whole():
    """The filter exits 0 and leaves the second half of the new message to a child: the run
    is over when the compartment is empty, so the message is handed on whole, as unconfined."""
    script = "cat > /tmp/m; head -c 10 /tmp/m; (sleep 0.3; tail -c +11 /tmp/m) & exit 0"
    done = filt(["--", "/bin/sh", "-c", script])
    assert (done.returncode, done.stdout) == (0, MESSAGE), done.stderr
