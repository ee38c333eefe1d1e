"""The fronts under a real Postfix: its lmtp(8) client delivering through `compartment lmtp` into
the Maildirs of two users, and smtpd_milters through `compartment milter`, swaks as the SMTP
client.  Each outcome is checked where Postfix records it: its queue and its log.

The fronts run as deployed: the installed command under uids of their own, each a client of a
real resident supervisor (`compartment serve`, as root, with rules for the two fronts alone).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .debian import install_replacing, require_root_debian
from .mailsite import (
    MTA_TIME_LIMIT_S,
    PIPE_USER,
    SENDER,
    SITE,
    bounces_for,
    prepare_site,
    remove_site,
    run_checked,
    sink_argv,
    wait_for,
)
from .mta_cases import site, smtp_port_free, smtp_ready
from .test_postfix import CONFLICTING, PRESEED, _running

sys.path.insert(0, str(Path(__file__).parents[1]))
from serving import Daemon  # noqa: E402

pytestmark = pytest.mark.mta
__all__ = ["site"]

COMMAND = str(Path(sys.executable).parent / "compartment")  # the installed bin/compartment
LMTP_UID, MILTER_UID = 64040, 64041  # the fronts' users (no passwd entry needed)
LMTP_SOCKET = SITE / "lmtp" / "lmtp.sock"
MILTER_SOCKET = SITE / "milter" / "milter.sock"
DOWN_MILTER_SOCKET = SITE / "milter" / "down.sock"
MILTER_PORT, DOWN_MILTER_PORT = 10031, 10032
USERS = ("ct-alice", "ct-bob")
LOG_FILE = SITE / "postfix.log"
PYTHON = "/usr/bin/python3"
# The delivery agent: behaviour by the address extension (alice+temp@, bob+perm@...).
AGENT = r"""
import os, sys, time
mailbox, extension = sys.argv[1], os.environ.get("EXTENSION", "")
data = sys.stdin.buffer.read()
if extension == "temp":
    print("4.2.1 mailbox busy", file=sys.stderr)
    sys.exit(75)
if extension == "perm":
    print("5.1.1 this mailbox is closed", file=sys.stderr)
    sys.exit(67)
if extension == "slow":
    time.sleep(60)
name = f"{time.time_ns()}.{os.getpid()}.lmtp"
with open(f"{mailbox}/tmp/{name}", "wb") as out:
    out.write(f"X-Envelope: {os.environ['SENDER']} {os.environ['RECIPIENT']}\n".encode() + data)
    out.flush()
    os.fsync(out.fileno())
os.rename(f"{mailbox}/tmp/{name}", f"{mailbox}/new/{name}")
"""
# The milter's filter: by Subject, reject (its own 5.x.x), take too long, or add a header.
FILTER = r"""
import sys, time
data = sys.stdin.buffer.read()
head = data.split(b"\n\n", 1)[0]
if b"\nSubject: reject" in b"\n" + head:
    print("5.7.1 refused by the test filter", file=sys.stderr)
    sys.exit(77)
if b"\nSubject: slow" in b"\n" + head:
    time.sleep(60)
lines = data.split(b"\n")
lines.insert(2, b"X-Compartment-Second: after two")  # between the milter's 2nd and 3rd
sys.stdout.buffer.write(b"X-Compartment-Milter: checked\n" + b"\n".join(lines))
"""


def _users() -> dict[str, Path]:
    """Two ordinary users (uid >= 1000) with an empty Maildir each."""
    maildirs = {}
    for user in USERS:
        home = SITE / "home" / user
        try:
            pwd.getpwnam(user)
        except KeyError:
            run_checked(["useradd", "--user-group", "--no-create-home", "--home-dir", str(home),
                         "--shell", "/usr/sbin/nologin", user])
        entry = pwd.getpwnam(user)
        assert entry.pw_uid >= 1000 and entry.pw_dir == str(home), entry
        for sub in ("tmp", "new", "cur"):
            (home / "Maildir" / sub).mkdir(parents=True)
        for path in (home, *home.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        home.chmod(0o700)
        maildirs[user] = home / "Maildir"
    return maildirs


def _configure() -> None:
    Path("/etc/postfix/main.cf").write_text("# written by test_fronts_postfix.py\n")
    settings = [
        "compatibility_level=3.6", "myhostname=mx.compartment.test", "mydestination=",
        "inet_interfaces=loopback-only", "inet_protocols=ipv4", "mynetworks=127.0.0.0/8",
        "relay_domains=lmtp.test sink.test", "alias_maps=", "alias_database=",
        f"transport_maps=inline:{{lmtp.test=lmtp:unix:{LMTP_SOCKET}, sink.test=ct-sink:}}",
        "smtpd_relay_restrictions=permit_mynetworks, reject_unauth_destination",
        "recipient_delimiter=+",
        "minimal_backoff_time=3600s", "maximal_backoff_time=3600s", "queue_run_delay=3600s",
        f"maillog_file={LOG_FILE}", "ct-sink_destination_recipient_limit=1",
        f"ct-sink_time_limit={MTA_TIME_LIMIT_S}s", "milter_default_action=tempfail",
    ]
    run_checked(["postconf", "-e", *settings])
    run_checked(["postconf", "-F", "*/*/chroot=n"])
    run_checked(["postconf", "-M", "ct-sink/unix=ct-sink unix - n n - - pipe flags=R "
                 f"user={PIPE_USER} argv={' '.join(sink_argv())}"])
    for port, path in ((MILTER_PORT, MILTER_SOCKET), (DOWN_MILTER_PORT, DOWN_MILTER_SOCKET)):
        run_checked(["postconf", "-M", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - "
                     f"smtpd -o smtpd_milters=unix:{path}"])


def _rules() -> str:
    return f"""
[[allow]]
user = {LMTP_UID}
policies = ["deliver"]
set = ["filesystem.writable", "limits.wall_timeout_s"]
deliver_as_owner = ["{SITE}/home/*/Maildir"]

[[allow]]
user = {MILTER_UID}
policies = ["filter"]
set = ["limits.wall_timeout_s"]
"""


class Front:
    """A front as its own uid, in the MTA's group so that its socket is the MTA's to reach."""

    def __init__(self, kind: str, uid: int, path: Path, options: list[str],
                 program: list[str], group: str = "postfix") -> None:
        self.log = SITE / f"{path.name}.log"
        path.parent.mkdir(exist_ok=True)
        os.chown(path.parent, uid, uid)
        gid = grp.getgrnam(group).gr_gid
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={gid}",
                COMMAND, kind, "--listen", f"unix:{path}", "--log", "stderr",
                "--socket-group", group, *options, "--", *program]
        with self.log.open("wb") as stderr:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr,
                                            stdout=subprocess.DEVNULL)
        wait_for(lambda: b"listening on" in self.log.read_bytes()
                 or self.process.poll() is not None, f"{kind} listening")
        assert self.process.poll() is None, self.log.read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def postfix(site: None) -> Iterator[dict[str, Path]]:
    require_root_debian()
    install_replacing(["postfix", "swaks"], CONFLICTING, PRESEED)
    if _running():
        run_checked(["postfix", "stop"])
    wait_for(smtp_port_free, "port 25 to be free for Postfix", timeout_s=30)
    prepare_site()
    maildirs = _users()
    _configure()
    run_checked(["postfix", "check"])
    daemon = Daemon(config=_rules()).start()
    common = ["--socket", daemon.socket, "--set", "limits.wall_timeout_s=5"]
    fronts = [
        Front("lmtp", LMTP_UID, LMTP_SOCKET, [*common, "--recipient-delimiter", "+", "--set",
                                              "filesystem.writable={mailbox}"],
              [PYTHON, "-c", AGENT, "{mailbox}"]),
        Front("milter", MILTER_UID, MILTER_SOCKET, [*common, "--rewrite"],
              [PYTHON, "-c", FILTER]),
        Front("milter", MILTER_UID, DOWN_MILTER_SOCKET,
              ["--socket", str(SITE / "no-supervisor")], [PYTHON, "-c", FILTER]),
    ]
    run_checked(["postfix", "start"])
    try:
        wait_for(smtp_ready, "Postfix to answer on 127.0.0.1:25", timeout_s=30)
        wait_for(lambda: smtp_ready(MILTER_PORT), "the milter smtpd", timeout_s=30)
        yield maildirs
    finally:
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
        subprocess.run(["postfix", "stop"], capture_output=True, check=False)
        for front in fronts:
            front.stop()
        daemon.stop()
        wait_for(smtp_port_free, "Postfix to close port 25", timeout_s=30)
        remove_site()
        for user in USERS:
            subprocess.run(["userdel", user], capture_output=True, check=False)
        shutil.rmtree(SITE / "home", ignore_errors=True)


def swaks(recipients: list[str], subject: str, port: int = 25) -> subprocess.CompletedProcess:
    marker = uuid.uuid4().hex[:12]
    return subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", SENDER,
                           "--to", ",".join(recipients), "--header", f"Subject: {subject}",
                           "--header", f"X-Marker: {marker}", "--body", f"marker {marker}\n"],
                          capture_output=True, text=True, timeout=120, check=False)


def log_lines(pattern: str) -> list[str]:
    text = LOG_FILE.read_text(errors="replace") if LOG_FILE.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]


def queue_reason(recipient: str) -> str | None:
    result = run_checked(["postqueue", "-j"])
    import json

    for line in result.stdout.splitlines():
        entry = json.loads(line)
        for rcpt in entry["recipients"]:
            if rcpt["address"] == recipient and entry["queue_name"] == "deferred":
                return rcpt.get("delay_reason")
    return None


def delivered(maildir: Path, marker: str) -> list[bytes]:
    return [p.read_bytes() for p in (maildir / "new").iterdir()
            if f"marker {marker}".encode() in p.read_bytes()]


def _marker(result: subprocess.CompletedProcess) -> str:
    found = re.search(r"X-Marker: ([0-9a-f]{12})", result.stdout)
    assert found, result.stdout
    return found.group(1)


def test_lmtp_mixed_outcomes_per_recipient(postfix: dict[str, Path]) -> None:
    """One message to five recipients of two users: delivered, agent temporary failure, agent
    permanent verdict, timeout, delivered.  Postfix sends, defers, bounces as each reply says."""
    alice, bob = (f"{u}@lmtp.test" for u in USERS)
    temp, perm, slow = "ct-alice+temp@lmtp.test", "ct-bob+perm@lmtp.test", \
        "ct-bob+slow@lmtp.test"
    sent = swaks([alice, temp, perm, slow, bob], "lmtp mixed")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    marker = _marker(sent)
    for user in USERS:
        (message,) = wait_for(lambda u=user: delivered(postfix[u], marker), f"{user}'s copy")
        assert message.startswith(f"X-Envelope: {SENDER} {user}@lmtp.test\n".encode())
    wait_for(lambda: log_lines(rf"to=<{re.escape(slow)}>.*status=deferred"), "the timeout")
    (sent_alice,) = log_lines(rf"to=<{re.escape(alice)}>.*relay=.*status=sent \(250 2\.0\.0")
    assert "delivered in a compartment" in sent_alice
    assert re.search(r"status=deferred \(.*said: 451 4\.2\.1 mailbox busy",
                     log_lines(rf"to=<{re.escape(temp)}>")[-1])
    assert re.search(r"status=bounced \(.*said: 550 5\.1\.1 this mailbox is closed",
                     log_lines(rf"to=<{re.escape(perm)}>")[-1])
    assert re.search(r"status=deferred \(.*said: 451 4\.4\.7 compartment: timed out",
                     log_lines(rf"to=<{re.escape(slow)}>")[-1])
    assert "4.2.1 mailbox busy" in (queue_reason(temp) or "")
    assert "4.4.7 compartment: timed out" in (queue_reason(slow) or "")
    assert queue_reason(alice) is None and queue_reason(perm) is None
    wait_for(lambda: bounces_for(perm), "the bounce for the permanent verdict")


def test_milter_adds_a_header_and_the_message_is_delivered(postfix: dict[str, Path]) -> None:
    sent = swaks([f"{USERS[0]}@lmtp.test"], "milter accept", MILTER_PORT)
    assert sent.returncode == 0 and "<-  250 2.0.0 Ok: queued" in sent.stdout, sent.stdout
    (message,) = wait_for(lambda: delivered(postfix[USERS[0]], _marker(sent)),
                          "the filtered message")
    names = [line.split(b":")[0] for line in message.split(b"\n\n", 1)[0].split(b"\n")
             if line[:1] not in (b" ", b"\t")]
    # Postfix's own Received header, which milters are not shown, stays on top; the filter's
    # headers land where the filter put them among those it saw.
    assert names[:7] == [b"X-Envelope", b"Received", b"X-Compartment-Milter", b"Date", b"To",
                         b"X-Compartment-Second", b"From"], names


def test_milter_rejects_with_the_filters_code(postfix: dict[str, Path]) -> None:
    sent = swaks([f"{USERS[0]}@lmtp.test"], "reject", MILTER_PORT)
    assert "<** 550 5.7.1 refused by the test filter" in sent.stdout, sent.stdout
    assert log_lines(r"milter-reject: END-OF-MESSAGE .*: 5\.7\.1 refused by the test filter")


def test_milter_tempfails_when_the_filter_times_out(postfix: dict[str, Path]) -> None:
    sent = swaks([f"{USERS[0]}@lmtp.test"], "slow", MILTER_PORT)
    assert "<** 451 4.4.7 compartment: timed out" in sent.stdout, sent.stdout
    assert log_lines(r"milter-reject: END-OF-MESSAGE .*: 4\.4\.7 compartment: timed out")


def test_milter_tempfails_when_the_supervisor_is_down(postfix: dict[str, Path]) -> None:
    sent = swaks([f"{USERS[0]}@lmtp.test"], "down", DOWN_MILTER_PORT)
    assert "<** 451 4.3.0 compartment: cannot reach the daemon" in sent.stdout, sent.stdout
    time.sleep(0.1)
    assert log_lines(r"milter-reject: END-OF-MESSAGE .*: 4\.3\.0 compartment: cannot reach")
