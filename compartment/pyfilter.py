"""compartment pyfilter: a Python function as a mail filter, in DJB's prison.

    compartment pyfilter [-p strict] [--set KEY=VALUE]... [--output PATH | --reinject SENDER
                         RECIPIENT...] [--exit-codes sysexits|qmail] [--report PATH]
                         [--] MODULE:FUNCTION

The message on stdin goes to FUNCTION(message: bytes) -> bytes, run by compartment.isolate in a
prison; the bytes it returns are the new message, handed on as `compartment filter` hands on a
program's output (compartment.filtering: to stdout, a file, or sendmail), with its exit
contract.  This process never imports MODULE: only the zygote does, by name, from this
command's module path (its site-packages).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from compartment import message
from compartment.exits import Convention, Failed, Outcome, runner_status
from compartment.filtering import SENDMAIL, filter_with
from compartment.isolate import isolate
from compartment.policy import Policy, PolicyError
from compartment.report import Result


def pyfilter(reference: str, policy: Policy, *, stdin: int = 0, output: str | None = None,
             reinject: Sequence[str] | None = None, sendmail: str = SENDMAIL, stdout: int = 1,
             stderr: int = 2, env: Mapping[str, str] | None = None,
             exit_codes: str = "sysexits", report: str | None = None) -> Result:
    """Filter the message on stdin through the function named MODULE:FUNCTION."""
    caller = Convention(exit_codes)

    def produce(original: int, new: int) -> tuple[Result, bytes]:
        return _call(reference, policy, original, new, caller), b""

    return filter_with(produce, policy, [reference], stdin=stdin, output=output,
                       reinject=reinject, sendmail=sendmail, stdout=stdout, stderr=stderr,
                       env=env, caller=caller, report=report)


def _call(reference: str, policy: Policy, original: int, new: int,
          caller: Convention) -> Result:
    started = time.monotonic()
    try:
        with isolate(reference, policy) as function:
            result = function(original)
        message.write_all(new, result)
    except Failed as failed:
        permanent = failed.outcome is Outcome.VIOLATION and policy.exit.violation == "permanent"
        return _result(policy, reference, failed.outcome, failed.reason, started,
                       runner_status(caller, permanent), failed.denied_syscall)
    except (PolicyError, TypeError) as err:
        return _result(policy, reference, Outcome.CONFIG_ERROR, str(err), started,
                       runner_status(caller))
    except OSError as err:
        return _result(policy, reference, Outcome.INTERNAL_ERROR, f"cannot keep the new "
                       f"message: {err.strerror}", started, runner_status(caller))
    return _result(policy, reference, Outcome.OK, "delivered", started, 0, None, len(result))


def _result(policy: Policy, reference: str, outcome: Outcome, reason: str, started: float,
            status: int, denied: str | None = None, bytes_out: int = 0) -> Result:
    return Result(outcome=outcome, exit_status=status, reason=reason, policy=policy.name,
                  program=reference, argv=(reference,),
                  wall_s=round(time.monotonic() - started, 6), denied_syscall=denied,
                  bytes_out=bytes_out)
