"""`make install` and `make uninstall`, into a scratch prefix, as an administrator runs them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("make"),
                                reason="make install runs as root (it installs Debian "
                                "packages and makes a root-owned /etc/compartment)")


def _tree() -> set[str]:
    return {entry.name for entry in REPO.iterdir()}


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Path, Path]]:
    # Under /var/tmp, not pytest's root-only directory: the MTA's users must reach it.
    scratch = Path(tempfile.mkdtemp(prefix="compartment-install-", dir="/var/tmp"))
    scratch.chmod(0o755)
    prefix, etc = scratch / "prefix", scratch / "etc" / "compartment"
    before = _tree()
    done = subprocess.run(["make", "-s", "install", f"PREFIX={prefix}", f"ETCDIR={etc}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert _tree() == before, "make install left files in the tree"
    try:
        yield prefix, etc
    finally:
        shutil.rmtree(scratch)


def test_an_unprivileged_user_runs_the_installed_command(installed):
    prefix, _ = installed
    done = subprocess.run([str(prefix / "bin" / "compartment"), "run", "-p", "filter", "--",
                           "/bin/cat"], input=b"through the installed command\n",
                          capture_output=True, user=NOBODY, group=NOBODY, extra_groups=[],
                          cwd="/", timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, b"through the installed command\n"), \
        done.stderr


def test_the_installed_lmtp_front_has_its_protocol_library(installed, tmp_path):
    """make install brings the fronts' extra (aiosmtpd): the LMTP front starts as an
    unprivileged user and stops on SIGTERM."""
    prefix, _ = installed
    directory = Path(tempfile.mkdtemp(prefix="compartment-lmtp-", dir="/var/tmp"))
    try:
        os.chown(directory, NOBODY, NOBODY)
        log = directory / "front.log"
        with log.open("wb") as stderr:
            front = subprocess.Popen([str(prefix / "bin" / "compartment"), "lmtp", "--listen",
                                      f"unix:{directory}/lmtp.sock", "--log", "stderr", "-p",
                                      "filter", "--", "/bin/cat"], stderr=stderr, user=NOBODY,
                                     group=NOBODY, extra_groups=[], cwd="/")
        deadline = time.monotonic() + 30
        while b"listening on" not in log.read_bytes() and front.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        front.terminate()
        front.wait(30)
        assert front.returncode == 0, log.read_bytes()
        assert b"listening on unix:" in log.read_bytes() and b"stopped" in log.read_bytes()
    finally:
        shutil.rmtree(directory)


def test_everything_installed_is_world_readable_and_root_only_writable(installed):
    prefix, etc = installed
    for path in [prefix, *prefix.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        assert mode & 0o004 and not mode & 0o022, (path, oct(mode))
        if stat.S_ISDIR(mode):
            assert mode & 0o001, path
    for directory in (etc, etc / "policies"):
        info = directory.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o755)
    front = (prefix / "bin" / "compartment").read_text()
    assert f"\npython={prefix}/lib/compartment/bin/python\n" in front
    agents = {p.name for p in (prefix / "libexec" / "compartment").iterdir()}
    assert {"maildir-deliver.py", "add-header.sh"} <= agents
    assert (prefix / "share/doc/compartment/examples/postfix/README.md").is_file()


def test_man_finds_the_pages(installed):
    prefix, _ = installed
    if not shutil.which("man"):
        pytest.skip("man-db is not installed")
    env = {"PATH": f"{prefix}/bin:/usr/bin:/bin"}  # man looks beside PATH's bin directories
    for page, section in (("compartment", 1), ("compartment-policy", 5)):
        where = subprocess.run(["man", "-w", page], env=env, capture_output=True, text=True,
                               check=False)
        assert where.stdout.strip() == f"{prefix}/share/man/man{section}/{page}.{section}"


def test_uninstall_removes_what_install_made(installed):
    prefix, etc = installed
    done = subprocess.run(["make", "-s", "uninstall", f"PREFIX={prefix}", f"ETCDIR={etc}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    left = [p for p in prefix.rglob("*") if not p.is_dir()]
    assert not left and not etc.exists(), left
