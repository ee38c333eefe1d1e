"""Outcomes and exit statuses: the never-lose-mail contract in one table.

Two conventions exist.  qmail-local: 0 delivered, 99 delivered-and-stop, 100 (and 64, 65, 70,
76, 77, 78, 112) permanent, anything else temporary.  sysexits.h (Postfix, Exim, Sendmail,
OpenSMTPD): 0 delivered, 75 temporary; Postfix defers only on 71 and 75 and bounces the rest, so
every failure that is not the message's fault must come out as 75, never 70 or 78.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    AGENT_FAILED = "agent-failed"
    TIMEOUT = "timeout"
    CPU_LIMIT = "cpu-limit"
    MEMORY_LIMIT = "memory-limit"
    OUTPUT_LIMIT = "output-limit"
    VIOLATION = "violation"
    SIGNAL = "signal"
    CONFIG_ERROR = "config-error"
    INTERNAL_ERROR = "internal-error"


class Failed(Exception):
    """A call of an isolated function (compartment.isolate) that did not return its bytes: the
    outcome in run's vocabulary and one line saying why, never an object of the child's."""

    def __init__(self, outcome: Outcome, reason: str, denied_syscall: str | None = None) -> None:
        super().__init__(f"{outcome}: {reason}")
        self.outcome, self.reason, self.denied_syscall = outcome, reason, denied_syscall


class Convention(StrEnum):
    SYSEXITS = "sysexits"
    QMAIL = "qmail"


class Verdict(StrEnum):
    SUCCESS = "success"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


# The statuses the runner itself chooses (an agent's own pass through as numbers): EX_TEMPFAIL
# and EX_NOPERM, qmail's temporary and permanent failure.
_TEMPORARY = {Convention.SYSEXITS: 75, Convention.QMAIL: 111}
_PERMANENT = {Convention.SYSEXITS: 77, Convention.QMAIL: 100}

_QMAIL_PERMANENT_CODES = frozenset({64, 65, 70, 76, 77, 78, 100, 112})
# sysexits.h codes that are a verdict on the message or its recipient: EX_DATAERR, EX_NOUSER,
# EX_NOHOST, EX_UNAVAILABLE, EX_NOPERM.  The rest (EX_USAGE, EX_SOFTWARE, EX_CONFIG, EX_IOERR,
# EX_CANTCREAT…) say the agent or its system is broken, which a retry may mend.
_SYSEXITS_PERMANENT_CODES = frozenset({65, 67, 68, 69, 77})

# RFC 3463 enhanced status codes for the first stderr line of a runner-caused failure.
_ENHANCED = {
    Outcome.TIMEOUT: "4.4.7",
    Outcome.VIOLATION: "4.7.0",
    Outcome.CONFIG_ERROR: "4.3.5",
}


def runner_status(convention: Convention, permanent: bool = False) -> int:
    """Exit status for a failure the runner saw (limits, violations, errors): temporary,
    unless the policy opted this class into a bounce."""
    return (_PERMANENT if permanent else _TEMPORARY)[convention]


def classify(code: int, convention: Convention) -> Verdict:
    """What an agent meant by exiting with `code` in its own convention.  For sysexits, every
    code outside the five verdicts, those outside sysexits.h included (1, 2, 126, 127…: a crash
    or a script's generic failure), is not a verdict on the message: it is kept and retried."""
    qmail = convention is Convention.QMAIL
    if code in ((0, 99) if qmail else (0,)):
        return Verdict.SUCCESS
    permanent = _QMAIL_PERMANENT_CODES if qmail else _SYSEXITS_PERMANENT_CODES
    return Verdict.PERMANENT if code in permanent else Verdict.TEMPORARY


def translate(code: int, agent: Convention, caller: Convention) -> int:
    """The status to hand the caller for an agent that exited with `code` by itself.  A qmail
    caller reads a qmail agent's code itself; to a sysexits caller a temporary failure is always
    75, the one code Postfix, Exim and OpenSMTPD all defer on (Postfix bounces 73 and 74)."""
    verdict = classify(code, agent)
    if agent is caller and (agent is Convention.QMAIL or verdict is Verdict.PERMANENT):
        return code
    if verdict is Verdict.SUCCESS:
        return 0
    return (_PERMANENT if verdict is Verdict.PERMANENT else _TEMPORARY)[caller]


def diagnostic_line(outcome: Outcome, reason: str, convention: Convention,
                    permanent: bool = False) -> str:
    """The first stderr line for a runner-caused failure; Postfix and Exim read the code."""
    if convention is Convention.QMAIL:
        return f"compartment: {reason}\n"
    code = _ENHANCED.get(outcome, "4.3.0")
    if permanent:
        code = "5" + code[1:]
    return f"{code} compartment: {reason}\n"
