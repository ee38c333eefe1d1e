"""Where one compartment.run() spends its time: a diagnostic for whoever speeds up the core.

usage: .venv/bin/python bench/phases.py [DELIVERIES]

Not part of `make bench` and not a measurement of record: it wraps the core's own functions
(supervisor, confinement steps, init, watch) to stamp CLOCK_MONOTONIC into a shared anonymous
mapping, which the cloned children inherit, so it is tied to the core's internal names and skips
any it cannot find.  The wrappers add a few microseconds per step.  Each line is the median
time from the previous stamp to this one, over the deliveries after a warm-up; page faults and
CPU are per delivery, for the supervisor and for its reaped children.
"""

from __future__ import annotations

import importlib
import mmap
import os
import resource
import statistics
import struct
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import baseline

# Stamps in the order a delivery reaches them: (label, module, attribute, when).
# when: "before"/"after" the call, or "child" for clone(0) returning 0 in the new process.
STEPS = (
    ("prepare done", "compartment.supervisor", "prepare", "after"),
    ("clone returned (parent)", "compartment.syscalls", "clone", "after-parent"),
    ("cgroup joined", "compartment.confine.cgroup", "enter", "after"),
    ("namespaces done", "compartment.confine.namespaces", "enter", "after"),
    ("filesystem done", "compartment.confine.filesystem", "enter", "after"),
    ("capabilities.restrict done", "compartment.confine.capabilities", "restrict", "after"),
    ("credentials done", "compartment.confine.credentials", "enter", "after"),
    ("capabilities.drop_all done", "compartment.confine.capabilities", "drop_all", "after"),
    ("rlimits done", "compartment.confine.rlimits", "enter", "after"),
    ("session done", "compartment.confine.session", "enter", "after"),
    ("scope done (+no_new_privs)", "compartment.confine.scope", "enter", "after"),
    ("descriptors done", "compartment.confine.descriptors", "enter", "after"),
    ("agent process started", "compartment.syscalls", "clone", "child"),
    ("seccomp loaded", "compartment.confine.seccomp", "enter", "after"),
    ("late rlimits done", "compartment.confine.rlimits", "enter_late", "after"),
    ("execve called", "compartment.confine", "os.execve", "before"),
    ("init reaped the agent", "compartment.confine.init", "os.waitpid", "after"),
    ("init exiting", "compartment.confine.init", "os._exit", "before"),
    ("supervisor saw init gone", "compartment.watch", "Watch._on_exit", "before"),
    ("cgroup read", "compartment.watch", "Watch._on_exit", "after"),
    ("cgroup retired", "compartment.cgroups", "Cgroup.retire", "after"),
)
LABELS = ("run() called", *(step[0] for step in STEPS), "run() returned")
_stamps = mmap.mmap(-1, 8 * len(LABELS))  # MAP_SHARED | MAP_ANONYMOUS: shared across clone


def stamp(label: str) -> None:
    struct.pack_into("q", _stamps, 8 * LABELS.index(label), time.monotonic_ns())


def _wrap(function: Callable, label: str, when: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            stamp(label)
        value = function(*args, **kwargs)
        parent_side = when == "after-parent" and args and args[0] and value
        child_side = when == "child" and args and not args[0] and value == 0
        if when == "after" or parent_side or child_side:
            stamp(label)
        return value
    return wrapper


def _install() -> list[str]:
    """Wrap what exists; returns the labels that could not be placed."""
    missing = []
    proxies: dict[str, types.ModuleType] = {}
    wrapped: dict[tuple[str, str], Callable] = {}
    for label, module_name, attribute, when in STEPS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(label)
            continue
        owner_name, _, name = attribute.rpartition(".")
        if owner_name == "os":  # the module's own `os`: give it a private copy to wrap in
            if module_name not in proxies:
                proxies[module_name] = types.ModuleType("os")
                proxies[module_name].__dict__.update(os.__dict__)
                module.os = proxies[module_name]
            owner: Any = proxies[module_name]
        else:
            owner = getattr(module, owner_name) if owner_name else module
        key = (module_name, attribute)
        current = wrapped.get(key) or getattr(owner, name, None)
        if current is None:
            missing.append(label)
            continue
        wrapped[key] = _wrap(current, label, when)
        setattr(owner, name, wrapped[key])
    return missing


def main() -> None:
    deliveries = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    import compartment

    missing = _install()
    policy = compartment.Policy.load("filter", sys.argv[2:])  # e.g. limits.enforcement=rlimits
    message = os.memfd_create("message")
    os.write(message, b"x" * (10 << 10))
    out, err = baseline.discard_sinks()
    rows, warmup = [], 20
    usage0 = _usage()
    for index in range(deliveries + warmup):
        if index == warmup:
            usage0 = _usage()
        os.lseek(message, 0, os.SEEK_SET)
        _stamps.seek(0)
        _stamps.write(bytes(len(_stamps)))
        stamp("run() called")
        result = compartment.run(["/bin/cat"], policy, stdin=message, stdout=out, stderr=err)
        stamp("run() returned")
        if result.outcome != "ok":
            raise SystemExit(f"delivery failed: {result.outcome}: {result.reason}")
        if index >= warmup:
            rows.append(struct.unpack_from(f"{len(LABELS)}q", _stamps))
    _print(rows, missing, usage0, deliveries)


def _usage() -> list[resource.struct_rusage]:
    return [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]


def _print(rows: list[tuple[int, ...]], missing: list[str], usage0: list, count: int) -> None:
    print(f"{'stamp':<30} {'median ms':>10} {'p90 ms':>8}   (from the previous stamp)")
    for index, label in enumerate(LABELS[1:], start=1):
        gaps = []
        for row in rows:
            previous = next((row[j] for j in range(index - 1, -1, -1) if row[j]), 0)
            if row[index] and previous:
                gaps.append((row[index] - previous) / 1e6)
        if gaps:
            gaps.sort()
            p90 = gaps[int(0.9 * len(gaps))]
            print(f"{label:<30} {statistics.median(gaps):>10.3f} {p90:>8.3f}")
    totals = [(row[-1] - row[0]) / 1e6 for row in rows]
    print(f"{'total':<30} {statistics.median(totals):>10.3f}")
    for who, name in ((resource.RUSAGE_SELF, "supervisor"), (resource.RUSAGE_CHILDREN, "children")):
        now = resource.getrusage(who)
        before = usage0[0 if who == resource.RUSAGE_SELF else 1]
        cpu = (now.ru_utime + now.ru_stime - before.ru_utime - before.ru_stime) / count * 1e3
        faults = (now.ru_minflt - before.ru_minflt) / count
        print(f"{name:<12} {cpu:6.3f} ms CPU, {faults:7.0f} page faults per delivery")
    if missing:
        print("not stamped (not found in this core): " + ", ".join(missing))


if __name__ == "__main__":
    main()
