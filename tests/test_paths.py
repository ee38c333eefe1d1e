"""compartment.paths: a path is resolved once, through no link but a trusted owner's, and the
files a supervisor reads as configuration must be writable by their owner alone."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from compartment import paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making links and files of other "
                                "uids (the attacker's) needs root; CI runs as root")
USER = 1000  # any uid but root's: the user next door


def same_file(fd: int, path: str) -> bool:
    return os.path.samestat(os.fstat(fd), os.stat(path))


def user_link(target: str, link) -> None:
    os.symlink(target, link)
    os.lchown(link, USER, USER)


def test_a_plain_path_is_the_file_itself(tmp_path):
    (tmp_path / "Maildir").mkdir()
    fd = paths.open_path(str(tmp_path / "Maildir"))
    try:
        assert same_file(fd, str(tmp_path / "Maildir"))
    finally:
        os.close(fd)


def test_links_root_owns_are_followed_relative_absolute_and_dotdot(tmp_path):
    (tmp_path / "real" / "inner").mkdir(parents=True)
    os.symlink("real/inner", tmp_path / "relative")
    os.symlink(str(tmp_path / "real"), tmp_path / "absolute")
    os.symlink("../../real", tmp_path / "real" / "inner" / "up")
    for name, expected in (("relative", "real/inner"), ("absolute/inner", "real/inner"),
                           ("real/inner/up/inner", "real/inner")):
        fd = paths.open_path(str(tmp_path / name))
        try:
            assert same_file(fd, str(tmp_path / expected)), name
        finally:
            os.close(fd)


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_link_another_user_owns_is_refused_by_name(tmp_path, where):
    (tmp_path / "bob").mkdir()
    user_link(str(tmp_path / "bob"), tmp_path / "alice")
    asked = tmp_path / "alice" if where == "last" else tmp_path / "alice" / "."
    with pytest.raises(paths.PathError) as refused:
        os.close(paths.open_path(str(asked) if where == "last" else f"{asked}/x"))
    assert f"{tmp_path / 'alice'} is a symbolic link owned by uid {USER}" in str(refused.value)
    assert "only links owned by root are followed" in str(refused.value)


def test_a_link_of_a_trusted_owner_is_followed(tmp_path):
    (tmp_path / "mine").mkdir()
    user_link(str(tmp_path / "mine"), tmp_path / "link")
    fd = paths.open_path(str(tmp_path / "link"), trusted=(0, USER))
    try:
        assert same_file(fd, str(tmp_path / "mine"))
    finally:
        os.close(fd)


def test_missing_components_and_non_directories_are_named(tmp_path):
    with pytest.raises(paths.PathError) as missing:
        paths.open_path(str(tmp_path / "no" / "such"))
    assert missing.value.errno == errno.ENOENT
    assert str(missing.value).endswith(f"{tmp_path / 'no'}: No such file or directory")
    (tmp_path / "file").write_text("")
    with pytest.raises(paths.PathError, match="file: not a directory"):
        paths.open_path(str(tmp_path / "file" / "below"))
    with pytest.raises(paths.PathError, match="not an absolute path"):
        paths.open_path("relative/path")


def test_a_loop_of_links_ends(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(paths.PathError, match="more than 40 symbolic links"):
        paths.open_path(str(tmp_path / "a"))


def test_a_directory_that_cannot_be_searched_is_named_as_such(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="paths-"))  # pytest's own tmp is root's alone
    top.chmod(0o755)
    secret = top / "private"
    (secret / "Maildir").mkdir(parents=True)
    secret.chmod(0o700)
    code = ("import sys; from compartment import paths\ntry: paths.open_path(sys.argv[1])\n"
            "except paths.PathError as err: print(err)")
    done = subprocess.run([sys.executable, "-c", code, str(secret / "Maildir")], user=65534,
                          group=65534, extra_groups=[], capture_output=True, text=True,
                          check=True)
    shutil.rmtree(top)
    assert done.stdout.strip().endswith(f"permission denied: {secret} cannot be searched")


def test_configuration_is_read_only_when_its_owner_alone_can_write_it(tmp_path):
    tmp_path.chmod(0o755)
    policy = tmp_path / "policy.toml"
    policy.write_text("x = 1\n")
    policy.chmod(0o644)
    os.close(paths.open_trusted(str(policy)))
    policy.chmod(0o664)
    with pytest.raises(paths.PathError, match=r"policy.toml: writable by its group \(mode "
                                              r"0664\)"):
        paths.open_trusted(str(policy))
    policy.chmod(0o644)
    tmp_path.chmod(0o777)
    with pytest.raises(paths.PathError, match=r"writable by its group and others \(mode "
                                              r"0777\)"):
        paths.open_trusted(str(policy))
    tmp_path.chmod(0o1777)  # sticky, as /tmp: root's entries there are root's to rename
    os.close(paths.open_trusted(str(policy)))
    os.chown(policy, USER, USER)
    with pytest.raises(paths.PathError, match=f"owned by uid {USER}, not root"):
        paths.open_trusted(str(policy))
    os.close(paths.open_trusted(str(policy), owners=(0, USER)))


def test_configuration_reached_through_a_users_link_is_refused(tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "policy.toml").write_text("x = 1\n")
    user_link(str(tmp_path / "policy.toml"), tmp_path / "link.toml")
    with pytest.raises(paths.PathError, match="symbolic link owned by uid"):
        paths.open_trusted(str(tmp_path / "link.toml"))
