"""compartment.run(): one confined run, from argv and a policy to a Result.

This is the outermost layer of the library, so it holds the one catch-all: whatever goes wrong
inside becomes an internal-error Result with a temporary-failure status, never an exception that
would let a calling MTA bounce or lose the message.
"""

from __future__ import annotations

import fcntl
import os
import resource
import select
import signal
import stat
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from compartment import message
from compartment.exits import (
    Convention,
    Outcome,
    Verdict,
    classify,
    diagnostic_line,
    runner_status,
    translate,
)
from compartment.policy import Limits, Policy
from compartment.report import Result, append
from compartment.supervisor import ConfigError, Prepared, supervise
from compartment.watch import DIAGNOSTIC_BYTES, Watch

if TYPE_CHECKING:  # typing costs a millisecond and a half at every command's start
    from typing import IO, TypeAlias

    Stream: TypeAlias = int | IO[bytes] | IO[str]
    from compartment.learn.listener import Learner


class Interrupted(Exception):
    """Raised by the command's signal handlers: the run is abandoned, the agent killed."""


def run(argv: Sequence[str], policy: Policy, *, stdin: Stream = 0, stdout: Stream = 1,
        stderr: Stream = 2, env: Mapping[str, str] | None = None,
        exit_codes: str = "sysexits", agent_exit_codes: str | None = None,
        report: str | None = None) -> Result:
    """Run argv confined by policy; the message is read from stdin by the agent itself."""
    caller = Convention(exit_codes)
    fds = (_fileno(stdin), _fileno(stdout), _fileno(stderr))
    result, diagnostics = execute(argv, policy, fds, env, caller, agent_exit_codes)
    finish(result, fds[2], diagnostics, report or policy.report.path, caller)
    return result


def execute(argv: Sequence[str], policy: Policy, fds: tuple[int, int, int],
            env: Mapping[str, str] | None, caller: Convention,
            agent_exit_codes: str | None = None,
            learner: Learner | None = None) -> tuple[Result, bytes]:
    """One run without telling anyone: the Result and what the agent said on stderr.
    `learner` is for `compartment learn` only (compartment.learn)."""
    agent = agent_convention(policy, caller, agent_exit_codes)
    started = time.monotonic()
    watch: Watch | None = None
    try:
        problem = unopened(fds)
        if problem:
            raise ConfigError(problem)
        with message.handed(fds, policy.message.stdin, policy.message.max_bytes) as stdin:
            watch, prepared = supervise(argv, policy, (stdin, fds[1], fds[2]), env, learner)
            result = _classify(watch, prepared, policy, argv, caller, agent)
    except (ConfigError, message.MessageError) as err:
        result = failure(Outcome.CONFIG_ERROR, str(err), policy.name, argv, caller, started)
    except Interrupted as err:
        result = failure(Outcome.INTERNAL_ERROR, f"interrupted by {err}; the compartment was "
                         "killed", policy.name, argv, caller, started)
    except Exception as err:  # noqa: BLE001 - the one catch-all: a bug here must not bounce mail
        result = failure(Outcome.INTERNAL_ERROR, f"internal error: {type(err).__name__}: {err}",
                         policy.name, argv, caller, started)
    return result, bytes(watch.diagnostics) if watch else b""


def agent_convention(policy: Policy, caller: Convention, named: str | None = None) -> Convention:
    """The convention the agent's own status speaks: as named (--agent-exit-codes), else the
    policy's; "caller" is the caller's own."""
    named = named or policy.exit.agent_codes
    return caller if named == "caller" else Convention(named)


def unopened(fds: tuple[int, int, int]) -> str:
    """Why these cannot be the caller's descriptors, or "": a number that is not open would be
    taken by the first pipe or spool of ours and mistaken for the caller's.  (The command
    holds the caller's closed ones with placeholders; this is for the library's callers.)"""
    for name, fd in zip(("stdin", "stdout", "stderr"), fds, strict=True):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as err:
            return f"{name} (descriptor {fd}): {err.strerror}"
    return ""


def failure(outcome: Outcome, reason: str, policy_name: str, argv: Sequence[str],
            caller: Convention, started: float | None = None) -> Result:
    """A Result for a run whose agent never started (or whose end we could not observe);
    wall_s counts from `started` when given."""
    wall_s = 0.0 if started is None else round(time.monotonic() - started, 6)
    return Result(outcome=outcome, exit_status=runner_status(caller), reason=reason,
                  policy=policy_name, program=argv[0] if argv else "", argv=tuple(argv),
                  wall_s=wall_s)


def finish(result: Result, stderr_fd: int, agent_diagnostics: bytes, report_path: str,
           caller: Convention) -> None:
    """Tell the caller: the reason line, what the agent said, the report line."""
    problem = append(report_path, result) if report_path else None
    _tell(stderr_fd, stderr_text(result, agent_diagnostics, caller, problem))


def stderr_text(result: Result, agent_diagnostics: bytes, caller: Convention,
                problem: str | None = None) -> bytes:
    """What the caller's stderr gets, all under 4 KiB: the reason line first (MTAs read the
    first line), then what the agent said, then why the report could not be written."""
    text = b""
    if _said_by_runner(result):
        permanent = result.exit_status in (77, 100)
        text = diagnostic_line(result.outcome, result.reason, caller, permanent).encode()
    text = (text + agent_diagnostics)[:DIAGNOSTIC_BYTES - 1]
    if problem:
        text = text[:DIAGNOSTIC_BYTES - 200] + f"compartment: {problem}\n".encode()[:200]
    return text


def _said_by_runner(result: Result) -> bool:
    """Is the exit status the runner's decision, rather than the agent's own status?"""
    if result.outcome is Outcome.OK:
        return False
    return not (result.outcome is Outcome.AGENT_FAILED and
                result.reason == agent_reason(result.agent_status))


def agent_reason(code: int | None) -> str:
    return f"agent exited with status {code}"


def _classify(watch: Watch, prepared: Prepared, policy: Policy, argv: Sequence[str],
              caller: Convention, agent: Convention) -> Result:
    usage = watch.rusage or resource.struct_rusage((0.0,) * 16)
    cpu_s, peak_bytes = usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024
    if watch.usage:  # the cgroup's: the compartment's own tree, every process and the kernel's
        cpu_s, peak_bytes = watch.usage.cpu_s, watch.usage.peak_memory_bytes or peak_bytes
    outcome, reason, code, signum = _outcome(watch, policy, cpu_s, agent)
    stdin_fd, offset = prepared.stdin_fd, prepared.stdin_offset
    if outcome is Outcome.OK and policy.exit.require_full_read and \
            not _fully_read(stdin_fd, offset):
        # Every status that means delivered (0, a qmail agent's 99): the MTA would record the
        # message as delivered, so it is kept instead.
        outcome = Outcome.AGENT_FAILED
        reason = f"agent exited {code} without reading the whole message"
        status = runner_status(caller)
    elif outcome in (Outcome.OK, Outcome.AGENT_FAILED):
        status = translate(code or 0, agent, caller)
    else:
        status = runner_status(caller, outcome is Outcome.VIOLATION
                               and policy.exit.violation == "permanent")
    bytes_in = None if offset is None else os.lseek(stdin_fd, 0, os.SEEK_CUR) - offset
    return Result(outcome=outcome, exit_status=status, reason=reason, policy=policy.name,
                  program=prepared.plan.program, argv=tuple(argv), uid=prepared.plan.uid,
                  agent_status=code, agent_signal=signum, denied_syscall=watch.denied_syscall,
                  cpu_s=round(cpu_s, 6), wall_s=round(watch.ended - watch.started, 6),
                  peak_memory_bytes=peak_bytes, bytes_in=bytes_in,
                  bytes_out=watch.bytes_out)


def _outcome(watch: Watch, policy: Policy, cpu_s: float,
             agent: Convention) -> tuple[Outcome, str, int | None, int | None]:
    """(outcome, reason, agent exit status, agent signal) from what the watch saw; `agent` is
    the convention the agent's status speaks, which says what "delivered" is."""
    status = watch.wait_status if watch.agent_wait_status is None else watch.agent_wait_status
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    limits = policy.limits
    if watch.setup_error:
        internal = watch.setup_error.step == "internal"
        return (Outcome.INTERNAL_ERROR if internal else Outcome.CONFIG_ERROR,
                f"cannot start the agent: {watch.setup_error.text()}", None, None)
    if (watch.usage and watch.usage.oom_kills) or watch.killed_for is Outcome.MEMORY_LIMIT:
        # The kernel killed in the compartment (the agent, a child of it, even the init), or
        # was about to: a process was cut off, whatever the agent's status says.
        return Outcome.MEMORY_LIMIT, _memory_reason(limits), None, signum
    if watch.agent_wait_status is None and not watch.killed_for:
        return (Outcome.INTERNAL_ERROR, "the compartment's init ended without the agent's "
                f"status (wait status {status:#x})", None, None)
    if watch.killed_for:
        reason = killed_reason(watch, limits)
        if code is not None and watch.killed_for is Outcome.TIMEOUT:
            # the agent had finished, and what it left running had not
            reason += f" (the agent had exited {code}; a process it left was still running)"
        return watch.killed_for, reason, code, signum
    if signum is not None:
        return (*signalled(signum, cpu_s, limits), None, signum)
    if code is not None and classify(code, agent) is Verdict.SUCCESS:
        return Outcome.OK, "delivered", code, None
    return Outcome.AGENT_FAILED, agent_reason(code), code, None


def killed_reason(watch: Watch, limits: Limits) -> str:
    """Why the watch killed the compartment (watch.killed_for), in one line."""
    return {Outcome.TIMEOUT: f"timed out: limits.wall_timeout_s = {limits.wall_timeout_s:g}",
            Outcome.CPU_LIMIT: _cpu_reason(limits),
            Outcome.MEMORY_LIMIT: _memory_reason(limits),
            Outcome.OUTPUT_LIMIT: f"wrote more than {limits.output_bytes} bytes of output",
            Outcome.VIOLATION: f"seccomp violation: {watch.denied_syscall} is not allowed",
            Outcome.INTERNAL_ERROR: watch.caller_error}[watch.killed_for]


def signalled(signum: int, cpu_s: float, limits: Limits) -> tuple[Outcome, str]:
    """The outcome of a process the kernel or someone else killed with `signum`."""
    if signum == signal.SIGSYS:
        return (Outcome.VIOLATION, "killed by the seccomp filter (a syscall of another ABI such "
                "as i386 or x32)")
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= limits.cpu_seconds):
        return Outcome.CPU_LIMIT, _cpu_reason(limits)
    if signum == signal.SIGXFSZ:
        return Outcome.SIGNAL, f"killed by SIGXFSZ: wrote a file past {limits.file_bytes} bytes"
    return Outcome.SIGNAL, f"killed by {signal_name(signum)}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal other than SIGRTMIN and SIGRTMAX has no name
        return f"signal {signum}"


def _cpu_reason(limits: Limits) -> str:
    return f"used its {limits.cpu_seconds} s of CPU (limits.cpu_seconds)"


def _memory_reason(limits: Limits) -> str:
    count, unit = limits.memory_bytes, "bytes"
    for name, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            count, unit = count >> shift, name
            break
    return f"used its {count} {unit} of memory (limits.memory_bytes)"


def _fully_read(fd: int, offset: int | None) -> bool:
    """Did the agent consume all of stdin?  A file: the offset reached its end.  A pipe or a
    socket: no byte is waiting and the writer has closed it.  Anything else (/dev/null, a
    terminal) cannot be told, and a message must not be retried, and so delivered twice, on a
    guess."""
    if offset is not None:
        return os.lseek(fd, 0, os.SEEK_CUR) >= os.fstat(fd).st_size
    mode = os.fstat(fd).st_mode
    if not stat.S_ISFIFO(mode) and not stat.S_ISSOCK(mode):
        return True
    if not select.select([fd], [], [], 0)[0]:  # readable: data waiting, or the writer gone
        return False  # the writer is still there with more to send
    import termios  # only here, for a pipe or socket: it costs half a millisecond to import

    waiting = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(waiting, "little") == 0


def _fileno(stream: Stream) -> int:
    return stream if isinstance(stream, int) else stream.fileno()


def _tell(fd: int, data: bytes) -> None:
    try:
        message.write_all(fd, data)
    except OSError:
        return  # the caller closed stderr: the exit status and the report still tell
