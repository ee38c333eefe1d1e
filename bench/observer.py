"""An outside witness for the timeout: which processes a compartment had, and when each died.

The witness runs in a grandchild of the bench (double fork), so it is nobody's child that the
supervisor could reap and is not itself a descendant that it would count.  Until
`discover_until_ns` it scans /proc for descendants of the bench process (the supervisor) and
opens a pidfd on each one it finds; afterwards it polls those pidfds, noting the CLOCK_MONOTONIC
time at which each became readable (the process exited), and reports the times as one JSON line.
"""

from __future__ import annotations

import json
import os
import select
import time
import traceback

SCAN_INTERVAL_S = 0.001


def _parents() -> dict[int, int]:
    """pid -> ppid for every process visible now."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone between the listing and the read: not ours to track
            continue
        parents[int(entry.name)] = int(fields[1])
    return parents


def _descendants(root: int, parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def _watch(root: int, discover_until_ns: int, give_up_ns: int, ready_w: int) -> dict:
    pidfds: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, command name)
    first_scan = True
    while time.monotonic_ns() < discover_until_ns:
        for pid in _descendants(root, _parents()) - {os.getpid()}:
            if any(pid == known for known, _name in pidfds.values()):
                continue
            try:
                pidfds[os.pidfd_open(pid)] = (pid, _comm(pid))
            except ProcessLookupError:  # died before we looked: the deadline has not come yet
                continue
        if first_scan:
            os.write(ready_w, b"r")
            os.close(ready_w)
            first_scan = False
        time.sleep(SCAN_INTERVAL_S)
    exits: dict[int, int] = {}
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    while len(exits) < len(pidfds) and time.monotonic_ns() < give_up_ns:
        for pidfd, _events in poller.poll(10):
            now = time.monotonic_ns()
            exits[pidfds[pidfd][0]] = now
            poller.unregister(pidfd)
    return {"processes": [name for _pid, name in pidfds.values()],
            "exit_ns": sorted(exits.values()), "still_alive": len(pidfds) - len(exits)}


def start(discover_until_ns: int, give_up_ns: int) -> int:
    """Start the witness for the calling process's future descendants; returns once it has
    scanned /proc once.  The result is one JSON line on the returned descriptor."""
    root = os.getpid()
    result_r, result_w = os.pipe()
    ready_r, ready_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        code = 1
        try:
            os.close(result_r)
            os.close(ready_r)
            if os.fork() == 0:
                report = _watch(root, discover_until_ns, give_up_ns, ready_w)
                os.write(result_w, json.dumps(report).encode() + b"\n")
            code = 0
        except BaseException:  # noqa: BLE001 - a forked child must never return into the bench
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(result_w)
    os.close(ready_w)
    os.waitpid(middle, 0)
    os.read(ready_r, 1)
    os.close(ready_r)
    return result_r


def collect(result_r: int) -> dict:
    with os.fdopen(result_r, "rb") as pipe:
        line = pipe.readline()
    if not line:
        raise RuntimeError("the timeout witness died without a report")
    return json.loads(line)
