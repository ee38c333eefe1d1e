"""The on-disk site shared by the real-MTA tests: pipe user, Maildirs, agents, reports.

Layout (recreated empty for each test module, which may add its own subdirectories):
    /var/lib/compartment-test/               PIPE_USER's home in the password file, so that
                                             $HOME/Maildir (local(8), procmail, maildrop) is:
    /var/lib/compartment-test/Maildir        where the compartment's delivery agent writes
    /var/lib/compartment-test/sink/Maildir   where bounces to the test sender land (no compartment)
    /var/lib/compartment-test/reports/       one compartment --report file per scenario
    /usr/local/libexec/compartment-test/     the agents, where a compartment's read-only system
                                             view shows them (the repository checkout is not
                                             visible inside a compartment)
The MTAs run every pipe command as PIPE_USER, an unprivileged system user: Postfix pipe(8)
refuses root, and that is how these MTAs are deployed.  compartment then confines the agent
through a user namespace.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from .corpus import marker_of

REPO = Path(__file__).resolve().parents[2]
PIPE_USER = "compartment-test"
SITE = Path("/var/lib/compartment-test")
MAILDIR = SITE / "Maildir"
SINK_MAILDIR = SITE / "sink" / "Maildir"
REPORTS = SITE / "reports"
AGENTS = Path("/usr/local/libexec/compartment-test")
AGENT_SOURCES = [*sorted((REPO / "examples" / "agents").iterdir()),
                 *sorted((Path(__file__).parent / "agents").glob("*.py"))]
PYTHON = "/usr/bin/python3"  # Debian's interpreter: visible inside the filter/deliver view
SENDER = "sender@sink.test"
# compartment's limit per scenario fires well before the MTA's own (MTA_TIME_LIMIT_S), because
# Postfix bounces, and Exim without timeout_defer bounces, when their own limit fires.
WALL_TIMEOUT_S = 30
MTA_TIME_LIMIT_S = 60
WAIT_S = 60

T = TypeVar("T")


@dataclass(frozen=True)
class Scenario:
    """One kind of agent behind one MTA transport, and what the MTA must do with the message."""

    name: str            # transport name suffix and recipient domain NAME.test
    agent: str           # file name under AGENTS
    expect: str          # "delivered", "deferred" or "bounced"
    outcomes: frozenset[str]  # report outcomes that are right for this agent
    settings: tuple[str, ...] = field(default=())

    @property
    def domain(self) -> str:
        return f"{self.name}.test"

    @property
    def report(self) -> Path:
        return REPORTS / f"{self.name}.jsonl"


SCENARIOS = [
    Scenario("deliver", "maildir-deliver.py", "delivered", frozenset({"ok"})),
    Scenario("envelope", "envelope.py", "delivered", frozenset({"ok"})),
    Scenario("timeout", "sleeper.py", "deferred", frozenset({"timeout"}),
             ("limits.wall_timeout_s=3",)),
    Scenario("violation", "socket_inet.py", "deferred", frozenset({"violation"})),
    # A Python agent sees MemoryError under RLIMIT_AS and exits 1 by itself; the runner maps
    # that to a temporary failure too, so either outcome keeps the message.
    Scenario("memory", "memory_hog.py", "deferred", frozenset({"memory-limit", "agent-failed"}),
             ("limits.memory_bytes=256M",)),
    Scenario("permanent", "exit_permanent.py", "bounced", frozenset({"agent-failed"})),
]
FAILING = [s for s in SCENARIOS if s.expect != "delivered"]


def compartment_command() -> str:
    """The compartment executable under test.

    COMPARTMENT_BIN overrides it (a stand-in while developing fixtures); otherwise the one
    next to the running interpreter (the project's venv), else the repository's .venv.
    """
    override = os.environ.get("COMPARTMENT_BIN")
    if override:
        return override
    for candidate in (Path(sys.executable).parent / "compartment",
                      REPO / ".venv" / "bin" / "compartment"):
        if candidate.exists():
            return str(candidate)
    pytest.fail("no compartment executable: run `make venv` first (or set COMPARTMENT_BIN)")


def compartment_argv(scenario: Scenario, agent_args: tuple[str, ...] = ()) -> list[str]:
    """The argv an MTA runs for `scenario`: compartment run, then the agent, no shell.
    Delivering agents get MAILDIR as their first argument, then `agent_args`."""
    argv = [compartment_command(), "run", "-p", "deliver",
            "--set", f"filesystem.writable={MAILDIR}",
            "--set", f"limits.wall_timeout_s={WALL_TIMEOUT_S}"]
    for setting in scenario.settings:
        argv += ["--set", setting]  # a later --set of the same key wins
    argv += ["--report", str(scenario.report), "--", PYTHON, str(AGENTS / scenario.agent)]
    if scenario.expect == "delivered":
        argv.append(str(MAILDIR))
    return argv + list(agent_args)


def sink_argv() -> list[str]:
    """Bounces to the test sender are stored by the sample agent without compartment, so the
    bounce check does not depend on what is being tested."""
    return [PYTHON, str(AGENTS / "maildir-deliver.py"), str(SINK_MAILDIR)]


LOCK_FILE = Path("/run/lock/compartment-test-site.lock")
LOCK_WAIT_S = 600


@contextmanager
def exclusive_site() -> Iterator[None]:
    """Hold the site (port 25, SITE, AGENTS, the installed MTA) for one test module.

    Two test runs on one machine (a developer's and CI's, say) would otherwise swap MTAs and
    wipe each other's Maildirs; the second one waits for the first.
    """
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test run held {LOCK_FILE} for {LOCK_WAIT_S} s")
                time.sleep(1)
        yield  # the lock goes with the descriptor when the file is closed


def _ensure_user() -> None:
    try:
        pwd.getpwnam(PIPE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", str(SITE), "--shell", "/usr/sbin/nologin", PIPE_USER],
                       check=True)


def prepare_site() -> None:
    """Create the pipe user, empty Maildirs and report directory, and install the agents."""
    _ensure_user()
    shutil.rmtree(SITE, ignore_errors=True)
    entry = pwd.getpwnam(PIPE_USER)
    SITE.mkdir(mode=0o755, parents=True)
    for directory in (MAILDIR, SINK_MAILDIR, REPORTS):
        directory.mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (MAILDIR / sub).mkdir()
        (SINK_MAILDIR / sub).mkdir()
    for path in [SITE / "sink", *SITE.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    AGENTS.mkdir(mode=0o755, parents=True, exist_ok=True)
    for source in AGENT_SOURCES:
        shutil.copyfile(source, AGENTS / source.name)
        (AGENTS / source.name).chmod(0o755)


def check_pipe_user_can_run_compartment() -> None:
    """Fail early, with the reason, when PIPE_USER cannot even start compartment (for example a
    venv whose interpreter lives under /root, mode 0700)."""
    argv = ["runuser", "-u", PIPE_USER, "--", compartment_command(), "check", "-p", "deliver",
            "--set", f"filesystem.writable={MAILDIR}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        pytest.fail(f"the MTA's pipe user cannot run compartment ({' '.join(argv)} exited "
                    f"{result.returncode}): {result.stderr.strip()[-1500:]}\nThe venv and the "
                    "repository must be readable and searchable by an unprivileged user.")


def remove_site() -> None:
    shutil.rmtree(AGENTS, ignore_errors=True)


def read_maildir(maildir: Path) -> dict[str, bytes]:
    """Delivered messages by marker; a file without a marker is keyed by its name."""
    messages = {}
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            data = path.read_bytes()
            messages[marker_of(data) or path.name] = data
    return messages


def envelope_records(maildir: Path) -> list[dict[str, object]]:
    """What envelope.py stored in `maildir` (files named envelope-*)."""
    return [json.loads(path.read_text()) for sub in ("new", "cur")
            for path in (maildir / sub).glob("envelope-*")]


def bounces_for(recipient: str) -> list[bytes]:
    """Delivery status notifications in the sink that name `recipient` (case-insensitive)."""
    needle = recipient.lower().encode()
    return [data for data in read_maildir(SINK_MAILDIR).values() if needle in data.lower()]


def report_records(scenario: Scenario) -> list[dict[str, object]]:
    if not scenario.report.exists():
        return []
    with scenario.report.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


def run_checked(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a setup command; on failure, fail the test with its output."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=120, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}"
                    f"\n{result.stderr}")
    return result
