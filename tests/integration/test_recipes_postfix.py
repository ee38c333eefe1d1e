"""examples/postfix/README.md run as printed, on a real Postfix, then mail sent through it.

The fixture installs Postfix, gives it a loopback-only base configuration of its own (the part
of main.cf a site already has), installs compartment under /usr/local (`make install`), makes
the account alice the recipes name, and runs the "mailbox_command into ~/Maildir" and
"SpamAssassin as an after-queue content filter" recipes from the README's own text.  bob is
made afterwards, as a new account that gets its Maildir from /etc/skel.  Everything is taken
down again: Postfix stopped with an empty queue, its configuration and /etc/aliases restored,
the accounts, the filter user and its directory removed, compartment uninstalled.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .debian import install_replacing, require_root_debian
from .mailsite import SENDER, run_checked, wait_for
from .mta_cases import site, smtp_port_free, smtp_ready
from .recipes import (
    EXAMPLES,
    delivered_to,
    installed_under_usr_local,
    make_user,
    new_message,
    restored,
    run_recipe,
    sendmail,
    temporary_users,
)
from .test_postfix import CONFLICTING, PRESEED

pytestmark = pytest.mark.mta
__all__ = ["site"]

README = EXAMPLES / "postfix" / "README.md"
DOMAIN = "local.test"
FILTER_HOME = Path("/var/spool/compartment-filter")
REPORT = FILTER_HOME / "report.jsonl"
LOG_FILE = Path("/var/log/compartment-recipes-postfix.log")
# SpamAssassin's test string, which its rules score as spam whatever else the message holds.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
BASE = [  # what a site's main.cf already says, before the recipes
    "compatibility_level=3.6",
    "myhostname=mx.compartment.test",
    f"mydestination=$myhostname, localhost, {DOMAIN}",
    "inet_interfaces=loopback-only",
    "inet_protocols=ipv4",
    "mynetworks=127.0.0.0/8",
    "mailbox_size_limit=0",
    "minimal_backoff_time=3600s",
    "maximal_backoff_time=3600s",
    "queue_run_delay=3600s",
    f"maillog_file={LOG_FILE}",
]
CHANGED = [Path("/etc/postfix/main.cf"), Path("/etc/postfix/master.cf"),
           Path("/etc/aliases"), Path("/etc/aliases.db"), Path("/etc/skel/Maildir")]


def _remove_filter_account() -> None:
    subprocess.run(["userdel", "filter"], capture_output=True, check=False)
    subprocess.run(["groupdel", "filter"], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", str(FILTER_HOME)], check=True)


def _start_postfix() -> None:
    if subprocess.run(["postfix", "status"], capture_output=True, check=False).returncode == 0:
        run_checked(["postfix", "stop"])
    wait_for(smtp_port_free, "port 25 to be free for Postfix", timeout_s=30)
    Path("/etc/postfix/main.cf").write_text("# the site's own main.cf, before the recipes\n")
    run_checked(["postconf", "-e", *BASE])
    # Debian's master.cf chroots services, which needs a copy of /etc that only its init script
    # makes; the tests start Postfix directly.
    run_checked(["postconf", "-F", "*/*/chroot=n"])
    run_checked(["postfix", "start"])
    wait_for(smtp_ready, "Postfix on 127.0.0.1:25", timeout_s=30)


@pytest.fixture(scope="module")
def postfix(site: None) -> Iterator[None]:
    require_root_debian()
    install_replacing(["postfix", "spamassassin"], CONFLICTING, PRESEED)
    if FILTER_HOME.exists():  # left by a run that was killed
        _remove_filter_account()
    with restored(*CHANGED), installed_under_usr_local(), temporary_users("alice", "bob"):
        make_user("alice")
        try:
            _start_postfix()
            run_recipe(README, "mailbox_command into ~/Maildir")
            run_recipe(README, "SpamAssassin as an after-queue content filter")
            make_user("bob")  # after the recipe: a new account, its Maildir from /etc/skel
            yield
        finally:
            subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
            subprocess.run(["postfix", "stop"], capture_output=True, check=False)
            wait_for(smtp_port_free, "Postfix to close port 25", timeout_s=30)
            _remove_filter_account()


def test_each_account_gets_its_mail_in_its_maildir(postfix: None) -> None:
    """alice (Maildir made as herself) and bob (Maildir from /etc/skel) through
    mailbox_command: local(8) runs compartment as each of them."""
    for user in ("alice", "bob"):
        marker, data = new_message(f"mailbox-{user}", f"{user}@{DOMAIN}")
        sendmail(f"{user}@{DOMAIN}", data)
        wait_for(lambda user=user, marker=marker: delivered_to(user, marker),
                 f"the message in ~{user}/Maildir/new")


@pytest.mark.parametrize("address", ["root", "postmaster"])
def test_roots_mail_reaches_the_admin(postfix: None, address: str) -> None:
    """Without the alias, local(8) would run the command as nobody for root and defer."""
    marker, data = new_message(f"alias-{address}", f"{address}@{DOMAIN}")
    sendmail(f"{address}@{DOMAIN}", data)
    wait_for(lambda: delivered_to("alice", marker), f"{address}'s message in ~alice/Maildir")


def test_smtp_mail_is_scanned_by_spamassassin(postfix: None) -> None:
    """Mail received by SMTP goes through the confined SpamAssassin, is re-injected, and lands
    in the Maildir marked; the report has one ok line per message, and SpamAssassin's output
    adds nothing to Postfix's status lines."""
    ham_marker, ham = new_message("ham", f"alice@{DOMAIN}")
    spam_marker, spam = new_message("spam", f"alice@{DOMAIN}", GTUBE)
    with smtplib.SMTP("127.0.0.1", 25, timeout=60) as smtp:
        for data in (ham, spam):
            smtp.sendmail(SENDER, [f"alice@{DOMAIN}"], data.replace(b"\n", b"\r\n"))
    scanned_ham = wait_for(lambda: delivered_to("alice", ham_marker), "the ham in the Maildir")
    scanned_spam = wait_for(lambda: delivered_to("alice", spam_marker), "the spam in the Maildir")
    assert b"\nX-Spam-Checker-Version: " in scanned_ham
    assert b"\nX-Spam-Flag: YES" not in scanned_ham
    assert b"\nX-Spam-Flag: YES" in scanned_spam
    records = [json.loads(line) for line in REPORT.read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["ok", "ok"], records
    assert all(r["program"] == "/usr/bin/spamassassin" for r in records)
    assert "created user preferences" not in LOG_FILE.read_text(errors="replace")
