"""Interleaved timing, statistics and the printed verdicts."""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Target:
    """One target of issue 5: `measured` compared with `limit` (None: the row was skipped)."""

    name: str
    measured: float | None
    limit: float
    at_least: bool  # True: measured must be >= limit; False: <= limit
    unit: str = "x"
    note: str = ""

    def verdict(self) -> str:
        if self.measured is None:
            return "SKIP"
        passed = self.measured >= self.limit if self.at_least else self.measured <= self.limit
        return "PASS" if passed else "FAIL"

    def line(self) -> str:
        bound = ">=" if self.at_least else "<="
        shown = "n/a" if self.measured is None else f"{self.measured:.2f}{self.unit}"
        text = (f"  [{self.verdict()}] {self.name}: {shown} "
                f"(target {bound} {self.limit:g}{self.unit})")
        return text + (f"  {self.note}" if self.note else "")


@dataclass
class Samples:
    """Wall time and CPU time (this process and its reaped children) of each delivery, in ms."""

    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall_ms)

    @property
    def p95(self) -> float:
        return percentile(self.wall_ms, 95)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleave(methods: dict[str, Callable[[], object]], rounds: int, warmup: int,
               before: Callable[[], None] = lambda: None,
               after: Callable[[str, object], None] = lambda name, value: None,
               ) -> dict[str, Samples]:
    """Run every method once per round, the first method rotating; time each call.

    `before` runs untimed before each call (rewind the message), `after` untimed after it with
    the call's return value (check the output).  The first `warmup` rounds are not kept."""
    names = list(methods)
    samples = {name: Samples() for name in names}
    for round_no in range(warmup + rounds):
        start = round_no % len(names)
        for name in names[start:] + names[:start]:
            before()
            cpu0 = _cpu_s()
            t0 = time.perf_counter_ns()
            value = methods[name]()
            elapsed_ns = time.perf_counter_ns() - t0
            cpu_ms = (_cpu_s() - cpu0) * 1e3
            after(name, value)
            if round_no >= warmup:
                samples[name].wall_ms.append(elapsed_ns / 1e6)
                samples[name].cpu_ms.append(cpu_ms)
    return samples


def heading(text: str) -> None:
    print(f"\n== {text} ==")


def table(samples: dict[str, Samples], reference: str | None = None) -> None:
    """Median, p95, mean CPU per call, and the ratio of medians to `reference`."""
    print(f"  {'method':<28} {'median ms':>10} {'p95 ms':>9} {'cpu ms':>8} {'n':>5}"
          + (f" {'x ' + reference:>16}" if reference else ""))
    for name, sample in samples.items():
        row = (f"  {name:<28} {sample.median:>10.3f} {sample.p95:>9.3f} "
               f"{statistics.fmean(sample.cpu_ms):>8.3f} {len(sample.wall_ms):>5}")
        if reference and reference in samples:
            row += f" {sample.median / samples[reference].median:>15.2f}x"
        print(row)


def ratio(samples: dict[str, Samples], name: str, reference: str) -> float | None:
    if name not in samples or reference not in samples:
        return None
    return samples[name].median / samples[reference].median


def summary(targets: list[Target]) -> None:
    heading("targets (ratios of medians measured side by side in this run)")
    for target in targets:
        print(target.line())
    verdicts = [t.verdict() for t in targets]
    print(f"  {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, "
          f"{verdicts.count('SKIP')} SKIP")
