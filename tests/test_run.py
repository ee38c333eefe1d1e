"""compartment.run() and `compartment run` end to end: messages, limits, failures, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from agentrun import PYTHON, run_agent

from compartment import Outcome, Policy, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs compartments as root (as CI "
                                "does); the unprivileged mode has its own test")
CLI = [sys.executable, "-m", "compartment"]


@pytest.mark.parametrize("message", [b"", b"x", b"no trailing newline",
                                     bytes(range(256)) * 40, b"A" * (1 << 20) + b"\n",
                                     b"From: a@b\r\n\r\nbody\r\n.\r\n"])
def test_cat_passes_the_message_byte_exact(message):
    ran = run_agent(["/bin/cat"], message=message)
    assert ran.result.outcome is Outcome.OK and ran.result.exit_status == 0
    assert ran.stdout == message
    assert ran.result.bytes_in == len(message) and ran.result.bytes_out == len(message)


def test_strict_runs_a_static_program_and_nothing_else(static_cat):
    ran = run_agent([static_cat], "strict", b"prison\n")
    assert (ran.result.outcome, ran.stdout) == (Outcome.OK, b"prison\n")
    dynamic = run_agent(["/bin/cat"], "strict", b"x")  # no dynamic loader in the empty root
    assert dynamic.result.outcome is Outcome.CONFIG_ERROR
    assert "exec: execve" in dynamic.result.reason and dynamic.result.exit_status == 75


def test_timeout_kills_the_whole_compartment():
    ran = run_agent(["/bin/sh", "-c", "sleep 60 & sleep 60 & sleep 60"],
                    overrides={"limits.wall_timeout_s": "0.3"})
    assert ran.result.outcome is Outcome.TIMEOUT and ran.result.exit_status == 75
    assert 0.3 <= ran.result.wall_s < 2
    # The reason names the setting to change and its value.
    assert ran.stderr.startswith(b"4.4.7 compartment: timed out: limits.wall_timeout_s = 0.3\n")


# Touches 96 MiB, burns 0.3 s of CPU, then writes without end: killed for its output.
USES_THEN_FLOODS = """\
import sys, time
memory = bytearray(96 << 20)
for i in range(0, len(memory), 4096):
    memory[i] = 1
while time.process_time() < 0.3:
    pass
while True:
    sys.stdout.write("x" * 65536)
"""


# The agent itself, or a shell whose child does the work: the child is in the agent's
# process group, killed with it and reaped by the init, so it is counted too.
AGENTS_THAT_USE = {"agent": [PYTHON, "-c", USES_THEN_FLOODS],
                   "agent's child": ["/bin/sh", "-c", '"$0" -c "$1"; :', PYTHON,
                                     USES_THEN_FLOODS]}


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "unprivileged"])
@pytest.mark.parametrize("who", AGENTS_THAT_USE)
def test_a_killed_run_reports_what_the_agent_used(as_nobody, who):
    """The compartment is ended by killing the agent's process group first, so the report of
    a killed run carries the CPU time and peak memory they used, not only the init's."""
    argv = AGENTS_THAT_USE[who]
    overrides = ["limits.output_bytes=1M", "limits.memory_bytes=512M"]
    if not as_nobody:
        ran = run_agent(argv, overrides=overrides)
        record = json.loads(ran.result.to_json())
    else:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as reports:  # pytest's is root's
            os.chown(reports, 65534, 65534)
            report = Path(reports, "report.jsonl")
            command = [sys.executable, "-m", "compartment", "run", "--report", str(report),
                       *(f"--set={o}" for o in overrides), "--", *argv]
            subprocess.run(command, user=65534, group=65534, extra_groups=[],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=120,
                           check=False)
            record = json.loads(report.read_text())
    assert record["outcome"] == "output-limit", record
    assert record["cpu_s"] >= 0.3, record
    assert record["peak_memory_bytes"] >= 96 << 20, record
    assert record["bytes_out"] == (1 << 20) + 1, record


def test_output_limit_kills_a_flood():
    ran = run_agent([PYTHON, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"],
                    overrides={"limits.output_bytes": "100K"})
    assert ran.result.outcome is Outcome.OUTPUT_LIMIT and ran.result.exit_status == 75
    assert len(ran.stdout) == 100 << 10


def test_stderr_flood_is_bounded_and_reason_comes_first():
    ran = run_agent([PYTHON, "-c", "import sys\nwhile True: sys.stderr.write('e' * 4096)"],
                    overrides={"limits.output_bytes": "1M"})
    assert ran.result.outcome is Outcome.OUTPUT_LIMIT
    assert ran.stderr.startswith(b"4.3.0 compartment: wrote more than 1048576 bytes")
    assert len(ran.stderr) < 4096


def test_one_pipe_for_stdout_and_stderr_gets_the_reason_first(tmp_path):
    """Postfix pipe(8) reads the command's stdout and stderr from one pipe."""
    policy = Policy.load("filter", {"limits.wall_timeout_s": "0.3"})
    with open(tmp_path / "out", "w+b") as both, open("/dev/null", "rb") as empty:
        result = run(["/bin/sh", "-c", "echo chatter; sleep 5"], policy, stdin=empty,
                     stdout=both, stderr=both)
        both.seek(0)
        text = both.read()
    assert result.outcome is Outcome.TIMEOUT
    assert text.startswith(b"4.4.7 compartment: timed out: ") and b"chatter" in text


def test_require_full_read_keeps_a_message_the_agent_ignored(tmp_path):
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    os.chown(maildir, 65534, 65534)
    overrides = {"filesystem.writable": str(maildir)}
    ran = run_agent(["/bin/true"], "deliver", b"a message nobody read\n", overrides)
    assert ran.result.outcome is Outcome.AGENT_FAILED and ran.result.exit_status == 75
    assert ran.stderr.startswith(b"4.3.0 compartment: agent exited 0 without reading")
    ran = run_agent(["/bin/sh", "-c", "cat >/dev/null"], "deliver", b"read it all\n", overrides)
    assert ran.result.outcome is Outcome.OK


def test_require_full_read_with_a_pipe():
    policy = Policy.load("filter", {"exit.require_full_read": "true"})
    for agent, expected in ((["/bin/true"], Outcome.AGENT_FAILED), (["/bin/cat"], Outcome.OK)):
        read_end, write_end = os.pipe()
        os.write(write_end, b"message on a pipe\n")
        os.close(write_end)
        with open("/dev/null", "wb") as sink:
            result = run(agent, policy, stdin=read_end, stdout=sink, stderr=sink)
        os.close(read_end)
        assert result.outcome is expected
        assert result.bytes_in is None  # a pipe handed over directly is not counted


def test_agent_status_and_its_stderr_reach_the_caller():
    ran = run_agent(["/bin/sh", "-c", "echo 'no such user' >&2; exit 67"])
    assert (ran.result.outcome, ran.result.exit_status) == (Outcome.AGENT_FAILED, 67)
    assert ran.stderr == b"no such user\n"
    ran = run_agent(["/bin/sh", "-c", "echo 'mailbox locked' >&2; exit 73"])
    assert (ran.result.agent_status, ran.result.exit_status) == (73, 75)  # Postfix bounces 73


def test_killed_by_a_signal_is_temporary():
    ran = run_agent([PYTHON, "-c", "import ctypes; ctypes.string_at(0)"])  # a real fault
    assert ran.result.outcome is Outcome.SIGNAL and ran.result.agent_signal == 11
    assert ran.result.exit_status == 75


def test_missing_and_unexecutable_programs_are_configuration_errors(tmp_path):
    missing = run_agent(["/nonexistent/agent"])
    assert missing.result.outcome is Outcome.CONFIG_ERROR and missing.result.exit_status == 75
    assert b"program /nonexistent/agent: /nonexistent: No such file or directory" in \
        missing.stderr
    plain = tmp_path / "agent"
    plain.write_text("#!/bin/sh\n")
    not_exec = run_agent([str(plain)])
    assert "not an executable file" in not_exec.result.reason


def test_qmail_caller_gets_111_and_a_plain_reason():
    ran = run_agent(["/bin/sleep", "5"], overrides={"limits.wall_timeout_s": "0.2"},
                    exit_codes="qmail")
    assert ran.result.exit_status == 111
    assert ran.stderr.startswith(b"compartment: timed out")


def test_violation_may_be_made_permanent_by_policy():
    ran = run_agent([PYTHON, "-c", "import socket; socket.socket(socket.AF_INET)"],
                    overrides={"exit.violation": "permanent"})
    assert ran.result.outcome is Outcome.VIOLATION and ran.result.exit_status == 77
    assert ran.stderr.startswith(b"5.7.0 ")


def test_report_line_has_every_field(tmp_path):
    report = tmp_path / "report.jsonl"
    run_agent(["/bin/cat"], message=b"hello\n", report=str(report))
    run_agent(["/bin/sleep", "5"], overrides={"limits.wall_timeout_s": "0.2"},
              report=str(report))
    first, second = (json.loads(line) for line in report.read_text().splitlines())
    assert set(first) == {"time", "outcome", "exit_status", "reason", "policy", "program",
                          "argv", "uid", "agent_status", "agent_signal", "denied_syscall",
                          "cpu_s", "wall_s", "peak_memory_bytes", "bytes_in", "bytes_out"}
    assert (first["outcome"], first["bytes_in"], first["bytes_out"]) == ("ok", 6, 6)
    assert (second["outcome"], second["exit_status"]) == ("timeout", 75)


def test_unwritable_report_does_not_change_the_outcome(tmp_path):
    ran = run_agent(["/bin/cat"], message=b"hi\n", report="/nonexistent/dir/report.jsonl")
    assert ran.result.outcome is Outcome.OK and ran.result.exit_status == 0
    assert b"compartment: report /nonexistent/dir/report.jsonl: /nonexistent: No such file" \
        in ran.stderr


def test_uid_pool_gives_concurrent_compartments_distinct_uids():
    script = "id -u; sleep 0.5"
    procs = [subprocess.Popen([*CLI, "run", "--", "/bin/sh", "-c", script],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for _ in range(4)]
    uids = [int(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(uids)) == 4 and all(60000 <= uid <= 60999 for uid in uids)


def test_uid_pool_exhausted_is_a_temporary_failure():
    pool = ["--set", "identity.uid_pool=59990-59990"]
    holder = subprocess.Popen([*CLI, "run", *pool, "--", "/bin/sleep", "2"],
                              stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        second = subprocess.run([*CLI, "run", *pool, "--", "/bin/true"],
                                stdin=subprocess.DEVNULL, capture_output=True)
    finally:
        holder.wait()
    assert second.returncode == 75
    assert b"uid pool 59990-59990: all 1 uids are in use" in second.stderr


def test_cli_usage_errors_never_bounce():
    for args, status in ((["run", "--bogus"], 75), (["run", "--exit-codes", "qmail", "--bogus"],
                                                     111), (["run"], 75), (["frobnicate"], 75)):
        result = subprocess.run([*CLI, *args], capture_output=True, stdin=subprocess.DEVNULL)
        assert result.returncode == status, (args, result.stderr)
        assert result.stderr


def test_cli_check_and_policies():
    listing = subprocess.run([*CLI, "policies"], capture_output=True, text=True)
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == sorted(names) and {"deliver", "filter", "strict"} <= set(names)
    good = subprocess.run([*CLI, "check", "-p", "strict"], capture_output=True, text=True)
    assert good.returncode == 0 and 'root = "empty"' in good.stdout
    bad = subprocess.run([*CLI, "check", "--set", "limits.cpu_seconds=x"], capture_output=True,
                         text=True)
    assert bad.returncode == 78 and "limits.cpu_seconds: expected a whole number" in bad.stderr


@pytest.mark.parametrize(("convention", "status", "prefix"),
                         [("sysexits", 75, "4.3.5 "), ("qmail", 111, "")])
def test_cli_internal_error_is_a_temporary_failure(convention, status, prefix):
    # A bug of ours must not exit 1, which Postfix and Exim take as a bounce.
    crash = ("import compartment.cli as cli; cli.main = lambda *_: 1 // 0; cli.command()")
    result = subprocess.run([sys.executable, "-I", "-c", crash, "run", "--exit-codes", convention,
                             "--", "/bin/true"], capture_output=True, text=True)
    assert result.returncode == status
    assert result.stderr == (f"{prefix}compartment: internal error: ZeroDivisionError: "
                             "integer division or modulo by zero\n")


@pytest.mark.parametrize("raised", ["KeyboardInterrupt()", "MemoryError()", "SystemExit(0)",
                                    "SystemExit('bye')"])
def test_cli_any_exception_at_all_is_a_temporary_failure(raised):
    """BaseException too: a stray SystemExit(0) would be a success nobody delivered."""
    crash = ("import compartment.cli as cli\ndef main(*_):\n    raise " + raised +
             "\ncli.main = main; cli.command()")
    result = subprocess.run([sys.executable, "-I", "-c", crash, "run", "--", "/bin/true"],
                            capture_output=True, text=True)
    assert result.returncode == 75
    assert result.stderr.startswith("4.3.5 compartment: internal error: ")
    assert result.stderr.count("\n") == 1


def test_cli_run_bad_policy_is_a_temporary_failure_with_a_reason():
    result = subprocess.run([*CLI, "run", "-p", "/nonexistent.toml", "--", "/bin/true"],
                            capture_output=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 75
    assert result.stderr.startswith(b"4.3.5 compartment: policy: /nonexistent.toml: cannot read")


def test_cli_terminated_by_a_signal_exits_temporary_and_kills_the_agent(tmp_path):
    report = tmp_path / "r.jsonl"
    cli = subprocess.Popen([*CLI, "run", "--report", str(report), "--", "/bin/sleep", "60"],
                           stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    cli.terminate()
    _, stderr = cli.communicate(timeout=10)
    assert cli.returncode == 75
    assert stderr.startswith(b"4.3.0 compartment: interrupted by SIGTERM")
    assert json.loads(report.read_text())["outcome"] == "internal-error"


def test_uid_left_dirty_is_swept_before_reuse():
    """A supervisor that died mid-run leaves its uid's lease marked; the next lease kills every
    process of that uid (as that uid) before the uid is used again."""
    uid = 59995  # outside the default pool, so no concurrent run can lease it
    straggler = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                  "--clear-groups", "/bin/sleep", "60"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{straggler.pid}/comm").read_text() != "sleep\n":  # ids switched
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.makedirs("/run/compartment/uids", exist_ok=True)
    with open(f"/run/compartment/uids/{uid}", "wb") as lease:
        lease.write(b"x")  # what a crashed supervisor leaves behind
    try:
        ran = run_agent(["/bin/true"], overrides={"identity.uid_pool": f"{uid}-{uid}"})
        assert ran.result.outcome is Outcome.OK and ran.result.uid == uid
        assert straggler.wait(timeout=5) == -9  # SIGKILL, from the sweep
    finally:
        if straggler.poll() is None:
            straggler.kill()
            straggler.wait()
    assert Path(f"/run/compartment/uids/{uid}").read_bytes() == b""  # released clean


def test_script_interpreter_must_be_inside(tmp_path):
    script = tmp_path / "agent.pl"
    script.write_text("#!/usr/bin/perl\nprint 1;\n")
    script.chmod(0o755)
    ran = run_agent([str(script)], "strict")
    assert ran.result.outcome is Outcome.CONFIG_ERROR
    assert "its #! interpreter /usr/bin/perl is not inside the compartment" in ran.result.reason
    script.write_text("#!/nonexistent/perl\n")
    assert "'/nonexistent/perl' does not exist" in run_agent([str(script)]).result.reason


def test_full_read_of_dev_null_counts_as_read(tmp_path):
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    os.chown(maildir, 65534, 65534)
    policy = Policy.load("deliver", {"filesystem.writable": str(maildir)})
    with open(os.devnull, "rb") as empty, open(os.devnull, "wb") as sink:
        result = run(["/bin/true"], policy, stdin=empty, stdout=sink, stderr=sink)
    assert result.outcome is Outcome.OK  # no retry, so no second delivery


def test_one_file_for_stdout_and_stderr_keeps_all_output(tmp_path):
    """`> out 2>&1`: past 4 KiB the agent's output is data, passed on whole, never cut."""
    message = os.urandom(10240)
    policy = Policy.load("filter")
    with open(tmp_path / "out", "w+b") as both, open(tmp_path / "msg", "w+b") as stdin:
        stdin.write(message)
        stdin.seek(0)
        result = run(["/bin/cat"], policy, stdin=stdin, stdout=both, stderr=both)
        both.seek(0)
        assert both.read() == message
    assert result.outcome is Outcome.OK and result.bytes_out == len(message)


@pytest.mark.parametrize("size", [8 << 20, 512 << 10])
def test_a_caller_that_stops_reading_does_not_stop_the_deadline(tmp_path, size):
    """The agent's output goes to a pipe nobody drains: the deadline must still fire, also when
    the agent has exited and its last output (512 KiB fit in the agent's pipe) waits for room."""
    report = tmp_path / "r.jsonl"
    cli = subprocess.Popen([*CLI, "run", "--report", str(report), "--set",
                            "limits.wall_timeout_s=0.5", "--", PYTHON, "-c",
                            f"import sys; sys.stdout.buffer.write(b'x' * {size})"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    try:
        status = cli.wait(timeout=20)  # without reading stdout: its pipe stays full
    finally:
        cli.kill()
        cli.communicate()
    record = json.loads(report.read_text())
    assert (status, record["outcome"]) == (75, "timeout")
    assert record["wall_s"] < 2


def test_a_caller_that_stops_reading_one_pipe_for_both_streams(tmp_path):
    """Postfix's way: one pipe for stdout and stderr.  Output past the diagnostics spills to
    it; while nobody reads it, the deadline still fires (the spill used to block the watch
    until the caller read again, here 3 s later)."""
    report = tmp_path / "r.jsonl"
    cli = subprocess.Popen([*CLI, "run", "--report", str(report), "--set",
                            "limits.wall_timeout_s=0.5", "--", PYTHON, "-c",
                            "import sys, time; out = sys.stdout.buffer; out.write(b'x' * 100);"
                            "out.flush(); time.sleep(0.1); out.write(b'x' * (1 << 20))"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        cli.communicate(timeout=20)  # now read: the reason line waits in the pipe too
    finally:
        cli.kill()
    record = json.loads(report.read_text())
    assert (cli.returncode, record["outcome"]) == (75, "timeout")
    assert record["wall_s"] < 1.5


def test_output_through_a_slow_pipe_arrives_whole():
    """The caller's 64 KiB pipe fills and drains many times over: nothing is lost."""
    message = os.urandom(8 << 20)
    done = subprocess.run([*CLI, "run", "--", "/bin/cat"], input=message, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == message


def test_delivery_left_to_a_child_is_finished(tmp_path):
    """An agent that exits 0 and leaves the write to a background child: delivered, as it would
    be unconfined, not cut off by the end of the compartment."""
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    os.chown(maildir, 65534, 65534)
    script = 'cat > /tmp/m; (sleep 0.3; cp /tmp/m "$0/delivered") >/dev/null 2>&1 & exit 0'
    ran = run_agent(["/bin/sh", "-c", script, str(maildir)], "deliver", b"a message\n",
                    {"filesystem.writable": str(maildir)})
    assert (ran.result.outcome, ran.result.exit_status) == (Outcome.OK, 0), ran.stderr
    assert (maildir / "delivered").read_bytes() == b"a message\n"


def test_child_still_busy_at_the_deadline_is_a_timeout():
    """The agent exited 0, but its compartment was not done: never a success."""
    script = "cat >/dev/null; sleep 60 </dev/null >/dev/null 2>&1 & exit 0"
    ran = run_agent(["/bin/sh", "-c", script], message=b"m\n",
                    overrides={"limits.wall_timeout_s": "0.5"})
    assert (ran.result.outcome, ran.result.exit_status) == (Outcome.TIMEOUT, 75)
    assert ran.result.agent_status == 0
    assert ran.stderr == (b"4.4.7 compartment: timed out: limits.wall_timeout_s = 0.5 (the "
                          b"agent had exited 0; a process it left was still running)\n")


# --- every way out of the installed command is a contract status -------------------------

COMMAND = str(Path(sys.executable).parent / "compartment")
DELIVERS = ["/bin/sh", "-c", "cat >/dev/null"]  # reads the message, writes nothing
WRITES = ["/bin/cat"]  # writes the message back out
# redirection -> (run: delivers, writes; filter: delivers, writes) as (status, our reason)
STDIO_CASES = {
    "<&-": [(75, "stdin is closed: there is no message")] * 4,
    ">&-": [(0, None), (75, None),  # cat's own write error, its exit 1 translated
            (75, "the filter wrote an empty message"),
            (75, "stdout: cannot copy the message: Bad file descriptor")],
    "2>&-": [(0, None), (0, None), (75, None), (0, None)],
    ">/dev/full": [(0, None), (75, "cannot write the agent's output: No space left on device"),
                   (75, "the filter wrote an empty message"),
                   (75, "stdout: cannot copy the message: No space left on device")],
    "broken-pipe": [(0, None), (75, "cannot write the agent's output: Broken pipe"),
                    (75, "the filter wrote an empty message"),
                    (75, "stdout: cannot copy the message: Broken pipe")],
}


def _command_with(redirect: str, *args: str) -> subprocess.CompletedProcess:
    """The installed command from a shell that closed or redirected one of its descriptors."""
    read_end, stdout = os.pipe()
    if redirect == "broken-pipe":
        os.close(read_end)  # the reader is gone before anything is written
    shell_redirect = "" if redirect == "broken-pipe" else redirect
    try:
        return subprocess.run(["/bin/sh", "-c", f'exec "$0" "$@" {shell_redirect}', COMMAND,
                               *args], input=b"Subject: x\n\nbody\n", stdout=stdout,
                              stderr=subprocess.PIPE, timeout=60, check=False)
    finally:
        os.close(stdout)
        if redirect != "broken-pipe":
            os.close(read_end)


@pytest.mark.parametrize("redirect", list(STDIO_CASES))
@pytest.mark.parametrize("index, command, agent", [(0, "run", DELIVERS), (1, "run", WRITES),
                                                   (2, "filter", DELIVERS),
                                                   (3, "filter", WRITES)],
                         ids=["run-delivers", "run-writes", "filter-delivers", "filter-writes"])
def test_command_exits_in_the_contract_whatever_its_descriptors(redirect, index, command,
                                                                 agent):
    status, reason = STDIO_CASES[redirect][index]
    done = _command_with(redirect, command, "--", *agent)
    assert done.returncode == status, done.stderr
    assert b"Traceback" not in done.stderr
    ours = [line for line in done.stderr.splitlines() if b"compartment:" in line]
    if redirect == "2>&-":
        assert done.stderr == b""  # closed: nothing to read, and nothing broke for it
    elif reason:
        assert ours == [f"4.3.{'5' if 'stdin' in reason else '0'} compartment: "
                        f"{reason}".encode()], done.stderr
    else:
        assert ours == [], done.stderr


@pytest.mark.parametrize("redirect", ["<&-", ">&-", ">/dev/full"])
def test_command_speaks_qmail_whatever_its_descriptors(redirect):
    done = _command_with(redirect, "filter", "--exit-codes", "qmail", "--", *DELIVERS)
    assert done.returncode == 111, done.stderr
    assert b"Traceback" not in done.stderr and done.stderr.startswith(b"compartment: ")


@pytest.mark.parametrize("args, status", [
    (["run", "--help", "--", "/bin/touch", "{marker}"], 75),
    (["run", "-h"], 75), (["run", "--exit-codes", "qmail", "--help"], 111),
    (["filter", "--help", "--", "/bin/touch", "{marker}"], 75),
    (["--help"], 0), (["check", "--help"], 0), (["policies", "--help"], 0),
    (["learn", "--help", "--", "/bin/touch", "{marker}"], 0), (["audit", "--help"], 0),
    (["status", "--help"], 0), (["serve", "--help"], 0), (["lmtp", "--help"], 0),
    (["milter", "-h"], 0)])
def test_help_runs_nothing_and_is_a_failure_only_for_a_delivery(tmp_path, args, status):
    """An MTA that runs `compartment run --help -- PROGRAM` must not record a delivery; every
    other command answers its --help with its usage and 0."""
    marker = tmp_path / "ran"
    done = subprocess.run([COMMAND, *(a.format(marker=marker) for a in args)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert done.returncode == status and not marker.exists()
    if status:  # the help on stderr, after the one reason line MTAs read
        assert done.stdout == b"" and b"usage: compartment" in done.stderr
        assert done.stderr.split(b"\n")[0].endswith(b"help requested; nothing was run")
    else:
        assert b"usage: compartment" in done.stdout


@pytest.mark.parametrize("python, said", [
    ("/usr/bin/python3", b"compartment: cannot start: ModuleNotFoundError: No module named "
                         b"'compartment'"),
    (None, b"compartment: cannot run {dir}/python: the installation is broken")])
@pytest.mark.parametrize("convention, status, prefix", [("sysexits", 75, b"4.3.5 "),
                                                        ("qmail", 111, b"")])
def test_broken_installation_is_a_temporary_failure(tmp_path, python, said, convention, status,
                                                    prefix):
    """The command's shell and its guarded import: no 1 or 127 for a broken install."""
    (tmp_path / "compartment").write_bytes(Path(COMMAND).read_bytes())
    (tmp_path / "compartment").chmod(0o755)
    if python:
        (tmp_path / "python").symlink_to(python)  # an interpreter without the package
    done = subprocess.run([str(tmp_path / "compartment"), "run", "--exit-codes", convention,
                           "--", "/bin/true"], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=60)
    assert done.returncode == status
    assert done.stderr == prefix + said.replace(b"{dir}", bytes(tmp_path)) + b"\n"
