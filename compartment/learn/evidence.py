"""The samples' runs taken together: what any of them needed, and where it was first seen.

Policy tool (`compartment learn`), pure: the listener's observations and the runs' Results in,
one Evidence out, with each fact attributed to the call and the sample that showed it first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compartment.exits import Outcome
from compartment.learn.listener import PROCESS_CALLS

if TYPE_CHECKING:
    from compartment.learn import Sample

# Outcomes that cut a run short: what the program would have done after is unknown.
CUT_SHORT = {Outcome.TIMEOUT: "wall_timeout_s", Outcome.CPU_LIMIT: "cpu_seconds",
             Outcome.MEMORY_LIMIT: "memory_bytes", Outcome.OUTPUT_LIMIT: "output_bytes"}


@dataclass(frozen=True)
class Use:
    """A call that showed a need, and the sample it was first seen on."""

    what: str
    sample: str

    def __str__(self) -> str:
        return f"{self.what} (sample {self.sample})"


@dataclass
class Evidence:
    paths: dict[str, Use] = field(default_factory=dict)  # every path named
    writes: dict[str, Use] = field(default_factory=dict)  # the paths a call would change
    refused: dict[str, Use] = field(default_factory=dict)  # calls the base refuses, by name
    walls: dict[str, Use] = field(default_factory=dict)  # the baseline's, by detail
    sockets: dict[str, Use] = field(default_factory=dict)  # "socket(AF_UNIX)" -> first use
    calls: set[str] = field(default_factory=set)  # every call the listener saw
    process: Use | None = None  # the first fork, vfork or clone
    peak_processes: int = 1  # processes and threads at once, the agent included
    peak_vm_bytes: int = 0
    descriptors: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    bytes_out: int = 0
    echoes_message: bool = False  # some sample's output was at least half its input
    limits_hit: dict[str, str] = field(default_factory=dict)  # limit key -> sample
    ended: dict[str, str] = field(default_factory=dict)  # sample -> how its run ended, if not ok
    unreadable: int = 0
    paths_dropped: int = 0


def gather(samples: Sequence[Sample]) -> Evidence:
    ev = Evidence()
    for sample in samples:
        name, seen, result = sample.name, sample.seen, sample.result
        for path, (call, write) in seen.paths.items():
            ev.paths.setdefault(path, Use(f"{call} {path}", name))
            if write:
                ev.writes.setdefault(path, Use(f"{call} {path}", name))
        for call, detail in seen.refused.items():
            ev.refused.setdefault(call, Use(detail, name))
        for detail in seen.walls:
            ev.walls.setdefault(detail, Use(detail, name))
        for detail in seen.sockets:
            ev.sockets.setdefault(detail, Use(detail, name))
        ev.calls.update(seen.calls)
        made = [call for call in PROCESS_CALLS if seen.calls[call]]
        if made and ev.process is None:
            ev.process = Use(made[0], name)
        ev.peak_processes = max(ev.peak_processes, seen.peak_processes)
        ev.peak_vm_bytes = max(ev.peak_vm_bytes, seen.peak_vm_bytes)
        ev.descriptors = max(ev.descriptors, seen.descriptors)
        ev.unreadable += seen.unreadable
        ev.paths_dropped += seen.paths_dropped
        ev.cpu_s = max(ev.cpu_s, result.cpu_s)
        ev.wall_s = max(ev.wall_s, result.wall_s)
        ev.bytes_out = max(ev.bytes_out, result.bytes_out)
        ev.echoes_message |= sample.size_bytes > 0 and result.bytes_out * 2 >= sample.size_bytes
        if result.outcome in CUT_SHORT:
            ev.limits_hit.setdefault(CUT_SHORT[result.outcome], name)
        if result.outcome is not Outcome.OK:
            ev.ended[name] = f"{result.outcome}: {result.reason}"
    return ev
