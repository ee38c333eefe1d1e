"""The exit-status contract as tables: wait status -> outcome -> status, in both conventions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from compartment.api import _outcome
from compartment.cgroups import Usage
from compartment.confine.errors import SetupError
from compartment.exits import (
    Convention,
    Outcome,
    classify,
    diagnostic_line,
    runner_status,
    translate,
)
from compartment.policy import Policy

Q, S = Convention.QMAIL, Convention.SYSEXITS


@pytest.mark.parametrize("code, agent, caller, expected", [
    # same convention: a verdict on the message passes through, a qmail caller reads all
    (0, S, S, 0), (65, S, S, 65), (67, S, S, 67), (69, S, S, 69), (77, S, S, 77),
    (0, Q, Q, 0), (99, Q, Q, 99), (100, Q, Q, 100), (111, Q, Q, 111), (1, Q, Q, 1),
    # to a sysexits caller every temporary failure is 75: Postfix bounces 73, 74, 70, 78
    (75, S, S, 75), (73, S, S, 75), (74, S, S, 75), (71, S, S, 75), (70, S, S, 75),
    (78, S, S, 75), (64, S, S, 75), (66, S, S, 75),
    # a sysexits agent's non-sysexits failure is not a verdict on the message: temporary
    (1, S, S, 75), (2, S, S, 75), (126, S, S, 75), (127, S, S, 75), (255, S, S, 75),
    # a qmail script wrapped for Postfix/Exim
    (99, Q, S, 0), (100, Q, S, 77), (111, Q, S, 75), (64, Q, S, 77), (112, Q, S, 77),
    (1, Q, S, 75), (0, Q, S, 0),
    # a sysexits program run from .qmail
    (75, S, Q, 111), (71, S, Q, 111), (73, S, Q, 111), (74, S, Q, 111), (65, S, Q, 100),
    (77, S, Q, 100), (78, S, Q, 111), (1, S, Q, 111), (0, S, Q, 0), (70, S, Q, 111),
])
def test_agent_code_translation(code, agent, caller, expected):
    assert translate(code, agent, caller) == expected


@pytest.mark.parametrize("code, convention, verdict", [
    (0, Q, "success"), (99, Q, "success"), (100, Q, "permanent"), (70, Q, "permanent"),
    (111, Q, "temporary"), (0, S, "success"), (75, S, "temporary"), (71, S, "temporary"),
    (65, S, "permanent"), (1, S, "temporary"), (70, S, "temporary"), (78, S, "temporary"),
])
def test_classify(code, convention, verdict):
    assert classify(code, convention) == verdict


def test_runner_failures_are_temporary_in_both_conventions():
    assert runner_status(S) == 75 and runner_status(Q) == 111
    assert runner_status(S, permanent=True) == 77 and runner_status(Q, permanent=True) == 100


def test_diagnostic_line_speaks_the_callers_convention():
    assert diagnostic_line(Outcome.TIMEOUT, "timed out", S) == "4.4.7 compartment: timed out\n"
    assert diagnostic_line(Outcome.VIOLATION, "v", S, permanent=True).startswith("5.7.0 ")
    assert diagnostic_line(Outcome.CPU_LIMIT, "cpu", Q) == "compartment: cpu\n"


def _wait_status(exit_code=None, signum=None):
    return exit_code << 8 if exit_code is not None else signum


def _watch(status, killed_for=None, setup_error=None, denied=None, oom_kills=None):
    usage = None if oom_kills is None else Usage(cpu_s=0.1, peak_memory_bytes=1 << 20,
                                                 oom_kills=oom_kills)
    return SimpleNamespace(wait_status=0, agent_wait_status=status, killed_for=killed_for,
                           setup_error=setup_error, denied_syscall=denied,
                           caller_error="stdout closed", usage=usage)


POLICY = Policy.load("filter", {"limits.cpu_seconds": "5"})


@pytest.mark.parametrize("watch, cpu_s, outcome", [
    (_watch(_wait_status(0)), 0.1, Outcome.OK),
    (_watch(_wait_status(1)), 0.1, Outcome.AGENT_FAILED),
    (_watch(_wait_status(signum=signal.SIGKILL), Outcome.TIMEOUT), 0.1, Outcome.TIMEOUT),
    (_watch(_wait_status(signum=signal.SIGKILL), Outcome.OUTPUT_LIMIT), 0.1, Outcome.OUTPUT_LIMIT),
    (_watch(_wait_status(signum=signal.SIGKILL), Outcome.VIOLATION, denied="ptrace"), 0.1,
     Outcome.VIOLATION),
    (_watch(_wait_status(signum=signal.SIGKILL), Outcome.INTERNAL_ERROR), 0.1,
     Outcome.INTERNAL_ERROR),
    (_watch(_wait_status(signum=signal.SIGSYS)), 0.1, Outcome.VIOLATION),
    (_watch(_wait_status(signum=signal.SIGXCPU)), 5.0, Outcome.CPU_LIMIT),
    (_watch(_wait_status(signum=signal.SIGKILL), Outcome.CPU_LIMIT), 5.0, Outcome.CPU_LIMIT),
    # the memory cgroup's OOM killer acted: whatever it killed, even if the agent exited 0
    (_watch(_wait_status(signum=signal.SIGKILL), oom_kills=1), 0.1, Outcome.MEMORY_LIMIT),
    (_watch(_wait_status(0), oom_kills=1), 0.1, Outcome.MEMORY_LIMIT),
    (_watch(None, oom_kills=2), 0.1, Outcome.MEMORY_LIMIT),
    (_watch(_wait_status(0), oom_kills=0), 0.1, Outcome.OK),
    (_watch(_wait_status(signum=signal.SIGKILL)), 6.0, Outcome.CPU_LIMIT),
    (_watch(_wait_status(signum=signal.SIGKILL)), 0.1, Outcome.SIGNAL),
    (_watch(_wait_status(signum=signal.SIGSEGV)), 0.1, Outcome.SIGNAL),
    (_watch(_wait_status(signum=signal.SIGXFSZ)), 0.1, Outcome.SIGNAL),
    (_watch(_wait_status(127), setup_error=SetupError("exec", "execve", 2)), 0,
     Outcome.CONFIG_ERROR),
    (_watch(_wait_status(127), setup_error=SetupError("internal", "x", 0)), 0,
     Outcome.INTERNAL_ERROR),
])
def test_wait_status_to_outcome(watch, cpu_s, outcome):
    got, reason, code, signum = _outcome(watch, POLICY, cpu_s, S)
    assert got is outcome
    assert reason
    if outcome is Outcome.MEMORY_LIMIT:
        assert reason == "used its 1 GiB of memory (limits.memory_bytes)"
    if os.WIFSIGNALED(watch.wait_status) and not watch.setup_error:
        assert signum == os.WTERMSIG(watch.wait_status)


def test_init_without_the_agents_status_is_an_internal_error():
    watch = SimpleNamespace(wait_status=0, agent_wait_status=None, killed_for=None,
                            setup_error=None, denied_syscall=None, caller_error="", usage=None)
    assert _outcome(watch, POLICY, 0.0, S)[0] is Outcome.INTERNAL_ERROR


@pytest.mark.parametrize("code, agent, outcome", [
    (99, Q, Outcome.OK), (0, Q, Outcome.OK), (99, S, Outcome.AGENT_FAILED),
    (100, Q, Outcome.AGENT_FAILED), (0, S, Outcome.OK)])
def test_every_status_that_means_delivered_is_ok(code, agent, outcome):
    assert _outcome(_watch(_wait_status(code)), POLICY, 0.0, agent)[:3] == \
        (outcome, "delivered" if outcome is Outcome.OK else f"agent exited with status {code}",
         code)


AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="runs compartments as root (as CI does)")
CLI = [sys.executable, "-m", "compartment", "run"]


def _exit_with(code: int, *options: str, read: bool = True) -> subprocess.CompletedProcess:
    script = ("cat >/dev/null; " if read else "") + f"exit {code}"
    return subprocess.run([*CLI, *options, "--", "/bin/sh", "-c", script], input=b"m\n",
                          capture_output=True, timeout=60, check=False)


@AS_ROOT
@pytest.mark.parametrize("code", [99, 100, 111, 0])
def test_a_qmail_callers_agent_speaks_qmail(code):
    """A .qmail line's verdicts reach qmail-local as they would without compartment."""
    assert _exit_with(code, "--exit-codes", "qmail").returncode == code


@AS_ROOT
@pytest.mark.parametrize("code, expected", [(0, 0), (67, 67), (77, 77), (73, 75), (99, 75),
                                            (100, 75), (1, 75)])
def test_a_sysexits_callers_agent_speaks_sysexits(code, expected):
    assert _exit_with(code).returncode == expected


@AS_ROOT
@pytest.mark.parametrize("options, code, expected", [
    (["--exit-codes", "qmail", "--set", "exit.agent_codes=sysexits"], 65, 100),
    (["--exit-codes", "qmail", "--agent-exit-codes", "sysexits"], 75, 111),
    (["--set", "exit.agent_codes=qmail"], 99, 0),
    (["--agent-exit-codes", "qmail"], 100, 77),
    # the flag wins over the policy, "caller" included
    (["--exit-codes", "qmail", "--set", "exit.agent_codes=sysexits", "--agent-exit-codes",
      "caller"], 99, 99),
    (["--set", "exit.agent_codes=sysexits", "--agent-exit-codes", "qmail"], 99, 0),
])
def test_a_named_convention_is_translated(options, code, expected):
    assert _exit_with(code, *options).returncode == expected


@AS_ROOT
@pytest.mark.parametrize("options, delivered, kept", [(["--exit-codes", "qmail"], 99, 111),
                                                      (["--agent-exit-codes", "qmail"], 0, 75)])
def test_require_full_read_applies_to_a_qmail_99(options, delivered, kept):
    """99 is "delivered, stop" to qmail: an agent that says it without reading the message
    must not have the MTA record a delivery."""
    full_read = ["--set", "exit.require_full_read=true"]
    assert _exit_with(99, *options, *full_read).returncode == delivered
    unread = _exit_with(99, *options, *full_read, read=False)
    assert unread.returncode == kept
    assert b"compartment: agent exited 99 without reading the whole message" in unread.stderr
