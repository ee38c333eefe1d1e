"""Running one hostile case and judging it: contained (nothing found outside) and the right
exit class (what the caller, an MTA, would do with the status).

Test side, root.  An agent runs either through the API (`compartment.run`, the supervisor is
this process) or through the CLI in a child process (when the agent attacks the supervisor
itself, or the case needs two compartments at once).

Through the resident supervisor (`run_hostile.py --serve`, HOSTILE_VIA=serve for pytest):
every case is `compartment submit` to a daemon the harness started (`SERVE`), the daemon is the
supervisor agents attack, and it must be alive after each case.  The "@nobody" cases test the
unprivileged (user-namespace) mode, which the daemon does not have: every peer's compartment is
a root one, so they are not run that way.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostile_evidence import CANARY_UID, MAIL_UID, NOBODY, Outside, kill_survivors, survivors

SERVE = None  # a tests/serving.Daemon: run every case through it (set by the harness)

TEMPFAIL = 75
CLASS = "CLASS: "   # prefix of a check's finding that is about the exit class, not an escape
# uids leased to hostile cases only, so that a process left with one of them is ours.
HOSTILE_POOL = "62000-62999"
MESSAGE = b"From: sender@example.org\nTo: rcpt@example.org\nSubject: hostile\n\nbody\n"
# The launcher becomes the CLI by exec, so its pid, known before the agent's argv is built, is
# the supervisor's pid: agents that attack the supervisor get it as an argument.
_LAUNCH = ("import os, sys; pid = str(os.getpid()); "
           "os.execv(sys.executable, [sys.executable, '-m', 'compartment', "
           "*(a.replace('{supervisor}', pid) for a in sys.argv[1:])])")


@dataclass(frozen=True)
class Expect:
    """What the caller may see: exit statuses and outcomes accepted for this case."""

    statuses: frozenset[int]
    outcomes: frozenset[str]
    denied: frozenset[str] = frozenset()   # accepted denied_syscall names for a violation

    def judge(self, seen: Observed) -> list[str]:
        wrong = []
        if seen.exit_status not in self.statuses:
            wrong.append(f"exit status {seen.exit_status}, expected {sorted(self.statuses)}")
        if seen.outcome not in self.outcomes:
            wrong.append(f"outcome {seen.outcome}, expected {sorted(self.outcomes)}")
        if self.denied and seen.outcome == "violation" and seen.denied not in self.denied:
            wrong.append(f"denied syscall {seen.denied!r}, expected one of {sorted(self.denied)}")
        return wrong


def blocked() -> Expect:
    """Refused by the kernel (the agent then fails temporarily) or killed as a violation."""
    return Expect(frozenset({TEMPFAIL}), frozenset({"agent-failed", "violation"}))


def violation(*names: str) -> Expect:
    """A syscall of the built-in baseline: always a violation, whatever the policy says."""
    return Expect(frozenset({TEMPFAIL}), frozenset({"violation"}), frozenset(names))


def limit(*outcomes: str) -> Expect:
    """Stopped by a limit: a temporary failure, never success and never a bounce."""
    return Expect(frozenset({TEMPFAIL}), frozenset(outcomes))


def status(code: int, *outcomes: str) -> Expect:
    return Expect(frozenset({code}), frozenset(outcomes))


@dataclass
class Observed:
    outcome: str
    exit_status: int
    reason: str
    denied: str | None
    uid: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float


@dataclass
class CaseRun:
    """One case in progress: where things are, and what was observed."""

    case: Case
    outside: Outside
    bin_dir: Path
    mail: Path
    stdin_path: Path
    seen: Observed | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def fill(self, text: str) -> str:
        return text.format(mail=self.mail, evidence=self.outside.evidence, bin=self.bin_dir,
                           token=self.outside.token, root=self.outside.root)


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    agent: str                      # a binary built from agents/NAME.c, or "py:NAME"
    args: tuple[str, ...]
    expect: Expect
    policy: str = "filter"
    overrides: Mapping[str, str] = field(default_factory=dict)
    via: str = "api"                # "api" or "cli"
    stdin: str = "message"          # "message" or "tty"
    uid: str = "pool"               # "pool" or "canary" (the agent shares the canary's uid)
    user: str = "root"              # the caller: "root", or "nobody" (unprivileged mode, CLI)
    merged: bool = False            # stdout and stderr into one stream, as Postfix pipe(8) reads
    caller: str = "sysexits"        # the caller's exit-status convention (qmail: 111 soft)
    wall_s: float = 10
    prepare: Callable[[CaseRun], None] | None = None
    check: Callable[[CaseRun], list[str]] | None = None   # more evidence, found outside


@dataclass
class Verdict:
    case: Case
    traces: list[str]
    wrong: list[str]
    seen: Observed | None
    error: str = ""

    @property
    def contained(self) -> bool:
        return not self.traces

    def line(self) -> str:
        seen = self.seen
        got = (f"{seen.outcome} {seen.exit_status} ({seen.wall_s:.1f}s)" if seen
               else f"error: {self.error}")
        state = "contained" if self.contained else "ESCAPED"
        klass = "class ok" if not self.wrong else "WRONG CLASS: " + "; ".join(self.wrong)
        text = f"{state:9} {self.case.group:9} {self.case.name:28} {got}  {klass}"
        if self.traces:
            text += "\n          evidence: " + "; ".join(self.traces)
        return text


def agent_argv(case: Case, run: CaseRun, supervisor: str) -> list[str]:
    tail = [*run.outside.agent_args(0)[:-1], supervisor, *(run.fill(a) for a in case.args)]
    if case.agent.startswith("py:"):
        source = (Path(__file__).parent / "agents" / f"{case.agent[3:]}.py").read_text()
        return ["/usr/bin/python3", "-c", source, *tail]
    return [str(run.bin_dir / case.agent), *tail]


def overrides_for(case: Case, run: CaseRun) -> dict[str, str]:
    readable = [str(run.bin_dir)]
    values = {"limits.wall_timeout_s": str(case.wall_s), "identity.uid_pool": HOSTILE_POOL}
    if case.policy == "deliver":
        values["filesystem.writable"] = json.dumps([str(run.mail)])
    if case.uid == "canary":
        values["identity.uid"] = str(CANARY_UID)
        values["identity.gid"] = str(CANARY_UID)
    for key, value in case.overrides.items():
        if key == "filesystem.readable":
            readable += json.loads(run.fill(value))
        else:
            values[key] = run.fill(value)
    values["filesystem.readable"] = json.dumps(readable)
    return values


def run_api(case: Case, run: CaseRun, stdin: int) -> Observed:
    import compartment

    policy = compartment.Policy.load(case.policy, overrides=overrides_for(case, run))
    out_path, err_path = run.outside.root / "stdout", run.outside.root / "stderr"
    if case.merged:
        err_path = out_path
    env = dict(os.environ, HOSTILE_SECRET=run.outside.env_secret, SENDER="sender@example.org")
    with open(out_path, "wb") as out, open(err_path, "ab") as err:
        result = compartment.run(agent_argv(case, run, "0"), policy, stdin=stdin, stdout=out,
                                 stderr=err, env=env, exit_codes=case.caller)
    return Observed(str(result.outcome), int(result.exit_status), result.reason or "",
                    result.denied_syscall, result.uid, out_path.read_bytes(),
                    b"" if case.merged else err_path.read_bytes(), float(result.wall_s or 0))


def cli_command(policy: str, overrides: Mapping[str, str], argv: Sequence[str],
                report: Path) -> list[str]:
    sets = [f"--set={key}={value}" for key, value in overrides.items()]
    if SERVE is not None:  # the supervisor agents attack is the daemon
        daemon = str(SERVE.process.pid)
        return [str(Path(sys.executable).parent / "compartment"), "submit",
                f"--socket={SERVE.socket}", "-p", policy, f"--report={report}", *sets, "--",
                *(a.replace("{supervisor}", daemon) for a in argv)]
    return [sys.executable, "-c", _LAUNCH, "run", "-p", policy, f"--report={report}", *sets,
            "--", *argv]


def observe_cli(process: subprocess.Popen[bytes], report: Path, timeout_s: float) -> Observed:
    start = time.monotonic()
    out, err = process.communicate(timeout=timeout_s)
    err = err or b""
    wall = time.monotonic() - start
    record: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        record = json.loads(report.read_text().splitlines()[-1])
    outcome = str(record.get("outcome", f"cli-exit-{process.returncode}"))
    return Observed(outcome, process.returncode, str(record.get("reason", "")),
                    record.get("denied_syscall"), record.get("uid"), out, err, wall)


def run_cli(case: Case, run: CaseRun, stdin: int) -> Observed:
    reports = run.outside.root / "reports"
    reports.mkdir(mode=0o777)
    os.chmod(reports, 0o777)   # the unprivileged caller writes its report here
    report = reports / "report.jsonl"
    command = cli_command(case.policy, overrides_for(case, run),
                          agent_argv(case, run, "{supervisor}"), report)
    after = command.index("-p")
    command[after:after] = [f"--exit-codes={case.caller}"]
    env = dict(os.environ, HOSTILE_SECRET=run.outside.env_secret, SENDER="sender@example.org")
    ids: dict[str, object] = {}
    if case.user == "nobody":
        ids = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}
    process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT if case.merged else subprocess.PIPE,
                               env=env, start_new_session=True,
                               pass_fds=tuple(run.extra.get("pass_fds", ())), **ids)
    run.extra["supervisor_pid"] = process.pid
    return observe_cli(process, report, case.wall_s + 30)


def run_case(case: Case, case_dir: Path, bin_dir: Path) -> Verdict:
    agent_uid = NOBODY if case.user == "nobody" else CANARY_UID
    outside = Outside(case_dir, bin_dir / "canary", agent_uid)
    mail = case_dir / "mail"
    mail.mkdir()
    owner = NOBODY if case.user == "nobody" else MAIL_UID
    os.chown(mail, owner, owner)
    os.chmod(mail, 0o700)
    stdin_path = case_dir / "message"
    stdin_path.write_bytes(MESSAGE)
    run = CaseRun(case, outside, bin_dir, mail, stdin_path)
    try:
        return _run_and_judge(case, run)
    finally:
        outside.close()


def _run_and_judge(case: Case, run: CaseRun) -> Verdict:
    if case.prepare:
        case.prepare(run)
    tty_fds: tuple[int, int] | None = os.openpty() if case.stdin == "tty" else None
    run.extra["tty"] = tty_fds
    if tty_fds and case.user == "nobody":  # a terminal is its user's own, as after a login
        os.fchown(tty_fds[1], NOBODY, -1)
    stdin = tty_fds[1] if tty_fds else os.open(run.stdin_path, os.O_RDONLY)
    try:
        runner = run_cli if case.via == "cli" or case.user != "root" or SERVE else run_api
        run.seen = runner(case, run, stdin)
        traces = run.outside.traces(run.seen.stdout + run.seen.stderr)
        wrong = case.expect.judge(run.seen)
        for found in case.check(run) if case.check else []:
            # a check may find a wrong class the status alone does not show (CLASS: ...)
            (wrong if found.startswith(CLASS) else traces).append(found.removeprefix(CLASS))
    except Exception as error:  # noqa: BLE001 - a crash of the harness is reported per case
        return Verdict(case, [], [], None, f"{type(error).__name__}: {error}")
    finally:
        if tty_fds:
            os.close(tty_fds[0])
        os.close(stdin)
    canaries = {run.outside.canary_same.pid, run.outside.canary_root.pid}
    marker = str(run.outside.evidence)   # in every agent's argv, unique to this case
    left = survivors(marker, canaries | {os.getpid()})
    if left:
        kill_survivors(marker, canaries | {os.getpid()})
    return Verdict(case, traces + left + daemon_alive(), wrong, run.seen)


def daemon_alive() -> list[str]:
    if SERVE is not None and SERVE.process.poll() is not None:
        return [f"the daemon died (status {SERVE.process.returncode})"]
    return []
