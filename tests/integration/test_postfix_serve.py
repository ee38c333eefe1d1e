"""compartment serve under a real Postfix: pipe(8) with user= an unprivileged account runs
`compartment submit`, and the resident supervisor delivers into the Maildirs of two users, each
written by its owner (deliver_as_owner), runs a filter under a pool uid, and when it is down the
message is deferred and delivered once it is back.

The fixture installs Postfix as test_postfix.py does (the two modules hold the site one after
the other), starts a daemon of the test's own, and routes serve.test and serve-pool.test to two
pipe services running submit.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import Daemon

from .debian import install_replacing, require_root_debian
from .mailsite import (
    AGENTS,
    MTA_TIME_LIMIT_S,
    PIPE_USER,
    PYTHON,
    REPORTS,
    SITE,
    check_pipe_user_can_run_compartment,
    compartment_command,
    prepare_site,
    read_maildir,
    remove_site,
    run_checked,
    wait_for,
)
from .mta_cases import site, small_message, smtp_port_free, smtp_ready, submit_sendmail
from .test_postfix import CONFLICTING, MAIN_CF, PRESEED, PostfixDriver

pytestmark = pytest.mark.mta
__all__ = ["site"]

HOME = SITE / "home"  # the users' homes: HOME/alice/Maildir, HOME/bob/Maildir
OWNERS = {"alice": 64031, "bob": 64032}  # numeric owners: no account needed
POOL = (60000, 60999)  # the shipped policies' uid pool
POOL_REPORT = REPORTS / "serve-pool.jsonl"


def _submit_argv(socket_path: str, *options: str) -> list[str]:
    return [compartment_command(), "submit", f"--socket={socket_path}", *options]


def _configure(daemon: Daemon) -> None:
    MAIN_CF.write_text("# written by tests/integration/test_postfix_serve.py\n")
    run_checked(["postconf", "-e", "compatibility_level=3.6", "myhostname=mx.compartment.test",
                 "mydestination=", "inet_interfaces=loopback-only", "inet_protocols=ipv4",
                 "mynetworks=127.0.0.0/8", "relay_domains=serve.test serve-pool.test",
                 "transport_maps=inline:{serve.test=ct-serve:, serve-pool.test=ct-pool:}",
                 "alias_maps=", "alias_database=", "minimal_backoff_time=3600s",
                 "maximal_backoff_time=3600s", "queue_run_delay=3600s",
                 f"maillog_file={SITE / 'postfix.log'}"])
    run_checked(["postconf", "-F", "*/*/chroot=n"])
    # ${user}: the recipient's local part, inside one argument (pipe(8) expands it there).
    deliver = _submit_argv(daemon.socket, "-p", "deliver",
                           f"--set=filesystem.writable={HOME}/${{user}}/Maildir",
                           "--set=limits.wall_timeout_s=30", "--",
                           PYTHON, str(AGENTS / "maildir-deliver.py"), f"{HOME}/${{user}}/Maildir")
    pool = _submit_argv(daemon.socket, "-p", "filter", f"--report={POOL_REPORT}", "--",
                        "/bin/sh", "-c", "cat >/dev/null")
    for service, argv in (("ct-serve", deliver), ("ct-pool", pool)):
        run_checked(["postconf", "-M", f"{service}/unix={service} unix - n n - - pipe "
                     f"flags=R user={PIPE_USER} argv={' '.join(argv)}"])
        run_checked(["postconf", "-e", f"{service}_destination_recipient_limit=1",
                     f"{service}_time_limit={MTA_TIME_LIMIT_S}s"])


def _homes() -> None:
    HOME.mkdir(mode=0o755)
    for user, uid in OWNERS.items():
        maildir = HOME / user / "Maildir"
        for sub in ("", "tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (HOME / user, *maildir.rglob("*"), maildir):
            os.chown(path, uid, uid)
        (HOME / user).chmod(0o711)


@pytest.fixture(scope="module")
def served(site: None) -> Iterator[tuple[PostfixDriver, Daemon]]:
    require_root_debian()
    install_replacing(["postfix"], CONFLICTING, PRESEED)
    if subprocess.run(["postfix", "status"], capture_output=True, check=False).returncode == 0:
        run_checked(["postfix", "stop"])
    wait_for(smtp_port_free, "port 25 to be free for Postfix", timeout_s=30)
    prepare_site()
    check_pipe_user_can_run_compartment()
    _homes()
    daemon = Daemon(config=f"""
[[allow]]
user = "{PIPE_USER}"
policies = ["deliver", "filter"]
set = ["filesystem.writable", "limits.wall_timeout_s"]
deliver_as_owner = ["{HOME}/*/Maildir"]
""").start()
    _configure(daemon)
    run_checked(["postfix", "check"])
    run_checked(["postfix", "start"])
    try:
        wait_for(smtp_ready, "Postfix to answer on 127.0.0.1:25", timeout_s=30)
        yield PostfixDriver(), daemon
    finally:
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
        subprocess.run(["postfix", "stop"], capture_output=True, check=False)
        if daemon.process and daemon.process.poll() is None:
            daemon.stop()
        wait_for(smtp_port_free, "Postfix to close port 25", timeout_s=30)
        remove_site()


def test_each_maildir_is_written_by_its_owner(served: tuple[PostfixDriver, Daemon]) -> None:
    """One pipe user, two users' Maildirs: each message lands in its recipient's, in a file
    the recipient owns, as local(8) would deliver it."""
    mta, daemon = served
    for user, uid in OWNERS.items():
        message = small_message("serve", "serve.test")
        message = type(message)(message.marker, f"{user}@serve.test", message.data,
                                message.eight_bit)
        submit_sendmail(mta, message)
        maildir = HOME / user / "Maildir"
        wait_for(lambda m=maildir, k=message.marker: read_maildir(m).get(k),
                 f"the message in {maildir}")
        files = list((maildir / "new").iterdir())
        assert files and all(path.stat().st_uid == uid for path in files)
        assert not mta.queued(message.recipient)
    assert f"peer=uid:{_pipe_uid()}" in daemon.log()


def test_a_filter_runs_under_a_pool_uid(served: tuple[PostfixDriver, Daemon]) -> None:
    mta, _daemon = served
    message = small_message("pool", "serve-pool.test")
    submit_sendmail(mta, message)
    records = wait_for(lambda: _records(POOL_REPORT), "the pool delivery's report line")
    assert records[-1]["outcome"] == "ok"
    assert POOL[0] <= records[-1]["uid"] <= POOL[1]  # not the pipe user's own uid
    wait_for(lambda: not mta.queued(message.recipient), "the message to leave the queue")


def test_the_daemon_down_defers_and_its_return_delivers(
        served: tuple[PostfixDriver, Daemon]) -> None:
    """Never lose mail: with the daemon stopped, Postfix defers (submit exits 75 with its
    reason); once it is back, a queue flush delivers."""
    mta, daemon = served
    daemon.stop()
    message = small_message("down", "serve.test")
    message = type(message)(message.marker, "alice@serve.test", message.data,
                            message.eight_bit)
    submit_sendmail(mta, message)
    reason = wait_for(lambda: mta.deferred_reason(message.recipient),
                      "the message deferred while the daemon is down")
    assert "cannot reach the daemon" in reason, reason
    daemon.start()
    run_checked(["postqueue", "-f"])
    maildir = HOME / "alice" / "Maildir"
    wait_for(lambda: read_maildir(maildir).get(message.marker), "the message, delivered late")


def _pipe_uid() -> int:
    import pwd

    return pwd.getpwnam(PIPE_USER).pw_uid


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
