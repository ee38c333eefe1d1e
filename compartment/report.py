"""The result of one run, and the report: one JSON object per line, the audit log.

A report that cannot be written never changes the delivery outcome; the failure is returned so
the caller can mention it on stderr.  The supervisor, root perhaps, appends to a path someone
gave it, in a directory others may write (a sticky /tmp, a user's home): so the directory is
reached without following anyone's links but root's (compartment.paths), the file is opened
without following a link and without blocking (a FIFO there would hold the delivery's answer
forever), and only a regular file with no other name is appended to.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import asdict, dataclass

from compartment import paths
from compartment.exits import Outcome

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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
        fd = _open_report(path)
    except paths.PathError as err:
        return f"report {path}: {err.why}"
    except OSError as err:
        return f"report {path}: {err.strerror}"
    try:
        # One write of the whole line: O_APPEND places it atomically, so concurrent
        # compartments sharing one report file do not interleave their lines.
        return None if os.write(fd, line) == len(line) else f"report {path}: short write"
    except OSError as err:
        return f"report {path}: {err.strerror}"
    finally:
        os.close(fd)


def _open_report(path: str) -> int:
    directory, name = os.path.split(os.path.abspath(path))
    parent = paths.open_path(directory, trusted=(0, os.geteuid()))
    try:
        fd = os.open(name, _APPEND, 0o640, dir_fd=parent)
    finally:
        os.close(parent)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else \
            "a file with other hard links"
        raise paths.PathError(path, f"{what}; a report is appended only to a file of its own")
    return fd
