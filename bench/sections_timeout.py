"""Section 5: from the wall-clock deadline to the last process of the compartment gone."""

from __future__ import annotations

import os
import statistics
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any

import baseline
import measure
import observer
from measure import Target

if TYPE_CHECKING:
    from bench import Context

TIMEOUT_S = 0.25
TARGET_MS = 5.0
AGENTS = {
    "sleep 1000": ("/bin/sleep", "1000"),
    "sh + 3 sleeps, TERM ignored": ("/bin/sh", "-c", "trap '' TERM HUP INT; sleep 1000 & "
                                    "sleep 1000 & sleep 1000 & wait"),
}
COLUMNS = ("first gone", "last gone", "run() returned", "supervisor", "upper bound")


class DeadlineTap:
    """The supervisor's own deadline, read (never changed) from the Watch object it builds:
    Watch.start is wrapped for the duration of the section and its `deadline` attribute, in
    time.monotonic() seconds, kept.  Without that hook `deadline_ns` stays None and the
    section falls back to the upper bound (the call of run() + wall_timeout_s)."""

    def __init__(self) -> None:
        self.deadline_ns: int | None = None
        self._cls: Any = getattr(sys.modules.get("compartment.watch"), "Watch", None)
        self._start = getattr(self._cls, "start", None)

    def __enter__(self) -> DeadlineTap:
        if self._start is None:
            return self
        original, tap = self._start, self

        def start(watch: Any, *args: Any, **kwargs: Any) -> Any:
            value = original(watch, *args, **kwargs)
            deadline = getattr(watch, "deadline", None)
            tap.deadline_ns = None if deadline is None else int(deadline * 1e9)
            return value

        self._cls.start = start
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is not None:
            self._cls.start = self._start


def _one(ctx: Context, policy: object, argv: tuple[str, ...], tap: DeadlineTap
         ) -> dict[str, float]:
    timeout_ns = int(TIMEOUT_S * 1e9)
    now = time.monotonic_ns()
    witness = observer.start(now + int(0.6 * timeout_ns), now + timeout_ns + 10**10)
    quiet_in = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    sink, err = baseline.discard_sinks()
    tap.deadline_ns = None
    called = time.monotonic_ns()
    result = ctx.core.run(list(argv), policy, stdin=quiet_in, stdout=sink, stderr=err)
    returned = time.monotonic_ns()
    for fd in (quiet_in, sink, err):
        os.close(fd)
    seen = observer.collect(witness)
    if result.outcome != "timeout":
        raise RuntimeError(f"{argv}: outcome {result.outcome} ({result.reason}), wanted timeout")
    if seen["still_alive"]:
        raise RuntimeError(f"{argv}: {seen['still_alive']} processes outlived the run: {seen}")
    # Processes that ended in the first half of the run (a shell's short-lived helpers) were
    # not killed at the deadline; the rest were.
    killed = [t for t in seen["exit_ns"] if t > called + timeout_ns // 2]
    if not killed:
        raise RuntimeError(f"{argv}: the witness saw no process die at the deadline: {seen}")
    deadline = tap.deadline_ns or called + timeout_ns
    return {"first gone": (killed[0] - deadline) / 1e6,
            "last gone": (killed[-1] - deadline) / 1e6,
            "run() returned": (returned - deadline) / 1e6,
            "supervisor": (result.wall_s - TIMEOUT_S) * 1e3,
            "upper bound": (killed[-1] - called - timeout_ns) / 1e6,
            "processes": len(killed)}


def _explain(tapped: bool) -> None:
    origin = ("the supervisor's own deadline (read from its Watch)" if tapped else
              "the call of compartment.run() + wall_timeout_s (an upper bound)")
    text = (f"Milliseconds after {origin}. A witness process (a grandchild of the bench, no "
            "child of the supervisor) scanned /proc for the supervisor's descendants while the "
            "agent ran, opened a pidfd on each and timed when each became readable (the process "
            "exited): first gone, last gone. supervisor = result.wall_s - wall_timeout_s, the "
            "supervisor's own account (deadline to its init reaped). upper bound = last gone "
            "after the call of run() + wall_timeout_s, which also counts the set-up before the "
            "supervisor's clock starts.")
    print(textwrap.fill(text, 96, initial_indent="  ", subsequent_indent="  "))


def timeout(ctx: Context) -> list[Target]:
    measure.heading(f"5. Timeout: wall_timeout_s = {TIMEOUT_S} s, {ctx.sizes.timeout_runs} runs "
                    "per agent, agents alternating")
    if ctx.core is None:
        return [Target(f"timeout, {name}: last process gone after deadline", None, TARGET_MS,
                       at_least=False, unit=" ms") for name in AGENTS]
    policy = ctx.core.Policy.load("filter", overrides={"limits.wall_timeout_s": "250ms"})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in AGENTS}
    with DeadlineTap() as tap:
        for _ in range(ctx.sizes.timeout_runs):
            for name, argv in AGENTS.items():
                runs[name].append(_one(ctx, policy, argv, tap))
        tapped = tap.deadline_ns is not None
    _explain(tapped)
    print(f"  {'agent (median / max)':<28} {'procs':>5}" + "".join(f" {c:>17}" for c in COLUMNS))
    targets = []
    for name, samples in runs.items():
        cells = [f"{statistics.median(s[c] for s in samples):>7.2f} /"
                 f"{max(s[c] for s in samples):>7.2f}" for c in COLUMNS]
        procs = max(int(sample["processes"]) for sample in samples)
        print(f"  {name:<28} {procs:>5}" + "".join(f" {cell:>17}" for cell in cells))
        last = statistics.median(sample["last gone"] for sample in samples)
        worst = max(sample["last gone"] for sample in samples)
        targets.append(Target(f"timeout, {name}: last process gone after the deadline (median)",
                              last, TARGET_MS, at_least=False, unit=" ms",
                              note=f"(worst of {len(samples)}: {worst:.2f} ms)"))
    return targets
