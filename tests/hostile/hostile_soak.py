#!/usr/bin/env python3
"""Soak: many deliveries in a row and from concurrent callers, then look for what was left.

    sudo .venv/bin/python tests/hostile/hostile_soak.py [--deliveries 5000] [--callers 4] [--serve]

Caller side, root.  Each delivery is `compartment.run(["/bin/cat"], filter)` with a small
message.  Afterwards this process must hold the same descriptors, have no zombie children and
the same mounts; no temporary files, no leased uid of the soak's pool and no new /dev/shm entry
may remain; and the long-running API user's memory must be flat.  Prints one line per problem
and exits 1 if there is any.

With --serve every delivery is `compartment.submit()` to a `compartment serve` of the soak's
own, and the same is asked of the daemon too: its descriptors, zombie children, mounts and
memory, as before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# A window of 100 uids drawn per soak, so that two soaks running at once on one host (two
# people's test runs) do not read each other's leases as leaks.
_WINDOW = 63000 + 100 * random.randrange(20)
SOAK_POOL = (_WINDOW, _WINDOW + 99)
LEASE_DIR = Path("/run/compartment/uids")
MESSAGE = b"From: soak@example.org\n\nsoak\n" * 20
WARM_UP = 20                 # runs before the memory baseline (imports, caches, allocator)
RSS_GROWTH_LIMIT = 16 << 20  # bytes the API user may grow by after the warm-up
SERVE_SOCKET = ""  # set: deliveries go through this compartment serve


@dataclass
class Snapshot:
    fds: dict[str, str]
    zombies: list[str]
    mounts: int
    shm: set[str]
    rss: int
    leases: set[int]

    @classmethod
    def take(cls, pid: int | None = None) -> Snapshot:
        """Of this process, or of another (the daemon)."""
        proc = Path(f"/proc/{pid or 'self'}")
        fds = {}
        for name in os.listdir(proc / "fd"):
            try:
                fds[name] = os.readlink(proc / "fd" / name)
            except OSError:
                continue   # the descriptor listdir itself used, closed by now
        return cls(fds, _zombie_children(pid or os.getpid()),
                   len((proc / "mountinfo").read_text().splitlines()),
                   set(os.listdir("/dev/shm")), _rss(proc), set(leased_uids()))


@dataclass
class Tally:
    runs: int = 0
    failures: list[str] = field(default_factory=list)


def _zombie_children(pid: int) -> list[str]:
    me = str(pid)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[1] == me and stat[0] == "Z":
            found.append(proc.name)
    return found


def _rss(proc: Path = Path("/proc/self")) -> int:
    for line in (proc / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def private_tmp() -> Iterator[Path]:
    """Temporary files of the runs go to a directory of our own, so any left are ours."""
    directory = Path(tempfile.mkdtemp(prefix="hostile-soak-"))
    saved, tempfile.tempdir = tempfile.tempdir, str(directory)
    saved_env = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(directory)
    try:
        yield directory
    finally:
        with contextlib.suppress(OSError):
            directory.rmdir()   # only when empty: what is left gets reported
        tempfile.tempdir = saved
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env


def deliver_many(count: int, tally: Tally, rss_after_warm_up: list[int]) -> None:
    import compartment

    overrides = {"identity.uid_pool": f"{SOAK_POOL[0]}-{SOAK_POOL[1]}",
                 "limits.wall_timeout_s": "30"}
    policy = compartment.Policy.load("filter", overrides=overrides)
    with tempfile.TemporaryFile() as message, open(os.devnull, "wb") as sink:
        message.write(MESSAGE)
        for i in range(count):
            message.seek(0)
            if SERVE_SOCKET:
                result = compartment.submit(["/bin/cat"], "filter", stdin=message.fileno(),
                                            stdout=sink.fileno(), stderr=sink.fileno(),
                                            socket_path=SERVE_SOCKET,
                                            overrides=[f"{k}={v}" for k, v in overrides.items()])
            else:
                result = compartment.run(["/bin/cat"], policy, stdin=message, stdout=sink,
                                         stderr=sink)
            tally.runs += 1
            if result.exit_status != 0:
                tally.failures.append(f"run {i}: {result.outcome} {result.reason}")
            if i + 1 == WARM_UP:
                rss_after_warm_up.append(_rss())


def _ours(path: Path) -> bool:
    """Made by a soak agent (its pool uid) or by the runner (it says so in the name)."""
    try:
        return SOAK_POOL[0] <= path.lstat().st_uid <= SOAK_POOL[1] or "compartment" in path.name
    except OSError:
        return False


def leased_uids() -> list[int]:
    """uids of the soak's pool whose lease file still says leased (one byte)."""
    found = []
    for uid in range(SOAK_POOL[0], SOAK_POOL[1] + 1):
        path = LEASE_DIR / str(uid)
        try:
            if path.stat().st_size:
                found.append(uid)
        except FileNotFoundError:
            continue
    return found


def compare(before: Snapshot, after: Snapshot, tmp: Path, leases: bool = True) -> list[str]:
    problems = []
    leaked = {n: t for n, t in after.fds.items() if before.fds.get(n) != t}
    # Not a leak: the empty network namespace a root supervisor makes once and every later run
    # joins (compartment/confine/namespaces.py).  One, and not the process's own.
    shared = [n for n, t in leaked.items()
              if t.startswith("net:[") and t != os.readlink("/proc/self/ns/net")]
    if len(shared) == 1:
        del leaked[shared[0]]
    if leaked:
        problems.append(f"descriptors leaked: {leaked}")
    if after.zombies:
        problems.append(f"zombie children: {after.zombies}")
    if after.mounts != before.mounts:
        problems.append(f"mounts changed: {before.mounts} -> {after.mounts}")
    left = sorted(p.name for p in tmp.rglob("*"))
    if left:
        problems.append(f"temporary files left: {left[:10]}")
    new_shm = sorted(name for name in after.shm - before.shm if _ours(Path("/dev/shm") / name))
    if new_shm:
        problems.append(f"new /dev/shm entries: {new_shm[:10]}")
    # A lease left by a supervisor killed earlier (a fault test) is cleaned at its next use;
    # only leases this soak added count.  Concurrent callers see each other's live leases, so
    # only the final check, after all of them ended, looks.
    still = sorted(after.leases - before.leases)
    if leases and still:
        problems.append(f"uids still leased: {still[:10]}")
    return problems


def worker(count: int) -> int:
    """One concurrent caller: its own deliveries and its own leak check, as one JSON line."""
    with private_tmp() as tmp:
        tally, rss = Tally(), []
        before = Snapshot.take()
        deliver_many(count, tally, rss)
        after = Snapshot.take()
        problems = compare(before, after, tmp, leases=False) + tally.failures[:5]
        if rss and after.rss - rss[0] > RSS_GROWTH_LIMIT:
            problems.append(f"memory grew {(after.rss - rss[0]) >> 20} MiB over {count} runs")
    print(json.dumps({"runs": tally.runs, "problems": problems}))
    return 0


def soak(deliveries: int, callers: int) -> tuple[list[str], float, int]:
    """Sequential deliveries in this process, then `callers` concurrent worker processes."""
    started = time.monotonic()
    problems = []
    growth = 0
    with private_tmp() as tmp:
        tally, rss = Tally(), []
        before = Snapshot.take()
        deliver_many(deliveries, tally, rss)
        serve = ["--serve-socket", SERVE_SOCKET] if SERVE_SOCKET else []
        workers = [subprocess.Popen([sys.executable, __file__, "--worker",
                                     str(deliveries // callers), "--pool", str(SOAK_POOL[0]),
                                     *serve],
                                    stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=
                                    os.pathsep.join(sys.path)))
                   for _ in range(callers)]
        for number, process in enumerate(workers):
            out, _ = process.communicate()
            try:
                report = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                problems.append(f"caller {number}: no report, status {process.returncode}")
                continue
            problems += [f"caller {number}: {p}" for p in report["problems"]]
        after = Snapshot.take()
        # Through the daemon, the uid it prepared ahead is leased: soak_served looks after it.
        problems += compare(before, after, tmp, leases=not SERVE_SOCKET) + tally.failures[:5]
        growth = after.rss - rss[0] if rss else 0
        if growth > RSS_GROWTH_LIMIT:
            problems.append(f"memory grew {growth >> 20} MiB over {deliveries} runs")
    return problems, time.monotonic() - started, growth


def soak_served(deliveries: int, callers: int) -> tuple[list[str], float, int]:
    """The soak through a daemon of its own; the daemon must be left as it was found."""
    global SERVE_SOCKET
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from serving import Daemon

    daemon = Daemon().start()
    SERVE_SOCKET = daemon.socket
    try:
        _warm = soak(WARM_UP, 0)  # the daemon's caches and allocator, before its baseline
        daemon.reload()  # lets go of the compartments it prepared ahead
        before = _settled(daemon)
        problems, seconds, growth = soak(deliveries, callers)
        daemon.reload()
        after = _settled(daemon)
    finally:
        SERVE_SOCKET = ""
        daemon.stop()
    with tempfile.TemporaryDirectory() as nothing:  # the daemon's temporary files are none
        problems += [f"daemon: {p}" for p in compare(before, after, Path(nothing))]
    if after.rss - before.rss > RSS_GROWTH_LIMIT:
        problems.append(f"daemon: memory grew {(after.rss - before.rss) >> 20} MiB")
    if daemon.process.returncode != 0:
        problems.append(f"daemon: exited {daemon.process.returncode}: {daemon.log()[-500:]}")
    return problems, seconds, growth


def _settled(daemon: object) -> Snapshot:
    """The daemon's state once what it prepared ahead is gone (killed on a reload, reaped
    right after): no uid of the soak's pool leased any more."""
    deadline = time.monotonic() + 10
    while leased_uids() and time.monotonic() < deadline:
        time.sleep(0.02)
    return Snapshot.take(daemon.process.pid)  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--serve", action="store_true",
                        help="through a compartment serve of the soak's own")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-socket", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global SERVE_SOCKET, SOAK_POOL
    if args.worker is not None:
        SOAK_POOL = (args.pool, args.pool + 99)   # the parent's window
        SERVE_SOCKET = args.serve_socket
        return worker(args.worker)
    if args.serve:
        problems, seconds, growth = soak_served(args.deliveries, args.callers)
    else:
        problems, seconds, growth = soak(args.deliveries, args.callers)
    for problem in problems:
        print(problem)
    total = args.deliveries + args.callers * (args.deliveries // args.callers)
    print(f"soak: {total} deliveries ({args.deliveries} sequential, then {args.callers} "
          f"concurrent callers) in {seconds:.0f}s; API user's RSS grew {growth / 2**20:.1f} MiB "
          f"after the warm-up; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
