"""compartment filter: the agent's stdout becomes the new message, handed on by the supervisor.

Supervisor side.  The original is kept seekable (the caller's file, or a spool of a pipe) so a
failing filter never loses it; the agent writes the new message into an unlinked temporary
file, bounded by limits.output_bytes; only a successful, non-empty result is handed on — to a
file, written aside and renamed into place, or re-injected with `sendmail -G -i -f SENDER --
RECIPIENT...` run as an argv list.  The supervisor never looks inside either message.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from compartment import message, paths
from compartment.api import execute, failure, finish, unopened
from compartment.exits import Convention, Outcome, runner_status
from compartment.policy import Policy
from compartment.report import Result

SENDMAIL = "/usr/sbin/sendmail"


# Runs the filter: (the original, read-only; the new message's file) -> (Result, diagnostics).
Producer = Callable[[int, int], "tuple[Result, bytes]"]


def filter_message(argv: Sequence[str], policy: Policy, *, stdin: int = 0,
                   output: str | None = None, reinject: Sequence[str] | None = None,
                   sendmail: str = SENDMAIL, stdout: int = 1, stderr: int = 2,
                   env: Mapping[str, str] | None = None, exit_codes: str = "sysexits",
                   agent_exit_codes: str | None = None, report: str | None = None) -> Result:
    """Filter the message on stdin through argv; deliver to `output` (a path), to
    `reinject` ([sender, recipient, ...]) through sendmail, or else to stdout."""
    caller = Convention(exit_codes)

    def produce(original: int, new: int) -> tuple[Result, bytes]:
        return execute(argv, policy, (original, new, stderr), env, caller, agent_exit_codes)

    return filter_with(produce, policy, argv, stdin=stdin, output=output, reinject=reinject,
                       sendmail=sendmail, stdout=stdout, stderr=stderr, env=env, caller=caller,
                       report=report)


def filter_with(produce: Producer, policy: Policy, argv: Sequence[str], *, stdin: int,
                output: str | None, reinject: Sequence[str] | None, sendmail: str, stdout: int,
                stderr: int, env: Mapping[str, str] | None, caller: Convention,
                report: str | None) -> Result:
    """The filter's contract around any producer of the new message (`compartment filter`'s
    program, `compartment pyfilter`'s function): the original kept, the result handed on."""
    started = time.monotonic()
    diagnostics = b""
    try:
        problem = unopened((stdin, stdout, stderr))
        if problem:
            raise message.MessageError(problem)
        original = _seekable(stdin, policy.message.max_bytes)
    except message.MessageError as err:
        result = failure(Outcome.CONFIG_ERROR, str(err), policy.name, argv, caller, started)
    else:
        try:
            with os.fdopen(original, "rb") as kept:
                result, diagnostics = _filter(produce, policy, kept.fileno(), output, reinject,
                                              sendmail, stdout, env, caller)
        except Exception as err:  # noqa: BLE001 - as execute()'s: around what the filter adds
            # (the new message's file, handing it on), so that the report still tells
            result = failure(Outcome.INTERNAL_ERROR, f"internal error: {type(err).__name__}: "
                             f"{err}", policy.name, argv, caller, started)
    finish(result, stderr, diagnostics, report or policy.report.path, caller)
    return result


def _filter(produce: Producer, policy: Policy, original: int, output: str | None,
            reinject: Sequence[str] | None, sendmail: str, stdout: int,
            env: Mapping[str, str] | None, caller: Convention) -> tuple[Result, bytes]:
    new = os.open("/var/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        agent_view = message.reopen_read_only(original)
        try:
            result, diagnostics = produce(agent_view, new)
        finally:
            os.close(agent_view)
        size = os.fstat(new).st_size
        if result.outcome is Outcome.OK and size == 0:
            result = replace(result, outcome=Outcome.AGENT_FAILED, exit_status=runner_status(
                caller), reason="the filter wrote an empty message")
        if result.outcome is Outcome.OK:
            chosen, note = new, ""
        elif policy.filter.on_failure == "pass":
            chosen, note = original, f"{result.reason}; the original was passed on unchanged"
        else:
            return result, diagnostics
        problem = _hand_on(chosen, output, reinject, sendmail, stdout, env)
        if problem:
            return replace(result, outcome=Outcome.INTERNAL_ERROR, reason=problem,
                           exit_status=runner_status(caller)), diagnostics
        if note:
            result = replace(result, reason=note, exit_status=0)
        return result, diagnostics
    finally:
        os.close(new)


def _seekable(fd: int, max_bytes: int) -> int:
    """A descriptor of the original that can be read again from its start."""
    try:
        info = os.fstat(fd)
    except OSError as err:
        raise message.MessageError(f"stdin: {err.strerror}") from None
    if stat.S_ISREG(info.st_mode):  # the caller's own file: nothing to copy
        return message.reopen_read_only(fd)
    return message.spool_copy(fd, "disk", max_bytes)


def _hand_on(fd: int, output: str | None, reinject: Sequence[str] | None, sendmail: str,
             stdout: int, env: Mapping[str, str] | None) -> str:
    """Deliver the chosen message; returns why it failed, or an empty string."""
    os.lseek(fd, 0, os.SEEK_SET)
    if reinject:
        sender, *recipients = reinject
        command = [sendmail, "-G", "-i", "-f", sender, "--", *recipients]
        try:
            done = subprocess.run(command, stdin=fd, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=env, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"re-injection with {sendmail} failed: {err}"
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip().splitlines()[:1]
            return f"re-injection: {sendmail} exited {done.returncode}: {''.join(said)}"
        return ""
    if output:
        return _write_aside(fd, output)
    try:
        message.copy(fd, stdout)
    except message.MessageError as err:
        return f"stdout: {err}"
    return ""


def _write_aside(fd: int, path: str) -> str:
    """Write to PATH.tmp-PID, fsync, rename: PATH is whole or absent, never half-written.  The
    directory is reached through no link but a trusted owner's (compartment.paths), and both
    names are used relative to it: a link planted on the way cannot send root's write
    elsewhere."""
    directory_path, name = os.path.split(os.path.abspath(path))
    aside = f"{name}.tmp-{os.getpid()}"
    try:
        directory = paths.open_path(directory_path, trusted=paths.trusted_owners())
    except paths.PathError as err:
        return f"cannot write {path}: {err.why}"
    try:
        out = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                      os.O_CLOEXEC, 0o600, dir_fd=directory)
        try:
            message.copy(fd, out)
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(aside, name, src_dir_fd=directory, dst_dir_fd=directory)
    except (OSError, message.MessageError) as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside, dir_fd=directory)
        return f"cannot write {path}: {getattr(err, 'strerror', None) or err}"
    finally:
        os.close(directory)
    return ""
