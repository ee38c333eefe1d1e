"""make demo: a message through a filter, into a Maildir, and a hostile agent contained.

Runs as root on a fresh machine (after `make setup`), through the `compartment run` command
exactly as an MTA would call it, and prints each exit status and report line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
COMPARTMENT = [sys.executable, "-m", "compartment", "run"]
RUN: list[str] = []  # COMPARTMENT, or COMPARTMENT in a delegated scope: command()


def command() -> list[str]:
    """`compartment run`; under systemd with cgroup v2, where the login session's cgroup is not
    delegated to it (no usable cgroup: `compartment check` says so), in a delegated scope of
    its own, as docs/policy.md says a root command must run there."""
    check = subprocess.run([sys.executable, "-m", "compartment", "check"], capture_output=True)
    if check.returncode == 0 or b"no usable cgroup" not in check.stderr or \
            not shutil.which("systemd-run"):
        return COMPARTMENT
    print("(the login session's cgroup is not ours to divide: each run goes in a scope of its "
          "own, systemd-run --scope -p Delegate=yes)")
    return ["systemd-run", "--scope", "--quiet", "-p", "Delegate=yes", *COMPARTMENT]


def step(title: str, args: list[str], message: bytes, report: str) -> bytes:
    print(f"\n== {title}\n$ compartment run {' '.join(args)} < message.eml")
    done = subprocess.run([*RUN, "--report", report, *args], input=message, capture_output=True)
    if done.stdout:
        print("-- stdout:\n" + done.stdout.decode(errors="replace").rstrip())
    if done.stderr:
        print("-- stderr:\n" + done.stderr.decode(errors="replace").rstrip())
    with open(report) as lines:
        record = json.loads(lines.read().splitlines()[-1])
    print(f"-- exit status {done.returncode}; report: outcome={record['outcome']} "
          f"uid={record['uid']} denied_syscall={record['denied_syscall']} "
          f"wall={record['wall_s']:.3f}s cpu={record['cpu_s']:.3f}s")
    print("   " + json.dumps(record))
    return done.stdout


def main() -> int:
    RUN[:] = command()
    with open(os.path.join(DEMO, "message.eml"), "rb") as file:
        message = file.read()
    work = tempfile.mkdtemp(prefix="compartment-demo-")
    os.chmod(work, 0o755)
    report = os.path.join(work, "report.jsonl")
    maildir = os.path.join(work, "Maildir")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub))
    for root, dirs, _ in os.walk(maildir):  # the mailbox belongs to a user, never to root
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            os.chown(name, 65534, 65534)
    # The agents live in this checkout; show them read-only inside the compartments.
    show = ["--set", f"filesystem.readable={DEMO}"]
    filtered = step("1. a shell-script filter under the `filter` policy",
                    ["-p", "filter", *show, "--", f"{DEMO}/add-header.sh"], message, report)
    step("2. delivery into a Maildir under the `deliver` policy",
         ["-p", "deliver", *show, "--set", f"filesystem.writable={maildir}", "--",
          f"{DEMO}/maildir-deliver.sh", maildir], filtered, report)
    delivered = os.listdir(os.path.join(maildir, "new"))
    print(f"-- Maildir/new now holds {len(delivered)} message(s), owned by uid "
          f"{os.stat(os.path.join(maildir, 'new', delivered[0])).st_uid if delivered else '-'}")
    step("3. a hostile agent under the `filter` policy",
         ["-p", "filter", *show, "--set", "limits.processes=20", "--",
          f"{DEMO}/hostile.sh"], message, report)
    print(f"\nThe report ({report}) holds one JSON line per run.")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
