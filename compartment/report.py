"""The result of one run, and the report: one JSON object per line, the audit log.

A report that cannot be written never changes the delivery outcome; the failure is returned so
the caller can mention it on stderr.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from compartment.exits import Outcome


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    exit_status: int          # what the caller (the MTA) should exit with
    reason: str               # one line for a human
    policy: str
    program: str
    argv: tuple[str, ...]
    wall_s: float
    uid: int | None = None            # the uid the agent ran as (None: it never started)
    agent_status: int | None = None   # the agent's own exit status, when it exited by itself
    agent_signal: int | None = None   # the signal that killed it
    denied_syscall: str | None = None
    cpu_s: float = 0.0
    peak_memory_bytes: int = 0  # ru_maxrss of the compartment, including its pre-exec image
    bytes_in: int | None = None  # message bytes consumed; None: stdin is a pipe handed over
    bytes_out: int = 0           # stdout and stderr bytes the agent wrote

    def to_json(self) -> str:
        import json  # only here: most runs of the command write no report, and json costs 1 ms

        record = {"time": round(time.time(), 3), **asdict(self)}
        record["outcome"] = str(self.outcome)
        return json.dumps(record, separators=(",", ":"))


def append(path: str, result: Result) -> str | None:
    """Append the run's line to `path`; returns why it could not, or None."""
    line = (result.to_json() + "\n").encode()
    try:
        # One write of the whole line: O_APPEND places it atomically, so concurrent
        # compartments sharing one report file do not interleave their lines.
        with open(path, "ab", buffering=0, opener=_open_for_append) as report:
            return None if report.write(line) == len(line) else f"report {path}: short write"
    except OSError as err:
        return f"report {path}: {err.strerror}"


def _open_for_append(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o640)
