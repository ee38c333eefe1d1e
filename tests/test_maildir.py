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
