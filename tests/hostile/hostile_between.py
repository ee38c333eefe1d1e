"""Between compartments: two run at once, one leaves something, the other looks for it.

Test side, root.  Both compartments run through the CLI in child processes and, to make the
attack as strong as it can be, with the same uid (so that file modes and signal permissions do
not hide a missing namespace).  Evidence is what the seeker found of the holder's token, what
the holder saw of the seeker, and what the test itself can see of the holder from the host while
it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostile_evidence import CANARY_UID, NOBODY, Outside, kill_survivors, survivors
from hostile_run import (
    Case,
    CaseRun,
    Expect,
    Verdict,
    cli_command,
    daemon_alive,
    observe_cli,
    overrides_for,
)

HOLD_S = 3
OWN_STATUS = Expect(frozenset({0, 75}), frozenset({"ok", "agent-failed"}))
DENIED_OR_OWN = Expect(frozenset({0, 75}), frozenset({"ok", "agent-failed", "violation"}))


@dataclass(frozen=True)
class Pair:
    name: str
    holder: str            # ipc agent mode of the compartment that leaves something
    seeker: str            # ipc agent mode of the one that looks for it
    shared: str            # the shared name: file, IPC key or socket name ({token} filled in)
    expect: Expect = OWN_STATUS
    host_probe: Callable[[Pair, CaseRun, str], list[str]] | None = None
    holder_tells: bytes = b""   # what the holder prints if the seeker reached it
    user: str = "root"          # the caller of both: root (pool or fixed uid) or nobody
    uid: str = "canary"         # as root: both with one fixed uid ("canary"), or pool uids


def _shm_on_host(pair: Pair, run: CaseRun, shared: str) -> list[str]:
    path = Path("/dev/shm") / shared
    if path.exists():
        path.unlink()
        return [f"/dev/shm/{shared} appeared on the host"]
    return []


def _sysv_on_host(pair: Pair, run: CaseRun, shared: str) -> list[str]:
    key = int(shared, 0)
    found = []
    for table in ("shm", "msg"):
        for line in Path(f"/proc/sysvipc/{table}").read_text().splitlines()[1:]:
            if int(line.split()[0]) == key:
                found.append(f"SysV {table} key {shared} visible on the host")
    return found


def _abstract_on_host(pair: Pair, run: CaseRun, shared: str) -> list[str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect("\0" + shared)
        except OSError:
            return []
    return [f"abstract socket @{shared} of a compartment reachable from the host"]


def _flock_on_host(pair: Pair, run: CaseRun, shared: str) -> list[str]:
    with open(shared, "rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return [f"a compartment's flock on {shared} blocks the host"]
        fcntl.flock(file, fcntl.LOCK_UN)
    return []


AS_ROOT = [
    Pair("dev-shm", "shm-put", "shm-get", "hostile-{token}", host_probe=_shm_on_host),
    Pair("sysv-ipc", "sysv-put", "sysv-get", "{key}", host_probe=_sysv_on_host),
    Pair("abstract-socket", "abstract-listen", "abstract-connect", "hostile-pair-{token}",
         host_probe=_abstract_on_host, holder_tells=b"ACCEPTED"),
    Pair("flock-shared-file", "flock-hold", "flock-probe", "{root}/shared/lockfile",
         host_probe=_flock_on_host),
    Pair("flock-etc-passwd", "flock-hold", "flock-probe", "/etc/passwd",
         host_probe=_flock_on_host),
    Pair("signals", "signal-target", "signal-everyone", "none", holder_tells=b"SIGNALLED"),
    Pair("keyring", "key-put", "key-get", "hostile-key-{token}", expect=DENIED_OR_OWN),
    # limits.processes is RLIMIT_NPROC: is it the compartment's own, or shared with every
    # process of the same uid?  The pool gives each compartment its own uid.
    Pair("process-starvation", "bomb-hold", "ordinary", "none", uid="pool"),
]
# Two compartments of one unprivileged caller: the same uid on both sides by construction.
PAIRS = AS_ROOT + [dataclasses.replace(p, name=f"{p.name}@nobody", user="nobody")
                   for p in AS_ROOT]


def run_pair(pair: Pair, case_dir: Path, bin_dir: Path) -> Verdict:
    case = Case(name=pair.name, group="between", agent="ipc", args=(), expect=pair.expect,
                uid=pair.uid if pair.user == "root" else "pool", user=pair.user,
                wall_s=HOLD_S + 7, overrides={"filesystem.readable": '["{root}/shared"]'})
    outside = Outside(case_dir, bin_dir / "canary", NOBODY if pair.user == "nobody" else CANARY_UID)
    shared_dir = case_dir / "shared"
    shared_dir.mkdir(mode=0o755)
    (shared_dir / "lockfile").write_text("lock me\n")
    os.chmod(shared_dir / "lockfile", 0o644)
    run = CaseRun(case, outside, bin_dir, case_dir / "mail", case_dir / "message")
    try:
        verdict = _judge(pair, case, run)
    finally:
        outside.close()
    verdict.traces += daemon_alive()
    return verdict


def _start(pair: Pair, run: CaseRun, mode: str, shared: str, side: str) -> tuple[
        subprocess.Popen[bytes], Path]:
    reports = run.outside.root / f"reports-{side}"
    reports.mkdir(mode=0o777)
    os.chmod(reports, 0o777)   # the unprivileged caller writes its report here
    report = reports / "report.jsonl"
    argv = [str(run.bin_dir / "ipc"), *run.outside.agent_args(0), mode, shared,
            f"TOKEN-{side}-{run.outside.token}", str(HOLD_S)]
    command = cli_command("filter", overrides_for(run.case, run), argv, report)
    ids: dict[str, object] = {}
    if pair.user == "nobody":
        ids = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, **ids)
    return process, report


def _judge(pair: Pair, case: Case, run: CaseRun) -> Verdict:
    key = str(0x50000000 + int(run.outside.token[:6], 16))
    shared = pair.shared.format(token=run.outside.token, root=run.outside.root, key=key)
    holder, holder_report = _start(pair, run, pair.holder, shared, "holder")
    time.sleep(0.8)   # the holder has made its thing by now
    traces = pair.host_probe(pair, run, shared) if pair.host_probe else []
    seeker, seeker_report = _start(pair, run, pair.seeker, shared, "seeker")
    seen_seeker = observe_cli(seeker, seeker_report, HOLD_S + 30)
    seen_holder = observe_cli(holder, holder_report, HOLD_S + 30)
    holder_token = f"TOKEN-holder-{run.outside.token}".encode()
    if holder_token in seen_seeker.stdout:
        traces.append("the seeker read the holder's token")
    if pair.holder_tells and pair.holder_tells in seen_holder.stdout:
        traces.append(f"the holder was reached: {pair.holder_tells.decode()}")
    if b"BUSY" in seen_seeker.stdout:
        traces.append("the seeker saw the holder's lock")
    if pair.seeker == "ordinary" and b"STARTED" not in seen_seeker.stdout:
        traces.append(f"the other compartment's fork bomb kept this one from working: "
                      f"{seen_seeker.outcome} {seen_seeker.reason or seen_seeker.stdout[:80]!r}")
    traces += run.outside.traces(seen_holder.stdout + seen_seeker.stdout)
    if pair.host_probe is _shm_on_host:
        traces += _shm_on_host(pair, run, shared)   # left behind after both ended
    marker = str(run.outside.evidence)   # in both agents' argv, unique to this pair
    left = survivors(marker, {run.outside.canary_same.pid, run.outside.canary_root.pid})
    if left:
        traces += left
        kill_survivors(marker, {run.outside.canary_same.pid, run.outside.canary_root.pid})
    wrong = [f"holder: {w}" for w in case.expect.judge(seen_holder)]
    wrong += [f"seeker: {w}" for w in case.expect.judge(seen_seeker)]
    with contextlib.suppress(OSError):
        (run.outside.root / "seeker.out").write_bytes(seen_seeker.stdout)
    return Verdict(case, traces, wrong, seen_seeker)
