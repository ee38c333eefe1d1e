"""make demo: a message through a filter, into a Maildir, and a hostile agent contained.

Runs as root on a fresh machine (after `make setup`), through the `compartment run` command
exactly as an MTA would call it, and prints each exit status and report line; then the same
through the resident supervisor: a `compartment serve` of the demo's own (started and stopped
here, on a socket in a scratch directory), `compartment submit`, its log and `status`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
COMPARTMENT = [sys.executable, "-m", "compartment", "run"]
COMMAND = os.path.join(os.path.dirname(sys.executable), "compartment")  # bin/compartment
SCOPE: list[str] = []  # a delegated systemd scope to run in, where one is needed: scope()


def scope() -> list[str]:
    """Under systemd with cgroup v2, a root login session's cgroup is not delegated to
    compartment (no usable cgroup: `compartment check` says so): each command then runs in a
    delegated scope of its own, as docs/policy.md tells administrators to."""
    check = subprocess.run([sys.executable, "-m", "compartment", "check"], capture_output=True)
    if check.returncode == 0 or b"no usable cgroup" not in check.stderr or \
            not shutil.which("systemd-run"):
        return []
    print("(the login session's cgroup is not ours to divide: each command runs in a scope of "
          "its own, systemd-run --scope -p Delegate=yes)")
    return ["systemd-run", "--scope", "--quiet", "-p", "Delegate=yes"]


def step(title: str, args: list[str], message: bytes, report: str,
         command: list[str] = COMPARTMENT) -> bytes:
    shown = "run" if command is COMPARTMENT else "submit --socket SOCKET"
    print(f"\n== {title}\n$ compartment {shown} {' '.join(args)} < message.eml")
    done = subprocess.run([*SCOPE, *command, "--report", report, *args], input=message,
                          capture_output=True)
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
    SCOPE[:] = scope()
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
    served(work, show, message, report)
    print(f"\nThe report ({report}) holds one JSON line per run.")
    shutil.rmtree(work)
    return 0


def served(work: str, show: list[str], message: bytes, report: str) -> None:
    """4-5: the same filter and hostile agent through `compartment serve` and `submit`."""
    path, log = os.path.join(work, "socket"), os.path.join(work, "serve.log")
    print(f"\n== 4. the resident supervisor\n$ compartment serve --socket {path} --log stderr &")
    with open(log, "wb") as logfile:
        daemon = subprocess.Popen([*SCOPE, COMMAND, "serve", "--socket", path, "--config",
                                   os.path.join(work, "no-serve.toml"), "--log", "stderr"],
                                  stdin=subprocess.DEVNULL, stderr=logfile)
    try:
        _wait_listening(path, daemon)
        submit = [COMMAND, "submit", "--socket", path]
        step("4. the filter through the daemon", ["-p", "filter", *show, "--",
                                                  f"{DEMO}/add-header.sh"], message, report,
             submit)
        step("5. the hostile agent through the daemon",
             ["-p", "filter", *show, "--set", "limits.processes=20", "--",
              f"{DEMO}/hostile.sh"], message, report, submit)
        status = subprocess.run([COMMAND, "status", "--socket", path], capture_output=True)
        print(f"\n$ compartment status\n{status.stdout.decode().rstrip()}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    with open(log) as lines:
        print("\n-- the daemon's log (syslog's mail facility unless --log stderr):")
        print("".join(f"   {line}" for line in lines))


def _wait_listening(path: str, daemon: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.poll() is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError("compartment serve did not start (its log says why)")


if __name__ == "__main__":
    sys.exit(main())
