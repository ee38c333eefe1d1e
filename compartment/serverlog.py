"""What the resident supervisor tells the administrator: log lines and `compartment status`.

Privileged (part of the daemon), but it only formats what the daemon decided.  One line per
delivery in the mail facility, with the same fields every time (like postfix/pipe's
`to=… relay=… delay=… status=…`) so that it can be grepped:

    delivery peer=uid:110/pid:4242 policy=deliver program=/usr/bin/maildrop uid=1000 \
        outcome=ok status=0 wall=0.004s cpu=0.002s reason=delivered

and one line per refusal (`refused peer=… reason=…`).  `--log stderr` writes the same lines to
stderr instead of syslog (a foreground daemon, the tests).
"""

from __future__ import annotations

import collections
import os
import sys
import syslog
import time
from collections.abc import Iterable
from typing import Any

from compartment.report import Result

LATENCIES = 10000  # the last deliveries whose latency the status shows


class Log:
    def __init__(self, destination: str = "syslog") -> None:
        self.to_syslog = destination == "syslog"
        if self.to_syslog:
            syslog.openlog("compartment", syslog.LOG_PID, syslog.LOG_MAIL)

    def delivery(self, peer: Any, result: Result, note: str = "") -> None:
        reason = f"{result.reason}; {note}" if note else result.reason
        uid = "-" if result.uid is None else str(result.uid)
        self._line(syslog.LOG_INFO,
                   f"delivery peer=uid:{peer.uid}/pid:{peer.pid} policy={result.policy or '-'} "
                   f"program={_word(result.program)} uid={uid} outcome={result.outcome} "
                   f"status={result.exit_status} wall={result.wall_s:.3f}s "
                   f"cpu={result.cpu_s:.3f}s reason={_line(reason)}")

    def refusal(self, peer: Any, reason: str) -> None:
        self._line(syslog.LOG_NOTICE,
                   f"refused peer=uid:{peer.uid}/pid:{peer.pid} reason={_line(reason)}")

    def info(self, text: str) -> None:
        self._line(syslog.LOG_INFO, _line(text))

    def error(self, text: str) -> None:
        self._line(syslog.LOG_ERR, "error: " + _line(text))

    def _line(self, priority: int, text: str) -> None:
        if self.to_syslog:
            syslog.syslog(priority, text)
        else:
            print(f"compartment[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def _word(text: str) -> str:
    return _line(text).replace(" ", "\\x20") or "-"


def _line(text: str) -> str:
    """One line, printable: a reason may quote what a peer sent."""
    return text.encode("ascii", "backslashreplace").decode().replace("\n", "\\n")[:2000]


class Stats:
    """Counts since start, the live compartments and the latency of the last deliveries."""

    def __init__(self, config_source: str) -> None:
        self.config_source = config_source
        self.started = time.monotonic()
        self.live: collections.Counter[tuple[str, int]] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES)
        self.ways = {True: 0, False: 0}  # committed to a compartment prepared ahead, or cloned

    def launched(self, ahead: bool) -> None:
        self.ways[ahead] += 1

    def begin(self, policy: str, uid: int) -> None:
        self.live[(policy, uid)] += 1

    def end(self, policy: str, uid: int, result: Result, latency_s: float,
            began: bool = True) -> None:
        if began:
            self.live[(policy, uid)] -= 1
            if not self.live[(policy, uid)]:
                del self.live[(policy, uid)]
        self.outcomes[str(result.outcome)] += 1
        self.latencies.append(latency_s)

    def text(self, connections: Iterable[object] = ()) -> str:
        up_s = time.monotonic() - self.started
        lines = [f"compartment serve: pid {os.getpid()}, up {up_s:.0f} s, "
                 f"config {self.config_source}",
                 f"live compartments: {sum(self.live.values())}"]
        lines += [f"  {policy:16} uid {uid:<8} {count}"
                  for (policy, uid), count in sorted(self.live.items())]
        total = sum(self.outcomes.values())
        lines.append(f"requests since start: {total}")
        if total:
            lines.append("  " + ", ".join(f"{outcome} {count}" for outcome, count
                                          in self.outcomes.most_common()))
        lines.append(f"compartments prepared ahead and used: {self.ways[True]}, cloned for "
                     f"their request: {self.ways[False]}")
        if self.latencies:
            ordered = sorted(self.latencies)
            marks = ", ".join(f"p{p} {_percentile(ordered, p) * 1000:.1f} ms"
                              for p in (50, 90, 99))
            lines.append(f"latency, request to answer (last {len(ordered)}): {marks}, "
                         f"max {ordered[-1] * 1000:.1f} ms")
        return "\n".join(lines) + "\n"


def _percentile(ordered: list[float], percent: int) -> float:
    return ordered[min(len(ordered) - 1, (len(ordered) * percent) // 100)]
