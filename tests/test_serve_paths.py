"""The paths a peer names through the resident supervisor: opened with its own credentials,
following no link but root's and its own, a writable directory its own, and beyond that only
what its rule grants (deliver_as_owner), each mailbox then written by its owner."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest
from serving import PYTHON, Daemon, open_directory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compartment serve runs as root (as "
                                "CI does)")
PEER = 64020  # delivers into its own directories
MAILER = 64021  # a mail account granted the users' Maildirs, as local(8) is
ALICE, BOB, MALLORY = 64022, 64023, 64024
WRITE = [PYTHON, "-I", "-c", "import os, sys; d = sys.argv[1]; "
         "open(os.path.join(d, 'delivered'), 'wb').write(sys.stdin.buffer.read())"]


def owned(path: Path, uid: int, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def site():
    root = open_directory()
    home = owned(root / "home", 0, 0o755)
    for user, uid in (("alice", ALICE), ("bob", BOB)):
        owned(owned(home / user, uid, 0o711) / "Maildir", uid)
    daemon = Daemon(config=f"""
[[allow]]
user = {PEER}
policies = ["deliver", "filter"]
set = ["filesystem.writable", "filesystem.readable"]

[[allow]]
user = {MAILER}
policies = ["deliver", "filter"]
set = ["filesystem.writable"]
deliver_as_owner = ["{home}/*/Maildir"]
""").start()
    yield root, daemon
    daemon.stop()


def deliver(daemon: Daemon, user: int, maildir: Path, message: bytes = b"a message\n"):
    return daemon.submit([*WRITE, str(maildir)], ["-p", "deliver", "--set",
                                                  f"filesystem.writable={maildir}"],
                         message, user=user)


def test_the_peer_delivers_into_its_own_directory_as_itself(site):
    root, daemon = site
    mine = owned(root / "peer" / "Maildir", PEER)
    done = deliver(daemon, PEER, mine)
    assert done.status == 0, done.stderr
    assert (mine / "delivered").read_bytes() == b"a message\n"
    assert (mine / "delivered").stat().st_uid == PEER  # deliver runs as the owner


@pytest.mark.parametrize(("setup", "why"), [
    (lambda root: owned(root / "alice-only" / "Maildir", ALICE), b"may not"),
    (lambda root: owned(root / "open-to-all", ALICE, 0o777), b"not a directory of"),
    (lambda root: root / "no-such-dir", b"No such file"),
])
def test_a_writable_path_the_peer_cannot_use_is_refused(site, setup, why):
    root, daemon = site
    target = setup(root)
    done = deliver(daemon, PEER, target)
    assert done.status == 75 and b"refused" in done.stderr and why in done.stderr, done.stderr
    assert not (Path(target) / "delivered").exists()


def test_links_are_followed_only_when_root_or_the_peer_made_them(site):
    root, daemon = site
    victim = owned(root / "victim" / "Maildir", ALICE, 0o777)  # even one the peer may write
    theirs = owned(root / "mallory", MALLORY, 0o755) / "Maildir"
    theirs.symlink_to(victim)
    os.lchown(theirs, MALLORY, MALLORY)
    done = deliver(daemon, PEER, theirs)
    assert done.status == 75 and b"64024" in done.stderr, done.stderr  # the link's owner named
    mine = owned(root / "peer-links", PEER, 0o755) / "Maildir"
    mine.symlink_to(victim)
    os.lchown(mine, PEER, PEER)
    done = deliver(daemon, PEER, mine)  # followed: its own link; but not its own directory
    assert done.status == 75 and b"not a directory of" in done.stderr, done.stderr
    assert not (victim / "delivered").exists()


def test_a_readable_path_and_a_program_the_peer_cannot_use_are_refused(site):
    root, daemon = site
    secret = owned(root / "secret", ALICE)
    (secret / "data").write_text("alice's\n")
    done = daemon.submit(["/bin/cat", str(secret / "data")],
                         ["--set", f"filesystem.readable={secret}"], user=PEER)
    assert done.status == 75 and b"may not read" in done.stderr, done.stderr
    tool = owned(root / "tools", 0, 0o755) / "root-only"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o700)
    done = daemon.submit([str(tool)], user=PEER)
    assert done.status == 75 and b"may not execute" in done.stderr, done.stderr


def test_a_granted_mail_account_delivers_into_each_maildir_as_its_owner(site):
    root, daemon = site
    for user, uid in (("alice", ALICE), ("bob", BOB)):
        maildir = root / "home" / user / "Maildir"
        done = deliver(daemon, MAILER, maildir, f"for {user}\n".encode())
        assert done.status == 0, done.stderr
        assert (maildir / "delivered").read_bytes() == f"for {user}\n".encode()
        assert (maildir / "delivered").stat().st_uid == uid
    outside = owned(root / "elsewhere" / "Maildir", ALICE)  # no pattern grants it
    done = deliver(daemon, MAILER, outside)
    assert done.status == 75 and b"refused" in done.stderr, done.stderr
    assert not (outside / "delivered").exists()
    done = daemon.submit(["/bin/true"], ["-p", "filter", "--set",
                                         f"filesystem.writable={root}/home/alice/Maildir"],
                         user=MAILER)
    assert done.status == 75 and b"which policy filter does not do" in done.stderr


def test_a_link_swapped_while_requests_come_in_never_reaches_the_victim(site):
    """The peer's Maildir flips between its own directory and a link to a victim's: whatever
    a request finds is what is mounted — its own directory, or a refusal — never the victim's."""
    root, daemon = site
    victim = owned(root / "swap-victim", ALICE, 0o777)
    base = owned(root / "swap", PEER, 0o755)
    real = owned(base / "real", PEER)
    maildir = base / "Maildir"
    stop = threading.Event()

    def flip() -> None:
        targets = itertools.cycle((real, victim))
        while not stop.is_set():
            step = base / "next"
            step.unlink(missing_ok=True)
            step.symlink_to(next(targets))
            os.lchown(step, PEER, PEER)
            os.replace(step, maildir)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        results = [deliver(daemon, PEER, maildir).status for _ in range(20)]
    finally:
        stop.set()
        flipper.join()
    assert set(results) <= {0, 75}
    assert not (victim / "delivered").exists()
