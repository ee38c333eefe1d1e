"""Section 9: the fronts (issue 13) under a real Postfix.

Throughput: 10 KiB messages per second through Postfix -> lmtp(8) -> `compartment lmtp` -> a
Maildir agent in a compartment (mblaze's mdeliver, C, policy mdeliver; and
examples/agents/maildir-deliver.py, Python, policy deliver), against Postfix ->
lmtp(8) -> Dovecot's own LMTP server delivering into the same kind of Maildir, batches of the
two interleaved on the same Postfix.  Each batch is submitted over one SMTP session and timed
from its first byte to its last message in the Maildir.  Target: >= 0.5x Dovecot's rate.

Latency: one message at a time through an smtpd with `compartment milter` (a /bin/cat filter,
no rewrite) in smtpd_milters, against the same smtpd without a milter: the milter's added
milliseconds per message (the time to the reply to the final dot).

The fronts run as deployed: the installed command under uids of their own, clients of a
`compartment serve` started for the section (its rules for the two fronts alone).  Needs root,
Postfix and dovecot-lmtpd installed; takes the real-MTA tests' site lock while it runs, and
stops Postfix at the end.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import measure
from measure import Target

if TYPE_CHECKING:
    from bench import Context

ROOT = Path(__file__).resolve().parent.parent
SITE = Path("/var/lib/compartment-bench")
USER = "compartment-bench"
PRIVATE = Path("/var/spool/postfix/private")
DOVECOT_SOCKET = PRIVATE / "bench-dovecot-lmtp"
FRONT_SOCKET, MILTER_SOCKET = SITE / "lmtp" / "lmtp.sock", SITE / "milter" / "milter.sock"
MDELIVER_SOCKET = SITE / "lmtp-mdeliver" / "lmtp.sock"
DAEMON_SOCKET = SITE / "daemon" / "socket"
LMTP_UID, MILTER_UID = 64050, 64051  # the fronts' users (no passwd entry needed)
RULES = """
[[allow]]
user = {lmtp}
policies = ["deliver", "mdeliver"]
set = ["filesystem.writable"]
deliver_as_owner = ["{site}/front/Maildir", "{site}/mdeliver/Maildir"]
max_live = 32

[[allow]]
user = {milter}
policies = ["filter"]
max_live = 32
"""
PLAIN_PORT, MILTER_PORT = 10051, 10052
SITE_LOCK = Path("/run/lock/compartment-test-site.lock")
DOVECOT_CONF = """protocols = lmtp
base_dir = {site}/dovecot-run
state_dir = {site}/dovecot-state
log_path = {site}/dovecot.log
ssl = no
first_valid_uid = {uid}
mail_location = maildir:{site}/dovecot/Maildir
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={site}/dovecot
}}
passdb {{
  driver = static
  args = nopassword=y
}}
service lmtp {{
  unix_listener {socket} {{
    mode = 0666
  }}
}}
"""


def fronts(ctx: Context) -> list[Target]:
    measure.heading("9 fronts: Postfix -> LMTP (compartment lmtp vs Dovecot), milter latency")
    missing = [p for p in ("/usr/sbin/postfix", "/usr/lib/dovecot/lmtp") if not os.path.exists(p)]
    if os.geteuid() != 0 or missing or ctx.core is None:
        why = "not root" if os.geteuid() != 0 else f"missing {', '.join(missing)} (apt-get " \
            "install postfix dovecot-lmtpd)" if missing else "compartment not importable"
        print(f"  SKIP: {why}")
        return [Target("LMTP front (mdeliver) rate / Dovecot LMTP rate", None, 0.5, True),
                Target("LMTP front (maildir-deliver.py) rate / Dovecot LMTP rate", None, 0.5,
                       True),
                Target("milter added latency per message", None, 0.0, False, " ms")]
    batch, rounds = (10, 1) if ctx.sizes.quick else (100, 3)
    with SITE_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        processes: list[subprocess.Popen] = []
        try:
            _prepare(processes)
            before = _cpu_by_role(processes)
            rate, python_rate = _throughput(ctx, batch, rounds)
            _print_cpu(before, _cpu_by_role(processes), batch * rounds)
            added = _milter_latency(ctx, 5 if ctx.sizes.quick else 30)
        finally:
            _teardown(processes)
    return [Target("LMTP front (mdeliver) rate / Dovecot LMTP rate", rate, 0.5, True,
                   note="(through compartment serve)"),
            Target("LMTP front (maildir-deliver.py) rate / Dovecot LMTP rate", python_rate, 0.5,
                   True, note="(a Python agent: its interpreter's start in every delivery)"),
            Target("milter added latency per message", added, 1000.0, False, " ms",
                   note="(no target in issue 13: reported)")]


def _prepare(processes: list[subprocess.Popen]) -> None:
    subprocess.run(["postfix", "stop"], capture_output=True, check=False)
    shutil.rmtree(SITE, ignore_errors=True)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", USER], check=True)
    entry = pwd.getpwnam(USER)
    for name in ("front", "mdeliver", "dovecot"):
        for sub in ("tmp", "new", "cur"):
            (SITE / name / "Maildir" / sub).mkdir(parents=True)
        for path in (SITE / name, *(SITE / name).rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    SITE.chmod(0o755)
    agent = SITE / "maildir-deliver.py"
    shutil.copyfile(ROOT / "examples" / "agents" / "maildir-deliver.py", agent)
    agent.chmod(0o755)
    (SITE / "map").write_text(f"bench@front.bench {SITE / 'front' / 'Maildir'}\n"
                              f"bench@mdeliver.bench {SITE / 'mdeliver' / 'Maildir'}\n")
    (SITE / "dovecot.conf").write_text(DOVECOT_CONF.format(
        site=SITE, uid=entry.pw_uid, gid=entry.pw_gid, socket=DOVECOT_SOCKET))
    _postfix_config()
    subprocess.run(["dovecot", "-c", str(SITE / "dovecot.conf")], check=True)
    command = str(Path(sys.executable).parent / "compartment")
    (SITE / "daemon").mkdir()
    (SITE / "daemon" / "serve.toml").write_text(RULES.format(lmtp=LMTP_UID, milter=MILTER_UID,
                                                             site=SITE))
    _spawn(processes, "daemon", [command, "serve", "--socket", str(DAEMON_SOCKET), "--config",
                                 str(SITE / "daemon" / "serve.toml"), "--log", "stderr"])
    _wait(DAEMON_SOCKET.exists, "compartment serve")
    common = ["--socket", str(DAEMON_SOCKET), "--log", "stderr", "--socket-group", "postfix"]
    gid = grp.getgrnam("postfix").gr_gid
    for kind, uid, path, tail in (
            ("lmtp", LMTP_UID, FRONT_SOCKET, ["--recipients", f"map:{SITE / 'map'}", "--set",
                                              "filesystem.writable={mailbox}", "--",
                                              str(agent), "{mailbox}"]),
            ("mdeliver", LMTP_UID, MDELIVER_SOCKET, ["--recipients", f"map:{SITE / 'map'}",
                                                     "-p", "mdeliver", "--set",
                                                     "filesystem.writable={mailbox}", "--",
                                                     "/usr/bin/mdeliver", "{mailbox}"]),
            ("milter", MILTER_UID, MILTER_SOCKET, ["--", "/bin/cat"])):
        path.parent.mkdir()
        os.chown(path.parent, uid, uid)
        front = "milter" if kind == "milter" else "lmtp"
        _spawn(processes, kind, ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                 f"--groups={gid}", command, front, "--listen", f"unix:{path}",
                                 *common, *tail])
    subprocess.run(["postfix", "start"], check=True, capture_output=True)
    _wait(lambda: FRONT_SOCKET.exists() and MILTER_SOCKET.exists() and MDELIVER_SOCKET.exists()
          and
          DOVECOT_SOCKET.exists() and _smtp_ready(PLAIN_PORT) and _smtp_ready(MILTER_PORT),
          "Postfix, Dovecot and the fronts")


def _spawn(processes: list[subprocess.Popen], name: str, argv: list[str]) -> None:
    with (SITE / f"{name}.log").open("wb") as log:
        processes.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log,
                                          stdout=subprocess.DEVNULL))


def _postfix_config() -> None:
    Path("/etc/postfix/main.cf").write_text("# written by bench/sections_fronts.py\n")
    subprocess.run(["postconf", "-e", "compatibility_level=3.6", "myhostname=mx.bench.test",
                    "mydestination=", "inet_interfaces=loopback-only", "inet_protocols=ipv4",
                    "mynetworks=127.0.0.0/8",
                    "relay_domains=front.bench mdeliver.bench dovecot.bench",
                    "smtpd_relay_restrictions=permit_mynetworks, reject_unauth_destination",
                    f"transport_maps=inline:{{front.bench=lmtp:unix:{FRONT_SOCKET}, "
                    f"mdeliver.bench=lmtp:unix:{MDELIVER_SOCKET}, "
                    f"dovecot.bench=lmtp:unix:{DOVECOT_SOCKET}}}", "alias_maps=",
                    f"maillog_file={SITE / 'postfix.log'}", "milter_default_action=tempfail",
                    "in_flow_delay=0"], check=True)
    subprocess.run(["postconf", "-F", "*/*/chroot=n"], check=True)
    for port, milters in ((PLAIN_PORT, ""), (MILTER_PORT, f"unix:{MILTER_SOCKET}")):
        subprocess.run(["postconf", "-M", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - "
                        f"- smtpd -o smtpd_milters={milters}"], check=True)


def _teardown(processes: list[subprocess.Popen]) -> None:
    subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
    subprocess.run(["postfix", "stop"], capture_output=True, check=False)
    subprocess.run(["dovecot", "-c", str(SITE / "dovecot.conf"), "stop"], capture_output=True,
                   check=False)
    for process in reversed(processes):  # the fronts first, then the daemon
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _throughput(ctx: Context, batch: int, rounds: int) -> tuple[float, float]:
    """(compartment lmtp with mdeliver / Dovecot, with maildir-deliver.py / Dovecot)."""
    targets = {"compartment lmtp, mdeliver": "mdeliver",
               "compartment lmtp, maildir-deliver.py": "front", "dovecot lmtp": "dovecot"}
    rates: dict[str, list[float]] = {name: [] for name in targets}
    for round_no in range(rounds):
        names = list(rates)
        start = round_no % len(names)
        for name in names[start:] + names[:start]:
            rates[name].append(_batch(ctx, targets[name], batch))
    print(f"  {'method':<38} {'msg/s (median)':>15} {'rounds':>7} {'batch':>6}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, median in medians.items():
        print(f"  {name:<38} {median:>15.1f} {len(rates[name]):>7} {batch:>6}"
              f" {median / medians['dovecot lmtp']:>8.2f}x dovecot")
    return (medians["compartment lmtp, mdeliver"] / medians["dovecot lmtp"],
            medians["compartment lmtp, maildir-deliver.py"] / medians["dovecot lmtp"])


def _cpu_by_role(processes: list[subprocess.Popen]) -> dict[str, float]:
    """CPU seconds of each process this section started, with its reaped children (the
    daemon's: the spawner and the compartments' inits are counted once they are waited for)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for process, name in zip(processes, ("daemon", "lmtp", "mdeliver", "milter"), strict=False):
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        found[name] = sum(int(f) for f in fields[11:15]) / ticks
    return found


def _print_cpu(before: dict[str, float], after: dict[str, float], messages: int) -> None:
    print("  CPU ms per message delivered through each front (self and reaped children):")
    for name in ("lmtp", "mdeliver", "daemon"):
        print(f"    {name:<10} {(after[name] - before[name]) * 1000 / messages:8.2f}"
              + ("  (both fronts' runs)" if name == "daemon" else ""))


def _batch(ctx: Context, target: str, count: int) -> float:
    maildir = SITE / target / "Maildir" / "new"
    before = len(os.listdir(maildir))
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", PLAIN_PORT, timeout=120) as smtp:
        for _ in range(count):
            smtp.sendmail("sender@bench.test", [f"bench@{target}.bench"],
                          ctx.expected_message.replace(b"\n", b"\r\n"))
    _wait(lambda: len(os.listdir(maildir)) >= before + count, f"{count} messages in {maildir}",
          timeout_s=300)
    return count / (time.monotonic() - started)


def _milter_latency(ctx: Context, count: int) -> float | None:
    message = ctx.expected_message.replace(b"\n", b"\r\n")
    methods = {}
    for name, port in (("postfix, no milter", PLAIN_PORT), ("postfix + compartment milter",
                                                            MILTER_PORT)):
        def send(port: int = port) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
                smtp.sendmail("sender@bench.test", ["bench@dovecot.bench"], message)
        methods[name] = send
    samples = measure.interleave(methods, count, 2)
    measure.table(samples, "postfix, no milter")
    return samples["postfix + compartment milter"].median - samples["postfix, no milter"].median


def _smtp_ready(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2):
            return True
    except OSError:
        return False


def _wait(probe, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
