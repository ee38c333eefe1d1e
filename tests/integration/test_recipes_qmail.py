"""examples/qmail/README.md run as printed, then the .qmail it installed run as qmail-local
runs it (qmail is not packaged in Debian 12: see test_qmail_convention.py for the emulation).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .corpus import corpus, split_trace_headers
from .mailsite import exclusive_site
from .recipes import (
    EXAMPLES,
    delivered_to,
    installed_under_usr_local,
    make_user,
    restored,
    run_recipe,
    temporary_users,
)

README = EXAMPLES / "qmail" / "README.md"


@pytest.fixture(scope="module")
def alice() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("the recipe makes accounts and installs compartment: run as root")
    with exclusive_site(), restored(Path("/etc/skel/Maildir")), installed_under_usr_local(), \
            temporary_users("alice"):
        make_user("alice")
        run_recipe(README, "~/.qmail into ~/Maildir")
        yield pwd.getpwnam("alice")


def qmail_local(user: pwd.struct_passwd, message: bytes) -> list[int]:
    """Each `|` line of the user's .qmail run as qmail-local does: /bin/sh -c, as the user, in
    the home directory, the message file as stdin, the envelope in the environment."""
    home = Path(user.pw_dir)
    lines = [line[1:] for line in (home / ".qmail").read_text().splitlines()
             if line.startswith("|")]
    assert lines, "the recipe's .qmail has no program line"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "USER": user.pw_name,
           "SENDER": "bob@example.org", "RECIPIENT": f"{user.pw_name}@example.test",
           "LOCAL": user.pw_name, "HOST": "example.test", "EXT": "", "DEFAULT": "",
           "DTLINE": f"Delivered-To: {user.pw_name}@example.test\n",
           "RPLINE": "Return-Path: <bob@example.org>\n"}
    statuses = []
    with tempfile.TemporaryFile() as queue_file:
        os.fchmod(queue_file.fileno(), 0o644)  # as qmail-queue leaves its message files
        queue_file.write(message)
        for line in lines:
            queue_file.seek(0)
            done = subprocess.run(["/bin/sh", "-c", line], stdin=queue_file, cwd=home, env=env,
                                  user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                                  capture_output=True, timeout=120, check=False)
            statuses.append(done.returncode)
    return statuses


def test_dot_qmail_delivers_into_the_maildir(alice: pwd.struct_passwd) -> None:
    message = corpus("qmail-recipe", "bob@example.org", "example.test")[3]
    assert qmail_local(alice, message.data) == [0]
    split_trace_headers(delivered_to("alice", message.marker), message.data)


def test_a_missing_maildir_is_made_by_its_owner(alice: pwd.struct_passwd) -> None:
    """The deliver policy makes a missing Maildir as alice (create_maildir), as local(8) does."""
    maildir = Path(alice.pw_dir, "Maildir")
    aside = maildir.with_name("Maildir.aside")
    maildir.rename(aside)
    try:
        message = corpus("qmail-made", "bob@example.org", "example.test")[0]
        assert qmail_local(alice, message.data) == [0]
        assert (maildir / "tmp").stat().st_uid == alice.pw_uid
        split_trace_headers(delivered_to("alice", message.marker), message.data)
    finally:
        shutil.rmtree(maildir, ignore_errors=True)
        aside.rename(maildir)


def test_a_maildir_made_by_root_is_deferred_not_bounced(alice: pwd.struct_passwd) -> None:
    """`mkdir ~alice/Maildir` as root: alice's agent cannot write there; qmail-local reads
    111 and keeps the message."""
    maildir = Path(alice.pw_dir, "Maildir")
    aside = maildir.with_name("Maildir.aside")
    maildir.rename(aside)
    try:
        for sub in ("", "cur", "new", "tmp"):
            (maildir / sub).mkdir(mode=0o755)
        assert qmail_local(alice, b"Subject: x\n\nbody\n") == [111]
    finally:
        shutil.rmtree(maildir, ignore_errors=True)
        aside.rename(maildir)
