"""compartment.maildir: a missing Maildir is made by its owner, from the parent's descriptor."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from compartment.maildir import MaildirError, create

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes directories for other users")


def _parent(tmp_path, uid=NOBODY, mode=0o755):
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, uid, uid)
    home.chmod(mode)
    return home


def _create(home, name="Maildir"):
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        create(fd, name, str(home / name))
    finally:
        os.close(fd)


def test_made_by_the_owner_with_cur_new_tmp(tmp_path):
    home = _parent(tmp_path)
    _create(home)
    for path in (home / "Maildir", *(home / "Maildir" / s for s in ("cur", "new", "tmp"))):
        info = path.lstat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (NOBODY, NOBODY, 0o700)


def test_completes_a_partial_maildir_and_leaves_the_rest(tmp_path):
    home = _parent(tmp_path)
    (home / "Maildir" / "new").mkdir(parents=True)
    (home / "Maildir" / "new" / "kept").write_text("a message")
    for path in (home / "Maildir", home / "Maildir" / "new"):
        os.chown(path, NOBODY, NOBODY)
    _create(home)
    assert sorted(os.listdir(home / "Maildir")) == ["cur", "new", "tmp"]
    assert (home / "Maildir" / "new" / "kept").read_text() == "a message"


def test_a_parent_owned_by_root_is_refused(tmp_path):
    home = _parent(tmp_path, uid=0)
    with pytest.raises(MaildirError, match="owned by root"):
        _create(home)
    assert not (home / "Maildir").exists()


def test_what_the_owner_cannot_do_is_permission_denied(tmp_path):
    """The owner's ids, not root's: a parent its owner cannot write stays as it is."""
    home = _parent(tmp_path, mode=0o555)
    with pytest.raises(MaildirError, match=r"Maildir: permission denied: its owner cannot "
                       "write"):
        _create(home)
    assert not (home / "Maildir").exists()


def test_a_maildir_made_by_root_is_named_as_the_reason(tmp_path):
    """`mkdir ~alice/Maildir` as root leaves a Maildir alice cannot complete or deliver to."""
    home = _parent(tmp_path)
    (home / "Maildir").mkdir()
    with pytest.raises(MaildirError, match=r"Maildir/cur: permission denied: .*/Maildir is "
                       "owned by root"):
        _create(home)


def test_a_symlink_is_not_followed(tmp_path):
    home = _parent(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "Maildir").symlink_to(elsewhere)
    with pytest.raises(MaildirError, match="symlink"):
        _create(home)
    assert os.listdir(elsewhere) == []


def test_unprivileged_caller_makes_its_own():
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:  # pytest's is root's alone
        os.chmod(scratch, 0o755)
        home = _parent(Path(scratch))
        code = (f"import os; from compartment.maildir import create; "
                f"fd = os.open({str(home)!r}, os.O_RDONLY | os.O_DIRECTORY); "
                f"create(fd, 'Maildir', 'Maildir')")
        done = subprocess.run([sys.executable, "-c", code], user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert (home / "Maildir" / "tmp").stat().st_uid == NOBODY


# --- the deliver policy (filesystem.create_maildir) through compartment.run ----------------

DELIVER = 'cat > "$0/tmp/m" && mv "$0/tmp/m" "$0/new/m"'


def test_deliver_makes_a_missing_maildir_and_delivers_into_it(tmp_path):
    from agentrun import run_agent

    home = _parent(tmp_path)
    maildir = home / "Maildir"
    ran = run_agent(["/bin/sh", "-c", DELIVER, str(maildir)], "deliver", b"a message\n",
                    {"filesystem.writable": str(maildir)})
    assert ran.result.outcome.value == "ok" and ran.result.uid == NOBODY, ran.stderr
    assert (maildir / "new" / "m").read_bytes() == b"a message\n"
    assert {(p.stat().st_uid, p.stat().st_mode & 0o777) for p in
            (maildir, maildir / "cur", maildir / "new", maildir / "tmp")} == {(NOBODY, 0o700)}


def test_deliver_refuses_to_make_one_in_a_directory_of_roots(tmp_path):
    from agentrun import run_agent

    home = _parent(tmp_path, uid=0)
    ran = run_agent(["/bin/true"], "deliver", b"m\n",
                    {"filesystem.writable": str(home / "Maildir")})
    assert (ran.result.outcome.value, ran.result.exit_status) == ("config-error", 75)
    assert "its parent is owned by root" in ran.result.reason
    assert not (home / "Maildir").exists()


def test_without_create_maildir_a_missing_directory_stays_an_error(tmp_path):
    from agentrun import run_agent

    home = _parent(tmp_path)
    ran = run_agent(["/bin/true"], "deliver", b"m\n",
                    {"filesystem.writable": str(home / "Maildir"),
                     "filesystem.create_maildir": "false"})
    assert ran.result.outcome.value == "config-error"
    assert "Maildir: No such file or directory" in ran.result.reason
    assert not (home / "Maildir").exists()


@pytest.mark.parametrize(("where", "said"), [
    # local(8) runs root's mailbox_command as nobody, who cannot search /root
    ("/root/Maildir", "permission denied: /root cannot be searched"),
    ("{home}/Maildir", None),
])
def test_as_the_mta_user(where, said):
    """Unprivileged, as an MTA runs it: the caller's own Maildir is made by the caller; one it
    cannot reach says which directory it cannot search, not "no such file"."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:  # pytest's is root's alone
        os.chmod(scratch, 0o755)
        home = _parent(Path(scratch))
        maildir = where.format(home=home)
        command = [sys.executable, "-m", "compartment", "run", "-p", "deliver", "--set",
                   f"filesystem.writable={maildir}", "--", "/bin/sh", "-c", DELIVER, maildir]
        done = subprocess.run(command, input=b"a message\n", user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, timeout=60, check=False)
        if said:
            assert done.returncode == 75 and said.encode() in done.stderr, done.stderr
        else:
            assert done.returncode == 0, done.stderr
            assert Path(maildir, "new", "m").read_bytes() == b"a message\n"
            assert Path(maildir, "cur").stat().st_uid == NOBODY


def test_check_makes_nothing(tmp_path):
    """`compartment check` reports the missing directory and changes nothing."""
    home = _parent(tmp_path)
    done = subprocess.run([sys.executable, "-m", "compartment", "check", "-p", "deliver",
                           "--set", f"filesystem.writable={home}/Maildir"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 78 and "Maildir: No such file or directory" in done.stderr
    assert not (home / "Maildir").exists()
